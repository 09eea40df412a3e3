"""OnnxExport: writes `<run>/export/model.onnx` and `export_meta.json` at the end of fit (rank zero)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl

from aoi_lightning.data.preprocess import Preprocessing
from aoi_lightning.export.onnx_export import DEFAULT_OPSET, export_module

log = logging.getLogger(__name__)


def fit_preprocessing(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Preprocessing:
    """The preprocessing of a finished fit: the module's (set at fit), else the data module's at its `image_size`.

    Raises:
        ValueError: neither the module nor the data module says what input size the model takes.
    """
    own = getattr(pl_module, "preprocessing", None)
    if own is not None:
        return own
    datamodule = trainer.datamodule
    size = getattr(datamodule, "image_size", None)
    if size is None:
        raise ValueError("ONNX export needs the input size: use a datamodule with `image_size` (e.g. MVTecDataModule)")
    return Preprocessing.from_image_size(size)


def fit_export(trainer: pl.Trainer, pl_module: pl.LightningModule, opset: int = DEFAULT_OPSET) -> Path:
    """Export the model of a finished fit to `<trainer.default_root_dir>/export/`."""
    datamodule = trainer.datamodule
    preprocessing = fit_preprocessing(trainer, pl_module)
    root = Path(trainer.default_root_dir)
    extra = {"category": getattr(datamodule, "category", None), "run_id": root.name}
    return export_module(pl_module, preprocessing.image_size, root / "export", extra=extra, opset=opset)


class OnnxExport(pl.Callback):
    """Exports the fitted model to ONNX when fit ends; thresholds tuned during validation go with it.

    Args:
        opset: ONNX opset version.
    """

    def __init__(self, opset: int = DEFAULT_OPSET) -> None:
        self.opset = opset
        self.path: Path | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path = None

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """The export of this fit, made on the first call."""
        if self.path is None or not self.path.is_file():
            self.path = fit_export(trainer, pl_module, self.opset)
        return self.path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.interrupted:
            self.export(trainer, pl_module)
