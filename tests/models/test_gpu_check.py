"""benchmarks/gpu_check.py: the dry run (every step at toy size on the CPU) writes one JSON with
every step's record; a failing or overlong step is recorded and the next one runs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_dry_run_runs_every_step_and_writes_one_json(gpu_check, tmp_path):
    """With the BFM (``$V2M_BFM_DIR``) every step runs; without it the score step and the official
    recipe (posed mesh loss, triplet) are skipped with the reason."""
    bfm = os.environ.get("V2M_BFM_DIR") or None
    out = tmp_path / "check.json"
    rc = gpu_check.main(["--dry-run", "--out", str(out)] + (["--bfm", bfm] if bfm else []))
    d = json.loads(out.read_text())
    assert d["dry_run"] is True and list(d["steps"]) == list(gpu_check.STEPS)
    s = d["steps"]
    bad = {k: (v.get("error"), v.get("traceback")) for k, v in s.items() if v["status"] not in ("ok", "skipped")}
    assert not bad and rc == 0, bad
    t = s["gpu_tests"]  # no CUDA here: collected and skipped, none failed
    assert t["status"] == "ok" and t["failed"] == 0 and t["errors"] == 0 and t["passed"] + t["skipped"] >= 10
    assert s["supervised_throughput"]["status"] == "ok"
    assert all(_positive(v["iterations_per_s"]) for v in s["supervised_throughput"]["step"].values())
    assert _positive(s["supervised_throughput"]["fit_minutes_for_50k"])
    assert d["goals"]["supervised_50k_minutes"]["met"] is not None
    rec = s["unsupervised_step_rate"]["recipes"]
    assert set(rec) == {"paper", "official"} and _positive(rec["paper"]["iterations_per_s"]) and not rec["paper"]["triplet"]
    assert s["fan_throughput"]["status"] == "ok"
    assert all(_positive(v) for v in s["fan_throughput"]["dtypes"]["float32"].values() if isinstance(v, float))
    assert s["nccl_2rank"]["backend"] == "gloo" and s["nccl_2rank"]["ranks_agree"] is True
    sc = s["score_cuda"]
    if bfm:
        assert sc["status"] == "ok" and "status" not in rec["official"]
    if "status" in rec["official"]:  # no BFM anywhere (neither $V2M_BFM_DIR nor the user cache)
        assert rec["official"]["status"] == "skipped" and "BFM" in rec["official"]["reason"]
    else:
        assert rec["official"]["triplet"] and _positive(rec["official"]["iterations_per_s"])
    if sc["status"] == "skipped":
        assert "BFM" in sc["reason"]
    else:
        assert sc["status"] == "ok" and sc["predictions"] == 9 and _positive(sc["first_s"]) and "cli_error" not in sc
        assert 0 < sc["ER"] < 1


def test_a_failing_or_overlong_step_is_recorded(gpu_check):
    def boom(ctx):
        raise RuntimeError("CUDA error: out of memory")

    r = gpu_check.run_step("x", boom, {"dry": True, "bfm": None}, 5.0)
    assert r["status"] == "error" and "out of memory" in r["error"] and "RuntimeError" in r["error"]

    def skip(ctx):
        raise gpu_check.StepSkipped("1 GPU(s) here")

    assert gpu_check.run_step("x", skip, {"dry": True, "bfm": None}, 5.0)["reason"] == "1 GPU(s) here"

    def slow(ctx):
        while True:
            time.sleep(0.01)

    r = gpu_check.run_step("x", slow, {"dry": True, "bfm": None}, 0.2, grace=0.0)
    assert r["status"] == "timeout" and r["seconds"] < 5


def test_a_failing_part_fails_its_step_but_keeps_the_other_figures(gpu_check):
    def half(ctx):
        out = {"a": 1.0}
        gpu_check._part(out, "b", lambda: 1 / 0)
        gpu_check._part(out, "c", lambda: 2.0)
        return out

    r = gpu_check.run_step("x", half, {"dry": True, "bfm": None}, 5.0)
    assert r["status"] == "error" and r["a"] == 1.0 and r["c"] == 2.0 and "b" not in r
    assert r["error"].startswith("b: ZeroDivisionError")
