"""PatchCore LightningModule."""

from __future__ import annotations

from typing import Literal

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
        search: nearest-neighbour search for inference: `faiss` (through `index`) or `torch` (the export's
            matrix products, exact).
        sigma: Gaussian smoothing of the anomaly map.
        index: index of the `faiss` search: `flat` (exact, default; matrix products in torch, faster than faiss's
            flat index), `ivf_flat` or `hnsw` (faiss, approximate, for large banks). Built when first needed and
            never stored in the checkpoint, so a run can be tested or predicted with another index
            (`--model.init_args.index hnsw`); `aoi run`, which builds the model from the checkpoint alone,
            searches exactly.
        index_params: index parameters, e.g. `{nprobe: 16}` for `ivf_flat` (`nlist`, `nprobe`) or
            `{ef_search: 64}` for `hnsw` (`M`, `ef_construction`, `ef_search`, `build_threads`).
        tile_size: tiling for images much larger than the model input: None (default) feeds the whole image
            (resized to `data.image_size`); an integer cuts the `data.image_size` input into overlapping square
            tiles of this side, runs the model per tile and stitches the maps (weighted average in overlaps).
        tile_overlap: pixels shared by neighbouring tiles; also the width of the blending ramp.
        tile_thresholds: `global` (one image and one pixel threshold) or `per_tile` (each tile position's
            map and score scaled by a gain calibrated on the good training images at the end of the fit).
        tile_batch: tiles of each image per model pass (default: all); bounds the memory of large tile grids.
        fit_embeddings_mb: memory (MiB) for the training images' embeddings kept from the fit pass, so that
            `preds_train.jsonl` is scored without decoding the images and running the backbone again (transistor
            at 256 px: about 135 MB); past it, with tiling, under DDP or with 0, a second pass scores them.
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
        index: str = "flat",
        index_params: dict[str, int] | None = None,
        tile_size: int | None = None,
        tile_overlap: int = 0,
        tile_thresholds: Literal["global", "per_tile"] = "global",
        tile_batch: int | None = None,
        fit_embeddings_mb: int = 1024,
    ) -> None:
        super().__init__(fit_embeddings_mb)
        # the index is a search setting, not part of the fitted model: left out of the checkpoint's hyper-parameters
        # so that `aoi test/predict --ckpt_path` take it from the config or command line, not from the fit
        self.save_hyperparameters(ignore=["index", "index_params"])
        self.model = PatchcoreModel(
            backbone, layers, weights, coreset_ratio, num_neighbors, projection_dim, seed, bank_dtype, search, sigma,
            index, index_params,
            tile_size=tile_size, tile_overlap=tile_overlap, tile_thresholds=tile_thresholds, tile_batch=tile_batch,
        )  # fmt: skip

    def _prepare_fit(self) -> None:
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        size = getattr(dataset, "image_size", None)
        if dataset is not None and size is not None:
            sampler = getattr(loader, "sampler", None)  # under DDP: this rank's shard
            self.model.allocate(len(sampler) if sampler is not None else len(dataset), tuple(size))
