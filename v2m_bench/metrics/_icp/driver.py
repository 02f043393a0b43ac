"""The chunk procedure of the ICP metrics, shared by both engines, and the result buffers.

Predictions are processed in chunks of whole references (every prediction of a reference is scored
with that reference's tables). :func:`process_chunk` runs the definition's steps on one chunk;
the engine (:class:`~.numpy_engine.NumpyEngine` or :class:`~.compiled_engine.CompiledEngine`)
carries them out: the correspondence fit, the global ICP and score, then per region the local ICP
from the global transform and the region's score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .._checks import finite, not_finite
from .algebra import rowsum
from .plan import Part, Plan

__all__ = ["Pose", "IcpSamples", "Registration", "Score", "Outputs", "new_outputs", "ChunkRun", "ChunkJob", "chunk_jobs",
           "chunk_references", "chunk_predictions", "region_pivots", "process_chunk"]

REFS_PER_CHUNK = 4  # references whose predictions are processed together (no effect on results)


class Pose(NamedTuple):
    """Transforms ``x -> scale R p + translation`` of a batch, in the centred reference frame."""

    rotation: np.ndarray  # (a, 3, 3) float64
    scale: np.ndarray  # (a,) float64
    translation: np.ndarray  # (a, 3) float64


class IcpSamples(NamedTuple):
    """The ICP problem of a batch of predictions, on their iteration vertices."""

    points: np.ndarray  # (a, S, 3) float64 prediction iteration vertices
    ref_points: np.ndarray  # (a, S, 3) float64 reference positions of the same vertices (rotation radius)
    ref_index: np.ndarray  # (a,) int64 reference of each sample within the chunk
    start: np.ndarray  # (a, S) int64 local start vertices of the searches
    pivot: np.ndarray  # (a, 3) float64 rotation centre


class Registration(NamedTuple):
    """An ICP's best iterate per sample."""

    pose: Pose
    iterations: np.ndarray  # (a,) int64 evaluated iterates
    converged: np.ndarray  # (a,) bool
    nearest: np.ndarray  # (a, S) nearest vertices of the iteration vertices at the best iterate


class Score(NamedTuple):
    """The nearest vertices and signed distances of every scored vertex."""

    nearest: np.ndarray  # (a, m) int64 local ids
    distances: np.ndarray  # (a, m) float32, input units
    sum_squares: np.ndarray | None = None  # (a,) rowsum(d64 * d64) when the engine has it


@dataclass(frozen=True, eq=False)
class Outputs:
    """Output buffers of one scored set, filled by the chunk workers (each sample written once)."""

    rmse: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    scale: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    distances: np.ndarray | None
    nearest: np.ndarray | None


def new_outputs(b: int, m: int, want: bool) -> Outputs:
    """Buffers for ``b`` predictions and ``m`` scored vertices (distances only when ``want``)."""
    return Outputs(
        rmse=np.zeros(b),
        rotation=np.zeros((b, 3, 3)),
        translation=np.zeros((b, 3)),
        scale=np.ones(b),
        iterations=np.zeros(b, np.int64),
        converged=np.zeros(b, bool),
        distances=np.zeros((b, m), np.float32) if want else None,
        nearest=np.zeros((b, m), np.int32) if want else None,
    )


@dataclass(frozen=True, eq=False)
class ChunkRun:
    """What every chunk of one :func:`~v2m_bench.metrics.icp.icp_scores` call shares."""

    plan: Plan
    pred: np.ndarray  # (B, N, 3) checked predictions
    ref: np.ndarray  # (G, N, 3) checked references
    group: np.ndarray  # (B,) reference of each prediction
    with_scale: bool
    config: Any  # IcpConfig
    outputs: list  # [Outputs of the whole mesh, then one per region]
    want: bool  # keep per-vertex distances and nearest vertices
    exact: bool  # nearest="exact": exhaustive searches in the global iterations too


class ChunkJob(NamedTuple):
    """One chunk: predictions ``samples`` whose references are exactly ``refs``."""

    samples: np.ndarray
    refs: np.ndarray


def chunk_jobs(group: np.ndarray) -> list[ChunkJob]:
    """Chunks of whole references (``REFS_PER_CHUNK`` at a time), predictions in stable order."""
    order = np.argsort(group, kind="stable")
    used_refs = np.unique(group)
    jobs = []
    for lo in range(0, used_refs.size, REFS_PER_CHUNK):
        refs = used_refs[lo : lo + REFS_PER_CHUNK]
        jobs.append(ChunkJob(order[np.isin(group[order], refs)], refs))
    return jobs


