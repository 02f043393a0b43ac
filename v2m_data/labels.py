"""Identity-level 3D labels: one robust aggregate of an identity's image fits, and label quality.

A single image's fit carries the landmark detector's error straight into the label. Each shard
therefore also stores, per identity, an aggregate of the shape (and expression) coefficients over
its accepted fits (:func:`identity_labels`), with the count and spread; the benchmark's references
use it by default (:mod:`v2m_data.references`) and the supervised trainer can train on it
(``v2m-train supervised --targets identity``).

Which fits: the identity's valid fits with ``|yaw| <= max_yaw``, ``|pitch| <= max_pitch`` and
``residual_normalized <= max_residual`` (:class:`LabelRule`). The estimator (``mean``,
``median``, ``trimmed`` mean, or ``huber``, the default) was chosen by measurement on synthetic
worlds (``benchmarks/bench_fidelity.py``; the table is in docs/building.md): with iid Gaussian
landmark noise the four agree within 0.0006 ARE; Huber matches the mean there and keeps more of
the signal under dlib's heavy-tailed errors.

Label quality (:func:`icc1`) is the one-way random-effects intraclass correlation ICC(1) over
identities: the share of the variance of per-image values that lies between identities. A label
that carries a person's face has a high ICC (the images of one person agree); a detector whose
errors swamp the face gives a low one. It needs no truth, so it works on real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from v2m_bench.errors import ValidationError

__all__ = ["LabelRule", "ESTIMATORS", "aggregate", "identity_labels", "icc1", "label_mask", "ratios_of_shapes"]

ESTIMATORS = ("mean", "median", "trimmed", "huber")


@dataclass(frozen=True)
class LabelRule:
    """Which fits make an identity's label, and how they are combined.

    Attributes
    ----------
    estimator : {"mean", "median", "trimmed", "huber"}
        Per-coefficient combination (``trimmed``: mean without the lowest and highest 20 %;
        ``huber`` (default): Huber M-estimate with k = 1.345 and the MAD scale).
    max_yaw, max_pitch : float
        Degrees.
    max_residual : float
        Largest ``residual_normalized`` of a fit used.
    """

    estimator: str = "huber"
    max_yaw: float = 30.0
    max_pitch: float = 20.0
    max_residual: float = 0.05

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValidationError(f"must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}", key="identity_label.estimator")
        for k in ("max_yaw", "max_pitch", "max_residual"):
            v = float(getattr(self, k))
            if not np.isfinite(v) or v < 0:
                raise ValidationError(f"expected a finite number >= 0, got {v!r}", key=f"identity_label.{k}")


def _huber(x: np.ndarray, k: float = 1.345, iters: int = 30) -> np.ndarray:
    """Huber M-estimate of location per column of ``x`` (n, K) with the MAD scale."""
    mu = np.median(x, axis=0)
    scale = 1.4826 * np.median(np.abs(x - mu), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    for _ in range(iters):
        r = (x - mu) / scale
        w = np.minimum(1.0, k / np.maximum(np.abs(r), 1e-12))
        mu = (w * x).sum(0) / w.sum(0)
    return mu


def aggregate(values, estimator: str = "mean") -> np.ndarray:
    """Combine the rows of ``values`` per column.

    Parameters
    ----------
    values : (n, K) array_like
        n >= 1 rows.
    estimator : {"mean", "median", "trimmed", "huber"}
        With fewer than 3 rows every estimator is the mean.

    Returns
    -------
    (K,) float64
    """
    x = np.asarray(values, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValidationError(f"need an (n >= 1, K) array, got shape {x.shape}", key="values")
    if estimator not in ESTIMATORS:
        raise ValidationError(f"must be one of {', '.join(ESTIMATORS)}, got {estimator!r}", key="estimator")
    if x.shape[0] < 3 or estimator == "mean":
        return x.mean(axis=0)
    if estimator == "median":
        return np.median(x, axis=0)
    if estimator == "trimmed":
        n = x.shape[0]
        cut = int(np.floor(0.2 * n))
        s = np.sort(x, axis=0)
        return s[cut : n - cut].mean(axis=0)
    return _huber(x)


def label_mask(pose, residual_normalized, rule: LabelRule = LabelRule()) -> np.ndarray:
    """Which fits a label may use: finite, within the rule's pose and residual limits.

    Parameters
    ----------
    pose : (M, 3) degrees ``(yaw, pitch, roll)``
    residual_normalized : (M,)

    Returns
    -------
    (M,) bool
    """
    p = np.asarray(pose, np.float64).reshape(-1, 3)
    rn = np.asarray(residual_normalized, np.float64)
    with np.errstate(invalid="ignore"):
        return (
            np.isfinite(p).all(1)
            & np.isfinite(rn)
            & (np.abs(p[:, 0]) <= rule.max_yaw)
            & (np.abs(p[:, 1]) <= rule.max_pitch)
            & (rn <= rule.max_residual)
        )


def identity_labels(identity, shape, expression, pose, residual_normalized, n_identities: int, rule: LabelRule = LabelRule()) -> dict:
    """Per-identity label over the fits :func:`label_mask` accepts.

    Parameters
    ----------
    identity : (M,) int
        Identity row (0..n_identities-1) of each fit.
    shape : (M, S); expression : (M, E)
        Fitted coefficients.
    pose : (M, 3); residual_normalized : (M,)
    n_identities : int
    rule : LabelRule

    Returns
    -------
    dict
        ``shape`` (I, S) and ``expression`` (I, E) float32 aggregates (NaN rows for identities
        without an accepted fit); ``shape_spread`` (I, S) float32 per-coefficient standard
        deviation over the fits used (ddof 1; NaN below two fits); ``n_images`` (I,) int32;
        ``used`` (M,) bool, the fits used.
    """
    ident = np.asarray(identity, np.int64)
    a = np.asarray(shape, np.float64)
    b = np.asarray(expression, np.float64)
    used = label_mask(pose, residual_normalized, rule) & np.isfinite(a).all(1) & np.isfinite(b).all(1)
    n_s, n_e = a.shape[1], b.shape[1]
    out_s = np.full((n_identities, n_s), np.nan)
    out_e = np.full((n_identities, n_e), np.nan)
    spread = np.full((n_identities, n_s), np.nan)
    count = np.zeros(n_identities, np.int32)
    for n in range(n_identities):
        rows = np.flatnonzero(used & (ident == n))
        count[n] = len(rows)
        if len(rows) == 0:
            continue
        out_s[n] = aggregate(a[rows], rule.estimator)
        out_e[n] = aggregate(b[rows], rule.estimator)
        if len(rows) > 1:
            spread[n] = a[rows].std(axis=0, ddof=1)
    return {
        "shape": out_s.astype(np.float32),
        "expression": out_e.astype(np.float32),
        "shape_spread": spread.astype(np.float32),
        "n_images": count,
        "used": used,
    }


def icc1(values, groups) -> float:
    """One-way random-effects intraclass correlation ICC(1) over groups (identities).

    ``ICC(1) = (MSB - MSW) / (MSB + (k0 - 1) MSW)`` with the between- and within-group mean
    squares of one-way ANOVA and ``k0 = (N - sum n_g^2 / N) / (G - 1)`` for unequal group
    sizes. For vector values (N, K) the mean squares are summed over the K columns (the ICC of
    the vector, in the columns' own units). Groups with a single value count towards ``MSB``
    only through ``N`` and ``G`` and are left out.

    Parameters
    ----------
    values : (N,) or (N, K) array_like
    groups : (N,) int

    Returns
    -------
    float
        NaN when fewer than two groups have two or more values.
    """
    x = np.asarray(values, np.float64)
    x = x.reshape(len(x), -1)
    g = np.asarray(groups, np.int64)
    ok = np.isfinite(x).all(1)
    x, g = x[ok], g[ok]
    uniq, inv, cnt = np.unique(g, return_inverse=True, return_counts=True)
    keep = cnt[inv] >= 2
    x, g = x[keep], g[keep]
    uniq, inv, cnt = np.unique(g, return_inverse=True, return_counts=True)
    n_g, n = len(uniq), len(x)
    if n_g < 2:
        return float("nan")
    means = np.zeros((n_g, x.shape[1]))
    np.add.at(means, inv, x)
    means /= cnt[:, None]
    grand = x.mean(axis=0)
    ssb = float((cnt[:, None] * (means - grand) ** 2).sum())
    ssw = float(((x - means[inv]) ** 2).sum())
    msb = ssb / (n_g - 1)
    msw = ssw / (n - n_g)
    k0 = (n - float((cnt**2).sum()) / n) / (n_g - 1)
    den = msb + (k0 - 1) * msw
    return float((msb - msw) / den) if den > 0 else float("nan")


def ratios_of_shapes(model, shape, expression=None) -> dict:
    """The four ARE line ratios (:func:`v2m_bench.metrics.are_ratios`) of coefficient vectors.

    Only the ten vertices the ratios use are computed.

    Parameters
    ----------
    model : v2m_bench.bfm.MorphableModel
    shape : (B, S) array_like
    expression : (B, E) array_like, optional
        Zero (the model's reference expression) when omitted.

    Returns
    -------
    dict
        ``{"ER", "FR", "MR", "CR"}`` -> (B,) float64.

    Raises
    ------
    ValidationError
        When the model does not have the BFM topology.
    """
    from v2m_bench.topology import ARE_PAIRS, OICD

    a = np.atleast_2d(np.asarray(shape, np.float64))
    ids = sorted({*OICD, *(v for pair in ARE_PAIRS.values() for v in pair)})
    if int(model.n_vertices) <= ids[-1]:
        raise ValidationError(f"the ARE ratios need the BFM topology (53,215 vertices), the model has {model.n_vertices}", key="model")
    cols = (3 * np.asarray(ids)[:, None] + np.arange(3)[None, :]).reshape(-1)
    flat = a @ np.asarray(model.shape_basis, np.float64)[cols].T + np.asarray(model.mean, np.float64).reshape(-1)[cols]
    if expression is not None:
        b = np.atleast_2d(np.asarray(expression, np.float64))
        flat = flat + b @ np.asarray(model.expression_basis, np.float64)[cols].T
    v = flat.reshape(len(a), len(ids), 3)
    at = {vid: k for k, vid in enumerate(ids)}

    def dist(i, j):
        return np.linalg.norm(v[:, at[i]] - v[:, at[j]], axis=-1)

    o = dist(*OICD)
    return {k: dist(i, j) / o for k, (i, j) in ARE_PAIRS.items()}
