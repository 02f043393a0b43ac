"""Scoring predictions against the benchmark references.

The aggregation follows the official evaluation: every prediction of an identity is scored
against that identity's single reference, the identity's value is the mean over its predictions
(the benchmark uses 3), and the reported value is the mean over identities (macro average).
Confidence intervals are percentile bootstraps over identities.
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
from .fileio import write_text

__all__ = [
    "METRIC_NAMES",
    "ScoreConfig",
    "MetricValue",
    "Report",
    "score",
    "score_vertices",
    "PAPER_RESULTS",
]

REGION_METRICS = (
    "RMSE_left_eye",
    "RMSE_right_eye",
    "RMSE_nose",
    "RMSE_mouth",
    "RMSE_left_cheek",
    "RMSE_right_cheek",
)

#: Metric names, in the order of the paper's tables.
METRIC_NAMES = ("ER", "FR", "MR", "CR", "ARE_mean", "NME", "RMSE") + REGION_METRICS

#: Units of each metric (ratios are unitless; RMSEs are millimetres).
METRIC_UNITS = {**{k: "" for k in ("ER", "FR", "MR", "CR", "ARE_mean", "NME")}, **{k: "mm" for k in ("RMSE",) + REGION_METRICS}}

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
        Let the ICP registration also fit a scale (similarity ICP).
    chunk_size : int
        Predictions processed at once (bounds memory: a chunk holds ``chunk_size`` meshes).
    device : str, optional
        A torch device for the ICP ("cuda", "cpu"); None uses numpy.
    engine : {None, "auto", "numba", "kdtree"}
        The ICP implementation (:func:`v2m_bench.icp.icp_scores`): numba (the default when it
        imports) runs the compiled pipeline, kdtree the numpy one with scipy k-d trees; both
        find the same nearest vertices and agree to rounding (RMSEs to about 1e-12 relative);
        numba is several times faster.
    chance : bool
        Also score the mean-face predictor (zero coefficients) as a chance reference.
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
        (ours / baseline - 1) and the paired bootstrap ``p_value``.
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

    def to_dict(self) -> dict:
        out = {
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "n_identities": int(self.n_identities),
            "n_predictions": int(self.n_predictions),
            "missing": list(self.missing),
        }
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
        write_text(path, self.per_identity.to_csv(float_format="%.6g"))

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
                row += [fmt(b["value"]), f"{100 * b['relative_change']:+.1f}%", _fmt_p(b["p_value"])]
            rows.append(row)
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for sep_after in ("ARE_mean", "RMSE"):
            k = 2 + METRIC_NAMES.index(sep_after)
            lines.insert(k + 1 + (sep_after == "RMSE"), "")
        cover = f"identities scored: {self.n_identities}, predictions: {self.n_predictions}, missing: {len(self.missing)}"
        return "\n".join(lines + ["", cover])


def _fmt_for(name):
    return (lambda v: _nan_or(v, "{:.4f}")) if name.startswith("RMSE") else (lambda v: _nan_or(v, "{:.4f}"))


def _nan_or(v, spec):
    return "nan" if v is None or not np.isfinite(v) else spec.format(v)


def _fmt_p(p):
    if p is None or not np.isfinite(p):
        return "nan"
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def _json_float(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------- core
def score_vertices(pred, ref, model, regions: Mapping[str, np.ndarray], *, ref_index=None, with_scale: bool = False,
                   device=None, threads: int | None = None, engine: str | None = None) -> dict:
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
    with_scale, device, threads, engine
        Passed to :func:`v2m_bench.icp.icp_scores`.

    Returns
    -------
    dict of str to ndarray (B,)
        Keyed by :data:`METRIC_NAMES`; ratios unitless, RMSEs in millimetres.
    """
    from . import metrics
    from .icp import icp_scores

    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if ref_index is None:
        ref_index = np.arange(pred.shape[0])
    ref_index = np.asarray(ref_index)
    ref_b = ref[ref_index]
    out = {}
    are = metrics.are(pred, ref_b)
    for k in ("ER", "FR", "MR", "CR"):
        out[k] = are[k]
    out["ARE_mean"] = are["mean"]
    out["NME"] = metrics.nme_official(pred, ref_b, model.keypoints)
    glob, parts = icp_scores(pred, ref, model.triangles, regions, group=ref_index, with_scale=with_scale, device=device,
                             threads=threads, engine=engine)
    out["RMSE"] = np.asarray(glob.rmse)
    for name in ("left_eye", "right_eye", "nose", "mouth", "left_cheek", "right_cheek"):
        out[f"RMSE_{name}"] = np.asarray(parts[name].rmse)
    return out


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


def _iter_chunks(n: int, size: int):
    for start in range(0, n, size):
        yield np.arange(start, min(n, start + size))


