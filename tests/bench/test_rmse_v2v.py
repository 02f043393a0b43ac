"""The vertex-to-vertex RMSE (Kabsch / Umeyama alignment, then RMS of the vertex distances)."""

import numpy as np
import pytest

from v2m_bench.errors import ValidationError
from v2m_bench.metrics import rmse_v2v


def _rotation(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def _face(rng, n=4000):
    """A smooth random surface in BFM units (micrometres): about 150 x 200 x 60 mm."""
    u, v = rng.uniform(-1, 1, size=(2, n))
    return np.stack([75_000 * u, 100_000 * v, 30_000 * (1 - u * u) * (1 - 0.5 * v * v)], axis=1)


def test_a_rigidly_moved_copy_scores_zero():
    rng = np.random.default_rng(0)
    ref = _face(rng)
    moved = np.stack([ref @ _rotation(rng).T + rng.normal(size=3) * 20_000 for _ in range(4)])
    out = rmse_v2v(moved, ref)
    assert out.shape == (4,)
    assert np.all(out < 1e-6)
    # a scaled copy is not zero rigidly, but is with the similarity alignment
    scaled = 1.07 * moved
    assert np.all(rmse_v2v(scaled, ref) > 1.0)
    assert np.all(rmse_v2v(scaled, ref, with_scale=True) < 1e-6)


@pytest.mark.parametrize("sigma_mm", [0.2, 1.0])
def test_iid_noise_gives_sigma_sqrt3(sigma_mm):
    rng = np.random.default_rng(1)
    n = 20_000
    ref = _face(rng, n)
    pred = ref @ _rotation(rng).T + np.array([3_000.0, -1_000.0, 500.0])
    pred = pred + rng.normal(size=pred.shape) * sigma_mm * 1000.0
    got = float(rmse_v2v(pred, ref))
    want = sigma_mm * np.sqrt(3.0)
    # the mean square of 3n squared normals has relative sd sqrt(2 / (3n)); 4 sd, and the
    # alignment absorbs 6 of the 3n degrees of freedom (a relative bias of 1e-4)
    tol = 4 * np.sqrt(2.0 / (3 * n)) / 2 + 1e-4
    assert got == pytest.approx(want, rel=tol)


def test_alignment_is_the_least_squares_one():
    rng = np.random.default_rng(2)
    ref = _face(rng, 3000)
    pred = ref @ _rotation(rng).T + rng.normal(size=ref.shape) * 800
    res = rmse_v2v(pred, ref, return_alignment=True)
    aligned = pred @ res.rotation[0].T + res.translation[0]
    base = float(np.sqrt(np.mean(np.sum((aligned - ref) ** 2, axis=1)))) / 1000
    assert res.rmse[0] == pytest.approx(base, rel=1e-12)
    assert np.allclose(res.distances[0], np.linalg.norm(aligned - ref, axis=1) / 1000)
    assert np.linalg.det(res.rotation[0]) == pytest.approx(1.0)
    # any perturbation of the transform does worse
    for k in range(5):
        w = rng.normal(size=3) * 1e-3
        kx = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])
        r2 = (np.eye(3) + kx) @ res.rotation[0]
        u, _, vt = np.linalg.svd(r2)
        moved = pred @ (u @ vt).T + res.translation[0] + rng.normal(size=3) * 50
        assert np.sqrt(np.mean(np.sum((moved - ref) ** 2, axis=1))) / 1000 > res.rmse[0]


def test_regions_are_aligned_on_their_own():
    rng = np.random.default_rng(3)
    ref = _face(rng, 3000)
    pred = ref.copy()
    left = ref[:, 0] > 0
    # the left half moved rigidly on its own: zero in that region, not globally
    pred[left] = ref[left] @ _rotation(rng).T + 5_000
    glob, parts = rmse_v2v(pred, ref, regions={"left": left, "right": ~left})
    assert glob > 1.0
    assert parts["left"] < 1e-6 and parts["right"] < 1e-6
    with pytest.raises(ValidationError, match="regions"):
        rmse_v2v(pred, ref, regions={"bad": np.zeros(3, bool)})


