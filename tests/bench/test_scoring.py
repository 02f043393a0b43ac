"""Scoring end to end on the BFM: files in, report out (CLI and Python)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from v2m_bench import METRIC_NAMES, ScoreConfig, score, write_predictions, write_references
from v2m_bench.scoring import Report


def _toy(bfm, tmp_path, n=8, noise=0.3, seed=0, missing=0, ref_seed=None):
    """references from ``ref_seed`` (default ``seed``) and predictions = reference + noise (``seed``)."""
    ref_rng = np.random.default_rng(seed if ref_seed is None else ref_seed)
    names = [f"{'ABCDE'[i % 5]}person_{i:02d}" for i in range(n)]
    shape = ref_rng.normal(size=(n, 40)) * bfm.shape_std * 0.7
    expr = np.tile(bfm.expression_mean, (n, 1))
    write_references(tmp_path / "ref.h5", names, ["m", "f"] * (n // 2), shape=shape, expression=expr)
    rng = np.random.default_rng(1000 + seed)
    keep = n - missing
    ids = np.repeat(names[:keep], 3)
    utt = [f"v{k}/0000{k}" for k in range(3)] * keep
    s = np.repeat(shape[:keep], 3, 0) + rng.normal(size=(3 * keep, 40)) * bfm.shape_std * noise
    write_predictions(tmp_path / f"pred{seed}.h5", ids, utt, shape=s, expression=np.repeat(expr[:keep], 3, 0))
    return tmp_path / f"pred{seed}.h5", tmp_path / "ref.h5", shape, expr


def test_perfect_predictions_score_zero(bfm, tmp_path):
    rng = np.random.default_rng(5)
    names = ["Alice_A", "Bob_B", "Carl_C"]
    shape = rng.normal(size=(3, 40)) * bfm.shape_std
    expr = np.tile(bfm.expression_mean, (3, 1))
    write_references(tmp_path / "r.h5", names, ["f", "m", "m"], shape=shape, expression=expr)
    # the prediction is the reference's mesh, rigidly moved: every metric is ~0
    v = bfm.vertices(shape, expr)
    a = np.deg2rad(10.0)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    moved = v @ rot.T + np.array([1000.0, -2000.0, 500.0])
    write_predictions(tmp_path / "p.h5", names, ["u1"] * 3, vertices=moved)
    rep = score(tmp_path / "p.h5", tmp_path / "r.h5", bfm, config=ScoreConfig(bootstrap=50))
    for k in METRIC_NAMES:
        if k == "NME":  # the official NME does not undo rotation/translation
            continue
        assert rep.metrics[k].value < 1e-3, k
    assert rep.chance["ER"].value > 1e-3  # the mean face is not the references


def test_better_predictions_beat_worse_and_the_mean_face(bfm, tmp_path):
    good, ref, _, _ = _toy(bfm, tmp_path, n=10, noise=0.2, seed=0)
    bad, _, _, _ = _toy(bfm, tmp_path, n=10, noise=1.5, seed=1, ref_seed=0)
    rep = score(good, ref, bfm, baseline=bad, config=ScoreConfig(bootstrap=300, seed=1))
    assert rep.n_identities == 10 and rep.n_predictions == 30 and rep.missing == []
    for k in ("ARE_mean", "RMSE"):
        assert rep.metrics[k].value < rep.chance[k].value
        assert rep.metrics[k].value < rep.baseline[k]["value"]
        assert rep.baseline[k]["relative_change"] < 0
        assert rep.metrics[k].ci_low <= rep.metrics[k].value <= rep.metrics[k].ci_high
    assert rep.baseline["RMSE"]["p_value"] < 0.05
    # per-identity table: one row per identity, the macro mean equals the reported value
    t = rep.per_identity
    assert list(t.index) == sorted(t.index) and (t["n_predictions"] == 3).all()
    assert rep.metrics["ER"].value == pytest.approx(t["ER"].mean())


def test_identity_mean_is_over_its_predictions(bfm, tmp_path):
    pred, ref, _, _ = _toy(bfm, tmp_path, n=4, noise=0.5, seed=2)
    rep = score(pred, ref, bfm, config=ScoreConfig(bootstrap=0, chance=False))
    from v2m_bench import read_predictions, read_references, metrics

    p, r = read_predictions(pred), read_references(ref)
    pv, rv = p.to_vertices(bfm), r.to_vertices(bfm)
    idx = np.array([r.index()[i] for i in p.identity])
    er = metrics.are(pv, rv[idx])["ER"]
    first = p.identity[0]
    assert rep.per_identity.loc[first, "ER"] == pytest.approx(er[p.identity == first].mean())


def test_missing_identities_reported_and_strict_refuses(bfm, tmp_path):
    pred, ref, _, _ = _toy(bfm, tmp_path, n=6, seed=3, missing=2)
    rep = score(pred, ref, bfm, config=ScoreConfig(bootstrap=0, chance=False))
    assert len(rep.missing) == 2 and rep.n_identities == 4
    from v2m_bench import ValidationError

    with pytest.raises(ValidationError):
        score(pred, ref, bfm, config=ScoreConfig(bootstrap=0, strict=True))


def test_cli_score_writes_json_and_csv(bfm, bfm_dir, tmp_path):
    from v2m_cli.bench import main

    pred, ref, _, _ = _toy(bfm, tmp_path, n=6, seed=4)
    res = CliRunner().invoke(main, ["score", str(pred), "--references", str(ref), "--bfm", str(bfm_dir), "--bootstrap", "100",
                                    "--json", str(tmp_path / "s.json"), "--csv", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    for k in ("ER", "ARE_mean", "NME", "RMSE", "RMSE_left_cheek"):
        assert k in res.output
    js = json.loads((tmp_path / "s.json").read_text())
    assert set(js["metrics"]) == set(METRIC_NAMES)
    assert set(js["metrics"]["ER"]) == {"value", "ci_low", "ci_high"}
    assert js["n_identities"] == 6 and js["n_predictions"] == 18 and js["missing"] == []
    lines = [ln for ln in (tmp_path / "s.csv").read_text().splitlines() if not ln.startswith("# ")]
    assert len(lines) == 7 and lines[0].startswith("identity,n_predictions,ER")


@pytest.mark.parametrize("case", ["not_h5", "unknown_identity"])
def test_cli_bad_input_is_one_line_exit_2(bfm, bfm_dir, tmp_path, case):
    from v2m_cli.bench import main

    pred, ref, _, _ = _toy(bfm, tmp_path, n=4, seed=6)
    if case == "not_h5":
        pred.write_text("hello")
        expect = str(pred)
    else:
        write_predictions(pred, ["Zed_Unknown"], ["u1"], shape=np.zeros((1, 40)), expression=np.zeros((1, 10)))
        expect = "Zed_Unknown"
    res = CliRunner().invoke(main, ["score", str(pred), "--references", str(ref), "--bfm", str(bfm_dir)])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    err = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and expect in err[0]


def test_report_table_and_json_roundtrip():
    import pandas as pd
    from v2m_bench.scoring import MetricValue

    metrics = {k: MetricValue(0.01 * (i + 1), 0.005, 0.02) for i, k in enumerate(METRIC_NAMES)}
    rep = Report(per_identity=pd.DataFrame(), metrics=metrics, n_identities=3, n_predictions=9, missing=["X"])
    d = rep.to_dict()
    assert d["metrics"]["FR"] == {"value": 0.02, "ci_low": 0.005, "ci_high": 0.02}
    table = rep.table()
    assert "RMSE_mouth (mm)" in table and "missing: 1" in table


def test_engine_option_gives_the_same_scores(bfm, tmp_path):
    pytest.importorskip("numba")
    from v2m_bench.errors import ValidationError

    pred, refs, _, _ = _toy(bfm, tmp_path, n=4)
    a = score(pred, refs, bfm, config=ScoreConfig(bootstrap=0, engine="numba"))
    b = score(pred, refs, bfm, config=ScoreConfig(bootstrap=0, engine="kdtree"))
    for k in METRIC_NAMES:
        assert a.metrics[k].value == b.metrics[k].value, k
    assert a.metrics["RMSE"].value > 0.05
    with pytest.raises(ValidationError, match="engine"):
        score(pred, refs, bfm, config=ScoreConfig(bootstrap=0, engine="gpu-magic"))


def test_regions_of_other_names_are_one_clear_error(small_model, tmp_path):
    """The six part RMSEs are reported by name: regions under other names are refused in one line
    (they used to end in a KeyError deep in the scoring)."""
    import pytest

    from v2m_bench import score, write_predictions, write_references
    from v2m_bench.errors import ValidationError

    z40, z10 = np.zeros((1, 40)), np.zeros((1, 10))
    write_references(tmp_path / "r.h5", ["Ann"], ["f"], shape=z40, expression=z10)
    write_predictions(tmp_path / "p.h5", ["Ann"], ["u1"], shape=z40, expression=z10)
    mask = np.zeros(small_model.n_vertices, bool)
    mask[:50] = True
    with pytest.raises(ValidationError, match="regions: expected the benchmark's six parts .* got forehead"):
        score(tmp_path / "p.h5", tmp_path / "r.h5", small_model, regions={"forehead": mask})


def test_part_v2v_rmse_is_the_metric_on_each_part(bfm, tmp_path):
    """RMSE_v2v_<part> of each identity is the mean over its predictions of
    metrics.rmse_v2v on that part's vertices (the part aligned on its own), in every output."""
    from v2m_bench.formats import read_predictions, read_references
    from v2m_bench.metrics import rmse_v2v
    from v2m_bench.scoring import V2V_REGION_METRICS
    from v2m_bench.topology import REGION_NAMES, bfm_regions

    pred, ref, _, _ = _toy(bfm, tmp_path, n=4, noise=0.5, seed=2)
    rep = score(pred, ref, bfm, config=ScoreConfig(bootstrap=50, chance_cache=False))
    assert V2V_REGION_METRICS == tuple(f"RMSE_v2v_{k}" for k in REGION_NAMES)
    regions = bfm_regions(bfm)
    p, r = read_predictions(pred), read_references(ref)
    pv = p.to_vertices(bfm)
    rv = r.to_vertices(bfm)[[list(r.identity).index(i) for i in p.identity]]
    for k in REGION_NAMES:
        want = rmse_v2v(pv[:, regions[k]], rv[:, regions[k]])
        got = rep.per_identity[f"RMSE_v2v_{k}"]
        for ident in got.index:
            sel = np.asarray(p.identity) == ident
            assert got[ident] == pytest.approx(want[sel].mean(), rel=1e-12), (k, ident)
        assert 0.05 < rep.metrics[f"RMSE_v2v_{k}"].value < rep.chance[f"RMSE_v2v_{k}"].value
        # a part aligned on its own fits at least as well as the whole face aligned at once
        assert (got <= rep.per_identity["RMSE_v2v"] + 1e-9).all()
    table = rep.table()
    assert all(any(ln.startswith(f"RMSE_v2v_{k} (mm)") for ln in table.splitlines()) for k in REGION_NAMES)
    js = rep.to_dict()["metrics"]["RMSE_v2v_nose"]
    assert set(js) == {"value", "ci_low", "ci_high"} and js["value"] == rep.metrics["RMSE_v2v_nose"].value


