"""numba kernels of `fused_distance` (imported on first use only: importing this module compiles them, or loads
them from numba's on-disk cache)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic


@intrinsic
def to_float32(typingctx, value):
    """float16 bits (as a 16-bit integer) or float32 -> float32, widened in a register."""
    if isinstance(value, types.Integer) and value.bitwidth == 16:

        def widen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(value), widen
    if value == types.float32:

        def same(context, builder, signature, args):
            return args[0]

        return types.float32(value), same
    return None


@njit(nogil=True, fastmath=True, boundscheck=False, cache=True)
def squared_range(delta, panels, bounds, out, start, stop):  # pragma: no cover - compiled
    # delta (P, B, C) float32; panels (P, T) float16 bits or float32; bounds (K + 1,); out (P, B) float32.
    # Panel k holds rows a..e of W^T from column a on; whitened columns a..e are final after panel k.
    batch = delta.shape[1]
    channels = delta.shape[2]
    white = np.empty((batch, channels), np.float32)
    row32 = np.empty(channels, np.float32)
    for p in range(start, stop):
        white[:, :] = 0.0
        row = panels[p]
        d = delta[p]
        for b in range(batch):
            out[p, b] = 0.0
        offset = 0
        for k in range(bounds.shape[0] - 1):
            a = bounds[k]
            rows = bounds[k + 1] - a
            width = channels - a
            panel = row[offset : offset + rows * width]
            if batch == 1:
                acc = white[0, a:]
                d0 = d[0]
                for i in range(rows):
                    di = d0[a + i]
                    base = i * width
                    for j in range(width):
                        acc[j] += di * to_float32(panel[base + j])
            else:
                for i in range(rows):
                    base = i * width
                    for j in range(width):
                        row32[j] = to_float32(panel[base + j])
                    for b in range(batch):
                        acc = white[b, a:]
                        di = d[b, a + i]
                        for j in range(width):
                            acc[j] += di * row32[j]
            for b in range(batch):
                acc = white[b, a:]
                total = np.float32(0.0)
                for j in range(rows):
                    total += acc[j] * acc[j]
                out[p, b] += total
            offset += rows * width


@njit(nogil=True, parallel=True, cache=True)
def squared(delta, panels, bounds, out, parts):  # pragma: no cover - compiled
    positions = delta.shape[0]
    step = (positions + parts - 1) // parts
    for part in prange(parts):
        squared_range(delta, panels, bounds, out, part * step, min(positions, (part + 1) * step))
