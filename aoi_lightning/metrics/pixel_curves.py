"""Constant-memory pixel-level curves: histograms of anomaly-map values on a shared power-of-two bin grid.

Bins have width 2**e and the grid starts at 0 (anomaly maps are distances, never negative). When a value
beyond the range arrives, the width doubles as often as needed and neighbouring bins are summed, so memory
is fixed (`num_bins` counts per histogram) whatever the number of pixels. Bin j holds the values in
(j * 2**e, (j + 1) * 2**e] (bin 0 also holds 0), so a threshold at a bin edge is exact under the strict rule of
`aoi_lightning.thresholds.search`: a pixel is defective at edge j (value > edge) exactly when its bin index is
>= j (edge 0 excepted, which also counts values equal to 0). Edges are small multiples of a power of two, so they
are exact in float32.

Per group it keeps: negative-pixel counts, positive-pixel counts and, for AUPRO, the per-region overlap mass
(each ground-truth region's pixels weighted by 1/region area) with the number of regions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

DEFAULT_BINS = 1 << 16


@dataclass
class GroupHist:
    """Histograms of one group of images (e.g. one split and defect type)."""

    neg: torch.Tensor
    pos: torch.Tensor
    pro: torch.Tensor
    regions: int = 0

    @classmethod
    def empty(cls, bins: int) -> GroupHist:
        z = torch.zeros(bins, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone(), 0)

    def add(self, other: GroupHist) -> None:
        self.neg += other.neg
        self.pos += other.pos
        self.pro += other.pro
        self.regions += other.regions


def region_labels(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """8-connected ground-truth regions of a binary (H, W) mask: (number of regions, label image)."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return count - 1, labels


