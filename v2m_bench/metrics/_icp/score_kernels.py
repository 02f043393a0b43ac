"""Compiled exhaustive score of the ICP metrics (numba): nearest vertices and signed point-to-plane
distances of whole meshes, with the walk's answers checked a group of points at a time.

Imported through :mod:`.kernels` only (see there for the argument groups ``pose``, ``refs`` and
``grid``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .grid_kernels import column_range, first_at_depth, search_point, walk_bound

__all__ = ["score_exact"]

_SCORE_GROUP = 32  # most points whose checks share one gathered candidate list (no effect on results)


@njit(nogil=True, cache=True, inline="always")
def _gather_box(box, g, grid, lists):  # pragma: no cover - compiled
    """Copy the vertices of reference ``g`` inside the box (lo0, hi0, lo1, hi1, lo2, hi2) (column
    frame) to the float32 lists (lx, ly, lz); returns their number. Branch-free inner loop (the
    box test adds 0 or 1)."""
    lo0, hi0, lo1, hi1, lo2, hi2 = box
    lx, ly, lz = lists
    dims = grid[2]
    starts = grid[4]
    coords = grid[6]
    i0, i1, j0, j1 = column_range(lo0, hi0, lo1, hi1, g, grid)
    n1 = dims[g, 1]
    cx = coords[g, 0]
    cy = coords[g, 1]
    cz = coords[g, 2]
    nl = 0
    for i in range(i0, i1 + 1):
        for j in range(j0, j1 + 1):
            s0 = starts[g, i * n1 + j]
            s1 = starts[g, i * n1 + j + 1]
            a_ = first_at_depth(coords, g, s0, s1, lo2)
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
def score_exact(p, pose, ref_of, refs, grid, max_steps):  # pragma: no cover - compiled
    """Exhaustively searched nearest vertices and signed point-to-plane distances of whole meshes.

    p (a, m, 3) float32 points, moved by ``s R p + t`` in float32 (``algebra.transform`` to
    float32) with pose = (r, s, t); ref_of (a,) reference index; refs = (q, nrm, nbr) and grid as
    in :func:`icp_iterate`. Per mesh:

    1. **Walk**, in mesh order, each point from the corresponding vertex or the previous point's
       answer shifted by one (``nearest_exact`` with ``chain``): an upper bound ``d`` of each
       point's nearest distance.
    2. **Group** the points by the grid column they fall in (a counting sort; points outside the
       grid join the edge columns), in runs of at most ``_SCORE_GROUP``.
    3. **Check** each run: the reference vertices in one box that holds every point's walk ball
       are gathered once, and each point counts those within ``d`` in float32 with a relative
       margin of 1e-5 (far above float32 rounding, so no vertex within ``d`` is missed). A count
       of one (the walk's own end) proves the walk's answer is the unique nearest vertex; any
       other count runs :func:`search_point`, the per-point check.

    The grouping only decides which points share a gathered list, never an answer. Returns
    near (a, m) int64, d (a, m) float32 ``n_q . (x - q)`` and ss (a,) float64, the sum of the
    squared distances (in float64) in ``algebra.rowsum``'s order: 8 interleaved partial sums, front
    to back, combined pairwise.
    """
    r, s, t = pose
    q, nrm, nbr = refs
    axes, origin, dims, cell = grid[0], grid[1], grid[2], grid[3]
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
            c, best = walk_bound(u[0], u[1], u[2], c, best, g, q, nbr, max_steps)
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
                nl = _gather_box((bl0, bh0, bl1, bh1, bl2, bh2), g, grid, (lx, ly, lz))
                for k in range(lo, hi):
                    i = order[k]
                    thr = np.float32(ds[i] * (1.0 + 1e-5) + 1e-30)
                    if _count_within(lx, ly, lz, nl, xs[i, ax[0]], xs[i, ax[1]], xs[i, ax[2]], thr) != 1:
                        cs[i], _ = search_point(np.float64(xs[i, ax[0]]), np.float64(xs[i, ax[1]]), np.float64(xs[i, ax[2]]),
                                                cs[i], ds[i], g, grid)
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
