"""PaDiM (Defard et al., 2020): per-position Gaussian of multi-scale pretrained features, Mahalanobis map."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from aoi_lightning.models.components.base import AnomalyTorchModel, InferenceOutput
from aoi_lightning.models.components.feature_extractor import FeatureExtractor, layers_for_strides
from aoi_lightning.models.components.gaussian import GaussianStats, StreamingMoments

#: Channels kept by the random subset for the PaDiM paper's backbones (its choices).
PAPER_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}
#: Backbones whose three stages together are at most this wide keep every channel (no random subset).
ALL_CHANNELS_UP_TO = 256
#: Subset size for other wide backbones.
DEFAULT_N_FEATURES = 100


def default_n_features(backbone: str, total: int) -> int:
    """Default channel count: the paper's value for ResNet-18 / WRN-50; every channel when the stages are
    narrow (<= 256 in all, e.g. EfficientNet-Lite's 176, where a random 100 cost about 0.025 image AUROC in
    our measurements, see README); otherwise a random 100."""
    if backbone in PAPER_N_FEATURES:
        return min(total, PAPER_N_FEATURES[backbone])
    return total if total <= ALL_CHANNELS_UP_TO else DEFAULT_N_FEATURES


class PadimModel(AnomalyTorchModel):
    """PaDiM torch model.

    Args:
        backbone: timm backbone name.
        layers: feature layers; None picks the deepest layer at strides 4, 8 and 16.
        weights: see `FeatureExtractor`.
        n_features: size of the seeded random channel subset; None: `default_n_features`; >= total keeps all.
        seed: seed of the channel subset.
        regularization: added to the covariance diagonal before inversion.
        sigma: Gaussian smoothing of the map.
        stats_dtype: storage of the whitening factor, `float16` (half the memory and the checkpoint; distances
            within about 1e-4 relative of float32 storage, all arithmetic float32) or `float32`.
        tile_size, tile_overlap, tile_thresholds, tile_batch: tiling, see `AnomalyTorchModel`. With tiles, one
            Gaussian per position *within a tile* is fitted on all tiles of all images: the statistics are shared
            across tile positions, which assumes that the tiles look alike (periodic or uniform texture).
    """

    dynamic_buffers = ()  # GaussianStats sizes its own buffers on load

    #: Strides of the default feature layers (`layers: null`).
    default_strides: tuple[int, ...] = (4, 8, 16)

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] | None = None,
        weights: str = "package",
        n_features: int | None = None,
        seed: int = 0,
        regularization: float = 0.01,
        sigma: float = 4.0,
        stats_dtype: str = "float16",
        tile_size: int | None = None,
        tile_overlap: int = 0,
        tile_thresholds: str = "global",
        tile_batch: int | None = None,
    ) -> None:
        super().__init__(
            sigma=sigma,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            tile_thresholds=tile_thresholds,
            tile_batch=tile_batch,
        )
        layers = tuple(layers) if layers else layers_for_strides(backbone, self.default_strides)
        self.feature_extractor = FeatureExtractor(backbone, layers, weights)
        total = sum(self.feature_extractor.channels)
        keep = default_n_features(backbone, total) if n_features is None else min(int(n_features), total)
        if keep < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        gen = torch.Generator().manual_seed(seed)
        index = torch.sort(torch.randperm(total, generator=gen)[:keep]).values
        self.register_buffer("channel_index", index)
        self.regularization = regularization
        self.stats = GaussianStats(dtype=stats_dtype)
        self._moments = StreamingMoments()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> embedding (B, C_sel, h, w) at the first layer's resolution."""
        features = self.feature_extractor(images)
        size = features[0].shape[-2:]
        maps = [features[0]] + [F.interpolate(f, size=size, mode="nearest") for f in features[1:]]
        embedding = torch.cat(maps, dim=1)
        if self.channel_index.numel() == embedding.shape[1]:  # every channel kept (index is sorted)
            return embedding
        return embedding.index_select(1, self.channel_index)

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """Accumulate the moments of a batch of good images (B, 3, H, W) (of their tiles when tiling)."""
        for part in self.tile_batches(images):
            embedding = self.embed(part)
            self._moments.update(embedding.flatten(2))
            self._keep_fit_embedding(embedding, tuple(part.shape[-2:]))

    def fit_accumulator(self) -> StreamingMoments:
        """The streaming moments accumulated by `update` since the last `finalize` (summed over processes under
        DDP before `finalize`)."""
        return self._moments

    @contextlib.contextmanager
    def export_mode(self) -> Iterator[None]:
        """The statistics as one float32 matrix per block and panel (`GaussianStats.export_panels`)."""
        with self.stats.export_panels():
            yield

    @torch.no_grad()
    def finalize(self) -> None:
        """Mean and whitening from the accumulated moments (float64 Cholesky, once), stored a block of positions
        at a time: the peak is the float64 accumulators plus the stored factor, with no float32 copy of the full
        matrices between them."""
        if self._moments.count < 2:
            self._moments.mean_cov()  # raises the one-line error for fewer than two images
        channels, positions = self._moments.sum.shape
        self.stats.allocate(channels, positions, self._moments.sum.device)
        for start, mean, whitening in self._moments.whitening_blocks(self.regularization):
            self.stats.set_block(start, mean, whitening)
        self.stats.finish()
        self._moments = StreamingMoments()  # free the float64 accumulators
        self.fitted.fill_(True)

    def score_embedding(self, embedding: torch.Tensor, input_size: tuple[int, int]) -> InferenceOutput:
        """Mahalanobis distance per position, upsampled to `input_size` and smoothed; score: the map's max."""
        batch, _, h, w = embedding.shape
        dist = self.stats(embedding.flatten(2)).reshape(batch, h, w)
        anomaly_map = self.smooth_map(dist, tuple(input_size))
        return InferenceOutput(pred_score=anomaly_map.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)