def _score_files_core(preds, refs, model, regions, config: ScoreConfig, *, desc: str):
    """Score a Predictions object against a References object; returns (identity array, metric dict)."""
    ref_ids = np.asarray(refs.identity).astype(str)
    ref_pos = {name: i for i, name in enumerate(ref_ids)}
    pred_ids = np.asarray(preds.identity).astype(str)
    ref_index_all = np.array([ref_pos[i] for i in pred_ids], dtype=np.int64)
    # group predictions by reference so each chunk needs few reference meshes
    order = np.argsort(ref_index_all, kind="stable")
    values = {k: np.empty(len(pred_ids), np.float64) for k in METRIC_NAMES}
    bar = _progress(len(order), desc, config.progress)
    try:
        for chunk in _iter_chunks(len(order), config.chunk_size):
            rows = order[chunk]
            used_refs, local = np.unique(ref_index_all[rows], return_inverse=True)
            pv = _face(preds.to_vertices(model, rows), preds, model, rows)
            rv = _face(refs.to_vertices(model, used_refs), refs, model, used_refs)
            out = score_vertices(pv, rv, model, regions, ref_index=local, with_scale=config.with_scale, device=config.device,
                                 engine=config.engine)
            for k in METRIC_NAMES:
                values[k][rows] = out[k]
            bar.update(len(rows))
    finally:
        bar.close()
    return pred_ids, values


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _face(v, source, model, rows):
    """``v`` once :func:`~v2m_bench.formats.check_face_meshes` accepts it (row numbers of ``source``)."""
    from .formats import check_face_meshes

    key = "vertices" if getattr(source, "vertices", None) is not None else "shape"
    return check_face_meshes(v, model, path=getattr(source, "path", None), key=key, rows=rows)


def _progress(total, desc, enabled):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for v2m_bench
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="mesh")


class _MeanFace:
    """Predictions of the mean-face predictor: one zero-coefficient face per reference identity."""

    def __init__(self, identity):
        self.identity = np.asarray(identity).astype(str)

    def to_vertices(self, model, indices):
        return np.broadcast_to(model.mean, (len(indices),) + model.mean.shape)


def score(predictions, references, model=None, *, baseline=None, config: ScoreConfig | None = None, regions=None) -> Report:
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
    regions : mapping, optional
        Part regions; the frozen BFM regions by default.

    Returns
    -------
    Report

    Raises
    ------
    ValidationError
        Unreadable or invalid files, predictions for identities that are not in the references,
        or (with ``config.strict``) reference identities without predictions.
    """
    from .bfm import MorphableModel, load_bfm
    from .formats import check_coverage, read_predictions, read_references

    config = config or ScoreConfig()
    if not isinstance(model, MorphableModel):
        model = load_bfm(model)
    if regions is None:
        from .topology import bfm_regions

        regions = bfm_regions(model)
    refs = references if hasattr(references, "to_vertices") else read_references(references)
    preds = predictions if hasattr(predictions, "to_vertices") else read_predictions(predictions)
    _check_vertex_count(preds, model)
    _check_vertex_count(refs, model)
    coverage = check_coverage(preds, refs, strict=config.strict)

    pred_ids, values = _score_files_core(preds, refs, model, regions, config, desc="scoring")
    table = _per_identity_table(pred_ids, values)
    report = Report(
        per_identity=table,
        metrics=_summarise(table, config),
        n_identities=len(table),
        n_predictions=len(pred_ids),
        missing=list(coverage.missing),
        info={"bfm_genuine": bool(model.is_genuine), "bootstrap": config.bootstrap, "seed": config.seed, "with_scale": config.with_scale},
    )
    if config.chance:
        ids = np.asarray(table.index).astype(str)
        mf_ids, mf_values = _score_files_core(_MeanFace(ids), refs, model, regions, config, desc="mean face")
        mf_table = _per_identity_table(mf_ids, mf_values)
        report.chance = _summarise(mf_table, config)
        report.chance_per_identity = mf_table
    if baseline is not None:
        base = baseline if hasattr(baseline, "to_vertices") else read_predictions(baseline)
        _check_vertex_count(base, model)
        check_coverage(base, refs, strict=False)
        b_ids, b_values = _score_files_core(base, refs, model, regions, config, desc="baseline")
        b_table = _per_identity_table(b_ids, b_values)
        report.baseline = _compare(table, b_table, config)
    return report


def _check_vertex_count(obj, model):
    n = getattr(obj, "n_vertices", None)
    if n is not None and n != model.n_vertices:
        raise ValidationError(
            f"vertices have {n} points per mesh but the model has {model.n_vertices}", path=getattr(obj, "path", None), key="vertices"
        )


def _compare(table, base_table, config: ScoreConfig) -> dict:
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
            "n_identities": int(len(common)),
        }
    return out