@dataclass
class PixelHistograms:
    """Grouped pixel histograms on a shared, growing bin grid."""

    num_bins: int = DEFAULT_BINS
    exponent: int | None = None  # bin width is 2**exponent
    groups: dict[str, GroupHist] = field(default_factory=dict)

    @property
    def width(self) -> float:
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    def edges(self) -> torch.Tensor:
        """Lower edge of every bin (num_bins,)."""
        return torch.arange(self.num_bins, dtype=torch.float64) * self.width

    def _grow_to(self, max_value: float) -> None:
        if max_value <= 0 or not math.isfinite(max_value):
            max_value = max(max_value, 1e-12) if math.isfinite(max_value) else 1e-12
        needed = math.ceil(math.log2(max_value / self.num_bins)) if max_value > 0 else -40
        # strictly inside the range: max_value < num_bins * 2**e
        while self.num_bins * math.ldexp(1.0, needed) <= max_value:
            needed += 1
        if self.exponent is None:
            self.exponent = needed
            return
        self.rebin(needed)

    def rebin(self, exponent: int) -> None:
        """Widen the bins to 2**exponent (never narrows): neighbouring bins are summed, which is exact."""
        if self.exponent is None:
            self.exponent = exponent
            return
        if exponent <= self.exponent:
            return
        needed = exponent
        factor = 1 << (needed - self.exponent)
        for hist in self.groups.values():
            for name in ("neg", "pos", "pro"):
                old = getattr(hist, name)
                merged = torch.zeros_like(old)
                if factor >= self.num_bins:
                    merged[0] = old.sum()
                else:
                    merged[: self.num_bins // factor] = old.view(-1, factor).sum(dim=1)
                setattr(hist, name, merged)
        self.exponent = needed

    def bin_index(self, values: torch.Tensor) -> torch.Tensor:
        """Bin of each value: j such that j * width < value <= (j + 1) * width (0 for values <= 0); exact, the
        width being a power of two."""
        idx = torch.ceil(values.to(torch.float64).clamp_min(0) / self.width).to(torch.int64) - 1
        return idx.clamp_(0, self.num_bins - 1)

    def update(self, group: str, anomaly_map: torch.Tensor, mask: torch.Tensor) -> None:
        """Add one image: map (H, W) float, mask (H, W) binary."""
        amap = torch.nan_to_num(anomaly_map.detach().to("cpu", torch.float32), nan=0.0, posinf=3.0e38)
        self._grow_to(float(amap.max()))
        hist = self.groups.setdefault(group, GroupHist.empty(self.num_bins))
        bins = self.bin_index(amap)
        gt = mask.detach().to("cpu").bool()
        hist.neg += torch.bincount(bins[~gt], minlength=self.num_bins).to(torch.float64)
        if bool(gt.any()):
            hist.pos += torch.bincount(bins[gt], minlength=self.num_bins).to(torch.float64)
            count, labels = region_labels(gt.numpy())
            labels_t = torch.from_numpy(labels)
            for region in range(1, count + 1):
                sel = bins[labels_t == region]
                hist.pro += torch.bincount(sel, minlength=self.num_bins).to(torch.float64) / sel.numel()
            hist.regions += count

    def merge_from(self, others: list[PixelHistograms]) -> None:
        """Add the histograms of `others` (e.g. other processes' shares of a split) on a common bin grid."""
        exponents = [h.exponent for h in [self, *others] if h.exponent is not None]
        if not exponents:
            return
        target = max(exponents)
        for hist in [self, *others]:
            if hist.exponent is not None:
                hist.rebin(target)
        self.exponent = target
        for other in others:
            for name, group in other.groups.items():
                self.groups.setdefault(name, GroupHist.empty(self.num_bins)).add(group)

    def merged(self, groups: list[str] | None = None) -> GroupHist:
        """Sum of the named groups (all when None)."""
        out = GroupHist.empty(self.num_bins)
        for name, hist in self.groups.items():
            if groups is None or name in groups:
                out.add(hist)
        return out


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    return x.flip(0).cumsum(0).flip(0)


def pixel_auroc(hist: GroupHist) -> float:
    """Area under the pixel ROC curve from the histograms (ties within a bin count half)."""
    n_pos, n_neg = float(hist.pos.sum()), float(hist.neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tpr = torch.cat([_reverse_cumsum(hist.pos) / n_pos, torch.zeros(1, dtype=torch.float64)])
    fpr = torch.cat([_reverse_cumsum(hist.neg) / n_neg, torch.zeros(1, dtype=torch.float64)])
    return float(torch.trapezoid(tpr.flip(0), fpr.flip(0)))


def pixel_aupro(hist: GroupHist, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to `fpr_limit` (MVTec AD's AUPRO)."""
    n_neg = float(hist.neg.sum())
    if hist.regions == 0 or n_neg == 0:
        return float("nan")
    fpr = torch.cat([_reverse_cumsum(hist.neg) / n_neg, torch.zeros(1, dtype=torch.float64)]).flip(0)
    pro = torch.cat([_reverse_cumsum(hist.pro) / hist.regions, torch.zeros(1, dtype=torch.float64)]).flip(0)
    # fpr ascending; cut at the limit with linear interpolation
    keep = fpr <= fpr_limit
    last = int(keep.nonzero().max())
    xs, ys = fpr[: last + 1], pro[: last + 1]
    if last + 1 < fpr.numel() and float(xs[-1]) < fpr_limit:
        x0, x1 = float(fpr[last]), float(fpr[last + 1])
        y0, y1 = float(pro[last]), float(pro[last + 1])
        y = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
        xs = torch.cat([xs, torch.tensor([fpr_limit], dtype=torch.float64)])
        ys = torch.cat([ys, torch.tensor([y], dtype=torch.float64)])
    return float(torch.trapezoid(ys, xs)) / fpr_limit


def confusion_at_bin(hist: GroupHist, index: int) -> tuple[float, float, float, float]:
    """(tp, fp, fn, tn) when pixels with bin >= index (value > edge `index`) are called defective."""
    tp = float(hist.pos[index:].sum())
    fp = float(hist.neg[index:].sum())
    return tp, fp, float(hist.pos.sum()) - tp, float(hist.neg.sum()) - fp


def best_bin(hist: GroupHist, metric: str = "f1") -> tuple[int, float]:
    """Bin edge index maximising pixel F1 or IoU (pixels > the edge defective); returns (index, value).
    Ties: the highest threshold."""
    tp = _reverse_cumsum(hist.pos)
    fp = _reverse_cumsum(hist.neg)
    fn = float(hist.pos.sum()) - tp
    if metric == "f1":
        score = 2 * tp / (2 * tp + fp + fn).clamp_min(1e-12)
    elif metric == "iou":
        score = tp / (tp + fp + fn).clamp_min(1e-12)
    else:
        raise ValueError(f"pixel metric must be 'f1' or 'iou', got {metric!r}")
    best = float(score.max())
    index = int((score == best).nonzero().max())
    return index, best
