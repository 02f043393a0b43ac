"""Scoring predictions against the benchmark references.

The aggregation follows the official evaluation: every prediction of an identity is scored
against that identity's single reference, the identity's value is the mean over its predictions
(the benchmark uses 3), and the reported value is the mean over identities (macro average).
Confidence intervals are percentile bootstraps over identities.

The mean-face (chance) scores depend only on the references, the model and the metric definition:
they are computed once and kept in the user cache (``<cache>/scores/``, keyed by the content
fingerprints of the references and the model, the metric definition version and the options that
change a score), so later runs on the same references read them back.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import ValidationError
from .fileio import progress, write_text

__all__ = [
    "METRIC_NAMES",
    "ScoreConfig",
    "MetricValue",
    "Report",
    "score",
    "score_vertices",
    "PAPER_RESULTS",
    "VertexErrors",
    "VertexErrorAccumulator",
    "SMALL_SAMPLE",
    "model_regions",
]

REGION_METRICS = (
    "RMSE_left_eye",
    "RMSE_right_eye",
    "RMSE_nose",
    "RMSE_mouth",
    "RMSE_left_cheek",
    "RMSE_right_cheek",
)

#: The vertex-to-vertex RMSE of each part (each part aligned on its own vertices).
V2V_REGION_METRICS = tuple("RMSE_v2v_" + k[len("RMSE_"):] for k in REGION_METRICS)

#: Metric names, in the order of the paper's tables (RMSE_v2v, not in the paper, after RMSE; its
#: six parts, not in the paper either, after the part RMSEs).
METRIC_NAMES = ("ER", "FR", "MR", "CR", "ARE_mean", "NME", "RMSE", "RMSE_v2v") + REGION_METRICS + V2V_REGION_METRICS

#: Units of each metric (ratios are unitless; RMSEs are millimetres).
METRIC_UNITS = {**{k: "" for k in ("ER", "FR", "MR", "CR", "ARE_mean", "NME")},
                **{k: "mm" for k in ("RMSE", "RMSE_v2v") + REGION_METRICS + V2V_REGION_METRICS}}

#: Below this many identities the table and the JSON carry a caveat beside the intervals.
SMALL_SAMPLE = 30

#: Histogram resolution (mm) and range of the per-vertex errors (:class:`VertexErrors`); larger
#: errors are counted in an overflow bin.
_BIN_MM = 0.002
_MAX_MM = 40.0
_V2V_ROWS = 16  # meshes aligned at once for RMSE_v2v (bounds memory; no effect on results)

#: The paper's numbers (Voice2Mesh, arXiv 2104.10299, Tables 1-3).
PAPER_RESULTS = {
    "baseline": {
        "ER": 0.0311, "FR": 0.0173, "MR": 0.0173, "CR": 0.0551, "ARE_mean": 0.0302, "NME": 0.2969,
        "RMSE": 1.348, "RMSE_left_eye": 0.3945, "RMSE_right_eye": 0.3656, "RMSE_nose": 0.5250,
        "RMSE_mouth": 0.3435, "RMSE_left_cheek": 0.4735, "RMSE_right_cheek": 0.5061,
    },
    "supervised": {
        "ER": 0.0157, "FR": 0.0188, "MR": 0.0172, "CR": 0.0463, "ARE_mean": 0.0245, "NME": 0.2723,
        "RMSE": 1.210, "RMSE_left_eye": 0.3517, "RMSE_right_eye": 0.3349, "RMSE_nose": 0.5141,
        "RMSE_mouth": 0.2958, "RMSE_left_cheek": 0.4654, "RMSE_right_cheek": 0.4916,
    },
    "unsupervised": {
        "ER": 0.0184, "FR": 0.0172, "MR": 0.0176, "CR": 0.0484, "ARE_mean": 0.0254, "NME": 0.2904,
        "RMSE": 1.312, "RMSE_left_eye": 0.3779, "RMSE_right_eye": 0.3488, "RMSE_nose": 0.5177,
        "RMSE_mouth": 0.3149, "RMSE_left_cheek": 0.4711, "RMSE_right_cheek": 0.4919,
    },
}


@dataclass
class ScoreConfig:
    """Options of :func:`score`.

    Attributes
    ----------
    bootstrap : int
        Bootstrap resamples over identities for the 95 % intervals (0 disables them).
    seed : int
        Seed of the bootstrap.
    strict : bool
        Reference identities without predictions are an error instead of being reported missing.
    with_scale : bool
        Let the registrations also fit a scale: similarity ICP, and a similarity alignment for
        ``RMSE_v2v``.
    chunk_size : int
        Predictions processed at once (bounds memory: a chunk holds ``chunk_size`` meshes).
    device : str, optional
        A torch device for the ICP ("cuda", "cpu"); None uses numpy.
    engine : {None, "auto", "numba", "kdtree"}
        The ICP implementation (:func:`v2m_bench.metrics.icp_scores`): numba (the default when it
        imports) runs the compiled pipeline, kdtree the numpy one with scipy k-d trees; both
        find the same nearest vertices and agree to rounding (RMSEs to about 1e-12 relative);
        numba is several times faster.
    chance : bool
        Also score the mean-face predictor (zero coefficients) as a chance reference.
    chance_cache : bool
        Keep the mean-face scores in the user cache and read them back on later runs (they
        depend only on the references, the model, the metric definition and the options above).
    expect_references : str, optional
        The references' content fingerprint (:func:`v2m_bench.provenance.fingerprint`, 64 hex
        characters, or a prefix of at least 12): other references are refused.
    progress : bool
        Show a progress bar.
    """

    bootstrap: int = 1000
    seed: int = 0
    strict: bool = False
    with_scale: bool = False
    chunk_size: int = 96
    device: str | None = None
    engine: str | None = None
    chance: bool = True
    chance_cache: bool = True
    expect_references: str | None = None
    progress: bool = False


@dataclass
class MetricValue:
    """A macro-averaged metric with its 95 % bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        return {k: _json_float(v) for k, v in asdict(self).items()}


