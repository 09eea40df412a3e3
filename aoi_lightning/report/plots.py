"""Figures of the HTML report (matplotlib, Agg backend): image-level ROC and PR curves, score histograms."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first
import numpy as np  # noqa: E402

GOOD_COLOR = "#2e7d32"
DEFECT_COLOR = "#c62828"
THRESHOLD_COLOR = "#111111"


def _sorted_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct score, scores descending (NG when score >= t)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = np.cumsum(1 - y)[last]
    return tps.astype(np.float64), fps.astype(np.float64), s[last]


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of binary labels (1 = defective) for "NG when score >= t".

    Args:
        scores: (N,) image scores.
        labels: (N,) 0/1 labels, both classes present.

    Returns:
        fpr (K+1,), tpr (K+1,) starting at (0, 0), and the thresholds (K,) of the points after the first.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    tps, fps, thr = _sorted_counts(s, y)
    pos, neg = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    return np.r_[0.0, fps / neg], np.r_[0.0, tps / pos], thr


def pr_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve; recall ascending from the highest threshold, as in the usual definition.

    Returns:
        precision (K,), recall (K,), thresholds (K,) (one point per distinct score).
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    tps, fps, thr = _sorted_counts(s, y)
    pos = max(int(y.sum()), 1)
    precision = tps / np.maximum(tps + fps, 1.0)
    return precision, tps / pos, thr


def average_precision(scores, labels) -> float:
    """Step-wise average precision: sum over thresholds of (recall increase) x precision."""
    precision, recall, _ = pr_curve(scores, labels)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(fpr, tpr = recall, precision) at "NG when score >= threshold"."""
    pred = scores >= threshold
    pos, neg = labels == 1, labels == 0
    tp, fp = float((pred & pos).sum()), float((pred & neg).sum())
    return fp / max(neg.sum(), 1), tp / max(pos.sum(), 1), tp / (tp + fp) if tp + fp else 1.0


def curves_png(scores, labels, threshold: float | None, title: str) -> bytes:
    """ROC and PR curves side by side, the tuned threshold's operating point marked. Needs both classes."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    fpr, tpr, _ = roc_curve(s, y)
    precision, recall, _ = pr_curve(s, y)
    auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(9.0, 4.0))
    ax_roc.plot(fpr, tpr, color=DEFECT_COLOR, lw=2, label=f"AUROC {auc:.4f}")
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
