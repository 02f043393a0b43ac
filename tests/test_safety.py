"""Output-folder safety, link-safe writes and one-line errors for bad inputs (docs/safety.md)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.data.test_pipeline import config_for, files_of, make_test_world, quiet
from v2m_bench.errors import ValidationError
from v2m_data.building import build, merge


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "w"
    info = make_test_world(root, n=4, faults=False)
    info["root"] = root
    return info


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(world, out, *extra):
    from v2m_cli import build as build_cli

    root = world["root"]
    args = ["--voxceleb", str(root), "--vggface", str(root / "vggface"), "--out", str(out), "--bfm", str(world["bfm"]),
            "--detector", "precomputed", "--identities-per-shard", "2", "--no-progress", *extra]
    return CliRunner().invoke(build_cli.main, args)


# ------------------------------------------------------------------ 1. the output folder
def test_build_refuses_a_folder_that_is_not_a_build_and_touches_nothing(world, tmp_path):
    u = tmp_path / "u"
    (u / "shards").mkdir(parents=True)
    (u / "shards" / "mine.h5").write_text("keep")
    (u / ".notes.tmp").write_text("keep")
    (u / "jobs").mkdir()
    (u / "jobs" / ".draft.tmp").write_text("keep")
    before = _tree(u)
    res = _cli(world, u)
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith(f"error: {u}: shards/mine.h5 not written by a voice2mesh build")
    assert _tree(u) == before and sorted(p.name for p in u.iterdir()) == [".notes.tmp", "jobs", "shards"]


@pytest.mark.parametrize("name", ["references.h5", "manifest.json"])
def test_build_never_overwrites_a_users_references_or_manifest(world, tmp_path, name):
    u = tmp_path / "u"
    u.mkdir()
    (u / name).write_text("my own file")
    with pytest.raises(ValidationError, match=f"{name} not written by a voice2mesh build"):
        build(config_for(world, u), log=quiet)
    assert (u / name).read_text() == "my own file" and sorted(p.name for p in u.iterdir()) == [name]


def test_build_refuses_a_non_empty_folder_of_other_files(world, tmp_path):
    u = tmp_path / "u"
    u.mkdir()
    (u / "thesis.tex").write_text("keep")
    with pytest.raises(ValidationError, match=r"not empty and not a voice2mesh build \(it holds thesis.tex\)"):
        build(config_for(world, u), log=quiet)
    assert sorted(p.name for p in u.iterdir()) == ["thesis.tex"]


def test_rebuild_of_a_build_keeps_files_it_did_not_write(world, tmp_path):
    ref = tmp_path / "ref"
    build(config_for(world, ref), log=quiet)
    out = tmp_path / "out"
    build(config_for(world, out), log=quiet)
    (out / ".notes.tmp").write_text("mine")
    (out / "shards" / ".plan.tmp").write_text("mine")
    (out / "notes.txt").write_text("mine")
    (out / "shards" / ".train-00000.h5.0123456789abcdef.tmp").write_bytes(b"left by a killed build")
    (out / "shards" / "train-00000.h5").unlink()
    again = build(config_for(world, out), log=quiet)
    assert again.shards_built == 1 and again.complete
    assert (out / ".notes.tmp").read_text() == "mine" and (out / "shards" / ".plan.tmp").read_text() == "mine"
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "shards" / ".train-00000.h5.0123456789abcdef.tmp").exists()
    mine = {"notes.txt", ".notes.tmp", "shards/.plan.tmp"}
    assert {k: v for k, v in files_of(out).items() if k not in mine} == files_of(ref)


def test_merge_refuses_before_deleting_anything(tmp_path):
    u = tmp_path / "u"
    u.mkdir()
    (u / ".notes.tmp").write_text("keep")
    (u / ".manifest.json.0123abcd.tmp").write_text("keep")
    with pytest.raises(ValidationError, match="no job manifests"):
        merge(u, log=quiet)
    assert sorted(p.name for p in u.iterdir()) == [".manifest.json.0123abcd.tmp", ".notes.tmp"]


# ------------------------------------------------------------------ 2. planted links
def test_lock_file_link_is_refused_not_written_through(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".lock").symlink_to(victim)
    with pytest.raises(ValidationError, match=r"\.lock: is a symbolic link"):
        build(config_for(world, out), log=quiet)
    assert victim.read_text() == "precious"


def test_lock_file_hard_link_is_never_truncated(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.link(victim, out / ".lock")
    with pytest.raises(ValidationError, match=r"\.lock: has other hard links"):
        build(config_for(world, out), log=quiet)
    assert victim.read_text() == "precious"


# ------------------------------------------------------------------ 3. disk full
def test_disk_full_during_a_build_is_one_line_and_corrupts_nothing(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_fsync = os.fsync
    calls = []

    def full(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            calls.append(fd)
        if len(calls) == 2:  # the second shard file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    res = _cli(world, out)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert res.exit_code == 2, res.output
    last = res.output.rstrip("\n").splitlines()[-1]
    assert last == "error: No space left on device; free some space and rerun (finished work is kept)", res.output
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp"))
    assert len(list((out / "shards").glob("*.h5"))) == 1
    again = _cli(world, out)
    assert again.exit_code == 0 and "1 of 3 shards already finished" in again.output, again.output


# ------------------------------------------------------------------ 3. HDF5 shapes checked before reading
def _preds(path, n=3):
    import numpy as np

    from v2m_bench.formats import write_predictions

    write_predictions(path, [f"id{i}" for i in range(n)], [f"u{i}" for i in range(n)],
                      shape=np.zeros((n, 40), np.float32), expression=np.zeros((n, 10), np.float32))
    return path


def _refs(path, n=3):
    import numpy as np

    from v2m_bench.formats import write_references

    write_references(path, [f"id{i}" for i in range(n)], ["m"] * n,
                     shape=np.zeros((n, 40), np.float32), expression=np.zeros((n, 10), np.float32))
    return path


def _sparse(path, key, shape, dtype):
    import h5py

    with h5py.File(path, "r+") as f:
        del f[key]
        f.create_dataset(key, shape=shape, dtype=dtype, chunks=(1,) + tuple(shape[1:]))  # nothing stored: tiny file


@pytest.mark.parametrize("kind", ["predictions", "references"])
@pytest.mark.parametrize(
    "key, shape, match",
    [
        ("shape", (10**9, 40), r"shape: expected shape \(3, 40\), found \(1000000000, 40\)"),
        ("expression", (10**9, 10), r"expression: expected shape \(3, 10\), found \(1000000000, 10\)"),
        ("identity", (10**9,), r"(utterance|gender): expected 1000000000 rows \(as in 'identity'\), found 3"),
    ],
)
def test_huge_sparse_datasets_are_refused_before_reading(tmp_path, kind, key, shape, match):
    import h5py

    from v2m_bench.formats import read_predictions, read_references

    path = (_preds if kind == "predictions" else _refs)(tmp_path / "f.h5")
    _sparse(path, key, shape, h5py.string_dtype() if key == "identity" else "f4")
    assert path.stat().st_size < 1 << 20
    reader = read_predictions if kind == "predictions" else read_references
    with pytest.raises(ValidationError, match=match):
        reader(path)


def test_too_many_rows_everywhere_is_refused_before_reading(tmp_path):
    import h5py

    from v2m_bench.formats import MAX_ROWS, read_predictions

    path = _preds(tmp_path / "p.h5")
    n = MAX_ROWS + 1
    for key, shape, dt in (("identity", (n,), h5py.string_dtype()), ("utterance", (n,), h5py.string_dtype()),
                           ("shape", (n, 40), "f4"), ("expression", (n, 10), "f4")):
        _sparse(path, key, shape, dt)
    with pytest.raises(ValidationError, match=rf"identity: {n} rows, more than the {MAX_ROWS} a file may hold"):
        read_predictions(path)


def test_a_locked_hdf5_file_is_called_locked_not_damaged(tmp_path):
    import subprocess
    import sys

    from v2m_bench.formats import read_predictions

    path = _preds(tmp_path / "p.h5")
    code = f"import h5py, sys, time; f = h5py.File({str(path)!r}, 'a'); print('open', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "HDF5_USE_FILE_LOCKING": "TRUE"})
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(ValidationError, match=r"p\.h5: is locked by another program") as info:
            read_predictions(path)
        assert "damaged" not in str(info.value)
    finally:
        holder.kill()
        holder.wait()


def test_inf_in_an_annotation_is_a_recorded_failure_not_a_crash(tmp_path):
    root = tmp_path / "w"
    info = make_test_world(root, n=3, seed=1, faults=False)
    world = {"root": root, **info}
    ann = sorted((root / "vggface" / "files").glob("*.txt"))[0]
    with open(ann, "a", encoding="utf-8") as fh:
        fh.write("99999999 http://example.invalid/x.jpg 1.0 2.0 30.0 40.0 3 1.5 inf\n")
    out = tmp_path / "out"
    result = build(config_for(world, out), log=quiet)
    assert result.complete
    man = json.loads((out / "manifest.json").read_text())
    notes = [f for f in man["failures"] if f["item"] == ann.name]
    # the bad line alone is a recorded failure; the file's other lines still count
    assert len(notes) == 1 and "annotation line 4" in notes[0]["reason"] and "not finite" in notes[0]["reason"]
    assert result.counts["images_ok"] > 0


# ------------------------------------------------------------------ convert-cmp folders
def _obj(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("v 0 0 0\nv 180000 0 0\nv 0 210000 100000\nf 1 2 3\n")


def test_convert_cmp_non_utf8_folder_is_one_line_exit_2(tmp_path):
    from v2m_cli import bench_convert

    cmp = tmp_path / "cmp"
    cmp.mkdir()
    bad = os.path.join(os.fsencode(cmp), b"Caf\xe9")
    os.mkdir(bad)
    _obj(Path(os.fsdecode(bad)) / "vid_00001.obj")
    res = CliRunner().invoke(bench_convert.command, [str(cmp), "--out", str(tmp_path / "p.h5"), "--expected-vertices", "3",
                                                     "--no-scale-check"])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and "Caf\\xe9: name is not valid UTF-8" in res.output
    assert not (tmp_path / "p.h5").exists()


@pytest.mark.parametrize("case", ["link-out", "dangling", "fifo", "hidden-folder", "hidden-obj"])
def test_convert_cmp_refuses_entries_it_used_to_follow_or_skip(tmp_path, case):
    from v2m_bench.convert import find_cmp_files

    cmp = tmp_path / "cmp"
    _obj(cmp / "Abe" / "v_00001.obj")
    outside = tmp_path / "elsewhere" / "Bob"
    _obj(outside / "v_00001.obj")
    if case == "link-out":
        (cmp / "Bob").symlink_to(outside)
        match = "Bob: symbolic link to .*outside"
    elif case == "dangling":
        (cmp / "Abe" / "v_00002.obj").symlink_to(tmp_path / "gone.obj")
        match = "v_00002.obj: dangling symbolic link"
    elif case == "fifo":
        os.mkfifo(cmp / "Abe" / "v_00002.obj")
        match = "v_00002.obj: not a regular file or folder"
    elif case == "hidden-folder":
        _obj(cmp / ".Cid" / "v_00001.obj")
        match = "hidden folder .Cid"
    else:
        _obj(cmp / "Abe" / ".v_00002.obj")
        match = r"\.v_00002.obj: hidden .obj file"
    with pytest.raises(ValidationError, match=match):
        find_cmp_files(cmp)


def test_convert_cmp_accepts_links_inside_its_folder(tmp_path):
    from v2m_bench.convert import find_cmp_files

    cmp = tmp_path / "cmp"
    _obj(cmp / "Abe" / "v_00001.obj")
    (cmp / "Abe" / "v_00002.obj").symlink_to(cmp / "Abe" / "v_00001.obj")
    assert [(i, u) for i, u, _ in find_cmp_files(cmp)] == [("Abe", "v_00001"), ("Abe", "v_00002")]


# ------------------------------------------------------------------ export names
@pytest.mark.parametrize("name", ["漢" * 200, "é" * 200, "😀" * 100, "a" * 300])
def test_export_names_fit_the_file_system_in_bytes(tmp_path, name):
    import numpy as np

    from v2m_bench.export import safe_name, write_mesh

    clean = safe_name(name)
    assert len((clean + ".obj").encode("utf-8")) <= 255
    assert safe_name(name) == clean and safe_name(name + "x") != clean  # stable, and distinct by the hash
    path = write_mesh(tmp_path / f"{clean}.obj", np.zeros((3, 3)), np.array([[0, 1, 2]]))
    assert path.read_bytes().startswith(b"v 0 0 0\n")
    assert [p.name for p in tmp_path.iterdir()] == [f"{clean}.obj"]


def test_export_keeps_short_names_as_they_were():
    from v2m_bench.export import safe_name

    assert safe_name("A.J._Buckley") == "A.J._Buckley"
    assert safe_name("é" * 100) == "é" * 100 and safe_name("José") == "José"  # 200 bytes: unchanged


# ------------------------------------------------------------------ 4. meshes that are not faces
@pytest.mark.parametrize(
    "case, match",
    [
        ("zeros", r"p\.h5: vertices: row 0: the mesh is 0 x 0 x 0 BFM units across"),
        ("shrunk", r"p\.h5: vertices: row 0: the mesh is 18\.01 x 21\.09 x 14\.79 BFM units across"),
        ("mm-as-bfm", r"p\.h5: vertices: row 0: the mesh is 1\.801e\+08 x 2\.109e\+08 x 1\.479e\+08 BFM units"),
        ("flat", r"p\.h5: vertices: row 0: the mesh is 1\.801e\+05 x 2\.109e\+05 x 0 BFM units"),
        ("huge-coefficients", r"p\.h5: shape: row 0: the mesh is [0-9.]+e\+37 x [0-9.]+e\+37 x [0-9.]+e\+37 BFM units"),
    ],
)
def test_meshes_that_are_not_faces_are_refused_with_their_size(bfm, tmp_path, case, match):
    import numpy as np

    from v2m_bench.formats import write_predictions, write_references
    from v2m_bench.scoring import ScoreConfig, score

    ids = ["Abe", "Bea"]
    write_references(tmp_path / "r.h5", ids, ["m", "f"], shape=np.zeros((2, 40), np.float32),
                     expression=np.zeros((2, 10), np.float32))
    if case == "huge-coefficients":
        write_predictions(tmp_path / "p.h5", ids, ["u1", "u2"], shape=np.full((2, 40), 3e38, np.float32),
                          expression=np.zeros((2, 10), np.float32))
    else:
        v = np.repeat(bfm.mean[None], 2, axis=0).astype(np.float64)
        v = {"zeros": v * 0, "shrunk": v / 1e4, "mm-as-bfm": v * 1e3, "flat": v * [1, 1, 0]}[case]
        write_predictions(tmp_path / "p.h5", ids, ["u1", "u2"], vertices=v.astype(np.float32), units="bfm")
    with pytest.raises(ValidationError, match=match) as info:
        score(tmp_path / "p.h5", tmp_path / "r.h5", bfm, config=ScoreConfig(bootstrap=0, chance=False))
    msg = str(info.value)
    assert "\n" not in msg and "the model's mean face is 180,069 x 210,924 x 147,945" in msg


def test_overflowing_vertices_are_named_as_such(small_model):
    import numpy as np

    from v2m_bench.formats import check_face_meshes

    v = np.repeat(small_model.mean[None], 3, axis=0)
    v[2, 5, 1] = np.inf
    with pytest.raises(ValidationError, match=r"shape: row 7: its coefficients are so large that vertices overflow"):
        check_face_meshes(v, small_model, key="shape", rows=[5, 6, 7])
    assert check_face_meshes(v[:2], small_model) is not None


def test_score_cli_refuses_zero_meshes_in_one_line(bfm_dir, bfm, tmp_path):
    import numpy as np

    from v2m_bench.formats import write_predictions, write_references
    from v2m_cli import bench_score

    write_references(tmp_path / "r.h5", ["Abe"], ["m"], shape=np.zeros((1, 40), np.float32),
                     expression=np.zeros((1, 10), np.float32))
    write_predictions(tmp_path / "p.h5", ["Abe"], ["u1"], vertices=np.zeros((1, 53215, 3), np.float32))
    res = CliRunner().invoke(bench_score.command, [str(tmp_path / "p.h5"), "-r", str(tmp_path / "r.h5"), "--bfm",
                                                   str(bfm_dir), "--bootstrap", "0", "--no-progress"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "not a face at the declared units" in res.output, res.output


# ------------------------------------------------------------------ 2. link-safe outputs (score, export)
def _plant(folder: Path, names, victim: Path):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).symlink_to(victim)


def test_score_outputs_never_write_through_planted_links(bfm, tmp_path):
    import numpy as np

    from v2m_bench.formats import write_predictions, write_references
    from v2m_bench.scoring import ScoreConfig, score

    ids = ["Abe", "Bea"]
    write_references(tmp_path / "r.h5", ids, ["m", "f"], shape=np.zeros((2, 40), np.float32),
                     expression=np.zeros((2, 10), np.float32))
    rng = np.random.default_rng(0)
    write_predictions(tmp_path / "p.h5", ids, ["u1", "u2"], shape=(rng.normal(size=(2, 40)) * bfm.shape_std).astype(np.float32),
                      expression=np.zeros((2, 10), np.float32))
    rep = score(tmp_path / "p.h5", tmp_path / "r.h5", bfm, config=ScoreConfig(bootstrap=0, chance=False))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "shared"
    _plant(out, [".s.json.tmp", ".s.csv.tmp"], victim)  # the names used to be predictable
    rep.to_json(out / "s.json")
    rep.to_csv(out / "s.csv")
    assert victim.read_text() == "precious"
    assert (out / ".s.json.tmp").is_symlink() and isinstance(json.loads((out / "s.json").read_text()), dict)
    (out / "link.json").symlink_to(victim)
    with pytest.raises(ValidationError, match=r"link\.json: is a symbolic link"):
        rep.to_json(out / "link.json")
    assert victim.read_text() == "precious"


def test_export_never_writes_through_planted_links(bfm, tmp_path):
    import numpy as np

    from v2m_bench.export import export_meshes
    from v2m_bench.formats import write_references

    write_references(tmp_path / "r.h5", ["Abe"], ["m"], shape=np.zeros((1, 40), np.float32),
                     expression=np.zeros((1, 10), np.float32))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "meshes"
    _plant(out, [".Abe.obj.tmp", ".index.csv.tmp"], victim)
    res = export_meshes(tmp_path / "r.h5", out, model=bfm)
    assert victim.read_text() == "precious"
    assert res.n_meshes == 1 and (out / "Abe.obj").read_bytes().startswith(b"v ")
    assert (out / "index.csv").read_text() == "identity,file\nAbe,Abe.obj\n"
    (out / "Abe.obj").unlink()
    (out / "Abe.obj").symlink_to(victim)
    with pytest.raises(ValidationError, match=r"refusing to write outside the output folder: .*Abe\.obj"):
        export_meshes(tmp_path / "r.h5", out, model=bfm)
    assert victim.read_text() == "precious"