def chunk_references(ref, job: ChunkJob, group, kernels=None):
    """Local reference index of each sample (a,), the chunk's reference centroids (G, 3) float64
    and their centred float32 vertices (G, N, 3), C-ordered (the same numbers with the compiled
    ``kernels.center_references``, in one pass)."""
    local = {int(g): i for i, g in enumerate(job.refs)}
    ref_index = np.array([local[int(group[b])] for b in job.samples], np.int64)
    if kernels is not None:
        rows = np.asarray(job.refs, dtype=np.int64)
        if not (ref.dtype == np.float32 and ref.flags.c_contiguous):  # one other compiled layout: float64 rows
            ref, rows = np.ascontiguousarray(ref[rows], dtype=np.float64), np.arange(rows.size, dtype=np.int64)
        centroid, positions, all_finite = kernels.center_references(ref, rows)
        if not all_finite:
            raise not_finite("ref")
        return ref_index, centroid, positions
    refc = finite(np.asarray(ref[job.refs]), "ref")
    centroid = refc.mean(axis=1, dtype=np.float64)
    return ref_index, centroid, np.ascontiguousarray((refc - centroid[:, None, :]).astype(np.float32))


def chunk_predictions(pred, samples) -> np.ndarray:
    """The chunk's predictions (a, N, 3), refused when not finite."""
    return finite(np.asarray(pred[samples]), "pred")


def region_pivots(positions: np.ndarray, ids) -> np.ndarray:
    """(G, 3) float64 rotation centres of a part's ICP: the mean of each reference's region vertices."""
    return positions[:, ids].astype(np.float64).mean(axis=1)


def _store(out: Outputs, samples, score: Score, reg: Registration, centroid, upm, want, nearest_ids=None):
    """Write a chunk's results (``nearest_ids``: the global ids of the score's nearest vertices)."""
    d = score.distances
    ss = score.sum_squares
    if ss is None:
        d64 = d.astype(np.float64)
        ss = rowsum(d64 * d64)
    out.rmse[samples] = np.sqrt(ss / d.shape[1]) / upm
    out.rotation[samples] = reg.pose.rotation
    out.scale[samples] = reg.pose.scale
    out.translation[samples] = reg.pose.translation + centroid  # back to the reference's own coordinates
    out.iterations[samples] = reg.iterations
    out.converged[samples] = reg.converged
    if want:
        out.distances[samples] = d / upm
        out.nearest[samples] = score.nearest if nearest_ids is None else nearest_ids


def _part_starts(part: Part, whole_nearest: np.ndarray) -> np.ndarray:
    """Walk starts of a part's iteration vertices: the global nearest vertex when it lies in the
    region, else the vertex itself (a, S) int64, C-ordered."""
    itp = part.iteration_local
    loc = part.local_of[whole_nearest[:, part.ids[itp]]]
    return np.array(np.where(loc >= 0, loc, itp[None, :]), dtype=np.int64, order="C")


def process_chunk(run: ChunkRun, job: ChunkJob, engine) -> int:
    """Score the predictions of one chunk with ``engine``; returns how many."""
    cfg = run.config
    upm = cfg.units_per_mm
    ref_index, centroid, positions = engine.references(run.ref, job, run.group)
    p = engine.predictions(run.pred, job.samples)
    chunk = engine.prepare(run.plan, positions, ref_index, p)
    # 1. closed-form correspondence fit
    pose = engine.initial_pose(chunk, run.with_scale)
    # 2. global ICP on the iteration vertices, 3. score every vertex
    reg = engine.register_whole(chunk, pose, run.exact)
    score = engine.score_whole(chunk, reg)
    centroids = centroid[ref_index]
    _store(run.outputs[0], job.samples, score, reg, centroids, upm, run.want)
    # 4. parts: local ICP from the global transform, nearest vertices among the region's vertices
    for i, part in enumerate(run.plan.parts):
        region = engine.prepare_part(chunk, part, run.exact)
        reg_p = engine.register_part(chunk, region, reg.pose, _part_starts(part, score.nearest))
        score_p = engine.score_part(chunk, region, reg_p)
        _store(run.outputs[1 + i], job.samples, score_p, reg_p, centroids, upm, run.want,
               part.ids[score_p.nearest] if run.want else None)
    return len(job.samples)
