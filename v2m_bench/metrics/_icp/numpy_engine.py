"""The numpy implementation of the ICP metrics (also the torch-device path and walk-only configurations).

Per-reference tables (centred float32 positions, normals, and each vertex's edge vectors to its
candidates) are built once per chunk and shared by all predictions of that reference. The
exhaustive searches use the compiled grids when numba imports, else scipy k-d trees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .algebra import dot3, initial_fit, mat3, matvec3, rotation_from_vector, rowsum, transform
from .driver import IcpSamples, Pose, Registration, Score, chunk_predictions, chunk_references, region_pivots
from .plan import Part, Plan
from .search import exact_pass, make_search
from .walk import RefTables, edge_table, normals32, walk

__all__ = ["NumpyEngine", "icp_iterations", "score_pass"]


def icp_iterations(be, tab: RefTables, samples: IcpSamples, pose: Pose, max_iter: int, cfg, search=None) -> Registration:
    """Point-to-plane ICP (Levenberg-Marquardt) on iteration vertices, batched over samples.

    ``pose`` is the starting transform in the centred reference frame; nearest vertices by the walk
    on ``tab`` or, given an exhaustive ``search``, by that search.

    Every iterate (transform) is evaluated: nearest vertices of the iteration vertices and the RMS
    point-to-plane residual ``f``. An iterate that lowers ``f`` is accepted (damping / 4, not
    below ``damping``); one that does not is rejected (damping x 10) and the step is recomputed
    from the best iterate. A sample stops when an accepted iterate lowers ``f`` by at most
    ``rmse_rtol`` (relative), when a step moves no iteration vertex by more than
    ``tolerance_mm``, when the damping exceeds 1e4, or after ``max_iter`` evaluations. The
    result is the best iterate, with the nearest vertices (a, S) of the iteration vertices there.
    """
    p_it, q_it, ref_index, start, pivot = samples
    base = ref_index * tab.n
    a, S, _ = p_it.shape
    r, s, t = (x.copy() for x in pose)
    c = np.array(start, dtype=np.int64)
    best_r, best_s, best_t, best_c = r.copy(), s.copy(), t.copy(), c.copy()
    best = np.full(a, np.inf)
    dim = 6
    best_a = np.zeros((a, dim, dim))
    best_b = np.zeros((a, dim))
    lam = np.full(a, float(cfg.damping))
    rad = np.linalg.norm(q_it - pivot[:, None, :], axis=2)  # (a, S)
    rho = np.sqrt(rowsum(rad**2) / S)
    rho = np.where(rho > 0, rho, 1.0)
    rmax = rad.max(axis=1)
    tol = cfg.tolerance_mm * cfg.units_per_mm
    eye = np.eye(dim)[None]
    iters = np.zeros(a, np.int64)
    conv = np.zeros(a, bool)
    act = np.arange(a)
    for k in range(max_iter):
        if act.size == 0:
            break
        # evaluate the current iterate of every active sample
        x = transform(p_it[act], r[act], s[act], t[act])
        rows = np.repeat(base[act], S)
        if search is None:
            near = walk(be, tab, be.put(x.reshape(-1, 3), np.float32), be.int_index(best_c[act].reshape(-1)),
                        be.int_index(rows), cfg.max_walk_steps)
            near = be.host(near).reshape(act.size, S)
        else:
            near = search.query(x.astype(np.float32), ref_index[act], best_c[act])
        qn = be.host(be.gather(tab.positions_normals, be.int_index(rows + near.reshape(-1)))).reshape(act.size, S, 6)
        qn = qn.astype(np.float64)
        nrm = qn[..., 3:]
        res = dot3(x - qn[..., :3], nrm)
        cur = np.sqrt(rowsum(res * res) / S)
        iters[act] += 1
        # normal equations of the linearised update about the pivot:
        # x' = Rot(omega) (x - o) + o + tau, rotation unknowns scaled by rho
        y = x - pivot[act, None, :]
        cols = [np.cross(y, nrm) / rho[act, None, None], nrm]
        jac = np.ascontiguousarray(np.moveaxis(np.concatenate(cols, axis=2), 2, 1))  # (a', dim, S)
        amat = np.empty((act.size, dim, dim))
        bvec = np.empty((act.size, dim))
        for i in range(dim):
            bvec[:, i] = rowsum(jac[:, i] * res)
            for j in range(i, dim):
                amat[:, i, j] = amat[:, j, i] = rowsum(jac[:, i] * jac[:, j])
        # accept or reject
        prev = best[act]
        better = cur < prev
        ib = act[better]
        best[ib] = cur[better]
        best_r[ib], best_s[ib], best_t[ib], best_c[ib] = r[ib], s[ib], t[ib], near[better]
        best_a[ib], best_b[ib] = amat[better], bvec[better]
        first = ~np.isfinite(prev)
        lam[ib] = np.where(first[better], lam[ib], np.maximum(lam[ib] / 4.0, cfg.damping))
        lam[act[~better]] *= 10.0
        small_gain = better & ~first & (prev - cur <= cfg.rmse_rtol * prev)
        stop = small_gain | (lam[act] > 1e4)
        conv[act[stop]] = True
        act = act[~stop]
        if act.size == 0 or k == max_iter - 1:
            break
        # next iterate: a damped step from the best iterate
        am = best_a[act]
        tr = np.trace(am, axis1=1, axis2=2)
        am = am + (lam[act] * tr / dim + 1e-300)[:, None, None] * eye
        delta = -np.linalg.solve(am, best_b[act][..., None])[..., 0]
        w = delta[:, :3] / rho[act, None]
        tau = delta[:, 3:6]
        rot = rotation_from_vector(w)
        piv = pivot[act]
        r[act] = mat3(rot, best_r[act])
        t[act] = matvec3(rot, best_t[act] - piv) + piv + tau
        moved = np.linalg.norm(w, axis=1) * rmax[act] + np.linalg.norm(tau, axis=1)
        tiny = moved <= tol
        conv[act[tiny]] = True
        act = act[~tiny]
    return Registration(Pose(best_r, best_s, best_t), iters, conv, best_c)


def score_pass(be, tab: RefTables, points, pose: Pose, ref_index, start, part: Part, cfg) -> Score:
    """Nearest reference vertices of every vertex of a scored set by the walk, and the signed distances.

    points (a, n, 3) prediction vertices of the set; ``pose`` the transforms; start (a, S) nearest
    vertices of the iteration vertices (layer 0). Vertices are solved layer after layer of a
    breadth-first order from the iteration vertices; a vertex's walk starts from the closer of its
    parent's answer and that answer shifted by the vertex-id offset (exact on grid-ordered meshes
    such as the BFM; the start only changes the work, rarely the result). Distances in input units.
    """
    base = ref_index * tab.n
    a, n, _ = points.shape
    order = part.order
    # vertex-major: every layer is one contiguous block
    xv = np.ascontiguousarray(transform(points[:, order], *pose, np.float32).transpose(1, 0, 2))
    near = np.empty((n, a), np.int64)
    bounds = part.bounds
    near[: bounds[1]] = np.asarray(start, dtype=np.int64).T
    for layer in range(len(bounds) - 1):
        lo, hi = int(bounds[layer]), int(bounds[layer + 1])
        x = xv[lo:hi].reshape(-1, 3)
        rows = np.broadcast_to(base, (hi - lo, a)).reshape(-1)
        if layer == 0:
            warm = near[lo:hi].reshape(-1)
        else:
            from_parent = near[part.parent_pos[lo:hi]]
            shifted = np.clip(from_parent + part.shift[lo:hi, None], 0, tab.n - 1)
            from_parent, shifted = from_parent.reshape(-1), shifted.reshape(-1)
            da = x - be.host(be.gather(tab.positions_normals, be.int_index(rows + from_parent)))[:, :3]
            db = x - be.host(be.gather(tab.positions_normals, be.int_index(rows + shifted)))[:, :3]
            warm = np.where(dot3(db, db) < dot3(da, da), shifted, from_parent)
        res = walk(be, tab, be.put(x), be.int_index(warm), be.int_index(rows), cfg.max_walk_steps)
        near[lo:hi] = be.host(res).reshape(hi - lo, a)
    qn = be.host(be.gather(tab.positions_normals, be.int_index((near + base[None, :]).reshape(-1)))).reshape(n, a, 6)
    dv = dot3(xv - qn[..., :3], qn[..., 3:])
    near_out = np.empty((a, n), np.int64)
    near_out[:, order] = near.T
    d = np.empty((a, n), np.float32)
    d[:, order] = dv.T
    return Score(near_out, d)


@dataclass(eq=False)
class _Chunk:
    plan: Plan
    positions: np.ndarray  # (G, N, 3) float32 centred references
    normals: np.ndarray  # (G, N, 3) float32
    edges: np.ndarray  # (G, N, 4K) float32
    tables: RefTables
    ref_index: np.ndarray  # (a,)
    points: np.ndarray  # (a, N, 3) predictions
    sample_refs: np.ndarray  # (a, N, 3) float32: positions[ref_index]
    search: Any = None  # exhaustive search of the whole mesh, when one is used


@dataclass(eq=False)
class _Region:
    part: Part
    tables: RefTables
    search: Any  # exhaustive search among the region's vertices, or None (the walk)


class NumpyEngine:
    """The chunk steps of :func:`~.driver.process_chunk` with numpy (or torch) arrays.

    be: the array backend; kernels: the compiled kernels for the exhaustive searches, or None
    (k-d trees); cfg: the IcpConfig.
    """

    def __init__(self, be, kernels, cfg):
        self.be, self.kernels, self.cfg = be, kernels, cfg

    def references(self, ref, job, group):
        return chunk_references(ref, job, group)

    def predictions(self, pred, samples):
        return chunk_predictions(pred, samples)

    def prepare(self, plan: Plan, positions, ref_index, points) -> _Chunk:
        be = self.be
        n = plan.n
        ng = positions.shape[0]
        normals = np.empty_like(positions)
        graph = plan.whole.graph
        edges = np.empty((ng, n, 4 * graph.k), np.float32)
        for i in range(ng):
            normals[i] = normals32(positions[i], plan.triangles)
            edge_table(positions[i], graph, plan.off_slots, out=edges[i])
        tables = RefTables(
            n=n,
            k=graph.k,
            positions_normals=be.rows(np.concatenate([positions, normals], axis=2).reshape(-1, 6)),
            edges=be.rows(edges.reshape(ng * n, -1)),
            nbr_flat=be.int_index(graph.nbr.reshape(-1)),
        )
        return _Chunk(plan, positions, normals, edges, tables, ref_index, points, positions[ref_index])

    def initial_pose(self, ch: _Chunk, with_scale: bool) -> Pose:
        a = len(ch.ref_index)
        r = np.empty((a, 3, 3))
        s = np.empty(a)
        t = np.empty((a, 3))
        for i in range(a):
            r[i], s[i], t[i] = initial_fit(ch.points[i], ch.positions[ch.ref_index[i]], with_scale)
        return Pose(r, s, t)

    def register_whole(self, ch: _Chunk, pose: Pose, exact: bool) -> Registration:
        cfg = self.cfg
        it = ch.plan.whole.iteration_local
        a = len(ch.ref_index)
        if exact or cfg.score_nearest == "exact":
            ch.search = make_search(ch.positions, ch.plan.whole.graph.nbr, self.kernels, cfg.max_walk_steps)
        samples = IcpSamples(ch.points[:, it].astype(np.float64), ch.sample_refs[:, it].astype(np.float64), ch.ref_index,
                             np.broadcast_to(it, (a, it.size)), np.zeros((a, 3)))
        return icp_iterations(self.be, ch.tables, samples, pose, cfg.max_iterations, cfg, ch.search if exact else None)

    def score_whole(self, ch: _Chunk, reg: Registration) -> Score:
        if ch.search is not None:
            return Score(*exact_pass(ch.positions, ch.normals, ch.ref_index, transform(ch.points, *reg.pose, np.float32),
                                     ch.search))
        return score_pass(self.be, ch.tables, ch.points, reg.pose, ch.ref_index, reg.nearest, ch.plan.whole, self.cfg)

    def prepare_part(self, ch: _Chunk, part: Part, exact: bool) -> _Region:
        be, cfg = self.be, self.cfg
        ids = part.ids
        m = ids.size
        k = ch.plan.whole.graph.k
        ng = ch.positions.shape[0]
        if exact or cfg.part_nearest == "exact":
            search = make_search(ch.positions[:, ids], part.graph.nbr, self.kernels, cfg.max_walk_steps)
            edges = None
        else:
            search = None
            pe = ch.edges[:, ids].reshape(ng, m, 4, k)
            pe[:, part.off_slots // k, 3, part.off_slots % k] = np.inf
            edges = be.rows(pe.reshape(ng * m, -1))
        tables = RefTables(
            n=m,
            k=k,
            positions_normals=be.rows(np.concatenate([ch.positions[:, ids], ch.normals[:, ids]], axis=2).reshape(-1, 6)),
            edges=edges,
            nbr_flat=be.int_index(part.graph.nbr.reshape(-1)),
        )
        return _Region(part, tables, search)

    def register_part(self, ch: _Chunk, region: _Region, pose: Pose, start) -> Registration:
        part = region.part
        ids, itp = part.ids, part.iteration_local
        samples = IcpSamples(ch.points[:, ids[itp]].astype(np.float64), ch.sample_refs[:, ids[itp]].astype(np.float64),
                             ch.ref_index, start, region_pivots(ch.positions, ids)[ch.ref_index])
        return icp_iterations(self.be, region.tables, samples, pose, self.cfg.part_max_iterations, self.cfg, region.search)

    def score_part(self, ch: _Chunk, region: _Region, reg: Registration) -> Score:
        ids = region.part.ids
        if region.search is not None:
            x = transform(ch.points[:, ids], *reg.pose, np.float32)
            return Score(*exact_pass(ch.positions[:, ids], ch.normals[:, ids], ch.ref_index, x, region.search))
        return score_pass(self.be, region.tables, ch.points[:, ids], reg.pose, ch.ref_index, reg.nearest, region.part,
                          self.cfg)
