"""Provenance of a score (fingerprints, --expect-references), the mean-face cache and the
statistics' caveats."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from v2m_bench import ScoreConfig, score, write_predictions, write_references
from v2m_bench.formats import read_predictions, read_references
from v2m_bench.provenance import METRIC_DEFINITION_VERSION, fingerprint, model_fingerprint


def _case(bfm, folder, n=5, seed=0, noise=0.4):
    rng = np.random.default_rng(seed)
    names = [f"Person_{i:02d}" for i in range(n)]
    shape = rng.normal(size=(n, 40)) * bfm.shape_std * 0.7
    expr = np.tile(bfm.expression_mean, (n, 1))
    ref = write_references(folder / "ref.h5", names, ["m", "f", "m", "f", "m"][:n] + ["m"] * max(0, n - 5),
                           shape=shape, expression=expr)
    s = np.repeat(shape, 2, 0) + rng.normal(size=(2 * n, 40)) * bfm.shape_std * noise
    pred = write_predictions(folder / "pred.h5", np.repeat(names, 2), ["u1", "u2"] * n, shape=s,
                             expression=np.repeat(expr, 2, 0))
    return pred, ref, shape, expr


def test_fingerprint_is_over_content_not_bytes(bfm, tmp_path):
    pred, ref, shape, expr = _case(bfm, tmp_path)
    names = read_references(ref).identity
    a = fingerprint(read_references(ref))
    # the same arrays written compressed: other bytes, same fingerprint
    write_references(tmp_path / "ref_gz.h5", names, ["m", "f", "m", "f", "m"], shape=shape, expression=expr,
                     compression="gzip")
    assert (tmp_path / "ref.h5").read_bytes() != (tmp_path / "ref_gz.h5").read_bytes()
    assert fingerprint(read_references(tmp_path / "ref_gz.h5")) == a
    # one coefficient changed, or one name changed: another fingerprint
    shape2 = shape.copy()
    shape2[3, 7] += 0.5
    write_references(tmp_path / "ref2.h5", names, ["m", "f", "m", "f", "m"], shape=shape2, expression=expr)
    assert fingerprint(read_references(tmp_path / "ref2.h5")) != a
    renamed = list(names)
    renamed[0] = "Somebody_Else"
    write_references(tmp_path / "ref3.h5", renamed, ["m", "f", "m", "f", "m"], shape=shape, expression=expr)
    assert fingerprint(read_references(tmp_path / "ref3.h5")) != a
    # vertex files: in mm or in BFM units, the same meshes give the same fingerprint
    v = bfm.vertices(shape.astype(np.float32), expr.astype(np.float32))
    write_references(tmp_path / "v_bfm.h5", names, ["m", "f", "m", "f", "m"], vertices=v)
    write_references(tmp_path / "v_mm.h5", names, ["m", "f", "m", "f", "m"], vertices=v / np.float32(1000), units="mm")
    fb = fingerprint(read_references(tmp_path / "v_bfm.h5"))
    assert len(fb) == 64 and fb != a
    vm = read_references(tmp_path / "v_mm.h5")
    assert np.allclose(vm.to_vertices(), v, rtol=1e-6)
    assert fingerprint(read_predictions(pred)) != a
    assert model_fingerprint(bfm) == model_fingerprint(bfm) and len(model_fingerprint(bfm)) == 64


def test_json_csv_and_table_carry_the_provenance(bfm, bfm_dir, tmp_path):
    from v2m_cli.bench import main

    pred, ref, _, _ = _case(bfm, tmp_path)
    res = CliRunner().invoke(main, ["score", str(pred), "-r", str(ref), "--bfm", str(bfm_dir), "--bootstrap", "50",
                                    "--json", str(tmp_path / "s.json"), "--csv", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    want = fingerprint(read_references(ref))
    js = json.loads((tmp_path / "s.json").read_text())
    prov = js["provenance"]
    assert prov["references_sha256"] == want
    assert prov["predictions_sha256"] == fingerprint(read_predictions(pred))
    assert prov["bfm_md5"] == bfm.md5 and prov["bfm_genuine"] == bfm.is_genuine
    assert prov["metric_definition"] == METRIC_DEFINITION_VERSION
    from v2m_bench import __version__

    assert prov["voice2mesh"] == __version__
    assert set(js["metrics"]["RMSE_v2v"]) == {"value", "ci_low", "ci_high"}
    assert f"references sha256: {want}" in res.output
    # 5 identities: a caveat beside the intervals, in the table and the JSON
    assert "note: only 5 identities" in res.output and js["caveats"][0].startswith("only 5 identities")
    text = (tmp_path / "s.csv").read_text()
    assert f"# references_sha256: {want}\n" in text
    import pandas as pd

    table = pd.read_csv(tmp_path / "s.csv", comment="#")
    assert list(table.columns[:2]) == ["identity", "n_predictions"] and "RMSE_v2v" in table.columns
    assert len(table) == 5


def test_expect_references_refuses_other_references(bfm, bfm_dir, tmp_path):
    from v2m_cli.bench import main

    pred, ref, _, _ = _case(bfm, tmp_path)
    fp = fingerprint(read_references(ref))
    ok = CliRunner().invoke(main, ["score", str(pred), "-r", str(ref), "--bfm", str(bfm_dir), "--bootstrap", "0",
                                   "--expect-references", fp[:16]])
    assert ok.exit_code == 0, ok.output
    other = "0" * 64 if not fp.startswith("0") else "1" * 64
    for args in (["--expect-references", other], ["--expect-references", "abc"]):
        res = CliRunner().invoke(main, ["score", str(pred), "-r", str(ref), "--bfm", str(bfm_dir)] + args)
        assert res.exit_code == 2, res.output
        err = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "Traceback" not in res.output
    assert fp in res.output or "hex" in res.output


def test_mean_face_cache_gives_the_same_scores(bfm, tmp_path, monkeypatch):
    monkeypatch.setenv("V2M_CACHE_DIR", str(tmp_path / "cache"))
    pred, ref, _, _ = _case(bfm, tmp_path, n=4)
    cfg = ScoreConfig(bootstrap=40)
    fresh = score(pred, ref, bfm, config=ScoreConfig(bootstrap=40, chance_cache=False), vertex_errors=True)
    assert not (tmp_path / "cache" / "scores").exists()  # (the regions may be cached: they are no score)
    first = score(pred, ref, bfm, config=cfg)
    files = list((tmp_path / "cache" / "scores").glob("meanface-*.npz"))
    assert len(files) == 1
    again = score(pred, ref, bfm, config=cfg, vertex_errors=True)
    for rep in (first, again):
        assert rep.to_dict()["chance"] == fresh.to_dict()["chance"]
        assert rep.chance_per_identity.equals(fresh.chance_per_identity)
    a, b = again.vertex_errors["chance"], fresh.vertex_errors["chance"]
    assert np.array_equal(a.mean_abs, b.mean_abs) and np.array_equal(a.hist, b.hist) and a.mean == b.mean
    # the cache is read back, not recomputed: a planted value shows (then is discarded with the key)
    with np.load(files[0]) as z:
        data = dict(z)
    data["metric_ER"] = data["metric_ER"] + 1.0
    np.savez(files[0], **data)
    planted = score(pred, ref, bfm, config=cfg)
    assert planted.chance["ER"].value == pytest.approx(fresh.chance["ER"].value + 1.0)
    # other references (one coefficient moved) give another key: computed afresh
    refs = read_references(ref)
    refs.shape[0, 0] += 1.0
    other = score(pred, refs, bfm, config=cfg)
    assert other.chance["ER"].value < 1.0
    assert len(list((tmp_path / "cache" / "scores").glob("meanface-*.npz"))) == 2


def test_a_subset_of_identities_uses_the_cached_rows(bfm, tmp_path, monkeypatch):
    monkeypatch.setenv("V2M_CACHE_DIR", str(tmp_path / "cache"))
    pred, ref, _, _ = _case(bfm, tmp_path, n=5)
    preds = read_predictions(pred)
    part = preds.subset(np.flatnonzero(np.isin(preds.identity, ["Person_01", "Person_03"])))
    full = score(preds, ref, bfm, config=ScoreConfig(bootstrap=0))
    sub = score(part, ref, bfm, config=ScoreConfig(bootstrap=0), vertex_errors=True)
    fresh = score(part, ref, bfm, config=ScoreConfig(bootstrap=0, chance_cache=False), vertex_errors=True)
    assert list(sub.chance_per_identity.index) == ["Person_01", "Person_03"]
    assert sub.chance_per_identity.equals(fresh.chance_per_identity)
    assert sub.chance_per_identity.loc["Person_03", "RMSE"] == full.chance_per_identity.loc["Person_03", "RMSE"]
    assert np.array_equal(sub.vertex_errors["chance"].mean_abs, fresh.vertex_errors["chance"].mean_abs)


def test_p_value_at_the_resolution_limit_is_a_bound():
    from v2m_bench.scoring import _fmt_p

    assert _fmt_p(1 / 1001, 1 / 1001) == "< 1/1001"
    assert _fmt_p(1 / 201, 1 / 201) == "< 1/201"
    assert _fmt_p(0.0123, 1 / 1001) == "0.012"
    assert _fmt_p(3 / 10001, 1 / 10001) == "3.0e-04"


def test_baseline_p_value_floor_in_table_and_json(bfm, tmp_path):
    pred, ref, shape, expr = _case(bfm, tmp_path, n=5, noise=0.1)
    names = read_references(ref).identity
    rng = np.random.default_rng(9)
    bad = np.repeat(shape, 2, 0) + rng.normal(size=(10, 40)) * bfm.shape_std * 3.0
    write_predictions(tmp_path / "bad.h5", np.repeat(names, 2), ["u1", "u2"] * 5, shape=bad,
                      expression=np.repeat(expr, 2, 0))
    rep = score(pred, ref, bfm, baseline=tmp_path / "bad.h5", config=ScoreConfig(bootstrap=199, chance=False))
    b = rep.baseline["RMSE_v2v"]
    assert b["p_value_floor"] == pytest.approx(1 / 200)
    assert b["p_value"] == pytest.approx(1 / 200)  # every resample keeps the sign: at the limit
    line = next(ln for ln in rep.table().splitlines() if ln.startswith("RMSE_v2v"))
    assert line.rstrip().endswith("< 1/200")
    assert rep.to_dict()["baseline"]["RMSE_v2v"]["p_value_floor"] == pytest.approx(0.005)
