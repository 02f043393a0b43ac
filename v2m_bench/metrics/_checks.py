"""Input checks shared by the metric functions (one validator per kind of argument, one message
each), and the vertex gathers of ARE and NME.

Every check raises :class:`~v2m_bench.errors.ValidationError` naming the argument (``pred``,
``ref``, ``triangles``, ``group``, ``regions[...]``) and what was expected.
"""

from __future__ import annotations

import importlib
from typing import Mapping

import numpy as np

from ..errors import ValidationError

__all__ = ["meshes", "mesh_batch", "mesh_pair", "reads_vertex", "finite", "not_finite", "triangles", "group", "regions",
           "squeeze", "take", "distance", "engine"]


def meshes(a, key: str) -> tuple[np.ndarray, bool]:
    """A mesh (N, 3) or a batch (B, N, 3) as a (B, N, 3) array (no copy when possible).

    Torch tensors are read on the host; integer coordinates become float64, floating ones keep
    their dtype. Returns the batch and whether a single mesh was given.
    """
    if type(a).__module__.startswith("torch"):
        a = a.detach().cpu().numpy()
    try:
        arr = np.asarray(a)
    except Exception as e:  # noqa: BLE001 - anything numpy cannot read is a user error here
        raise ValidationError(f"cannot read as an array: {e}", key=key) from None
    if arr.dtype.kind not in "fiu":
        raise ValidationError(f"expected numeric coordinates, found dtype {arr.dtype}", key=key)
    if arr.ndim not in (2, 3) or arr.shape[-1] != 3:
        raise ValidationError(f"expected a mesh of shape (N, 3) or a batch of shape (B, N, 3), found {arr.shape}", key=key)
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    return (arr[None] if arr.ndim == 2 else arr), arr.ndim == 2


def reads_vertex(v: np.ndarray, key: str, vertex: int) -> None:
    """Refuse a (B, N, 3) batch whose meshes lack vertex ``vertex``."""
    if v.shape[1] <= vertex:
        raise ValidationError(f"the meshes have {v.shape[1]} vertices, the metric reads vertex {vertex}", key=key)


