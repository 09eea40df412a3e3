"""Synthetic strips (long, narrow parts such as connector combs) with small defects, in MVTec AD layout.

The data of non-square working sizes. Each image is an (height, width) strip, by default 96 x 320: a band of
contact fingers at a pitch of 2 px (1 px metal, 1 px gap) between two rails, with a solid separator and a
mounting hole every 40 px. Every capture is the same strip with the variation of a real line: +-3 % gain with
smooth shading and sensor noise. Defective test images carry one small `smear`: a `defect_size` square of the
finger band where neighbouring fingers are fused (each pixel pair along the width takes the pair's mean colour).

The smear carries no signal below the finger frequency: each horizontal pair of pixels keeps its mean colour.
Squashing the strip to a square halves its width or more (area or bilinear interpolation, as `resize_image`
does), which averages exactly those pairs: the smear then vanishes. At the strip's own aspect ratio
(`data.image_size: [96, 320]`) the fused fingers are plain to see.

Layout written by :func:`generate_strip_mvtec`::

    <root>/<category>/train/good/000.png ...
    <root>/<category>/test/good/000.png ...
    <root>/<category>/test/smear/000.png ...
    <root>/<category>/ground_truth/smear/000_mask.png ...   (uint8 0/255: the pixels the defect changed)
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from aoi_lightning.data.synthetic_board import _rng, write_mvtec_category

__all__ = ["STRIP_DEFECT", "Strip", "generate_strip_mvtec"]

STRIP_DEFECT = "smear"
_PITCH = 2  # finger period (px) along the width
_PERIOD = 40  # a separator and a mounting hole every this many px
_RAIL = np.array((150.0, 150.0, 156.0), np.float32)
_METAL = np.array((200.0, 176.0, 110.0), np.float32)
_GAP = np.array((54.0, 50.0, 46.0), np.float32)
_BODY = np.array((34.0, 36.0, 40.0), np.float32)


class Strip:
    """The strip design at (height, width) and its captures; each capture is drawn from its own seed.

    Args:
        height: image height in pixels (>= 48).
        width: image width in pixels (>= 2 * height: a strip is long).
        seed: capture variation (the design itself is fixed).
    """

    _SPLITS = {"train": 1, "test": 2, "defect": 3}

    def __init__(self, height: int = 96, width: int = 320, seed: int = 0) -> None:
        if int(height) != height or height < 48 or int(width) != width or width < 2 * height:
            raise ValueError(f"a strip needs height >= 48 and width >= 2 * height, got {height} x {width}")
        self.height, self.width, self.seed = int(height), int(width), int(seed)
        h, w = self.height, self.width
        canvas = np.empty((h, w, 3), np.float32)
        canvas[:] = _BODY
        top, bottom = h // 4, h - h // 4  # the finger band
        xx = np.arange(w)
        canvas[top:bottom] = np.where((xx % _PITCH == 0)[:, None], _METAL, _GAP)
        self.band = np.zeros((h, w), bool)  # where a smear may go: fingers away from separators
        self.band[top + 2 : bottom - 2] = True
        for x0 in range(_PERIOD // 2, w, _PERIOD):
            canvas[top:bottom, x0 - 2 : x0 + 2] = _RAIL
            self.band[:, max(0, x0 - 6) : x0 + 6] = False
            cv2.circle(canvas, (x0, top // 2), max(2, top // 4), tuple(float(c) for c in _GAP), -1)
            cv2.circle(canvas, (x0, (bottom + h) // 2), max(2, top // 4), tuple(float(c) for c in _GAP), -1)
        canvas[top - 3 : top] = _RAIL
        canvas[bottom : bottom + 3] = _RAIL
        self.clean = canvas

    def _capture(self, rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
        h, w = self.height, self.width
        low = rng.standard_normal((2, 6)).astype(np.float32)
        shading = 1.0 + 0.02 * cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
        gain = (shading * rng.uniform(0.97, 1.03))[..., None]
        noise = rng.normal(0.0, rng.uniform(1.5, 2.5), (h, w, 3)).astype(np.float32)
        return np.clip(np.rint(canvas * gain + noise), 0, 255).astype(np.uint8)

    def good(self, split: str, index: int) -> np.ndarray:
        """Good capture `index` of `split` (`train` or `test`): (height, width, 3) uint8 RGB."""
        return self._capture(_rng(self.seed, self._SPLITS[split], index), self.clean)

    def defective(self, index: int, defect_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Defective capture `index`: the image (height, width, 3) uint8 RGB and the 0/255 mask (height, width)
        of the smear, a square of `defect_size` (rounded up to even) on the finger band."""
        if not 2 <= defect_size <= self.height // 4:
            raise ValueError(f"defect_size must be in [2, height / 4], got {defect_size}")
        side = -(-int(defect_size) // _PITCH) * _PITCH
        rng = _rng(self.seed, self._SPLITS["defect"], index)
        room = cv2.erode(self.band.astype(np.uint8), np.ones((side, side), np.uint8), anchor=(0, 0))
        ys, xs = np.nonzero(room[: self.height - side + 1, : self.width - side + 1 : _PITCH])
        k = int(rng.integers(len(ys)))
        y0, x0 = int(ys[k]), int(xs[k]) * _PITCH
        canvas = self.clean.copy()
        region = canvas[y0 : y0 + side, x0 : x0 + side]
        pairs = region.reshape(side, side // _PITCH, _PITCH, 3).mean(axis=2, keepdims=True)
        region[:] = np.broadcast_to(pairs, (side, side // _PITCH, _PITCH, 3)).reshape(side, side, 3)
        mask = np.zeros((self.height, self.width), np.uint8)
        mask[y0 : y0 + side, x0 : x0 + side] = 255
        return self._capture(rng, canvas), mask


def generate_strip_mvtec(
    root: str | os.PathLike[str],
    category: str = "strip",
    n_train: int = 16,
    n_test_good: int = 6,
    n_test_defect: int = 6,
    height: int = 96,
    width: int = 320,
    defect_size: int = 8,
    seed: int = 0,
) -> Path:
    """Write the strip data set under `<root>/<category>` (MVTec AD layout, see the module docstring).

    Args:
        root: data set root.
        category: category folder.
        n_train: good training images.
        n_test_good: good test images.
        n_test_defect: test images with one smear each (folder `test/smear`, masks in `ground_truth/smear`).
        height, width: image size in pixels.
        defect_size: side of the smear square in pixels, rounded up to even.
        seed: all variation; the same arguments give identical files.

    Returns:
        `root` as a Path.
    """
    strip = Strip(height, width, seed)
    write_mvtec_category(
        Path(root) / category,
        STRIP_DEFECT,
        (strip.good("train", i) for i in range(n_train)),
        (strip.good("test", i) for i in range(n_test_good)),
        (strip.defective(i, defect_size) for i in range(n_test_defect)),
    )
    return Path(root)
