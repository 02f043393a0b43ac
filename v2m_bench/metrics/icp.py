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
(``_icp/compiled_engine.py`` and the kernels in ``_icp/kernels.py``): normals, search grids, the
correspondence fit's sums, the ICP iterations and the scores, prediction after prediction, with
an exhaustive search that walks from a start vertex to bound the distance, then checks every
vertex of a depth-sorted column grid within that bound. ``"kdtree"`` runs the numpy
implementation (``_icp/numpy_engine.py``) with scipy k-d trees (the fallback without numba; also
used for torch devices and walk-only configurations). Both engines run the same chunk procedure
(``_icp/driver.py``), find the same nearest vertices (exact distance ties: the compiled search
takes the lowest vertex id) and take the same steps; they group sums and solve the 6x6 systems
differently, so transforms agree to about 1e-13 and RMSEs to rounding (tested).

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

from ..errors import ValidationError
from . import _checks
from ._icp.compiled_engine import CompiledEngine, uses_compiled_engine
from ._icp.driver import ChunkRun, Outputs, chunk_jobs, new_outputs, process_chunk
from ._icp.numpy_engine import NumpyEngine
from ._icp.plan import candidate_pairs, graph_from_pairs, iteration_vertices, make_plan
from ._icp.search import exact_engine
from ._icp.walk import NumpyBackend, RefTables, backend, edge_table, walk

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
    tri = _checks.triangles(triangles, n)
    regs = _checks.regions(regions, n)
    return IcpPlan(n_vertices=n, triangles=tri, regions=regs, config=config, graphs=make_plan(tri, n, regs, config))


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
    pred = _checks.mesh_batch(pred, "pred")
    b, n, _ = pred.shape
    ref = _checks.mesh_batch(ref, "ref", n)
    tri = _checks.triangles(triangles, n)
    grp = _checks.group(group, b, ref.shape[0])
    regs = _checks.regions(regions, n)
    if not isinstance(config, IcpConfig):
        raise ValidationError(f"expected an IcpConfig, found {type(config).__name__}", key="config")
    if nearest not in (None, "walk", "exact"):
        raise ValidationError(f"expected None, 'walk' or 'exact', found {nearest!r}", key="nearest")
    if nearest == "walk":
        config = replace(config, score_nearest="walk", part_nearest="walk")
    be = backend(device)
    kernels = exact_engine(engine)
    if plan is None:
        graphs = make_plan(tri, n, regs, config)
    elif isinstance(plan, IcpPlan) and plan.n_vertices == n and plan.matches(tri, regs, config):
        graphs = plan.graphs
    else:
        raise ValidationError("was made for other triangles, regions or config", key="plan")
    want = bool(return_distances)
    outputs = [new_outputs(b, n, want)] + [new_outputs(b, part.ids.size, want) for part in graphs.parts]
    run = ChunkRun(plan=graphs, pred=pred, ref=ref, group=grp, with_scale=with_scale, config=config, outputs=outputs,
                   want=want, exact=nearest == "exact")
    if uses_compiled_engine(config, kernels, be):
        chunk_engine = CompiledEngine(kernels, config)
    else:
        chunk_engine = NumpyEngine(be, kernels, config)
    jobs = chunk_jobs(grp)  # chunks of whole references: every prediction of a reference is scored with its tables

    nthreads = threads if threads is not None else min(os.cpu_count() or 1, 8)
    if be.name != "numpy":
        nthreads = 1
    from ..fileio import progress as progress_bar

    bar = progress_bar(total=b, unit="mesh", desc="ICP", enabled=None if progress else False)  # a terminal only
    try:
        if nthreads <= 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(process_chunk(run, job, chunk_engine))
        else:
            with ThreadPoolExecutor(max_workers=int(nthreads)) as ex:
                for k in ex.map(lambda job: process_chunk(run, job, chunk_engine), jobs):
                    bar.update(k)
    finally:
        bar.close()

    whole = _result(outputs[0], np.arange(n, dtype=np.int64))
    parts = {part.name: _result(outputs[1 + i], part.ids) for i, part in enumerate(graphs.parts)}
    return whole, parts


def _result(out: Outputs, ids) -> IcpResult:
    return IcpResult(
        rmse=out.rmse,
        rotation=out.rotation,
        translation=out.translation,
        scale=out.scale,
        iterations=out.iterations,
        converged=out.converged,
        vertex_ids=ids,
        distances=out.distances,
        nearest=out.nearest,
    )


def icp_rmse(pred, ref, triangles, *, group=None, with_scale: bool = False, config: IcpConfig = DEFAULT_ICP_CONFIG,
             return_distances: bool = False, nearest: str | None = None, device=None, threads: int | None = None,
             progress: bool = False, engine: str | None = None) -> IcpResult:
    """ICP point-to-plane RMSE (mm) of each prediction against its reference.

    See :func:`icp_scores` for the parameters and this module's docstring / docs/metrics.md for the
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
    ref = _checks.mesh_batch(ref, "ref")
    g, n, _ = ref.shape
    pts = _checks.mesh_batch(points, "points")
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
    tri = _checks.triangles(triangles, n)
    graph = graph_from_pairs(candidate_pairs(tri, n), n)
    be = NumpyBackend()
    refc = ref.astype(np.float64)
    centroid = refc.mean(axis=1)
    positions = (refc - centroid[:, None]).astype(np.float32)
    off = np.flatnonzero(~graph.valid.reshape(-1))
    tab = RefTables(
        n=n, k=graph.k,
        positions_normals=be.rows(np.concatenate([positions, np.zeros_like(positions)], axis=2).reshape(-1, 6)),
        edges=be.rows(np.concatenate([edge_table(positions[i], graph, off) for i in range(g)])),
        nbr_flat=graph.nbr.reshape(-1),
    )
    x = (pts - centroid[:, None]).astype(np.float32).reshape(-1, 3)
    base = np.repeat(np.arange(g) * n, m)
    return walk(be, tab, x, st.reshape(-1).copy(), base, max_steps).reshape(g, m)
