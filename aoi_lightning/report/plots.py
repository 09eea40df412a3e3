"""Figures of the HTML report (matplotlib, Agg backend): image-level ROC and PR curves, score histograms."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import (  # noqa: E402
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
)

from aoi_lightning.metrics.evaluation import image_auroc, unit_scores  # noqa: E402

GOOD_COLOR = "#2e7d32"
DEFECT_COLOR = "#c62828"
THRESHOLD_COLOR = "#111111"


def _as_tensors(scores, labels) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Scores scaled to [0, 1] (`unit_scores`), labels as int64, and the distinct scores descending: the
    thresholds of the exact curves, one per distinct score, given in the original units."""
    s = np.asarray(scores, dtype=np.float64)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return unit_scores(torch.as_tensor(s)), y, np.unique(s)[::-1].copy()


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of binary labels (1 = defective) for "NG when score >= t" (torchmetrics `binary_roc`, exact).

    Args:
        scores: (N,) image scores.
        labels: (N,) 0/1 labels, both classes present.

    Returns:
        fpr (K+1,), tpr (K+1,) starting at (0, 0), and the thresholds (K,) (the K distinct scores, descending)
        of the points after the first.
    """
    s, y, thresholds = _as_tensors(scores, labels)
    fpr, tpr, _ = binary_roc(s, y)
    return fpr.numpy(), tpr.numpy(), thresholds


def pr_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve (torchmetrics `binary_precision_recall_curve`, exact), one point per distinct score,
    from the highest threshold down: recall ascending. Needs at least one defective image.

    Returns:
        precision (K,), recall (K,), thresholds (K,) (the distinct scores, descending).
    """
    s, y, thresholds = _as_tensors(scores, labels)
    precision, recall, _ = binary_precision_recall_curve(s, y)
    # torchmetrics orders by ascending threshold and appends the (recall 0, precision 1) end point
    return precision[:-1].flip(0).numpy(), recall[:-1].flip(0).numpy(), thresholds


def average_precision(scores, labels) -> float:
    """Step-wise average precision, sum over thresholds of (recall increase) x precision (torchmetrics
    `binary_average_precision`; equal to scikit-learn's `average_precision_score`)."""
    s, y, _ = _as_tensors(scores, labels)
    return float(binary_average_precision(s, y))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(fpr, tpr = recall, precision) at "NG when score > threshold, the product's tie rule"."""
    pred = scores > threshold
    pos, neg = labels == 1, labels == 0
    tp, fp = float((pred & pos).sum()), float((pred & neg).sum())
    return fp / max(neg.sum(), 1), tp / max(pos.sum(), 1), tp / (tp + fp) if tp + fp else 1.0


def curves_png(scores, labels, threshold: float | None, title: str) -> bytes:
    """ROC and PR curves side by side, the tuned threshold's operating point marked. Needs both classes."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    fpr, tpr, _ = roc_curve(s, y)
    precision, recall, _ = pr_curve(s, y)
    auc = image_auroc(torch.as_tensor(s), torch.as_tensor(y))
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(9.0, 4.0))
    ax_roc.plot(fpr, tpr, color=DEFECT_COLOR, lw=2, label=f"AUROC {auc:.4f}" if auc is not None else "AUROC n/a")
    ax_roc.plot([0, 1], [0, 1], color="#999999", lw=1, ls="--")
    ax_roc.set(
        xlabel="false positive rate (good judged NG)",
        ylabel="true positive rate (defects caught)",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        title="ROC",
    )
    ax_pr.step(
        np.r_[0.0, recall],
        np.r_[precision[0] if precision.size else 1.0, precision],
        where="post",
        color=DEFECT_COLOR,
        lw=2,
        label=f"AP {average_precision(s, y):.4f}",
    )
    ax_pr.axhline(float(y.mean()), color="#999999", lw=1, ls="--")
    ax_pr.set(xlabel="recall", ylabel="precision", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title="Precision-recall")
    if threshold is not None and math.isfinite(threshold):
        op_fpr, op_tpr, op_prec = _operating_point(s, y, threshold)
        ax_roc.plot([op_fpr], [op_tpr], "o", color=THRESHOLD_COLOR, ms=8, label=f"threshold {threshold:.4g}")
        ax_pr.plot([op_tpr], [op_prec], "o", color=THRESHOLD_COLOR, ms=8, label=f"threshold {threshold:.4g}")
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def histogram_png(scores, labels, threshold: float | None, title: str) -> bytes:
    """Histograms of the scores of good and defective images on shared bins, the threshold as a vertical line."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    fig, ax = plt.subplots(figsize=(9.0, 3.6))
    values = s if threshold is None or not math.isfinite(threshold) else np.r_[s, threshold]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    bins = np.linspace(low, high if high > low else low + 1.0, 31)
    for label, name, color in ((0, "good", GOOD_COLOR), (1, "defective", DEFECT_COLOR)):
        part = s[y == label]
        if part.size:
            ax.hist(part, bins=bins, color=color, alpha=0.55, label=f"{name} ({part.size})", edgecolor="white")
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color=THRESHOLD_COLOR, lw=2, ls="--", label=f"image threshold {threshold:.4g}")
    ax.set(xlabel="image score (NG at or above the threshold)", ylabel="images", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _png(fig)
