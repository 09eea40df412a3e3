"""Greedy k-center coreset selection on a seeded random projection (PatchCore)."""

from __future__ import annotations

import math

import torch


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Project (N, D) features to (N, dim) with a seeded Gaussian matrix (identity when dim >= D or dim <= 0)."""
    n_dims = features.shape[1]
    if dim <= 0 or dim >= n_dims:
        return features.to(torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    matrix = torch.randn(n_dims, dim, generator=gen) / math.sqrt(dim)
    out = torch.empty(features.shape[0], dim, dtype=torch.float32)
    step = 65536
    for start in range(0, features.shape[0], step):
        out[start : start + step] = features[start : start + step].to(torch.float32) @ matrix.to(features.device)
    return out


def greedy_coreset(features: torch.Tensor, num_samples: int, projection_dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Indices of a greedy k-center (farthest-first) coreset.

    Each step picks the point farthest from the current selection and updates every point's distance to
    its nearest selected point incrementally, so a step costs one (N, d) matrix-vector product.

    Args:
        features: (N, D) memory bank.
        num_samples: coreset size k (1 <= k <= N).
        projection_dim: dimension of the seeded random projection used for the distances (<= 0: none).
        seed: seed of the projection and of the first centre.

    Returns:
        (k,) int64 indices into `features`, in selection order.
    """
    n = features.shape[0]
    if not 1 <= num_samples <= n:
        raise ValueError(f"num_samples must be in [1, {n}], got {num_samples}")
    if num_samples == n:
        return torch.arange(n)
    x = random_projection(features, projection_dim, seed)
    sq = (x * x).sum(dim=1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    index = int(torch.randint(n, (1,), generator=gen))
    min_dist = torch.full((n,), float("inf"))
    selected = torch.empty(num_samples, dtype=torch.int64)
    dist = torch.empty(n)
    for step in range(num_samples):
        selected[step] = index
        centre = x[index]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2
        torch.mv(x, centre, out=dist)
        dist.mul_(-2.0).add_(sq).add_(sq[index])
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist[index] = -1.0  # never pick a selected point again
        index = int(torch.argmax(min_dist))
    return selected
