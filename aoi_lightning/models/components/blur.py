"""Anomaly-map smoothing: Gaussian blur with reflect borders, as two matrix products (exportable to ONNX).

Blurring an (H, W) map with a separable kernel and reflect padding is `Gv @ X @ Gh^T`, where Gv (H, H) and
Gh (W, W) are banded matrices holding the 1-D kernel (from kornia) with the reflection folded in. On CPU this
is about 100x faster at batch 1 than a 33x33 (or 2 x 33x1) convolution in PyTorch, equal to it in value, and
it exports to two ONNX MatMul nodes.
"""

from __future__ import annotations

import kornia
import torch
from torch import nn


def gaussian_kernel_size(sigma: float) -> int:
    """Odd kernel size covering +-4 sigma, as used by PaDiM/PatchCore reference code (sigma 4 -> 33)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def reflect_index(index: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices outside [0, n) back inside by mirror reflection without repeating the edge (numpy 'reflect')."""
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= n, period - index, index)


def blur_matrix(n: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n) matrix M with M @ x = 1-D Gaussian blur of x (length n) with reflect borders."""
    size = gaussian_kernel_size(sigma)
    kernel = kornia.filters.get_gaussian_kernel1d(size, sigma).flatten().to(torch.float64)
    radius = size // 2
    rows = torch.arange(n).unsqueeze(1).expand(n, size)
    cols = reflect_index(rows + torch.arange(size).unsqueeze(0) - radius, n)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    matrix.index_put_((rows.reshape(-1), cols.reshape(-1)), kernel.repeat(n), accumulate=True)
    return matrix.to(dtype)


class GaussianBlur(nn.Module):
    """Gaussian smoothing of (B, 1, H, W) maps with reflect borders; sigma <= 0 is the identity."""

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _matrices(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h, w, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (
                blur_matrix(h, self.sigma, dtype).to(device),
                blur_matrix(w, self.sigma, dtype).to(device).T.contiguous(),
            )
        return self._cache[key]

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return maps
        # int(): while tracing for ONNX the sizes are tensors; the matrices must become constants of the graph
        rows, cols_t = self._matrices(int(maps.shape[-2]), int(maps.shape[-1]), maps.device, maps.dtype)
        return torch.matmul(torch.matmul(rows, maps), cols_t)
