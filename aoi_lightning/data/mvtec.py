"""MVTec AD layout: scanning, validation split policies and the torch Dataset."""

from __future__ import annotations

import logging
import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from aoi_lightning.data.image_io import (  # noqa: F401 - list_images is part of this module's API
    GOOD,
    ImageReadError,
    good_folder,
    is_good,
    is_image_file,
    list_images,
    read_mask,
)
from aoi_lightning.data.preprocess import Preprocessing, as_preprocessing

log = logging.getLogger(__name__)

SPLIT_POLICIES = ("test_half", "same_as_test", "calibration", "none")


class DataError(ValueError):
    """A data root or category that does not fit the MVTec layout; the message names the key and the problem."""


@dataclass(frozen=True)
class Sample:
    """One image of a data set. `label` is 0 good, 1 defective, -1 unknown; `split` is train/val/test."""

    image_path: str
    label: int
    defect_type: str
    mask_path: str | None
    split: str


def masks_by_stem(gt_dir: Path, mask_suffix: str) -> tuple[dict[str, Path], list[Path]]:
    """The masks of a ground-truth folder by image stem, and the image files whose stem lacks `mask_suffix`.

    The folder is listed once (`list_images`) and names are compared literally, so stems holding `[`, `]`, `*`,
    `?`, spaces or any other character match. A mask is `<stem><mask_suffix>.<any image extension>`; where one
    stem has masks of several extensions, the first in sorted order is taken. Empty for a missing folder.
    """
    by_stem: dict[str, Path] = {}
    odd: list[Path] = []
    for mask in list_images(gt_dir) if gt_dir.is_dir() else []:
        if not mask.stem.endswith(mask_suffix):
            odd.append(mask)
        else:
            by_stem.setdefault(mask.stem[: len(mask.stem) - len(mask_suffix)], mask)
    return by_stem, odd


def find_mask(gt_dir: Path, stem: str, mask_suffix: str) -> Path | None:
    """The mask of image `stem`: `<stem><mask_suffix>.<any image extension>` in `gt_dir` (see `masks_by_stem`)."""
    return masks_by_stem(gt_dir, mask_suffix)[0].get(stem)


def scan_mvtec(root: str | Path, category: str, mask_suffix: str = "_mask") -> tuple[list[Sample], list[Sample]]:
    """Train (good) and test samples of `<root>/<category>`; `good` folders are matched in any case (`is_good`).

    Raises:
        DataError: missing root, unknown category (the message lists the available ones), no training images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: folder not found: {root}")
    base = root / category
    if not base.is_dir():
        cats = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        raise DataError(f"data.category: {category!r} not found in {root}; available: {', '.join(cats) or 'none'}")
    train_dir = good_folder(base / "train")
    train = [Sample(str(p), 0, GOOD, None, "train") for p in list_images(train_dir)]
    if not train:
        raise DataError(f"data: no training images in {train_dir} (expected <root>/<category>/train/good/*.png)")
    test: list[Sample] = []
    test_dir = base / "test"
    if test_dir.is_dir():
        for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = GOOD if is_good(sub.name) else sub.name
            masks = {} if defect == GOOD else masks_by_stem(base / "ground_truth" / defect, mask_suffix)[0]
            for path in list_images(sub):
                if defect == GOOD:
                    test.append(Sample(str(path), 0, GOOD, None, "test"))
                else:
                    mask = masks.get(path.stem)
                    test.append(Sample(str(path), 1, defect, str(mask) if mask else None, "test"))
    missing = [s.image_path for s in test if s.label == 1 and s.mask_path is None]
    if missing:
        log.warning(
            "%d defective test images have no mask (excluded from pixel metrics), e.g. %s", len(missing), missing[0]
        )
    return train, test


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split per defect type: `fraction` of each type (rounded down, at least one where the type has
    two or more images) goes to the first list, the rest to the second. Order within lists follows input."""
    chosen: set[str] = set()
    by_type: dict[str, list[Sample]] = {}
    for s in samples:
        by_type.setdefault(s.defect_type, []).append(s)
    rng = random.Random(seed)
    for defect in sorted(by_type):
        items = sorted(by_type[defect], key=lambda s: s.image_path)
        n = len(items)
        k = int(n * fraction)
        if n >= 2:
            k = min(max(k, 1), n - 1)
        for s in rng.sample(items, k):
            chosen.add(s.image_path)
    first = [s for s in samples if s.image_path in chosen]
    second = [s for s in samples if s.image_path not in chosen]
    return first, second


def _with_split(samples: list[Sample], split: str) -> list[Sample]:
    return [Sample(s.image_path, s.label, s.defect_type, s.mask_path, split) for s in samples]


