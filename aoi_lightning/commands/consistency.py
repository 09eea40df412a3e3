"""`aoi consistency --run_dir RUN`: ONNX Runtime vs torch on the run's test images; exit 1 when FAILED."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

from aoi_lightning.export.consistency import (
    DEFAULT_IOU_TOL,
    DEFAULT_MAP_TOL,
    DEFAULT_SCORE_TOL,
    NO_TEST_IMAGES,
    ConsistencyError,
    check_consistency,
    image_batches,
    spread_over_defect_types,
    summary_line,
)
from aoi_lightning.export.onnx_export import CONSISTENCY_FILE, MODEL_FILE, onnx_input_size, read_export_meta
from aoi_lightning.fileio import write_json
from aoi_lightning.inference.onnx_backend import export_preprocessing
from aoi_lightning.rundir.meta import utc_now

log = logging.getLogger(__name__)


def _stale_thresholds(meta: dict, model) -> list[str]:
    """Thresholds in export_meta.json that differ from the checkpoint's (an export of another fit)."""
    out = []
    nested = meta.get("thresholds") if isinstance(meta.get("thresholds"), dict) else {}
    for key in ("image_threshold", "pixel_threshold"):
        want = float(getattr(model, key))
        for where, got in ((key, meta.get(key)), (f"thresholds.{key}", nested.get(key))):
            if math.isfinite(want) and (got is None or not math.isclose(float(got), want, rel_tol=1e-5, abs_tol=1e-7)):
                out.append(
                    f"export_meta.json {where} {got} differs from the checkpoint's {want:.8g}: re-run `aoi export`"
                )
    return out


def _stale_preprocessing(meta: dict, module) -> list[str]:
    """A preprocessing in export_meta.json that differs from the checkpoint's (an export of another fit)."""
    try:
        exported = export_preprocessing(meta)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        return [f"export_meta.json preprocessing is not readable ({exc}): re-run `aoi export`"]
    if exported != module.preprocessing:
        return [
            f"export_meta.json preprocessing {exported.to_dict()} differs from the checkpoint's "
            f"{module.preprocessing.to_dict()}: re-run `aoi export`"
        ]
    return []


def run_check_images(data_config: dict) -> tuple[list[str], str]:
    """The images to check a run's export on, and what they are: the test images of its data config
    (`<root>/<category>/test`; the synthetic set when root is null), or its good training images when the data set
    has no test image (the check compares the two models, any image of the parts does)."""
    from aoi_lightning.data.mvtec import scan_mvtec

    root = data_config.get("root")
    category = str(data_config.get("category", "synthetic"))
    if root is None:
        from aoi_lightning.data.synthetic import ensure_synthetic

        root = ensure_synthetic(category=category)
    train, test = scan_mvtec(root, category, str(data_config.get("mask_suffix", "_mask")))
    if test:
        return [s.image_path for s in test], "test folder"
    return [s.image_path for s in train], NO_TEST_IMAGES


def consistency_run(
    run_dir: str | Path,
    max_images: int | None = None,
    score_tol: float = DEFAULT_SCORE_TOL,
    map_tol: float = DEFAULT_MAP_TOL,
    iou_tol: float = DEFAULT_IOU_TOL,
    device: str = "cpu",
    batch_size: int = 8,
) -> dict:
    """Check the export of `run_dir` and write `export/consistency.json`; returns the record."""
    from aoi_lightning.rundir.loading import check_module_thresholds, load_run_model, read_run_info

    info = read_run_info(run_dir)
    onnx_path = info.run.export / MODEL_FILE
    if not onnx_path.is_file():
        raise ConsistencyError(
            f"{info.run.path} has no export/{MODEL_FILE}: run `aoi export --run_dir {info.run.path}` first"
        )
    meta = read_export_meta(info.run.export)
    onnx_size = onnx_input_size(onnx_path)
    meta_size = tuple(int(v) for v in meta.get("image_size") or ())
    if onnx_size != meta_size:
        raise ConsistencyError(
            f"{onnx_path} takes {onnx_size[0]}x{onnx_size[1]} images but export_meta.json says {meta_size}: "
            f"re-export with `aoi export --run_dir {info.run.path}`"
        )
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConsistencyError("--device cuda: no CUDA device is available to torch")
    module, _ = load_run_model(run_dir, device, require_thresholds=False)
    trained = module.preprocessing.image_size
    if onnx_size != trained:
        raise ConsistencyError(
            f"{onnx_path} takes {onnx_size[0]}x{onnx_size[1]} images but the run was trained at "
            f"{trained[0]}x{trained[1]}: re-export with `aoi export --run_dir {info.run.path}`"
        )
    if module.model.has_thresholds:  # a thresholds.json that `aoi run` would refuse is refused here too
        check_module_thresholds(module, info.run)
    failed = _stale_thresholds(meta, module.model) + _stale_preprocessing(meta, module)
    available, source = run_check_images(info.config.get("data") or {})
    paths, sample = spread_over_defect_types(available, max_images)
    images = image_batches(paths, module.preprocessing, batch_size)
    result = check_consistency(
        module.model,
        onnx_path,
        images,
        float(module.model.pixel_threshold),
        score_tol,
        map_tol,
        iou_tol,
        batch_size=batch_size,
        device=device,
        total=len(paths),
        failed_checks=failed,
        expected_sha256=meta.get("sha256"),
    )
    result.update(
        {
            "model": info.model_name,
            "category": info.category,
            "run_id": info.run.path.name,
            "images": source,
            "num_available": len(available),
            "sample": sample,
            "created_at": utc_now(),
        }
    )
    write_json(info.run.export / CONSISTENCY_FILE, result)
    return result


def consistency(
    run_dir: str,
    max_images: int | None = None,
    score_tol: float = DEFAULT_SCORE_TOL,
    map_tol: float = DEFAULT_MAP_TOL,
    iou_tol: float = DEFAULT_IOU_TOL,
    device: Literal["cpu", "cuda"] = "cpu",
    batch_size: int = 8,
) -> int:
    """Compare the ONNX export of a run (ONNX Runtime) with its torch model on the run's test images.

    Measures score MAE, map MAE and mask IoU at the pixel threshold and writes RUN/export/consistency.json.

    Args:
        run_dir: run directory with export/model.onnx (see `aoi export`).
        max_images: largest number of test images to check, spread over the defect types as in the end-of-fit
            check (e.g. 16, its default); null (the default here): all.
        score_tol: largest image-score MAE.
        map_tol: largest anomaly-map MAE.
        iou_tol: smallest mask IoU.
        device: device of the torch model and ONNX Runtime's provider.
        batch_size: images per batch (>= 1).

    Returns:
        0 when the check PASSED, 1 when it FAILED.

    Raises:
        ConsistencyError: a run without an export, an export of another size, a value out of range (one line).
    """
    if max_images is not None and max_images < 1:
        raise ConsistencyError(f"--max_images must be >= 1, got {max_images}")
    if batch_size < 1:
        raise ConsistencyError(f"--batch_size must be >= 1, got {batch_size}")
    result = consistency_run(run_dir, max_images, score_tol, map_tol, iou_tol, device, batch_size)
    print(summary_line(result))
    return 0 if result["status"] == "PASSED" else 1
