"""ARE and NME: hand-computed cases, invariances, and parity with a plain per-sample loop on the BFM."""

from __future__ import annotations

import math

import numpy as np
import pytest

from v2m_bench.errors import ValidationError
from v2m_bench.metrics import are, are_ratios, nme, nme_official, oicd
from v2m_bench.topology import ARE_PAIRS, KEYPOINTS_68, OICD

N = 53215


def _line_mesh(oicd_len, lengths):
    """Zeros, except that each metric's second vertex sits at distance L along x from the first."""
    v = np.zeros((N, 3))
    v[OICD[1]] = (oicd_len, 0.0, 0.0)
    for k, (a, b) in ARE_PAIRS.items():
        v[a] = (0.0, 1000.0 * (list(ARE_PAIRS).index(k) + 1), 0.0)
        v[b] = v[a] + (0.0, 0.0, lengths[k])
    return v


def test_are_hand_computed():
    ref = _line_mesh(10.0, {"ER": 14.0, "FR": 11.0, "MR": 12.0, "CR": 10.0})
    pred = _line_mesh(20.0, {"ER": 30.0, "FR": 22.0, "MR": 20.0, "CR": 21.0})
    r = are(pred, ref)
    expected = {"ER": abs(1.5 - 1.4), "FR": abs(1.1 - 1.1), "MR": abs(1.0 - 1.2), "CR": abs(1.05 - 1.0)}
    for k, x in expected.items():
        assert r[k] == pytest.approx(x, abs=1e-12), k
    assert r["mean"] == pytest.approx((0.1 + 0.0 + 0.2 + 0.05) / 4, abs=1e-12)
    assert set(r) == {"ER", "FR", "MR", "CR", "mean"}
    assert r["ER"].shape == ()  # two single meshes -> 0-d
    rat = are_ratios(ref)
    assert [float(rat[k]) for k in ("ER", "FR", "MR", "CR")] == pytest.approx([1.4, 1.1, 1.2, 1.0])
    assert float(oicd(pred)) == pytest.approx(20.0)


def test_are_batch_and_broadcast():
    ref = _line_mesh(10.0, {"ER": 14.0, "FR": 11.0, "MR": 12.0, "CR": 10.0})
    p1 = _line_mesh(10.0, {"ER": 15.0, "FR": 11.0, "MR": 12.0, "CR": 10.0})
    p2 = _line_mesh(10.0, {"ER": 14.0, "FR": 11.0, "MR": 12.0, "CR": 13.0})
    batch = np.stack([p1, p2]).astype(np.float32)
    r = are(batch, ref)
    assert r["ER"].shape == (2,)
    assert r["ER"] == pytest.approx([0.1, 0.0], abs=1e-6)
    assert r["CR"] == pytest.approx([0.0, 0.3], abs=1e-6)
    r2 = are(batch, np.stack([ref, ref]))
    for k in r:
        np.testing.assert_allclose(r[k], r2[k], rtol=0, atol=0)


def test_identical_meshes_score_zero():
    rng = np.random.default_rng(0)
    v = rng.normal(scale=5e4, size=(3, N, 3))
    for k, x in are(v, v).items():
        np.testing.assert_array_equal(x, 0.0, err_msg=k)
    np.testing.assert_array_equal(nme_official(v, v), 0.0)
    np.testing.assert_array_equal(nme(v, v), 0.0)


def _rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def test_are_invariant_to_similarity_of_the_prediction():
    rng = np.random.default_rng(1)
    ref = rng.normal(scale=5e4, size=(N, 3))
    pred = ref + rng.normal(scale=3e3, size=(N, 3))
    base = are(pred, ref)
    assert base["mean"] > 1e-3  # the case is not trivial
    moved = 2.7 * pred @ _rotation(rng).T + np.array([1e5, -3e4, 7e3])
    for k, x in are(moved, ref).items():
        assert x == pytest.approx(base[k], rel=1e-9, abs=1e-12), k


def _nme_mesh():
    """Reference with xrange 100 (OICD vertex at x=100) and yrange 400 (a non-landmark vertex)."""
    ref = np.zeros((N, 3))
    ref[OICD[1]] = (100.0, 0.0, 0.0)
    ref[0] = (0.0, 400.0, 0.0)
    assert 0 not in KEYPOINTS_68 and OICD[1] not in KEYPOINTS_68
    return ref


def test_nme_official_vs_standard_hand_computed():
    ref = _nme_mesh()
    pred = ref.copy()
    pred[KEYPOINTS_68[0]] += (3.0, 4.0, 0.0)  # landmark error 5
    pred[KEYPOINTS_68[1]] += (0.0, 0.0, 12.0)  # landmark error 12
    norm = math.sqrt(100.0 * 400.0)  # 200
    assert float(nme_official(pred, ref)) == pytest.approx(13.0 / norm, rel=1e-12)  # sqrt(25 + 144)
    assert float(nme(pred, ref)) == pytest.approx((5.0 + 12.0) / 68 / norm, rel=1e-12)


def test_nme_scale_is_removed_translation_is_not():
    ref = _nme_mesh()
    # scaling the prediction about the origin is undone by OICD_ref / OICD_pred
    assert float(nme_official(3.0 * ref, ref)) == pytest.approx(0.0, abs=1e-15)
    assert float(nme(0.5 * ref, ref)) == pytest.approx(0.0, abs=1e-15)
    # a translation is not: every landmark is off by |t| = 13
    t = np.array([5.0, 0.0, 12.0])
    off_official = float(nme_official(ref + t, ref))
    off_standard = float(nme(ref + t, ref))
    assert off_official == pytest.approx(math.sqrt(68) * 13.0 / 200.0, rel=1e-12)
    assert off_standard == pytest.approx(13.0 / 200.0, rel=1e-12)
    # equal per-landmark errors: official == sqrt(K) * standard
    assert off_official == pytest.approx(math.sqrt(68) * off_standard, rel=1e-12)


