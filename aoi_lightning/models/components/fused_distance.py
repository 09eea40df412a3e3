"""Fused CPU kernel for PaDiM's Mahalanobis distances at small batches (numba).

At batch 1 the distance is one small matrix-vector product per position, and the cost is reading the whitening
panels (about 160 MB in float16 for 4096 positions and 176 channels). PyTorch has no float16-weight
matrix-vector product on CPU: it must first widen each block of panels to float32 in memory and then run a
batched product over the copy, which reads and writes the data three times. This kernel widens each value in a
register as it multiplies (one read of the panels), walks the panels in the `GaussianStats` layout directly and
splits the positions over the threads PyTorch is set to use. It is compiled once per machine by numba (cached on
disk) and used for CPU inference at small batches (`MAX_BATCH`); larger batches, GPUs, gradients and ONNX export use
the PyTorch code, which is compute-bound there and faster.

Set `AOI_FUSED_DISTANCE=0` to always use the PyTorch code.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from aoi_lightning.models.components.jit import PARALLEL_LOCK, LazyKernel, import_kernels, parallel_threads

log = logging.getLogger(__name__)

#: Largest batch that takes the fused kernel, per storage dtype. Measured on a 2-core CPU at 4096 positions and
#: 176 channels with a channels-last embedding (distances alone, ms, PyTorch / fused): float16 batch 1 15.3 / 4.7,
#: batch 4 21.4 / 11.6, batch 8 29.1 / 21.9, batch 16 47.5 / 53.2, batch 32 75.4 / 103.9; float32 batch 1
#: 14.0 / 8.5, batch 2 16.8 / 16.2, batch 4 18.4 / 22.0.
MAX_BATCH = {torch.float16: 8, torch.float32: 1}
ENV_SWITCH = "AOI_FUSED_DISTANCE"

#: The kernel, loaded on first use (`jit.LazyKernel`).
KERNEL = LazyKernel(
    lambda: import_kernels("aoi_lightning.models.components._fused_kernels").squared,
    "fused PaDiM distance kernel",
    log,
)


def enabled() -> bool:
    """False when switched off by `AOI_FUSED_DISTANCE=0` or after the kernel failed to build or run once."""
    switch = os.environ.get(ENV_SWITCH, "1").strip().lower()
    return switch not in ("0", "false", "no", "off") and KERNEL.error is None


def kernel():
    """The compiled kernel, built on first use; None when numba is missing or the build failed (logged once)."""
    return KERNEL.get()


def applicable(embedding: torch.Tensor, panels: torch.Tensor) -> bool:
    """Whether `squared_distances` may be used for this call."""
    return (
        embedding.device.type == "cpu"
        and panels.device.type == "cpu"
        and 0 < embedding.shape[0] <= MAX_BATCH.get(panels.dtype, 0)
        and not embedding.requires_grad
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and enabled()
    )


def squared_distances(delta: torch.Tensor, panels: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor | None:
    """Squared Mahalanobis distances (P, B) from deviations `delta` (P, B, C) and the `GaussianStats` panels, or
    None when the kernel cannot run (the caller then uses PyTorch)."""
    run = kernel()
    if run is None:
        return None
    delta = delta.to(torch.float32).contiguous()
    panels = panels.contiguous()
    stored = panels.view(torch.int16).numpy().view(np.uint16) if panels.dtype == torch.float16 else panels.numpy()
    out = torch.empty(delta.shape[:2], dtype=torch.float32)
    try:
        with PARALLEL_LOCK:
            threads = parallel_threads()
            run(delta.numpy(), stored, bounds.to(torch.int64).contiguous().numpy(), out.numpy(), threads)
    except Exception as exc:  # noqa: BLE001 - a failed JIT compile or threading layer: fall back for good
        KERNEL.give_up(exc)
        return None
    return out
