"""Compiled sums of RMSE_v2v (numba): the centred moments of each prediction-reference pair, for
the whole mesh and for each part, in one call.

Imported only by :func:`v2m_bench.metrics.v2v.rmse_v2v` with ``engine="numba"`` (or "auto" when
numba imports), so ``import v2m_bench.metrics`` needs numpy, scipy and h5py alone. The numpy
engine computes the same sums (``v2v._centred_sums``); both sum in float64, in a different order,
so the two agree to rounding, not bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["centred_sums", "N_SUMS"]

N_SUMS = 17  # mp (3), mr (3), h (9, row-major), spp, srr


@njit(nogil=True, cache=True)
def centred_sums(p, p_of, r, r_of, ids, offsets):  # pragma: no cover - compiled
    """Means and centred second moments of vertex sets of prediction-reference pairs.

    p (P, N, 3) and r (R, N, 3) float arrays; pair ``b`` is ``p[p_of[b]]`` with ``r[r_of[b]]``.
    Set ``k`` is the vertex list ``ids[offsets[k]:offsets[k + 1]]``. Per pair and set, two passes
    in float64 (every sum front to back in list order): the means ``mp``, ``mr``, then with
    ``pc = p - mp`` and ``rc = r - mr`` the cross-covariance ``h = sum pc rc^T`` and the sums of
    squares ``spp = sum |pc|^2``, ``srr = sum |rc|^2``.

    Returns (B, S, 17) float64: mp, mr, h (row-major), spp, srr.
    """
    b_ = p_of.shape[0]
    s_ = offsets.shape[0] - 1
    out = np.empty((b_, s_, 17))
    for b in range(b_):
        pi = p_of[b]
        ri = r_of[b]
        for k in range(s_):
            lo = offsets[k]
            hi = offsets[k + 1]
            m = hi - lo
            a0 = a1 = a2 = c0 = c1 = c2 = 0.0
            for j in range(lo, hi):
                v = ids[j]
                a0 += np.float64(p[pi, v, 0])
                a1 += np.float64(p[pi, v, 1])
                a2 += np.float64(p[pi, v, 2])
                c0 += np.float64(r[ri, v, 0])
                c1 += np.float64(r[ri, v, 1])
                c2 += np.float64(r[ri, v, 2])
            mp0 = a0 / m
            mp1 = a1 / m
            mp2 = a2 / m
            mr0 = c0 / m
            mr1 = c1 / m
            mr2 = c2 / m
            h00 = h01 = h02 = h10 = h11 = h12 = h20 = h21 = h22 = 0.0
            spp = srr = 0.0
            for j in range(lo, hi):
                v = ids[j]
                x0 = np.float64(p[pi, v, 0]) - mp0
                x1 = np.float64(p[pi, v, 1]) - mp1
                x2 = np.float64(p[pi, v, 2]) - mp2
                y0 = np.float64(r[ri, v, 0]) - mr0
                y1 = np.float64(r[ri, v, 1]) - mr1
                y2 = np.float64(r[ri, v, 2]) - mr2
                h00 += x0 * y0
                h01 += x0 * y1
                h02 += x0 * y2
                h10 += x1 * y0
                h11 += x1 * y1
                h12 += x1 * y2
                h20 += x2 * y0
                h21 += x2 * y1
                h22 += x2 * y2
                spp += x0 * x0 + x1 * x1 + x2 * x2
                srr += y0 * y0 + y1 * y1 + y2 * y2
            o = out[b, k]
            o[0] = mp0
            o[1] = mp1
            o[2] = mp2
            o[3] = mr0
            o[4] = mr1
            o[5] = mr2
            o[6] = h00
            o[7] = h01
            o[8] = h02
            o[9] = h10
            o[10] = h11
            o[11] = h12
            o[12] = h20
            o[13] = h21
            o[14] = h22
            o[15] = spp
            o[16] = srr
    return out
