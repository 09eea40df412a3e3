"""numba kernel of `coreset.greedy_coreset` (imported on first use only: importing this module compiles it, or
loads it from numba's on-disk cache)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, fastmath=True, boundscheck=False, cache=True)
def _squared(x, i, centre):  # pragma: no cover - compiled
    acc = np.float32(0.0)
    for j in range(x.shape[1]):
        diff = x[i, j] - centre[j]
        acc += diff * diff
    return acc


@njit(nogil=True, boundscheck=False, cache=True)
def farthest_first(x, first, selected):  # pragma: no cover - compiled
    """Fill `selected` (k,) with the farthest-first traversal of the rows of x (N, d) float32 from row `first`.

    Each point belongs to the cluster of its nearest selected centre (a linked list per cluster, in `after`)
    with its squared distance `nearest`; each cluster keeps its radius and farthest point. A new centre c can
    only come nearer to the points of a cluster a if |c - a| < 2 r_a (triangle inequality: a point p of a has
    |p - c| >= |c - a| - |p - a| >= r_a >= |p - a| otherwise), so other clusters are not visited. The next centre
    is the farthest point over all clusters, the lowest index among equal distances. Returns the number of
    point-centre distances computed.
    """
    n = x.shape[0]
    k = selected.shape[0]
    nearest = np.empty(n, np.float32)  # squared distance to the nearest centre; -1 for the centres themselves
    after = np.empty(n, np.int64)  # next point of the same cluster, -1 at the end
    head = np.full(k, -1, np.int64)  # first point of each cluster
    radius = np.full(k, -1.0, np.float32)  # squared distance of the farthest point of each cluster
    farthest = np.full(k, -1, np.int64)
    centre = x[first].copy()
    selected[0] = first
    for i in range(n):
        after[i] = i + 1 if i + 1 < n else -1
        if i == first:
            nearest[i] = -1.0
            continue
        d2 = _squared(x, i, centre)
        nearest[i] = d2
        if d2 > radius[0]:
            radius[0] = d2
            farthest[0] = i
    head[0] = 0
    computed = n
    for step in range(1, k):
        source = 0
        for a in range(1, step):
            if radius[a] > radius[source] or (radius[a] == radius[source] and farthest[a] < farthest[source]):
                source = a
        c = farthest[source]
        selected[step] = c
        centre[:] = x[c]
        for a in range(step):
            if a != source:
                if radius[a] < 0.0:  # only centres left in it
                    continue
                # |c - a|^2 >= 4 r_a^2, with a margin for float32 rounding: nobody in cluster a comes nearer
                if _squared(x, selected[a], centre) > 4.004 * radius[a]:
                    continue
            previous = -1
            i = head[a]
            new_radius = np.float32(-1.0)
            new_farthest = -1
            while i != -1:
                following = after[i]
                moves = False
                if i == c:
                    nearest[i] = -1.0
                    moves = True
                elif nearest[i] >= 0.0:
                    d2 = _squared(x, i, centre)
                    computed += 1
                    if d2 < nearest[i]:
                        nearest[i] = d2
                        moves = True
                        if d2 > radius[step] or (d2 == radius[step] and i < farthest[step]):
                            radius[step] = d2
                            farthest[step] = i
                if moves:  # unlink from cluster a, push onto the new cluster
                    if previous == -1:
                        head[a] = following
                    else:
                        after[previous] = following
                    after[i] = head[step]
                    head[step] = i
                else:
                    if nearest[i] > new_radius or (nearest[i] == new_radius and i < new_farthest):
                        new_radius = nearest[i]
                        new_farthest = i
                    previous = i
                i = following
            radius[a] = new_radius
            farthest[a] = new_farthest
    return computed