def mesh_pair(pred, ref, need: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Predictions and references as (B, N, 3) batches that broadcast over the batch axis.

    ``need``: the highest vertex id the metric reads. Returns pred, ref and whether both were
    single meshes.
    """
    p, p1 = meshes(pred, "pred")
    reads_vertex(p, "pred", need)
    r, r1 = meshes(ref, "ref")
    reads_vertex(r, "ref", need)
    if p.shape[1] != r.shape[1]:
        raise ValidationError(f"expected {p.shape[1]} vertices (as in pred), found {r.shape[1]}", key="ref")
    if p.shape[0] != r.shape[0] and 1 not in (p.shape[0], r.shape[0]):
        raise ValidationError(f"expected 1 or {p.shape[0]} meshes (as in pred), found {r.shape[0]}", key="ref")
    return p, r, p1 and r1


def not_finite(key: str) -> ValidationError:
    """The error for NaN or infinite coordinates in argument ``key``."""
    return ValidationError("contains NaN or infinite values", key=key)


def finite(a: np.ndarray, key: str) -> np.ndarray:
    """Refuse NaN or infinite coordinates; return ``a``."""
    if not np.isfinite(a).all():
        raise not_finite(key)
    return a


def triangles(tri, n: int) -> np.ndarray:
    """Triangles (F, 3) of 0-based vertex ids in 0..n-1 that use every vertex, as int64."""
    tri = np.asarray(tri)
    if tri.ndim != 2 or tri.shape[1] != 3 or tri.shape[0] < 1:
        raise ValidationError(f"expected shape (F, 3), found {tri.shape}", key="triangles")
    if tri.dtype.kind not in "iu":
        raise ValidationError(f"expected integer vertex ids, found dtype {tri.dtype}", key="triangles")
    tri = tri.astype(np.int64)
    if tri.min() < 0 or tri.max() >= n:
        raise ValidationError(f"vertex ids outside 0..{n - 1}", key="triangles")
    used = np.zeros(n, bool)
    used[tri.reshape(-1)] = True
    if not used.all():
        raise ValidationError(
            f"{int((~used).sum())} vertices belong to no triangle (e.g. vertex {int(np.flatnonzero(~used)[0])}); "
            "remove unused vertices first",
            key="triangles",
        )
    return tri


def group(grp, b: int, g: int) -> np.ndarray:
    """The reference index of each of ``b`` predictions among ``g`` references, as int64 (b,).

    ``None``: prediction ``i`` against reference ``i`` when ``b == g``, else the one reference.
    """
    if grp is None:
        if g == b:
            return np.arange(b)
        if g == 1:
            return np.zeros(b, np.int64)
        raise ValidationError(f"{b} predictions and {g} references: pass group= (reference index of each prediction)", key="group")
    arr = np.asarray(grp)
    if arr.shape != (b,) or arr.dtype.kind not in "iu":
        raise ValidationError(f"expected {b} integer reference indices, found shape {arr.shape} dtype {arr.dtype}", key="group")
    arr = arr.astype(np.int64)
    if b and (arr.min() < 0 or arr.max() >= g):
        raise ValidationError(f"reference indices outside 0..{g - 1}", key="group")
    return arr


def regions(masks, n: int) -> dict[str, np.ndarray]:
    """``{name: boolean mask (n,)}`` with at least 3 vertices per region (``None``: no regions)."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise ValidationError(f"expected a dict of name -> boolean vertex mask, found {type(masks).__name__}", key="regions")
    out = {}
    for name, mask in masks.items():
        m = np.asarray(mask)
        if m.dtype != bool or m.shape != (n,):
            raise ValidationError(f"expected a boolean mask of shape ({n},), found {m.dtype} {m.shape}", key=f"regions[{name!r}]")
        if m.sum() < 3:
            raise ValidationError(f"needs at least 3 vertices, found {int(m.sum())}", key=f"regions[{name!r}]")
        out[str(name)] = m
    return out


def squeeze(x: np.ndarray, single: bool) -> np.ndarray:
    """A per-mesh result (B,) as a 0-d array when the inputs were single meshes."""
    return x.reshape(()) if single else x


def mesh_batch(a, key: str, n: int | None = None) -> np.ndarray:
    """:func:`meshes` for the ICP metrics: a (B, N, 3) batch of at least one mesh of at least 3
    vertices (``n`` of them when given, as in ``pred``)."""
    arr, _ = meshes(a, key)
    if arr.shape[0] < 1 or arr.shape[1] < 3:
        raise ValidationError(f"expected at least one mesh of at least 3 vertices, found {np.shape(arr)}", key=key)
    if n is not None and arr.shape[1] != n:
        raise ValidationError(f"expected {n} vertices (as in pred), found {arr.shape[1]}", key=key)
    return arr


def take(v: np.ndarray, ids) -> np.ndarray:
    """Vertices ``ids`` of a (B, N, 3) batch as float64, shape (B, len(ids), 3)."""
    return v[:, np.asarray(ids, dtype=np.int64), :].astype(np.float64)


def distance(v: np.ndarray, a: int, b: int) -> np.ndarray:
    """3-D distance (B,) float64 between vertices ``a`` and ``b`` of each mesh of a (B, N, 3) batch."""
    return np.linalg.norm(take(v, [a])[:, 0] - take(v, [b])[:, 0], axis=-1)


def engine(name, kernels: str, fallback: str):
    """The compiled kernels an ``engine`` argument asks for: the module ``kernels`` (numba; imported
    here, on first use, so ``import v2m_bench.metrics`` needs no numba), or None for the
    ``fallback`` engine.

    ``None``/"auto": the kernels when numba imports (it comes with the project's librosa), else the
    fallback; "numba": the kernels, or an error when numba is missing; ``fallback``: None.
    """
    if name in (None, "auto", "numba"):
        try:
            return importlib.import_module(kernels)
        except ImportError:
            if name == "numba":
                raise ValidationError("numba is not installed (pip install numba)", key="engine") from None
            return None
    if name == fallback:
        return None
    raise ValidationError(f"expected 'auto', 'numba' or {fallback!r}, found {name!r}", key="engine")
