"""numba kernel of `coreset.greedy_coreset` (imported on first use only; compiled on its first call, or loaded
from numba's on-disk cache)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(nogil=True, fastmath=True, boundscheck=False, parallel=True, cache=True)
def farthest_first(x, nearest, selected, start, stop, first, parts):  # pragma: no cover - compiled
    """Steps `start`..`stop` of the farthest-first traversal of the rows of x (N, d) float32: fills
    `selected[start:stop]` beginning with row `first`, updates `nearest` (N,) float32 (squared distance to the
    nearest centre so far, inf at the start; -1 for centres) and returns the next centre.

    Each step is one pass over the points, split into `parts` ranges run in parallel: the squared distance to the
    newest centre, the nearest-centre distance updated in place, and the farthest point of the range; the next
    centre is the farthest of those, the lowest index among equal distances (as `torch.argmax`). Calls over
    consecutive step ranges give the same traversal as one call.
    """
    n, d = x.shape
    best_value = np.empty(parts, np.float32)
    best_index = np.empty(parts, np.int64)
    size = (n + parts - 1) // parts
    centre = np.empty(d, np.float32)
    c = first
    for step in range(start, stop):
        selected[step] = c
        nearest[c] = -1.0
        centre[:] = x[c]
        for part in prange(parts):
            lo = part * size
            hi = min(n, lo + size)
            value = np.float32(-np.inf)
            index = lo
            for i in range(lo, hi):
                acc = np.float32(0.0)
                for j in range(d):
                    diff = x[i, j] - centre[j]
                    acc += diff * diff
                m = nearest[i]
                if acc < m:
                    m = acc
                    nearest[i] = m
                if m > value:
                    value = m
                    index = i
            best_value[part] = value
            best_index[part] = index
        top = 0
        for part in range(1, parts):
            if best_value[part] > best_value[top]:
                top = part
        c = best_index[top]
    return c