def test_regions_are_read_back_from_the_cache(bfm, tmp_path, monkeypatch):
    """The default regions are kept in the user cache and read back; a damaged entry is made again."""
    from v2m_bench.topology import bfm_regions

    monkeypatch.setenv("V2M_CACHE_DIR", str(tmp_path / "cache"))
    pred, ref, _, _ = _toy(bfm, tmp_path, n=2, seed=3)
    first = score(pred, ref, bfm, config=ScoreConfig(bootstrap=0, chance=False))
    files = list((tmp_path / "cache" / "regions").glob("regions-*.npz"))
    assert len(files) == 1
    want = bfm_regions(bfm)
    with np.load(files[0]) as z:
        for k, m in want.items():
            assert np.array_equal(z[f"mask_{k}"], m), k
    files[0].write_bytes(b"not an npz")
    again = score(pred, ref, bfm, config=ScoreConfig(bootstrap=0, chance=False))
    for k in METRIC_NAMES:
        assert again.metrics[k].value == first.metrics[k].value, k


def test_model_regions_come_from_the_cache_once_made(bfm, tmp_path, monkeypatch):
    """model_regions (used by score and report) computes the regions once, then reads them back."""
    import v2m_bench.topology as topology
    from v2m_bench.scoring import model_regions

    monkeypatch.setenv("V2M_CACHE_DIR", str(tmp_path / "cache"))
    want = topology.bfm_regions(bfm)
    first = model_regions(bfm)

    def refuse(model):
        raise AssertionError("the regions were computed again")

    monkeypatch.setattr(topology, "bfm_regions", refuse)
    again = model_regions(bfm)
    assert sorted(again) == sorted(want)
    for k in want:
        assert np.array_equal(first[k], want[k]) and np.array_equal(again[k], want[k]), k
