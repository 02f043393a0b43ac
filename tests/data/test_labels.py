"""Identity-level labels, label quality (ICC), references from labels, the audit command."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from v2m_data.labels import LabelRule, aggregate, icc1, identity_labels, label_mask


# ------------------------------------------------------------------------------------ estimators
def test_estimators_on_an_outlier():
    x = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert aggregate(x, "mean")[0] == pytest.approx(22.0)
    assert aggregate(x, "median")[0] == pytest.approx(3.0)
    assert aggregate(x, "trimmed")[0] == pytest.approx(3.0)  # 20 % cut each side: 2, 3, 4
    assert 2.5 < aggregate(x, "huber")[0] < 4.0
    # fewer than three rows: the mean whatever the estimator
    assert aggregate(x[:2], "median")[0] == pytest.approx(1.5)
    with pytest.raises(Exception, match="estimator"):
        aggregate(x, "mode")


def test_icc1_recovers_the_variance_share():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(400), 5)
    between = rng.normal(0, 2.0, 400)[g]
    within = rng.normal(0, 1.0, len(g))
    assert icc1(between + within, g) == pytest.approx(4.0 / 5.0, abs=0.04)
    assert abs(icc1(within, g)) < 0.05
    assert icc1(between, g) == pytest.approx(1.0)
    # vector version: sum of mean squares, here two equal columns -> same value
    v = np.stack([between + within, between + within], axis=1)
    assert icc1(v, g) == pytest.approx(icc1(between + within, g))
    # unequal groups and singletons (left out) still work; one group -> NaN
    gu = np.concatenate([g, [9999]])
    assert np.isfinite(icc1(np.concatenate([between + within, [0.0]]), gu))
    assert np.isnan(icc1([1.0, 2.0, 3.0], [0, 0, 0]))


def test_identity_labels_use_only_accepted_fits():
    ident = np.array([0, 0, 0, 1, 1, 2])
    shape = np.array([[1.0, 0], [3.0, 0], [100.0, 0], [5.0, 1], [7.0, 1], [9.0, 9]])
    expr = np.zeros((6, 3))
    pose = np.array([[0, 0, 0], [10, 0, 0], [45, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], float)
    rn = np.array([0.01, 0.01, 0.01, 0.01, 0.2, 0.01])
    lab = identity_labels(ident, shape, expr, pose, rn, 4, LabelRule(estimator="mean", max_yaw=30))
    np.testing.assert_array_equal(lab["used"], [True, True, False, True, False, True])
    np.testing.assert_array_equal(lab["n_images"], [2, 1, 1, 0])
    np.testing.assert_allclose(lab["shape"][0], [2.0, 0.0])
    np.testing.assert_allclose(lab["shape"][1], [5.0, 1.0])
    assert np.isnan(lab["shape"][3]).all() and np.isnan(lab["shape_spread"][1]).all()
    np.testing.assert_allclose(lab["shape_spread"][0], [np.sqrt(2.0), 0.0], rtol=1e-6)
    assert not label_mask([[np.nan, 0, 0]], [0.01])[0]


def test_ratios_of_shapes_match_the_full_mesh(bfm):
    from v2m_bench.metrics import are_ratios
    from v2m_data.labels import ratios_of_shapes

    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, bfm.n_shape)) * bfm.shape_std
    b = rng.standard_normal((3, bfm.n_expression)) * bfm.expression_std
    want = are_ratios(bfm.vertices(a, b).astype(np.float64))
    got = ratios_of_shapes(bfm, a, b)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4)


# ------------------------------------------------------------------------------------ in a build
@pytest.fixture(scope="module")
def label_build(tmp_path_factory):
    from tests.data.test_pipeline import config_for, make_test_world, quiet
    from v2m_data.building import build

    root = tmp_path_factory.mktemp("lw") / "w"
    info = make_test_world(root, n=8, faults=False)
    info["root"] = root
    out = tmp_path_factory.mktemp("lb") / "out"
    build(config_for(info, out), log=quiet)
    return info, out


def test_shards_hold_identity_labels_and_references_use_them(label_build):
    from v2m_bench.formats import read_references
    from v2m_data.shards import open_dataset

    info, out = label_build
    test = open_dataset(out).split("test")
    idf = test.identity_fit
    assert idf["shape"].shape == (test.n_identities, 40) and idf["n_images"].dtype == np.int32
    ident = test.images["identity"]
    used = test.fit["in_identity_label"]
    for n in range(test.n_identities):
        rows = np.flatnonzero(used & (ident == n))
        assert idf["n_images"][n] == len(rows)
        if len(rows):
            want = aggregate(test.fit["shape"][rows], "huber")  # the default estimator
            np.testing.assert_allclose(idf["shape"][n], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
            if len(rows) >= 3:
                assert not np.allclose(idf["shape"][n], test.fit["shape"][rows].mean(0), rtol=1e-6, atol=0)
    refs = read_references(out / "references.h5", n_vertices=None)
    man = json.loads((out / "manifest.json").read_text())
    assert man["parameters"]["reference_rule"]["mode"] == "identity"
    names = list(test.identities["name"])
    for j, name in enumerate(refs.identity):
        n = names.index(str(name))
        np.testing.assert_allclose(refs.shape[j], idf["shape"][n], rtol=1e-6)
        np.testing.assert_array_equal(refs.expression[j], 0.0)
        want = [str(p) for p in test.images["path"][used & (ident == n)]]
        assert str(refs.source_image[j]).split(";") == want
    chosen = man["references"]["chosen"]
    assert chosen and all(c["how"] == "identity" and c["images"] for c in chosen)


def test_manifest_quality_and_image_rule(label_build, tmp_path):
    from tests.data.test_pipeline import config_for, quiet
    from v2m_bench.formats import read_references
    from v2m_data.building import build
    from v2m_data.references import ReferenceRule
    from v2m_data.shards import open_dataset

    info, out = label_build
    q = json.loads((out / "manifest.json").read_text())["quality"]
    assert set(q["icc"]) == {"ER", "FR", "MR", "CR", "shape"}
    assert q["images_per_identity"]["identities_with_fits"] == 8 and q["images_per_identity"]["max"] == 3
    assert q["n_fits"] == 24 and q["residual_normalized"]["p50"] < 0.05
    out2 = tmp_path / "img"
    build(config_for(info, out2, reference_rule=ReferenceRule(mode="image")), log=quiet)
    refs = read_references(out2 / "references.h5", n_vertices=None)
    test = open_dataset(out2).split("test")
    for j, src in enumerate(refs.source_image):
        row = list(test.images["path"]).index(str(src))
        np.testing.assert_allclose(refs.shape[j], test.fit["shape"][row], rtol=1e-6)
    man = json.loads((out2 / "manifest.json").read_text())
    assert all(c["how"] == "rule" and "image" in c for c in man["references"]["chosen"])


def test_identity_targets_from_labels(label_build):
    from v2m_data.shards import open_dataset
    from v2m_models.data import TargetRule, identity_targets

    _info, out = label_build
    train = open_dataset(out).split("train")
    t, n = identity_targets(train, TargetRule(source="identity"))
    idf = train.identity_fit
    has = idf["n_images"] > 0
    np.testing.assert_allclose(t[has, :40], idf["shape"][has])
    np.testing.assert_allclose(t[has, 40:], idf["expression"][has])
    np.testing.assert_array_equal(n[has], idf["n_images"][has])
    t_img, _ = identity_targets(train, TargetRule(source="image"))
    assert not np.allclose(t_img[has], t[has])  # the median of frontal fits is another label
    with pytest.raises(Exception, match="image"):
        TargetRule(source="images")


@pytest.fixture(scope="module")
def bfm_world_build(bfm, bfm_dir, tmp_path_factory):
    """A real-BFM synthetic world (8 identities x 3 images) built with precomputed landmarks."""
    from tests.data.test_pipeline import quiet
    from v2m_data.building import BuildConfig, build
    from v2m_data.synth import make_world

    root = tmp_path_factory.mktemp("bw") / "w"
    make_world(root, 8, 5, bfm, images_per_identity=3, videos_per_identity=1, utterances_per_video=1,
               duration=(1.0, 1.2), image_size=128, progress=False)
    out = tmp_path_factory.mktemp("bb") / "out"
    build(BuildConfig(voxceleb=str(root), vggface=str(root / "vggface"), out=str(out), bfm=str(bfm_dir),
                      detector="precomputed", progress=False), log=quiet)
    return root, out


def test_audit_command_prints_verdict_and_writes_figure(bfm_world_build, bfm_dir, tmp_path):
    from click.testing import CliRunner

    from v2m_cli.build import main

    root, out = bfm_world_build
    q = json.loads((out / "manifest.json").read_text())["quality"]
    assert q["icc"]["ER"] > 0.9  # exact landmarks: the fits of one person agree
    r = CliRunner().invoke(main, ["audit", str(out), "--truth", str(root / "truth.h5"), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "verdict: labels carry identity" in r.output and "fidelity per_identity" in r.output
    doc = json.loads((tmp_path / "a" / "audit.json").read_text())
    fid = doc["fidelity"]
    assert fid["per_image"]["n"] == 24 and fid["per_identity"]["n"] == 8
    assert fid["per_image"]["corr"]["ER"] > 0.8
    # the labels are closer to the truth than the mean face is
    assert fid["references"]["are_median"] < fid["mean_face"]["are_median"]
    assert (tmp_path / "a" / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(main, ["audit", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "no manifest.json" in bad.output
