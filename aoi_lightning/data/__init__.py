"""Data: MVTec layout, folders, the built-in synthetic set, image decoding."""

from aoi_lightning.data.datamodule import MVTecDataModule

__all__ = ["MVTecDataModule"]
