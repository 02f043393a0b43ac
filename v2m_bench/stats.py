"""Bootstrap statistics over identities (pure functions on arrays)."""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_ci", "paired_bootstrap"]


def _resample_index(n_items: int, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_items, size=(n_boot, n_items))


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap confidence interval of the mean, resampling rows.

    Parameters
    ----------
    values : array_like, shape (n,) or (n, m)
        One value per identity (rows); columns are independent metrics resampled together
        (the same identities are drawn for every column).
    n_boot : int
        Number of bootstrap resamples; 0 gives NaN bounds.
    seed : int
        Seed of the resampling (the same seed gives the same interval).
    level : float
        Coverage of the interval.

    Returns
    -------
    mean, low, high : ndarray, shape () or (m,)
        NaN rows are ignored in the mean and in each resample.
    """
    v = np.asarray(values, dtype=np.float64)
    squeeze = v.ndim == 1
    v = v.reshape(v.shape[0], -1)
    mean = np.nanmean(v, axis=0) if v.shape[0] else np.full(v.shape[1], np.nan)
    if n_boot <= 0 or v.shape[0] < 2:
        nan = np.full(v.shape[1], np.nan)
        out = (mean, nan, nan.copy())
    else:
        idx = _resample_index(v.shape[0], n_boot, seed)
        boot = np.nanmean(v[idx], axis=1)  # (n_boot, m)
        alpha = (1.0 - level) / 2.0
        low, high = np.quantile(boot, [alpha, 1.0 - alpha], axis=0)
        out = (mean, low, high)
    return tuple(o[0] if squeeze else o for o in out)


def paired_bootstrap(a, b, n_boot: int = 1000, seed: int = 0):
    """Paired bootstrap test of ``mean(a) == mean(b)`` over matched identities.

    Parameters
    ----------
    a, b : array_like, shape (n,) or (n, m)
        Per-identity values of two models on the same identities (same row order).

    Returns
    -------
    diff : ndarray, shape () or (m,)
        ``mean(a) - mean(b)``.
    p_value : ndarray, shape () or (m,)
        Two-sided p-value: the fraction of resampled mean differences, re-centred on zero
        (the null hypothesis), at least as far from zero as the observed difference. Its
        resolution is ``1 / n_boot``; it is reported as at least ``1 / (n_boot + 1)``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    squeeze = a.ndim == 1
    d = (a - b).reshape(a.shape[0], -1)
    obs = np.nanmean(d, axis=0)
    if n_boot <= 0 or d.shape[0] < 2:
        p = np.full(d.shape[1], np.nan)
    else:
        idx = _resample_index(d.shape[0], n_boot, seed)
        boot = np.nanmean(d[idx], axis=1) - obs
        hits = (np.abs(boot) >= np.abs(obs) - 1e-15).sum(axis=0)
        p = (hits + 1.0) / (n_boot + 1.0)
    return (obs[0], p[0]) if squeeze else (obs, p)
