"""What PaDiM and PatchCore torch models share: the inference output, threshold buffers, map post-processing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from aoi_lightning.models.components.blur import GaussianBlur
from aoi_lightning.models.components.tiler import Tiler

#: Threshold modes of a tiled model.
TILE_THRESHOLDS = ("global", "per_tile")
#: A tile position is made at most this many times more sensitive than the median position by `per_tile`.
MAX_TILE_GAIN = 2.0


class InferenceOutput(NamedTuple):
    """Model output; the field names are the ONNX output names.

    Attributes:
        pred_score: (B,) image anomaly score.
        anomaly_map: (B, 1, H, W) pixel anomaly map at the input resolution.
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor


def exact_cuda_math() -> None:
    """Turn off TF32 in cuDNN convolutions and CUDA matmuls (on by default for convolutions), so that scores on
    a GPU match CPU and ONNX results to float32 precision and thresholds tuned on one device hold on another."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class NotFittedError(RuntimeError):
    """The model was used before `fit`."""


class FitEmbeddings:
    """Embeddings of the fit pass kept in float32, in order, up to `budget_bytes`, so that the training images
    can be scored once the fit is final without decoding them and running the backbone a second time.

    Past the budget everything kept is dropped (`overflowed`): the caller then scores in a second pass.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self.parts: list[tuple[torch.Tensor, tuple[int, int]]] = []
        self.nbytes = 0
        self.overflowed = False

    def add(self, embedding: torch.Tensor, input_size: tuple[int, int]) -> None:
        """Keep a batch's embedding (B, C, h, w) of inputs of `input_size` (H, W)."""
        if self.overflowed:
            return
        size = embedding.numel() * 4
        if self.nbytes + size > self.budget_bytes:
            self.overflowed, self.parts, self.nbytes = True, [], 0
            return
        self.parts.append((embedding.detach().to("cpu", torch.float32, copy=True), tuple(input_size)))
        self.nbytes += size


