"""Compiled exact nearest-vertex search for the ICP metrics (numba; imported lazily by icp.py).

numba is already installed with the project (librosa needs it), but ``v2m_bench`` must import with
numpy, scipy and h5py alone: :mod:`v2m_bench.icp` imports this module inside a function and falls
back to scipy k-d trees when it is missing. Both searches are exhaustive, so the choice changes
the time, not the result (see :func:`nearest_exact`).

The search, per query point ``x`` with a start vertex ``c``:

1. **Walk** (upper bound). From ``c``, move to the closest candidate of the current vertex in the
   topology's candidate graph while one is strictly closer (the walk of :mod:`v2m_bench.icp`).
   The end vertex's distance ``r`` bounds the nearest distance from above.
2. **Exhaustive check** (exactness). Every reference vertex in the uniform-grid cells that meet
   the box ``[x - r, x + r]`` is measured; the closest wins (lowest vertex id on an exact tie).
   The ball of radius ``r`` around ``x`` lies in that box, so no closer vertex is missed, however
   far the walk stopped from the true answer (folded lips and eyelids included).

Distances are computed in float64 from the float32 coordinates, as scipy's k-d tree does from
the same values, so both searches agree except on exact ties.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["build_grid", "nearest_exact"]


def build_grid(q32: np.ndarray, cell: float):
    """Column-grid index of one reference's vertices.

    The two axes of largest extent (for a face: x and y) are cut into square columns of edge
    ``cell``; the vertices of each column are sorted along the third axis (depth), so a search
    visits only the part of a column inside a depth slab.

    Parameters
    ----------
    q32 : ndarray, shape (n, 3), float32
        Vertex positions.
    cell : float
        Column edge length (input units); any positive value gives the same search results.

    Returns
    -------
    axes : ndarray (3,) int64
        The two column axes, then the sorted axis.
    origin : ndarray (2,) float64
        Lower corner of the column grid.
    dims : ndarray (2,) int64
        Columns along each column axis.
    cell : float
        The column edge used (enlarged when the grid would exceed 4 columns per vertex).
    starts : ndarray (dims[0] * dims[1] + 1,) int32
        Offsets of each column's run in ``items``.
    items : ndarray (n,) int32
        Vertex ids, by column, then by depth, then by id.
    coords : ndarray (3, n) float32
        The positions of ``items`` along ``axes`` (column axes, depth), for contiguous scans.
    """
    q = q32.astype(np.float64)
    n = q.shape[0]
    ext = q.max(axis=0) - q.min(axis=0)
    order_axes = np.argsort(-ext, kind="stable")
    axes = np.array([order_axes[0], order_axes[1], order_axes[2]], np.int64)
    a, b = q[:, axes[0]], q[:, axes[1]]
    lo = np.array([a.min(), b.min()])
    span = np.array([a.max(), b.max()]) - lo
    cell = float(cell)
    while np.prod(np.floor(span / cell) + 1) > 4 * max(n, 1):
        cell *= 1.25
    dims = (np.floor(span / cell) + 1).astype(np.int64)
    i0 = np.minimum(np.floor((a - lo[0]) / cell).astype(np.int64), dims[0] - 1)
    i1 = np.minimum(np.floor((b - lo[1]) / cell).astype(np.int64), dims[1] - 1)
    key = i0 * dims[1] + i1
    depth = np.ascontiguousarray(q32[:, axes[2]])
    starts, items = _column_sort(key, depth, int(dims[0] * dims[1]))
    coords = np.ascontiguousarray(q32[items][:, axes].T)
    return axes, lo, dims, cell, starts, items, coords


@njit(nogil=True, cache=True)
def _column_sort(key, depth, ncols):  # pragma: no cover - compiled
    """Counting sort of vertex ids by column, then insertion sort by (depth, id) within each
    column (columns hold a few vertices). Same order as ``np.lexsort((ids, depth, key))``."""
    n = key.shape[0]
    starts = np.zeros(ncols + 1, np.int32)
    for v in range(n):
        starts[key[v] + 1] += 1
    for c in range(ncols):
        starts[c + 1] += starts[c]
    fill = starts[:-1].copy()
    items = np.empty(n, np.int32)
    for v in range(n):  # ascending ids: a column's run starts in id order
        items[fill[key[v]]] = v
        fill[key[v]] += 1
    for c in range(ncols):
        for a in range(starts[c] + 1, starts[c + 1]):
            v = items[a]
            z = depth[v]
            b = a - 1
            while b >= starts[c] and depth[items[b]] > z:  # strict: equal depths keep id order
                items[b + 1] = items[b]
                b -= 1
            items[b + 1] = v
    return starts, items


@njit(nogil=True, cache=True, inline="always")
def _search(x0, x1, x2, c, best, g, origin, dims, cell, starts, items, coords):  # pragma: no cover - compiled
    """Exhaustive check around one point (column frame of reference ``g``): the closest vertex
    within sqrt(best) of it, ``c`` kept on a tie unless a lower id ties."""
    r = np.sqrt(best) * (1.0 + 1e-9) + 1e-9
    h = cell[g]
    o0 = origin[g, 0]
    o1 = origin[g, 1]
    n0 = dims[g, 0]
    n1 = dims[g, 1]
    lo0 = max(int(np.floor((x0 - r - o0) / h)), 0)
    hi0 = min(int(np.floor((x0 + r - o0) / h)), n0 - 1)
    lo1 = max(int(np.floor((x1 - r - o1) / h)), 0)
    hi1 = min(int(np.floor((x1 + r - o1) / h)), n1 - 1)
    for i in range(lo0, hi0 + 1):
        g0 = o0 + i * h
        e0 = g0 - x0
        if x0 - (g0 + h) > e0:
            e0 = x0 - (g0 + h)
        if e0 < 0.0:
            e0 = 0.0
        for j in range(lo1, hi1 + 1):
            g1 = o1 + j * h
            e1 = g1 - x1
            if x1 - (g1 + h) > e1:
                e1 = x1 - (g1 + h)
            if e1 < 0.0:
                e1 = 0.0
            if e0 * e0 + e1 * e1 > best:
                continue
            s0 = starts[g, i * n1 + j]
            s1 = starts[g, i * n1 + j + 1]
            if s0 == s1:
                continue
            r = np.sqrt(best) * (1.0 + 1e-9) + 1e-9
            zlo = x2 - r
            zhi = x2 + r
            # first vertex of the column with depth >= zlo (binary search)
            a_ = s0
            b_ = s1
            while a_ < b_:
                mid = (a_ + b_) >> 1
                if coords[g, 2, mid] < zlo:
                    a_ = mid + 1
                else:
                    b_ = mid
            for p in range(a_, s1):
                z = coords[g, 2, p]
                if z > zhi:
                    break
                d0 = x0 - coords[g, 0, p]
                d1 = x1 - coords[g, 1, p]
                d2 = x2 - z
                dv = d0 * d0 + d1 * d1 + d2 * d2
                if dv <= best:
                    v = items[g, p]
                    if dv < best or v < c:
                        best = dv
                        c = v
    return c, best


@njit(nogil=True, cache=True)
def nearest_exact(x, ref_of, start, q, nbr, axes, origin, dims, cell, starts, items, coords, chain, max_steps):  # pragma: no cover - compiled
    """Exact nearest reference vertex of each point (see the module docstring).

    Parameters
    ----------
    x : (M, 3) float32
        Query points, in the frame of their reference.
    ref_of : (M,) int64
        Reference (table) index of each point.
    start : (M,) int64
        Local start vertex of each point (its distance is the first bound).
    q : (G, n, 3) float32
        Reference vertices.
    nbr : (n, K) int64
        Candidate graph of the walk (local ids; padding slots hold the vertex itself).
    axes : (G, 3) int64, origin : (G, 2) float64, dims : (G, 2) int64, cell : (G,) float64
        Column grid of each reference (:func:`build_grid`).
    starts : (G, C + 1) int32, items : (G, n) int32, coords : (G, 3, n) float32
        Column tables of each reference (``C`` the largest column count; unused tail zeros).
    chain : bool
        Also try, as a start, the previous point's answer shifted by the difference of the two
        start ids (points given in mesh order with ``start = arange``: consecutive vertices are
        mostly neighbours, so this start is usually closer).
    max_steps : int
        Cap on the walk's moves.

    Returns
    -------
    (M,) int64 local ids.
    """
    m = x.shape[0]
    n = q.shape[1]
    out = np.empty(m, np.int64)
    prev = -1
    for i in range(m):
        g = ref_of[i]
        ax = axes[g]
        y0 = np.float64(x[i, ax[0]])
        y1 = np.float64(x[i, ax[1]])
        y2 = np.float64(x[i, ax[2]])
        c = start[i]
        d0 = y0 - q[g, c, ax[0]]
        d1 = y1 - q[g, c, ax[1]]
        d2 = y2 - q[g, c, ax[2]]
        best = d0 * d0 + d1 * d1 + d2 * d2
        if chain and i > 0 and ref_of[i - 1] == g:
            c2 = prev + (start[i] - start[i - 1])
            if 0 <= c2 < n and c2 != c:
                e0 = y0 - q[g, c2, ax[0]]
                e1 = y1 - q[g, c2, ax[1]]
                e2 = y2 - q[g, c2, ax[2]]
                d = e0 * e0 + e1 * e1 + e2 * e2
                if d < best:
                    best = d
                    c = c2
        k = nbr.shape[1]
        for _ in range(max_steps):
            nb = c
            nbd = best
            for j in range(k):
                v = nbr[c, j]
                e0 = y0 - q[g, v, ax[0]]
                e1 = y1 - q[g, v, ax[1]]
                e2 = y2 - q[g, v, ax[2]]
                dv = e0 * e0 + e1 * e1 + e2 * e2
                if dv < nbd:
                    nbd = dv
                    nb = v
            if nb == c:
                break
            c = nb
            best = nbd
        c, best = _search(y0, y1, y2, c, best, g, origin, dims, cell, starts, items, coords)
        out[i] = c
        prev = c
    return out
