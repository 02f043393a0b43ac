"""RMSE_v2v: the vertex-to-vertex RMSE after the best rigid (or similarity) alignment.

Pure numpy: meshes (N, 3) or (B, N, 3) on one topology in, per-sample values in millimetres out
(see :mod:`v2m_bench.metrics` for the conventions and ``docs/metrics.md`` for the definition).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import ValidationError
from ._checks import mesh_pair as _pair
from ._checks import squeeze as _out

__all__ = ["rmse_v2v", "V2vResult"]


class V2vResult(NamedTuple):
    """What :func:`rmse_v2v` returns with ``return_alignment=True``.

    Attributes
    ----------
    rmse : ndarray, shape (B,), float64
        Millimetres.
    rotation : ndarray, shape (B, 3, 3)
    scale : ndarray, shape (B,)
        1 for the rigid alignment.
    translation : ndarray, shape (B, 3), BFM units
        ``aligned = scale * pred @ rotation.T + translation``.
    distances : ndarray, shape (B, N), float64
        Per-vertex distance (mm) after the alignment.
    """

    rmse: np.ndarray
    rotation: np.ndarray
    scale: np.ndarray
    translation: np.ndarray
    distances: np.ndarray


def _procrustes(h: np.ndarray, spp: np.ndarray, with_scale: bool):
    """Least-squares rotation (B, 3, 3) and scale (B,) from the cross-covariance h (B, 3, 3) of the
    centred point sets and the prediction's sum of squares spp (B,)."""
    u, sv, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(np.matmul(u, vt)))
    d = np.where(d == 0, 1.0, d)
    fix = np.ones((h.shape[0], 3))
    fix[:, 2] = d
    rot = np.matmul(vt.transpose(0, 2, 1) * fix[:, None, :], u.transpose(0, 2, 1))  # V diag(1, 1, d) U^T
    if with_scale:
        scale = np.einsum("bi,bi->b", sv, fix) / np.where(spp > 0, spp, 1.0)
    else:
        scale = np.ones(h.shape[0])
    return rot, scale


def rmse_v2v(pred, ref, *, with_scale: bool = False, regions=None, units_per_mm: float = 1000.0,
             return_alignment: bool = False):
    """Vertex-to-vertex RMSE after the best rigid (or similarity) alignment, in millimetres.

    Prediction and reference share the topology, so vertex ``i`` of one corresponds to vertex
    ``i`` of the other and the error between them is known exactly: the prediction is aligned to
    the reference by the least-squares rigid transform over all vertex pairs (Kabsch; with
    ``with_scale`` a similarity, Umeyama), then::

        RMSE_v2v = sqrt( (1/N) * sum_i || s R p_i + t - r_i ||^2 ) / units_per_mm

    It is the smallest RMS vertex distance any rigid (similarity) motion of the prediction can
    reach, so it never reads below the ICP point-to-plane RMSE of the same alignment class (a
    point-to-plane distance is at most the distance to the nearest vertex, which is at most the
    distance to the corresponding one). Computed in float64.

    Parameters
    ----------
    pred : array_like, shape (B, N, 3) or (N, 3)
        Predicted meshes, BFM units (micrometres).
    ref : array_like, shape (B, N, 3) or (N, 3)
        Reference meshes; one (N, 3) reference is used for every prediction.
    with_scale : bool
        Similarity instead of rigid alignment.
    regions : dict of str -> bool ndarray (N,), optional
        Also return the same error per region, each region aligned on its own vertices (as the
        part RMSE registers each part on its own).
    units_per_mm : float
        Mesh units per millimetre (1000 for BFM micrometres).
    return_alignment : bool
        Return a :class:`V2vResult` (transform and per-vertex distances) instead of the RMSE.

    Returns
    -------
    ndarray, shape (B,) float64, mm (0-d when both inputs are single meshes), or V2vResult
        With ``regions``: a tuple ``(global, {name: ndarray (B,)})``.
    """
    p, r, single = _pair(pred, ref, 2)
    if p.shape[0] == 1 and r.shape[0] > 1:
        p = np.broadcast_to(p, r.shape)
    if r.shape[0] == 1 and p.shape[0] > 1:
        r = np.broadcast_to(r, p.shape)

    def moments(v):
        """float64 copy of v (B, n, 3), its centroid (B, 3) and its raw sum of squares (B,)."""
        v = np.asarray(v, dtype=np.float64)
        b, n, _ = v.shape
        m = np.matmul(np.full((1, n), 1.0 / n), v)[:, 0]  # BLAS (a strided mean is slow)
        flat = v.reshape(b, -1)  # a copy when v is a part's gather: made once
        return v, m, np.einsum("bk,bk->b", flat, flat)

    def one(pp, rr, explicit):
        pv, mp, sp = moments(pp)
        rv, mr, sr = moments(rr)
        b, n = pv.shape[:2]
        # centred sums without centred copies: H = P^T R - n mp mr^T, |pc|^2 = |P|^2 - n |mp|^2
        h = np.matmul(pv.transpose(0, 2, 1), rv) - n * mp[:, :, None] * mr[:, None, :]
        spp = sp - n * np.einsum("bi,bi->b", mp, mp)
        srr = sr - n * np.einsum("bi,bi->b", mr, mr)
        rot, scale = _procrustes(h, spp, with_scale)
        a = scale[:, None, None] * rot
        t = mr - np.matmul(a, mp[:, :, None])[..., 0]
        if not explicit:  # E = s^2 |pc|^2 + |rc|^2 - 2 s tr(R H): exact but for cancellation
            e = scale * scale * spp + srr - 2 * scale * np.einsum("bij,bji->b", rot, h)
            ok = e > 1e-6 * (scale * scale * sp + sr)  # else computed vertex by vertex below
            msq = np.where(ok, e, np.nan) / n
            if not ok.all():
                bad = np.flatnonzero(~ok)
                msq[bad] = np.mean(one(pp[bad], rr[bad], True)[3] ** 2, axis=1) * units_per_mm**2
            return rot, scale, t, np.sqrt(msq) / units_per_mm
        diff = np.matmul(pv, a.transpose(0, 2, 1))
        diff += (t - mr)[:, None, :]
        diff -= rv - mr[:, None, :]
        dist = np.sqrt(np.einsum("bni,bni->bn", diff, diff)) / units_per_mm
        return rot, scale, t, dist

    if return_alignment:
        rot, scale, t, dist = one(p, r, True)
        out = V2vResult(np.sqrt(np.mean(dist * dist, axis=1)), rot, scale, t, dist)
    else:
        out = _out(one(p, r, False)[3], single)
    if regions is None:
        return out
    parts = {}
    for name, mask in regions.items():
        m = np.asarray(mask, dtype=bool)
        if m.shape != (p.shape[1],) or m.sum() < 3:
            raise ValidationError(f"expected a boolean mask of {p.shape[1]} vertices with at least 3 set", key=f"regions[{name!r}]")
        # the part's vertices as p[:, m] gives them (same values, same memory layout, so the same
        # sums to the last bit), gathered along the first axis of the transposed view: faster
        idx = np.flatnonzero(m)
        pm, rm = (v.transpose(1, 0, 2)[idx].transpose(1, 0, 2) for v in (p, r))
        parts[str(name)] = _out(one(pm, rm, False)[3], single)
    return out, parts
