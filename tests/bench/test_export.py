"""Mesh export (v2m_bench.export, v2m-bench export): OBJ/PLY content, layout, safe names.

Runs on the random ``small_model`` (576 vertices) from tests/conftest.py: no BFM needed.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from v2m_bench import write_predictions, write_references
from v2m_bench.convert import read_obj_vertices
from v2m_bench.errors import ValidationError
from v2m_bench.export import export_meshes, obj_bytes, ply_bytes, safe_name


def read_ply(path: Path):
    """A minimal binary little-endian PLY reader: (vertices (N, 3) float32, faces (F, 3) int)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    counts = {}
    props = {}
    current = None
    for line in header[2:-1]:
        parts = line.split()
        if parts[0] == "element":
            current = parts[1]
            counts[current] = int(parts[2])
            props[current] = []
        elif parts[0] == "property":
            props[current].append(parts[1:])
    assert props["vertex"] == [["float", "x"], ["float", "y"], ["float", "z"]]
    assert props["face"] == [["list", "uchar", "int", "vertex_indices"]]
    nv, nf = counts["vertex"], counts["face"]
    v = np.frombuffer(data, dtype="<f4", count=3 * nv, offset=end).reshape(nv, 3)
    f = np.frombuffer(data, dtype=[("n", "u1"), ("i", "<i4", (3,))], count=nf, offset=end + 12 * nv)
    assert end + 12 * nv + 13 * nf == len(data), "trailing or missing bytes"
    assert (f["n"] == 3).all()
    return v, f["i"].astype(np.int64)


def obj_faces(path: Path) -> np.ndarray:
    rows = [line.split()[1:] for line in Path(path).read_text().splitlines() if line.startswith("f ")]
    return np.array(rows, dtype=np.int64)


@pytest.fixture
def files(small_model, tmp_path):
    rng = np.random.default_rng(0)
    names = ["A.J._Buckley", "Beyoncé", "C_Name"]
    ids = np.repeat(names, 2)
    utts = ["1TmvLk8sB-g_00001", "1TmvLk8sB-g_00002"] * 3
    shape = rng.normal(size=(6, 40)) * small_model.shape_std
    expr = rng.normal(size=(6, 10)) * small_model.expression_std
    write_predictions(tmp_path / "pred.h5", ids, utts, shape=shape, expression=expr)
    write_references(tmp_path / "refs.h5", names, ["m", "f", "m"], shape=shape[::2], expression=expr[::2])
    return tmp_path


def test_obj_round_trip(small_model, files, tmp_path):
    from v2m_bench.formats import read_predictions

    res = export_meshes(files / "pred.h5", tmp_path / "out", small_model, format="obj")
    assert res.kind == "predictions" and res.n_meshes == 6
    pred = read_predictions(files / "pred.h5")
    want = pred.to_vertices(small_model)
    for i, (ident, utt) in enumerate(zip(pred.identity, pred.utterance)):
        path = tmp_path / "out" / ident / f"{utt}.obj"  # safe names stay as they are
        np.testing.assert_array_equal(read_obj_vertices(path, small_model.n_vertices), want[i])
        np.testing.assert_array_equal(obj_faces(path), small_model.triangles + 1)  # 1-based, same winding


def test_official_layout_reads_back_with_convert_cmp(small_model, files, tmp_path):
    from v2m_bench.convert import find_cmp_files

    export_meshes(files / "pred.h5", tmp_path / "out", small_model)
    found = find_cmp_files(tmp_path / "out")
    assert [(i, u) for i, u, _ in found] == sorted(
        [(n, f"1TmvLk8sB-g_0000{k}") for n in ("A.J._Buckley", "Beyoncé", "C_Name") for k in (1, 2)])


def test_ply_in_mm(small_model, files, tmp_path):
    from v2m_bench.formats import read_references

    res = export_meshes(files / "refs.h5", tmp_path / "out", small_model, format="ply", units="mm")
    assert res.kind == "references" and res.n_meshes == 3
    refs = read_references(files / "refs.h5")
    want = refs.to_vertices(small_model)
    for i, ident in enumerate(refs.identity):
        v, f = read_ply(tmp_path / "out" / f"{ident}.ply")
        np.testing.assert_allclose(v, want[i] / 1000.0, rtol=1e-6)
        np.testing.assert_array_equal(f, small_model.triangles)
    rows = list(csv.DictReader(open(tmp_path / "out" / "index.csv", encoding="utf-8")))
    assert [r["identity"] for r in rows] == list(refs.identity)
    assert [r["file"] for r in rows] == [f"{n}.ply" for n in refs.identity]


