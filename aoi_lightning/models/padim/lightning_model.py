"""PaDiM LightningModule."""

from __future__ import annotations

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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = PadimModel(backbone, layers, weights, n_features, seed, regularization, sigma)
