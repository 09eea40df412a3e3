"""Data: MVTec layout, folders, the built-in synthetic set, image decoding.

`MVTecDataModule` is imported lazily so that `aoi_lightning.data.image_io` stays importable without torch.
"""

__all__ = ["MVTecDataModule"]


def __getattr__(name: str):
    if name == "MVTecDataModule":
        from aoi_lightning.data.datamodule import MVTecDataModule

        return MVTecDataModule
    raise AttributeError(name)
