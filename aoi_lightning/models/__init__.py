"""PaDiM and PatchCore: torch models and LightningModules."""

from aoi_lightning.models.padim.lightning_model import Padim
from aoi_lightning.models.patchcore.lightning_model import Patchcore

__all__ = ["Padim", "Patchcore"]
