"""Evaluation of a split: per-image records, exact image metrics, constant-memory pixel metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torchmetrics.functional.classification import binary_auroc

from aoi_lightning.data.image_io import GOOD
from aoi_lightning.data.preprocess import crop_box
from aoi_lightning.metrics.pixel_curves import PixelHistograms, pixel_aupro, pixel_auroc
from aoi_lightning.postprocess.prediction import content_score


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def content_pixels(batch: dict, i: int, *planes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`planes` (each (H, W)) of item `i` cut to its content box (`batch["content_box"]`, the part of the model
    input that holds the image with `resize: fit_pad`); whole when the batch has no box."""
    boxes = batch.get("content_box")
    if boxes is None:
        return planes
    return tuple(crop_box(p, boxes[i]) for p in planes)


@dataclass
class EvaluationCollector:
    """Accumulates model outputs of one loop (validation or test).

    Image scores and labels are kept per image (small); pixel data (of each image's content box, the whole map
    unless `resize: fit_pad` padded it) only as histograms per
    `split/defect_type` group, plus exact confusion counts at the current pixel threshold (a pixel is
    defective when its map value is `> threshold`).
    """

    num_bins: int = 1 << 16
    records: list[dict] = field(default_factory=list)
    hist: PixelHistograms = field(init=False)
    confusion: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hist = PixelHistograms(num_bins=self.num_bins)

    def reset(self) -> None:
        self.records = []
        self.hist = PixelHistograms(num_bins=self.num_bins)
        self.confusion = {}

    def update(self, batch: dict, pred_score: torch.Tensor, anomaly_map: torch.Tensor, pixel_threshold: float) -> None:
        """Add a batch: `batch` from the data module, scores (B,), maps (B, 1, H, W); each image's score and pixels
        are those of its content box (`content_score`, `content_pixels`)."""
        scores = pred_score.detach().float().cpu()
        maps = anomaly_map.detach().float().cpu()[:, 0]
        for i in range(scores.shape[0]):
            split = batch["split"][i]
            defect = batch["defect_type"][i]
            group = f"{split}/{defect}"
            label = int(batch["label"][i])
            (amap,) = content_pixels(batch, i, maps[i])
            self.records.append(
                {
                    "image_path": batch["image_path"][i],
                    "gt_label": label if label >= 0 else None,
                    "defect_type": defect,
                    "split": split,
                    "pred_score": content_score(scores[i], amap, maps[i].shape),
                    "map_max": float(amap.max()),
                }
            )
            if label < 0 or not bool(batch["has_mask"][i]):
                continue
            (mask,) = content_pixels(batch, i, batch["mask"][i, 0].cpu() > 0)
            self.hist.update(group, amap, mask)
            if math.isfinite(pixel_threshold):
                pred = amap > pixel_threshold  # strict tie rule, as thresholds.search
                counts = self.confusion.setdefault(group, [0.0, 0.0, 0.0])
                counts[0] += float((pred & mask).sum())
                counts[1] += float((pred & ~mask).sum())
                counts[2] += float((~pred & mask).sum())

    def merge_from(self, others: list[EvaluationCollector]) -> None:
        """Append the records, histograms and confusion counts of `others` (in their order)."""
        for other in others:
            self.records.extend(other.records)
            for group, counts in other.confusion.items():
                mine = self.confusion.setdefault(group, [0.0, 0.0, 0.0])
                for k in range(3):
                    mine[k] += counts[k]
        self.hist.merge_from([o.hist for o in others])

    def select(self, splits: tuple[str, ...], defect_types: tuple[str, ...] | None = None) -> list[dict]:
        return [
            r
            for r in self.records
            if r["split"] in splits
            and (defect_types is None or r["defect_type"] in defect_types)
            and r["gt_label"] is not None
        ]

    def groups(self, splits: tuple[str, ...], defect_types: tuple[str, ...] | None = None) -> list[str]:
        names = {f"{r['split']}/{r['defect_type']}" for r in self.select(splits, defect_types)}
        return sorted(names)

    def metrics(
        self,
        splits: tuple[str, ...],
        defect_types: tuple[str, ...] | None = None,
        image_threshold: float = float("nan"),
        pixel_threshold: float = float("nan"),
        aupro_fpr_limit: float = 0.3,
    ) -> dict:
        """Metrics of the images whose split is in `splits` (and defect type in `defect_types`)."""
        recs = self.select(splits, defect_types)
        out: dict = {"num_images": len(recs)}
        if not recs:
            return out
        scores = torch.tensor([r["pred_score"] for r in recs], dtype=torch.float64)
        labels = torch.tensor([r["gt_label"] for r in recs], dtype=torch.int64)
        out["num_good"] = int((labels == 0).sum())
        out["num_defective"] = int((labels == 1).sum())
        both = 0 < out["num_good"] < len(recs)
        out["image_auroc"] = image_auroc(scores, labels) if both else None
        groups = self.groups(splits, defect_types)
        hist = self.hist.merged(groups)
        out["pixel_auroc"] = _clean(pixel_auroc(hist))
        out["pixel_aupro"] = _clean(pixel_aupro(hist, aupro_fpr_limit))
        if math.isfinite(image_threshold):
            out.update(image_decision_metrics(scores, labels, image_threshold))
        if math.isfinite(pixel_threshold) and any(g in self.confusion for g in groups):
            tp, fp, fn = (sum(self.confusion.get(g, [0.0, 0.0, 0.0])[k] for g in groups) for k in range(3))
            out["pixel_f1"] = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else None
            out["pixel_iou"] = tp / (tp + fp + fn) if (tp + fp + fn) > 0 else None
        return out