def test_never_below_the_icp_rmse(bfm):
    from v2m_bench.metrics import icp_scores

    rng = np.random.default_rng(4)
    ref = bfm.vertices((rng.normal(size=(2, 40)) * bfm.shape_std).astype(np.float32), np.tile(bfm.expression_mean, (2, 1)))
    preds = []
    for k, noise in enumerate((0.2, 0.6, 1.5)):
        s = rng.normal(size=(2, 40)) * bfm.shape_std * noise
        e = np.tile(bfm.expression_mean, (2, 1)) + rng.normal(size=(2, 10)) * bfm.expression_std * noise
        preds.append(bfm.vertices(s.astype(np.float32), e.astype(np.float32)))
    pred = np.concatenate(preds)
    group = np.tile([0, 1], 3)
    glob, _ = icp_scores(pred, ref, bfm.triangles, group=group)
    v2v = rmse_v2v(pred, ref[group])
    assert np.all(v2v >= glob.rmse)
    assert np.all(v2v > 1.2 * glob.rmse)  # nearest-vertex matching reads well below the true error
    scaled = rmse_v2v(pred, ref[group], with_scale=True)
    assert np.all(scaled <= v2v + 1e-12)


@pytest.mark.parametrize("with_scale, dtype", [(False, np.float32), (True, np.float32), (False, np.float64)])
def test_a_part_equals_the_metric_on_its_own_vertices(with_scale, dtype):
    """Each part's value is exactly (bit for bit) the metric of the part's vertices alone (for a
    float32 batch as the scoring passes it, and float64)."""
    rng = np.random.default_rng(8)
    ref = np.stack([_face(rng, 2500) for _ in range(4)]).astype(dtype)
    pred = (ref @ _rotation(rng).T + rng.normal(scale=400.0, size=ref.shape)).astype(dtype)
    masks = {"a": ref[0, :, 0] > 20_000, "b": ref[0, :, 1] < -30_000, "c": rng.random(2500) < 0.1}
    glob, parts = rmse_v2v(pred, ref, regions=masks, with_scale=with_scale)
    assert np.array_equal(glob, rmse_v2v(pred, ref, with_scale=with_scale))
    for name, m in masks.items():
        alone = rmse_v2v(pred[:, m], ref[:, m], with_scale=with_scale)
        assert parts[name].shape == (4,) and np.array_equal(parts[name], alone), name
        assert (parts[name] > 0.3).all()  # about 0.4 * sqrt(3) mm of noise, not zero


def test_the_engines_agree_and_are_validated(monkeypatch):
    """The compiled sums (numba) and the numpy sums give the same metric to rounding, whole and
    per part, rigid and scaled; a bad engine name, or numba asked for without it, is refused; the
    default falls back to numpy when the kernels cannot be imported."""
    import sys

    pytest.importorskip("numba")
    rng = np.random.default_rng(11)
    ref = np.stack([_face(rng, 3000) for _ in range(3)]).astype(np.float32)
    pred = (ref @ _rotation(rng).T * 1.02 + rng.normal(scale=700.0, size=ref.shape)).astype(np.float32)
    masks = {"a": ref[0, :, 0] > 10_000, "b": rng.random(3000) < 0.2}
    for with_scale in (False, True):
        ga, pa = rmse_v2v(pred, ref, regions=masks, with_scale=with_scale, engine="numba")
        gb, pb = rmse_v2v(pred, ref, regions=masks, with_scale=with_scale, engine="numpy")
        assert np.allclose(ga, gb, rtol=1e-10, atol=0) and not np.array_equal(ga, np.zeros(3))
        for k in masks:
            assert np.allclose(pa[k], pb[k], rtol=1e-10, atol=0), k
    # one reference broadcast over the batch, single meshes, float64 input
    assert np.allclose(rmse_v2v(pred, ref[0], engine="numba"), rmse_v2v(pred, ref[0], engine="numpy"), rtol=1e-10)
    one = rmse_v2v(pred[1].astype(np.float64), ref[1], engine="numba")
    assert one.shape == () and float(one) == pytest.approx(float(rmse_v2v(pred, ref)[1]), rel=1e-10)
    with pytest.raises(ValidationError, match="engine"):
        rmse_v2v(pred, ref, engine="fast")
    monkeypatch.setitem(sys.modules, "v2m_bench.metrics._v2v_kernels", None)  # as if numba were not installed
    with pytest.raises(ValidationError, match="numba is not installed"):
        rmse_v2v(pred, ref, engine="numba")
    assert np.array_equal(rmse_v2v(pred, ref), rmse_v2v(pred, ref, engine="numpy"))


def test_the_inputs_are_not_modified():
    """The numpy engine centres float64 copies in place: never the caller's arrays."""
    rng = np.random.default_rng(12)
    ref = _face(rng, 2000)
    pred = ref + rng.normal(scale=500.0, size=ref.shape)
    keep_p, keep_r = pred.copy(), ref.copy()
    for engine in ("numpy", None):
        rmse_v2v(pred, ref, engine=engine, regions={"a": ref[:, 0] > 0})
        rmse_v2v(pred, ref, engine=engine, return_alignment=True)
    assert np.array_equal(pred, keep_p) and np.array_equal(ref, keep_r)
