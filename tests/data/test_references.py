"""Reference selection: the rule on a constructed case, tie-breaks, overrides, references.h5."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from v2m_bench.errors import ValidationError
from v2m_bench.formats import read_references
from v2m_data.references import ReferenceRule, build_references, read_overrides, select_references

SIG = np.full(40, 2.0)
TAU = np.ones(10)
BASE = np.linspace(-1.0, 1.0, 40)


def _case():
    """Identity 0: five fits; identity 1: exact ties; identity 2: nothing frontal."""
    rows = [
        # identity, shape offset, expression value, (yaw, pitch, roll), residual_normalized, path
        (0, 0.1, 2.0, (0, 0, 0), 0.01, "A/0.jpg"),  # shape at the median, strong expression
        (0, 0.3, 0.1, (5, -3, 0), 0.01, "A/1.jpg"),  # expected: 0.2/2 + 0.1 = 0.2
        (0, 0.0, 0.0, (40, 0, 0), 0.01, "A/2.jpg"),  # perfect but turned away: not a candidate
        (0, -0.2, 0.08, (2, 2, 10), 0.02, "A/3.jpg"),  # 0.3/2 + 0.08 = 0.23
        (0, 5.0, 0.0, (0, 0, 0), 0.2, "A/4.jpg"),  # badly fitted: not a candidate
        (1, 0.0, 0.5, (0, 0, 0), 0.03, "B/1.jpg"),  # same score as B/0, higher residual
        (1, 0.0, 0.5, (0, 0, 0), 0.02, "B/2.jpg"),  # same score and residual as B/0, later path
        (1, 0.0, 0.5, (0, 0, 0), 0.02, "B/0.jpg"),  # expected: tie -> lower residual -> smaller path
        (2, 0.0, 0.0, (0, 25, 0), 0.01, "C/0.jpg"),  # pitch too large
        (2, 0.0, 0.0, (-30, 0, 0), 0.01, "C/1.jpg"),  # yaw too large
    ]
    ident = np.array([r[0] for r in rows])
    shape = np.array([BASE + r[1] for r in rows])
    expr = np.array([np.full(10, r[2]) for r in rows])
    pose = np.array([r[3] for r in rows], float)
    rn = np.array([r[4] for r in rows])
    paths = np.array([r[5] for r in rows], dtype=object)
    return ident, shape, expr, pose, rn, paths


def test_rule_picks_the_expected_fit():
    ident, shape, expr, pose, rn, paths = _case()
    ch = select_references(ident, shape, expr, pose, rn, SIG, TAU, n_identities=3, paths=paths)
    assert ch.row.tolist() == [1, 7, -1]
    assert ch.how == ["rule", "rule", ""]
    assert ch.n_candidates.tolist() == [3, 3, 0]
    assert np.isnan(ch.score[[2, 4, 8, 9]]).all()
    np.testing.assert_allclose(ch.score[[0, 1, 3]], [2.0, 0.2, 0.23], atol=1e-12)
    assert "no frontal well-fitted image (2 valid fits" in ch.reason[2]
    # without the expression term the fit at the median shape wins
    ch0 = select_references(ident, shape, expr, pose, rn, SIG, TAU, n_identities=3, paths=paths,
                            rule=ReferenceRule(expression_weight=0.0))
    assert ch0.row[0] == 0
    # looser thresholds admit the turned-away perfect fit
    ch1 = select_references(ident, shape, expr, pose, rn, SIG, TAU, n_identities=3, paths=paths,
                            rule=ReferenceRule(max_yaw=45.0))
    assert ch1.row[0] == 2 and ch1.row[2] == 9
    # an override wins over the rule
    ch2 = select_references(ident, shape, expr, pose, rn, SIG, TAU, n_identities=3, paths=paths, overrides={0: 4, 2: 8})
    assert ch2.row.tolist() == [4, 7, 8] and ch2.how == ["override", "rule", "override"]


def test_invalid_fits_are_never_chosen():
    ident, shape, expr, pose, rn, paths = _case()
    rn = rn.copy()
    rn[1] = np.nan
    shape = shape.copy()
    shape[3, 0] = np.nan
    ch = select_references(ident, shape, expr, pose, rn, SIG, TAU, n_identities=3, paths=paths)
    assert ch.row[0] == 0


def _split(genders=("m", "f", "m")):
    ident, shape, expr, pose, rn, paths = _case()
    return SimpleNamespace(
        identities={
            "name": np.array(["Anna_A", "Bert_B", "Cleo_C"], dtype=object),
            "vox_id": np.array(["id10001", "id10002", "id10003"], dtype=object),
            "gender": np.array(genders, dtype=object),
        },
        images={
            "identity": ident.astype(np.int32),
            "path": paths,
            "image_id": np.array([p.split("/")[1][:-4] for p in paths], dtype=object),
        },
        fit={
            "shape": shape.astype(np.float32),
            "expression": expr.astype(np.float32),
            "pose": pose.astype(np.float32),
            "residual_normalized": rn.astype(np.float32),
            "residual": (rn * 100).astype(np.float32),
        },
        n_images=len(paths),
    )


def test_build_references_writes_the_benchmark_format(tmp_path):
    out = tmp_path / "references.h5"
    res = build_references(_split(), out, SIG, TAU)
    assert res["written"] and res["n_references"] == 2 and res["n_overrides"] == 0
    refs = read_references(out)
    assert list(refs.identity) == ["Anna_A", "Bert_B"]
    assert list(refs.gender) == ["m", "f"]
    assert list(refs.source_image) == ["A/1.jpg", "B/0.jpg"]
    np.testing.assert_allclose(refs.fit_residual, [1.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(refs.shape[0], BASE + 0.3, rtol=1e-6)
    with h5py.File(out) as f:
        rule = f.attrs["selection_rule"]
        assert "median" in rule and "|yaw| <= 15" in rule and "residual_normalized <= 0.05" in rule
        assert f.attrs["how_chosen"] == "rule,rule"
    assert [f["identity"] for f in res["failures"]] == ["Cleo_C"]
    assert res["failures"][0]["reason"].startswith("no reference: no frontal well-fitted image")
    # reproducible bytes
    again = build_references(_split(), tmp_path / "again.h5", SIG, TAU)
    assert again["written"]
    assert hashlib.md5(out.read_bytes()).digest() == hashlib.md5((tmp_path / "again.h5").read_bytes()).digest()


def test_override_file_is_honoured(tmp_path):
    csv = tmp_path / "ov.csv"
    csv.write_text("identity,image\nAnna_A,A/4.jpg\nid10003,1\nNobody,x.jpg\nBert_B,B/9.jpg\n")
    ov = read_overrides(csv)
    assert ov == {"Anna_A": "A/4.jpg", "id10003": "1", "Nobody": "x.jpg", "Bert_B": "B/9.jpg"}
    out = tmp_path / "references.h5"
    res = build_references(_split(), out, SIG, TAU, overrides=ov)
    refs = read_references(out)
    assert list(refs.identity) == ["Anna_A", "Bert_B", "Cleo_C"]
    assert list(refs.source_image) == ["A/4.jpg", "B/0.jpg", "C/1.jpg"]  # Bert: unknown image -> the rule
    assert res["n_overrides"] == 2
    reasons = {f["identity"]: f["reason"] for f in res["failures"]}
    assert "not a test identity" in reasons["Nobody"]
    assert "no fitted image with that id" in reasons["Bert_B"]
    with h5py.File(out) as f:
        assert f.attrs["how_chosen"] == "override,rule,override"


def test_read_overrides_json_and_errors(tmp_path):
    j = tmp_path / "ov.json"
    j.write_text('{"Anna_A": "00000012", "Bert_B": "Bert_B/00000003.jpg"}')
    assert read_overrides(j) == {"Anna_A": "00000012", "Bert_B": "Bert_B/00000003.jpg"}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValidationError, match="JSON object"):
        read_overrides(bad)
    nohead = tmp_path / "nohead.csv"
    nohead.write_text("Anna_A,00000012\n")
    with pytest.raises(ValidationError, match="header"):
        read_overrides(nohead)
    rep = tmp_path / "rep.csv"
    rep.write_text("identity,image\nA,1\nA,2\n")
    with pytest.raises(ValidationError, match="repeated"):
        read_overrides(rep)
    with pytest.raises(ValidationError, match="no such"):
        read_overrides(tmp_path / "missing.csv")


def test_bad_gender_and_nothing_to_write(tmp_path):
    res = build_references(_split(("m", "x", "m")), tmp_path / "r.h5", SIG, TAU)
    assert res["n_references"] == 1
    assert any("gender 'x'" in f["reason"] for f in res["failures"])
    s = _split()
    s.fit["pose"][:, 0] = 60.0  # nobody frontal
    res = build_references(s, tmp_path / "none.h5", SIG, TAU)
    assert not res["written"] and not (tmp_path / "none.h5").exists()
    assert len(res["failures"]) == 3


def test_identity_references_use_the_label_and_record_identities_without_frontal_images(tmp_path):
    from v2m_data.labels import identity_labels

    sp = _split()
    f = sp.fit
    lab = identity_labels(sp.images["identity"], f["shape"], f["expression"], f["pose"], f["residual_normalized"], 3)
    sp.fit = {**f, "in_identity_label": lab.pop("used")}
    sp.identity_fit = lab
    # identity 2 (Cleo_C) has fits within the label's limits (|yaw| <= 30) but none frontal
    assert lab["n_images"].tolist() == [3, 3, 1]  # A/2 turned 40 deg away, A/4 badly fitted
    out = tmp_path / "references.h5"
    res = build_references(sp, out, SIG, TAU)
    refs = read_references(out)
    assert list(refs.identity) == ["Anna_A", "Bert_B"]
    np.testing.assert_allclose(refs.shape[0], lab["shape"][0], rtol=1e-6)
    np.testing.assert_array_equal(refs.expression, 0.0)
    assert refs.source_image[0] == "A/0.jpg;A/1.jpg;A/3.jpg"
    np.testing.assert_allclose(refs.fit_residual[0], np.mean([1.0, 1.0, 2.0]), rtol=1e-5)
    assert res["chosen"][0] == {"identity": "Anna_A", "images": ["A/0.jpg", "A/1.jpg", "A/3.jpg"], "how": "identity"}
    miss = [x for x in res["failures"] if x["identity"] == "Cleo_C"]
    assert len(miss) == 1 and "no frontal well-fitted image" in miss[0]["reason"]
    with h5py.File(out) as h:
        assert "rule v2 (identity)" in h.attrs["selection_rule"]
    # an override still takes that image's fit
    res2 = build_references(sp, tmp_path / "r2.h5", SIG, TAU, overrides={"Anna_A": "A/4.jpg"})
    assert res2["chosen"][0] == {"identity": "Anna_A", "image": "A/4.jpg", "how": "override"}