def apply_policy(
    train: list[Sample], test: list[Sample], policy: str, val_fraction: float, calibration_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, val, test) for a split policy. In `test_half` test images are tagged val or test, and the
    returned test list is the whole test folder (tagged), so one pass yields val, test and full-test metrics."""
    if policy not in SPLIT_POLICIES:
        raise DataError(f"data.val_split: {policy!r} is not one of {', '.join(SPLIT_POLICIES)}")
    if policy == "test_half":
        val, rest = stratified_split(test, val_fraction, seed)
        val = _with_split(val, "val")
        keep = {s.image_path for s in val}
        tagged = [
            s if s.image_path not in keep else Sample(s.image_path, s.label, s.defect_type, s.mask_path, "val")
            for s in test
        ]
        return train, val, tagged
    if policy == "same_as_test":
        return train, _with_split(test, "val"), test
    if policy == "calibration":
        held, fit = stratified_split(train, calibration_fraction, seed)
        if not fit:
            raise DataError("data.calibration_fraction leaves no training images")
        return fit, _with_split(held, "val"), test
    return train, [], test


#: fewest good training images a fit keeps when some are held out for the thresholds (PaDiM needs two)
MIN_FIT_IMAGES = 2


def threshold_holdout(
    train: list[Sample], val: list[Sample], policy: str, calibration_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """(fit, held out): good training images held out of the fit to set the thresholds on, when the validation
    split has no good image (`none`; a test folder without good images or without any image).

    Thresholds taken from the images a model was fitted on are biased low: PaDiM's per-position Gaussian and
    PatchCore's memory bank describe exactly those images, so their scores lie far below those of unseen good
    parts (a PaDiM fit on 20 images: 4.3 in-sample against 400-775 on unseen good parts), and such a threshold
    rejects every good part. The held-out images are chosen as with `calibration` (a seeded
    `calibration_fraction`, at least one); none are held out when the fit would keep fewer than
    `MIN_FIT_IMAGES`, or when the validation split has good images (or is `calibration` itself).
    """
    if policy == "calibration" or any(s.label == 0 for s in val):
        return train, []
    held, fit = stratified_split(train, calibration_fraction, seed)
    if not held or len(fit) < MIN_FIT_IMAGES:
        return train, []
    return fit, held


class AnomalyDataset(Dataset):
    """Samples -> dicts of tensors. Unreadable images give an `error` string and a blank image, not an exception.

    Args:
        samples: the images.
        preprocessing: what the model expects (`Preprocessing`), or just its input size (one side, or [h, w]).
        keep_original: items also carry `original_rgb`, the decoded (h', w', 3) uint8 RGB image (None when
            unreadable; collate with `batches.collate_keeping_originals`), e.g. for overlays.
        decode_threads: threads that decode a batch (`__getitems__`, which a DataLoader calls once per batch);
            0 decodes one image after the other. With threads, the next batch of the same size is started before
            a batch is returned (loaders read in data order), so its decoding overlaps the model's work.

    Item keys: image (3, H, W) float in [0, 1] (`Preprocessing.load`), mask (1, H, W) uint8, has_mask, label,
    defect_type, split, image_path, original_size (2,) [h, w], content_box (4,) [top, left, height, width] of
    the image in the model input (`Preprocessing.content_box`), index, error (and `original_rgb`).
    """

    def __init__(
        self,
        samples: list[Sample],
        preprocessing: Preprocessing | int | tuple[int, int],
        keep_original: bool = False,
        decode_threads: int = 0,
    ) -> None:
        if decode_threads < 0:
            raise DataError(f"data.decode_threads must be >= 0, got {decode_threads}")
        self.samples = samples
        self.preprocessing = as_preprocessing(preprocessing)
        self.image_size = self.preprocessing.image_size
        self.keep_original = keep_original
        self.decode_threads = int(decode_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[tuple[int, ...], list[Future]] | None = None  # the batch decoded in advance

    def __getstate__(self) -> dict:  # worker processes (num_workers > 0) make their own threads
        state = dict(self.__dict__)
        state["_pool"] = state["_ahead"] = None
        return state

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """The items of one batch, decoded on `decode_threads` threads; starts decoding the next batch."""
        indices = [int(i) for i in indices]
        if self.decode_threads == 0 or len(indices) == 0:
            return [self[i] for i in indices]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="aoi-decode")
        key = tuple(indices)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            futures = ahead[1]
        else:
            if ahead is not None:  # another order than foreseen (e.g. a new pass): drop what is not started
                for future in ahead[1]:
                    future.cancel()
            futures = [self._pool.submit(self.__getitem__, i) for i in indices]
        following = tuple(range(indices[-1] + 1, min(indices[-1] + 1 + len(indices), len(self))))
        if following and key == tuple(range(indices[0], indices[-1] + 1)):
            self._ahead = (following, [self._pool.submit(self.__getitem__, i) for i in following])
        return [future.result() for future in futures]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        loaded = self.preprocessing.load(s.image_path, keep_original=self.keep_original)
        error = loaded.error
        image = loaded.model_input if not error else self.preprocessing.blank_input()
        has_mask = s.label == 0 or s.mask_path is not None
        mask = np.zeros(self.image_size, dtype=np.uint8)
        if s.mask_path is not None and not error:
            try:
                mask = self.preprocessing.resize_mask(read_mask(s.mask_path), loaded.original_size)
            except ImageReadError as exc:
                log.warning("%s", exc)
                has_mask = False
        item = {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask).unsqueeze(0),
            "has_mask": has_mask and not error,
            "label": s.label,
            "defect_type": s.defect_type,
            "split": s.split,
            "image_path": s.image_path,
            "original_size": torch.tensor(loaded.original_size, dtype=torch.int64),
            "content_box": torch.tensor(self.preprocessing.content_box(loaded.original_size), dtype=torch.int64),
            "index": index,
            "error": error,
        }
        if self.keep_original:
            item["original_rgb"] = loaded.original if not error else None
        return item
