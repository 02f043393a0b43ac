"""The ICP metrics through the compiled kernels (numba): the chunk steps of the numpy engine with
every per-point loop compiled, the exhaustive searches in column grids.

Same steps and the same nearest vertices as :mod:`.numpy_engine`; sums and the small linear
solves are grouped differently, so results agree with it to rounding (not bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .algebra import fit_from_sums
from .driver import IcpSamples, Pose, Registration, Score, chunk_predictions, chunk_references, region_pivots
from .plan import Part, Plan
from .search import GRID_CELL

__all__ = ["CompiledEngine", "CERT_MARGIN_MM", "uses_compiled_engine"]

CERT_MARGIN_MM = 0.2  # extra search radius of the part ICPs' exhaustive searches, for reuse (no effect on results)


def uses_compiled_engine(cfg, kernels, be) -> bool:
    """Whether the compiled pipeline runs: it needs the kernels, host arrays and the definition's
    exhaustive scores (global and parts); otherwise the numpy engine runs (torch devices, walk
    scores), its exhaustive searches still compiled when the kernels import."""
    return kernels is not None and be.name == "numpy" and cfg.score_nearest == "exact" and cfg.part_nearest == "exact"


def _c64(a) -> np.ndarray:
    """A C-ordered float64 copy (the compiled kernels get one array layout, so one compilation)."""
    return np.array(a, dtype=np.float64, order="C")


@dataclass(eq=False)
class _Chunk:
    plan: Plan
    positions: np.ndarray  # (G, N, 3) float32 centred references
    normals: np.ndarray  # (G, N, 3) float32
    ref_index: np.ndarray  # (a,)
    points: np.ndarray  # (a, N, 3) float32 predictions, C-ordered
    grid: Any = None  # column grids of the whole references


@dataclass(eq=False)
class _Region:
    part: Part
    positions: np.ndarray  # (G, m, 3) float32 region vertices
    normals: np.ndarray  # (G, m, 3)
    points: np.ndarray  # (a, m, 3) float32 prediction region vertices
    grid: Any  # column grids of the regions


class CompiledEngine:
    """The chunk steps of :func:`~.driver.process_chunk` with the compiled kernels."""

    def __init__(self, kernels, cfg):
        self.kernels, self.cfg = kernels, cfg

    def _settings(self, max_iterations: int, exact: bool) -> tuple:
        """The scalar settings of ``kernels.icp_iterate``."""
        cfg = self.cfg
        upm = cfg.units_per_mm
        return (int(max_iterations), float(cfg.damping), float(cfg.rmse_rtol), float(cfg.tolerance_mm * upm), bool(exact),
                float(CERT_MARGIN_MM * upm), int(cfg.max_walk_steps))

    def references(self, ref, job, group):
        return chunk_references(ref, job, group, self.kernels)

    def predictions(self, pred, samples):
        return chunk_predictions(pred, samples).astype(np.float32, order="C", copy=False)

    def prepare(self, plan: Plan, positions, ref_index, points) -> _Chunk:
        return _Chunk(plan, positions, self.kernels.normals32(positions, plan.triangles), ref_index, points)

    def initial_pose(self, ch: _Chunk, with_scale: bool) -> Pose:
        mp, mq, h, pp = self.kernels.cross_covariance(ch.points, ch.positions, ch.ref_index)
        a = len(ch.ref_index)
        r = np.empty((a, 3, 3))
        s = np.empty(a)
        t = np.empty((a, 3))
        for i in range(a):
            r[i], s[i], t[i] = fit_from_sums(mp[i], mq[i], h[i], pp[i], with_scale)
        return Pose(r, s, t)

    def register_whole(self, ch: _Chunk, pose: Pose, exact: bool) -> Registration:
        """The global ICP: the walk, or with ``exact`` (nearest="exact") the exhaustive search."""
        ch.grid = self.kernels.build_grids(ch.positions, GRID_CELL)
        it = ch.plan.whole.iteration_local
        a = len(ch.ref_index)
        ri = ch.ref_index
        samples = IcpSamples(_c64(ch.points[:, it]), _c64(ch.positions[ri[:, None], it[None, :]]), ri,
                             np.array(np.broadcast_to(it, (a, it.size)), dtype=np.int64, order="C"),  # writable, C-ordered
                             np.zeros((a, 3)))
        refs = (ch.positions, ch.normals, ch.plan.whole.graph.nbr)
        return self._register(samples, pose, refs, ch.grid, self._settings(self.cfg.max_iterations, exact))

    def _register(self, samples, pose, refs, grid, settings) -> Registration:
        r, s, t, iters, conv, near = self.kernels.icp_iterate(tuple(samples), tuple(pose), refs, grid, settings)
        return Registration(Pose(r, s, t), iters, conv, near)

    def _score(self, points, pose, ref_index, refs, grid) -> Score:
        near, d, ss = self.kernels.score_exact(points, tuple(pose), ref_index, refs, grid, int(self.cfg.max_walk_steps))
        return Score(near, d, ss)

    def score_whole(self, ch: _Chunk, reg: Registration) -> Score:
        refs = (ch.positions, ch.normals, ch.plan.whole.graph.nbr)
        return self._score(ch.points, reg.pose, ch.ref_index, refs, ch.grid)

    def prepare_part(self, ch: _Chunk, part: Part, exact: bool) -> _Region:
        ids = part.ids
        positions = np.ascontiguousarray(ch.positions[:, ids])
        return _Region(part, positions, np.ascontiguousarray(ch.normals[:, ids]), np.ascontiguousarray(ch.points[:, ids]),
                       self.kernels.build_grids(positions, GRID_CELL))

    def register_part(self, ch: _Chunk, region: _Region, pose: Pose, start) -> Registration:
        itp = region.part.iteration_local
        ri = ch.ref_index
        samples = IcpSamples(_c64(region.points[:, itp]), _c64(region.positions[:, itp].astype(np.float64)[ri]), ri, start,
                             region_pivots(region.positions, slice(None))[ri])
        refs = (region.positions, region.normals, region.part.graph.nbr)
        return self._register(samples, pose, refs, region.grid, self._settings(self.cfg.part_max_iterations, True))

    def score_part(self, ch: _Chunk, region: _Region, reg: Registration) -> Score:
        refs = (region.positions, region.normals, region.part.graph.nbr)
        return self._score(region.points, reg.pose, ch.ref_index, refs, region.grid)
