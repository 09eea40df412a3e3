"""`aoi export --run_dir RUN`: ONNX export of a trained run into `RUN/export/`."""

from __future__ import annotations

import logging
from pathlib import Path

from aoi_lightning.export.onnx_export import DEFAULT_OPSET, ExportError, export_module
from aoi_lightning.rundir.thresholds_file import THRESHOLD_NAMES, check_thresholds_file

log = logging.getLogger(__name__)


def run_threshold_info(module, run_path: Path) -> dict:
    """Threshold facts of a run: from the checkpoint, else thresholds.json; both must agree with the model."""
    info = dict(getattr(module, "threshold_info", None) or {})
    model_values = {k: float(getattr(module.model, k)) for k in THRESHOLD_NAMES}
    on_disk = check_thresholds_file(
        run_path / "thresholds.json",
        model_values,
        "does not match the checkpoint's",
        "the thresholds file and weights/model.ckpt come from different fits",
        ExportError,
    )
    return info or on_disk or {}


def export_run(run_dir: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export `run_dir` to `run_dir/export/model.onnx`; returns its path."""
    from aoi_lightning.rundir.loading import load_run_model

    module, info = load_run_model(run_dir, "cpu", require_thresholds=False)
    if not module.model.has_thresholds:
        log.warning("%s has no tuned thresholds: the export records them as null", info.run.path)
    module.threshold_info = run_threshold_info(module, info.run.path)
    extra = {"category": info.category, "run_id": info.run.path.name}
    return export_module(module, module.preprocessing.image_size, info.run.export, extra=extra, opset=opset)


def export(run_dir: str, opset: int = DEFAULT_OPSET) -> int:
    """Export a trained run to ONNX.

    Writes RUN/export/model.onnx (input `image` (B, 3, H, W) RGB in [0, 1], normalisation inside; outputs
    pred_score (B) and anomaly_map (B, 1, H, W)) and RUN/export/export_meta.json (thresholds, input size,
    versions, sha256).

    Args:
        run_dir: run directory written by `aoi fit` (weights/model.ckpt).
        opset: ONNX opset version (>= 13).

    Raises:
        ExportError: opset below 13, a run without a usable checkpoint, thresholds that disagree (one line).
    """
    if opset < 13:
        raise ExportError(f"--opset must be >= 13, got {opset}")
    path = export_run(run_dir, opset)
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB) and {path.with_name('export_meta.json').name}")
    return 0
