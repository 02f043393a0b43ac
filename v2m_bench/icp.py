"""ICP point-to-plane RMSE and part RMSE: the paper's mesh metrics, defined here and frozen.

The paper registers each predicted mesh to its reference with ICP and reports the point-to-plane
RMSE, globally and per face part (a local ICP per part), without publishing code. This module is
the project's definition; docs/metrics.md ("ICP point-to-plane RMSE", "Part RMSE") states it in
words, and every constant lives in :class:`IcpConfig`.

Global score, per prediction against the reference of its group
-----------------------------------------------------------------
1. **Initial alignment.** Closed-form least-squares fit over all vertex pairs (prediction vertex
   ``i`` corresponds to reference vertex ``i``): Kabsch, or Umeyama with ``with_scale``, whose
   scale is then kept (the ICP refines rotation and translation only: a point-to-plane cost
   cannot estimate a scale, as shrinking the prediction towards one point on the surface drives
   it to zero; NoW likewise takes its scale from a similarity fit and refines rigidly).
2. **ICP** on ``n_iteration_vertices`` fixed *iteration vertices* (the smallest values of a frozen
   integer hash of the vertex id, :func:`iteration_vertices`). Every iterate (transform) is
   evaluated: nearest reference vertex of each iteration vertex, its area-weighted unit normal,
   and the RMS point-to-plane residual ``f``. The next iterate is a Levenberg-Marquardt step of the
   linearised rigid problem (6 unknowns) from the best iterate so far, applied
   exactly (Rodrigues rotation); an iterate that does not lower ``f`` is rejected and the damping
   raised. A sample stops on a negligible gain (``rmse_rtol``), a negligible step
   (``tolerance_mm``), a damping above 1e4 or ``max_iterations`` evaluations, and keeps its best
   iterate. Samples are independent: a stopped sample is frozen, so its result never depends on
   the rest of the batch.
3. **Score.** Every vertex of the aligned prediction gets the signed distance to the tangent plane
   of its nearest reference vertex (exhaustive search, see below), ``d = n . (x - q)``
   (positive: in front of the reference surface); the RMSE over all vertices is reported in
   millimetres (BFM units are micrometres).

**Part RMSE**, per region (boolean vertex mask): the same ICP started from the global transform,
on at most ``part_iteration_vertices`` iteration vertices of the region (same hash order), with
the rotation linearised about the region's reference centroid; nearest vertices are searched among
the region's reference vertices only, exhaustively (a search index per region and reference); the
RMSE is over the region's vertices.

**Nearest vertex of the global ICP iterations.** The topologies match, so after the correspondence fit the
nearest reference vertex of prediction vertex ``i`` lies in the mesh neighbourhood of ``i``. It is
found by a greedy walk on a candidate graph: the 1-ring of each vertex, plus, for vertices of
degree below 6, the vertex across each opposite edge (on grid meshes such as the BFM, where half
the vertices have degree 4, those are the missing diagonal neighbours). From a start vertex the
walk moves to the closest candidate while one is strictly closer. Starts: the corresponding vertex
(first iterate), then the best iterate's answer. The walk ends at a local minimum of the distance
over the graph. That is the exhaustive nearest vertex for most points (97-99 % on BFM test pairs)
but not where the reference surface folds back towards the point (lips, ears, eyelids), where the
walk stays on the corresponding surface sheet; the iterations tolerate it (the RMSE moves by 0.5 %
on average), the reported score does not use it (``IcpConfig.score_nearest``). With
``score_nearest="walk"`` the all-vertex score walks too, in breadth-first layers from the
iteration vertices, each vertex starting from the closer of an adjacent solved vertex's answer
and that answer shifted by the vertex-id offset. ``nearest="exact"`` searches exhaustively everywhere,
``nearest="walk"`` the walk everywhere (parts included).

**Exhaustive search and the two implementations** (``engine``). ``"numba"`` (the default when
numba imports; it comes with the project through librosa) runs the whole metric compiled
(:mod:`v2m_bench._nnkernel`): normals, search grids, the correspondence fit's sums, the ICP
iterations and the scores, prediction after prediction, with an exhaustive search that walks from a
start vertex to bound the distance, then checks every vertex of a depth-sorted column grid within
that bound. ``"kdtree"`` runs the numpy implementation below with scipy k-d trees (the fallback
without numba; also used for torch devices and walk-only configurations). Both find the same
nearest vertices (exact distance ties: the compiled search takes the lowest vertex id) and take the
same steps; they group sums and solve the 6x6 systems differently, so transforms agree to about
1e-13 and RMSEs to rounding (tested).

Implementation of the numpy path: per-reference tables (centred float32 positions, normals, and
each vertex's edge vectors to its candidates) are built once and shared by all predictions of that
reference; points are processed in cache-sized chunks. In both paths ``threads`` chunks of
references run in parallel and results do not depend on chunking, threads or batch composition.
``device`` (a torch device, e.g. ``"cuda"``) runs the numpy path's global walk with torch.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from .errors import ValidationError

__all__ = [
    "IcpConfig",
    "IcpResult",
    "DEFAULT_ICP_CONFIG",
    "icp_rmse",
    "part_rmse",
    "icp_scores",
    "nearest_vertices",
    "iteration_vertices",
    "IcpPlan",
    "icp_plan",
]

_POINT_CHUNK = 16384  # points per vectorised walk call (cache-sized temporaries; no effect on results)
_CERT_MARGIN_MM = 0.2  # extra search radius of the part ICPs' exhaustive searches, for reuse (no effect on results)
_GRID_CELL = 5.0  # column edge of the exhaustive search's grids, in mean vertex spacings (no effect on results)
_REFS_PER_CHUNK = 4  # references whose predictions are processed together (no effect on results)


# ---------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class IcpConfig:
    """Every constant of the ICP metrics (the frozen definition; see docs/metrics.md).

    Attributes
    ----------
    max_iterations : int
        Maximum ICP iterates (nearest-vertex searches) of the global registration.
    part_max_iterations : int
        Maximum ICP iterates of each part's local registration.
    tolerance_mm : float
        A sample stops when a step moves no iteration vertex by more than this:
        ``|omega| * r_max + |tau|`` (rotation angle, translation; ``r_max`` the largest
        distance of a reference iteration vertex from the rotation centre).
    rmse_rtol : float
        ... or when an accepted iterate lowers the RMS point-to-plane residual of the iteration
        vertices by at most this fraction of the previous best. The result is always the
        evaluated iterate with the lowest RMS residual.
    n_iteration_vertices : int
        Vertices used by the global ICP iterations (all vertices when the mesh has fewer).
    part_iteration_vertices : int
        Vertices used by each part's ICP iterations (all region vertices when fewer).
    damping : float
        Smallest relative Levenberg-Marquardt damping: the step solves
        ``(A + lambda * trace(A) / 6 * I) delta = -b`` (rotation unknowns scaled by the RMS
        radius of the reference iteration vertices about the rotation centre). ``lambda``
        starts at ``damping``, is divided by 4 (not below ``damping``) after an iterate that
        lowers the RMS residual and multiplied by 10 after one that does not, the step being
        recomputed from the best iterate; a sample stops when ``lambda`` exceeds 1e4.
    max_walk_steps : int
        Cap on the moves of one nearest-vertex walk (not reached on face meshes).
    units_per_mm : float
        Input units per millimetre (BFM units are micrometres: 1000).
    score_nearest : {"exact", "walk"}
        Nearest-vertex search of the global all-vertex score: exhaustive (k-d tree, the
        definition) or the graph walk (about a third faster overall; it stays on the
        corresponding surface sheet where the reference folds back, which raised the RMSE by
        4 % on average, up to 15 %, on stand-in BFM test pairs).
    part_nearest : {"exact", "walk"}
        Nearest-vertex search of the part ICPs: exhaustive among the region's reference vertices
        (k-d tree, the definition) or the graph walk restricted to the region (faster; a walk
        that stays on a wrong eyelid or lip sheet can steer a small region's fit far off).
    """

    max_iterations: int = 30
    part_max_iterations: int = 30
    tolerance_mm: float = 1e-4
    rmse_rtol: float = 1e-4
    n_iteration_vertices: int = 2048
    part_iteration_vertices: int = 512
    damping: float = 1e-6
    max_walk_steps: int = 512
    units_per_mm: float = 1000.0
    part_nearest: str = "exact"
    score_nearest: str = "exact"

    def __post_init__(self):
        for name in ("max_iterations", "part_max_iterations", "n_iteration_vertices", "part_iteration_vertices", "max_walk_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValidationError(f"must be a positive integer, found {v!r}", key=f"IcpConfig.{name}")
        for name in ("tolerance_mm", "units_per_mm", "rmse_rtol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float, np.number)) and np.isfinite(v) and v > 0):
                raise ValidationError(f"must be a positive number, found {v!r}", key=f"IcpConfig.{name}")
        for name in ("part_nearest", "score_nearest"):
            if getattr(self, name) not in ("walk", "exact"):
                raise ValidationError(f"expected 'walk' or 'exact', found {getattr(self, name)!r}", key=f"IcpConfig.{name}")
        if not (isinstance(self.damping, (int, float, np.number)) and np.isfinite(self.damping) and self.damping >= 0):
            raise ValidationError(f"must be a number >= 0, found {self.damping!r}", key="IcpConfig.damping")


DEFAULT_ICP_CONFIG = IcpConfig()


@dataclass(frozen=True, eq=False)
class IcpResult:
    """An ICP registration of each prediction and its point-to-plane score.

    The aligned prediction is ``scale[:, None, None] * pred @ rotation.transpose(0, 2, 1) +
    translation[:, None, :]``.

    Attributes
    ----------
    rmse : ndarray, shape (B,), float64
        Point-to-plane RMSE in millimetres over the scored vertices (all vertices; the region's
        vertices for a part).
    rotation : ndarray, shape (B, 3, 3), float64
    translation : ndarray, shape (B, 3), float64
        Input units (BFM units).
    scale : ndarray, shape (B,), float64
        1 unless ``with_scale`` (then the Umeyama scale of the correspondence fit, kept by the
        ICP).
    iterations : ndarray, shape (B,), int64
        ICP iterates evaluated (nearest-vertex searches on the iteration vertices).
    converged : ndarray, shape (B,), bool
        False when the iteration cap stopped the registration.
    distances : ndarray, shape (B, M), float32, or None
        Signed point-to-plane distance in mm of each scored vertex (order of ``vertex_ids``;
        positive = in front of the reference surface). Only with ``return_distances=True``.
    nearest : ndarray, shape (B, M), int32, or None
        The nearest reference vertex of each scored vertex. Only with ``return_distances=True``.
    vertex_ids : ndarray, shape (M,), int64
        The scored vertices: ``arange(N)`` globally, the region's vertices for a part.
    """

    rmse: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    scale: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    vertex_ids: np.ndarray
    distances: np.ndarray | None = None
    nearest: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.rmse.shape[0])


# ------------------------------------------------------------------------------ topology tables
def _hash_ids(ids: np.ndarray) -> np.ndarray:
    """Frozen 32-bit integer hash of vertex ids (Wellons' "lowbias32")."""
    m = np.uint64(0xFFFFFFFF)
    x = np.asarray(ids, dtype=np.uint64) & m
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & m
    x ^= x >> np.uint64(16)
    return x


def iteration_vertices(candidates, count: int) -> np.ndarray:
    """The fixed ICP iteration vertices: the ``count`` ids of ``candidates`` with the smallest hash.

    The hash (``_hash_ids``, Wellons' lowbias32 of the vertex id) is frozen, so the choice is the
    same on every machine and numpy version and looks random over the mesh.

    Parameters
    ----------
    candidates : int or array_like of int
        ``N`` (vertices ``0..N-1``) or the vertex ids of a region.
    count : int
        How many to keep (all when there are fewer).

    Returns
    -------
    ndarray, shape (min(count, len(candidates)),), int64, ascending.
    """
    ids = np.arange(int(candidates), dtype=np.int64) if np.ndim(candidates) == 0 else np.asarray(candidates, dtype=np.int64)
    if ids.size <= count:
        return np.sort(ids)
    keep = np.lexsort((ids, _hash_ids(ids)))[:count]
    return np.sort(ids[keep])


@dataclass(eq=False)
class _Graph:
    """A walk graph over ``n`` local vertices: padded candidate table (n, K)."""

    n: int
    k: int
    nbr: np.ndarray  # (n, K) int64 local ids, padded with the vertex itself
    valid: np.ndarray  # (n, K) bool


def _candidate_pairs(triangles: np.ndarray, n: int) -> np.ndarray:
    """Directed (vertex, candidate) pairs: 1-ring, plus across-edge vertices for degree < 6."""
    tri = triangles
    e = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    e = _unique_pairs(e[e[:, 0] != e[:, 1]], n)
    deg = np.bincount(e[:, 0], minlength=n)
    # the vertex across the edge opposite each corner: corner v of triangle (v, a, b) and the
    # third vertex of the other triangle on edge (a, b)
    corner = tri.reshape(-1)
    ea = tri[:, [1, 2, 0]].reshape(-1)
    eb = tri[:, [2, 0, 1]].reshape(-1)
    key = np.minimum(ea, eb).astype(np.int64) * n + np.maximum(ea, eb)
    order = np.argsort(key, kind="stable")
    ks = key[order]
    same = np.flatnonzero(ks[1:] == ks[:-1])
    i1, i2 = order[same], order[same + 1]
    opp = np.concatenate([np.stack([corner[i1], corner[i2]], 1), np.stack([corner[i2], corner[i1]], 1)])
    opp = opp[deg[opp[:, 0]] < 6]
    pairs = _unique_pairs(np.concatenate([e, opp]), n)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def _unique_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    key = np.sort(pairs[:, 0].astype(np.int64) * n + pairs[:, 1])
    key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    return np.stack([key // n, key % n], axis=1)


def _graph_from_pairs(pairs: np.ndarray, n: int) -> _Graph:
    src, dst = pairs[:, 0], pairs[:, 1]
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    deg = np.bincount(src, minlength=n)
    k = max(int(deg.max()) if deg.size else 1, 1)
    start = np.concatenate([[0], np.cumsum(deg)[:-1]])
    slot = np.arange(src.size) - start[src]
    nbr = np.repeat(np.arange(n, dtype=np.int64)[:, None], k, axis=1)
    nbr[src, slot] = dst
    valid = np.zeros((n, k), bool)
    valid[src, slot] = True
    return _Graph(n=n, k=k, nbr=nbr, valid=valid)


def _bfs_layers(graph: _Graph, seeds: np.ndarray):
    """Breadth-first layers from ``seeds`` over the graph: list of (vertices, parents).

    Layer 0 is ``(seeds, seeds)``; a later vertex's parent is its smallest-id neighbour in the
    previous layer. Vertices not reachable from the seeds form a last layer, their own parents.
    """
    seen = np.zeros(graph.n, bool)
    seen[seeds] = True
    layers = [(seeds, seeds)]
    frontier = seeds
    while frontier.size:
        cand = graph.nbr[frontier]
        ok = graph.valid[frontier] & ~seen[cand]
        v = cand[ok]
        if v.size == 0:
            break
        p = np.broadcast_to(frontier[:, None], cand.shape)[ok]
        order = np.lexsort((p, v))
        v, p = v[order], p[order]
        first = np.concatenate([[True], v[1:] != v[:-1]])
        v, p = v[first], p[first]
        seen[v] = True
        layers.append((v, p))
        frontier = v
    rest = np.flatnonzero(~seen)
    if rest.size:
        layers.append((rest, rest))
    return layers


@dataclass(eq=False)
class _Part:
    """A scored vertex set (all vertices, or a region) with its walk graph and iteration vertices.

    A region's graph keeps the global candidate slots (so its edge table is a row subset of the
    global one) with candidates outside the region switched off.
    """

    name: str
    ids: np.ndarray  # (n,) global vertex ids, ascending
    graph: _Graph  # over local ids 0..n-1
    it_local: np.ndarray  # (S,) local ids of the iteration vertices
    layers: list  # BFS layers (local ids) from it_local

    local_of: np.ndarray | None  # (N,) global -> local id, -1 outside (regions only)
    off_slots: np.ndarray | None  # flat (vertex * K + slot) indices of switched-off candidates
    order: np.ndarray | None = None  # local ids in BFS order (layer after layer)
    bounds: np.ndarray | None = None  # layer boundaries in ``order``
    parent_pos: np.ndarray | None = None  # position in ``order`` of each vertex's parent
    shift: np.ndarray | None = None  # vertex id - parent id (local), for the shifted warm start

    def __post_init__(self):
        order = np.concatenate([v for v, _ in self.layers])
        pos = np.empty(order.size, np.int64)
        pos[order] = np.arange(order.size)
        parents = np.concatenate([p for _, p in self.layers])
        self.order = order
        self.bounds = np.cumsum([0] + [v.size for v, _ in self.layers])
        self.parent_pos = pos[parents]
        self.shift = order - parents


@dataclass(eq=False)
class _Plan:
    n: int
    triangles: np.ndarray
    glob: _Part
    parts: list
    off_slots: np.ndarray  # flat indices of padding slots of the global graph


def _make_plan(triangles: np.ndarray, n: int, regions, cfg: IcpConfig) -> _Plan:
    graph = _graph_from_pairs(_candidate_pairs(triangles, n), n)
    ids = np.arange(n, dtype=np.int64)
    it = iteration_vertices(n, cfg.n_iteration_vertices)
    glob = _Part("", ids, graph, it, _bfs_layers(graph, it), None, None)
    parts = []
    for name, mask in regions.items():
        rid = np.flatnonzero(mask).astype(np.int64)
        local_of = np.full(n, -1, np.int64)
        local_of[rid] = np.arange(rid.size)
        loc = local_of[graph.nbr[rid]]
        valid = graph.valid[rid] & (loc >= 0)
        nbr = np.where(valid, loc, np.arange(rid.size)[:, None])
        rg = _Graph(n=rid.size, k=graph.k, nbr=nbr, valid=valid)
        it_r = local_of[iteration_vertices(rid, cfg.part_iteration_vertices)]
        parts.append(_Part(name, rid, rg, it_r, _bfs_layers(rg, it_r), local_of, np.flatnonzero(~valid.reshape(-1))))
    return _Plan(n=n, triangles=triangles, glob=glob, parts=parts, off_slots=np.flatnonzero(~graph.valid.reshape(-1)))


# ------------------------------------------------------------------------------------ backends
class _Rows:
    """A row table prepared for fast row gathers."""

    __slots__ = ("data", "width", "void")

    def __init__(self, data, width, void):
        self.data, self.width, self.void = data, width, void


class _Numpy:
    """Host arrays (the default)."""

    name = "numpy"

    def put(self, a, dtype=None):
        return np.ascontiguousarray(a, dtype=dtype)

    def host(self, a):
        return np.asarray(a)

    def rows(self, table):
        table = np.ascontiguousarray(table, dtype=np.float32)
        w = table.shape[1]
        return _Rows(table, w, table.view(np.dtype((np.void, 4 * w))).reshape(-1))

    def gather(self, rows: _Rows, idx):
        # a 1-D take of whole rows viewed as one void item: several times faster than take(axis=0)
        return np.take(rows.void, idx).view(np.float32).reshape(-1, rows.width)

    def int_index(self, a):
        return np.asarray(a, dtype=np.int64)


class _Torch:
    """Tables and the walk on a torch device (e.g. "cuda"); the small algebra stays on the host."""

    name = "torch"

    def __init__(self, device):
        import torch

        self.t = torch
        self.device = torch.device(device)

    def put(self, a, dtype=None):
        t = self.t
        out = a.to(self.device) if isinstance(a, t.Tensor) else t.from_numpy(np.ascontiguousarray(a)).to(self.device)
        if dtype is not None:
            out = out.to({np.float32: t.float32, np.float64: t.float64, np.int64: t.int64}[dtype])
        return out

    def host(self, a):
        return a.detach().cpu().numpy() if isinstance(a, self.t.Tensor) else np.asarray(a)

    def rows(self, table):
        table = self.put(table, np.float32).contiguous()
        return _Rows(table, table.shape[1], None)

    def gather(self, rows: _Rows, idx):
        return rows.data.index_select(0, idx.reshape(-1))

    def int_index(self, a):
        if isinstance(a, self.t.Tensor):
            return a.to(device=self.device, dtype=self.t.int64)
        return self.t.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)


def _backend(device):
    if device is None or (isinstance(device, str) and device == "numpy"):
        return _Numpy()
    return _Torch(device)


# ------------------------------------------------------------------------ per-reference tables
@dataclass(eq=False)
class _RefTables:
    """Per-reference data for one chunk of references, flattened over (reference, local vertex)."""

    n: int  # local vertices per reference
    k: int
    qn: _Rows  # (G*n, 6): centred float32 position, unit normal
    edges: _Rows  # (G*n, 4*K): edge vectors x, y, z to each candidate, then half squared length
    nbr_flat: Any  # (n*K,) local candidate ids


def _normals32(q32: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals in float32 (the definition of geometry.vertex_normals)."""
    n = q32.shape[0]
    t0, t1, t2 = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    x, y, z = q32[:, 0], q32[:, 1], q32[:, 2]
    ax, ay, az = x[t0], y[t0], z[t0]
    ux, uy, uz = x[t1] - ax, y[t1] - ay, z[t1] - az
    vx, vy, vz = x[t2] - ax, y[t2] - ay, z[t2] - az
    fn = (uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx)
    flat = triangles.reshape(-1)
    out = np.empty((n, 3), np.float64)
    for c in range(3):
        out[:, c] = np.bincount(flat, weights=np.repeat(fn[c], 3), minlength=n)
    norm = np.sqrt(np.einsum("ij,ij->i", out, out))
    out /= np.maximum(norm, 1e-30)[:, None]
    return out.astype(np.float32)


def _edge_table(q32: np.ndarray, graph: _Graph, off_slots: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(n, 4*K) float32 rows: edge vectors to the K candidates as x[K], y[K], z[K], then
    |e|^2 / 2 [K] (+inf on padding, so a padded slot never wins)."""
    n, k = graph.nbr.shape
    tab = np.empty((n, 4, k), np.float32) if out is None else out.reshape(n, 4, k)
    h = tab[:, 3, :]
    for c in range(3):
        qc = np.ascontiguousarray(q32[:, c], dtype=np.float32)
        e = np.take(qc, graph.nbr)
        e -= qc[:, None]
        tab[:, c, :] = e
        if c == 0:
            np.multiply(e, e, out=h)
        else:
            e *= e
            h += e
    h *= 0.5
    h.reshape(-1)[off_slots] = np.inf
    return tab.reshape(n, 4 * k)


# ----------------------------------------------------------------------------------------- walk
def _walk(be, tab: _RefTables, x, c, base, max_steps: int):
    """Greedy nearest-vertex walk (see the module docstring).

    x (M, 3) float32 points in the centred frame of their reference; c (M,) local start ids;
    base (M,) ``g * n`` offsets into the chunk's flattened tables. Each step moves every point
    whose current vertex has a strictly closer candidate to the closest candidate (lowest index on
    ties). Returns the end ids (M,).
    """
    if be.name != "numpy":
        return _walk_torch(be, tab, x, c, base, max_steps)
    m = x.shape[0]
    out = np.array(c, dtype=np.int64)
    k = tab.k
    k4 = 4 * k
    offs = np.array([0, k, 2 * k], np.int64)
    nbr_flat = tab.nbr_flat
    for lo in range(0, m, _POINT_CHUNK):
        hi = min(m, lo + _POINT_CHUNK)
        view = out[lo:hi]
        ca = view.copy()
        fa = base[lo:hi] + ca
        t4 = np.empty((hi - lo, 4), np.float32)
        np.subtract(x[lo:hi], be.gather(tab.qn, fa)[:, :3], out=t4[:, :3])
        t4[:, 3] = -1.0
        act = None
        for _ in range(max_steps):
            rows = be.gather(tab.edges, fa)  # (m', 4K)
            # score_k = t . e_k - |e_k|^2 / 2 > 0  <=>  candidate k is closer than the current vertex
            s = np.einsum("mck,mc->mk", rows.reshape(-1, 4, k), t4)
            kk = s.argmax(axis=1)
            pos = np.arange(kk.size) * k + kk
            mv = np.flatnonzero(np.take(s.reshape(-1), pos) > 0)
            if mv.size == 0:
                break
            km = kk[mv]
            e = np.take(rows.reshape(-1), (mv * k4 + km)[:, None] + offs)  # (m'', 3) chosen edge vectors
            t4 = t4[mv]
            t4[:, :3] -= e
            cm = ca[mv]
            ca = np.take(nbr_flat, cm * k + km)
            fa = fa[mv] + (ca - cm)
            act = mv if act is None else act[mv]
            view[act] = ca
    return out


def _walk_torch(be, tab, x, c, base, max_steps):
    torch = be.t
    out = c.clone()
    k = tab.k
    ca = c.clone()
    fa = base + ca
    t4 = torch.empty((x.shape[0], 4), dtype=torch.float32, device=be.device)
    t4[:, :3] = x - be.gather(tab.qn, fa)[:, :3]
    t4[:, 3] = -1.0
    act = None
    for _ in range(max_steps):
        rows = be.gather(tab.edges, fa).reshape(-1, 4, k)
        s = torch.einsum("mck,mc->mk", rows, t4)
        smax, kk = s.max(dim=1)
        mv = torch.nonzero(smax > 0).reshape(-1)
        if mv.numel() == 0:
            break
        km = kk[mv]
        e = rows[mv, :3, :].gather(2, km.view(-1, 1, 1).expand(-1, 3, 1))[:, :, 0]
        t4 = t4[mv]
        t4[:, :3] -= e
        cm = ca[mv]
        ca = tab.nbr_flat[cm * k + km]
        fa = fa[mv] + (ca - cm)
        act = mv if act is None else act[mv]
        out[act] = ca
    return out


# ------------------------------------------------------------------------------- the ICP core
# Small 3x3 algebra written elementwise: the result of a sample never depends on the batch it is in
# (batched matmul/einsum may pick different kernels, and so different roundings, by batch size).
def _mat3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 3, 3) @ (n, 3, 3)."""
    out = np.empty(np.broadcast_shapes(a.shape, b.shape))
    for i in range(3):
        for j in range(3):
            out[:, i, j] = a[:, i, 0] * b[:, 0, j] + a[:, i, 1] * b[:, 1, j] + a[:, i, 2] * b[:, 2, j]
    return out


def _matvec3(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(n, 3, 3) @ (n, 3)."""
    return np.stack([a[:, i, 0] * v[:, 0] + a[:, i, 1] * v[:, 1] + a[:, i, 2] * v[:, 2] for i in range(3)], axis=1)


def _transform(p: np.ndarray, r: np.ndarray, s: np.ndarray, t: np.ndarray, dtype=np.float64) -> np.ndarray:
    """(a, n, 3) points -> s R p + t, elementwise in ``dtype``."""
    m = (s[:, None, None] * r).astype(dtype)
    tt = t.astype(dtype)
    p0, p1, p2 = (p[..., i].astype(dtype, copy=False) for i in range(3))
    out = np.empty(p.shape, dtype)
    for j in range(3):
        out[..., j] = m[:, j, 0, None] * p0 + m[:, j, 1, None] * p1 + m[:, j, 2, None] * p2 + tt[:, j, None]
    return out


def _rowsum(x: np.ndarray) -> np.ndarray:
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


def _dot3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _rotation_from_vector(w: np.ndarray) -> np.ndarray:
    """Rodrigues: (a, 3) rotation vectors -> (a, 3, 3) rotation matrices (float64)."""
    th = np.linalg.norm(w, axis=1)
    safe = np.where(th > 0, th, 1.0)
    k = w / safe[:, None]
    kx = np.zeros((w.shape[0], 3, 3))
    kx[:, 0, 1], kx[:, 0, 2] = -k[:, 2], k[:, 1]
    kx[:, 1, 0], kx[:, 1, 2] = k[:, 2], -k[:, 0]
    kx[:, 2, 0], kx[:, 2, 1] = -k[:, 1], k[:, 0]
    s, c = np.sin(th)[:, None, None], np.cos(th)[:, None, None]
    return np.eye(3)[None] + s * kx + (1.0 - c) * _mat3(kx, kx)


def _initial_fit(p: np.ndarray, q: np.ndarray, with_scale: bool):
    """Kabsch / Umeyama fit of one prediction (N, 3) to its reference (N, 3).

    Means in float64; the cross-covariance of the centred float32 coordinates; SVD in float64.
    """
    mp, mq = p.mean(axis=0, dtype=np.float64), q.mean(axis=0, dtype=np.float64)
    pc = (p - mp.astype(p.dtype)).astype(np.float32, copy=False)
    qc = (q - mq.astype(q.dtype)).astype(np.float32, copy=False)
    mp = mp + pc.mean(axis=0, dtype=np.float64)
    mq = mq + qc.mean(axis=0, dtype=np.float64)
    h = np.array([[np.sum(pc[:, j] * qc[:, k], dtype=np.float64) for k in range(3)] for j in range(3)])
    return _fit_from_sums(mp, mq, h, float(np.sum(pc * pc, dtype=np.float64)), with_scale)


def _fit_from_sums(mp, mq, h, pp, with_scale: bool):
    """The closed-form fit from the means (3,), the cross-covariance sum h (3, 3) of the centred
    coordinates and their squared norm sum ``pp``: rotation, scale, translation (float64)."""
    u, sv, vt = np.linalg.svd(h)
    d = np.ones(3)
    d[2] = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = (vt.T * d) @ u.T
    s = float((sv * d).sum() / max(float(pp), 1e-300)) if with_scale else 1.0
    return r, s, mq - s * r @ mp


def _icp_iterations(be, tab, p_it, q_it, base, r, s, t, c, pivot, max_iter, cfg, trees=None):
    """Point-to-plane ICP (Levenberg-Marquardt) on iteration vertices, batched over samples.

    p_it (a, S, 3) float64 prediction iteration vertices; q_it (a, S, 3) float64 reference
    positions of the same vertices (rotation-centre radius); base (a,) table offsets; r (a,3,3),
    s (a,), t (a,3) the starting transform in the centred reference frame; c (a, S) local start
    vertices; pivot (a, 3) rotation centre.

    Every iterate (transform) is evaluated: nearest vertices of the iteration vertices and the RMS
    point-to-plane residual ``f``. An iterate that lowers ``f`` is accepted (damping / 4, not
    below ``damping``); one that does not is rejected (damping x 10) and the step is recomputed
    from the best iterate. A sample stops when an accepted iterate lowers ``f`` by at most
    ``rmse_rtol`` (relative), when a step moves no iteration vertex by more than
    ``tolerance_mm``, when the damping exceeds 1e4, or after ``max_iter`` evaluations. The
    result is the best iterate. Returns r, s, t, evaluations, converged (stopped before the cap),
    nearest vertices of the best iterate (a, S).
    """
    a, S, _ = p_it.shape
    r, s, t, c = r.copy(), s.copy(), t.copy(), np.array(c, dtype=np.int64)
    best_r, best_s, best_t, best_c = r.copy(), s.copy(), t.copy(), c.copy()
    best = np.full(a, np.inf)
    dim = 6
    best_a = np.zeros((a, dim, dim))
    best_b = np.zeros((a, dim))
    lam = np.full(a, float(cfg.damping))
    rad = np.linalg.norm(q_it - pivot[:, None, :], axis=2)  # (a, S)
    rho = np.sqrt(_rowsum(rad**2) / S)
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
        x = _transform(p_it[act], r[act], s[act], t[act])
        bb = np.repeat(base[act], S)
        if trees is None:
            cc = _walk(be, tab, be.put(x.reshape(-1, 3), np.float32), be.int_index(best_c[act].reshape(-1)),
                       be.int_index(bb), cfg.max_walk_steps)
            cc = be.host(cc).reshape(act.size, S)
        else:
            cc = trees.query(x.astype(np.float32), base[act] // tab.n, best_c[act])
        qn = be.host(be.gather(tab.qn, be.int_index(bb + cc.reshape(-1)))).reshape(act.size, S, 6).astype(np.float64)
        nrm = qn[..., 3:]
        res = _dot3(x - qn[..., :3], nrm)
        cur = np.sqrt(_rowsum(res * res) / S)
        iters[act] += 1
        # normal equations of the linearised update about the pivot:
        # x' = Rot(omega) (x - o) + o + tau, rotation unknowns scaled by rho
        y = x - pivot[act, None, :]
        cols = [np.cross(y, nrm) / rho[act, None, None], nrm]
        jac = np.ascontiguousarray(np.moveaxis(np.concatenate(cols, axis=2), 2, 1))  # (a', dim, S)
        amat = np.empty((act.size, dim, dim))
        bvec = np.empty((act.size, dim))
        for i in range(dim):
            bvec[:, i] = _rowsum(jac[:, i] * res)
            for j in range(i, dim):
                amat[:, i, j] = amat[:, j, i] = _rowsum(jac[:, i] * jac[:, j])
        # accept or reject
        prev = best[act]
        better = cur < prev
        ib = act[better]
        best[ib] = cur[better]
        best_r[ib], best_s[ib], best_t[ib], best_c[ib] = r[ib], s[ib], t[ib], cc[better]
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
        rot = _rotation_from_vector(w)
        piv = pivot[act]
        r[act] = _mat3(rot, best_r[act])
        t[act] = _matvec3(rot, best_t[act] - piv) + piv + tau
        moved = np.linalg.norm(w, axis=1) * rmax[act] + np.linalg.norm(tau, axis=1)
        tiny = moved <= tol
        conv[act[tiny]] = True
        act = act[~tiny]
    return best_r, best_s, best_t, iters, conv, best_c


def _score_pass(be, tab, p_part, r, s, t, base, start, part: _Part, cfg):
    """Nearest reference vertices of every vertex of a scored set, and the signed distances.

    p_part (a, n, 3) prediction vertices of the set; r, s, t the transforms; base (a,) table
    offsets; start (a, S) nearest vertices of the iteration vertices (layer 0). Vertices are solved
    layer after layer of a breadth-first order from the iteration vertices; a vertex's walk starts
    from the closer of its parent's answer and that answer shifted by the vertex-id offset (exact
    on grid-ordered meshes such as the BFM; the start only changes the work, rarely the result).
    Returns (nearest (a, n) int64 local ids, distances (a, n) float32 in input units).
    """
    a, n, _ = p_part.shape
    order = part.order
    # vertex-major: every layer is one contiguous block
    xv = np.ascontiguousarray(_transform(p_part[:, order], r, s, t, np.float32).transpose(1, 0, 2))
    near = np.empty((n, a), np.int64)
    b = part.bounds
    near[: b[1]] = np.asarray(start, dtype=np.int64).T
    for li in range(len(b) - 1):
        lo, hi = int(b[li]), int(b[li + 1])
        x = xv[lo:hi].reshape(-1, 3)
        bb = np.broadcast_to(base, (hi - lo, a)).reshape(-1)
        if li == 0:
            warm = near[lo:hi].reshape(-1)
        else:
            wa = near[part.parent_pos[lo:hi]]
            wb = np.clip(wa + part.shift[lo:hi, None], 0, tab.n - 1)
            wa, wb = wa.reshape(-1), wb.reshape(-1)
            da = x - be.host(be.gather(tab.qn, be.int_index(bb + wa)))[:, :3]
            db = x - be.host(be.gather(tab.qn, be.int_index(bb + wb)))[:, :3]
            warm = np.where(_dot3(db, db) < _dot3(da, da), wb, wa)
        res = _walk(be, tab, be.put(x), be.int_index(warm), be.int_index(bb), cfg.max_walk_steps)
        near[lo:hi] = be.host(res).reshape(hi - lo, a)
    qn = be.host(be.gather(tab.qn, be.int_index((near + base[None, :]).reshape(-1)))).reshape(n, a, 6)
    dv = _dot3(xv - qn[..., :3], qn[..., 3:])
    near_out = np.empty((a, n), np.int64)
    near_out[:, order] = near.T
    d = np.empty((a, n), np.float32)
    d[:, order] = dv.T
    return near_out, d


@dataclass(eq=False)
class _Out:
    """Output buffers filled by the chunk workers (each sample written exactly once)."""

    rmse: np.ndarray
    rot: np.ndarray
    trans: np.ndarray
    scale: np.ndarray
    iters: np.ndarray
    conv: np.ndarray
    dist: np.ndarray | None
    near: np.ndarray | None


def _new_out(b, m, want):
    return _Out(
        rmse=np.zeros(b),
        rot=np.zeros((b, 3, 3)),
        trans=np.zeros((b, 3)),
        scale=np.ones(b),
        iters=np.zeros(b, np.int64),
        conv=np.zeros(b, bool),
        dist=np.zeros((b, m), np.float32) if want else None,
        near=np.zeros((b, m), np.int32) if want else None,
    )


def _chunk_references(ref, refs_in_chunk, group, samples, kernel=None):
    """Local reference index of each sample (gl), the chunk's reference centroids (G, 3) float64
    and their centred float32 vertices (G, N, 3), C-ordered (the same numbers with the compiled
    ``kernel.center_references``, in one pass)."""
    g_local = {int(g): i for i, g in enumerate(refs_in_chunk)}
    gl = np.array([g_local[int(group[b])] for b in samples], np.int64)
    if kernel is not None:
        rows = np.asarray(refs_in_chunk, dtype=np.int64)
        if not (ref.dtype == np.float32 and ref.flags.c_contiguous):  # one other compiled layout: float64 rows
            ref, rows = np.ascontiguousarray(ref[rows], dtype=np.float64), np.arange(rows.size, dtype=np.int64)
        centroid, q32, finite = kernel.center_references(ref, rows)
        if not finite:
            raise ValidationError("contains NaN or infinite values", key="ref")
        return gl, centroid, q32
    refc = np.asarray(ref[refs_in_chunk])
    if not np.isfinite(refc).all():
        raise ValidationError("contains NaN or infinite values", key="ref")
    centroid = refc.mean(axis=1, dtype=np.float64)
    return gl, centroid, np.ascontiguousarray((refc - centroid[:, None, :]).astype(np.float32))


def _region_pivots(q32: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(G, 3) float64 rotation centres of a part's ICP: the mean of each reference's region vertices."""
    return q32[:, ids].astype(np.float64).mean(axis=1)


def _chunk_predictions(pred, samples) -> np.ndarray:
    p = np.asarray(pred[samples])
    if not np.isfinite(p).all():
        raise ValidationError("contains NaN or infinite values", key="pred")
    return p


def _process_chunk(be, plan: _Plan, pred, ref, samples, refs_in_chunk, group, with_scale, cfg, outs, want, exact, kernel=None):
    """Score the predictions ``samples`` (all of whose references are ``refs_in_chunk``)."""
    n = plan.n
    upm = cfg.units_per_mm
    ng = len(refs_in_chunk)
    gl, centroid, q32 = _chunk_references(ref, refs_in_chunk, group, samples)
    nrm = np.empty_like(q32)
    gp = plan.glob.graph
    edges = np.empty((ng, n, 4 * gp.k), np.float32)
    for i in range(ng):
        nrm[i] = _normals32(q32[i], plan.triangles)
        _edge_table(q32[i], gp, plan.off_slots, out=edges[i])
    tab = _RefTables(
        n=n,
        k=gp.k,
        qn=be.rows(np.concatenate([q32, nrm], axis=2).reshape(-1, 6)),
        edges=be.rows(edges.reshape(ng * n, -1)),
        nbr_flat=be.int_index(gp.nbr.reshape(-1)),
    )
    a = len(samples)
    p = _chunk_predictions(pred, samples)
    # 1. closed-form correspondence fit (float64)
    r = np.empty((a, 3, 3))
    s = np.empty(a)
    t = np.empty((a, 3))
    for i in range(a):
        r[i], s[i], t[i] = _initial_fit(p[i], q32[gl[i]], with_scale)
    # 2. global ICP on the iteration vertices
    it = plan.glob.it_local
    base = gl * n
    q_gl = q32[gl]  # (a, N, 3) float32
    c0 = np.broadcast_to(it, (a, it.size))
    gtrees = _make_trees(q32, gp.nbr, kernel, cfg.max_walk_steps) if (exact or cfg.score_nearest == "exact") else None
    r, s, t, iters, conv, c_it = _icp_iterations(
        be, tab, p[:, it].astype(np.float64), q_gl[:, it].astype(np.float64), base, r, s, t, c0, np.zeros((a, 3)),
        cfg.max_iterations, cfg, gtrees if exact else None,
    )
    # 3. score every vertex
    if exact or cfg.score_nearest == "exact":
        near, d = _exact_pass(q32, nrm, gl, _apply(p, r, s, t), gtrees)
    else:
        near, d = _score_pass(be, tab, p, r, s, t, base, c_it, plan.glob, cfg)
    _store(outs[0], samples, d, near, r, s, t, centroid[gl], iters, conv, upm, want)
    # 4. parts: local ICP from the global transform, nearest vertices among the region's vertices
    for pi, part in enumerate(plan.parts):
        ids = part.ids
        m = ids.size
        use_trees = exact or cfg.part_nearest == "exact"
        trees = _make_trees(q32[:, ids], part.graph.nbr, kernel, cfg.max_walk_steps) if use_trees else None
        if use_trees:
            pedges = None
        else:
            pe = edges[:, ids].reshape(ng, m, 4, gp.k)
            pe[:, part.off_slots // gp.k, 3, part.off_slots % gp.k] = np.inf
            pedges = be.rows(pe.reshape(ng * m, -1))
        ptab = _RefTables(
            n=m,
            k=gp.k,
            qn=be.rows(np.concatenate([q32[:, ids], nrm[:, ids]], axis=2).reshape(-1, 6)),
            edges=pedges,
            nbr_flat=be.int_index(part.graph.nbr.reshape(-1)),
        )
        pbase = gl * m
        # walk starts: the global nearest vertex when it lies in the region, else the vertex itself
        itp = part.it_local
        loc = part.local_of[near[:, ids[itp]]]
        warm = np.where(loc >= 0, loc, itp[None, :])
        q_r = q_gl[:, ids[itp]].astype(np.float64)
        rp, sp, tp, itp_n, convp, c_p = _icp_iterations(
            be, ptab, p[:, ids[itp]].astype(np.float64), q_r, pbase, r, s, t, warm, _region_pivots(q32, ids)[gl],
            cfg.part_max_iterations, cfg, trees,
        )
        if use_trees:
            nr, dr = _exact_pass(q32[:, ids], nrm[:, ids], gl, _apply(p[:, ids], rp, sp, tp), trees)
        else:
            nr, dr = _score_pass(be, ptab, p[:, ids], rp, sp, tp, pbase, c_p, part, cfg)
        _store(outs[1 + pi], samples, dr, ids[nr], rp, sp, tp, centroid[gl], itp_n, convp, upm, want)


def _compiled_pipeline(cfg: IcpConfig, kernel, be) -> bool:
    """The compiled pipeline (``_nnkernel``) runs the definition's searches (exhaustive score and
    parts, the walk or, with ``nearest="exact"``, the exhaustive search in the global iterations)
    on the host; the numpy implementation runs the rest (torch devices, walk scores)."""
    return kernel is not None and be.name == "numpy" and cfg.score_nearest == "exact" and cfg.part_nearest == "exact"


def _c64(a) -> np.ndarray:
    """A C-ordered float64 copy (the compiled kernels get one array layout, so one compilation)."""
    return np.array(a, dtype=np.float64, order="C")


def _process_chunk_compiled(plan: _Plan, pred, ref, samples, refs_in_chunk, group, with_scale, cfg, outs, want, exact, kernel):
    """``_process_chunk`` with every per-point loop compiled (numba): same steps, same answers up
    to rounding (sums and the small linear solves are grouped differently)."""
    upm = cfg.units_per_mm
    tol = cfg.tolerance_mm * upm
    gl, centroid, q32 = _chunk_references(ref, refs_in_chunk, group, samples, kernel)
    nrm = kernel.normals32(q32, plan.triangles)
    p = _chunk_predictions(pred, samples).astype(np.float32, order="C", copy=False)
    a = len(samples)
    # 1. closed-form correspondence fit
    mp, mq, h, pp = kernel.cross_covariance(p, q32, gl)
    r = np.empty((a, 3, 3))
    s = np.empty(a)
    t = np.empty((a, 3))
    for i in range(a):
        r[i], s[i], t[i] = _fit_from_sums(mp[i], mq[i], h[i], pp[i], with_scale)
    # 2. global ICP on the iteration vertices (the walk; exhaustive with nearest="exact")
    gnbr = plan.glob.graph.nbr
    grid = kernel.build_grids(q32, _GRID_CELL)
    it = plan.glob.it_local
    c0 = np.array(np.broadcast_to(it, (a, it.size)), dtype=np.int64, order="C")  # writable, C-ordered
    r, s, t, iters, conv, _ = kernel.icp_iterate(
        _c64(p[:, it]), _c64(q32[gl[:, None], it[None, :]]), gl, r, s, t, c0, np.zeros((a, 3)),
        int(cfg.max_iterations), float(cfg.damping), float(cfg.rmse_rtol), float(tol), bool(exact), float(_CERT_MARGIN_MM * upm),
        q32, nrm, gnbr, *grid, int(cfg.max_walk_steps),
    )
    # 3. score every vertex (exhaustive)
    near, d, ss = kernel.score_exact(p, r, s, t, gl, q32, nrm, gnbr, *grid, int(cfg.max_walk_steps))
    _store(outs[0], samples, d, near, r, s, t, centroid[gl], iters, conv, upm, want, ss)
    # 4. parts: local ICP from the global transform, nearest vertices among the region's vertices
    for pi, part in enumerate(plan.parts):
        ids = part.ids
        qp = np.ascontiguousarray(q32[:, ids])
        npart = np.ascontiguousarray(nrm[:, ids])
        pnbr = part.graph.nbr
        pgrid = kernel.build_grids(qp, _GRID_CELL)
        itp = part.it_local
        loc = part.local_of[near[:, ids[itp]]]
        warm = np.array(np.where(loc >= 0, loc, itp[None, :]), dtype=np.int64, order="C")
        pv = np.ascontiguousarray(p[:, ids])
        rp, sp, tp, itp_n, convp, _ = kernel.icp_iterate(
            _c64(pv[:, itp]), _c64(qp[:, itp].astype(np.float64)[gl]), gl, r, s, t, warm, _region_pivots(qp, slice(None))[gl],
            int(cfg.part_max_iterations), float(cfg.damping), float(cfg.rmse_rtol), float(tol), True, float(_CERT_MARGIN_MM * upm),
            qp, npart, pnbr, *pgrid, int(cfg.max_walk_steps),
        )
        nr, dr, ssr = kernel.score_exact(pv, rp, sp, tp, gl, qp, npart, pnbr, *pgrid, int(cfg.max_walk_steps))
        _store(outs[1 + pi], samples, dr, ids[nr] if want else None, rp, sp, tp, centroid[gl], itp_n, convp, upm, want, ssr)


def _apply(p, r, s, t) -> np.ndarray:
    """(a, n, 3) points -> s R p + t as float32."""
    return _transform(p, r, s, t, np.float32)


def _exact_engine(name: str | None):
    """The exhaustive nearest-vertex search: the compiled grid search (numba) or scipy k-d trees.

    ``None``/"auto": numba when it imports (it comes with the project's librosa), else k-d trees.
    Both are exhaustive: the choice changes the time, not the result (up to exact distance ties).
    """
    if name in (None, "auto", "numba"):
        try:
            import v2m_bench._nnkernel as _nnkernel  # numba, imported only when the compiled engine is used
        except ImportError:
            if name == "numba":
                raise ValidationError("numba is not installed (pip install numba)", key="engine") from None
            return None
        return _nnkernel
    if name == "kdtree":
        return None
    raise ValidationError(f"expected 'auto', 'numba' or 'kdtree', found {name!r}", key="engine")


def _make_trees(q32, nbr, kernel, max_steps):
    return _Trees(q32) if kernel is None else _Grids(q32, nbr, kernel, max_steps)


class _Grids:
    """Exact nearest vertices with the compiled column-grid search (see ``_nnkernel``).

    q32 (G, n, 3) float32 reference vertices. Same interface as :class:`_Trees`, plus starts (the
    first distance bound of each point; default: the corresponding vertex).
    """

    def __init__(self, q32, nbr, kernel, max_steps):
        self.q32 = np.ascontiguousarray(q32, dtype=np.float32)
        self.nbr = np.ascontiguousarray(nbr, dtype=np.int64)
        self.kernel = kernel
        self.max_steps = int(max_steps)
        self.axes, self.origin, self.dims, self.cell, self.starts, self.items, self.coords = kernel.build_grids(self.q32, _GRID_CELL)

    def query(self, x, gl, start=None) -> np.ndarray:
        a, s = x.shape[:2]
        chain = start is None
        if start is None:
            start = np.broadcast_to(np.arange(s, dtype=np.int64) % self.q32.shape[1], (a, s))
        out = self.kernel.nearest_exact(
            np.ascontiguousarray(x.reshape(-1, 3), dtype=np.float32),
            np.repeat(np.asarray(gl, dtype=np.int64), s),
            np.ascontiguousarray(start, dtype=np.int64).reshape(-1),
            self.q32, self.nbr, self.axes, self.origin, self.dims, self.cell, self.starts, self.items, self.coords, chain,
            self.max_steps,
        )
        return out.reshape(a, s)


class _Trees:
    """Exact nearest vertices with one k-d tree per reference (built on first use)."""

    def __init__(self, q32):
        self.q32 = q32
        self.trees = {}

    def query(self, x, gl, start=None) -> np.ndarray:
        from scipy.spatial import cKDTree

        out = np.empty(x.shape[:2], np.int64)
        gl = np.asarray(gl)
        for g in np.unique(gl):
            g = int(g)
            if g not in self.trees:
                self.trees[g] = cKDTree(self.q32[g].astype(np.float64), balanced_tree=False, compact_nodes=False)
            sel = np.flatnonzero(gl == g)
            out[sel] = self.trees[g].query(x[sel].reshape(-1, 3).astype(np.float64))[1].reshape(sel.size, -1)
        return out


def _exact_pass(q32, nrm, gl, x_all, trees=None):
    trees = trees or _Trees(q32)
    near = trees.query(x_all, gl)
    g, n, _ = q32.shape
    flat = (np.asarray(gl, dtype=np.int64)[:, None] * n + near).reshape(-1)
    be = _Numpy()
    qn = be.gather(be.rows(np.concatenate([q32, nrm], axis=2).reshape(-1, 6)), flat).reshape(near.shape + (6,))
    d = _dot3(x_all - qn[..., :3], qn[..., 3:])
    return near, d.astype(np.float32, copy=False)


def _store(out: _Out, samples, d, near, r, s, t, centroid, iters, conv, upm, want, ss=None):
    """Write a chunk's results; ``ss``: the rows' sums of squared distances when the caller
    already has them (``_rowsum(d64 * d64)``, the same numbers)."""
    if ss is None:
        d64 = d.astype(np.float64)
        ss = _rowsum(d64 * d64)
    out.rmse[samples] = np.sqrt(ss / d.shape[1]) / upm
    out.rot[samples] = r
    out.scale[samples] = s
    out.trans[samples] = t + centroid  # back to the reference's own coordinates
    out.iters[samples] = iters
    out.conv[samples] = conv
    if want:
        out.dist[samples] = d / upm
        out.near[samples] = near


# ----------------------------------------------------------------------------------- validation
def _as_mesh_batch(a, name: str, n: int | None = None) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        a = a.detach().cpu().numpy()
    try:
        arr = np.asarray(a)
    except Exception as e:  # noqa: BLE001 - anything numpy cannot read is a user error here
        raise ValidationError(f"cannot read as an array: {e}", key=name) from None
    if arr.dtype.kind not in "fiu":
        raise ValidationError(f"expected a numeric array, found dtype {arr.dtype}", key=name)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValidationError(f"expected shape (B, N, 3) or (N, 3), found {np.shape(a)}", key=name)
    if arr.shape[0] < 1 or arr.shape[1] < 3:
        raise ValidationError(f"expected at least one mesh of at least 3 vertices, found {np.shape(a)}", key=name)
    if n is not None and arr.shape[1] != n:
        raise ValidationError(f"expected {n} vertices (as in pred), found {arr.shape[1]}", key=name)
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    return arr


def _check_triangles(triangles, n: int) -> np.ndarray:
    tri = np.asarray(triangles)
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


def _check_group(group, b: int, g: int) -> np.ndarray:
    if group is None:
        if g == b:
            return np.arange(b)
        if g == 1:
            return np.zeros(b, np.int64)
        raise ValidationError(f"{b} predictions and {g} references: pass group= (reference index of each prediction)", key="group")
    grp = np.asarray(group)
    if grp.shape != (b,) or grp.dtype.kind not in "iu":
        raise ValidationError(f"expected {b} integer reference indices, found shape {grp.shape} dtype {grp.dtype}", key="group")
    grp = grp.astype(np.int64)
    if b and (grp.min() < 0 or grp.max() >= g):
        raise ValidationError(f"reference indices outside 0..{g - 1}", key="group")
    return grp


def _check_regions(regions, n: int) -> dict:
    if regions is None:
        return {}
    if not isinstance(regions, Mapping):
        raise ValidationError(f"expected a dict of name -> boolean vertex mask, found {type(regions).__name__}", key="regions")
    out = {}
    for name, mask in regions.items():
        m = np.asarray(mask)
        if m.dtype != bool or m.shape != (n,):
            raise ValidationError(f"expected a boolean mask of shape ({n},), found {m.dtype} {m.shape}", key=f"regions[{name!r}]")
        if m.sum() < 3:
            raise ValidationError(f"needs at least 3 vertices, found {int(m.sum())}", key=f"regions[{name!r}]")
        out[str(name)] = m
    return out


# ----------------------------------------------------------------------------------- public API
@dataclass(frozen=True, eq=False)
class IcpPlan:
    """The topology work of :func:`icp_scores` (walk graphs, iteration vertices, part layouts).

    It depends only on the triangles, the regions and the config; make it once with
    :func:`icp_plan` and pass it as ``plan=`` to every :func:`icp_scores` call on the same
    topology (a scoring run calls it chunk after chunk). Results do not depend on it.
    """

    n_vertices: int
    triangles: np.ndarray
    regions: dict
    config: IcpConfig
    graphs: Any = None

    def matches(self, triangles: np.ndarray, regions: dict, config: IcpConfig) -> bool:
        """Whether this plan fits these (checked) triangles, regions and config (the plan reads
        only the config's iteration-vertex counts)."""
        return (
            self.config.n_iteration_vertices == config.n_iteration_vertices
            and self.config.part_iteration_vertices == config.part_iteration_vertices
            and (self.triangles is triangles or np.array_equal(self.triangles, triangles))
            and list(self.regions) == list(regions)
            and all(self.regions[k] is regions[k] or np.array_equal(self.regions[k], regions[k]) for k in regions)
        )


def icp_plan(triangles, n_vertices: int, regions: Mapping[str, Any] | None = None, *,
             config: IcpConfig = DEFAULT_ICP_CONFIG) -> IcpPlan:
    """Prepare the topology work of :func:`icp_scores` once, for many calls.

    Parameters
    ----------
    triangles : array_like, shape (F, 3), int
    n_vertices : int
        Vertices per mesh.
    regions : dict of str -> ndarray (N,) bool, optional
        The parts, as passed to :func:`icp_scores`.
    config : IcpConfig

    Returns
    -------
    IcpPlan
    """
    n = int(n_vertices)
    tri = _check_triangles(triangles, n)
    regs = _check_regions(regions, n)
    return IcpPlan(n_vertices=n, triangles=tri, regions=regs, config=config, graphs=_make_plan(tri, n, regs, config))


def icp_scores(
    pred,
    ref,
    triangles,
    regions: Mapping[str, Any] | None = None,
    *,
    group=None,
    with_scale: bool = False,
    config: IcpConfig = DEFAULT_ICP_CONFIG,
    return_distances: bool = False,
    nearest: str | None = None,
    device=None,
    threads: int | None = None,
    progress: bool = False,
    engine: str | None = None,
    plan: IcpPlan | None = None,
) -> tuple[IcpResult, dict[str, IcpResult]]:
    """Global ICP point-to-plane RMSE and part RMSE in one pass (shares the per-reference work).

    Parameters
    ----------
    pred : array_like, shape (B, N, 3) or (N, 3)
        Predicted meshes (BFM units), same topology as ``ref``.
    ref : array_like, shape (G, N, 3) or (N, 3)
        Reference meshes.
    triangles : array_like, shape (F, 3), int
        0-based vertex ids (every vertex must belong to a triangle).
    regions : dict of str -> ndarray (N,) bool, optional
        Parts for the part RMSE.
    group : array_like, shape (B,), int, optional
        Reference index of each prediction; default ``arange(B)`` when G == B, zeros when G == 1.
    with_scale : bool
        Similarity instead of rigid registration: the correspondence fit estimates a scale
        (Umeyama) and the ICP keeps it, refining rotation and translation.
    config : IcpConfig
    return_distances : bool
        Also return per-vertex signed distances (mm) and nearest reference vertices.
    nearest : {None, "walk", "exact"}
        None (the definition: ``config``'s searches), "exact" (k-d trees everywhere, for checks;
        slower) or "walk" (the graph walk everywhere; fastest, see ``IcpConfig.score_nearest``).
    device : None or torch device
        None: numpy. A torch device (e.g. "cuda") runs the per-point work with torch.
    threads : int, optional
        Reference chunks processed in parallel (default: number of CPUs, at most 8). Results do
        not depend on it.
    progress : bool
        Show a progress bar (tqdm) when on a terminal.
    engine : {None, "auto", "numba", "kdtree"}
        The implementation: the compiled pipeline (numba, the default when it imports; it is
        installed with the project) or the numpy path with scipy k-d trees. Both search
        exhaustively and take the same steps, so the nearest vertices are the same (up to exact
        distance ties) and the scores agree to rounding; numba is several times faster. With a
        torch ``device`` or a walk-only configuration the numpy path runs (its exhaustive
        searches still use the compiled kernel when numba imports).
    plan : IcpPlan, optional
        From :func:`icp_plan` on the same triangles, regions and config (checked), to skip the
        topology work on repeated calls.

    Returns
    -------
    (IcpResult, dict of str -> IcpResult)
        The global result and one result per region (``vertex_ids`` = the region's vertices).
    """
    pred = _as_mesh_batch(pred, "pred")
    b, n, _ = pred.shape
    ref = _as_mesh_batch(ref, "ref", n)
    tri = _check_triangles(triangles, n)
    grp = _check_group(group, b, ref.shape[0])
    regs = _check_regions(regions, n)
    if not isinstance(config, IcpConfig):
        raise ValidationError(f"expected an IcpConfig, found {type(config).__name__}", key="config")
    if nearest not in (None, "walk", "exact"):
        raise ValidationError(f"expected None, 'walk' or 'exact', found {nearest!r}", key="nearest")
    if nearest == "walk":
        config = replace(config, score_nearest="walk", part_nearest="walk")
    be = _backend(device)
    kernel = _exact_engine(engine)
    if plan is None:
        graphs = _make_plan(tri, n, regs, config)
    elif isinstance(plan, IcpPlan) and plan.n_vertices == n and plan.matches(tri, regs, config):
        graphs = plan.graphs
    else:
        raise ValidationError("was made for other triangles, regions or config", key="plan")
    plan = graphs
    want = bool(return_distances)
    outs = [_new_out(b, n, want)] + [_new_out(b, part.ids.size, want) for part in plan.parts]

    # chunks of whole references: every prediction of a reference is scored with its tables
    order = np.argsort(grp, kind="stable")
    used_refs = np.unique(grp)
    per_chunk = _REFS_PER_CHUNK
    chunks = []
    for lo in range(0, used_refs.size, per_chunk):
        refs_c = used_refs[lo : lo + per_chunk]
        sel = order[np.isin(grp[order], refs_c)]
        chunks.append((sel, refs_c))

    compiled = _compiled_pipeline(config, kernel, be)

    def work(ch):
        if compiled:
            _process_chunk_compiled(plan, pred, ref, ch[0], ch[1], grp, with_scale, config, outs, want, nearest == "exact", kernel)
        else:
            _process_chunk(be, plan, pred, ref, ch[0], ch[1], grp, with_scale, config, outs, want, nearest == "exact", kernel)
        return ch[0].size

    nthreads = threads if threads is not None else min(os.cpu_count() or 1, 8)
    if be.name != "numpy":
        nthreads = 1
    from .fileio import progress as progress_bar

    bar = progress_bar(total=b, unit="mesh", desc="ICP", enabled=None if progress else False)  # a terminal only
    try:
        if nthreads <= 1 or len(chunks) <= 1:
            for ch in chunks:
                bar.update(work(ch))
        else:
            with ThreadPoolExecutor(max_workers=int(nthreads)) as ex:
                for k in ex.map(work, chunks):
                    bar.update(k)
    finally:
        bar.close()

    def result(out: _Out, ids):
        return IcpResult(
            rmse=out.rmse,
            rotation=out.rot,
            translation=out.trans,
            scale=out.scale,
            iterations=out.iters,
            converged=out.conv,
            vertex_ids=ids,
            distances=out.dist,
            nearest=out.near,
        )

    glob = result(outs[0], np.arange(n, dtype=np.int64))
    parts = {part.name: result(outs[1 + i], part.ids) for i, part in enumerate(plan.parts)}
    return glob, parts


def icp_rmse(pred, ref, triangles, *, group=None, with_scale: bool = False, config: IcpConfig = DEFAULT_ICP_CONFIG,
             return_distances: bool = False, nearest: str | None = None, device=None, threads: int | None = None,
             progress: bool = False, engine: str | None = None) -> IcpResult:
    """ICP point-to-plane RMSE (mm) of each prediction against its reference.

    See :func:`icp_scores` for the parameters and the module docstring / docs/metrics.md for the
    exact definition. ``rmse`` is (B,) in millimetres.
    """
    return icp_scores(pred, ref, triangles, None, group=group, with_scale=with_scale, config=config,
                      return_distances=return_distances, nearest=nearest, device=device, threads=threads,
                      progress=progress, engine=engine)[0]


def part_rmse(pred, ref, triangles, regions: Mapping[str, Any], *, group=None, with_scale: bool = False,
              config: IcpConfig = DEFAULT_ICP_CONFIG, return_results: bool = False, nearest: str | None = None,
              device=None, threads: int | None = None, progress: bool = False, engine: str | None = None) -> dict:
    """Part RMSE: a local ICP per region started from the global alignment, RMSE over the region.

    Parameters are those of :func:`icp_scores`; ``regions`` maps a part name to a boolean vertex
    mask (N,). Returns ``{name: rmse (B,) mm}``, or ``{name: IcpResult}`` (with per-vertex
    distances over the region) when ``return_results``.
    """
    if regions is None or (isinstance(regions, Mapping) and not regions):
        raise ValidationError("expected at least one region", key="regions")
    _, parts = icp_scores(pred, ref, triangles, regions, group=group, with_scale=with_scale, config=config,
                          return_distances=return_results, nearest=nearest, device=device, threads=threads,
                          progress=progress, engine=engine)
    return parts if return_results else {k: v.rmse for k, v in parts.items()}


def nearest_vertices(points, ref, triangles, start=None, *, max_steps: int = DEFAULT_ICP_CONFIG.max_walk_steps):
    """The nearest-vertex walk used by the metrics, exposed for checks and diagnostics.

    Parameters
    ----------
    points : array_like, shape (B, M, 3) or (M, 3)
    ref : array_like, shape (B, N, 3) or (N, 3)
    triangles : array_like, shape (F, 3)
    start : array_like of int, shape (B, M) or (M,), optional
        Start vertices; default: vertex ``i`` for point ``i`` (needs M == N).

    Returns
    -------
    ndarray, shape (B, M), int64: the vertex where each walk ends.
    """
    ref = _as_mesh_batch(ref, "ref")
    g, n, _ = ref.shape
    pts = _as_mesh_batch(points, "points")
    if pts.shape[0] not in (1, g):
        raise ValidationError(f"expected {g} point sets, found {pts.shape[0]}", key="points")
    pts = np.broadcast_to(pts, (g, pts.shape[1], 3))
    m = pts.shape[1]
    if start is None:
        if m != n:
            raise ValidationError(f"needed when there are not {n} points (found {m})", key="start")
        start = np.arange(n)
    st = np.broadcast_to(np.asarray(start, dtype=np.int64), (g, m))
    if st.min() < 0 or st.max() >= n:
        raise ValidationError(f"vertex ids outside 0..{n - 1}", key="start")
    tri = _check_triangles(triangles, n)
    graph = _graph_from_pairs(_candidate_pairs(tri, n), n)
    be = _Numpy()
    refc = ref.astype(np.float64)
    centroid = refc.mean(axis=1)
    q32 = (refc - centroid[:, None]).astype(np.float32)
    off = np.flatnonzero(~graph.valid.reshape(-1))
    tab = _RefTables(
        n=n, k=graph.k,
        qn=be.rows(np.concatenate([q32, np.zeros_like(q32)], axis=2).reshape(-1, 6)),
        edges=be.rows(np.concatenate([_edge_table(q32[i], graph, off) for i in range(g)])),
        nbr_flat=graph.nbr.reshape(-1),
    )
    x = (pts - centroid[:, None]).astype(np.float32).reshape(-1, 3)
    base = np.repeat(np.arange(g) * n, m)
    return _walk(be, tab, x, st.reshape(-1).copy(), base, max_steps).reshape(g, m)
