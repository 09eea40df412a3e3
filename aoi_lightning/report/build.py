"""Assembling a run's HTML report from its metrics, per-image scores and thresholds (in memory or from files)."""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aoi_lightning.fileio import write_text_atomic
from aoi_lightning.postprocess.records import is_ng
from aoi_lightning.report.gallery import (
    encode,
    fit_height,
    gt_mask_path,
    hstack,
    labelled,
    outline,
    placeholder,
    read_bgr,
)
from aoi_lightning.report.html import REPORT_HTML, GalleryItem, ReportData, render_html
from aoi_lightning.report.plots import curves_png, histogram_png
from aoi_lightning.rundir.meta import utc_now

log = logging.getLogger(__name__)

#: `image paths -> {image_path: (h, w, 3) BGR overlay}`; images it cannot draw are left out.
OverlaySource = Callable[[list[str]], dict[str, np.ndarray]]
TILE_HEIGHT = 220


def labelled_records(records: list[dict], split: str = "test") -> list[dict]:
    """Records of `split` with a known label (all labelled records when none belongs to `split`)."""
    labelled_ = [r for r in records if r.get("gt_label") in (0, 1) and r.get("pred_score") is not None]
    in_split = [r for r in labelled_ if r.get("split") == split]
    return in_split or labelled_


def pick_gallery(records: list[dict], image_threshold: float, size: int) -> tuple[list[dict], list[dict], dict]:
    """Worst errors at `image_threshold` (NG when score > threshold, `is_ng`).

    Returns:
        false positives (good, highest scores first), false negatives (defective, lowest scores first), each
        at most `size`, and `closest`: the correctly judged good image with the highest score and the correctly
        judged defective image with the lowest score (keys `false_positives`/`false_negatives`, shown when
        the matching error list is empty).
    """
    good = [r for r in records if r["gt_label"] == 0]
    bad = [r for r in records if r["gt_label"] == 1]
    fps = sorted((r for r in good if is_ng(r["pred_score"], image_threshold)), key=lambda r: -r["pred_score"])
    fns = sorted((r for r in bad if not is_ng(r["pred_score"], image_threshold)), key=lambda r: r["pred_score"])
    closest = {}
    ok_good = [r for r in good if not is_ng(r["pred_score"], image_threshold)]
    ng_bad = [r for r in bad if is_ng(r["pred_score"], image_threshold)]
    if ok_good:
        closest["false_positives"] = max(ok_good, key=lambda r: r["pred_score"])
    if ng_bad:
        closest["false_negatives"] = min(ng_bad, key=lambda r: r["pred_score"])
    return fps[:size], fns[:size], closest


class GalleryMaps:
    """The anomaly maps of only the images a gallery can show, kept during an evaluation pass (bounded memory).

    `pick_gallery` shows, whatever the threshold, good images from the highest score down (false positives,
    or the closest call) and defective images from the lowest score up; so per split the `size` highest-scoring
    good images and the `size` lowest-scoring defective images are all it can ever need. Memory:
    at most 2 x `size` maps per split.

    Args:
        size: pictures per gallery (`HtmlReport.gallery_size`).
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self._heaps: dict[tuple[str, int], list] = {}
        self._count = 0

    def update(self, image_paths, labels, splits, scores, maps) -> None:
        """Offer a batch: image paths, gt labels (0/1; others ignored), splits, scores (B,), maps (B, H, W) or
        (B, 1, H, W) (numpy or CPU tensors)."""
        if self.size <= 0:
            return
        for i, path in enumerate(image_paths):
            label = int(labels[i])
            if label not in (0, 1):
                continue
            score = float(scores[i])
            heap = self._heaps.setdefault((str(splits[i]), label), [])
            # a min-heap on the key: good keeps its highest scores, defective its lowest
            key = score if label == 0 else -score
            if len(heap) >= self.size and key <= heap[0][0]:
                continue
            self._count += 1
            amap = np.array(maps[i], dtype=np.float32)
            item = (key, -self._count, str(path), score, amap.reshape(amap.shape[-2:]))
            if len(heap) < self.size:
                heapq.heappush(heap, item)
            else:
                heapq.heapreplace(heap, item)

    def merge_from(self, others: list[GalleryMaps]) -> None:
        """Take in the maps of other keepers (e.g. every rank's share, this one's own copy included); the bound
        still holds and an image is kept once (items are ordered by key, then counter, then the unique path, so
        two items never compare their maps)."""
        for other in others:
            if other is self:
                continue
            for (split, label), heap in other._heaps.items():
                mine = self._heaps.setdefault((split, label), [])
                for item in heap:
                    if any(kept[2] == item[2] for kept in mine):
                        continue
                    if len(mine) < self.size:
                        heapq.heappush(mine, item)
                    elif item[0] > mine[0][0]:
                        heapq.heapreplace(mine, item)

    def maps(self) -> dict[str, tuple[float, np.ndarray]]:
        """`image_path -> (score, (H, W) map)` of every kept image."""
        return {item[2]: (item[3], item[4]) for heap in self._heaps.values() for item in heap}

    def __len__(self) -> int:
        return sum(len(h) for h in self._heaps.values())


def gallery_picture(record: dict, overlay: np.ndarray | None, mask_suffix: str) -> bytes:
    """JPEG: the image with its ground-truth outline next to the model's overlay, both `TILE_HEIGHT` high."""
    image = read_bgr(record["image_path"])
    if image is None:
        left = placeholder(TILE_HEIGHT, TILE_HEIGHT, "image not found")
    else:
        mask = gt_mask_path(record["image_path"], record.get("defect_type"), mask_suffix)
        left = fit_height(outline(image, mask), TILE_HEIGHT)
    right = (
        fit_height(overlay, TILE_HEIGHT) if overlay is not None else placeholder(TILE_HEIGHT, TILE_HEIGHT, "no overlay")
    )
    return encode(hstack([labelled(left, "image + ground truth"), labelled(right, "model")]), ".jpg")


