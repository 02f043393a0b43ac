"""``v2m-build-dataset``: exit 0 with per-item failures, 2 with one line for fatal input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.data.test_pipeline import make_test_world
from v2m_cli.build import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cliworld") / "w"
    info = make_test_world(root, n=4, seed=5)
    info["root"] = root
    return info


def _args(world, out, *extra):
    r = world["root"]
    return [
        "--voxceleb", str(r), "--vggface", str(r / "vggface"), "--out", str(out), "--bfm", str(world["bfm"]),
        "--detector", "precomputed", "--no-progress", *extra,
    ]


def _one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def test_build_exits_0_with_per_item_failures(world, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, _args(world, out, "--identities-per-shard", "3"))
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    n_ref = man["failures_by_stage"].get("reference", 0)
    assert len(man["failures"]) == 9 + n_ref and man["counts"]["shards"] == 2
    assert f"per-item failures: {9 + n_ref} (audio 4, fit 1, image 2, landmarks 2" in res.stdout
    assert "shards: 2 planned, 2 built" in res.stdout
    again = CliRunner().invoke(main, _args(world, out, "--identities-per-shard", "3"))
    assert again.exit_code == 0 and "2 already finished" in again.stdout


def test_missing_voxceleb_folder_is_fatal_with_one_line(world, tmp_path):
    res = CliRunner().invoke(main, [
        "--voxceleb", str(tmp_path / "nope"), "--vggface", str(world["root"] / "vggface"), "--out", str(tmp_path / "o"),
        "--bfm", str(world["bfm"]), "--detector", "precomputed",
    ])
    assert res.exit_code == 2
    assert _one_error_line(res) == f"error: {tmp_path / 'nope'}: no such VoxCeleb folder (--voxceleb)"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content,why",
    [
        (b"", "empty file"),
        (b"\xff\xfe\x00bad\x00", "not UTF-8"),
        (b"name\tgender\nx\tm\n", "missing column"),
    ],
)
def test_unreadable_metadata_is_fatal_with_one_line(world, tmp_path, content, why):
    meta = tmp_path / "meta.csv"
    meta.write_bytes(content)
    res = CliRunner().invoke(main, _args(world, tmp_path / "out", "--vox-meta", str(meta)))
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    assert str(meta) in line and why in line


def test_missing_metadata_and_options(world, tmp_path):
    res = CliRunner().invoke(main, _args(world, tmp_path / "out", "--vox-meta", str(tmp_path / "absent.csv")))
    assert res.exit_code == 2 and "no such metadata file" in _one_error_line(res)
    res = CliRunner().invoke(main, ["--vggface", str(tmp_path)])
    assert res.exit_code == 2 and "missing --voxceleb, --out" in _one_error_line(res)
    res = CliRunner().invoke(main, _args(world, tmp_path / "out", "--detector-option", "nonsense"))
    assert res.exit_code == 2 and "KEY=VALUE" in _one_error_line(res)
    res = CliRunner().invoke(main, _args(world, tmp_path / "out", "--detector-option", "colour=blue"))
    assert res.exit_code == 2 and "unknown option(s) colour" in _one_error_line(res)
    res = CliRunner().invoke(main, _args(world, tmp_path / "out", "--reference-overrides", str(tmp_path / "x.csv")))
    assert res.exit_code == 2 and "no such reference override file" in _one_error_line(res)


def test_out_that_is_a_file_is_fatal(world, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    res = CliRunner().invoke(main, _args(world, f))
    assert res.exit_code == 2 and "exists and is not a folder (--out)" in _one_error_line(res)


def test_merge_without_jobs_is_fatal(tmp_path):
    res = CliRunner().invoke(main, ["merge", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no job manifests" in _one_error_line(res)
    res = CliRunner().invoke(main, ["merge", "--out", str(tmp_path / "absent")])
    assert res.exit_code == 2 and "no such build folder" in _one_error_line(res)


def test_shard_array_and_merge_through_the_cli(world, tmp_path):
    out = tmp_path / "out"
    for i in range(2):
        res = CliRunner().invoke(main, _args(world, out, "--shard-index", str(i), "--num-shards", "2"))
        assert res.exit_code == 0, res.output
    assert not (out / "manifest.json").exists()
    res = CliRunner().invoke(main, ["merge", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").is_file() and "references:" in res.stdout


def test_module_entry_point_and_lock_message(world, tmp_path):
    """As a subprocess (the installed console script runs the same `main`): lock refusal, exit 2."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import time; from v2m_data.building import BuildLock; "
            f"BuildLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"
        )],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = subprocess.run([sys.executable, "-m", "v2m_cli.build", *_args(world, out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 2
    line = _one_error_line(res)
    assert f"another build is running on this output folder (held by pid {holder.pid}" in line


def test_synth_subcommand(world, tmp_path):
    out = tmp_path / "syn"
    res = CliRunner().invoke(main, [
        "synth", "--out", str(out), "--identities", "2", "--seed", "1", "--bfm", str(world["bfm"]), "--images-per-identity", "1",
        "--videos-per-identity", "1", "--utterances-per-video", "1", "--image-size", "64", "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    assert (out / "vox1_meta.csv").is_file() and len(list((out / "wav").rglob("*.wav"))) == 2
    res = CliRunner().invoke(main, ["synth", "--out", str(out), "--identities", "2", "--bfm", str(world["bfm"])])
    assert res.exit_code == 2 and "not empty" in _one_error_line(res)


def test_outputs_are_out_and_the_old_positional_form_still_works(tmp_path):
    """Every command that writes takes --out; the positional form of one release ago is accepted
    with a deprecation note, both at once or neither is a usage error."""
    res = CliRunner().invoke(main, ["merge", str(tmp_path)])
    assert res.exit_code == 2 and "deprecated" in res.stderr and "use --out" in res.stderr
    assert "no job manifests" in res.stderr  # it ran, on the positional folder
    res = CliRunner().invoke(main, ["merge", "--out", str(tmp_path), str(tmp_path)])
    assert res.exit_code == 2 and "give the output once" in res.output
    for cmd in (["merge"], ["synth"]):
        res = CliRunner().invoke(main, cmd)
        assert res.exit_code == 2 and "Missing option '--out'" in res.output
        help_text = CliRunner().invoke(main, [*cmd, "--help"]).output
        assert "--out" in help_text and "[required]" in help_text
