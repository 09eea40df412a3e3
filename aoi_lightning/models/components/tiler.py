"""Tiling of large images: overlapping tiles out, blended anomaly maps back in.

The grid of an (H, W) image is the product of one start list per axis: tiles of `tile_size` at a stride of
`tile_size - overlap`, the last tile moved back so that it ends flush with the border (the grid always covers
the whole image and no tile reaches outside it; the last two tiles may then overlap by more than `overlap`).

Stitching is a weighted average. Each tile's map is weighted by a separable trapezoid ramp (`ramp_weights`):
1 in the tile's interior, falling linearly over the `overlap` pixels next to each of its edges, never zero.
In an overlap the two tiles are thus cross-faded (no visible seam, and each tile's border pixels, where its
features saw zero padding, count least); where one tile covers a pixel alone its value is taken as is. Because
the weights are separable and the grid is a product of two axes, the normaliser (the sum of the weights) is
separable too, so the normalised weights are two small 1-D tables, computed once per image size in float64.

Tiles and stitching are plain slices, multiplications and zero pads with constant sizes, so the tiled
forward traces to an ONNX graph with a static tile grid and a dynamic batch axis.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: Smallest tile: the feature maps of the deepest default layer (stride 16) must keep a few positions.
MIN_TILE_SIZE = 32


def tile_starts(size: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride `tile_size - overlap`, the last tile flush with the border.

    Raises:
        ValueError: the axis is shorter than a tile.
    """
    if size < tile_size:
        raise ValueError(
            f"image side {size} is smaller than model tile_size {tile_size}: set data.image_size >= tile_size "
            "(or a smaller model.init_args.tile_size)"
        )
    stride = tile_size - overlap
    count = math.ceil((size - tile_size) / stride) + 1
    return [min(i * stride, size - tile_size) for i in range(count)]


def ramp_weights(tile_size: int, overlap: int) -> torch.Tensor:
    """(tile_size,) float64 trapezoid: min(1, (u + 0.5) / overlap, (tile_size - u - 0.5) / overlap); all ones
    without overlap. Strictly positive, so that every pixel of the image has a defined weighted average."""
    u = torch.arange(tile_size, dtype=torch.float64)
    if overlap <= 0:
        return torch.ones(tile_size, dtype=torch.float64)
    edge = torch.minimum(u + 0.5, tile_size - u - 0.5) / overlap
    return edge.clamp(max=1.0)


def normalized_axis_weights(size: int, tile_size: int, overlap: int) -> torch.Tensor:
    """(n, tile_size) float64 weights of the n tiles along one axis, divided by their sum at each pixel, so
    that along the axis the weights covering any pixel sum to exactly one."""
    starts = tile_starts(size, tile_size, overlap)
    ramp = ramp_weights(tile_size, overlap)
    total = torch.zeros(size, dtype=torch.float64)
    for s in starts:
        total[s : s + tile_size] += ramp
    return torch.stack([ramp / total[s : s + tile_size] for s in starts])


class TileGrid(NamedTuple):
    """Tile grid of one image size: start offsets per axis (row-major tile order) and the image size."""

    ys: tuple[int, ...]
    xs: tuple[int, ...]
    height: int
    width: int

    @property
    def num_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of tiles."""
        return len(self.ys), len(self.xs)


class Tiler:
    """Splits (B, C, H, W) images into overlapping (B * T, C, t, t) tiles and stitches (B * T, 1, t, t) tile maps
    back into (B, 1, H, W) maps. Tile k of image b is row `b * T + k`; tiles are numbered row-major.

    Args:
        tile_size: side t of the square tiles, in pixels of the model input (>= 32).
        overlap: pixels shared by neighbouring tiles (0 <= overlap < tile_size); also the width of the blending ramp.
    """

    def __init__(self, tile_size: int, overlap: int = 0) -> None:
        if isinstance(tile_size, bool) or int(tile_size) != tile_size or tile_size < MIN_TILE_SIZE:
            raise ValueError(f"tile_size must be an integer >= {MIN_TILE_SIZE}, got {tile_size!r}")
        if isinstance(overlap, bool) or int(overlap) != overlap or not 0 <= overlap < tile_size:
            raise ValueError(f"tile_overlap must be an integer in [0, tile_size={tile_size}), got {overlap!r}")
        self.tile_size = int(tile_size)
        self.overlap = int(overlap)
        self._weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"Tiler(tile_size={self.tile_size}, overlap={self.overlap})"

    def grid(self, height: int, width: int) -> TileGrid:
        """The tile grid of an (H, W) image."""
        h, w = int(height), int(width)
        return TileGrid(
            tuple(tile_starts(h, self.tile_size, self.overlap)),
            tuple(tile_starts(w, self.tile_size, self.overlap)),
            h,
            w,
        )

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        """Tiles per image of `image_size` (H, W)."""
        return self.grid(*image_size).num_tiles

    def tile(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tiles (B * T, C, t, t)."""
        # int(): while tracing for ONNX the sizes are tensors; the grid must become constants of the graph
        grid = self.grid(int(images.shape[-2]), int(images.shape[-1]))
        t = self.tile_size
        tiles = torch.stack([images[:, :, y : y + t, x : x + t] for y in grid.ys for x in grid.xs], dim=1)
        return tiles.reshape(-1, images.shape[1], t, t)

    def axis_weights(
        self, grid: TileGrid, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised blending weights of the grid: rows (ny, t) and columns (nx, t), cached per size."""
        key = (grid.height, grid.width, str(device), dtype)
        if key not in self._weights:
            self._weights[key] = (
                normalized_axis_weights(grid.height, self.tile_size, self.overlap).to(device, dtype),
                normalized_axis_weights(grid.width, self.tile_size, self.overlap).to(device, dtype),
            )
        return self._weights[key]

    def untile(self, tile_maps: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Tile maps (B * T, 1, t, t) -> (B, 1, H, W) weighted average of the overlapping tiles.

        Overlap-add one axis at a time: each tile row is stitched across (zero pads to the image width, summed),
        then the rows are stitched down; the cost is linear in the number of tiles and pixels.
        """
        grid = self.grid(*image_size)
        ny, nx = grid.shape
        t = self.tile_size
        wy, wx = self.axis_weights(grid, tile_maps.device, tile_maps.dtype)
        maps = tile_maps.reshape(-1, ny, nx, t, t)
        maps = maps * wy.reshape(1, ny, 1, t, 1) * wx.reshape(1, 1, nx, 1, t)
        rows = None
        for j, x in enumerate(grid.xs):
            part = F.pad(maps[:, :, j], (x, grid.width - x - t))  # (B, ny, t, W)
            rows = part if rows is None else rows + part
        out = None
        for i, y in enumerate(grid.ys):
            part = F.pad(rows[:, i], (0, 0, y, grid.height - y - t))  # (B, H, W)
            out = part if out is None else out + part
        return out.unsqueeze(1)
