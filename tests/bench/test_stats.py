import numpy as np
import pytest

from v2m_bench.stats import bootstrap_ci, paired_bootstrap


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 1.0, size=300)
    m, lo, hi = bootstrap_ci(x, n_boot=2000, seed=3)
    assert m == pytest.approx(x.mean())
    assert lo < m < hi
    # width ~ 2 * 1.96 * sd / sqrt(n)
    assert hi - lo == pytest.approx(2 * 1.96 * x.std(ddof=1) / np.sqrt(x.size), rel=0.15)
    assert bootstrap_ci(x, n_boot=2000, seed=3) == (m, lo, hi)
    assert bootstrap_ci(x, n_boot=2000, seed=4)[1] != lo


def test_bootstrap_columns_share_resamples():
    x = np.random.default_rng(1).normal(size=(50, 1))
    m, lo, hi = bootstrap_ci(np.hstack([x, 2 * x]), n_boot=500, seed=0)
    np.testing.assert_allclose([m[1], lo[1], hi[1]], [2 * m[0], 2 * lo[0], 2 * hi[0]])


def test_bootstrap_disabled_or_single_row_gives_nan_bounds():
    m, lo, hi = bootstrap_ci([1.0, 2.0, 3.0], n_boot=0)
    assert m == 2.0 and np.isnan(lo) and np.isnan(hi)
    assert np.isnan(bootstrap_ci([1.0], n_boot=100)[1])


def test_paired_bootstrap_detects_a_real_difference_only():
    rng = np.random.default_rng(2)
    base = rng.normal(1.0, 0.5, size=200)
    better = base - 0.1 + rng.normal(0, 0.05, size=200)  # paired: small noise around a shift
    diff, p = paired_bootstrap(better, base, n_boot=2000, seed=0)
    assert diff == pytest.approx(-0.1, abs=0.02) and p < 0.01
    same = base + rng.normal(0, 0.05, size=200)
    _, p_same = paired_bootstrap(same, base, n_boot=2000, seed=0)
    assert p_same > 0.05
