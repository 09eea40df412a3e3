"""Threshold search: image F1 on a labelled split, pixel F1/IoU on histograms, quantiles and conformal bounds.

Convention everywhere: a score `s` is NG (defective) when `s >= threshold`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from aoi_lightning.metrics.pixel_curves import GroupHist, best_bin


@dataclass
class ThresholdResult:
    """A tuned threshold and how it was found."""

    threshold: float
    metric: str
    value: float
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def best_f1_threshold(scores: torch.Tensor, labels: torch.Tensor) -> ThresholdResult:
    """Threshold maximising F1 on labelled scores (both classes required), exact over every distinct score.

    The threshold is placed midway between the best score and the next lower distinct score, so the
    decisions on these scores equal those at the best score itself while being robust to small shifts.
    Among equal F1 values the highest threshold wins (fewest false rejects).
    """
    scores = scores.detach().to(torch.float64).flatten()
    labels = labels.detach().to(torch.int64).flatten()
    if scores.numel() == 0 or labels.min() == labels.max():
        raise ValueError("F1 threshold needs both good and defective samples")
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order]
    tp = torch.cumsum(y, 0).to(torch.float64)
    fp = torch.cumsum(1 - y, 0).to(torch.float64)
    # candidate thresholds: each distinct score, i.e. the last position of each run of equal scores
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[:-1] != s[1:]
    tp, fp, cand = tp[last], fp[last], s[last]
    fn = float(y.sum()) - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    best = float(f1.max())
    idx = int((f1 == best).nonzero().min())  # descending order: the first is the highest threshold
    best_score = float(cand[idx])
    if idx + 1 < cand.numel():
        lower = float(cand[idx + 1])
    else:  # every image NG at the optimum: go below the lowest score by half the gap above it (or a relative step)
        gap = float(cand[idx - 1]) - best_score if idx > 0 else 0.0
        lower = best_score - max(gap, 2e-6 * max(abs(best_score), 1e-12))
    return ThresholdResult(threshold=_float32_between(lower, best_score), metric="f1", value=best)


def _float32_between(lower: float, upper: float) -> float:
    """The float32 value nearest the midpoint of (lower, upper] that stays strictly above `lower` and at most
    `upper`, so that storing the threshold in a float32 buffer keeps every decision."""
    t = np.float32((lower + upper) / 2.0)
    if float(t) > upper:
        t = np.nextafter(np.float32(upper), np.float32(-np.inf)) if np.float32(upper) > upper else np.float32(upper)
    if float(t) <= lower:
        t = np.nextafter(np.float32(lower), np.float32(np.inf))
    return float(t)


def best_pixel_threshold(hist: GroupHist, edges: torch.Tensor, metric: str = "f1") -> ThresholdResult:
    """Pixel threshold (a bin edge) maximising pixel F1 or IoU on the histograms."""
    if float(hist.pos.sum()) == 0 or float(hist.neg.sum()) == 0:
        raise ValueError("pixel threshold search needs both defective and good pixels")
    index, value = best_bin(hist, metric)
    return ThresholdResult(threshold=float(edges[index]), metric=metric, value=value)


def quantile_threshold(values: torch.Tensor | np.ndarray, q: float) -> float:
    """Plain empirical quantile (linear interpolation) of good-part values."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("quantile threshold needs at least one good score")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    return float(np.quantile(arr, q))


def conformal_threshold(good_scores: torch.Tensor | np.ndarray, alpha: float) -> tuple[float, bool]:
    """Split-conformal threshold with false-reject rate <= alpha on exchangeable good parts.

    With n held-out good scores, the k-th smallest, k = ceil((n + 1)(1 - alpha)), bounds the score of a new
    good part with probability >= 1 - alpha (Vovk et al.; assumption: the new part and the held-out parts
    are exchangeable, i.e. drawn from the same process). The returned threshold is the next float above it,
    so that a score equal to it is still OK.

    Returns:
        (threshold, guaranteed): guaranteed is False when n < 1/alpha - 1 (then the maximum is used).
    """
    arr = np.sort(np.asarray(good_scores, dtype=np.float64).ravel())
    n = arr.size
    if n == 0:
        raise ValueError("conformal calibration needs at least one held-out good image")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k = math.ceil((n + 1) * (1.0 - alpha))
    guaranteed = k <= n
    value = arr[min(k, n) - 1]
    return float(np.nextafter(value, np.inf)), guaranteed
