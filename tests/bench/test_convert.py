"""convert-cmp: the official FOLDER/<Name>/<video>_<utt>.obj layout -> predictions.h5."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from v2m_bench.convert import OFFICIAL_SCALE, convert_cmp, find_cmp_files, read_obj_vertices
from v2m_bench.errors import ValidationError
from v2m_bench.formats import read_predictions
from v2m_cli import bench_convert

NV = 6  # vertices per tiny mesh


def _mesh(seed, n=NV, scale=1e5):
    v = np.random.default_rng(seed).uniform(-1, 1, size=(n, 3)) * scale
    v[0, 0], v[1, 0] = -scale, scale  # a known extent: 2 x scale across x
    return v


def _write_obj(path, v, colours=False, faces=True):
    lines = ["# written by the test", "mtllib none.mtl"]
    for x, y, z in v:
        lines.append(f"v {x:.17g} {y:.17g} {z:.17g}" + (" 0.5 0.25 1" if colours else ""))
    lines.append("vn 0 0 1")
    if faces:
        lines += ["f 1 2 3", "f 2 3 4"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def cmp_folder(tmp_path):
    """3 identities, 5 meshes; one file with colours and CRLF line ends."""
    root = tmp_path / "cmp"
    meshes = {}
    for i, (name, utt) in enumerate(
        [("Bea", "vidB_00002"), ("Abe", "vid1_00002"), ("Abe", "vid1_00001"), ("Cid", "x_00001"), ("Bea", "vidA_00001")]
    ):
        v = _mesh(i)
        meshes[(name, utt)] = v
        _write_obj(root / name / f"{utt}.obj", v, colours=(i == 3))
    crlf = root / "Cid" / "x_00001.obj"
    crlf.write_bytes(crlf.read_bytes().replace(b"\n", b"\r\n"))
    (root / "Abe" / "notes.txt").write_text("ignored")
    return root, meshes


def test_read_obj_vertices(tmp_path):
    v = _mesh(7)
    _write_obj(tmp_path / "a.obj", v, colours=True)
    np.testing.assert_allclose(read_obj_vertices(tmp_path / "a.obj", NV), v.astype(np.float32))
    mixed = tmp_path / "mixed.obj"
    mixed.write_text("v 1 2 3 0.1 0.2 0.3\nv 4 5 6\n  v 7 8 9 # a comment\nvt 0 1\nf 1 2 3\n")
    np.testing.assert_array_equal(read_obj_vertices(mixed), [[1, 2, 3], [4, 5, 6], [7, 8, 9]])


@pytest.mark.parametrize(
    "text,message",
    [
        ("v 1 2 3\nv 4 five 6\n", "vertex 2: cannot read 'v 4 five 6'"),
        ("v 1 2 3\nv 4 5\n", "vertex 2: cannot read 'v 4 5'"),
        ("v 1 2 3\nv 4 5 nan\n", "vertex 2 is NaN or infinite"),
        ("f 1 2 3\n", "no 'v x y z' lines: not an OBJ mesh"),
        ("\x00\x01binary", "no 'v x y z' lines: not an OBJ mesh"),
    ],
)
def test_read_obj_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.obj"
    path.write_text(text)
    with pytest.raises(ValidationError) as info:
        read_obj_vertices(path)
    assert str(info.value) == f"{path}: {message}"


def test_convert_round_trip(cmp_folder, tmp_path):
    root, meshes = cmp_folder
    out = tmp_path / "pred.h5"
    result = convert_cmp(root, out, expected_vertices=NV, model="official-supervised")
    assert (result.n_meshes, result.n_identities, result.units, result.n_vertices) == (5, 3, "bfm", NV)
    pred = read_predictions(out, n_vertices=NV)
    pairs = list(zip(pred.identity.tolist(), pred.utterance.tolist()))
    assert pairs == sorted(meshes)  # sorted by identity, then utterance
    assert pred.units == "bfm" and pred.model == "official-supervised"
    for i, key in enumerate(pairs):
        np.testing.assert_allclose(pred.vertices[i], meshes[key].astype(np.float32))


def test_official_units_are_rescaled_to_bfm(tmp_path):
    v = _mesh(1, scale=180_000 * OFFICIAL_SCALE / 2)  # an official-size mesh: ~107 across
    _write_obj(tmp_path / "cmp" / "Abe" / "v_00001.obj", v)
    with pytest.raises(ValidationError, match=r"v_00001\.obj: the mesh is 106\.6 bfm across.*--units official"):
        convert_cmp(tmp_path / "cmp", tmp_path / "p.h5", expected_vertices=NV)
    convert_cmp(tmp_path / "cmp", tmp_path / "p.h5", expected_vertices=NV, units="official")
    pred = read_predictions(tmp_path / "p.h5", n_vertices=NV)
    assert pred.units == "bfm" and pred.attrs["official_scale_divided"] == pytest.approx(OFFICIAL_SCALE)
    np.testing.assert_allclose(pred.to_vertices()[0], v / OFFICIAL_SCALE, rtol=1e-5)
    assert np.ptp(pred.to_vertices()[0][:, 0]) == pytest.approx(180_000, rel=1e-5)


def test_mm_units_kept_with_attribute(tmp_path):
    v = _mesh(2, scale=90.0)  # 180 mm across
    _write_obj(tmp_path / "cmp" / "Abe" / "v_00001.obj", v)
    convert_cmp(tmp_path / "cmp", tmp_path / "p.h5", expected_vertices=NV, units="mm")
    pred = read_predictions(tmp_path / "p.h5", n_vertices=NV)
    assert pred.units == "mm"
    np.testing.assert_allclose(pred.to_vertices()[0], v * 1000, rtol=1e-5)
    with pytest.raises(ValidationError, match="the mesh is 180 m across, not the size of a face in m"):
        convert_cmp(tmp_path / "cmp", tmp_path / "p.h5", expected_vertices=NV, units="m")
    convert_cmp(tmp_path / "cmp", tmp_path / "p2.h5", expected_vertices=NV, units="m", check_scale=False)
    assert read_predictions(tmp_path / "p2.h5", n_vertices=NV).units == "m"


def test_full_size_vertex_count(tmp_path):
    v = _mesh(3, n=53215)
    _write_obj(tmp_path / "cmp" / "Abe" / "v_00001.obj", v, faces=False)
    result = convert_cmp(tmp_path / "cmp", tmp_path / "p.h5")  # default: 53,215 vertices
    assert result.n_vertices == 53215 and read_predictions(tmp_path / "p.h5").vertices.shape == (1, 53215, 3)
    _write_obj(tmp_path / "cmp" / "Bea" / "v_00001.obj", v[:-1], faces=False)
    with pytest.raises(ValidationError, match=r"Bea/v_00001\.obj: 53214 vertices, expected 53215"):
        convert_cmp(tmp_path / "cmp", tmp_path / "p.h5")


def test_layout_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "Abe").mkdir(parents=True)
    with pytest.raises(ValidationError, match="no .obj files in FOLDER/<Name>/"):
        find_cmp_files(empty)
    with pytest.raises(ValidationError, match="no such folder"):
        find_cmp_files(tmp_path / "missing")
    _write_obj(empty / "loose.obj", _mesh(0))
    with pytest.raises(ValidationError, match="1 .obj files directly in the folder"):
        find_cmp_files(empty)


# --------------------------------------------------------------------------- the command
def test_command_converts(cmp_folder, tmp_path):
    root, _ = cmp_folder
    out = tmp_path / "out" / "pred.h5"
    res = CliRunner().invoke(
        bench_convert.command,
        [str(root), "--out", str(out), "--expected-vertices", str(NV), "--model-name", "m1", "--compression", "gzip",
         "--no-progress"],
    )
    assert res.exit_code == 0, res.output
    assert f"wrote {out}: 5 meshes of 3 identities, {NV} vertices each, units bfm" in res.output
    pred = read_predictions(out, n_vertices=NV)
    assert len(pred) == 5 and pred.model == "m1"
    assert bench_convert.command.name == "convert-cmp"


def test_command_errors_are_one_line_exit_2_and_keep_existing_output(cmp_folder, tmp_path):
    root, _ = cmp_folder
    out = tmp_path / "pred.h5"
    runner = CliRunner()
    assert runner.invoke(bench_convert.command, [str(root), "--out", str(out), "--expected-vertices", str(NV)]).exit_code == 0
    before = out.read_bytes()
    _write_obj(root / "Dee" / "z_00001.obj", _mesh(9, n=NV + 1))
    res = runner.invoke(bench_convert.command, [str(root), "--out", str(out), "--expected-vertices", str(NV)])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {root / 'Dee' / 'z_00001.obj'}: {NV + 1} vertices, expected {NV}"
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp", "pred.h5"]  # no temporary file left

    res = runner.invoke(bench_convert.command, [str(tmp_path / "nowhere"), "--out", str(out)])
    assert res.exit_code == 2 and res.output.startswith("error: ") and "no such folder" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(bench_convert.command, [str(empty), "--out", str(tmp_path / "x.h5")])
    assert res.exit_code == 2 and "no .obj files" in res.output
