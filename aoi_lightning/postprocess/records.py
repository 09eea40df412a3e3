"""The records of `preds.jsonl`, the run summary `report.json`, and safe output file names."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path, PurePath

#: Keys of a successful `preds.jsonl` record, in file order (`mask_path`/`overlay_path` only when saved).
RECORD_KEYS = (
    "image_path",
    "model",
    "category",
    "image_size",
    "model_input_size",
    "gt_label",
    "pred_score",
    "image_threshold",
    "pixel_threshold",
    "effective_pixel_threshold",
    "label",
    "is_anomaly",
    "num_defects",
    "total_defect_area",
    "defects",
)
OPTIONAL_KEYS = ("mask_path", "overlay_path")
ERROR_KEYS = ("image_path", "error")
THRESHOLD_KEYS = ("image_threshold", "pixel_threshold", "quantile_image", "quantile_pixel")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME = 120


def prediction_record(
    image_path: str,
    model: str,
    category: str,
    image_size: Sequence[int],
    model_input_size: Sequence[int],
    gt_label: int | None,
    pred_score: float,
    image_threshold: float,
    pixel_threshold: float,
    pixel_threshold_mult: float,
    defects: list[dict],
    mask_path: str | None = None,
    overlay_path: str | None = None,
) -> dict:
    """One `preds.jsonl` line of a predicted image.

    `image_size` is the original (h, w); `total_defect_area` and each defect's `area` are in model pixels
    (the `*_original` keys of a defect give the original resolution). NG when `pred_score >= image_threshold`.
    """
    score = float(pred_score)
    is_anomaly = bool(score >= float(image_threshold))
    record = {
        "image_path": str(image_path),
        "model": model,
        "category": category,
        "image_size": [int(image_size[0]), int(image_size[1])],
        "model_input_size": [int(model_input_size[0]), int(model_input_size[1])],
        "gt_label": None if gt_label is None or int(gt_label) < 0 else int(gt_label),
        "pred_score": score,
        "image_threshold": float(image_threshold),
        "pixel_threshold": float(pixel_threshold),
        "effective_pixel_threshold": float(pixel_threshold) * float(pixel_threshold_mult),
        "label": "NG" if is_anomaly else "OK",
        "is_anomaly": is_anomaly,
        "num_defects": len(defects),
        "total_defect_area": int(sum(int(d["area"]) for d in defects)),
        "defects": defects,
    }
    if mask_path is not None:
        record["mask_path"] = mask_path
    if overlay_path is not None:
        record["overlay_path"] = overlay_path
    return record


def error_record(image_path: str, error: str) -> dict:
    """The `preds.jsonl` line of an image that could not be read (first line of the message)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable image"
    return {"image_path": str(image_path), "error": message}


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "max": max(values), "mean": math.fsum(values) / len(values)}


def build_report(records: list[dict], model: str, category: str, run_id: str, thresholds: dict) -> dict:
    """`report.json` of a set of `preds.jsonl` records.

    Counts and rates are over the successfully predicted images (`num_images`); error records only count
    in `num_errors`. `defect_stats`: `total_defects` over all images, `avg_defects_per_ng` and
    `avg_total_defect_area` (model pixels) over NG images (0.0 without NG images), `max_defect_area` over
    all defects (model pixels). With no images: zero counts and rates, `defect_stats` null, no `score_stats`.
    """
    preds = [r for r in records if "error" not in r]
    num_errors = len(records) - len(preds)
    n = len(preds)
    ng = [r for r in preds if r["is_anomaly"]]
    report: dict = {
        "model": model,
        "category": category,
        "run_id": run_id,
        "thresholds": {k: _number(thresholds.get(k)) for k in THRESHOLD_KEYS},
        "num_images": n,
        "num_ok": n - len(ng),
        "num_ng": len(ng),
        "ng_rate": len(ng) / n if n else 0.0,
        "ok_rate": (n - len(ng)) / n if n else 0.0,
    }
    if n:
        report["score_stats"] = _stats([float(r["pred_score"]) for r in preds])
        areas = [int(d["area"]) for r in preds for d in r["defects"]]
        report["defect_stats"] = {
            "total_defects": sum(int(r["num_defects"]) for r in preds),
            "avg_defects_per_ng": sum(int(r["num_defects"]) for r in ng) / len(ng) if ng else 0.0,
            "max_defect_area": max(areas, default=0),
            "avg_total_defect_area": sum(int(r["total_defect_area"]) for r in ng) / len(ng) if ng else 0.0,
        }
    else:
        report["defect_stats"] = None
    report["num_errors"] = num_errors
    report["created_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return report


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def output_name(image_path: str | Path, root: str | Path | None = None) -> str:
    """File name stem for the outputs (mask, overlay) of an image: unique per path, safe on any file system.

    The path relative to `root` with folders joined by `__` and the extension dropped (`sub/0001.png` ->
    `sub__0001`). When that is not an exact, reversible rendering of `<rel>.png` (other extension, characters
    outside [A-Za-z0-9._-], `__` in a part, a leading dot, a long path, or a file outside `root`), a short hash
    of the relative path is appended (`my_part-3f2a9c01d4`), so two different inputs never share a name. The
    result has no path separators and never starts with a dot.
    """
    path = PurePath(image_path)
    rel: PurePath | None = None
    if root is not None:
        try:
            rel = path.relative_to(PurePath(root))
        except ValueError:
            rel = None
    if rel is None or not rel.parts or ".." in rel.parts:
        rel, outside = PurePath(path.name), True
    else:
        outside = False
    parts = [*rel.parts[:-1], rel.stem]
    friendly = "__".join(_UNSAFE.sub("_", p) for p in parts)
    friendly = "_" + friendly[1:] if friendly.startswith(".") else friendly
    exact = (
        not outside
        and rel.suffix == ".png"
        and "/".join(friendly.split("__")) + ".png" == rel.as_posix()
        and all(p and "__" not in p for p in parts)
        and len(friendly) <= _MAX_NAME
    )
    if exact:
        return friendly
    digest = hashlib.sha1(str(path if outside else rel.as_posix()).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{friendly[:_MAX_NAME]}-{digest}"
