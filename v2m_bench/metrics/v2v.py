"""RMSE_v2v: the vertex-to-vertex RMSE after the best rigid (or similarity) alignment.

Pure numpy: meshes (N, 3) or (B, N, 3) on one topology in, per-sample values in millimetres out
(see :mod:`v2m_bench.metrics` for the conventions and ``docs/metrics.md`` for the definition).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import ValidationError
from . import _checks
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
             return_alignment: bool = False, engine: str | None = None):
    """Vertex-to-vertex RMSE after the best rigid (or similarity) alignment, in millimetres.

    Prediction and reference share the topology, so vertex ``i`` of one corresponds to vertex
    ``i`` of the other and the error between them is known exactly: the prediction is aligned to
    the reference by the least-squares rigid transform over all vertex pairs (Kabsch; with
    ``with_scale`` a similarity, Umeyama), then::

        RMSE_v2v = sqrt( (1/N) * sum_i || s R p_i + t - r_i ||^2 ) / units_per_mm

    It is the smallest RMS vertex distance any rigid (similarity) motion of the prediction can
    reach, so it never reads below the ICP point-to-plane RMSE of the same alignment class (a
    point-to-plane distance is at most the distance to the nearest vertex, which is at most the
    distance to the corresponding one). Computed in float64 from centred sums; where the residual
    is below 1e-4 of the centred sums of squares (near-perfect fits, where the closed form would
    cancel) it is summed vertex by vertex.

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
    engine : {None, "auto", "numba", "numpy"}
        Who computes the sums: compiled (numba; ``None``/"auto" when it imports, about 3x faster
        on the benchmark's batches) or numpy. The two sum in a different order and agree to
        rounding (about 1e-11 relative).

    Returns
    -------
    ndarray, shape (B,) float64, mm (0-d when both inputs are single meshes), or V2vResult
        With ``regions``: a tuple ``(global, {name: ndarray (B,)})``.

    Examples
    --------
    >>> import numpy as np
    >>> from v2m_bench.metrics import rmse_v2v
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.normal(size=(500, 3)) * 50_000          # micrometres
    >>> moved = ref @ np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]).T + 7_000
    >>> float(rmse_v2v(moved, ref)) < 1e-6                 # a rigid motion costs nothing
    True
    >>> noisy = ref + rng.normal(size=ref.shape) * 1_000   # 1 mm of noise per axis
    >>> round(float(rmse_v2v(noisy, ref)), 1)              # about sqrt(3) mm
    1.7
    """
    p, r, single = _pair(pred, ref, 2)
    kernels = _engine(engine)
    b = max(p.shape[0], r.shape[0])
    p_of = np.arange(b) if p.shape[0] == b else np.zeros(b, np.int64)  # broadcasting by index, not by copy
    r_of = np.arange(b) if r.shape[0] == b else np.zeros(b, np.int64)
    sets = [np.arange(p.shape[1])]
    names = []
    for name, mask in (regions or {}).items():
        m = np.asarray(mask, dtype=bool)
        if m.shape != (p.shape[1],) or m.sum() < 3:
            raise ValidationError(f"expected a boolean mask of {p.shape[1]} vertices with at least 3 set", key=f"regions[{name!r}]")
        names.append(str(name))
        sets.append(np.flatnonzero(m))
    sums = _sums(kernels, p, p_of, r, r_of, sets)
    if return_alignment:
        rot, scale, t = _alignment(sums[:, 0], with_scale)
        dist = _distances(p, p_of, r, r_of, sets[0], rot, scale, t) / units_per_mm
        out = V2vResult(np.sqrt(np.mean(dist * dist, axis=1)), rot, scale, t, dist)
    else:
        out = _out(_rmse(sums[:, 0], p, p_of, r, r_of, sets[0], with_scale, units_per_mm), single)
    if regions is None:
        return out
    parts = {name: _out(_rmse(sums[:, k + 1], p, p_of, r, r_of, sets[k + 1], with_scale, units_per_mm), single)
             for k, name in enumerate(names)}
    return out, parts


def _engine(name):
    """The compiled sums (module ``_v2v_kernels``, numba) or None for numpy."""
    return _checks.engine(name, "v2m_bench.metrics._v2v_kernels", "numpy")


def _sums(kernels, p, p_of, r, r_of, sets) -> np.ndarray:
    """(B, S, 17) float64 per pair and vertex set: mp, mr, h (row-major), spp, srr (see
    ``_v2v_kernels.centred_sums``, whose definition the numpy branch follows)."""
    if kernels is not None:
        ids = np.concatenate(sets).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum([s.size for s in sets])]).astype(np.int64)
        p_c = p if p.flags.c_contiguous else np.ascontiguousarray(p)
        r_c = r if r.flags.c_contiguous else np.ascontiguousarray(r)
        return kernels.centred_sums(p_c, p_of.astype(np.int64), r_c, r_of.astype(np.int64), ids, offsets)
    out = np.empty((p_of.size, len(sets), 17))
    for k, idx in enumerate(sets):
        x = _take(p, p_of, idx)
        y = _take(r, r_of, idx)
        mp = _mean(x)
        mr = _mean(y)
        x -= mp[:, None, :]
        y -= mr[:, None, :]
        out[:, k, 0:3] = mp
        out[:, k, 3:6] = mr
        out[:, k, 6:15] = np.matmul(x.transpose(0, 2, 1), y).reshape(-1, 9)
        out[:, k, 15] = np.einsum("bk,bk->b", x.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1))
        out[:, k, 16] = np.einsum("bk,bk->b", y.reshape(y.shape[0], -1), y.reshape(y.shape[0], -1))
    return out


def _take(v, rows, idx) -> np.ndarray:
    """float64 copy (B, len(idx), 3), C-ordered, of vertices ``idx`` of meshes ``v[rows]``."""
    if idx.size == v.shape[1] and idx[-1] == idx.size - 1:  # every vertex (idx is sorted): no gather
        g = v
    else:  # the values of v[:, idx], gathered along the first axis of the transposed view (faster)
        g = v.transpose(1, 0, 2)[idx].transpose(1, 0, 2)
    if not (rows.size == v.shape[0] and np.array_equal(rows, np.arange(rows.size))):
        g = g[rows]
    return np.array(g, dtype=np.float64, order="C")  # always a copy: the caller centres it in place


def _mean(x: np.ndarray) -> np.ndarray:
    """Centroids (B, 3) of a float64 batch (B, n, 3), as one BLAS product (a reduction over the
    middle axis is several times slower)."""
    return np.matmul(np.full((1, x.shape[1]), 1.0 / x.shape[1]), x)[:, 0]


def _alignment(s: np.ndarray, with_scale: bool):
    """Rotation (B, 3, 3), scale (B,) and translation (B, 3) from the sums (B, 17) of one set."""
    mp, mr, h, spp = s[:, 0:3], s[:, 3:6], s[:, 6:15].reshape(-1, 3, 3), s[:, 15]
    rot, scale = _procrustes(h, spp, with_scale)
    t = mr - np.matmul(scale[:, None, None] * rot, mp[:, :, None])[..., 0]
    return rot, scale, t


def _distances(p, p_of, r, r_of, idx, rot, scale, t) -> np.ndarray:
    """Per-vertex distances (B, len(idx)) in mesh units after the alignment (vertex by vertex)."""
    x = _take(p, p_of, idx)
    y = _take(r, r_of, idx)
    mr = _mean(y)
    diff = np.matmul(x, (scale[:, None, None] * rot).transpose(0, 2, 1))
    diff += (t - mr)[:, None, :]  # both sides about the reference's centroid: smaller numbers
    diff -= y - mr[:, None, :]
    return np.sqrt(np.einsum("bni,bni->bn", diff, diff))


def _rmse(s, p, p_of, r, r_of, idx, with_scale, units_per_mm) -> np.ndarray:
    """RMSE_v2v (B,) in mm of one vertex set from its sums (B, 17): the closed form
    ``E = s^2 spp + srr - 2 s tr(R h)``, or vertex by vertex where E would cancel."""
    rot, scale, t = _alignment(s, with_scale)
    h, spp, srr = s[:, 6:15].reshape(-1, 3, 3), s[:, 15], s[:, 16]
    e = scale * scale * spp + srr - 2 * scale * np.einsum("bij,bji->b", rot, h)
    n = idx.size
    ok = e > 1e-4 * (scale * scale * spp + srr)
    msq = np.where(ok, e, np.nan) / n
    if not ok.all():
        bad = np.flatnonzero(~ok)
        d = _distances(p, p_of[bad], r, r_of[bad], idx, rot[bad], scale[bad], t[bad])
        msq[bad] = np.mean(d * d, axis=1)
    return np.sqrt(msq) / units_per_mm