def per_defect_rows(metrics: dict, records: list[dict], image_threshold: float | None) -> list[dict]:
    """Rows of the per-defect-type table: metrics.json's `per_defect_type` plus counts on the test records."""
    per_type = metrics.get("per_defect_type") or {}
    types = sorted(set(per_type) | {r["defect_type"] for r in records if r["gt_label"] == 1})
    rows = []
    for name in ["good", *types]:
        recs = [r for r in records if r.get("defect_type") == name]
        row = {"defect_type": name, **(per_type.get(name) or {})}
        row["test_num_images"] = len(recs)
        if recs:
            row["mean_score"] = float(np.mean([r["pred_score"] for r in recs]))
            if image_threshold is not None and math.isfinite(image_threshold):
                wrong = sum(is_ng(r["pred_score"], image_threshold) != bool(r["gt_label"]) for r in recs)
                row["test_wrong"] = int(wrong)
                row["test_error_rate"] = wrong / len(recs)
        if name != "good" or recs:
            rows.append(row)
    return rows


def build_report_data(
    heading: str,
    facts: list[tuple[str, str]],
    metrics: dict,
    records: list[dict],
    thresholds: dict,
    overlays: OverlaySource | None,
    mask_suffix: str = "_mask",
    gallery_size: int = 6,
) -> ReportData:
    """Everything the page shows, from a metrics.json dict, the test-pass records and the thresholds.

    Args:
        heading: page title.
        facts: (name, value) rows under the title.
        metrics: the metrics.json document.
        records: per-image records (image_path, gt_label, defect_type, split, pred_score) of the test pass.
        thresholds: thresholds.json content (at least image_threshold when thresholds were tuned).
        overlays: where gallery overlays come from (None: pictures without the model's overlay).
        mask_suffix: suffix of the ground-truth mask files.
        gallery_size: pictures per gallery.
    """
    recs = labelled_records(records)
    split = recs[0].get("split", "test") if recs else "test"
    image_t = thresholds.get("image_threshold")
    image_t = float(image_t) if image_t is not None and math.isfinite(float(image_t)) else None
    data = ReportData(heading, facts, metrics, thresholds, per_defect_rows(metrics, recs, image_t))
    if metrics.get("optimistic"):
        data.notes.append(
            "Validation = test (split policy same_as_test): the threshold-dependent metrics are optimistic."
        )
    scores = np.array([r["pred_score"] for r in recs], dtype=np.float64)
    labels = np.array([r["gt_label"] for r in recs], dtype=np.int64)
    title = f"{split} split: {int((labels == 0).sum())} good, {int((labels == 1).sum())} defective images"
    if recs:
        data.histogram = histogram_png(scores, labels, image_t, title)
    if 0 < labels.sum() < labels.size:
        data.curves = curves_png(scores, labels, image_t, title)
    if image_t is None:
        data.notes.append("No tuned image threshold: no operating point, no gallery of errors.")
        msg = "no threshold"
        data.gallery_notes = {"false_positives": msg, "false_negatives": msg}
        return data
    fps, fns, closest = pick_gallery(recs, image_t, gallery_size)
    shown: dict[str, list[tuple[str, dict]]] = {}
    for key, items, what in (("false_positives", fps, "false positive"), ("false_negatives", fns, "false negative")):
        shown[key] = [(what, r) for r in items]
        if not items:
            near = closest.get(key)
            note = f"No {what}s on the {split} split."
            if near is not None:
                note += " The closest call (judged correctly) is shown."
                shown[key] = [("closest call", near)]
            data.gallery_notes[key] = note
    wanted = [r["image_path"] for chosen in shown.values() for _, r in chosen]
    pictures = overlays(wanted) if overlays is not None and wanted else {}
    for key, chosen in shown.items():
        gallery = [
            GalleryItem(
                title,
                r["image_path"],
                str(r.get("defect_type", "")),
                float(r["pred_score"]),
                gallery_picture(r, pictures.get(r["image_path"]), mask_suffix),
            )
            for title, r in chosen
        ]
        setattr(data, key, gallery)
    return data


def write_report(run_dir: str | Path, data: ReportData) -> Path:
    """Write `<run_dir>/report.html` atomically and return its path."""
    return write_text_atomic(Path(run_dir) / REPORT_HTML, render_html(data))


def run_facts(
    model: str, category: str, run_dir: str | Path, split_policy: str | None, image_size
) -> list[tuple[str, str]]:
    """The facts table under the title."""
    size = "x".join(str(int(v)) for v in image_size) if image_size else "?"
    return [
        ("model", model),
        ("category", category),
        ("run", Path(run_dir).name),
        ("run directory", str(run_dir)),
        ("split policy", str(split_policy)),
        ("input size", size),
        ("report written", utc_now()),
    ]
