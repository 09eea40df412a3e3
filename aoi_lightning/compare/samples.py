"""Sample cases of a comparison: good images and mild/medium/severe defects, each model's overlay, grids."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aoi_lightning.compare.table import RunSummary
from aoi_lightning.data.image_io import is_good
from aoi_lightning.fileio import read_jsonl
from aoi_lightning.postprocess.render import write_png
from aoi_lightning.report.gallery import (
    fit_height,
    gt_mask_path,
    hstack,
    image_key,
    labelled,
    mask_area_fraction,
    outline,
    placeholder,
    read_bgr,
)

log = logging.getLogger(__name__)

GOOD_CASES = ("lowest_score", "median_score", "highest_score")
DEFECT_CASES = ("mild", "medium", "severe")
SAMPLE_MAX_SIDE = 512
GRID_HEIGHT = 256


@dataclass
class RunImages:
    """What one run knows per image (by `image_key`): score records and, when predicted, the overlay file."""

    summary: RunSummary
    scores: dict[str, dict] = field(default_factory=dict)
    predictions: dict[str, dict] = field(default_factory=dict)
    predictions_dir: Path | None = None

    @property
    def image_threshold(self) -> float | None:
        value = self.summary.thresholds.get("image_threshold")
        return float(value) if value is not None else None

    def record(self, key: str) -> dict | None:
        return self.predictions.get(key) or self.scores.get(key)


def load_run_images(summary: RunSummary) -> RunImages:
    """Scores from preds_test.jsonl / preds_val.jsonl and predictions from `predictions/preds.jsonl`."""
    out = RunImages(summary)
    for split in ("test", "val"):
        path = summary.run_dir / f"preds_{split}.jsonl"
        if path.is_file():
            for rec in read_jsonl(path):
                out.scores[image_key(rec["image_path"])] = rec
    pred_dir = summary.run_dir / "predictions"
    if (pred_dir / "preds.jsonl").is_file():
        out.predictions_dir = pred_dir
        for rec in read_jsonl(pred_dir / "preds.jsonl"):
            if "error" not in rec:
                out.predictions[image_key(rec["image_path"])] = rec
    return out


@dataclass
class Case:
    """One sample image shown for every model."""

    name: str
    kind: str
    defect_type: str
    image_path: str
    key: str
    severity: str = ""
    measure: float | None = None
    measure_source: str = ""
    per_run: dict[str, dict] = field(default_factory=dict)


def _candidates(runs: list[RunImages]) -> dict[str, dict]:
    """image_key -> {image_path, defect_type, gt_label} over the images every run scored (any run when none is
    common)."""
    known = [set(r.scores) | set(r.predictions) for r in runs if r.scores or r.predictions]
    if not known:
        return {}
    keys = set.intersection(*known) or set.union(*known)
    out = {}
    for key in sorted(keys):
        recs = [r.scores.get(key) or r.predictions.get(key) for r in runs]
        rec = next(x for x in recs if x is not None)
        defect = next((x["defect_type"] for x in recs if x is not None and x.get("defect_type")), None)
        defect = defect or Path(rec["image_path"]).parent.name
        label = next((x["gt_label"] for x in recs if x is not None and x.get("gt_label") is not None), None)
        if label is None:
            if Path(rec["image_path"]).parent.parent.name != "test":
                continue  # an unlabelled image outside an MVTec test folder is no sample case
            label = 0 if is_good(defect) else 1
        out[key] = {"image_path": rec["image_path"], "defect_type": defect, "gt_label": label}
    return out


def _relative_score(runs: list[RunImages], key: str) -> float:
    """Mean over runs of score / image threshold (runs without both left out)."""
    ratios = []
    for r in runs:
        rec, t = r.record(key), r.image_threshold
        if rec is not None and t:
            ratios.append(float(rec["pred_score"]) / t)
    return float(np.mean(ratios)) if ratios else 0.0


def _pick3(items: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """Lowest, median and highest of (measure, key) pairs (fewer when there are fewer items)."""
    items = sorted(items)
    idx = sorted({0, (len(items) - 1) // 2, len(items) - 1}) if items else []
    return [items[i] for i in idx]


def choose_cases(runs: list[RunImages]) -> list[Case]:
    """Good images (lowest, median, highest score relative to the threshold) and, per defect type, mild, medium
    and severe cases by defect area: the ground-truth mask area, else the predicted defect area, else the score."""
    cand = _candidates(runs)
    cases = []
    good = [(_relative_score(runs, k), k) for k, c in cand.items() if c["gt_label"] == 0]
    picks = _pick3(good)
    names = GOOD_CASES if len(picks) == 3 else GOOD_CASES[: len(picks) - 1] + GOOD_CASES[-1:]
    for name, (measure, key) in zip(names, picks):
        cases.append(
            Case(
                f"good_{name}",
                "good",
                "good",
                cand[key]["image_path"],
                key,
                name.replace("_", " "),
                measure,
                "mean score / image threshold",
            )
        )
    suffix = next((r.summary.mask_suffix for r in runs), "_mask")
    for defect in sorted({c["defect_type"] for c in cand.values() if c["gt_label"] == 1}):
        keys = [k for k, c in cand.items() if c["gt_label"] == 1 and c["defect_type"] == defect]
        areas = {k: mask_area_fraction(gt_mask_path(cand[k]["image_path"], defect, suffix)) for k in keys}
        if all(a is not None for a in areas.values()):
            measured, source = [(areas[k], k) for k in keys], "ground-truth mask area (fraction of the image)"
        elif any(r.predictions for r in runs):
            measured, source = [(_predicted_area(runs, k), k) for k in keys], "predicted defect area (model pixels)"
        else:
            measured, source = [(_relative_score(runs, k), k) for k in keys], "mean score / image threshold"
        picks = _pick3(measured)
        names = DEFECT_CASES if len(picks) == 3 else DEFECT_CASES[: len(picks) - 1] + DEFECT_CASES[-1:]
        for name, (measure, key) in zip(names, picks):
            cases.append(
                Case(f"{_safe(defect)}_{name}", "defect", defect, cand[key]["image_path"], key, name, measure, source)
            )
    return cases


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "type"


def _predicted_area(runs: list[RunImages], key: str) -> float:
    areas = [float(r.predictions[key].get("total_defect_area", 0)) for r in runs if key in r.predictions]
    return float(np.mean(areas)) if areas else 0.0


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    return image if max(h, w) <= max_side else fit_height(image, round(h * max_side / max(h, w)))


def write_cases(
    cases: list[Case], runs: list[RunImages], out_dir: Path, rendered: dict[str, dict[str, np.ndarray]]
) -> None:
    """Per case and run: the overlay under `samples/<label>-<model>/<case>.png` (from `predictions/`, else from
    `rendered[label]`), and the grid `comparison_grids/<case>.png` (image + ground truth, then each model).
    Fills `case.per_run` with score, verdict, overlay path (relative to `out_dir`) and its source."""
    for case in cases:
        image = read_bgr(case.image_path)
        mask = gt_mask_path(case.image_path, case.defect_type, runs[0].summary.mask_suffix if runs else "_mask")
        left = (
            fit_height(outline(image, mask), GRID_HEIGHT)
            if image is not None
            else placeholder(GRID_HEIGHT, GRID_HEIGHT, "image not found")
        )
        tiles = [labelled(left, f"{case.defect_type} ({case.severity})")]
        for run in runs:
            s = run.summary
            rec = run.record(case.key)
            info: dict = {"overlay": None, "source": None}
            if rec is not None:
                info.update(pred_score=rec.get("pred_score"), label=rec.get("label"))
            overlay = None
            pred = run.predictions.get(case.key)
            if pred is not None and pred.get("overlay_path") and run.predictions_dir is not None:
                overlay = read_bgr(run.predictions_dir / pred["overlay_path"])
                info["source"] = "predictions"
            if overlay is None and case.image_path in rendered.get(s.label, {}):
                overlay = rendered[s.label][case.image_path]
                info["source"] = "rendered from weights/model.ckpt"
            if overlay is not None:
                rel = f"samples/{s.label}-{s.model}/{case.name}.png"
                write_png(out_dir / rel, _shrink(overlay, SAMPLE_MAX_SIDE))
                info["overlay"] = rel
                tile = fit_height(overlay, GRID_HEIGHT)
            else:
                info["source"] = None
                tile = placeholder(GRID_HEIGHT, GRID_HEIGHT, "no prediction\n(run aoi predict)")
            score = info.get("pred_score")
            verdict = f" {info.get('label') or ''} {score:.4g}" if isinstance(score, (int, float)) else ""
            tiles.append(labelled(tile, f"{s.label}: {s.model}{verdict}"))
            case.per_run[s.label] = info
        write_png(out_dir / "comparison_grids" / f"{case.name}.png", hstack(tiles))


def samples_markdown(cases: list[Case], runs: list[RunImages], notes: list[str]) -> str:
    """sample_visualizations.md: a table of the cases with each model's score, verdict and overlay, and the grid."""
    lines = [
        "# Sample visualizations",
        "",
        "Good images: lowest, median and highest score relative to each model's image threshold. Defects: "
        "mild, medium and severe case of each type by defect area. Grids: the image with the ground truth "
        "outlined in yellow, then each model's overlay (heat map, predicted outlines, verdict).",
        "",
    ]
    if notes:
        lines += ["**Missing:**", ""] + [f"- {n}" for n in notes] + [""]
    if not cases:
        lines.append("No sample cases: no run has per-image scores (preds_test.jsonl) or predictions.")
        return "\n".join(lines) + "\n"
    head = "| case | image | area / score measure | " + " | ".join(r.summary.name for r in runs) + " | grid |"
    lines += [head, "|---|---|---:|" + "---|" * len(runs) + "---|"]
    for case in cases:
        cells = []
        for run in runs:
            info = case.per_run.get(run.summary.label, {})
            score = info.get("pred_score")
            text = f"{info.get('label') or ''} {score:.4g}".strip() if isinstance(score, (int, float)) else "not scored"
            cells.append(f"[{text}]({info['overlay']})" if info.get("overlay") else f"{text} (no overlay)")
        measure = f"{case.measure:.4g}" if case.measure is not None else "n/a"
        lines.append(
            f"| {case.name} | `{case.key}` | {measure} | "
            + " | ".join(cells)
            + f" | [grid](comparison_grids/{case.name}.png) |"
        )
    lines += ["", "Measures: " + "; ".join(sorted({f"{c.kind}: {c.measure_source}" for c in cases})) + ".", ""]
    for case in cases:
        lines += [f"### {case.name}", "", f"![{case.name}](comparison_grids/{case.name}.png)", ""]
    return "\n".join(lines)
