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

__all__ = ["build_grids", "center_references", "nearest_exact", "normals32", "cross_covariance", "icp_iterate", "score_exact"]


@njit(nogil=True, cache=True)
def _column_sort(key, depth, ncols):  # pragma: no cover - compiled
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
def _column_range(lo0, hi0, lo1, hi1, g, origin, dims, cell):  # pragma: no cover - compiled
    """Index ranges (i0, i1, j0, j1) of the columns of grid ``g`` that meet [lo0, hi0] x [lo1, hi1]."""
    h = cell[g]
    i0 = max(int(np.floor((lo0 - origin[g, 0]) / h)), 0)
    i1 = min(int(np.floor((hi0 - origin[g, 0]) / h)), dims[g, 0] - 1)
    j0 = max(int(np.floor((lo1 - origin[g, 1]) / h)), 0)
    j1 = min(int(np.floor((hi1 - origin[g, 1]) / h)), dims[g, 1] - 1)
    return i0, i1, j0, j1


@njit(nogil=True, cache=True, inline="always")
def _column_box(x0, x1, r, g, origin, dims, cell):  # pragma: no cover - compiled
    """Index ranges (lo0, hi0, lo1, hi1) of the columns of grid ``g`` that meet [x - r, x + r]."""
    return _column_range(x0 - r, x0 + r, x1 - r, x1 + r, g, origin, dims, cell)


@njit(nogil=True, cache=True, inline="always")
def _gap(x, lo, h):  # pragma: no cover - compiled
    """Distance from ``x`` to the interval [lo, lo + h] (0 inside)."""
    e = lo - x
    if x - (lo + h) > e:
        e = x - (lo + h)
    return e if e > 0.0 else 0.0


@njit(nogil=True, cache=True, inline="always")
def _first_at_depth(coords, g, s0, s1, zlo):  # pragma: no cover - compiled
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
def _search(x0, x1, x2, c, best, g, origin, dims, cell, starts, items, coords):  # pragma: no cover - compiled
    """Exhaustive check around one point (column frame of reference ``g``): the closest vertex
    within sqrt(best) of it, ``c`` kept on a tie unless a lower id ties."""
    r = np.sqrt(best) * (1.0 + 1e-9) + 1e-9
    h = cell[g]
    n1 = dims[g, 1]
    lo0, hi0, lo1, hi1 = _column_box(x0, x1, r, g, origin, dims, cell)
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
            for p in range(_first_at_depth(coords, g, s0, s1, x2 - r), s1):
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
def _search_ball(x0, x1, x2, r0, g, origin, dims, cell, starts, items, coords):  # pragma: no cover - compiled
    """Every vertex within distance ``r0`` of a point (column frame of reference ``g``): the
    closest (lowest id on an exact tie) and a lower bound of the second-closest distance.

    Returns (c, d2, lb2): the nearest vertex and its squared distance (when none lies within
    ``r0``: -1, or a farther vertex met on the way), and min(second-smallest squared distance
    among them, r0^2): no vertex other than ``c`` is closer than sqrt(lb2).
    """
    rr = r0 * r0
    h = cell[g]
    n1 = dims[g, 1]
    lo0, hi0, lo1, hi1 = _column_box(x0, x1, r0, g, origin, dims, cell)
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
            for p in range(_first_at_depth(coords, g, s0, s1, x2 - w), s1):
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
def _walk_search(y0, y1, y2, c, best, g, ax, q, nbr, origin, dims, cell, starts, items, coords, max_steps):  # pragma: no cover - compiled
    """Walk from ``c`` (squared distance ``best``) to a local minimum, then the exhaustive check."""
    c, best = _walk_one(y0, y1, y2, c, best, g, ax, q, nbr, max_steps)
    return _search(y0, y1, y2, c, best, g, origin, dims, cell, starts, items, coords)


