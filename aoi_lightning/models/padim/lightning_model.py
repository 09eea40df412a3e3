"""PaDiM LightningModule."""

from __future__ import annotations

from typing import Literal

from aoi_lightning.models.lightning_base import AnomalyModule
from aoi_lightning.models.padim.torch_model import PadimModel


class Padim(AnomalyModule):
    """PaDiM (Defard et al., 2020) for LightningCLI.

    Args:
        backbone: timm backbone name (`tf_efficientnet_lite0`, `resnet18`, `wide_resnet50_2`, ...).
        layers: feature layers (timm `feature_info` names); default: the deepest layer at strides 4, 8, 16.
        weights: `package` (pip-installed EfficientNet-Lite0), `imagenet` (timm's download/cache), a local
            weights file, or `none` (random; tests only).
        n_features: channel subset size; default: the paper's 100 (ResNet-18) / 550 (WRN-50), all channels for
            backbones with <= 256 in all (EfficientNet-Lite0: 176), else 100.
        seed: seed of the channel subset.
        regularization: covariance diagonal loading before the Cholesky inverse.
        sigma: Gaussian smoothing of the anomaly map (pixels at the input size).
        stats_dtype: storage of the inverse-covariance factor: `float16` (default; half the memory, the checkpoint
            size and, at batch 1, much of the inference time; arithmetic stays float32) or `float32`.
        tile_size: tiling for images much larger than the model input: None (default) feeds the whole image
            (resized to `data.image_size`); an integer cuts the `data.image_size` input into overlapping square
            tiles of this side, runs the model per tile and stitches the maps (weighted average in overlaps).
        tile_overlap: pixels shared by neighbouring tiles; also the width of the blending ramp.
        tile_thresholds: `global` (one image and one pixel threshold) or `per_tile` (each tile position's
            map and score scaled by a gain calibrated on the good training images at the end of the fit).
        tile_batch: tiles of each image per model pass (default: all); bounds the memory of large tile grids.
            PaDiM shares its per-position statistics across tile positions (tiles must look alike).
        fit_embeddings_mb: memory (MiB) for the training images' embeddings kept from the fit pass, so that
            `preds_train.jsonl` is scored without decoding the images and running the backbone again (transistor
            at 256 px: about 615 MB); past it, with tiling, under DDP or with 0, a second pass scores them.
    """

    model_name = "padim"

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: tuple[str, ...] | None = None,
        weights: str = "package",
        n_features: int | None = None,
        seed: int = 0,
        regularization: float = 0.01,
        sigma: float = 4.0,
        stats_dtype: Literal["float16", "float32"] = "float16",
        tile_size: int | None = None,
        tile_overlap: int = 0,
        tile_thresholds: Literal["global", "per_tile"] = "global",
        tile_batch: int | None = None,
        fit_embeddings_mb: int = 1024,
    ) -> None:
        super().__init__(fit_embeddings_mb)
        self.save_hyperparameters()
        self.model = PadimModel(
            backbone, layers, weights, n_features, seed, regularization, sigma, stats_dtype=stats_dtype,
            tile_size=tile_size, tile_overlap=tile_overlap, tile_thresholds=tile_thresholds, tile_batch=tile_batch,
        )  # fmt: skip
