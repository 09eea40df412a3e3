"""The records of `preds.jsonl` and the run summary `report.json`."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

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


def is_ng(pred_score: float, image_threshold: float) -> bool:
    """The image verdict: NG iff `pred_score > image_threshold` (strict; a threshold taken from an observed good
    score never rejects that image)."""
    return bool(float(pred_score) > float(image_threshold))


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
    (the `*_original` keys of a defect give the original resolution). NG when `pred_score > image_threshold`
    (`is_ng`). The defects must follow the verdict (`postprocess.prediction.postprocess_prediction` builds them).
    """
    score = float(pred_score)
    is_anomaly = is_ng(score, image_threshold)
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


def record_problem(record: dict) -> str | None:
    """What makes a `preds.jsonl` record unusable for the report (an edited or damaged line), or None: an error
    record needs a text `error`; a prediction a numeric `pred_score`, a boolean `is_anomaly`, label OK/NG,
    integer `num_defects` and `total_defect_area`, and `defects` as a list of objects with an integer `area`."""

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if "error" in record:
        return None if isinstance(record["error"], str) else "`error` is not a text"
    score = record.get("pred_score")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return f"`pred_score` is not a number ({score!r})"
    if record.get("label") not in ("OK", "NG") or not isinstance(record.get("is_anomaly"), bool):
        return "`label` is not OK or NG, or `is_anomaly` not true or false"
    if not (integer(record.get("num_defects")) and integer(record.get("total_defect_area"))):
        return "`num_defects` or `total_defect_area` is not an integer"
    defects = record.get("defects")
    if not isinstance(defects, list) or not all(isinstance(d, dict) and integer(d.get("area")) for d in defects):
        return "`defects` is not a list of defects with an integer `area`"
    return None


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
