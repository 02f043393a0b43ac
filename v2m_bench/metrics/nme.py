"""NME: the landmark error at 68 keypoints, as the official code reports it and in the standard form.

Pure numpy: meshes (N, 3) or (B, N, 3) on the BFM topology in, per-sample values out (see
:mod:`v2m_bench.metrics` for the conventions and ``docs/metrics.md`` for the definition).
"""

from __future__ import annotations

import numpy as np

from ..errors import ValidationError
from ..topology import KEYPOINTS_68, OICD
from ._checks import distance, mesh_pair, squeeze, take

__all__ = ["nme_official", "nme"]


def _landmark_residuals(pred, ref, keypoints):
    """Scaled landmark differences (B, K, 3) and the normaliser sqrt(yrange * xrange) of ref (B,)."""
    kp = np.asarray(KEYPOINTS_68 if keypoints is None else keypoints, dtype=np.int64).reshape(-1)
    if kp.size == 0 or kp.min() < 0:
        raise ValidationError("expected non-negative vertex ids", key="keypoints")
    p, r, single = mesh_pair(pred, ref, max(int(kp.max()), *OICD))
    scale = distance(r, *OICD) / distance(p, *OICD)  # (B,) after broadcasting
    diff = scale[:, None, None] * take(p, kp) - take(r, kp)
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
    return squeeze(err, single)


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
    return squeeze(err, single)
