"""EvaluationCollector and the metrics.json document on hand-made model outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from aoi_lightning.metrics.evaluation import EvaluationCollector, build_metrics_report, image_auroc

SIZE = 16
DEFECTS = ("crack", "scratch")
THRESHOLD_KEYS = ("image_f1", "false_reject_rate", "escape_rate")


def _image(rng: np.random.Generator, defect: str, split: str, index: int) -> dict:
    """One image: a map with a raised defect square, its mask, and a score (large values, far above 1)."""
    label = 0 if defect == "good" else 1
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    amap = rng.random((SIZE, SIZE)).astype(np.float32) * 100.0
    if label:
        y, x = rng.integers(0, SIZE - 5, size=2)
        mask[y : y + 4, x : x + 4] = 1
        amap += mask * rng.uniform(20.0, 80.0)
    score = float(amap.max()) + rng.normal(0.0, 30.0)
    return {
        "image_path": f"/data/{split}/{defect}/{index:03d}.png",
        "split": split,
        "defect_type": defect,
        "label": label,
        "has_mask": True,
        "mask": mask,
        "map": amap,
        "score": score,
    }


def _dataset(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = []
    for split in ("val", "test"):
        for defect, count in (("good", 5), ("crack", 3), ("scratch", 4)):
            items += [_image(rng, defect, split, i) for i in range(count)]
    return items


def _collect(items: list[dict], pixel_threshold: float = float("nan"), batch_size: int = 5) -> EvaluationCollector:
    collector = EvaluationCollector(num_bins=1 << 12)
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        batch = {
            "image_path": [it["image_path"] for it in part],
            "split": [it["split"] for it in part],
            "defect_type": [it["defect_type"] for it in part],
            "label": torch.tensor([it["label"] for it in part]),
            "has_mask": torch.tensor([it["has_mask"] for it in part]),
            "mask": torch.from_numpy(np.stack([it["mask"] for it in part]))[:, None],
        }
        scores = torch.tensor([it["score"] for it in part], dtype=torch.float32)
        maps = torch.from_numpy(np.stack([it["map"] for it in part]))[:, None]
        collector.update(batch, scores, maps, pixel_threshold)
    return collector


def _sk_auroc(items: list[dict]) -> float:
    return roc_auc_score([it["label"] for it in items], [np.float32(it["score"]) for it in items])


def test_image_auroc_exact_on_large_scores() -> None:
    """Regression: scores > 1 must not be squashed (a sigmoid would tie them all at 1.0)."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30, int), np.ones(20, int)]
    scores = np.r_[rng.normal(300.0, 5.0, 30), rng.normal(306.0, 5.0, 20)]
    scores[3] = scores[40]  # a tie across classes
    got = image_auroc(torch.from_numpy(scores), torch.from_numpy(labels))
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert 0.5 < got < 1.0


def test_metrics_per_split_and_subset() -> None:
    items = _dataset()
    collector = _collect(items)
    assert len(collector.records) == len(items)
    test = collector.metrics(("test",))
    test_items = [it for it in items if it["split"] == "test"]
    assert test["num_images"] == 12 and test["num_good"] == 5 and test["num_defective"] == 7
    assert test["image_auroc"] == pytest.approx(_sk_auroc(test_items), abs=1e-6)
    full = collector.metrics(("test", "val"))
    assert full["num_images"] == 24
    assert full["image_auroc"] == pytest.approx(_sk_auroc(items), abs=1e-6)
    crack = collector.metrics(("test", "val"), ("good", "crack"))
    crack_items = [it for it in items if it["defect_type"] in ("good", "crack")]
    assert crack["num_images"] == len(crack_items)
    assert crack["image_auroc"] == pytest.approx(_sk_auroc(crack_items), abs=1e-6)
    assert 0.5 < full["pixel_auroc"] <= 1.0 and 0.0 < full["pixel_aupro"] <= 1.0
    for key in (*THRESHOLD_KEYS, "pixel_f1", "pixel_iou"):
        assert key not in test
    only_defects = collector.metrics(("test",), ("crack",))
    assert only_defects["image_auroc"] is None  # one class: undefined, not a crash
    assert collector.metrics(("nope",)) == {"num_images": 0}


