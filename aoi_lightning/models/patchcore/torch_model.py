"""PatchCore (Roth et al., 2022): locally aggregated mid-level patches, coreset memory bank, nearest neighbour."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from aoi_lightning.models.components.base import AnomalyTorchModel, InferenceOutput
from aoi_lightning.models.components.coreset import greedy_coreset
from aoi_lightning.models.components.feature_extractor import FeatureExtractor, layers_for_strides
from aoi_lightning.models.components.nearest_neighbors import FaissSearcher, index_options, knn_torch
from aoi_lightning.progress import phase


class PatchcoreModel(AnomalyTorchModel):
    """PatchCore torch model.

    Args:
        backbone: timm backbone name.
        layers: feature layers; None picks the deepest layer at strides 8 and 16.
        weights: see `FeatureExtractor`.
        coreset_ratio: fraction of the patches kept in the memory bank (1.0: all).
        num_neighbors: neighbourhood size of the image-score reweighting (paper: b); clamped to the bank size,
            and with a neighbourhood of one row the score is not re-weighted (see `_reweight`).
        projection_dim: dimension of the random projection used by the coreset selection.
        seed: seed of the coreset selection.
        bank_dtype: `float32` or `float16` storage of the memory bank.
        search: `faiss` (inference through `index`: the exact `flat` by matrix products over a float32 copy of the
            bank made once, the approximate indexes with faiss) or `torch` (matrix products over the bank as
            stored, what the ONNX export computes; exact).
        sigma: Gaussian smoothing of the map.
        index: index of the `faiss` search: `flat` (exact), `ivf_flat` (inverted lists) or `hnsw` (graph);
            the approximate ones trade a little accuracy for speed on large banks. Built on the first search
            (seeded with `seed`), never stored in the checkpoint: a run can be tested with another index.
        index_params: parameters of the index; `ivf_flat`: `nlist` (default about sqrt(bank size)) and
            `nprobe` (8); `hnsw`: `M` (32), `ef_construction` (200), `ef_search` (128) and `build_threads`
            (1: reproducible graph; 0: all faiss threads). A bank too small for them is searched exactly.
        tile_size, tile_overlap, tile_thresholds, tile_batch: tiling, see `AnomalyTorchModel`. With tiles, the
            patches of every tile go into the one memory bank (patches carry no position, so tiles need not look
            alike) and the image score is the max over the tiles of each tile's re-weighted score.
    """

    dynamic_buffers = ("memory_bank",)
    score_is_map_max = False
    fit_combination = "gather"

    #: Strides of the default feature layers (`layers: null`).
    default_strides: tuple[int, ...] = (8, 16)

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] | None = None,
        weights: str = "package",
        coreset_ratio: float = 0.01,
        num_neighbors: int = 9,
        projection_dim: int = 32,
        seed: int = 0,
        bank_dtype: str = "float32",
        search: str = "faiss",
        sigma: float = 4.0,
        index: str = "flat",
        index_params: dict[str, int] | None = None,
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
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if isinstance(num_neighbors, bool) or int(num_neighbors) != num_neighbors or num_neighbors < 1:
            raise ValueError(f"num_neighbors must be an integer >= 1, got {num_neighbors!r}")
        if bank_dtype not in ("float32", "float16"):
            raise ValueError(f"bank_dtype must be 'float32' or 'float16', got {bank_dtype!r}")
        if search not in ("faiss", "torch"):
            raise ValueError(f"search must be 'faiss' or 'torch', got {search!r}")
        index_options(index, index_params)  # ValueError naming the bad index or parameter
        if search == "torch" and index != "flat":
            raise ValueError(f"index {index!r} needs search='faiss' (search='torch' is always exact)")
        layers = tuple(layers) if layers else layers_for_strides(backbone, self.default_strides)
        self.feature_extractor = FeatureExtractor(backbone, layers, weights)
        self.coreset_ratio = coreset_ratio
        self.num_neighbors = num_neighbors
        self.projection_dim = projection_dim
        self.seed = seed
        self.bank_dtype = getattr(torch, bank_dtype)
        self.search = search
        self.index = index
        self.index_params = dict(index_params or {})
        self.pool = torch.nn.AvgPool2d(3, stride=1, padding=1)
        self.register_buffer("memory_bank", torch.empty(0, sum(self.feature_extractor.channels)))
        self._bank: torch.Tensor | None = None
        self._filled = 0
        self._searcher: FaissSearcher | None = None
        self.last_coreset_seconds = 0.0

    @property
    def embedding_dim(self) -> int:
        return sum(self.feature_extractor.channels)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> locally aware patch features (B, D, h, w) at the first layer's resolution."""
        features = [self.pool(f) for f in self.feature_extractor(images)]
        size = features[0].shape[-2:]
        maps = [features[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]]
        return torch.cat(maps, dim=1)

    def allocate(self, num_images: int, image_size: tuple[int, int]) -> None:
        """Preallocate the full bank for `num_images` images of `image_size` (one row per patch of every tile)."""
        stride = self.feature_extractor.strides[0]
        tiles, size = 1, image_size
        if self.tiler is not None:
            tiles, size = self.tiler.num_tiles(image_size), (self.tiler.tile_size, self.tiler.tile_size)
        patches = tiles * -(-size[0] // stride) * -(-size[1] // stride)
        self._bank = torch.empty(num_images * patches, self.embedding_dim, dtype=self.bank_dtype)
        self._filled = 0

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """Append the patches of a batch of good images (B, 3, H, W) (of all their tiles when tiling) to the bank."""
        for part in self.tile_batches(images):
            emb = self.embed(part)
            self._append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).to("cpu", self.bank_dtype))
            self._keep_fit_embedding(emb, tuple(part.shape[-2:]))

    def _append(self, rows: torch.Tensor) -> None:
        if self._bank is None or self._filled + rows.shape[0] > self._bank.shape[0]:
            # unknown data size: grow geometrically (amortised O(N))
            needed = self._filled + rows.shape[0]
            new = torch.empty(
                max(needed, 2 * (0 if self._bank is None else self._bank.shape[0])),
                rows.shape[1],
                dtype=self.bank_dtype,
            )
            if self._bank is not None:
                new[: self._filled] = self._bank[: self._filled]
            self._bank = new
        self._bank[self._filled : self._filled + rows.shape[0]] = rows
        self._filled += rows.shape[0]

    def take_training_patches(self) -> torch.Tensor | None:
        """The training patches accumulated by `update` (N, D), removed from the model (None when there are none)."""
        patches = None if self._bank is None else self._bank[: self._filled]
        self._bank, self._filled = None, 0
        return patches

    def put_training_patches(self, patches: torch.Tensor | None) -> None:
        """Replace the accumulated training patches by `patches` (N, D) (e.g. those of every process), ready for
        `finalize`."""
        self._bank = None if patches is None else patches.to("cpu", self.bank_dtype)
        self._filled = 0 if patches is None else int(patches.shape[0])

    def set_memory_bank(self, bank: torch.Tensor) -> None:
        """Install a finished memory bank (M, D) (e.g. the one another process selected) and mark the model fitted."""
        self.memory_bank = bank.to(self.fitted.device)
        self._bank, self._filled, self._searcher = None, 0, None
        self.fitted.fill_(True)

    def use_index(self, index: str, index_params: dict[str, int] | None = None) -> None:
        """Search the memory bank with faiss index `index` (`flat`, `ivf_flat`, `hnsw`) from now on; the index is
        built on the next search.

        Raises:
            ValueError: an unknown index or parameter, or an approximate index with `search='torch'`.
        """
        index_options(index, index_params)
        if self.search == "torch" and index != "flat":
            raise ValueError(f"index {index!r} needs search='faiss' (search='torch' is always exact)")
        self.index, self.index_params, self._searcher = index, dict(index_params or {}), None

    @property
    def active_index(self) -> str | None:
        """The kind of faiss index the last search used (`flat` where the bank is too small for the configured
        approximate one); None before the first search after a change."""
        return None if self._searcher is None else self._searcher.kind

    @property
    def num_training_patches(self) -> int:
        """Training patches accumulated by `update` and not yet reduced by `finalize`."""
        return self._filled

    @contextlib.contextmanager
    def exact_search(self) -> Iterator[None]:
        if self.index == "flat":
            yield
            return
        saved = self.index, self.index_params, self._searcher
        self.index, self.index_params, self._searcher = "flat", {}, None
        try:
            yield
        finally:
            self.index, self.index_params, self._searcher = saved

    @contextlib.contextmanager
    def export_mode(self) -> Iterator[None]:
        previous, self.search = self.search, "torch"
        try:
            yield
        finally:
            self.search = previous

    @torch.no_grad()
    def finalize(self) -> None:
        """Coreset subsampling of the accumulated bank."""
        if self._bank is None or self._filled == 0:
            raise ValueError("no training patches: the training set is empty")
        bank = self._bank[: self._filled]
        self.last_coreset_seconds = 0.0
        if self.coreset_ratio < 1.0:
            k = max(1, int(round(self._filled * self.coreset_ratio)))
            what = f"{self.coreset_ratio * 100:.3g}% of {self._filled:,} patches: {k:,} kept"
            with phase("coreset", what) as coreset:
                index = greedy_coreset(bank, k, projection_dim=self.projection_dim, seed=self.seed)
                bank = bank[index]
            self.last_coreset_seconds = coreset.seconds
        self.set_memory_bank(bank.clone())

    def _load_from_state_dict(self, *args, **kwargs):
        self._searcher = None
        super()._load_from_state_dict(*args, **kwargs)

    def nearest(
        self, queries: torch.Tensor, k: int, with_indices: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k nearest bank rows of (Q, D) queries: distances and indices (Q, k); `with_indices=False` (k = 1): the
        distances alone (indices None) where the search can skip them (`knn_torch`)."""
        bank = self.memory_bank
        if self.search == "faiss" and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            # the exact export path below stays matmul; the faiss index is built lazily, never saved
            if self._searcher is None or not self._searcher.built_for(bank, self.index, self.index_params, self.seed):
                self._searcher = FaissSearcher(bank.to(torch.float32), self.index, self.index_params, self.seed)
            return self._searcher.search(queries, k)
        return knn_torch(queries, bank.to(torch.float32), k, with_indices=with_indices)

    def score_embedding(self, emb: torch.Tensor, input_size: tuple[int, int]) -> InferenceOutput:
        """Nearest-bank-row distance per patch, upsampled to `input_size` and smoothed; score: `_reweight`."""
        batch, dim, h, w = emb.shape
        patches = emb.permute(0, 2, 3, 1).reshape(-1, dim)
        dist, _ = self.nearest(patches, 1, with_indices=False)  # which row is nearest matters for one patch only
        patch_scores = dist[:, 0].reshape(batch, h * w)
        pred_score = self._reweight(emb.permute(0, 2, 3, 1).reshape(batch, h * w, dim), patch_scores)
        anomaly_map = self.smooth_map(patch_scores.reshape(batch, h, w), tuple(input_size))
        return InferenceOutput(pred_score=pred_score, anomaly_map=anomaly_map)

    def _reweight(self, patches: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor:
        """Image score of the PatchCore paper (Roth et al. 2022, eq. 7): the max patch score s* = ||m_test - m*||,
        down-weighted when the matched bank patch m* lies in a dense neighbourhood:

            s = (1 - exp(d_1) / sum_{j=1..k} exp(d_j)) * s*,   d_j = ||m_test - n_j||,

        with n_1 = m*, n_2..n_k its nearest bank rows (N_b(m*), b = `num_neighbors`, m* included as in the
        reference implementations). Since m* is the bank row nearest to m_test, d_1 <= d_j for every j, so the
        fraction lies in (0, 1/k] and the weight in [1 - 1/k, 1).

        Small banks: k is clamped to the bank size (N_b cannot hold more rows than the bank). With k = 1 (a bank
        of one row, or `num_neighbors` <= 1) the neighbourhood is m* alone: the fraction is exp(d_1)/exp(d_1) = 1
        whatever the image, the weight is identically 0 and the formula carries no information (every image
        would score 0). There the weight is undefined and the un-weighted score s* is returned (weight 1, the
        limit of the bound 1 - 1/k as the neighbourhood grows); for k >= 2 the weight is well defined.

        Args:
            patches: (B, P, D) patch features.
            patch_scores: (B, P) nearest-neighbour distances (m*, the nearest bank row of the max patch, is
                searched here for that patch alone).

        Returns:
            (B,) image scores, finite and >= 0.
        """
        batch = patches.shape[0]
        arange = torch.arange(batch, device=patches.device)
        max_pos = patch_scores.argmax(dim=1)
        score = patch_scores[arange, max_pos]  # (B,)
        k = min(int(self.num_neighbors), int(self.memory_bank.shape[0]))
        if k <= 1:  # the neighbourhood is m* alone: weight undefined, un-weighted score
            return score
        bank = self.memory_bank.to(torch.float32)
        test_patch = patches[arange, max_pos]  # (B, D)
        _, nn_index = self.nearest(test_patch, 1)
        matched = bank[nn_index[:, 0]]  # (B, D): m*
        _, support = self.nearest(matched, k)  # (B, k): the matched row and its k-1 neighbours
        support_feats = bank[support]  # (B, k, D)
        diff = (test_patch.unsqueeze(1) - support_feats).pow(2).sum(-1).clamp_min(0).sqrt()  # (B, k)
        weight = 1.0 - torch.softmax(diff, dim=1)[:, 0]
        return weight * score
