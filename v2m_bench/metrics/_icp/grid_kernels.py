"""Compiled exact nearest-vertex search of the ICP metrics (numba): column grids, walks, searches.

Imported only through :mod:`.kernels` (which :func:`.search.exact_engine` imports when the
compiled engine is used), so ``import v2m_bench.metrics`` needs numpy, scipy and h5py alone. The
search is exhaustive, as scipy's k-d trees are, so the choice changes the time, not the result.

The search, per query point ``x`` with a start vertex ``c``:

1. **Walk** (upper bound). From ``c``, move to the closest candidate of the current vertex in the
   topology's candidate graph while one is strictly closer (the walk of the numpy engine).
   The end vertex's distance ``r`` bounds the nearest distance from above.
2. **Exhaustive check** (exactness). Every reference vertex in the uniform-grid cells that meet
   the box ``[x - r, x + r]`` is measured; the closest wins (lowest vertex id on an exact tie).
   The ball of radius ``r`` around ``x`` lies in that box, so no closer vertex is missed, however
   far the walk stopped from the true answer (folded lips and eyelids included).

Distances are computed in float64 from the float32 coordinates, as scipy's k-d tree does from
the same values, so both searches agree except on exact ties.

A ``grid`` is the tuple :func:`build_grids` returns, ``(axes, origin, dims, cell, starts, items,
coords)``, one column grid per reference stacked along the first axis.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["build_grids", "nearest_exact", "column_sort", "column_range", "first_at_depth", "search_point", "search_ball",
           "walk_one", "walk_bound"]


@njit(nogil=True, cache=True)
def column_sort(key, depth, ncols):  # pragma: no cover - compiled
    """Counting sort of vertex ids by column, then a stable sort by depth within each column
    (insertion sort, or merge sort for columns of more than 32 vertices), so ties keep id order.
    Same order as ``np.lexsort((ids, depth, key))``."""
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
        s0 = starts[c]
        s1 = starts[c + 1]
        if s1 - s0 > 32:  # a long column (a steep part of the surface): a stable merge sort
            run = items[s0:s1].copy()
            items[s0:s1] = run[np.argsort(depth[run], kind="mergesort")]
            continue
        for a in range(s0 + 1, s1):
            v = items[a]
            z = depth[v]
            b = a - 1
            while b >= s0 and depth[items[b]] > z:  # strict: equal depths keep id order
                items[b + 1] = items[b]
                b -= 1
            items[b + 1] = v
    return starts, items


@njit(nogil=True, cache=True, inline="always")
def column_range(lo0, hi0, lo1, hi1, g, grid):  # pragma: no cover - compiled
    """Index ranges (i0, i1, j0, j1) of the columns of grid ``g`` that meet [lo0, hi0] x [lo1, hi1]."""
    origin = grid[1]
    dims = grid[2]
    cell = grid[3]
    h = cell[g]
    i0 = max(int(np.floor((lo0 - origin[g, 0]) / h)), 0)
    i1 = min(int(np.floor((hi0 - origin[g, 0]) / h)), dims[g, 0] - 1)
    j0 = max(int(np.floor((lo1 - origin[g, 1]) / h)), 0)
    j1 = min(int(np.floor((hi1 - origin[g, 1]) / h)), dims[g, 1] - 1)
    return i0, i1, j0, j1


@njit(nogil=True, cache=True, inline="always")
def _column_box(x0, x1, r, g, grid):  # pragma: no cover - compiled
    """Index ranges (lo0, hi0, lo1, hi1) of the columns of grid ``g`` that meet [x - r, x + r]."""
    return column_range(x0 - r, x0 + r, x1 - r, x1 + r, g, grid)


@njit(nogil=True, cache=True, inline="always")
def _gap(x, lo, h):  # pragma: no cover - compiled
    """Distance from ``x`` to the interval [lo, lo + h] (0 inside)."""
    e = lo - x
    if x - (lo + h) > e:
        e = x - (lo + h)
    return e if e > 0.0 else 0.0


@njit(nogil=True, cache=True, inline="always")
def first_at_depth(coords, g, s0, s1, zlo):  # pragma: no cover - compiled
    """First position in the depth-sorted run [s0, s1) with depth >= zlo (binary search)."""
    a_ = s0
    b_ = s1
    while a_ < b_:
        mid = (a_ + b_) >> 1
        if coords[g, 2, mid] < zlo:
            a_ = mid + 1
        else:
            b_ = mid
    return a_


@njit(nogil=True, cache=True, inline="always")
def search_point(x0, x1, x2, c, best, g, grid):  # pragma: no cover - compiled
    """Exhaustive check around one point (column frame of reference ``g``): the closest vertex
    within sqrt(best) of it, ``c`` kept on a tie unless a lower id ties."""
    _, origin, dims, cell, starts, items, coords = grid
    r = np.sqrt(best) * (1.0 + 1e-9) + 1e-9
    h = cell[g]
    n1 = dims[g, 1]
    lo0, hi0, lo1, hi1 = _column_box(x0, x1, r, g, grid)
    for i in range(lo0, hi0 + 1):
        e0 = _gap(x0, origin[g, 0] + i * h, h)
        for j in range(lo1, hi1 + 1):
            e1 = _gap(x1, origin[g, 1] + j * h, h)
            if e0 * e0 + e1 * e1 > best:
                continue
            s0 = starts[g, i * n1 + j]
            s1 = starts[g, i * n1 + j + 1]
            if s0 == s1:
                continue
            r = np.sqrt(best) * (1.0 + 1e-9) + 1e-9
            zhi = x2 + r
            for p in range(first_at_depth(coords, g, s0, s1, x2 - r), s1):
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


@njit(nogil=True, cache=True, inline="always")
def search_ball(x0, x1, x2, r0, g, grid):  # pragma: no cover - compiled
    """Every vertex within distance ``r0`` of a point (column frame of reference ``g``): the
    closest (lowest id on an exact tie) and a lower bound of the second-closest distance.

    Returns (c, d2, lb2): the nearest vertex and its squared distance (when none lies within
    ``r0``: -1, or a farther vertex met on the way), and min(second-smallest squared distance
    among them, r0^2): no vertex other than ``c`` is closer than sqrt(lb2).
    """
    _, origin, dims, cell, starts, items, coords = grid
    rr = r0 * r0
    h = cell[g]
    n1 = dims[g, 1]
    lo0, hi0, lo1, hi1 = _column_box(x0, x1, r0, g, grid)
    c = -1
    best = np.inf
    second = rr
    for i in range(lo0, hi0 + 1):
        e0 = _gap(x0, origin[g, 0] + i * h, h)
        for j in range(lo1, hi1 + 1):
            e1 = _gap(x1, origin[g, 1] + j * h, h)
            lat = e0 * e0 + e1 * e1
            if lat > rr:
                continue
            s0 = starts[g, i * n1 + j]
            s1 = starts[g, i * n1 + j + 1]
            if s0 == s1:
                continue
            w = np.sqrt(rr - lat) * (1.0 + 1e-9) + 1e-9
            zhi = x2 + w
            for p in range(first_at_depth(coords, g, s0, s1, x2 - w), s1):
                z = coords[g, 2, p]
                if z > zhi:
                    break
                d0 = x0 - coords[g, 0, p]
                d1 = x1 - coords[g, 1, p]
                d2 = x2 - z
                dv = d0 * d0 + d1 * d1 + d2 * d2
                if dv < best:
                    if best < second:
                        second = best
                    best = dv
                    c = items[g, p]
                elif dv == best:
                    second = dv
                    v = items[g, p]
                    if v < c:
                        c = v
                elif dv < second:
                    second = dv
    return c, best, second


@njit(nogil=True, cache=True, inline="always")
def _walk_search(y0, y1, y2, c, best, g, q, nbr, grid, max_steps):  # pragma: no cover - compiled
    """Walk from ``c`` (squared distance ``best``) to a local minimum, then the exhaustive check."""
    c, best = walk_one(y0, y1, y2, c, best, g, grid[0][g], q, nbr, max_steps)
    return search_point(y0, y1, y2, c, best, g, grid)


@njit(nogil=True, cache=True, inline="always")
def walk_one(y0, y1, y2, c, best, g, ax, q, nbr, max_steps):  # pragma: no cover - compiled
    """Greedy walk: move to the closest candidate while one is strictly closer (lowest slot on
    ties). Coordinates ``y`` are along the axes ``ax``; distances are squared, in float64."""
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
    return c, best


@njit(nogil=True, cache=True, inline="always")
def walk_bound(u0, u1, u2, c, best, g, q, nbr, max_steps):  # pragma: no cover - compiled
    """The greedy walk of :func:`walk_one` in the references' own frame (no axis permutation)
    with branch-free steps: used only where the walk's end is an upper bound that an exhaustive
    check confirms or corrects, so its path never changes a result."""
    k = nbr.shape[1]
    for _ in range(max_steps):
        nb = c
        nbd = best
        for j in range(k):
            v = nbr[c, j]
            e0 = u0 - q[g, v, 0]
            e1 = u1 - q[g, v, 1]
            e2 = u2 - q[g, v, 2]
            dv = e0 * e0 + e1 * e1 + e2 * e2
            lt = dv < nbd
            nbd = dv if lt else nbd
            nb = v if lt else nb
        if nb == c:
            break
        c = nb
        best = nbd
    return c, best


@njit(nogil=True, cache=True)
def nearest_exact(queries, q, nbr, grid, chain, max_steps):  # pragma: no cover - compiled
    """Exact nearest reference vertex of each point (see the module docstring).

    Parameters
    ----------
    queries : tuple (x, ref_of, start)
        x (M, 3) float32 query points, in the frame of their reference; ref_of (M,) int64 the
        reference (table) index of each point; start (M,) int64 the local start vertex of each
        point (its distance is the first bound).
    q : (G, n, 3) float32
        Reference vertices.
    nbr : (n, K) int64
        Candidate graph of the walk (local ids; padding slots hold the vertex itself).
    grid : tuple
        The column grids of the references, as :func:`build_grids` returns them.
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
    x, ref_of, start = queries
    axes = grid[0]
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
        c, best = _walk_search(y0, y1, y2, c, best, g, q, nbr, grid, max_steps)
        out[i] = c
        prev = c
    return out