def test_pixel_auroc_restricted_to_the_selected_images() -> None:
    items = _dataset(1)
    collector = _collect(items)
    sel = [it for it in items if it["split"] == "val"]
    y = np.concatenate([it["mask"].ravel() for it in sel])
    s = np.concatenate([it["map"].ravel() for it in sel])
    assert collector.metrics(("val",))["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-3)


def test_threshold_metrics_appear_with_finite_thresholds() -> None:
    items = _dataset(2)
    pixel_t = 90.0
    collector = _collect(items, pixel_threshold=pixel_t)
    image_t = float(np.median([it["score"] for it in items]))
    m = collector.metrics(("test",), image_threshold=image_t, pixel_threshold=pixel_t)
    sel = [it for it in items if it["split"] == "test"]
    y = np.array([it["label"] for it in sel])
    pred = np.array([np.float32(it["score"]) > image_t for it in sel])  # strict tie rule
    assert m["image_f1"] == pytest.approx(f1_score(y, pred), abs=1e-12)
    assert m["false_reject_rate"] == pytest.approx(np.mean(pred[y == 0]), abs=1e-12)
    assert m["escape_rate"] == pytest.approx(np.mean(~pred[y == 1]), abs=1e-12)
    gt = np.concatenate([it["mask"].ravel() > 0 for it in sel])
    px = np.concatenate([it["map"].ravel() > pixel_t for it in sel])
    tp, fp, fn = (px & gt).sum(), (px & ~gt).sum(), (~px & gt).sum()
    assert m["pixel_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert m["pixel_iou"] == pytest.approx(tp / (tp + fp + fn), abs=1e-12)


def test_unlabelled_and_maskless_images() -> None:
    items = _dataset(3)
    items[0] = {**items[0], "label": -1}
    items[6] = {**items[6], "has_mask": False}
    collector = _collect(items)
    assert collector.records[0]["gt_label"] is None
    assert collector.metrics(("val",))["num_images"] == 11  # unknown labels are not scored
    val_items = [it for it in items[1:] if it["split"] == "val" and it["has_mask"]]
    expected_regions = sum(int(it["mask"].any()) for it in val_items)
    assert collector.hist.merged(collector.groups(("val",))).regions == expected_regions


@pytest.mark.parametrize("policy", ["test_half", "same_as_test"])
def test_build_metrics_report_shape(policy: str) -> None:
    items = _dataset(4)
    collector = _collect(items, pixel_threshold=95.0)
    image_t = float(np.median([it["score"] for it in items]))
    report = build_metrics_report(collector, policy, image_t, 95.0)
    assert report["split_policy"] == policy
    assert report["optimistic"] is (policy == "same_as_test")
    assert {"test", "full_test", "per_defect_type"} <= set(report)
    assert set(report["full_test"]) >= {"image_auroc", "pixel_auroc", "pixel_aupro", "num_images"}
    assert report["full_test"]["num_images"] == 24
    assert report["full_test"]["image_auroc"] == pytest.approx(_sk_auroc(items), abs=1e-6)
    for key in (*THRESHOLD_KEYS, "pixel_f1", "pixel_iou"):
        assert key in report["test"]
        assert key not in report["full_test"]  # threshold-free only
    if policy == "test_half":
        assert report["test"]["num_images"] == 12
        assert report["val"]["num_images"] == 12 and "image_f1" in report["val"]
    else:
        assert report["test"]["num_images"] == 24
    assert sorted(report["per_defect_type"]) == list(DEFECTS)
    for defect in DEFECTS:
        entry = report["per_defect_type"][defect]
        sel = [it for it in items if it["defect_type"] in ("good", defect)]
        assert entry["num_images"] == len(sel)
        assert entry["image_auroc"] == pytest.approx(_sk_auroc(sel), abs=1e-6)


def test_build_metrics_report_without_thresholds() -> None:
    collector = _collect(_dataset(5))
    report = build_metrics_report(collector, "test_half", float("nan"), float("nan"))
    for section in ("test", "val"):
        for key in (*THRESHOLD_KEYS, "pixel_f1", "pixel_iou"):
            assert key not in report[section]
    for entry in report["per_defect_type"].values():
        assert "test_escape_rate" not in entry
    assert all(v is None or math.isfinite(v) for v in report["test"].values() if not isinstance(v, bool))
