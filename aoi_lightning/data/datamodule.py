"""LightningDataModules: MVTec AD layout (with the built-in synthetic set as default) and plain folders."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from aoi_lightning.data.batches import collate_keeping_originals
from aoi_lightning.data.mvtec import (
    SPLIT_POLICIES,
    AnomalyDataset,
    DataError,
    Sample,
    apply_policy,
    list_images,
    scan_mvtec,
    threshold_holdout,
)
from aoi_lightning.data.preprocess import RESIZE_MODES, Preprocessing, PreprocessingError, image_size_hw

log = logging.getLogger(__name__)

#: Every side of the working size is a multiple of this: the stride-4, 8 and 16 feature grids of the default
#: layers then tile the image exactly (PaDiM's statistics at (h/4) x (w/4), PatchCore's patches at (h/8) x (w/8)).
SIZE_MULTIPLE = 16
#: Smallest side: the stride-16 feature map keeps at least two positions.
MIN_SIDE = 32


def parse_image_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """The working size (h, w) of `data.image_size`: an integer is a square, `[h, w]` a rectangle.

    Each side must be a multiple of 16 and at least 32. How images of other sizes become (h, w) is
    `data.resize` (`MVTecDataModule`).

    Raises:
        DataError: not one or two positive integers (`preprocess.image_size_hw`), or a side that is too small or
            not a multiple of 16.
    """
    try:
        sides = image_size_hw(image_size)
    except PreprocessingError as exc:
        raise DataError(f"data.{exc}") from exc
    for name, side in zip(("height", "width"), sides):
        if side < MIN_SIDE or side % SIZE_MULTIPLE:
            near = max(MIN_SIDE, SIZE_MULTIPLE * round(side / SIZE_MULTIPLE))
            raise DataError(
                f"data.image_size {name} {side} must be a multiple of {SIZE_MULTIPLE} and >= {MIN_SIDE} "
                f"(e.g. {near}), got {list(sides)}"
            )
    return int(sides[0]), int(sides[1])


class MVTecDataModule(pl.LightningDataModule):
    """MVTec AD style data: `<root>/<category>/train/good`, `test/<type>`, `ground_truth/<type>/<stem><suffix>.*`.

    Args:
        root: data root; None uses the built-in synthetic inspection set (generated on demand into the cache,
            `$AOI_CACHE_DIR` or `~/.cache/aoi_lightning`).
        category: category folder under root.
        image_size: working size of the models: an integer (square) or `[h, w]`; each side a multiple of 16,
            >= 32. Pick (h, w) with the aspect ratio of the parts (e.g. `[96, 320]` for strips photographed at
            about 1:3.3).
        resize: how an image becomes (h, w), in training and inference alike (`preprocess.Preprocessing`):
            `stretch` (default: scaled to exactly (h, w), aspect ratio not kept) or `fit_pad` (aspect ratio kept,
            centred, padded by repeating its edge pixels; for inputs whose aspect ratio varies or differs from (h, w)).
        mask_suffix: suffix of mask file stems.
        val_split: `test_half` (seeded half of each test defect type; test metrics on the other half),
            `same_as_test` (validation = test; optimistic), `calibration` (held-out good training images;
            good-only calibration) or `none`.
        val_fraction: fraction of each test defect type used for validation with `test_half`.
        calibration_fraction: fraction of the good training images held out with `calibration`, and for the
            thresholds when the validation split has no good image (`mvtec.threshold_holdout`).
        seed: seed of the splits.
        train_batch_size: batch size of the fit pass.
        eval_batch_size: batch size of validation, test and predict.
        num_workers: DataLoader worker processes (0: batches are made in this process). Workers are forked
            copies of it: every memory page the model then writes is copied once per worker, which made a PaDiM
            fit on transistor slower (29.4 s with 2 workers against 25.3 s with none and 2 decoding threads;
            docs/performance.md). Worth trying where decoding dominates (very large images, many cores).
        decode_threads: threads that decode and resize the images of a batch, and the next batch ahead while the
            model runs (`AnomalyDataset`); 0 decodes one image after the other.
        predict_dir: folder of images for `aoi predict` (default: the test set).
    """

    def __init__(
        self,
        root: str | None = None,
        category: str = "synthetic",
        image_size: int | tuple[int, int] = 256,
        resize: str = "stretch",
        mask_suffix: str = "_mask",
        val_split: str = "test_half",
        val_fraction: float = 0.5,
        calibration_fraction: float = 0.2,
        seed: int = 0,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        decode_threads: int = 2,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__()
        if val_split not in SPLIT_POLICIES:
            raise DataError(f"data.val_split: {val_split!r} is not one of {', '.join(SPLIT_POLICIES)}")
        for key, value in (("num_workers", num_workers), ("decode_threads", decode_threads)):
            if int(value) < 0:
                raise DataError(f"data.{key} must be >= 0, got {value}")
        if resize not in RESIZE_MODES:
            raise DataError(f"data.resize {resize!r} is not supported (supported: {', '.join(RESIZE_MODES)})")
        self.root = root
        self.category = category
        self.image_size = parse_image_size(image_size)
        self.resize = resize
        self.mask_suffix = mask_suffix
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.calibration_fraction = calibration_fraction
        self.seed = seed
        self.train_batch_size = train_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.decode_threads = decode_threads
        self.predict_dir = predict_dir
        #: predict items also carry the decoded original image (set by a prediction writer that draws overlays)
        self.keep_originals = False
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []
        #: good training images held out of the fit for the thresholds (`mvtec.threshold_holdout`)
        self.holdout_samples: list[Sample] = []

    @property
    def preprocessing(self) -> Preprocessing:
        """How every image of this data module becomes a model input (`image_size`, `resize`)."""
        return Preprocessing.from_image_size(self.image_size, resize=self.resize)

    @property
    def data_root(self) -> Path:
        if self.root is None:
            from aoi_lightning.data.synthetic import ensure_synthetic

            return Path(ensure_synthetic(category=self.category))
        return Path(self.root).expanduser().resolve()

    def prepare_data(self) -> None:
        _ = self.data_root  # generates the synthetic set once, on rank zero

    def setup(self, stage: str | None = None) -> None:
        if self.train_samples:
            return
        train, test = scan_mvtec(self.data_root, self.category, self.mask_suffix)
        self.train_samples, self.val_samples, self.test_samples = apply_policy(
            train, test, self.val_split, self.val_fraction, self.calibration_fraction, self.seed
        )
        self.train_samples, self.holdout_samples = threshold_holdout(
            self.train_samples, self.val_samples, self.val_split, self.calibration_fraction, self.seed
        )
        if self.holdout_samples:
            log.warning(
                "no good image in the validation split: %d of the %d good training images are held out of the fit "
                "to set the thresholds on (data.calibration_fraction); thresholds from the fitted images would "
                "reject unseen good parts",
                len(self.holdout_samples),
                len(self.holdout_samples) + len(self.train_samples),
            )

    def _loader(
        self, samples: list[Sample], batch_size: int, shard: bool = True, keep_originals: bool = False
    ) -> DataLoader:
        """A loader in data order; under DDP (`shard`) each rank reads its own contiguous, unpadded shard. With
        `keep_originals` the batches also hold the decoded originals (a list, `batches.ORIGINAL_KEY`)."""
        dataset = AnomalyDataset(samples, self.preprocessing, keep_originals, self.decode_threads)
        sampler = None
        trainer = self.trainer
        if shard and trainer is not None and trainer.world_size > 1:
            from aoi_lightning.distributed import ShardSampler

            sampler = ShardSampler(dataset, trainer.world_size, trainer.global_rank)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            collate_fn=collate_keeping_originals if keep_originals else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples, self.train_batch_size)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_samples, self.eval_batch_size) if self.val_samples else []

    def test_dataloader(self, shard: bool = True, keep_originals: bool = False) -> DataLoader:
        """The test images (under DDP this rank's shard; `shard=False`: all of them, e.g. for a check on one rank;
        `keep_originals`: with the decoded originals)."""
        if not self.test_samples:
            raise DataError(f"data: no test images under {self.data_root / self.category / 'test'}")
        return self._loader(self.test_samples, self.eval_batch_size, shard=shard, keep_originals=keep_originals)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dir:
            folder = Path(self.predict_dir).expanduser()
            if not folder.is_dir():
                raise DataError(f"data.predict_dir: folder not found: {folder}")
            samples = [Sample(str(p), -1, "unknown", None, "predict") for p in list_images(folder, recursive=True)]
            return self._loader(samples, self.eval_batch_size, keep_originals=self.keep_originals)
        return self.test_dataloader(keep_originals=self.keep_originals)

    def train_eval_dataloader(self) -> DataLoader:
        """The training images for scoring (preds_train.jsonl)."""
        return self._loader(self.train_samples, self.eval_batch_size, shard=False)

    def holdout_dataloader(self) -> DataLoader | None:
        """The good training images held out of the fit for the thresholds; None when there are none."""
        return self._loader(self.holdout_samples, self.eval_batch_size, shard=False) if self.holdout_samples else None

    def summary(self) -> dict:
        """Data facts for meta.json."""
        return {
            "root": str(self.data_root),
            "category": self.category,
            "image_size": list(self.image_size),
            "resize": self.resize,
            "val_split": self.val_split,
            "num_train": len(self.train_samples),
            "num_holdout": len(self.holdout_samples),
            "num_val": len(self.val_samples),
            "num_test": len(self.test_samples),
        }