class AnomalyTorchModel(nn.Module):
    """Base class: thresholds as buffers (they travel in checkpoints and exports), a fitted flag, map smoothing,
    and optional tiling.

    Subclasses implement `update`, `finalize` and `_forward_fitted` (one pass of the model over its input), and
    name their data-dependent buffers in `dynamic_buffers` so that checkpoints of any fitted size load. With
    tiling, `update` feeds the model `tile_batches(images)` and `forward` runs `_forward_fitted` on the tiles and
    stitches their maps (`aoi_lightning.models.components.tiler`).

    Args:
        sigma: Gaussian smoothing of the map (pixels at the model input; per tile when tiling).
        tile_size: None: the model sees the whole input. Else the side of the square tiles the input is cut into.
        tile_overlap: pixels shared by neighbouring tiles (also the width of the blending ramp).
        tile_thresholds: `global`: one image and one pixel threshold for every tile. `per_tile`: each tile
            position's map and score are scaled by a gain calibrated on good images (`calibrate_tiles`), so the
            global thresholds act as one threshold per tile position.
        tile_batch: tiles of each image per model pass (None: all at once). Bounds the memory of large grids
            (activations; with PatchCore's exported matmul search, the (patches x bank) distance matrix); the
            exported graph then holds one copy of the model's nodes per group (the weights are shared).
    """

    dynamic_buffers: tuple[str, ...] = ()
    #: How the fits of several processes combine (see `aoi_lightning.distributed`): `sum` (the model's
    #: `fit_accumulator()` is summed over processes, then every process finalizes) or `gather` (the
    #: `take_training_patches()` of all processes are put together on one, which finalizes and hands the result
    #: to the others with `set_memory_bank`).
    fit_combination: ClassVar[str] = "sum"
    #: Image score of a tiled forward: True: max of the stitched map; False: max of the tile scores.
    score_is_map_max: bool = True

    def __init__(
        self,
        sigma: float = 4.0,
        tile_size: int | None = None,
        tile_overlap: int = 0,
        tile_thresholds: str = "global",
        tile_batch: int | None = None,
    ) -> None:
        super().__init__()
        if tile_thresholds not in TILE_THRESHOLDS:
            raise ValueError(f"tile_thresholds must be one of {', '.join(TILE_THRESHOLDS)}, got {tile_thresholds!r}")
        if tile_size is None and (tile_overlap or tile_thresholds != "global"):
            raise ValueError("tile_overlap and tile_thresholds: per_tile need tile_size (tiling is off without it)")
        if tile_batch is not None and (isinstance(tile_batch, bool) or int(tile_batch) != tile_batch or tile_batch < 1):
            raise ValueError(f"tile_batch must be a positive integer or None, got {tile_batch!r}")
        self.blur = GaussianBlur(sigma)
        self.tiler = None if tile_size is None else Tiler(tile_size, tile_overlap)
        self.tile_thresholds = tile_thresholds
        self.tile_batch = None if tile_batch is None else int(tile_batch)
        self.register_buffer("image_threshold", torch.tensor(float("nan")))
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))
        self.register_buffer("fitted", torch.tensor(False))
        # (rows, cols) gains of the tile positions with `per_tile` thresholds; empty: no per-tile scaling
        self.register_buffer("tile_gain", torch.empty(0))
        self._fit_embeddings: FitEmbeddings | None = None

    # -- training-image scores from the fit pass --------------------------------------------------------------
    def keep_fit_embeddings(self, budget_bytes: int) -> bool:
        """From now on `update` keeps the embeddings of its images (up to `budget_bytes`) for
        `score_fit_embeddings`. Not with tiling (its forward stitches tiles): returns False then, and with a
        budget of 0."""
        keep = self.tiler is None and budget_bytes > 0
        self._fit_embeddings = FitEmbeddings(budget_bytes) if keep else None
        return keep

    def _keep_fit_embedding(self, embedding: torch.Tensor, input_size: tuple[int, int]) -> None:
        if self._fit_embeddings is not None:
            self._fit_embeddings.add(embedding, input_size)

    @torch.no_grad()
    def score_fit_embeddings(self) -> list[InferenceOutput] | None:
        """Outputs of the fitted model for the images `update` saw since `keep_fit_embeddings`, one per `update`
        batch, in order; the same as `forward` on those images (to float32 rounding). None when nothing was kept
        (not asked, tiling, or over the budget). The kept embeddings are released."""
        kept, self._fit_embeddings = self._fit_embeddings, None
        if kept is None or kept.overflowed or not kept.parts:
            return None
        device = self.fitted.device
        return [self.score_embedding(emb.to(device), size) for emb, size in kept.parts]

    def score_embedding(self, embedding: torch.Tensor, input_size: tuple[int, int]) -> InferenceOutput:
        """The model's output for an embedding (B, C, h, w) of inputs of `input_size` (H, W) (`embed`'s output)."""
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    @property
    def has_thresholds(self) -> bool:
        return bool(torch.isfinite(self.image_threshold)) and bool(torch.isfinite(self.pixel_threshold))

    @property
    def needs_tile_calibration(self) -> bool:
        """True for a `per_tile` model whose tile gains are not calibrated yet."""
        return self.tiler is not None and self.tile_thresholds == "per_tile" and self.tile_gain.numel() == 0

    @contextlib.contextmanager
    def export_mode(self) -> Iterator[None]:
        """Within the block the model runs as its exported graph does (no-op here; PatchCore searches with
        matrix products instead of faiss)."""
        yield

    @contextlib.contextmanager
    def exact_search(self) -> Iterator[None]:
        """Within the block the model searches exactly, as the exported graph does (no-op here; PatchCore with
        an approximate faiss index searches exactly and keeps its index for after the block)."""
        yield

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) per RGB channel that `forward` applies to its [0, 1] input (the backbone's, rounded to 6
        decimals), or None for a model without a feature extractor."""
        extractor = getattr(self, "feature_extractor", None)
        if extractor is None:
            return None
        return tuple(round(float(v), 6) for v in extractor.mean.flatten()), tuple(
            round(float(v), 6) for v in extractor.std.flatten()
        )

    def set_thresholds(self, image_threshold: float, pixel_threshold: float) -> None:
        self.image_threshold.fill_(float(image_threshold))
        self.pixel_threshold.fill_(float(pixel_threshold))

    def smooth_map(self, patch_scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, h, w) patch scores -> (B, 1, H, W) map: bilinear upsampling then Gaussian smoothing."""
        maps = F.interpolate(patch_scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        return self.blur(maps)

    def tile_input(self, images: torch.Tensor) -> torch.Tensor:
        """What the model sees of images (B, 3, H, W): the images, or their tiles (B * T, 3, t, t) when tiling."""
        return images if self.tiler is None else self.tiler.tile(images)

    def tile_batches(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """What the model sees of images (B, 3, H, W), in passes: the images, or groups of `tile_batch` tiles of
        every image (B * g, 3, t, t); all tiles at once without `tile_batch`."""
        tiles = self.tile_input(images)
        if self.tiler is None or self.tile_batch is None:
            yield tiles
            return
        per_image = tiles.reshape(images.shape[0], -1, *tiles.shape[1:])
        for start in range(0, per_image.shape[1], self.tile_batch):
            yield per_image[:, start : start + self.tile_batch].reshape(-1, *tiles.shape[1:])

    def _forward_tiles(self, images: torch.Tensor) -> InferenceOutput:
        """`_forward_fitted` on the tiles of images (B, 3, H, W), `tile_batch` tiles of each image per pass:
        scores (B * T,) and tile maps (B * T, 1, t, t), tile k of image b at row b * T + k."""
        outs = [self._forward_fitted(part) for part in self.tile_batches(images)]
        if len(outs) == 1:
            return outs[0]
        batch = images.shape[0]
        scores = torch.cat([o.pred_score.reshape(batch, -1) for o in outs], dim=1)
        maps = torch.cat([o.anomaly_map.reshape(batch, -1, *o.anomaly_map.shape[1:]) for o in outs], dim=1)
        return InferenceOutput(pred_score=scores.reshape(-1), anomaly_map=maps.reshape(-1, *maps.shape[2:]))

    def forward(self, images: torch.Tensor) -> InferenceOutput:
        """Images (B, 3, H, W) in [0, 1] -> InferenceOutput."""
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling() and not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: run `aoi fit` (or call update/finalize) first")
        if self.tiler is None:
            return self._forward_fitted(images)
        return self._forward_tiled(images, self.tile_gain)

    def _forward_tiled(self, images: torch.Tensor, gain: torch.Tensor) -> InferenceOutput:
        """Per-tile forward, tile maps and scores scaled by `gain` (rows, cols) when not empty, maps stitched.

        Image score: the max of the stitched map (`score_is_map_max`, as PaDiM defines it without tiles) or the
        max of the tile scores (PatchCore: its re-weighted score of each tile).
        """
        size = (int(images.shape[-2]), int(images.shape[-1]))
        grid = self.tiler.grid(*size)
        out = self._forward_tiles(images)
        tile_maps, tile_scores = out.anomaly_map, out.pred_score.reshape(-1, grid.num_tiles)
        if gain.numel():
            if tuple(gain.shape) != grid.shape:
                raise ValueError(
                    f"per-tile gains were calibrated for a {tuple(gain.shape)} tile grid, but an input of {size} "
                    f"gives {grid.shape}: feed images of the size the model was fitted at"
                )
            flat = gain.reshape(1, grid.num_tiles)
            tile_scores = tile_scores * flat
            tile_maps = (
                tile_maps.reshape(-1, grid.num_tiles, *tile_maps.shape[1:]) * flat[..., None, None, None]
            ).reshape(tile_maps.shape)
        anomaly_map = self.tiler.untile(tile_maps, size)
        score = anomaly_map.amax(dim=(1, 2, 3)) if self.score_is_map_max else tile_scores.amax(dim=1)
        return InferenceOutput(pred_score=score, anomaly_map=anomaly_map)

    @torch.no_grad()
    def calibrate_tiles(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """Per-tile gains from good images (B, 3, H, W) for `per_tile` thresholds; stored in `tile_gain`.

        For each tile position k, q_k is the mean over the images of the maximum of the tile's own (unstitched)
        map. The gain is median(q) / max(q_k, median(q) / MAX_TILE_GAIN): a position whose good images score
        high (busy content) is scaled down, a quiet one up (at most MAX_TILE_GAIN times, so that a nearly
        constant region does not turn sensor noise into defects); the median position keeps gain 1, so scores
        stay in the units of the untiled model.

        Returns:
            the gains (rows, cols).
        """
        if self.tiler is None:
            raise ValueError("calibrate_tiles needs a tiled model (tile_size)")
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: fit it before calibrating the tiles")
        total, count, shape = None, 0, None
        for images in batches:
            grid = self.tiler.grid(int(images.shape[-2]), int(images.shape[-1]))
            if shape is not None and grid.shape != shape:
                raise ValueError(f"calibration images give tile grids {shape} and {grid.shape}: use one image size")
            shape = grid.shape
            maps = self._forward_tiles(images).anomaly_map
            maxima = maps.reshape(images.shape[0], grid.num_tiles, -1).amax(dim=2).to(torch.float64)
            total = maxima.sum(dim=0) if total is None else total + maxima.sum(dim=0)
            count += images.shape[0]
        if count == 0:
            raise ValueError("per-tile calibration needs at least one good image")
        q = total / count
        median = q.median()
        if not bool(median > 0):
            raise ValueError("per-tile calibration: the good images' tile maps are all zero; use global thresholds")
        gain = median / torch.maximum(q, median / MAX_TILE_GAIN)
        self.tile_gain = gain.reshape(shape).to(self.fitted.device, torch.float32)
        return self.tile_gain

    def tiling_info(self) -> dict | None:
        """Tiling facts (tile size, overlap, threshold mode, calibrated gains) or None without tiling."""
        if self.tiler is None:
            return None
        return {
            "tile_size": self.tiler.tile_size,
            "tile_overlap": self.tiler.overlap,
            "tile_thresholds": self.tile_thresholds,
            "tile_batch": self.tile_batch,
            "tile_gain": self.tile_gain.tolist() if self.tile_gain.numel() else None,
        }

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> embedding (B, C, h, w)."""
        raise NotImplementedError

    def _forward_fitted(self, images: torch.Tensor) -> InferenceOutput:
        return self.score_embedding(self.embed(images), tuple(images.shape[-2:]))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if prefix + "tile_gain" not in state_dict:  # checkpoints written before tiling existed: no gains
            state_dict[prefix + "tile_gain"] = torch.empty(0)
        # Fitted buffers have data-dependent shapes: take the checkpoint's shapes before the copy.
        for name in (*self.dynamic_buffers, "tile_gain"):
            key = prefix + name
            buf = self.get_buffer(name)
            if key in state_dict and tuple(state_dict[key].shape) != tuple(buf.shape):
                owner, _, attr = name.rpartition(".")
                module = self.get_submodule(owner) if owner else self
                setattr(module, attr, torch.empty_like(state_dict[key], device=buf.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