@dataclass
class Report:
    """What :func:`score` returns.

    Attributes
    ----------
    per_identity : pandas.DataFrame
        One row per scored identity (index ``identity``): every metric (mean over that
        identity's predictions) and ``n_predictions``.
    metrics : dict[str, MetricValue]
        The macro means with their intervals, keyed by :data:`METRIC_NAMES`.
    n_identities, n_predictions : int
        Identities scored and predictions used.
    missing : list[str]
        Reference identities that had no prediction.
    chance : dict[str, MetricValue] or None
        The mean-face predictor scored the same way.
    baseline : dict or None
        With a baseline file: per metric ``value`` (the baseline's), ``relative_change``
        (ours / baseline - 1), the paired bootstrap ``p_value`` and ``p_value_floor`` (the
        resolution limit 1 / (B + 1): a p-value equal to it means "at most that").
    provenance : dict
        What the score was computed on (:func:`v2m_bench.provenance.provenance`).
    vertex_errors : dict of str to VertexErrors, optional
        With ``score(..., vertex_errors=True)``: ``"model"`` and, with the mean face, ``"chance"``.
    """

    per_identity: Any
    metrics: dict
    n_identities: int
    n_predictions: int
    missing: list
    chance: dict | None = None
    baseline: dict | None = None
    chance_per_identity: Any = field(default=None, repr=False)
    info: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    vertex_errors: dict | None = field(default=None, repr=False)

    @property
    def caveats(self) -> list[str]:
        """Warnings that belong beside the intervals (few identities)."""
        if self.n_identities < SMALL_SAMPLE and self.info.get("bootstrap", 1):
            return [f"only {self.n_identities} identities: the 95% bootstrap intervals are rough with fewer "
                    f"than {SMALL_SAMPLE} (percentile intervals tend to be too narrow)"]
        return []

    def to_dict(self) -> dict:
        out = {
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "n_identities": int(self.n_identities),
            "n_predictions": int(self.n_predictions),
            "missing": list(self.missing),
        }
        if self.caveats:
            out["caveats"] = self.caveats
        if self.provenance:
            out["provenance"] = self.provenance
        if self.chance is not None:
            out["chance"] = {k: v.to_dict() for k, v in self.chance.items()}
        if self.baseline is not None:
            out["baseline"] = {k: {kk: _json_float(vv) for kk, vv in v.items()} for k, v in self.baseline.items()}
        if self.info:
            out["info"] = self.info
        return out

    def to_json(self, path: str | os.PathLike) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per identity, after ``# key: value`` header lines of the provenance
        (read it with ``pandas.read_csv(path, comment="#")``)."""
        write_text(path, self.csv_header() + self.per_identity.to_csv(float_format="%.6g"))

    def csv_header(self) -> str:
        """The provenance as ``# key: value`` lines (empty without provenance)."""
        lines = []
        for k, v in self.provenance.items():
            if isinstance(v, dict):
                v = " ".join(f"{kk}={vv}" for kk, vv in v.items()) or "none"
            lines.append(f"# {k}: {v}\n")
        return "".join(lines)

    def table(self) -> str:
        """The summary as a text table in the paper's layout."""
        head = ["metric", "value", "95% CI"]
        if self.chance is not None:
            head.append("mean face")
        if self.baseline is not None:
            head += ["baseline", "change", "p"]
        rows = []
        for name in METRIC_NAMES:
            m = self.metrics[name]
            unit = METRIC_UNITS[name]
            fmt = _fmt_for(name)
            row = [name + (f" ({unit})" if unit else ""), fmt(m.value), f"[{fmt(m.ci_low)}, {fmt(m.ci_high)}]"]
            if self.chance is not None:
                row.append(fmt(self.chance[name].value))
            if self.baseline is not None:
                b = self.baseline[name]
                row += [fmt(b["value"]), f"{100 * b['relative_change']:+.1f}%", _fmt_p(b["p_value"], b.get("p_value_floor"))]
            rows.append(row)
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for j, sep_after in enumerate(("ARE_mean", "RMSE_v2v", REGION_METRICS[-1])):
            k = 2 + METRIC_NAMES.index(sep_after)
            lines.insert(k + 1 + j, "")
        cover = f"identities scored: {self.n_identities}, predictions: {self.n_predictions}, missing: {len(self.missing)}"
        tail = ["", cover] + [f"note: {c}" for c in self.caveats]
        if self.provenance.get("references_sha256"):
            tail.append(f"references sha256: {self.provenance['references_sha256']}")
        return "\n".join(lines + tail)