@njit(nogil=True, cache=True)
def build_grids(q, cell_factor):  # pragma: no cover - compiled
    """Column-grid index of each of G references: the ``grid`` tuple the searches take.

    The two axes of largest extent (for a face: x and y) are cut into square columns; the vertices
    of each column are sorted along the third axis (depth), so a search visits only the part of a
    column inside a depth slab. q (G, n, 3) float32; the column edge is ``cell_factor`` times the
    mean vertex spacing over the two widest axes (enlarged while the grid would exceed 4 columns
    per vertex; any edge gives the same search results).

    Returns the tuple (axes, origin, dims, cell, starts, items, coords): axes (G, 3) int64 (the
    column axes, then the sorted axis), origin (G, 2) float64 (lower grid corner), dims (G, 2) int64 (columns per axis), cell (G,) float64 (column edge),
    starts (G, C + 1) int32 (run offsets of each column in ``items``; ``C`` the largest column
    count, unused tail zeros), items (G, n) int32 (vertex ids by column, then depth, then id) and
    coords (G, 3, n) float32 (the positions of ``items`` along ``axes``, for contiguous scans).
    """
    g_, n, _ = q.shape
    axes = np.empty((g_, 3), np.int64)
    origin = np.empty((g_, 2), np.float64)
    dims = np.empty((g_, 2), np.int64)
    cell = np.empty(g_, np.float64)
    for g in range(g_):
        lo = np.empty(3)
        hi = np.empty(3)
        for k in range(3):
            lo[k] = np.inf
            hi[k] = -np.inf
        for v in range(n):
            for k in range(3):
                z = np.float64(q[g, v, k])
                if z < lo[k]:
                    lo[k] = z
                if z > hi[k]:
                    hi[k] = z
        ext = hi - lo
        # axes by decreasing extent, stable on ties
        order = np.array([0, 1, 2])
        for i in range(1, 3):
            j = i
            while j > 0 and ext[order[j]] > ext[order[j - 1]]:
                tmp = order[j]
                order[j] = order[j - 1]
                order[j - 1] = tmp
                j -= 1
        for k in range(3):
            axes[g, k] = order[k]
        h = cell_factor * np.sqrt(ext[order[0]] * ext[order[1]] / max(n, 1))
        if not h > 0:
            h = 1.0
        s0 = ext[order[0]]
        s1 = ext[order[1]]
        while (np.floor(s0 / h) + 1) * (np.floor(s1 / h) + 1) > 4 * max(n, 1):
            h *= 1.25
        cell[g] = h
        origin[g, 0] = lo[order[0]]
        origin[g, 1] = lo[order[1]]
        dims[g, 0] = np.int64(np.floor(s0 / h)) + 1
        dims[g, 1] = np.int64(np.floor(s1 / h)) + 1
    cmax = 0
    for g in range(g_):
        cmax = max(cmax, dims[g, 0] * dims[g, 1])
    starts = np.zeros((g_, cmax + 1), np.int32)
    items = np.empty((g_, n), np.int32)
    coords = np.empty((g_, 3, n), np.float32)
    key = np.empty(n, np.int64)
    depth = np.empty(n, np.float32)
    for g in range(g_):
        a0 = axes[g, 0]
        a1 = axes[g, 1]
        a2 = axes[g, 2]
        h = cell[g]
        for v in range(n):
            i0 = min(np.int64(np.floor((np.float64(q[g, v, a0]) - origin[g, 0]) / h)), dims[g, 0] - 1)
            i1 = min(np.int64(np.floor((np.float64(q[g, v, a1]) - origin[g, 1]) / h)), dims[g, 1] - 1)
            key[v] = i0 * dims[g, 1] + i1
            depth[v] = q[g, v, a2]
        st, it = column_sort(key, depth, dims[g, 0] * dims[g, 1])
        starts[g, : st.shape[0]] = st
        items[g] = it
        for p in range(n):
            v = it[p]
            coords[g, 0, p] = q[g, v, a0]
            coords[g, 1, p] = q[g, v, a1]
            coords[g, 2, p] = q[g, v, a2]
    return axes, origin, dims, cell, starts, items, coords
