"""Mesh metrics of the Voice2Mesh benchmark: ARE (line-ratio errors), NME (68 landmarks) and
the vertex-to-vertex RMSE.

Pure numpy functions: meshes in, per-sample scores out. A mesh is an array of shape (N, 3)
(one mesh) or (B, N, 3) (a batch) on the 53,215-vertex BFM topology, in BFM units (micrometres).
Prediction and reference broadcast over the batch axis: one reference (N, 3) can score a batch of
predictions. Results have shape (B,), or are 0-d arrays when both inputs are single meshes.
Only the vertices a metric reads are converted to float64, so large float32 batches are cheap.

The definitions follow the official Voice2Mesh evaluation code; see ``docs/metrics.md``. The
ICP point-to-plane RMSE and the part RMSE live in :mod:`v2m_bench.icp` and are re-exported here.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import ValidationError
from .topology import ARE_PAIRS, KEYPOINTS_68, OICD

__all__ = [
    "ARE_KEYS",
    "oicd",
    "are_ratios",
    "are",
    "nme_official",
    "nme",
    "rmse_v2v",
    "V2vResult",
]

#: Keys of the dict returned by :func:`are`: the four line metrics and their mean.
ARE_KEYS: tuple[str, ...] = ("ER", "FR", "MR", "CR", "mean")


def _mesh(v, name: str, need: int) -> tuple[np.ndarray, bool]:
    """Validate a (N, 3) or (B, N, 3) mesh; return it as (B, N, 3) (no copy) and whether it was single."""
    v = np.asarray(v)
    if v.ndim not in (2, 3) or v.shape[-1] != 3:
        raise ValidationError(f"expected a mesh of shape (N, 3) or (B, N, 3), found {v.shape}", key=name)
    if v.shape[-2] <= need:
        raise ValidationError(f"the mesh has {v.shape[-2]} vertices, the metric reads vertex {need}", key=name)
    if not np.issubdtype(v.dtype, np.floating):
        v = v.astype(np.float64)
    return (v[None] if v.ndim == 2 else v), v.ndim == 2


def _pair(pred, ref, need: int) -> tuple[np.ndarray, np.ndarray, bool]:
    p, p1 = _mesh(pred, "pred", need)
    r, r1 = _mesh(ref, "ref", need)
    if p.shape[1] != r.shape[1]:
        raise ValidationError(f"vertex counts differ: pred {p.shape[1]}, ref {r.shape[1]}", key="ref")
    if p.shape[0] != r.shape[0] and 1 not in (p.shape[0], r.shape[0]):
        raise ValidationError(f"batch sizes differ: pred {p.shape[0]}, ref {r.shape[0]}", key="ref")
    return p, r, p1 and r1


def _take(v: np.ndarray, ids) -> np.ndarray:
    """Gather vertices ``ids`` of a (B, N, 3) batch as float64, shape (B, len(ids), 3)."""
    return v[:, np.asarray(ids, dtype=np.int64), :].astype(np.float64)


def _dist(v: np.ndarray, a: int, b: int) -> np.ndarray:
    return np.linalg.norm(_take(v, [a])[:, 0] - _take(v, [b])[:, 0], axis=-1)


def _out(x: np.ndarray, single: bool) -> np.ndarray:
    return x.reshape(()) if single else x


def oicd(v) -> np.ndarray:
    """The normalising length: the 3-D distance between vertices 2217 and 14607.

    Parameters
    ----------
    v : array_like, shape (B, N, 3) or (N, 3)
        Meshes, BFM units (micrometres).

    Returns
    -------
    ndarray, shape (B,) (0-d for one mesh), float64, BFM units.
    """
    m, single = _mesh(v, "v", max(OICD))
    return _out(_dist(m, *OICD), single)


def are_ratios(v) -> dict[str, np.ndarray]:
    """The four line ratios D/OICD of each mesh.

    ``D_k`` is the 3-D distance between the two vertices ``ARE_PAIRS[k]`` (ER 20636-34153,
    FR 1678-42117, MR 2130-15003, CR 2294-13635) and OICD the distance 2217-14607. On the BFM
    mean shape: ER 1.4108, FR 1.1594, MR 1.1104, CR 1.0044.

    Parameters
    ----------
    v : array_like, shape (B, N, 3) or (N, 3)
        Meshes (any length unit: the ratios are unitless).

    Returns
    -------
    dict
        ``{"ER", "FR", "MR", "CR"}`` -> ndarray (B,) float64 (0-d for one mesh).
    """
    need = max(max(OICD), *(max(p) for p in ARE_PAIRS.values()))
    m, single = _mesh(v, "v", need)
    o = _dist(m, *OICD)
    return {k: _out(_dist(m, a, b) / o, single) for k, (a, b) in ARE_PAIRS.items()}


def are(pred, ref) -> dict[str, np.ndarray]:
    """ARE, the absolute ratio errors of the official code, per prediction.

    For each line ``k`` in ER, FR, MR, CR::

        ARE_k = | D_k(pred) / OICD(pred) - D_k(ref) / OICD(ref) |

    and ``mean`` = the mean of the four. Invariant to scaling, rotating and translating either mesh.

    Parameters
    ----------
    pred : array_like, shape (B, N, 3) or (N, 3)
        Predicted meshes (BFM topology).
    ref : array_like, shape (B, N, 3) or (N, 3)
        Reference meshes; one (N, 3) reference is used for every prediction.

    Returns
    -------
    dict
        ``{"ER", "FR", "MR", "CR", "mean"}`` -> ndarray (B,) float64, unitless (0-d arrays when
        both inputs are single meshes).
    """
    need = max(max(OICD), *(max(p) for p in ARE_PAIRS.values()))
    p, r, single = _pair(pred, ref, need)
    rp, rr = are_ratios(p), are_ratios(r)
    out = {k: np.abs(rp[k] - rr[k]) for k in ARE_PAIRS}
    out["mean"] = (out["ER"] + out["FR"] + out["MR"] + out["CR"]) / 4.0
    return {k: _out(x, single) for k, x in out.items()}


def _landmark_residuals(pred, ref, keypoints):
    """Scaled landmark differences (B, K, 3) and the normaliser sqrt(yrange * xrange) of ref (B,)."""
    kp = np.asarray(KEYPOINTS_68 if keypoints is None else keypoints, dtype=np.int64).reshape(-1)
    if kp.size == 0 or kp.min() < 0:
        raise ValidationError("expected non-negative vertex ids", key="keypoints")
    p, r, single = _pair(pred, ref, max(int(kp.max()), *OICD))
    scale = _dist(r, *OICD) / _dist(p, *OICD)  # (B,) after broadcasting
    diff = scale[:, None, None] * _take(p, kp) - _take(r, kp)
    xr = (r[..., 0].max(axis=-1) - r[..., 0].min(axis=-1)).astype(np.float64)
    yr = (r[..., 1].max(axis=-1) - r[..., 1].min(axis=-1)).astype(np.float64)
    norm = np.broadcast_to(np.sqrt(xr * yr), scale.shape)
    return diff, norm, single


def nme_official(pred, ref, keypoints=None) -> np.ndarray:
    """Landmark error exactly as the official Voice2Mesh code computes it (reported as "NME").

    The prediction is scaled about the origin by ``s = OICD(ref) / OICD(pred)`` (no rotation, no
    translation); then::

        NME_official = || s * P - R ||_2 / sqrt( yrange(ref) * xrange(ref) )

    where ``P``, ``R`` are the K keypoints of prediction and reference flattened to 3K-vectors (the
    L2 norm of the whole 204-vector for 68 keypoints, NOT a per-landmark mean) and ``xrange``,
    ``yrange`` are max - min of the x and y coordinates over ALL vertices of the reference mesh.

    Parameters
    ----------
    pred : array_like, shape (B, N, 3) or (N, 3)
        Predicted meshes, BFM units.
    ref : array_like, shape (B, N, 3) or (N, 3)
        Reference meshes (one (N, 3) reference scores every prediction).
    keypoints : array_like of int, shape (K,), optional
        Landmark vertex ids; default ``topology.KEYPOINTS_68``.

    Returns
    -------
    ndarray, shape (B,) float64, unitless (0-d when both inputs are single meshes).
    """
    diff, norm, single = _landmark_residuals(pred, ref, keypoints)
    err = np.sqrt(np.sum(diff**2, axis=(1, 2))) / norm
    return _out(err, single)


def nme(pred, ref, keypoints=None) -> np.ndarray:
    """Standard NME: mean per-landmark 3-D distance over the normaliser (same alignment as official).

    Same scaling (``s = OICD(ref) / OICD(pred)``, no rotation or translation) and the same
    normaliser as :func:`nme_official`, but the mean over landmarks of each landmark's L2 error::

        NME = (1/K) * sum_k || s * p_k - r_k ||_2 / sqrt( yrange(ref) * xrange(ref) )

    Since the mean of K distances is at most their root-mean-square,
    ``nme <= nme_official / sqrt(K)``, with equality exactly when all K landmark errors are equal
    (for 68 landmarks the official figure is at least 8.2 times this one).

    Parameters
    ----------
    pred : array_like, shape (B, N, 3) or (N, 3)
        Predicted meshes, BFM units.
    ref : array_like, shape (B, N, 3) or (N, 3)
        Reference meshes.
    keypoints : array_like of int, shape (K,), optional
        Landmark vertex ids; default ``topology.KEYPOINTS_68``.

    Returns
    -------
    ndarray, shape (B,) float64, unitless (0-d when both inputs are single meshes).
    """
    diff, norm, single = _landmark_residuals(pred, ref, keypoints)
    err = np.linalg.norm(diff, axis=-1).mean(axis=-1) / norm
    return _out(err, single)


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


# ICP point-to-plane RMSE and part RMSE are written in v2m_bench/icp.py (re-exported here).
try:
    from .icp import icp_rmse, part_rmse  # noqa: E402
except ImportError:  # icp.py not there yet
    pass
else:
    __all__ += ["icp_rmse", "part_rmse"]