def _fmt_for(name):
    return lambda v: _nan_or(v, "{:.4f}")


def _nan_or(v, spec):
    return "nan" if v is None or not np.isfinite(v) else spec.format(v)


def _fmt_p(p, floor=None):
    """A p-value as text; at the bootstrap's resolution limit 1/(B+1): ``< 1/(B+1)``."""
    if p is None or not np.isfinite(p):
        return "nan"
    if floor is not None and np.isfinite(floor) and floor > 0 and p <= floor * (1 + 1e-9):
        return f"< 1/{int(round(1 / floor))}"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _json_float(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------- core
def score_vertices(pred, ref, model, regions: Mapping[str, np.ndarray], *, ref_index=None, with_scale: bool = False,
                   device=None, threads: int | None = None, engine: str | None = None, plan=None,
                   return_distances: bool = False) -> dict:
    """Every benchmark metric for each prediction.

    Parameters
    ----------
    pred : ndarray, shape (B, N, 3)
        Predicted vertices, BFM units.
    ref : ndarray, shape (R, N, 3)
        Reference vertices, BFM units.
    model : MorphableModel
        Gives the triangles and keypoints.
    regions : mapping of str to bool ndarray (N,)
        The six part regions (:func:`v2m_bench.topology.bfm_regions`).
    ref_index : ndarray of int, shape (B,), optional
        Which reference each prediction is scored against; ``arange(B)`` (R == B) if omitted.
    with_scale, device, threads, engine, plan
        Passed to :func:`v2m_bench.metrics.icp_scores` (``with_scale`` also to
        :func:`v2m_bench.metrics.rmse_v2v`).
    return_distances : bool
        Also return ``"distances"``: the signed per-vertex point-to-plane distances (B, N) in mm
        of the global ICP (the errors the RMSE averages).

    Returns
    -------
    dict of str to ndarray (B,)
        Keyed by :data:`METRIC_NAMES`; ratios unitless, RMSEs in millimetres (``RMSE_v2v_<part>``:
        :func:`v2m_bench.metrics.rmse_v2v` on the part's vertices, the part aligned on its own).
    """
    from .metrics.icp import icp_scores

    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if ref_index is None:
        ref_index = np.arange(pred.shape[0])
    ref_index = np.asarray(ref_index)
    out = _direct_metrics(pred, ref, ref_index, model, regions, with_scale=with_scale)
    glob, parts = icp_scores(pred, ref, model.triangles, regions, group=ref_index, with_scale=with_scale, device=device,
                             threads=threads, engine=engine, plan=plan, return_distances=return_distances)
    out.update(_icp_metrics(glob, parts))
    if return_distances:
        out["distances"] = glob.distances
    return out


def _direct_metrics(pred, ref, ref_index, model, regions, *, with_scale: bool) -> dict:
    """The metrics that need no registration search: ARE, NME, RMSE_v2v and its parts (B,) each."""
    from . import metrics

    ref_b = ref[ref_index]
    out = {}
    are = metrics.are(pred, ref_b)
    for k in ("ER", "FR", "MR", "CR"):
        out[k] = are[k]
    out["ARE_mean"] = are["mean"]
    out["NME"] = metrics.nme_official(pred, ref_b, model.keypoints)
    names = [k[len("RMSE_v2v_"):] for k in V2V_REGION_METRICS]
    v2v = {k: [] for k in ("RMSE_v2v",) + V2V_REGION_METRICS}
    for lo in range(0, pred.shape[0], _V2V_ROWS):  # in slices: float64 temporaries of a few meshes at a time
        g, part = metrics.rmse_v2v(pred[lo : lo + _V2V_ROWS], ref_b[lo : lo + _V2V_ROWS], with_scale=with_scale,
                                   regions={k: regions[k] for k in names})
        v2v["RMSE_v2v"].append(np.reshape(g, -1))
        for k in names:
            v2v["RMSE_v2v_" + k].append(np.reshape(part[k], -1))
    for k, v in v2v.items():
        out[k] = np.concatenate(v) if v else np.empty(0)
    return out


def _icp_metrics(glob, parts) -> dict:
    out = {"RMSE": np.asarray(glob.rmse)}
    for k in REGION_METRICS:
        out[k] = np.asarray(parts[k[len("RMSE_"):]].rmse)
    return out


@dataclass
class VertexErrors:
    """Per-vertex point-to-plane errors of one model, accumulated over its predictions.

    Attributes
    ----------
    mean_abs : ndarray, shape (N,), float64
        Mean absolute signed distance (mm) of each vertex: mean over an identity's predictions,
        then over identities.
    hist : ndarray, shape (K + 1,), float64
        Fraction of vertices (identity-weighted, sums to 1) per bin of width ``bin_mm`` from 0;
        the last bin counts errors of at least ``K * bin_mm``.
    bin_mm : float
    mean, std : float
        Identity-weighted mean and standard deviation of the absolute errors (mm).
    rmse : ndarray, shape (B,), float64
        Point-to-plane RMSE (mm) of each row scored (equals the score's ``RMSE``).
    kept : dict of int -> dict
        For the rows asked for: ``distances`` (N,) signed mm, ``aligned`` (N, 3) the prediction
        registered to its reference (BFM units), ``reference`` (N, 3).
    """

    mean_abs: np.ndarray
    hist: np.ndarray
    bin_mm: float
    mean: float
    std: float
    rmse: np.ndarray
    kept: dict

    def quantile(self, q: float) -> float:
        """Approximate quantile of the absolute error (mm), to within ``bin_mm``."""
        c = np.cumsum(self.hist)
        i = int(np.searchsorted(c, q * c[-1], side="left"))
        return float(min(i + 1, len(self.hist) - 1) * self.bin_mm)

    def fraction_below(self, mm: float) -> float:
        """Fraction of vertices whose absolute error is at most ``mm`` (to within ``bin_mm``)."""
        k = int(round(mm / self.bin_mm))
        return float(np.sum(self.hist[: min(k, len(self.hist) - 1)]))


class VertexErrorAccumulator:
    """Sums per-vertex errors chunk by chunk into a :class:`VertexErrors` (identity-macro weights).

    Parameters
    ----------
    identity : array of str, shape (B,)
        The identity of each row (rows of one identity share its weight).
    n_vertices : int
    """

    def __init__(self, identity, n_vertices: int):
        ids = np.asarray(identity).astype(str)
        _, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
        self.weight = 1.0 / (len(counts) * counts[inv.reshape(-1)])
        self.n = int(n_vertices)
        self.nbins = int(round(_MAX_MM / _BIN_MM))
        self.mean_abs = np.zeros(self.n)
        self.hist = np.zeros(self.nbins + 1)
        self.s1 = self.s2 = 0.0
        self.rmse = np.full(len(ids), np.nan)

    def add(self, rows, distances, rmse) -> None:
        """Add rows ``rows`` (int (k,)) with their signed distances (k, N) mm and RMSEs (k,)."""
        n = self.n
        d = np.abs(distances).astype(np.float64)
        w = self.weight[rows]
        self.mean_abs += w @ d
        self.s1 += float(w @ d.sum(axis=1)) / n
        self.s2 += float(w @ np.einsum("bn,bn->b", d, d)) / n
        b = np.minimum((d / _BIN_MM).astype(np.int64), self.nbins)
        self.hist += np.bincount(b.reshape(-1), weights=np.repeat(w / n, n), minlength=self.nbins + 1)
        self.rmse[rows] = rmse

    def result(self, kept: dict | None = None) -> VertexErrors:
        std = float(np.sqrt(max(self.s2 - self.s1 * self.s1, 0.0)))
        return VertexErrors(mean_abs=self.mean_abs, hist=self.hist, bin_mm=_BIN_MM, mean=self.s1, std=std, rmse=self.rmse,
                            kept=kept or {})


def _per_identity_table(identity: np.ndarray, values: Mapping[str, np.ndarray]):
    import pandas as pd

    df = pd.DataFrame({k: np.asarray(values[k], dtype=np.float64) for k in METRIC_NAMES})
    df.insert(0, "identity", np.asarray(identity).astype(str))
    g = df.groupby("identity", sort=True)
    table = g[list(METRIC_NAMES)].mean()
    table.insert(0, "n_predictions", g.size())
    return table


def _summarise(table, config: ScoreConfig) -> dict:
    vals = table[list(METRIC_NAMES)].to_numpy()
    from .stats import bootstrap_ci

    mean, lo, hi = bootstrap_ci(vals, n_boot=config.bootstrap, seed=config.seed)
    return {k: MetricValue(float(mean[i]), float(lo[i]), float(hi[i])) for i, k in enumerate(METRIC_NAMES)}


def iter_chunks(n: int, size: int):
    """Row indices ``0..n-1`` in consecutive chunks of at most ``size`` (int64 arrays)."""
    for start in range(0, n, size):
        yield np.arange(start, min(n, start + size))


def _score_files_core(preds, refs, model, regions, config: ScoreConfig, *, desc: str, plan=None, errors=None):
    """Score a Predictions object against a References object; returns (identity array, metric dict).

    ``errors``: a VertexErrorAccumulator over these rows, fed with each chunk's distances."""
    ref_ids = np.asarray(refs.identity).astype(str)
    ref_pos = {name: i for i, name in enumerate(ref_ids)}
    pred_ids = np.asarray(preds.identity).astype(str)
    ref_index_all = np.array([ref_pos[i] for i in pred_ids], dtype=np.int64)
    # group predictions by reference so each chunk needs few reference meshes
    order = np.argsort(ref_index_all, kind="stable")
    values = {k: np.empty(len(pred_ids), np.float64) for k in METRIC_NAMES}
    bar = progress(total=len(order), desc=desc, unit="mesh", enabled=config.progress)
    try:
        for chunk in iter_chunks(len(order), config.chunk_size):
            rows = order[chunk]
            used_refs, local = np.unique(ref_index_all[rows], return_inverse=True)
            pv = _face(preds.to_vertices(model, rows), preds, model, rows)
            rv = _face(refs.to_vertices(model, used_refs), refs, model, used_refs)
            out = score_vertices(pv, rv, model, regions, ref_index=local, with_scale=config.with_scale, device=config.device,
                                 engine=config.engine, plan=plan, return_distances=errors is not None)
            for k in METRIC_NAMES:
                values[k][rows] = out[k]
            if errors is not None:
                errors.add(rows, out["distances"], out["RMSE"])
            bar.update(len(rows))
    finally:
        bar.close()
    return pred_ids, values


def _face(v, source, model, rows):
    """``v`` once :func:`~v2m_bench.formats.check_face_meshes` accepts it (row numbers of ``source``)."""
    from .formats import check_face_meshes

    key = "vertices" if getattr(source, "vertices", None) is not None else "shape"
    return check_face_meshes(v, model, path=getattr(source, "path", None), key=key, rows=rows)


class _MeanFace:
    """Predictions of the mean-face predictor: one zero-coefficient face per reference identity."""

    def __init__(self, identity):
        self.identity = np.asarray(identity).astype(str)

    def to_vertices(self, model, indices):
        return np.broadcast_to(model.mean, (len(indices),) + model.mean.shape)


def score(predictions, references, model=None, *, baseline=None, config: ScoreConfig | None = None, regions=None,
          vertex_errors: bool = False) -> Report:
    """Score a predictions file against the references.

    Parameters
    ----------
    predictions : str, path-like or Predictions
        A ``predictions.h5`` (see docs/formats.md) or an object from :func:`read_predictions`.
    references : str, path-like or References
        A ``references.h5`` or an object from :func:`read_references`.
    model : MorphableModel or path, optional
        The BFM (for topology, and to turn coefficients into vertices); found as :func:`load_bfm` does if omitted.
    baseline : str, path-like or Predictions, optional
        A second predictions file to compare against (relative change and paired bootstrap p-value).
    config : ScoreConfig, optional
    regions : mapping of str to bool ndarray (N,), optional
        Part regions; the frozen BFM regions by default. The benchmark reports the six part
        RMSEs by name, so the keys must be those six (``left_eye``, ``right_eye``, ``nose``,
        ``mouth``, ``left_cheek``, ``right_cheek``); the masks may be your own. For parts of
        other names call :func:`v2m_bench.metrics.part_rmse` on the meshes directly.
    vertex_errors : bool
        Also accumulate the per-vertex errors of the ICP registrations (``Report.vertex_errors``,
        for :func:`v2m_bench.report.write_report`): each mesh is still registered once.

    Returns
    -------
    Report

    Raises
    ------
    ValidationError
        Unreadable or invalid files, predictions for identities that are not in the references,
        (with ``config.strict``) reference identities without predictions, or (with
        ``config.expect_references``) references whose fingerprint differs.
    """
    from .bfm import MorphableModel, load_bfm
    from .formats import check_coverage, read_predictions, read_references
    from .metrics.icp import icp_plan
    from .provenance import fingerprint, provenance

    config = config or ScoreConfig()
    if not isinstance(model, MorphableModel):
        model = load_bfm(model)
    refs = references if hasattr(references, "to_vertices") else read_references(references)
    ref_fp = fingerprint(refs)
    _check_expected(ref_fp, config.expect_references, refs)
    from .topology import REGION_NAMES

    if regions is None:
        regions = model_regions(model)
    elif sorted(regions) != sorted(REGION_NAMES):
        raise ValidationError(f"expected the benchmark's six parts {', '.join(REGION_NAMES)}, got "
                              f"{', '.join(map(str, regions)) or 'none'} (for other parts use metrics.part_rmse)",
                              key="regions")
    preds = predictions if hasattr(predictions, "to_vertices") else read_predictions(predictions)
    _check_vertex_count(preds, model)
    _check_vertex_count(refs, model)
    coverage = check_coverage(preds, refs, strict=config.strict)
    plan = icp_plan(model.triangles, model.n_vertices, regions)

    pred_ids = np.asarray(preds.identity).astype(str)
    errors = VertexErrorAccumulator(pred_ids, model.n_vertices) if vertex_errors else None
    pred_ids, values = _score_files_core(preds, refs, model, regions, config, desc="scoring", plan=plan, errors=errors)
    table = _per_identity_table(pred_ids, values)
    report = Report(
        per_identity=table,
        metrics=_summarise(table, config),
        n_identities=len(table),
        n_predictions=len(pred_ids),
        missing=list(coverage.missing),
        info={"bfm_genuine": bool(model.is_genuine), "bootstrap": config.bootstrap, "seed": config.seed, "with_scale": config.with_scale},
        provenance=provenance(preds, refs, model, references_fingerprint=ref_fp),
    )
    if vertex_errors:
        report.vertex_errors = {"model": errors.result()}
    if config.chance:
        ids = np.asarray(table.index).astype(str)
        mf_table, mf_errors = _chance(refs, ids, model, regions, config, plan, ref_fp, vertex_errors)
        report.chance = _summarise(mf_table, config)
        report.chance_per_identity = mf_table
        if vertex_errors:
            report.vertex_errors["chance"] = mf_errors
    if baseline is not None:
        base = baseline if hasattr(baseline, "to_vertices") else read_predictions(baseline)
        _check_vertex_count(base, model)
        check_coverage(base, refs, strict=False)
        b_ids, b_values = _score_files_core(base, refs, model, regions, config, desc="baseline", plan=plan)
        b_table = _per_identity_table(b_ids, b_values)
        report.baseline = compare_tables(table, b_table, config)
    return report


def _check_expected(ref_fp: str, expected: str | None, refs) -> None:
    if expected is None:
        return
    want = str(expected).strip().lower()
    if len(want) < 12 or any(c not in "0123456789abcdef" for c in want):
        raise ValidationError(f"expected a sha256 fingerprint (at least 12 hex characters), found {expected!r}",
                              key="expect_references")
    if not ref_fp.startswith(want):
        raise ValidationError(f"references have fingerprint {ref_fp}, not the expected {want}",
                              path=getattr(refs, "path", None))


# ------------------------------------------------------------------------------ regions cache
def model_regions(model) -> dict:
    """The six benchmark part regions of ``model`` (:func:`v2m_bench.topology.bfm_regions`),
    kept in the user cache.

    The cache entry (``<cache>/regions/``) is keyed by the mean shape, triangles, keypoints and the
    source of the region definition, so later runs skip the hull and normal computations and
    their imports; an unreadable or stale entry is recomputed.

    Parameters
    ----------
    model : MorphableModel

    Returns
    -------
    dict of str to ndarray (N,) bool
        Keyed by :data:`v2m_bench.topology.REGION_NAMES`.
    """
    import hashlib

    from . import geometry, topology
    from .bfm import default_cache_dir

    h = hashlib.sha256(b"voice2mesh regions\n")
    for a, dt in ((model.mean, "<f4"), (model.triangles, "<i8"), (model.keypoints, "<i8")):
        a = np.ascontiguousarray(a, dtype=dt)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    for mod in (topology, geometry):  # the definition: any change to it makes a new key
        h.update(Path(mod.__file__).read_bytes())
    key = h.hexdigest()
    path = default_cache_dir() / "regions" / f"regions-{key[:32]}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) == key:
                masks = {k: np.asarray(z[f"mask_{k}"]) for k in topology.REGION_NAMES}
                if all(m.dtype == bool and m.shape == (model.n_vertices,) for m in masks.values()):
                    return masks
    except (OSError, KeyError, ValueError):
        pass
    masks = topology.bfm_regions(model)
    import io

    from .fileio import write_bytes

    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), **{f"mask_{k}": v for k, v in masks.items()})
    try:
        write_bytes(path, buf.getvalue())
    except (OSError, ValidationError):  # a read-only or odd cache folder: the regions stand without it
        pass
    return masks