def unit_scores(scores: torch.Tensor) -> torch.Tensor:
    """(N,) scores min-max scaled to [0, 1] in float64 (rank preserving) for torchmetrics' binary curves, which
    would otherwise squash scores outside [0, 1] through a sigmoid and so tie large anomaly scores. All zero when
    the scores are all equal; undo with `s * (max - min) + min`."""
    s = scores.to(torch.float64)
    span = float(s.max() - s.min()) if s.numel() else 0.0
    return (s - s.min()) / span if span > 0 else torch.zeros_like(s)


def image_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Exact image AUROC of (N,) scores and 0/1 labels (torchmetrics on `unit_scores`)."""
    return _clean(float(binary_auroc(unit_scores(scores), labels)))


def image_decision_metrics(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    """F1, precision, recall, accuracy, false-reject rate (good judged NG), escape rate (defect judged OK).

    An image is NG when `score > threshold` (strict: a good score used as the threshold is OK)."""
    pred = scores > threshold
    pos = labels == 1
    tp = int((pred & pos).sum())
    fp = int((pred & ~pos).sum())
    fn = int((~pred & pos).sum())
    tn = int((~pred & ~pos).sum())
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
    return {
        "image_f1": f1,
        "image_precision": precision,
        "image_recall": recall,
        "image_accuracy": (tp + tn) / max(1, len(labels)),
        "false_reject_rate": fp / (fp + tn) if fp + tn else None,
        "escape_rate": fn / (fn + tp) if fn + tp else None,
    }


def build_metrics_report(
    collector: EvaluationCollector, split_policy: str, image_threshold: float, pixel_threshold: float
) -> dict:
    """The metrics.json document (SPEC shape) from a test pass over the whole test folder.

    `test` holds the images not used for validation; `full_test` all of them (threshold-free metrics only,
    comparable with published numbers); `val` the validation images seen in this pass;
    `per_defect_type` each defect type against the good images of the full test set.
    """
    test_splits = ("test",) if split_policy != "same_as_test" else ("test", "val")
    all_splits = ("test", "val")
    report: dict = {
        "split_policy": split_policy,
        "optimistic": split_policy == "same_as_test",
        "test": collector.metrics(test_splits, image_threshold=image_threshold, pixel_threshold=pixel_threshold),
    }
    full = collector.metrics(all_splits)
    report["full_test"] = {
        k: full.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "num_images", "num_good", "num_defective")
    }
    if split_policy == "test_half":
        report["val"] = collector.metrics(("val",), image_threshold=image_threshold, pixel_threshold=pixel_threshold)
    defects = sorted({r["defect_type"] for r in collector.records if r["gt_label"] == 1})
    per_type = {}
    for defect in defects:
        m = collector.metrics(all_splits, (GOOD, defect))
        entry = {k: m.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "num_images")}
        if math.isfinite(image_threshold):
            on_test = collector.metrics(test_splits, (defect,), image_threshold=image_threshold)
            entry["test_escape_rate"] = on_test.get("escape_rate")
            entry["test_num_images"] = on_test.get("num_images")
        per_type[defect] = entry
    report["per_defect_type"] = per_type
    report["thresholds"] = {
        "image_threshold": image_threshold if math.isfinite(image_threshold) else None,
        "pixel_threshold": pixel_threshold if math.isfinite(pixel_threshold) else None,
    }
    return report
