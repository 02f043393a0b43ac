"""Compiled ICP pipeline of the metrics (numba): normals, centring, the correspondence fit's sums,
the ICP iterations and the exhaustive scores, prediction after prediction.

The only module of the package that the engine choice imports (:func:`.search.exact_engine`,
through ``_checks.engine``, on first use), so ``import v2m_bench.metrics`` needs numpy, scipy and h5py alone. The
searches themselves are in :mod:`.grid_kernels` and the exhaustive score in :mod:`.score_kernels`
(:func:`build_grids`, :func:`nearest_exact` and :func:`score_exact` are re-exported here). Argument groups: ``refs = (q, nrm, nbr)`` (centred float32 reference
vertices (G, n, 3), their normals, the walk graph (n, K)); ``grid`` the tuple of
:func:`build_grids`; ``pose = (r, s, t)``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .grid_kernels import build_grids, nearest_exact, search_ball, search_point, walk_bound, walk_one
from .score_kernels import score_exact

__all__ = ["build_grids", "center_references", "nearest_exact", "normals32", "cross_covariance", "icp_iterate", "score_exact"]


# ------------------------------------------------------------------- the compiled ICP pipeline
# The same algorithm as the numpy engine (numpy_engine.py; see v2m_bench.metrics.icp and
# docs/metrics.md), sample after sample in compiled loops: nothing here depends on which other
# samples are processed, so a prediction's result never depends on its batch or on threads. Sums
# run front to back in float64; the results agree with the numpy path to rounding (not bit for
# bit: its sums and linear solves group terms differently).


@njit(nogil=True, cache=True)
def normals32(q, tri):  # pragma: no cover - compiled
    """Area-weighted unit vertex normals of each reference: q (G, n, 3) float32, tri (F, 3) ->
    (G, n, 3) float32. Face normals (unnormalised cross products) in float32, summed per vertex in
    float64 in triangle order, normalised in float64 (``walk.normals32`` for one reference)."""
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
    """Centroids and centred float32 vertices of the references ``ref[rows]`` (``driver.chunk_references``).

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
def icp_iterate(samples, pose, refs, grid, settings):  # pragma: no cover - compiled
    """Levenberg-Marquardt point-to-plane ICP of each sample (``numpy_engine.icp_iterations``, compiled).

    samples = (p_it, q_it, ref_of, start, pivot): p_it (a, S, 3) float64 prediction iteration
    vertices; q_it (a, S, 3) float64 their reference positions; ref_of (a,) reference index; start
    (a, S) start vertices of the searches; pivot (a, 3) rotation centre. pose = (r (a, 3, 3),
    s (a,), t (a, 3)) the start transforms. refs = (q (G, n, 3) float32 reference vertices, nrm
    (G, n, 3) float32 normals, nbr (n, K) walk graph); grid their column grids. settings =
    (max_iter, damping, rmse_rtol, tol, exact, margin, max_steps): ``tol`` in input units;
    ``exact``: nearest vertices by the exhaustive search, else by the walk alone; ``margin``: the
    extra radius of the exhaustive searches that lets a point reuse its answer while it moves
    less than half the gap to its second-nearest vertex (0: no reuse). Returns the best iterate's
    r, s, t, the evaluations, converged flags and nearest vertices.
    """
    p_it, q_it, ref_of, start, pivot = samples
    r, s, t = pose
    q, nrm, nbr = refs
    max_iter, damping, rmse_rtol, tol, exact, margin, max_steps = settings
    axes = grid[0]
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
        cur_r = r[b].copy()
        cur_s = s[b]
        cur_t = t[b].copy()
        best_r = cur_r.copy()
        best_s = cur_s
        best_t = cur_t.copy()
        best_c = out_c[b]
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
            m00 = cur_s * cur_r[0, 0]
            m01 = cur_s * cur_r[0, 1]
            m02 = cur_s * cur_r[0, 2]
            m10 = cur_s * cur_r[1, 0]
            m11 = cur_s * cur_r[1, 1]
            m12 = cur_s * cur_r[1, 2]
            m20 = cur_s * cur_r[2, 0]
            m21 = cur_s * cur_r[2, 1]
            m22 = cur_s * cur_r[2, 2]
            f = 0.0
            # the normal equations' sums, accumulated in point order in registers (written out one
            # scalar per entry: each sum keeps its own front-to-back order, as in the numpy engine)
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
                x0 = m00 * p0 + m01 * p1 + m02 * p2 + cur_t[0]
                x1 = m10 * p0 + m11 * p1 + m12 * p2 + cur_t[1]
                x2 = m20 * p0 + m21 * p1 + m22 * p2 + cur_t[2]
                # the search sees the point in float32, as the numpy path's tables do
                z = (np.float64(np.float32(x0)), np.float64(np.float32(x1)), np.float64(np.float32(x2)))
                y0 = z[ax[0]]
                y1 = z[ax[1]]
                y2 = z[ax[2]]
                c = best_c[i]
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
                    c, dd = walk_bound(z[0], z[1], z[2], c, d0 * d0 + d1 * d1 + d2 * d2, g, q, nbr, max_steps)
                    d0 = y0 - q[g, c, ax[0]]
                    d1 = y1 - q[g, c, ax[1]]
                    d2 = y2 - q[g, c, ax[2]]
                    dd = d0 * d0 + d1 * d1 + d2 * d2
                    if margin > 0.0:
                        c, dd, lb2 = search_ball(y0, y1, y2, np.sqrt(dd) * (1.0 + 1e-9) + 1e-9 + margin, g, grid)
                        sl = 0.5 * (np.sqrt(lb2) - np.sqrt(dd)) * (1.0 - 1e-9) - 1e-6
                        slack[i] = sl
                        ccert[i] = c
                        xcert[i, 0] = y0
                        xcert[i, 1] = y1
                        xcert[i, 2] = y2
                    else:
                        c, dd = search_point(y0, y1, y2, c, dd, g, grid)
                else:
                    d0 = y0 - q[g, c, ax[0]]
                    d1 = y1 - q[g, c, ax[1]]
                    d2 = y2 - q[g, c, ax[2]]
                    c, dd = walk_one(y0, y1, y2, c, d0 * d0 + d1 * d1 + d2 * d2, g, ax, q, nbr, max_steps)
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
                best_r[:] = cur_r
                best_s = cur_s
                best_t[:] = cur_t
                best_c[:] = cc
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
                    cur_r[u, w] = rot[u, 0] * best_r[0, w] + rot[u, 1] * best_r[1, w] + rot[u, 2] * best_r[2, w]
            v0 = best_t[0] - o0
            v1 = best_t[1] - o1
            v2 = best_t[2] - o2
            piv = (o0, o1, o2)
            for u in range(3):
                cur_t[u] = rot[u, 0] * v0 + rot[u, 1] * v1 + rot[u, 2] * v2 + piv[u] + delta[3 + u]
            moved = th * rmax + np.sqrt(delta[3] * delta[3] + delta[4] * delta[4] + delta[5] * delta[5])
            if moved <= tol:
                conv[b] = True
                break
        out_r[b] = best_r
        out_s[b] = best_s
        out_t[b] = best_t
        out_c[b] = best_c
    return out_r, out_s, out_t, iters, conv, out_c