# ------------------------------------------------------------------------------ mean-face cache
def _chance_key(ref_fp: str, model, regions, config: ScoreConfig) -> str:
    """Everything the mean-face scores depend on, hashed."""
    import hashlib
    import importlib.util

    from .metrics.icp import DEFAULT_ICP_CONFIG
    from .provenance import METRIC_DEFINITION_VERSION, model_fingerprint
    from .topology import region_checksum

    engine = config.engine or "auto"
    if engine == "auto":  # what "auto" runs decides the last bits
        engine = "numba" if importlib.util.find_spec("numba") is not None else "kdtree"
    parts = {
        "references": ref_fp,
        "model": model_fingerprint(model),
        "metric_definition": METRIC_DEFINITION_VERSION,
        "icp": repr(DEFAULT_ICP_CONFIG),
        "regions": {str(k): region_checksum(v) for k, v in regions.items()},
        "with_scale": bool(config.with_scale),
        "engine": engine,
        # RMSE_v2v's sums (centred, float64): compiled where numba imports, else numpy (last bits)
        "v2v_sums": "centred/" + ("numba" if importlib.util.find_spec("numba") is not None else "numpy"),
        "device": None if config.device is None else str(config.device),
        "bins": [_BIN_MM, _MAX_MM],
        "metrics": list(METRIC_NAMES),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _chance_file(key: str) -> Path:
    from .bfm import default_cache_dir

    return default_cache_dir() / "scores" / f"meanface-{key[:32]}.npz"


def _read_chance(path: Path, key: str, ref_ids: np.ndarray):
    """The cached mean-face values, or None when absent, unreadable or for other references."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key or not np.array_equal(z["identity"].astype(str), ref_ids):
                return None
            values = {k: np.asarray(z[f"metric_{k}"], np.float64) for k in METRIC_NAMES}
            errs = VertexErrors(mean_abs=z["mean_abs"], hist=z["hist"], bin_mm=float(z["bin_mm"]), mean=float(z["mean"]),
                                std=float(z["std"]), rmse=z["rmse"], kept={})
    except (OSError, KeyError, ValueError):
        return None
    if any(v.shape != ref_ids.shape for v in values.values()):
        return None
    return values, errs


def _write_chance(path: Path, key: str, ref_ids: np.ndarray, values: dict, errs: VertexErrors) -> None:
    import io

    from .fileio import write_bytes

    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), identity=ref_ids, mean_abs=errs.mean_abs, hist=errs.hist, bin_mm=np.float64(errs.bin_mm),
             mean=np.float64(errs.mean), std=np.float64(errs.std), rmse=errs.rmse,
             **{f"metric_{k}": values[k] for k in METRIC_NAMES})
    try:
        write_bytes(path, buf.getvalue())
    except (OSError, ValidationError):  # a read-only or odd cache folder: the scores stand without it
        pass


def _chance(refs, ids, model, regions, config: ScoreConfig, plan, ref_fp: str, want_errors: bool):
    """Mean-face per-identity table for identities ``ids`` (and its vertex errors when asked).

    All reference identities are scored (each on its own: the values do not depend on which
    others are scored with it), cached, and the rows of ``ids`` taken; the vertex errors are
    those of all references when ``ids`` covers them, else computed for ``ids``.
    """
    ref_ids = np.asarray(refs.identity).astype(str)
    key = _chance_key(ref_fp, model, regions, config) if config.chance_cache else None
    cached = _read_chance(_chance_file(key), key, ref_ids) if key else None
    if cached is None:
        acc = VertexErrorAccumulator(ref_ids, model.n_vertices)
        _, values = _score_files_core(_MeanFace(ref_ids), refs, model, regions, config, desc="mean face", plan=plan, errors=acc)
        errs = acc.result()
        if key:
            _write_chance(_chance_file(key), key, ref_ids, values, errs)
    else:
        values, errs = cached
    pos = {name: i for i, name in enumerate(ref_ids.tolist())}
    sel = np.array([pos[i] for i in ids], dtype=np.int64)
    table = _per_identity_table(ids, {k: values[k][sel] for k in METRIC_NAMES})
    if want_errors and sel.size != ref_ids.size:
        acc = VertexErrorAccumulator(ids, model.n_vertices)
        _score_files_core(_MeanFace(ids), refs, model, regions, config, desc="mean face", plan=plan, errors=acc)
        errs = acc.result()
    return table, (errs if want_errors else None)


def _check_vertex_count(obj, model):
    n = getattr(obj, "n_vertices", None)
    if n is not None and n != model.n_vertices:
        raise ValidationError(
            f"vertices have {n} points per mesh but the model has {model.n_vertices}", path=getattr(obj, "path", None), key="vertices"
        )


def compare_tables(table, base_table, config: ScoreConfig) -> dict:
    """Per metric: the baseline's value, the relative change and the paired bootstrap p-value over
    the identities both per-identity tables share (see :func:`v2m_bench.stats.paired_bootstrap`)."""
    from .stats import paired_bootstrap

    common = table.index.intersection(base_table.index)
    if len(common) == 0:
        raise ValidationError("the baseline has no identity in common with the predictions", key="baseline")
    a = table.loc[common, list(METRIC_NAMES)].to_numpy()
    b = base_table.loc[common, list(METRIC_NAMES)].to_numpy()
    diff, p = paired_bootstrap(a, b, n_boot=config.bootstrap, seed=config.seed)
    bmean = np.nanmean(b, axis=0)
    amean = np.nanmean(a, axis=0)
    out = {}
    for i, k in enumerate(METRIC_NAMES):
        out[k] = {
            "value": float(bmean[i]),
            "relative_change": float(amean[i] / bmean[i] - 1.0) if bmean[i] != 0 else float("nan"),
            "difference": float(diff[i]),
            "p_value": float(p[i]),
            "p_value_floor": 1.0 / (config.bootstrap + 1.0) if config.bootstrap > 0 else float("nan"),
            "n_identities": int(len(common)),
        }
    return out