@njit(nogil=True, cache=True, inline="always")
def _walk_one(y0, y1, y2, c, best, g, ax, q, nbr, max_steps):  # pragma: no cover - compiled
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
def _walk_bound(u0, u1, u2, c, best, g, q, nbr, max_steps):  # pragma: no cover - compiled
    """The greedy walk of :func:`_walk_one` in the references' own frame (no axis permutation)
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
        Column grid of each reference (:func:`build_grids`).
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
        c, best = _walk_search(y0, y1, y2, c, best, g, ax, q, nbr, origin, dims, cell, starts, items, coords, max_steps)
        out[i] = c
        prev = c
    return out


# ------------------------------------------------------------------- the compiled ICP pipeline
# The same algorithm as the numpy implementation in v2m_bench.icp (see its docstrings and
# docs/metrics.md), sample after sample in compiled loops: nothing here depends on which other
# samples are processed, so a prediction's result never depends on its batch or on threads. Sums
# run front to back in float64; the results agree with the numpy path to rounding (not bit for
# bit: its sums and linear solves group terms differently).


@njit(nogil=True, cache=True)
def normals32(q, tri):  # pragma: no cover - compiled
    """Area-weighted unit vertex normals of each reference: q (G, n, 3) float32, tri (F, 3) ->
    (G, n, 3) float32. Face normals (unnormalised cross products) in float32, summed per vertex in
    float64 in triangle order, normalised in float64 (``icp._normals32`` for one reference)."""
    g_, n, _ = q.shape
    out = np.empty((g_, n, 3), np.float32)
    acc = np.empty((n, 3), np.float64)
    for g in range(g_):
        acc[:] = 0.0
        for f in range(tri.shape[0]):
            a = tri[f, 0]
            b = tri[f, 1]
            c = tri[f, 2]
            ux = q[g, b, 0] - q[g, a, 0]
            uy = q[g, b, 1] - q[g, a, 1]
            uz = q[g, b, 2] - q[g, a, 2]
            vx = q[g, c, 0] - q[g, a, 0]
            vy = q[g, c, 1] - q[g, a, 1]
            vz = q[g, c, 2] - q[g, a, 2]
            fx = np.float64(uy * vz - uz * vy)
            fy = np.float64(uz * vx - ux * vz)
            fz = np.float64(ux * vy - uy * vx)
            for v in (a, b, c):
                acc[v, 0] += fx
                acc[v, 1] += fy
                acc[v, 2] += fz
        for v in range(n):
            nn = np.sqrt(acc[v, 0] * acc[v, 0] + acc[v, 1] * acc[v, 1] + acc[v, 2] * acc[v, 2])
            if nn < 1e-30:
                nn = 1e-30
            for k in range(3):
                out[g, v, k] = np.float32(acc[v, k] / nn)
    return out


@njit(nogil=True, cache=True)
def center_references(ref, rows):  # pragma: no cover - compiled
    """Centroids and centred float32 vertices of the references ``ref[rows]`` (``icp._chunk_references``).

    ref (B, n, 3) float; rows (G,) int64. The centroid is the float64 mean summed front to back
    (as numpy's ``mean(axis=1, dtype=float64)`` sums), the centred vertices
    ``float32(float64(v) - centroid)``: the same numbers as the numpy code, in one pass less.
    Returns centroid (G, 3) float64, q (G, n, 3) float32 and whether every value was finite (a
    float64 sum of float32 or finite float64 coordinates is finite exactly when they all are).
    """
    g_ = rows.shape[0]
    n = ref.shape[1]
    centroid = np.empty((g_, 3))
    out = np.empty((g_, n, 3), np.float32)
    finite = True
    for gi in range(g_):
        g = rows[gi]
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        for v in range(n):
            s0 += np.float64(ref[g, v, 0])
            s1 += np.float64(ref[g, v, 1])
            s2 += np.float64(ref[g, v, 2])
        if not (np.isfinite(s0) and np.isfinite(s1) and np.isfinite(s2)):
            finite = False
        c0 = s0 / n
        c1 = s1 / n
        c2 = s2 / n
        centroid[gi, 0] = c0
        centroid[gi, 1] = c1
        centroid[gi, 2] = c2
        for v in range(n):
            out[gi, v, 0] = np.float32(np.float64(ref[g, v, 0]) - c0)
            out[gi, v, 1] = np.float32(np.float64(ref[g, v, 1]) - c1)
            out[gi, v, 2] = np.float32(np.float64(ref[g, v, 2]) - c2)
    return centroid, out, finite


@njit(nogil=True, cache=True)
def build_grids(q, cell_factor):  # pragma: no cover - compiled
    """Column-grid index of each of G references, stacked as :func:`nearest_exact` takes them.

    The two axes of largest extent (for a face: x and y) are cut into square columns; the vertices
    of each column are sorted along the third axis (depth), so a search visits only the part of a
    column inside a depth slab. q (G, n, 3) float32; the column edge is ``cell_factor`` times the
    mean vertex spacing over the two widest axes (enlarged while the grid would exceed 4 columns
    per vertex; any edge gives the same search results).

    Returns axes (G, 3) int64 (the column axes, then the sorted axis), origin (G, 2) float64
    (lower grid corner), dims (G, 2) int64 (columns per axis), cell (G,) float64 (column edge),
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
        st, it = _column_sort(key, depth, dims[g, 0] * dims[g, 1])
        starts[g, : st.shape[0]] = st
        items[g] = it
        for p in range(n):
            v = it[p]
            coords[g, 0, p] = q[g, v, a0]
            coords[g, 1, p] = q[g, v, a1]
            coords[g, 2, p] = q[g, v, a2]
    return axes, origin, dims, cell, starts, items, coords


@njit(nogil=True, cache=True)
def cross_covariance(p, q, ref_of):  # pragma: no cover - compiled
    """Sums of the closed-form fit of each prediction p[b] (n, 3) float32 onto q[ref_of[b]].

    Means in float64, coordinates centred in float32, products in float32 accumulated in float64.
    Returns mp (B, 3), mq (B, 3), h (B, 3, 3) = sum_i pc_i qc_i^T, pp (B,) = sum_i |pc_i|^2.
    """
    b_, n, _ = p.shape
    mp = np.zeros((b_, 3))
    mq = np.zeros((b_, 3))
    h = np.zeros((b_, 3, 3))
    pp = np.zeros(b_)
    for b in range(b_):  # scalar accumulators (kept in registers), summed front to back
        g = ref_of[b]
        s0 = s1 = s2 = t0 = t1 = t2 = 0.0
        for v in range(n):
            s0 += p[b, v, 0]
            s1 += p[b, v, 1]
            s2 += p[b, v, 2]
            t0 += q[g, v, 0]
            t1 += q[g, v, 1]
            t2 += q[g, v, 2]
        m00 = s0 / n
        m01 = s1 / n
        m02 = s2 / n
        m10 = t0 / n
        m11 = t1 / n
        m12 = t2 / n
        f00 = np.float32(m00)
        f01 = np.float32(m01)
        f02 = np.float32(m02)
        f10 = np.float32(m10)
        f11 = np.float32(m11)
        f12 = np.float32(m12)
        c00 = c01 = c02 = c10 = c11 = c12 = 0.0
        h00 = h01 = h02 = h10 = h11 = h12 = h20 = h21 = h22 = 0.0
        sq = 0.0
        for v in range(n):
            p0 = p[b, v, 0] - f00  # float32
            p1 = p[b, v, 1] - f01
            p2 = p[b, v, 2] - f02
            q0 = q[g, v, 0] - f10
            q1 = q[g, v, 1] - f11
            q2 = q[g, v, 2] - f12
            c00 += p0
            c01 += p1
            c02 += p2
            c10 += q0
            c11 += q1
            c12 += q2
            h00 += p0 * q0  # float32 products, float64 sums
            h01 += p0 * q1
            h02 += p0 * q2
            sq += p0 * p0
            h10 += p1 * q0
            h11 += p1 * q1
            h12 += p1 * q2
            sq += p1 * p1
            h20 += p2 * q0
            h21 += p2 * q1
            h22 += p2 * q2
            sq += p2 * p2
        h[b, 0, 0] = h00
        h[b, 0, 1] = h01
        h[b, 0, 2] = h02
        h[b, 1, 0] = h10
        h[b, 1, 1] = h11
        h[b, 1, 2] = h12
        h[b, 2, 0] = h20
        h[b, 2, 1] = h21
        h[b, 2, 2] = h22
        pp[b] = sq
        mp[b, 0] = m00 + c00 / n
        mp[b, 1] = m01 + c01 / n
        mp[b, 2] = m02 + c02 / n
        mq[b, 0] = m10 + c10 / n
        mq[b, 1] = m11 + c11 / n
        mq[b, 2] = m12 + c12 / n
    return mp, mq, h, pp


@njit(nogil=True, cache=True, inline="always")
def _solve_spd(a, b):  # pragma: no cover - compiled
    """Solve a x = b (a small, symmetric positive definite: the damped normal equations) by
    Gaussian elimination with partial pivoting, on copies."""
    n = b.shape[0]
    m = a.copy()
    x = b.copy()
    for k in range(n):
        p = k
        for i in range(k + 1, n):
            if abs(m[i, k]) > abs(m[p, k]):
                p = i
        if p != k:
            for j in range(n):
                tmp = m[k, j]
                m[k, j] = m[p, j]
                m[p, j] = tmp
            tmp = x[k]
            x[k] = x[p]
            x[p] = tmp
        for i in range(k + 1, n):
            f = m[i, k] / m[k, k]
            for j in range(k, n):
                m[i, j] -= f * m[k, j]
            x[i] -= f * x[k]
    for k in range(n - 1, -1, -1):
        acc = x[k]
        for j in range(k + 1, n):
            acc -= m[k, j] * x[j]
        x[k] = acc / m[k, k]
    return x


@njit(nogil=True, cache=True)
def icp_iterate(p_it, q_it, ref_of, r, s, t, start, pivot, max_iter, damping, rmse_rtol, tol, exact, margin,
                q, nrm, nbr, axes, origin, dims, cell, starts, items, coords, max_steps):  # pragma: no cover - compiled
    """Levenberg-Marquardt point-to-plane ICP of each sample (``icp._icp_iterations``, compiled).

    p_it (a, S, 3) float64 prediction iteration vertices; q_it (a, S, 3) float64 their reference
    positions; ref_of (a,) reference index; r (a, 3, 3), s (a,), t (a, 3) start transforms; start
    (a, S) start vertices of the searches; pivot (a, 3) rotation centre. ``exact``: nearest
    vertices by the exhaustive search, else by the walk alone. Returns the best iterate's r, s, t,
    the evaluations, converged flags and nearest vertices.
    """
    a_, S, _ = p_it.shape
    dim = 6
    out_r = r.copy()
    out_s = s.copy()
    out_t = t.copy()
    out_c = start.copy()
    iters = np.zeros(a_, np.int64)
    conv = np.zeros(a_, np.bool_)
    cc = np.empty(S, np.int64)
    amat = np.empty((dim, dim))
    bvec = np.empty(dim)
    best_a = np.empty((dim, dim))
    best_b = np.empty(dim)
    # exact mode: the last exhaustive answer of each point, where it was searched and how far the
    # point may move before another vertex could be closer (the "slack"; -1: none)
    xcert = np.empty((S, 3))
    ccert = np.empty(S, np.int64)
    slack = np.empty(S)
    for b in range(a_):
        slack[:] = -1.0
        g = ref_of[b]
        ax = axes[g]
        cr = r[b].copy()
        cs = s[b]
        ct = t[b].copy()
        br = cr.copy()
        bs = cs
        bt = ct.copy()
        bc = out_c[b]
        best = np.inf
        lam = damping
        o0 = pivot[b, 0]
        o1 = pivot[b, 1]
        o2 = pivot[b, 2]
        ss = 0.0
        rmax = 0.0
        for i in range(S):
            e0 = q_it[b, i, 0] - o0
            e1 = q_it[b, i, 1] - o1
            e2 = q_it[b, i, 2] - o2
            rr = e0 * e0 + e1 * e1 + e2 * e2
            ss += rr
            rr = np.sqrt(rr)
            if rr > rmax:
                rmax = rr
        rho = np.sqrt(ss / S)
        if not rho > 0:
            rho = 1.0
        for k in range(max_iter):
            # evaluate the current iterate
            m00 = cs * cr[0, 0]
            m01 = cs * cr[0, 1]
            m02 = cs * cr[0, 2]
            m10 = cs * cr[1, 0]
            m11 = cs * cr[1, 1]
            m12 = cs * cr[1, 2]
            m20 = cs * cr[2, 0]
            m21 = cs * cr[2, 1]
            m22 = cs * cr[2, 2]
            f = 0.0
            # the normal equations' sums, accumulated in point order in registers
            a00 = 0.0
            a01 = 0.0
            a02 = 0.0
            a03 = 0.0
            a04 = 0.0
            a05 = 0.0
            a11 = 0.0
            a12 = 0.0
            a13 = 0.0
            a14 = 0.0
            a15 = 0.0
            a22 = 0.0
            a23 = 0.0
            a24 = 0.0
            a25 = 0.0
            a33 = 0.0
            a34 = 0.0
            a35 = 0.0
            a44 = 0.0
            a45 = 0.0
            a55 = 0.0
            b0 = 0.0
            b1 = 0.0
            b2 = 0.0
            b3 = 0.0
            b4 = 0.0
            b5 = 0.0
            for i in range(S):
                p0 = p_it[b, i, 0]
                p1 = p_it[b, i, 1]
                p2 = p_it[b, i, 2]
                x0 = m00 * p0 + m01 * p1 + m02 * p2 + ct[0]
                x1 = m10 * p0 + m11 * p1 + m12 * p2 + ct[1]
                x2 = m20 * p0 + m21 * p1 + m22 * p2 + ct[2]
                # the search sees the point in float32, as the numpy path's tables do
                z = (np.float64(np.float32(x0)), np.float64(np.float32(x1)), np.float64(np.float32(x2)))
                y0 = z[ax[0]]
                y1 = z[ax[1]]
                y2 = z[ax[2]]
                c = bc[i]
                moved2 = np.inf
                if slack[i] > 0.0:
                    e0 = y0 - xcert[i, 0]
                    e1 = y1 - xcert[i, 1]
                    e2 = y2 - xcert[i, 2]
                    moved2 = e0 * e0 + e1 * e1 + e2 * e2
                if moved2 < slack[i] * slack[i]:
                    # still the exhaustive answer: within (second - first) / 2 of where it was
                    # searched, no other vertex can have come closer
                    c = ccert[i]
                elif exact:
                    # the walk only bounds the exhaustive search (its path never changes a result)
                    d0 = z[0] - q[g, c, 0]
                    d1 = z[1] - q[g, c, 1]
                    d2 = z[2] - q[g, c, 2]
                    c, dd = _walk_bound(z[0], z[1], z[2], c, d0 * d0 + d1 * d1 + d2 * d2, g, q, nbr, max_steps)
                    d0 = y0 - q[g, c, ax[0]]
                    d1 = y1 - q[g, c, ax[1]]
                    d2 = y2 - q[g, c, ax[2]]
                    dd = d0 * d0 + d1 * d1 + d2 * d2
                    if margin > 0.0:
                        c, dd, lb2 = _search_ball(y0, y1, y2, np.sqrt(dd) * (1.0 + 1e-9) + 1e-9 + margin, g, origin,
                                                  dims, cell, starts, items, coords)
                        sl = 0.5 * (np.sqrt(lb2) - np.sqrt(dd)) * (1.0 - 1e-9) - 1e-6
                        slack[i] = sl
                        ccert[i] = c
                        xcert[i, 0] = y0
                        xcert[i, 1] = y1
                        xcert[i, 2] = y2
                    else:
                        c, dd = _search(y0, y1, y2, c, dd, g, origin, dims, cell, starts, items, coords)
                else:
                    d0 = y0 - q[g, c, ax[0]]
                    d1 = y1 - q[g, c, ax[1]]
                    d2 = y2 - q[g, c, ax[2]]
                    c, dd = _walk_one(y0, y1, y2, c, d0 * d0 + d1 * d1 + d2 * d2, g, ax, q, nbr, max_steps)
                cc[i] = c
                n0 = np.float64(nrm[g, c, 0])
                n1 = np.float64(nrm[g, c, 1])
                n2 = np.float64(nrm[g, c, 2])
                rv = (x0 - q[g, c, 0]) * n0 + (x1 - q[g, c, 1]) * n1 + (x2 - q[g, c, 2]) * n2
                f += rv * rv
                y0 = x0 - o0
                y1 = x1 - o1
                y2 = x2 - o2
                j0 = (y1 * n2 - y2 * n1) / rho
                j1 = (y2 * n0 - y0 * n2) / rho
                j2 = (y0 * n1 - y1 * n0) / rho
                b0 += j0 * rv
                a00 += j0 * j0
                a01 += j0 * j1
                a02 += j0 * j2
                a03 += j0 * n0
                a04 += j0 * n1
                a05 += j0 * n2
                b1 += j1 * rv
                a11 += j1 * j1
                a12 += j1 * j2
                a13 += j1 * n0
                a14 += j1 * n1
                a15 += j1 * n2
                b2 += j2 * rv
                a22 += j2 * j2
                a23 += j2 * n0
                a24 += j2 * n1
                a25 += j2 * n2
                b3 += n0 * rv
                a33 += n0 * n0
                a34 += n0 * n1
                a35 += n0 * n2
                b4 += n1 * rv
                a44 += n1 * n1
                a45 += n1 * n2
                b5 += n2 * rv
                a55 += n2 * n2
            cur = np.sqrt(f / S)
            iters[b] += 1
            sums = (a00, a01, a02, a03, a04, a05, a11, a12, a13, a14, a15,
                    a22, a23, a24, a25, a33, a34, a35, a44, a45, a55)
            rhs = (b0, b1, b2, b3, b4, b5)
            kk = 0
            for u in range(dim):
                bvec[u] = rhs[u]
                for w in range(u, dim):
                    amat[u, w] = sums[kk]
                    amat[w, u] = sums[kk]
                    kk += 1
            prev = best
            first = not np.isfinite(prev)
            better = cur < prev
            if better:
                best = cur
                br[:] = cr
                bs = cs
                bt[:] = ct
                bc[:] = cc
                best_a[:] = amat
                best_b[:] = bvec
                if not first:
                    lam = max(lam / 4.0, damping)
            else:
                lam *= 10.0
            if (better and not first and prev - cur <= rmse_rtol * prev) or lam > 1e4:
                conv[b] = True
                break
            if k == max_iter - 1:
                break
            # next iterate: a damped step from the best iterate
            tr = 0.0
            for u in range(dim):
                tr += best_a[u, u]
            am = best_a.copy()
            for u in range(dim):
                am[u, u] += lam * tr / dim + 1e-300
            delta = -_solve_spd(am, best_b)
            w0 = delta[0] / rho
            w1 = delta[1] / rho
            w2 = delta[2] / rho
            th = np.sqrt(w0 * w0 + w1 * w1 + w2 * w2)
            rot = np.eye(3)
            if th > 0:
                k0 = w0 / th
                k1 = w1 / th
                k2 = w2 / th
                kx = np.array([[0.0, -k2, k1], [k2, 0.0, -k0], [-k1, k0, 0.0]])
                kk = kx @ kx
                sn = np.sin(th)
                cn = 1.0 - np.cos(th)
                for u in range(3):
                    for w in range(3):
                        rot[u, w] += sn * kx[u, w] + cn * kk[u, w]
            for u in range(3):
                for w in range(3):
                    cr[u, w] = rot[u, 0] * br[0, w] + rot[u, 1] * br[1, w] + rot[u, 2] * br[2, w]
            v0 = bt[0] - o0
            v1 = bt[1] - o1
            v2 = bt[2] - o2
            piv = (o0, o1, o2)
            for u in range(3):
                ct[u] = rot[u, 0] * v0 + rot[u, 1] * v1 + rot[u, 2] * v2 + piv[u] + delta[3 + u]
            moved = th * rmax + np.sqrt(delta[3] * delta[3] + delta[4] * delta[4] + delta[5] * delta[5])
            if moved <= tol:
                conv[b] = True
                break
        out_r[b] = br
        out_s[b] = bs
        out_t[b] = bt
        out_c[b] = bc
    return out_r, out_s, out_t, iters, conv, out_c


_SCORE_GROUP = 32  # most points whose checks share one gathered candidate list (no effect on results)


@njit(nogil=True, cache=True, inline="always")
def _gather_box(lo0, hi0, lo1, hi1, lo2, hi2, g, origin, dims, cell, starts, coords, lx, ly, lz):  # pragma: no cover - compiled
    """Copy the vertices of reference ``g`` inside the box [lo, hi] (column frame) to the float32
    lists lx, ly, lz; returns their number. Branch-free inner loop (the box test adds 0 or 1)."""
    i0, i1, j0, j1 = _column_range(lo0, hi0, lo1, hi1, g, origin, dims, cell)
    n1 = dims[g, 1]
    cx = coords[g, 0]
    cy = coords[g, 1]
    cz = coords[g, 2]
    nl = 0
    for i in range(i0, i1 + 1):
        for j in range(j0, j1 + 1):
            s0 = starts[g, i * n1 + j]
            s1 = starts[g, i * n1 + j + 1]
            a_ = _first_at_depth(coords, g, s0, s1, lo2)
            b_ = a_
            while b_ < s1 and cz[b_] <= hi2:
                b_ += 1
            for p in range(a_, b_):
                x0 = cx[p]
                x1 = cy[p]
                lx[nl] = x0
                ly[nl] = x1
                lz[nl] = cz[p]
                nl += (x0 >= lo0) & (x0 <= hi0) & (x1 >= lo1) & (x1 <= hi1)
    return nl


@njit(nogil=True, cache=True, fastmath={"reassoc", "nsz", "contract"})
def _count_within(lx, ly, lz, nl, a0, a1, a2, thr):  # pragma: no cover - compiled
    """How many of the first ``nl`` listed vertices lie within squared distance ``thr`` of
    (a0, a1, a2), all in float32 (a vectorised loop; the count is a float32 sum of ones, exact up
    to 2**24). The fast-math flags let the compiler reorder the sum and fuse the products: the
    distances may move by a few float32 roundings, far inside the caller's 1e-5 margin."""
    k = np.float32(0.0)
    for p in range(nl):
        d0 = a0 - lx[p]
        d1 = a1 - ly[p]
        d2 = a2 - lz[p]
        k += np.float32(1.0) if (d0 * d0 + d1 * d1 + d2 * d2) <= thr else np.float32(0.0)
    return k


@njit(nogil=True, cache=True)
def score_exact(p, r, s, t, ref_of, q, nrm, nbr, axes, origin, dims, cell, starts, items, coords, max_steps):  # pragma: no cover - compiled
    """Exhaustively searched nearest vertices and signed point-to-plane distances of whole meshes.

    p (a, m, 3) float32 points, moved by ``s R p + t`` in float32 (``icp._apply``). Per mesh:

    1. **Walk**, in mesh order, each point from the corresponding vertex or the previous point's
       answer shifted by one (``nearest_exact`` with ``chain``): an upper bound ``d`` of each
       point's nearest distance.
    2. **Group** the points by the grid column they fall in (a counting sort; points outside the
       grid join the edge columns), in runs of at most ``_SCORE_GROUP``.
    3. **Check** each run: the reference vertices in one box that holds every point's walk ball
       are gathered once, and each point counts those within ``d`` in float32 with a relative
       margin of 1e-5 (far above float32 rounding, so no vertex within ``d`` is missed). A count
       of one (the walk's own end) proves the walk's answer is the unique nearest vertex; any
       other count runs :func:`_search`, the per-point check.

    The grouping only decides which points share a gathered list, never an answer. Returns
    near (a, m) int64, d (a, m) float32 ``n_q . (x - q)`` and ss (a,) float64, the sum of the
    squared distances (in float64) in ``icp._rowsum``'s order: 8 interleaved partial sums, front
    to back, combined pairwise.
    """
    a_, m, _ = p.shape
    n = q.shape[1]
    near = np.empty((a_, m), np.int64)
    dist = np.empty((a_, m), np.float32)
    ss = np.empty(a_)
    lanes = np.empty(8)
    xs = np.empty((m, 3), np.float32)  # the moved points
    ds = np.empty(m)  # squared walk distances (column frame, float64)
    cs = np.empty(m, np.int64)  # walk ends, then answers
    key = np.empty(m, np.int64)  # grid column of each point
    order = np.empty(m, np.int64)  # points grouped by column
    ncol = 0
    for g in range(dims.shape[0]):
        ncol = max(ncol, dims[g, 0] * dims[g, 1])
    cend = np.empty(ncol + 1, np.int64)
    lx = np.empty(n, np.float32)
    ly = np.empty(n, np.float32)
    lz = np.empty(n, np.float32)
    for b in range(a_):
        g = ref_of[b]
        ax = axes[g]
        n0 = dims[g, 0]
        n1 = dims[g, 1]
        inv = 1.0 / cell[g]
        mm = np.empty((3, 3), np.float32)
        for u in range(3):
            for w in range(3):
                mm[u, w] = np.float32(s[b] * r[b, u, w])
        tt = t[b].astype(np.float32)
        cend[: n0 * n1 + 1] = 0
        prev = -1
        for i in range(m):  # 1. walk
            p0 = p[b, i, 0]
            p1 = p[b, i, 1]
            p2 = p[b, i, 2]
            x0 = mm[0, 0] * p0 + mm[0, 1] * p1 + mm[0, 2] * p2 + tt[0]
            x1 = mm[1, 0] * p0 + mm[1, 1] * p1 + mm[1, 2] * p2 + tt[1]
            x2 = mm[2, 0] * p0 + mm[2, 1] * p1 + mm[2, 2] * p2 + tt[2]
            xs[i, 0] = x0
            xs[i, 1] = x1
            xs[i, 2] = x2
            u = (np.float64(x0), np.float64(x1), np.float64(x2))
            c = i % n
            d0 = u[0] - q[g, c, 0]
            d1 = u[1] - q[g, c, 1]
            d2 = u[2] - q[g, c, 2]
            best = d0 * d0 + d1 * d1 + d2 * d2
            if i > 0:
                c2 = prev + 1
                if c2 < n and c2 != c:
                    e0 = u[0] - q[g, c2, 0]
                    e1 = u[1] - q[g, c2, 1]
                    e2 = u[2] - q[g, c2, 2]
                    dd = e0 * e0 + e1 * e1 + e2 * e2
                    if dd < best:
                        best = dd
                        c = c2
            c, best = _walk_bound(u[0], u[1], u[2], c, best, g, q, nbr, max_steps)
            prev = c
            y0 = u[ax[0]]
            y1 = u[ax[1]]
            d0 = y0 - q[g, c, ax[0]]
            d1 = y1 - q[g, c, ax[1]]
            d2 = u[ax[2]] - q[g, c, ax[2]]
            ds[i] = d0 * d0 + d1 * d1 + d2 * d2  # the bound in the check's own arithmetic
            cs[i] = c
            ki = min(max(int(np.floor((y0 - origin[g, 0]) * inv)), 0), n0 - 1)
            kj = min(max(int(np.floor((y1 - origin[g, 1]) * inv)), 0), n1 - 1)
            kk = ki * n1 + kj
            key[i] = kk
            cend[kk + 1] += 1
        for col in range(n0 * n1):  # 2. group (counting sort by column)
            cend[col + 1] += cend[col]
        for i in range(m):
            kk = key[i]
            order[cend[kk]] = i
            cend[kk] += 1  # ends as the end of the column's run
        lo = 0
        while lo < m:  # 3. check, a run of one column's points at a time
            end = cend[key[order[lo]]]
            while lo < end:
                hi = min(end, lo + _SCORE_GROUP)
                bl0 = np.inf
                bh0 = -np.inf
                bl1 = np.inf
                bh1 = -np.inf
                bl2 = np.inf
                bh2 = -np.inf
                for k in range(lo, hi):
                    i = order[k]
                    w = np.sqrt(ds[i]) * (1.0 + 1e-9) + 1e-9
                    y0 = np.float64(xs[i, ax[0]])
                    y1 = np.float64(xs[i, ax[1]])
                    y2 = np.float64(xs[i, ax[2]])
                    bl0 = min(bl0, y0 - w)
                    bh0 = max(bh0, y0 + w)
                    bl1 = min(bl1, y1 - w)
                    bh1 = max(bh1, y1 + w)
                    bl2 = min(bl2, y2 - w)
                    bh2 = max(bh2, y2 + w)
                nl = _gather_box(bl0, bh0, bl1, bh1, bl2, bh2, g, origin, dims, cell, starts, coords, lx, ly, lz)
                for k in range(lo, hi):
                    i = order[k]
                    thr = np.float32(ds[i] * (1.0 + 1e-5) + 1e-30)
                    if _count_within(lx, ly, lz, nl, xs[i, ax[0]], xs[i, ax[1]], xs[i, ax[2]], thr) != 1:
                        cs[i], _ = _search(np.float64(xs[i, ax[0]]), np.float64(xs[i, ax[1]]), np.float64(xs[i, ax[2]]),
                                           cs[i], ds[i], g, origin, dims, cell, starts, items, coords)
                lo = hi
        lanes[:] = 0.0
        for i in range(m):
            c = cs[i]
            near[b, i] = c
            dv = ((xs[i, 0] - q[g, c, 0]) * nrm[g, c, 0] + (xs[i, 1] - q[g, c, 1]) * nrm[g, c, 1]
                  + (xs[i, 2] - q[g, c, 2]) * nrm[g, c, 2])
            dist[b, i] = dv
            d64 = np.float64(dv)
            lanes[i & 7] += d64 * d64
        ss[b] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    return near, dist, ss
