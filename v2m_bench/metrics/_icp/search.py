"""Exhaustive nearest-vertex searches: scipy k-d trees or the compiled column grids, and the engine choice.

Both searches are exhaustive, so the choice changes the time, not the result (up to exact
distance ties: the compiled search takes the lowest vertex id).
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from .algebra import dot3
from .walk import NumpyBackend

__all__ = ["GRID_CELL", "exact_engine", "make_search", "KdTrees", "Grids", "exact_pass"]

GRID_CELL = 5.0  # column edge of the exhaustive search's grids, in mean vertex spacings (no effect on results)


def exact_engine(name: str | None):
    """The compiled kernels (module :mod:`.kernels`, numba) or None for scipy k-d trees.

    ``None``/"auto": numba when it imports (it comes with the project's librosa), else k-d trees.
    """
    return _checks.engine(name, "v2m_bench.metrics._icp.kernels", "kdtree")


def make_search(positions, nbr, kernels, max_steps):
    """An exhaustive search over references ``positions`` (G, n, 3) float32: grids with the
    compiled kernels, else k-d trees."""
    return KdTrees(positions) if kernels is None else Grids(positions, nbr, kernels, max_steps)


class Grids:
    """Exact nearest vertices with the compiled column-grid search (see :mod:`.grid_kernels`).

    positions (G, n, 3) float32 reference vertices; nbr (n, K) the walk graph. Same interface as
    :class:`KdTrees`, plus starts (the first distance bound of each point; default: the
    corresponding vertex).
    """

    def __init__(self, positions, nbr, kernels, max_steps):
        self.positions = np.ascontiguousarray(positions, dtype=np.float32)
        self.nbr = np.ascontiguousarray(nbr, dtype=np.int64)
        self.kernels = kernels
        self.max_steps = int(max_steps)
        self.grid = kernels.build_grids(self.positions, GRID_CELL)

    def query(self, x, ref_index, start=None) -> np.ndarray:
        """Nearest vertices (a, s) int64 of points x (a, s, 3) in the frames of references ``ref_index`` (a,)."""
        a, s = x.shape[:2]
        chain = start is None
        if start is None:
            start = np.broadcast_to(np.arange(s, dtype=np.int64) % self.positions.shape[1], (a, s))
        queries = (
            np.ascontiguousarray(x.reshape(-1, 3), dtype=np.float32),
            np.repeat(np.asarray(ref_index, dtype=np.int64), s),
            np.ascontiguousarray(start, dtype=np.int64).reshape(-1),
        )
        out = self.kernels.nearest_exact(queries, self.positions, self.nbr, self.grid, chain, self.max_steps)
        return out.reshape(a, s)


class KdTrees:
    """Exact nearest vertices with one k-d tree per reference (built on first use)."""

    def __init__(self, positions):
        self.positions = positions
        self.trees = {}

    def query(self, x, ref_index, start=None) -> np.ndarray:
        """Nearest vertices (a, s) int64 of points x (a, s, 3) in the frames of references ``ref_index`` (a,)."""
        from scipy.spatial import cKDTree

        out = np.empty(x.shape[:2], np.int64)
        ref_index = np.asarray(ref_index)
        for g in np.unique(ref_index):
            g = int(g)
            if g not in self.trees:
                self.trees[g] = cKDTree(self.positions[g].astype(np.float64), balanced_tree=False, compact_nodes=False)
            sel = np.flatnonzero(ref_index == g)
            out[sel] = self.trees[g].query(x[sel].reshape(-1, 3).astype(np.float64))[1].reshape(sel.size, -1)
        return out


def exact_pass(positions, normals, ref_index, x_all, search=None):
    """Nearest vertices (a, m) and signed point-to-plane distances (a, m) float32 of points
    x_all (a, m, 3) float32, by an exhaustive search (k-d trees when none is given)."""
    search = search or KdTrees(positions)
    near = search.query(x_all, ref_index)
    g, n, _ = positions.shape
    flat = (np.asarray(ref_index, dtype=np.int64)[:, None] * n + near).reshape(-1)
    be = NumpyBackend()
    qn = be.gather(be.rows(np.concatenate([positions, normals], axis=2).reshape(-1, 6)), flat).reshape(near.shape + (6,))
    d = dot3(x_all - qn[..., :3], qn[..., 3:])
    return near, d.astype(np.float32, copy=False)
