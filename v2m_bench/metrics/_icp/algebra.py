"""The small float64 algebra of the ICP metrics, written so that a sample's result never depends on
the batch it is in.

Batched matmul/einsum may pick different kernels, and so different roundings, by batch size; the
3x3 products here are written elementwise and the row sums in one fixed order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mat3", "matvec3", "transform", "rowsum", "dot3", "rotation_from_vector", "initial_fit", "fit_from_sums"]


def mat3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 3, 3) @ (n, 3, 3)."""
    out = np.empty(np.broadcast_shapes(a.shape, b.shape))
    for i in range(3):
        for j in range(3):
            out[:, i, j] = a[:, i, 0] * b[:, 0, j] + a[:, i, 1] * b[:, 1, j] + a[:, i, 2] * b[:, 2, j]
    return out


def matvec3(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(n, 3, 3) @ (n, 3)."""
    return np.stack([a[:, i, 0] * v[:, 0] + a[:, i, 1] * v[:, 1] + a[:, i, 2] * v[:, 2] for i in range(3)], axis=1)


def transform(p: np.ndarray, r: np.ndarray, s: np.ndarray, t: np.ndarray, dtype=np.float64) -> np.ndarray:
    """(a, n, 3) points -> s R p + t, elementwise in ``dtype``."""
    m = (s[:, None, None] * r).astype(dtype)
    tt = t.astype(dtype)
    p0, p1, p2 = (p[..., i].astype(dtype, copy=False) for i in range(3))
    out = np.empty(p.shape, dtype)
    for j in range(3):
        out[..., j] = m[:, j, 0, None] * p0 + m[:, j, 1, None] * p1 + m[:, j, 2, None] * p2 + tt[:, j, None]
    return out


def rowsum(x: np.ndarray) -> np.ndarray:
    """Sum of each row of (a, S) in a fixed order: 8 interleaved partial sums, each accumulated
    front to back, then combined pairwise. numpy's own contiguous reductions may change the order
    with the row's memory alignment, which would make a sample's result depend on its batch."""
    a, n = x.shape
    pad = (-n) % 8
    if pad:
        x = np.concatenate([x, np.zeros((a, pad), x.dtype)], axis=1)
    lanes = x.reshape(a, -1, 8).sum(axis=1)  # a non-contiguous reduction: plain ordered adds
    l = lanes
    return ((l[:, 0] + l[:, 1]) + (l[:, 2] + l[:, 3])) + ((l[:, 4] + l[:, 5]) + (l[:, 6] + l[:, 7]))


def dot3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products along a last axis of 3, elementwise."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def rotation_from_vector(w: np.ndarray) -> np.ndarray:
    """Rodrigues: (a, 3) rotation vectors -> (a, 3, 3) rotation matrices (float64)."""
    th = np.linalg.norm(w, axis=1)
    safe = np.where(th > 0, th, 1.0)
    k = w / safe[:, None]
    kx = np.zeros((w.shape[0], 3, 3))
    kx[:, 0, 1], kx[:, 0, 2] = -k[:, 2], k[:, 1]
    kx[:, 1, 0], kx[:, 1, 2] = k[:, 2], -k[:, 0]
    kx[:, 2, 0], kx[:, 2, 1] = -k[:, 1], k[:, 0]
    s, c = np.sin(th)[:, None, None], np.cos(th)[:, None, None]
    return np.eye(3)[None] + s * kx + (1.0 - c) * mat3(kx, kx)


def initial_fit(p: np.ndarray, q: np.ndarray, with_scale: bool):
    """Kabsch / Umeyama fit of one prediction (N, 3) to its reference (N, 3).

    Means in float64; the cross-covariance of the centred float32 coordinates; SVD in float64.
    """
    mp, mq = p.mean(axis=0, dtype=np.float64), q.mean(axis=0, dtype=np.float64)
    pc = (p - mp.astype(p.dtype)).astype(np.float32, copy=False)
    qc = (q - mq.astype(q.dtype)).astype(np.float32, copy=False)
    mp = mp + pc.mean(axis=0, dtype=np.float64)
    mq = mq + qc.mean(axis=0, dtype=np.float64)
    h = np.array([[np.sum(pc[:, j] * qc[:, k], dtype=np.float64) for k in range(3)] for j in range(3)])
    return fit_from_sums(mp, mq, h, float(np.sum(pc * pc, dtype=np.float64)), with_scale)


def fit_from_sums(mp, mq, h, pp, with_scale: bool):
    """The closed-form fit from the means (3,), the cross-covariance sum h (3, 3) of the centred
    coordinates and their squared norm sum ``pp``: rotation, scale, translation (float64)."""
    u, sv, vt = np.linalg.svd(h)
    d = np.ones(3)
    d[2] = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = (vt.T * d) @ u.T
    s = float((sv * d).sum() / max(float(pp), 1e-300)) if with_scale else 1.0
    return r, s, mq - s * r @ mp
