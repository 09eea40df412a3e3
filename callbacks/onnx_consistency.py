"""OnnxConsistencyCheck: ONNX Runtime vs torch on the test images at the end of fit; writes consistency.json."""

from __future__ import annotations

import copy
import logging
from typing import Literal

import lightning.pytorch as pl

from aoi_lightning.callbacks.onnx_export import OnnxExport, fit_export, fit_preprocessing
from aoi_lightning.export.consistency import (
    DEFAULT_IOU_TOL,
    DEFAULT_MAP_TOL,
    DEFAULT_SAMPLE_SIZE,
    DEFAULT_SCORE_TOL,
    NO_TEST_IMAGES,
    ConsistencyError,
    ConsistencyFailed,
    check_consistency,
    image_batches,
    spread_over_defect_types,
    summary_line,
)
from aoi_lightning.export.onnx_export import CONSISTENCY_FILE
from aoi_lightning.fileio import write_json
from aoi_lightning.rundir.meta import utc_now

log = logging.getLogger(__name__)


class OnnxConsistencyCheck(pl.Callback):
    """Checks the ONNX export of the fit against the torch model on a representative sample of the datamodule's
    test images, preprocessed with the model's `Preprocessing`.

    The sample: by default at most 16 test images (`DEFAULT_SAMPLE_SIZE`), spread over the defect types, `good`
    included: one image of each type in turn until the sample is full (every type is present when there are at
    most 16 types), evenly spaced within each type (`spread_over_defect_types`). A test set of at most
    `max_images` images is checked whole; `max_images: null` checks every test image. `consistency.json`
    records `num_images` (checked), `num_available` (test images) and `sample` (`"all"` or
    `"evenly spread over defect types"`).

    Uses the export of an `OnnxExport` callback (in any order), or exports itself when there is none.

    Args:
        max_images: largest number of test images to check (default 16); null: all.
        score_tol: largest image-score mean absolute error.
        map_tol: largest anomaly-map mean absolute error.
        iou_tol: smallest IoU of the masks at the pixel threshold.
        on_failure: `error` stops with an error when the check FAILED; `warn` logs a warning.
        device: device of the comparison (`cpu`: torch and ONNX Runtime on CPU; `cuda`).
    """

    def __init__(
        self,
        max_images: int | None = DEFAULT_SAMPLE_SIZE,
        score_tol: float = DEFAULT_SCORE_TOL,
        map_tol: float = DEFAULT_MAP_TOL,
        iou_tol: float = DEFAULT_IOU_TOL,
        on_failure: Literal["error", "warn"] = "error",
        device: Literal["cpu", "cuda"] = "cpu",
    ) -> None:
        if max_images is not None and max_images < 1:
            raise ValueError(f"OnnxConsistencyCheck.max_images must be >= 1 or null, got {max_images}")
        self.max_images = max_images
        self.score_tol = score_tol
        self.map_tol = map_tol
        self.iou_tol = iou_tol
        self.on_failure = on_failure
        self.device = device
        self.result: dict | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.interrupted:
            return
        exporters = [cb for cb in trainer.callbacks if isinstance(cb, OnnxExport)]
        onnx_path = exporters[0].export(trainer, pl_module) if exporters else fit_export(trainer, pl_module)
        model = pl_module.model
        if model.fitted.device.type != self.device:
            model = copy.deepcopy(model).to(self.device)
        samples = getattr(trainer.datamodule, "test_samples", None)
        if samples is None:
            raise ConsistencyError("OnnxConsistencyCheck needs a datamodule with test_samples (e.g. MVTecDataModule)")
        # rank zero checks the whole test set (not its DDP shard), made into model inputs as `aoi run` makes them;
        # a data set without test images is checked on its other images (the check compares two models)
        source = "test folder"
        if not samples:
            dm = trainer.datamodule
            samples = [*dm.val_samples, *getattr(dm, "holdout_samples", []), *dm.train_samples]
            source = NO_TEST_IMAGES
        available = [s.image_path for s in samples]
        paths, sample = spread_over_defect_types(available, self.max_images)
        images = image_batches(paths, fit_preprocessing(trainer, pl_module))
        with model.exact_search():  # the graph searches exactly: an approximate faiss index is not what it checks
            result = check_consistency(
                model,
                onnx_path,
                images,
                float(model.pixel_threshold),
                self.score_tol,
                self.map_tol,
                self.iou_tol,
                device=self.device,
                total=len(paths),
            )
        result.update(
            {
                "model": getattr(pl_module, "model_name", None),
                "run_id": onnx_path.parent.parent.name,
                "images": source,
                "num_available": len(available),
                "sample": sample,
                "created_at": utc_now(),
            }
        )
        write_json(onnx_path.parent / CONSISTENCY_FILE, result)
        self.result = result
        line = summary_line(result)
        if result["status"] == "PASSED":
            log.info(line)
        elif self.on_failure == "warn":
            log.warning(line)
        else:
            error = ConsistencyFailed(f"{line}; see {onnx_path.parent / CONSISTENCY_FILE}")
            deferred = getattr(pl_module, "deferred_errors", None)
            if isinstance(deferred, list):  # the CLI writes the run's files first, then raises it
                log.error(line)
                deferred.append(error)
            else:
                raise error
