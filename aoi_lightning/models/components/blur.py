"""Anomaly-map smoothing: separable Gaussian blur (kornia), exportable to ONNX."""

from __future__ import annotations

import kornia
import torch
from torch import nn


def gaussian_kernel_size(sigma: float) -> int:
    """Odd kernel size covering +-4 sigma, as used by PaDiM/PatchCore reference code (sigma 4 -> 33)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


class GaussianBlur(nn.Module):
    """Separable Gaussian smoothing of (B, 1, H, W) maps with reflect padding; sigma <= 0 is the identity."""

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return maps
        size = gaussian_kernel_size(self.sigma)
        # reflect padding needs the map to be larger than half the kernel
        size = min(size, 2 * ((min(maps.shape[-2:]) - 1) // 2) + 1)
        return kornia.filters.gaussian_blur2d(
            maps, (size, size), (self.sigma, self.sigma), border_type="reflect", separable=True
        )