def test_nme_normaliser_uses_the_whole_reference_mesh():
    ref = _nme_mesh()
    pred = ref.copy()
    pred[KEYPOINTS_68[5]] += (0.0, 10.0, 0.0)
    wider = ref.copy()
    wider[1] = (-300.0, 0.0, 0.0)  # a non-landmark vertex widens xrange from 100 to 400
    wider_pred = pred.copy()
    wider_pred[1] = wider[1]
    assert float(nme_official(pred, ref)) == pytest.approx(10.0 / 200.0)
    assert float(nme_official(wider_pred, wider)) == pytest.approx(10.0 / 400.0)


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValidationError):
        are(np.zeros((N, 2)), np.zeros((N, 3)))
    with pytest.raises(ValidationError):
        are(np.zeros((100, 3)), np.zeros((100, 3)))  # too few vertices for the metric's ids
    with pytest.raises(ValidationError):
        nme_official(np.zeros((2, N, 3)) + 1, np.zeros((3, N, 3)) + 1)


@pytest.mark.parametrize("name", ["are", "nme", "nme_official", "rmse_v2v", "icp_rmse"])
def test_every_metric_checks_its_meshes_with_the_same_messages(name):
    """One set of input checks: the same message, naming the argument, from every metric."""
    from v2m_bench import metrics

    fn = getattr(metrics, name)
    if name == "icp_rmse":  # the ICP also takes the triangles (checked after the meshes)
        fn = lambda p, r, _f=fn: _f(p, r, np.array([[0, 1, 2]]))  # noqa: E731
    v = np.zeros((N, 3))
    with pytest.raises(ValidationError, match=r"^pred: expected a mesh of shape \(N, 3\) or a batch of shape \(B, N, 3\)"):
        fn(v[:, :2], v)
    with pytest.raises(ValidationError, match="^ref: expected numeric coordinates, found dtype bool"):
        fn(v, v.astype(bool))
    with pytest.raises(ValidationError, match=rf"^ref: expected {N} vertices \(as in pred\), found {N - 1}"):
        fn(v, v[:-1])
    if name != "icp_rmse":  # the ICP pairs predictions with references through group=
        with pytest.raises(ValidationError, match=r"^ref: expected 1 or 2 meshes \(as in pred\), found 3"):
            fn(np.stack([v, v]), np.stack([v, v, v]))
    if name in ("are", "nme", "nme_official"):
        with pytest.raises(ValidationError, match="^pred: the meshes have 100 vertices, the metric reads vertex"):
            fn(np.zeros((100, 3)), np.zeros((100, 3)))


# ----------------------------------------------------------------------------- on the BFM


def test_mean_shape_ratios(bfm):
    r = are_ratios(bfm.mean)
    got = [float(r[k]) for k in ("ER", "FR", "MR", "CR")]
    assert got == pytest.approx([1.4108, 1.1594, 1.1104, 1.0044], abs=5e-5)
    np.testing.assert_array_equal(bfm.keypoints, np.array(KEYPOINTS_68))


def _loop_reference(pred, ref):
    """Straightforward per-sample implementation, independent of v2m_bench.metrics."""
    pairs = {"ER": (20636, 34153), "FR": (1678, 42117), "MR": (2130, 15003), "CR": (2294, 13635)}
    kp = list(KEYPOINTS_68)
    rows = []
    for p in pred:
        p = p.astype(np.float64)
        r = ref.astype(np.float64)

        def d(v, i, j):
            return math.sqrt(sum((float(v[i, c]) - float(v[j, c])) ** 2 for c in range(3)))

        op, orf = d(p, 2217, 14607), d(r, 2217, 14607)
        row = {k: abs(d(p, i, j) / op - d(r, i, j) / orf) for k, (i, j) in pairs.items()}
        row["mean"] = sum(row[k] for k in pairs) / 4
        s = orf / op
        sq, per = 0.0, []
        for i in kp:
            e2 = sum((s * float(p[i, c]) - float(r[i, c])) ** 2 for c in range(3))
            sq += e2
            per.append(math.sqrt(e2))
        norm = math.sqrt((r[:, 1].max() - r[:, 1].min()) * (r[:, 0].max() - r[:, 0].min()))
        row["nme_official"] = math.sqrt(sq) / norm
        row["nme"] = sum(per) / len(per) / norm
        rows.append(row)
    return rows


def test_parity_with_a_per_sample_loop_on_the_bfm(bfm):
    rng = np.random.default_rng(7)
    b = 4
    shape = bfm.shape_mean + bfm.shape_std * rng.normal(size=(b + 1, bfm.n_shape))
    expr = bfm.expression_mean + bfm.expression_std * rng.normal(size=(b + 1, bfm.n_expression))
    v = bfm.vertices(shape.astype(np.float32), expr.astype(np.float32))
    pred, ref = v[:b], v[b]
    want = _loop_reference(pred, ref)
    got_are = are(pred, ref)
    got_off = nme_official(pred, ref)
    got_std = nme(pred, ref)
    assert got_are["mean"].shape == (b,)
    for i, row in enumerate(want):
        for k in ("ER", "FR", "MR", "CR", "mean"):
            assert got_are[k][i] == pytest.approx(row[k], rel=1e-9, abs=1e-12), (i, k)
        assert got_off[i] == pytest.approx(row["nme_official"], rel=1e-9)
        assert got_std[i] == pytest.approx(row["nme"], rel=1e-9)
    # the cases are not degenerate: real errors of plausible size
    assert np.all(got_are["mean"] > 1e-4) and np.all(got_off > 1e-3)
    assert np.all(got_std < got_off / 8)