def test_writers_keep_outward_normals(small_model):
    """The triangles are written as given: a CCW (outward) mesh stays outward after a PLY round trip."""
    import tempfile

    v = small_model.mean
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.ply"
        p.write_bytes(ply_bytes(v, small_model.triangles))
        rv, rf = read_ply(p)
    n = np.cross(rv[rf[:, 1]] - rv[rf[:, 0]], rv[rf[:, 2]] - rv[rf[:, 0]])
    assert (n[:, 2] > 0).mean() > 0.9  # the dome faces +z, as the BFM face does
    text = obj_bytes(v[:2], [[0, 1, 1]]).decode()
    assert text.splitlines()[-1] == "f 1 2 2"


@pytest.mark.parametrize("name", ["../evil", "../../etc/passwd", "..", ".", "/abs/path", "a/../../b", "C:\\x\\y",
                                  "CON", ".hidden", "x" * 400, "a\x00b", "tab\tname"])
def test_safe_name_is_one_harmless_component(name):
    s = safe_name(name)
    assert s and "/" not in s and "\\" not in s and "\x00" not in s and not s.startswith(".")
    assert s not in (".", "..") and len(s) <= 130
    assert s.split(".")[0].upper() != "CON"
    assert safe_name(name) == s  # deterministic


def test_safe_names_do_not_collide():
    assert safe_name("A.J._Buckley") == "A.J._Buckley"
    assert safe_name("a/b") != safe_name("a_b")
    assert safe_name("a/b") != safe_name("a\\b")


def test_path_traversal_stays_inside(small_model, tmp_path):
    rng = np.random.default_rng(1)
    evil = ["../escape", "/etc/owned", "..", "a/../../b"]
    utts = ["../../up", "/abs", "ok_00001", ".."]
    write_predictions(tmp_path / "evil.h5", evil, utts, shape=rng.normal(size=(4, 40)) * small_model.shape_std,
                      expression=np.zeros((4, 10)))
    out = tmp_path / "deep" / "out"
    res = export_meshes(tmp_path / "evil.h5", out, small_model)
    assert res.n_meshes == 4
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert set(written) == {tmp_path / "evil.h5", out / "index.csv", *res.files}
    for p in res.files:
        assert out.resolve() in p.resolve().parents and p.parent.parent == out
    rows = list(csv.DictReader(open(out / "index.csv", encoding="utf-8")))
    assert [(r["identity"], r["utterance"]) for r in rows] == list(zip(evil, utts))  # originals kept for lookup


def test_case_insensitive_clash_is_refused(small_model, tmp_path):
    write_references(tmp_path / "r.h5", ["Abc", "abc"], ["m", "f"], shape=np.zeros((2, 40)), expression=np.zeros((2, 10)))
    with pytest.raises(ValidationError, match="both be written"):
        export_meshes(tmp_path / "r.h5", tmp_path / "out", small_model)
    assert not (tmp_path / "out").exists()


def test_refuses_other_files(small_model, tmp_path):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(ValidationError, match="format"):
        export_meshes(tmp_path / "other.h5", tmp_path / "o", small_model)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValidationError, match="HDF5"):
        export_meshes(tmp_path / "text.h5", tmp_path / "o", small_model)
    with pytest.raises(ValidationError, match="format"):
        export_meshes(tmp_path / "other.h5", tmp_path / "o", small_model, format="stl")


def test_cli_export(small_model, files, tmp_path):
    from click.testing import CliRunner

    from v2m_cli.bench import main

    npz = small_model.save(tmp_path / "model.npz")
    res = CliRunner().invoke(main, ["export", str(files / "pred.h5"), "--out", str(tmp_path / "m"), "--format", "ply",
                                    "--bfm", str(npz)])
    assert res.exit_code == 0, res.output
    assert "wrote 6 predictions meshes" in res.output
    v, _ = read_ply(tmp_path / "m" / "Beyoncé" / "1TmvLk8sB-g_00002.ply")
    assert v.shape == (small_model.n_vertices, 3)
    res = CliRunner().invoke(main, ["export", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "m2"), "--bfm", str(npz)])
    assert res.exit_code == 2 and res.output.startswith("error:")
    assert not os.path.exists(tmp_path / "m2")
