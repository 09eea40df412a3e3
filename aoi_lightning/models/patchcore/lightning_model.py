"""PatchCore LightningModule."""

from __future__ import annotations

from aoi_lightning.models.lightning_base import AnomalyModule
from aoi_lightning.models.patchcore.torch_model import PatchcoreModel


class Patchcore(AnomalyModule):
    """PatchCore (Roth et al., 2022) for LightningCLI.

    Args:
        backbone: timm backbone name.
        layers: feature layers; default: the deepest layer at strides 8 and 16.
        weights: `package`, `imagenet`, a local weights file, or `none`.
        coreset_ratio: fraction of training patches kept by the greedy k-center coreset (1.0 keeps all).
        num_neighbors: neighbourhood size of the image-score reweighting.
        projection_dim: random projection dimension used by the coreset selection.
        seed: seed of the coreset selection.
        bank_dtype: `float32` or `float16` memory-bank storage.
        search: nearest-neighbour back end for inference: `faiss` or `torch`.
        sigma: Gaussian smoothing of the anomaly map.
    """

    model_name = "patchcore"

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: tuple[str, ...] | None = None,
        weights: str = "package",
        coreset_ratio: float = 0.01,
        num_neighbors: int = 9,
        projection_dim: int = 32,
        seed: int = 0,
        bank_dtype: str = "float32",
        search: str = "faiss",
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = PatchcoreModel(
            backbone, layers, weights, coreset_ratio, num_neighbors, projection_dim, seed, bank_dtype, search, sigma
        )

    def _prepare_fit(self) -> None:
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        size = getattr(dataset, "image_size", None)
        if dataset is not None and size is not None:
            self.model.allocate(len(dataset), tuple(size))
