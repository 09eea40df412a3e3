"""Threshold search: image F1 on a labelled split, pixel F1/IoU on histograms, quantiles and conformal bounds.

Tie rule everywhere: a score `s` is NG (defective) when `s > threshold` (strict), and a pixel is defective when
its anomaly-map value is `> threshold`. A threshold taken from an observed good score therefore never rejects
that score. Thresholds are stored in float32 buffers (checkpoint, ONNX export): every threshold returned here is
a float32 value chosen so that the decisions made in float64 during the search survive that rounding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import binary_precision_recall_curve

from aoi_lightning.metrics.pixel_curves import GroupHist, best_bin

#: Largest split whose confusion counts are recovered exactly from torchmetrics' float32 precision and recall.
MAX_F1_SAMPLES = 1 << 22


class DegenerateScoresError(ValueError):
    """The model gives (nearly) the same score to every image: no threshold can separate anything."""


@dataclass
class ThresholdResult:
    """A tuned threshold and how it was found."""

    threshold: float
    metric: str
    value: float
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def score_spread_is_degenerate(scores: torch.Tensor | np.ndarray) -> bool:
    """True when two or more scores are all equal once stored as float32 (the precision of the model's
    output and of the threshold buffers): then no threshold tells any two images apart.

    Args:
        scores: (N,) image scores, any float dtype.
    """
    arr = np.asarray(scores, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size < 2:
        return False
    as32 = arr.astype(np.float32)
    return bool(as32.max() == as32.min())


def check_score_spread(scores: torch.Tensor | np.ndarray, what: str) -> None:
    """Refuse a model whose `what` scores (e.g. "validation image") are constant, with one line saying what helps.

    Raises:
        DegenerateScoresError: all (>= 2) scores equal in float32, e.g. a PatchCore memory bank of one row
            scoring every image alike, or a model fitted on one or two images.
    """
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if score_spread_is_degenerate(arr):
        raise DegenerateScoresError(
            f"the model gives all {arr.size} {what}s the same score ({float(arr[0]):.6g}): it cannot tell good from "
            "defective parts; fit it on more (and more varied) good images, keep a larger memory bank "
            "(model.init_args.coreset_ratio) or use another backbone"
        )


def float32_at_least(value: float) -> float:
    """The smallest float32 value >= `value`: a threshold stored in float32 that still accepts (`s > t` is
    false for) a score equal to `value`."""
    t = np.float32(value)
    if float(t) < value:
        t = np.nextafter(t, np.float32(np.inf))
    return float(t)


def best_f1_threshold(scores: torch.Tensor, labels: torch.Tensor) -> ThresholdResult:
    """Threshold maximising image F1 on labelled scores (both classes required), exact over every distinct score.

    The curve is torchmetrics' `binary_precision_recall_curve` (exact: one point per distinct score). The scores
    go in as their dense ranks scaled to [0, 1], which keeps their order and ties exactly (torchmetrics would
    otherwise squash scores outside [0, 1] through a sigmoid, tying large anomaly scores). F1 is computed from
    the confusion counts recovered from the float32 precision and recall (exact below `MAX_F1_SAMPLES` samples),
    so equal F1 values compare equal.

    Placement (tie rule `score > threshold` is NG): with `s_best` the lowest score called NG at the optimum and
    `s_lower` the next lower distinct score, the threshold is the float32 value nearest the midpoint that
    satisfies `s_lower <= t < s_best`, so the decisions on these scores are those of the optimum and stay so
    under small score shifts. When the optimum calls every image NG, `s_lower` is taken below the lowest score by
    the gap above it (or a relative step). Among equal F1 values the highest threshold wins (fewest false rejects).

    Args:
        scores: (N,) image scores.
        labels: (N,) 0 = good, 1 = defective.

    Raises:
        ValueError: empty input or a single class.
    """
    scores = scores.detach().to(torch.float64).flatten().cpu()
    labels = labels.detach().to(torch.int64).flatten().cpu()
    if scores.numel() == 0 or labels.min() == labels.max():
        raise ValueError("F1 threshold needs both good and defective samples")
    if scores.numel() > MAX_F1_SAMPLES:
        raise ValueError(f"F1 threshold search takes at most {MAX_F1_SAMPLES} scores, got {scores.numel()}")
    uniq, rank = torch.unique(scores, sorted=True, return_inverse=True)
    scaled = rank.to(torch.float64) / max(uniq.numel() - 1, 1)
    precision, recall, cand = binary_precision_recall_curve(scaled, labels, thresholds=None)
    # cand ascends over the distinct scaled scores, i.e. over `uniq`; drop the appended (precision 1, recall 0) point
    precision, recall = precision[:-1].to(torch.float64), recall[:-1].to(torch.float64)
    if cand.numel() != uniq.numel():  # pragma: no cover - torchmetrics keeps every distinct score
        raise RuntimeError("precision-recall curve lost distinct scores")
    n_pos = int(labels.sum())
    tp = torch.round(recall * n_pos)
    fp = torch.where(tp > 0, torch.round(tp / precision.clamp_min(1e-300)) - tp, torch.zeros_like(tp))
    f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
    best = float(f1.max())
    idx = int((f1 == best).nonzero().max())  # ascending thresholds: the last is the highest
    best_score = float(uniq[idx])
    if idx > 0:
        lower = float(uniq[idx - 1])
    else:  # every image NG at the optimum: go below the lowest score by the gap above it (or a relative step)
        gap = float(uniq[1]) - best_score if uniq.numel() > 1 else 0.0
        lower = best_score - max(gap, 2e-6 * max(abs(best_score), 1e-12))
    return ThresholdResult(threshold=_float32_between(lower, best_score), metric="f1", value=best)


def _float32_between(lower: float, upper: float) -> float:
    """The float32 value nearest the midpoint of [lower, upper) that stays at least `lower` and strictly below
    `upper`, so that storing the threshold in a float32 buffer keeps every decision of the rule `s > t`
    (`lower` is OK, `upper` is NG). When no float32 lies in between (scores closer than float32 resolution),
    the float32 value just below `upper`."""
    t = np.float32((lower + upper) / 2.0)
    while float(t) >= upper:
        t = np.nextafter(t, np.float32(-np.inf))
    if float(t) < lower:
        up = np.nextafter(t, np.float32(np.inf))
        if float(up) < upper:
            t = up
    return float(t)


def best_pixel_threshold(hist: GroupHist, edges: torch.Tensor, metric: str = "f1") -> ThresholdResult:
    """Pixel threshold (a bin edge, exact in float32) maximising pixel F1 or IoU on the histograms; a pixel is
    defective when its value is `> threshold` (see `aoi_lightning.metrics.pixel_curves`)."""
    if float(hist.pos.sum()) == 0 or float(hist.neg.sum()) == 0:
        raise ValueError("pixel threshold search needs both defective and good pixels")
    index, value = best_bin(hist, metric)
    return ThresholdResult(threshold=float(edges[index]), metric=metric, value=value)


def quantile_threshold(values: torch.Tensor | np.ndarray, q: float) -> float:
    """Empirical quantile (linear interpolation) of good-part values, rounded up to float32: a good value at the
    quantile is not rejected under `s > threshold` (with q = 1: the largest value is OK)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("quantile threshold needs at least one good score")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    return float32_at_least(float(np.quantile(arr, q)))


def conformal_threshold(good_scores: torch.Tensor | np.ndarray, alpha: float) -> tuple[float, bool]:
    """Split-conformal threshold with false-reject rate <= alpha on exchangeable good parts.

    With n held-out good scores, the k-th smallest, k = ceil((n + 1)(1 - alpha)), bounds the score of a new
    good part with probability >= 1 - alpha (Vovk et al.; assumption: the new part and the held-out parts
    are exchangeable, i.e. drawn from the same process). The threshold is that score itself (rounded up to
    float32): under the rule `s > threshold` a part scoring exactly it is OK.

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
    return float32_at_least(float(value)), guaranteed
