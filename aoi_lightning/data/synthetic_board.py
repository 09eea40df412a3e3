"""Large synthetic circuit boards with small defects, in MVTec AD layout: the data of tiled inspection.

One board design per seed (the product): a green solder mask over a cross-hatched copper pour (pitch 4 px),
fine-pitch chips with leads, passives, BGA pad fields, vias, traces with clearances and silkscreen. Every
image is that board as a registered capture (the station aligns each board on its fiducials, so there is no
shift) with the variation of a real line: +-3 % brightness with smooth shading and sensor noise. Defective
test images carry one small `smear`: a `defect_size` square of the pour, on the 4 px grid, where the hatch is
wiped to its own average colour.

The smear carries no signal below the hatch frequency: each 4x4 block it covers keeps its mean colour exactly.
A model that sees the board shrunk by 4 (or 8) with area averaging (cv2 INTER_AREA, as `resize_image` does)
sees it only through rounding and noise, i.e. not at all; at full resolution the missing texture is obvious.
This is the case tiled inspection exists for.

Layout written by :func:`generate_board_mvtec`::

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

__all__ = ["BOARD_DEFECT", "Board", "generate_board_mvtec"]

BOARD_DEFECT = "smear"
_PITCH = 4  # hatch period (px): the pour averages to a flat colour in any 4x4 block
_BLOCK = 4  # the smear lies on this grid: it keeps the means of all aligned 4x4 blocks (so of 8x8, 16x16 ...)
_CELL = 256  # the design is laid out in cells of this side

_MASK = np.array((28.0, 92.0, 52.0), np.float32)  # solder mask over bare laminate
_POUR = np.array((64.0, 140.0, 80.0), np.float32)  # solder mask over copper (hatch lines)
_TRACE = np.array((50.0, 128.0, 70.0), np.float32)
_COPPER = np.array((196.0, 146.0, 86.0), np.float32)
_TIN = np.array((200.0, 196.0, 176.0), np.float32)
_LEAD = np.array((170.0, 172.0, 178.0), np.float32)
_BODY = np.array((46.0, 46.0, 52.0), np.float32)
_CERAMIC = np.array((150.0, 124.0, 90.0), np.float32)
_HOLE = np.array((12.0, 14.0, 12.0), np.float32)
_SILK = np.array((210.0, 212.0, 200.0), np.float32)


class _Design:
    """The board of one seed, (size, size): colours (float32 RGB) and where the pour is."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.side = side = size
        yy, xx = np.mgrid[0:side, 0:side]
        hatch = ((xx % _PITCH) < 2) | ((yy % _PITCH) < 2)  # cross-hatch: 3/4 of every 4x4 block is copper
        self.keepout = np.zeros((side, side), np.uint8)  # 1: no pour (components, traces, their clearance)
        self.layer = np.zeros((side, side, 3), np.float32)  # component colours where `paint` is set
        self.paint = np.zeros((side, side), np.float32)
        for _ in range(max(4, (side // _CELL) ** 2)):  # traces first: parts are placed over them
            self._trace(rng)
        cells = max(1, side // _CELL)
        for cy in range(cells):
            for cx in range(cells):
                self._cell(rng, cx * _CELL + 8, cy * _CELL + 8, _CELL - 16)
        pour = self.keepout == 0
        base = np.where((pour & hatch)[..., None], _POUR, _MASK).astype(np.float32)
        texture = cv2.GaussianBlur(rng.standard_normal((side, side)).astype(np.float32), (0, 0), 6.0)
        base += 3.0 * texture[..., None]
        paint = self.paint[..., None]
        self.clean = base * (1.0 - paint) + self.layer * paint
        self.pour = pour

    # -- drawing helpers ------------------------------------------------------------------------------------
    def _fill_rect(self, x0: int, y0: int, x1: int, y1: int, color: np.ndarray, clearance: int = 0) -> None:
        cv2.rectangle(self.paint, (x0, y0), (x1 - 1, y1 - 1), 1.0, -1)
        cv2.rectangle(self.layer, (x0, y0), (x1 - 1, y1 - 1), tuple(float(c) for c in color), -1)
        cv2.rectangle(self.keepout, (x0 - clearance, y0 - clearance), (x1 - 1 + clearance, y1 - 1 + clearance), 1, -1)

    def _circle(self, x: int, y: int, r: int, color: np.ndarray, clearance: int = 0) -> None:
        cv2.circle(self.paint, (x, y), r, 1.0, -1, cv2.LINE_AA)
        cv2.circle(self.layer, (x, y), r, tuple(float(c) for c in color), -1, cv2.LINE_AA)
        cv2.circle(self.keepout, (x, y), r + clearance, 1, -1)

    def _outline(self, x0: int, y0: int, x1: int, y1: int) -> None:
        cv2.rectangle(self.paint, (x0, y0), (x1, y1), 1.0, 2)
        cv2.rectangle(self.layer, (x0, y0), (x1, y1), tuple(float(c) for c in _SILK), 2)
        cv2.rectangle(self.keepout, (x0 - 3, y0 - 3), (x1 + 3, y1 + 3), 1, 8)

    def _label(self, text: str, x: int, y: int) -> None:
        canvas = np.zeros(self.paint.shape, np.uint8)
        cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 2, cv2.LINE_AA)
        alpha = canvas.astype(np.float32) / 255.0
        self.layer[:] = self.layer * (1 - alpha[..., None]) + _SILK * alpha[..., None]
        self.paint[:] = np.maximum(self.paint, alpha)
        self.keepout |= cv2.dilate((canvas > 0).astype(np.uint8), np.ones((9, 9), np.uint8))

    # -- parts ------------------------------------------------------------------------------------------------
    def _cell(self, rng: np.random.Generator, x0: int, y0: int, span: int) -> None:
        kind = rng.choice(["qfp", "passives", "bga", "pour"], p=[0.3, 0.3, 0.15, 0.25])
        if span < 96:
            kind = "pour"
        if kind == "qfp":
            self._qfp(rng, x0, y0, span)
        elif kind == "passives":
            self._passives(rng, x0, y0, span)
        elif kind == "bga":
            self._bga(rng, x0, y0, span)
        for _ in range(int(rng.integers(2, 6))):  # vias in any cell
            x, y = int(x0 + rng.integers(8, span - 8)), int(y0 + rng.integers(8, span - 8))
            self._circle(x, y, 6, _COPPER, clearance=4)
            self._circle(x, y, 3, _HOLE)

    def _qfp(self, rng: np.random.Generator, x0: int, y0: int, span: int) -> None:
        body = int(rng.integers(span // 3, span // 2))
        bx, by = x0 + (span - body) // 2, y0 + (span - body) // 2
        pitch, lead = 8, 18
        count = (body - 16) // pitch
        for k in range(count):
            p = 8 + k * pitch
            self._fill_rect(bx + p, by - lead, bx + p + 4, by, _LEAD, clearance=3)
            self._fill_rect(bx + p, by + body, bx + p + 4, by + body + lead, _LEAD, clearance=3)
            self._fill_rect(bx - lead, by + p, bx, by + p + 4, _LEAD, clearance=3)
            self._fill_rect(bx + body, by + p, bx + body + lead, by + p + 4, _LEAD, clearance=3)
        self._fill_rect(bx, by, bx + body, by + body, _BODY, clearance=4)
        self._circle(bx + 12, by + 12, 5, _BODY * 0.7)
        self._outline(bx - lead - 6, by - lead - 6, bx + body + lead + 6, by + body + lead + 6)
        self._label(f"U{int(rng.integers(1, 99))}", bx, by - lead - 12)

    def _passives(self, rng: np.random.Generator, x0: int, y0: int, span: int) -> None:
        rows = int(rng.integers(2, 5))
        for r in range(rows):
            y = y0 + 20 + r * (span - 40) // rows
            for c in range(int(rng.integers(2, 6))):
                x = x0 + 16 + c * 44
                if x + 40 > x0 + span:
                    break
                self._fill_rect(x, y, x + 10, y + 14, _TIN, clearance=5)
                self._fill_rect(x + 10, y + 1, x + 26, y + 13, _CERAMIC if (r + c) % 2 else _BODY, clearance=5)
                self._fill_rect(x + 26, y, x + 36, y + 14, _TIN, clearance=5)

    def _bga(self, rng: np.random.Generator, x0: int, y0: int, span: int) -> None:
        n = int(rng.integers(4, 8))
        pitch = (span - 40) // n
        for i in range(n):
            for j in range(n):
                self._circle(x0 + 20 + j * pitch + pitch // 2, y0 + 20 + i * pitch + pitch // 2, 5, _TIN, clearance=4)
        self._outline(x0 + 14, y0 + 14, x0 + span - 14, y0 + span - 14)

    def _trace(self, rng: np.random.Generator) -> None:
        pts = [(int(rng.integers(0, self.side)), int(rng.integers(0, self.side)))]
        for _ in range(int(rng.integers(2, 5))):
            x, y = pts[-1]
            if rng.random() < 0.5:
                pts.append((int(rng.integers(0, self.side)), y))
            else:
                pts.append((x, int(rng.integers(0, self.side))))
        poly = np.array(pts, np.int32)
        cv2.polylines(self.paint, [poly], False, 1.0, 6)
        cv2.polylines(self.layer, [poly], False, tuple(float(c) for c in _TRACE), 6)
        cv2.polylines(self.keepout, [poly], False, 1, 14)


class _Capture:
    """Per-image variation: gain with smooth shading, sensor noise."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        low = rng.standard_normal((4, 4)).astype(np.float32)
        shading = 1.0 + 0.02 * cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
        self.gain = (shading * rng.uniform(0.97, 1.03)).astype(np.float32)[..., None]
        self.noise = rng.normal(0.0, rng.uniform(1.5, 2.5), (size, size, 3)).astype(np.float32)

    def apply(self, canvas: np.ndarray) -> np.ndarray:
        out = canvas * self.gain + self.noise
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _smear(design: _Design, rng: np.random.Generator, defect_size: int) -> np.ndarray:
    """The canvas with one smear on free pour: a square on the `_BLOCK` grid (side rounded up to it) whose pixels
    take the mean colour of their 4x4 block (so every block mean is unchanged)."""
    side = -(-defect_size // _BLOCK) * _BLOCK
    margin = 8
    window = side + 2 * margin
    room = cv2.erode(design.pour.astype(np.uint8), np.ones((window, window), np.uint8))  # anchor: window // 2
    starts = np.arange(margin, design.side - side - margin + 1, _BLOCK)  # grid corners inside the image
    centre = starts - margin + window // 2
    ys, xs = np.nonzero(room[np.ix_(centre, centre)])
    if len(ys) == 0:
        raise RuntimeError("the board design has no free pour for a defect; use another seed or a larger image_size")
    k = int(rng.integers(len(ys)))
    y0, x0 = int(starts[ys[k]]), int(starts[xs[k]])
    out = design.clean.copy()
    region = out[y0 : y0 + side, x0 : x0 + side]
    blocks = region.reshape(side // _PITCH, _PITCH, side // _PITCH, _PITCH, 3).mean(axis=(1, 3), keepdims=True)
    region[:] = np.broadcast_to(blocks, (side // _PITCH, _PITCH, side // _PITCH, _PITCH, 3)).reshape(side, side, 3)
    return out


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


def _write_png(path: Path, image: np.ndarray) -> None:
    img = image[..., ::-1] if image.ndim == 3 else image
    if not cv2.imwrite(str(path), np.ascontiguousarray(img)):  # pragma: no cover
        raise OSError(f"cannot write {path}")


def write_mvtec_category(base: Path, defect: str, train, test_good, test_defect) -> None:
    """Write one MVTec-layout category: `train/good/NNN.png` from `train`, `test/good/NNN.png` from `test_good`,
    and `test/<defect>/NNN.png` with `ground_truth/<defect>/NNN_mask.png` from the (image, mask) pairs of
    `test_defect` (RGB or grey uint8 arrays)."""
    folders = {
        "train": base / "train" / "good",
        "good": base / "test" / "good",
        "bad": base / "test" / defect,
        "gt": base / "ground_truth" / defect,
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(train):
        _write_png(folders["train"] / f"{i:03d}.png", image)
    for i, image in enumerate(test_good):
        _write_png(folders["good"] / f"{i:03d}.png", image)
    for i, (image, mask) in enumerate(test_defect):
        _write_png(folders["bad"] / f"{i:03d}.png", image)
        _write_png(folders["gt"] / f"{i:03d}_mask.png", mask)


class Board:
    """One board design (`seed`) at `image_size`, and its captures; each capture is drawn from its own seed.

    Args:
        image_size: side of the square images (>= 256).
        seed: the board design and every capture's variation.
    """

    _SPLITS = {"train": 1, "test": 2, "defect": 3}

    def __init__(self, image_size: int = 1024, seed: int = 0) -> None:
        if isinstance(image_size, bool) or int(image_size) != image_size or image_size < _CELL:
            raise ValueError(f"image_size must be an integer >= {_CELL}, got {image_size!r}")
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.design = _Design(self.image_size, _rng(self.seed, 0))

    def good(self, split: str, index: int) -> np.ndarray:
        """Good capture `index` of `split` (`train` or `test`): (size, size, 3) uint8 RGB."""
        cap = _Capture(_rng(self.seed, self._SPLITS[split], index), self.image_size)
        return cap.apply(self.design.clean)

    def defective(self, index: int, defect_size: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Defective capture `index`: the image, the same capture without the smear, and the 0/255 mask of the
        pixels the smear changed (all (size, size[, 3]) uint8)."""
        if not 2 <= defect_size <= self.image_size // 8:
            raise ValueError(f"defect_size must be in [2, image_size / 8], got {defect_size}")
        rng = _rng(self.seed, self._SPLITS["defect"], index)
        cap = _Capture(rng, self.image_size)
        reference = cap.apply(self.design.clean)
        image = cap.apply(_smear(self.design, rng, defect_size))
        return image, reference, np.any(image != reference, axis=2).astype(np.uint8) * 255


def generate_board_mvtec(
    root: str | os.PathLike[str],
    category: str = "board",
    n_train: int = 10,
    n_test_good: int = 4,
    n_test_defect: int = 4,
    image_size: int = 1024,
    defect_size: int = 12,
    seed: int = 0,
) -> Path:
    """Write the large-board data set under `<root>/<category>` (MVTec AD layout, see the module docstring).

    Args:
        root: data set root.
        category: category folder.
        n_train: good training images.
        n_test_good: good test images.
        n_test_defect: test images with one smear each (folder `test/smear`, masks in `ground_truth/smear`).
        image_size: side of the square images (>= 256).
        defect_size: side of the smear square in pixels, rounded up to a multiple of 4.
        seed: board design and all variation; the same arguments give identical files.

    Returns:
        `root` as a Path.
    """
    board = Board(image_size, seed)
    write_mvtec_category(
        Path(root) / category,
        BOARD_DEFECT,
        (board.good("train", i) for i in range(n_train)),
        (board.good("test", i) for i in range(n_test_good)),
        (board.defective(i, defect_size)[::2] for i in range(n_test_defect)),
    )
    return Path(root)
