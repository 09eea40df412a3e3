"""Greedy k-center coreset selection on a seeded random projection (PatchCore)."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from aoi_lightning.models.components.jit import PARALLEL_LOCK, LazyKernel, import_kernels, parallel_threads
from aoi_lightning.progress import progress_bar

log = logging.getLogger(__name__)
#: Centres selected between two progress bar updates.
PROGRESS_STEPS = 256
#: The farthest-first kernel, loaded on first use (`jit.LazyKernel`).
KERNEL = LazyKernel(
    lambda: import_kernels("aoi_lightning.models.components._coreset_kernel").farthest_first, "coreset kernel", log
)


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
    """Indices of a greedy k-center (farthest-first) coreset (Sener and Savarese, 2018; PatchCore, Roth et al.,
    2022, section 3.2).

    Each step picks the point farthest from the current selection and updates every point's distance to its
    nearest selected point. On CPU a numba kernel does it (`_coreset_kernel.farthest_first`): distance, update
    and farthest point in one parallel pass over the points (1.9x faster than the PyTorch loop for transistor's
    218k patches at 1%, 2 cores). Without numba the PyTorch loop runs: one (N, d) matrix-vector product and four
    passes over the distances a step. Both select the same points up to float32 rounding of near-equal
    distances.

    Args:
        features: (N, D) memory bank.
        num_samples: coreset size k (1 <= k <= N).
        projection_dim: dimension of the seeded random projection used for the distances (<= 0: none).
        seed: seed of the projection and of the first centre.

    Returns:
        (k,) int64 indices into `features`, in selection order.

    Raises:
        ValueError: k outside [1, N].
    """
    n = features.shape[0]
    if not 1 <= num_samples <= n:
        raise ValueError(f"num_samples must be in [1, {n}], got {num_samples}")
    if num_samples == n:
        return torch.arange(n)
    x = random_projection(features, projection_dim, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    kernel = _kernel() if x.device.type == "cpu" else None
    with progress_bar(num_samples, "coreset", unit="centre") as bar:
        if kernel is None:
            return _farthest_first_torch(x, first, num_samples, bar)
        points = x.contiguous().numpy()
        nearest = np.full(n, np.inf, np.float32)
        selected = np.empty(num_samples, np.int64)
        centre = first
        try:
            for start in range(0, num_samples, PROGRESS_STEPS):
                stop = min(start + PROGRESS_STEPS, num_samples)
                with PARALLEL_LOCK:  # the first call compiles (or loads numba's cache); errors show here
                    centre = kernel(points, nearest, selected, start, stop, centre, parallel_threads())
                bar.update(stop - start)
        except Exception as exc:  # noqa: BLE001 - a failed compile or threading layer: the PyTorch loop, for good
            KERNEL.give_up(exc)
            bar.reset()
            return _farthest_first_torch(x, first, num_samples, bar)
        return torch.from_numpy(selected)


def _kernel():
    """The compiled farthest-first kernel, or None when numba is missing or the build failed (logged once)."""
    return KERNEL.get()


def _farthest_first_torch(x: torch.Tensor, first: int, num_samples: int, bar=None) -> torch.Tensor:
    """Farthest-first traversal of the rows of x (N, d) from row `first`, one matrix-vector product a step."""
    n = x.shape[0]
    sq = (x * x).sum(dim=1)
    index = first
    min_dist = torch.full((n,), float("inf"), device=x.device)
    selected = torch.empty(num_samples, dtype=torch.int64)
    dist = torch.empty(n, device=x.device)
    for step in range(num_samples):
        selected[step] = index
        centre = x[index]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2
        torch.mv(x, centre, out=dist)
        dist.mul_(-2.0).add_(sq).add_(sq[index])
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist[index] = -1.0  # never pick a selected point again
        index = int(torch.argmax(min_dist))
        if bar is not None and ((step + 1) % PROGRESS_STEPS == 0 or step + 1 == num_samples):
            bar.update((step % PROGRESS_STEPS) + 1)
    return selected
