"""Small mesh-geometry helpers shared by the metrics (pure functions on batched arrays)."""

from __future__ import annotations

import numpy as np

__all__ = ["vertex_normals", "face_normals", "vertex_face_incidence"]


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def face_normals(v, triangles):
    """Unnormalised face normals (cross product of two edges: length = 2 x area).

    Parameters
    ----------
    v : ndarray or torch.Tensor, shape (..., N, 3)
    triangles : ndarray, shape (F, 3), int
        0-based vertex ids; counter-clockwise seen from outside.

    Returns
    -------
    Same kind as ``v``, shape (..., F, 3).
    """
    if _is_torch(v):
        import torch

        tri = torch.as_tensor(np.asarray(triangles), device=v.device, dtype=torch.long)
        a, b, c = v[..., tri[:, 0], :], v[..., tri[:, 1], :], v[..., tri[:, 2], :]
        return torch.linalg.cross(b - a, c - a, dim=-1)
    v = np.asarray(v)
    tri = np.asarray(triangles)
    a, b, c = v[..., tri[:, 0], :], v[..., tri[:, 1], :], v[..., tri[:, 2], :]
    return np.cross(b - a, c - a)


def vertex_face_incidence(triangles, n_vertices: int):
    """Sparse (n_vertices, F) matrix with a 1 where a vertex belongs to a face (scipy CSR)."""
    from scipy import sparse

    tri = np.asarray(triangles)
    f = tri.shape[0]
    rows = tri.reshape(-1)
    cols = np.repeat(np.arange(f), 3)
    return sparse.csr_matrix((np.ones(rows.size, np.float64), (rows, cols)), shape=(n_vertices, f))


def vertex_normals(v, triangles, incidence=None):
    """Unit vertex normals: the area-weighted mean of the incident faces' normals.

    Parameters
    ----------
    v : ndarray or torch.Tensor, shape (B, N, 3) or (N, 3)
        Vertex positions.
    triangles : ndarray, shape (F, 3), int
        0-based vertex ids.
    incidence : scipy.sparse matrix, optional
        ``vertex_face_incidence(triangles, N)``, to reuse across calls (numpy path only).

    Returns
    -------
    Same kind, dtype and shape as ``v``. A vertex in no face gets a zero normal.
    """
    fn = face_normals(v, triangles)
    if _is_torch(v):
        import torch

        tri = torch.as_tensor(np.asarray(triangles), device=v.device, dtype=torch.long).reshape(-1)
        fn3 = fn.repeat_interleave(3, dim=-2)  # (..., 3F, 3) in triangle-vertex order
        out = torch.zeros_like(v)
        out.index_add_(v.dim() - 2, tri, fn3)
        return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    v = np.asarray(v)
    n = v.shape[-2]
    if incidence is None:
        incidence = vertex_face_incidence(triangles, n)
    lead = fn.shape[:-2]
    f = fn.shape[-2]
    flat = np.moveaxis(fn.reshape(-1, f, 3), 1, 0).reshape(f, -1)  # (F, B*3)
    acc = np.asarray(incidence @ flat.astype(np.float64))  # (N, B*3)
    acc = np.moveaxis(acc.reshape(n, -1, 3), 0, 1).reshape(*lead, n, 3)
    norm = np.linalg.norm(acc, axis=-1, keepdims=True)
    out = acc / np.maximum(norm, 1e-30)
    return out.astype(v.dtype, copy=False)
