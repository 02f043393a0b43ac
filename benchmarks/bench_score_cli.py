"""Benchmark: ``v2m-bench score`` and ``v2m-bench report`` timed as whole processes.

Writes the full-size case of ``bench_score.py`` as files (``--n-identities`` references with
random BFM coefficients, 3 predictions each drawn closer to the mean, seeded) into ``--work``,
then runs the commands a user runs, each ``--runs`` times, and prints the wall time of every run
with min / median / max and the load average (1 min) before each run. The machine is often
shared: compare variants back to back and read the load beside the figures.

    python benchmarks/bench_score_cli.py [--bfm DIR] [--work DIR] [--runs 5] [--report-runs 2]
        [--n-identities 301] [--cold]

The first ``score`` on a fresh case computes the mean-face (chance) scores and caches them (see
docs/metrics.md, "The mean-face reference"); ``--cold`` times that first run apart by clearing
the cache entry first. Exit 2 when the BFM cannot be found.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _coefficients(model, n: int, rng: np.random.Generator, scale: float):
    shape = rng.normal(size=(n, model.n_shape)) * model.shape_std * scale + model.shape_mean
    expr = rng.normal(size=(n, model.n_expression)) * model.expression_std * scale + model.expression_mean
    return shape.astype(np.float32), expr.astype(np.float32)


def make_case(model, folder: Path, n_id: int, per: int, seed: int, prediction_scale: float = 0.5) -> tuple[Path, Path]:
    """Write references.h5 and predictions.h5 of the benchmark case (BFM coefficients)."""
    from v2m_bench.formats import write_predictions, write_references

    rng = np.random.default_rng(seed)
    ids = [f"id{i:04d}" for i in range(n_id)]
    rs, re = _coefficients(model, n_id, rng, 1.0)
    ps, pe = _coefficients(model, n_id * per, rng, prediction_scale)
    ref = write_references(folder / "references.h5", ids, ["m" if i % 2 else "f" for i in range(n_id)], shape=rs, expression=re)
    pred = write_predictions(folder / "predictions.h5", np.repeat(ids, per), [f"u{k}" for _ in ids for k in range(per)],
                             shape=ps, expression=pe, model="bench")
    return ref, pred


def _timed(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system of the process) and the 1-min load before it."""
    load = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), load


def _summary(name: str, runs: list[tuple[float, float, float]]) -> str:
    w = [r[0] for r in runs]
    c = [r[1] for r in runs]
    each = ", ".join(f"{r[0]:.2f} s ({r[1]:.1f} s CPU, load {r[2]:.2f})" for r in runs)
    return (f"{name}: wall min {min(w):.2f} s, median {statistics.median(w):.2f} s, max {max(w):.2f} s; "
            f"CPU median {statistics.median(c):.1f} s; {len(w)} runs [{each}]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bfm", default=None, help="3DDFA train.configs folder (default: $V2M_BFM_DIR or the user cache)")
    ap.add_argument("--work", default=None, help="folder for the case files (default: a temporary folder, removed)")
    ap.add_argument("--n-identities", type=int, default=301)
    ap.add_argument("--predictions-per-identity", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=5, help="timed runs of v2m-bench score")
    ap.add_argument("--report-runs", type=int, default=2, help="timed runs of v2m-bench report (0: skip)")
    ap.add_argument("--cold", action="store_true", help="also time one score run with an empty mean-face cache")
    args = ap.parse_args(argv)

    from v2m_bench import load_bfm
    from v2m_bench.errors import BFMNotFoundError

    try:
        model = load_bfm(args.bfm)
    except BFMNotFoundError as e:
        print(f"{Path(__file__).name}: {e}", file=sys.stderr)
        return 2
    tmp = None
    if args.work is None:
        tmp = tempfile.mkdtemp(prefix="v2m_bench_score_")
        work = Path(tmp)
    else:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    try:
        ref, pred = work / "references.h5", work / "predictions.h5"
        if not (ref.exists() and pred.exists()):
            ref, pred = make_case(model, work, args.n_identities, args.predictions_per_identity, args.seed)
        env = dict(os.environ)
        env["V2M_CACHE_DIR"] = str(work / "cache")
        exe = Path(sys.executable).with_name("v2m-bench")
        base = [str(exe)] if exe.exists() else [sys.executable, "-m", "v2m_cli.bench"]
        bfm = ["--bfm", str(args.bfm)] if args.bfm else []
        score = base + ["score", str(pred), "-r", str(ref), "--json", str(work / "scores.json"), "--no-progress"] + bfm
        print(f"case: {args.n_identities} references x {args.predictions_per_identity} predictions in {work}; "
              f"{os.cpu_count()} CPUs")
        if args.cold:
            shutil.rmtree(work / "cache", ignore_errors=True)
            print(_summary("score, empty mean-face cache", [_timed(score, env)]))
        else:  # fill the caches (numba, mean face) before timing
            _timed(score, env)
        print(_summary("v2m-bench score", [_timed(score, env) for _ in range(args.runs)]))
        if args.report_runs > 0:
            report = base + ["report", str(pred), "-r", str(ref), "--out", str(work / "report"), "--no-progress"] + bfm
            print(_summary("v2m-bench report", [_timed(report, env) for _ in range(args.report_runs)]))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
