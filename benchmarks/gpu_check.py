"""One GPU check: the CUDA tests and the GPU figures in one command, one JSON.

Run from the repository root on a machine with a GPU (budget: about 8 minutes on one H100/H200)::

    export V2M_BFM_DIR=/path/to/train.configs      # the BFM: score step, mesh losses
    python benchmarks/gpu_check.py --out gpu_check.json

Steps (each in its own ``try``: a failure, a timeout or a missing requirement is recorded in the
JSON as ``status`` ``error`` / ``timeout`` / ``skipped`` with its reason, and the next step runs):

1. ``gpu_tests``: ``pytest -m gpu tests/models/test_gpu.py`` in a subprocess (every trainer on CUDA in
   bf16 and fp16 with the grad scaler, CPU/CUDA agreement, the device feature bank); counts of
   passed / failed / skipped and the tail of the output.
2. ``supervised_throughput``: the supervised model at batch 128 with the paper's crops (3-8 s: 300,
   550 = the mean, 800 frames): model steps alone (``benchmarks/bench_train.py``'s ``bench_step``)
   and the whole ``fit`` loop with the device feature bank on a random build (crops of 300-800
   frames); the 50K-iteration projection of both against the goal of <= 5 minutes.
3. ``unsupervised_step_rate``: ``train_step`` rate of the unsupervised trainer with the paper's
   networks, for ``--recipe paper`` (batch 128) and ``--recipe official`` (batch 64, triplets:
   three generator and student passes per sample), and their 50K-iteration projection.
4. ``score_cuda``: ``v2m-bench score --device cuda`` on the full 301 x 3 case (random coefficients
   from the BFM statistics as ``benchmarks/bench_score.py``): the score call in-process (first call,
   then warm), the whole command line (interpreter start included), and the CPU engine for
   comparison; goal <= 2 s.
5. ``fan_throughput``: face_alignment's ``FAN`` (4 hourglass modules) and ``ResNetDepth`` (the 3-D
   landmark depth net) with random weights (no download) at the real input (256x256), float32 and
   float16: images/s of the landmark networks.
6. ``nccl_2rank``: with two GPUs or more, a 2-rank NCCL run of the supervised trainer (each rank in
   its own process; the ranks' weights must agree after the run); skipped with the reason otherwise.

``--dry-run`` runs every step at toy size on the CPU (gloo for the 2-rank run, tiny networks, a few
iterations): it checks the script, not the figures. The JSON (written atomically) holds the
machine, each step's ``status``, ``seconds``, figures, and ``goals`` (each goal's figure and
whether it is met).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

STEPS = ("gpu_tests", "supervised_throughput", "unsupervised_step_rate", "score_cuda", "fan_throughput", "nccl_2rank")
#: seconds each step may take (the whole check: <= 8 minutes on one H100/H200)
TIMEOUTS = {"gpu_tests": 170, "supervised_throughput": 70, "unsupervised_step_rate": 90, "score_cuda": 60,
            "fan_throughput": 30, "nccl_2rank": 60}
GOAL_SUPERVISED_MIN = 5.0
GOAL_SCORE_S = 2.0


class StepTimeout(Exception):
    """A step ran past its time limit."""


class StepSkipped(Exception):
    """A step cannot run here (the reason is the message)."""


# ------------------------------------------------------------------------------------- helpers
def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_args(dry: bool, bfm=None) -> SimpleNamespace:
    """What ``benchmarks/bench_train.py``'s helpers read from its command line."""
    from v2m_models.nets import VOICE_CHANNELS
    from v2m_models.unsupervised import GENERATOR_CHANNELS, TRUNK_CHANNELS

    if dry:
        return SimpleNamespace(workers=0, min_frames=20, max_frames=40, amp="auto", channels="64,16,16,16,16,8",
                               width_mult=0.25, last_channels=16, face_size=120, input_size=120, kd="pkt",
                               student_width=0.25, student_last_channels=16, generator_channels="16,8,8,8,8",
                               trunk_channels="8,8,8,8,8", bfm=bfm)
    return SimpleNamespace(workers=2, min_frames=300, max_frames=800, amp="auto", channels=",".join(map(str, VOICE_CHANNELS)),
                           width_mult=1.0, last_channels=None, face_size=120, input_size=120, kd="pkt", student_width=1.0,
                           student_last_channels=None, generator_channels=",".join(map(str, GENERATOR_CHANNELS)),
                           trunk_channels=",".join(map(str, TRUNK_CHANNELS)), bfm=bfm)


def _fake(dry: bool):
    from bench_train import fake_dataset

    if dry:
        return fake_dataset(4, 3, 60, images_per_id=2)
    return fake_dataset(200, 10, 800, images_per_id=2)


def _device(dry: bool):
    import torch

    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise StepSkipped("CUDA is not available (use --dry-run to check the script on the CPU)")
    return torch.device("cuda")


def _part(out: dict, key: str, fn) -> None:
    """``out[key] = fn()``; a failure of this part is recorded as ``out[key + "_error"]`` and the step goes on."""
    try:
        out[key] = fn()
    except StepTimeout:
        raise
    except Exception as e:  # noqa: BLE001 - recorded
        out[f"{key}_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}"


def _part_errors(d: dict, where: str = "") -> list:
    """The ``<part>_error`` entries of a step's record (nested), as ``"where.part: message"``."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _part_errors(v, f"{where}{k}.")
        elif k.endswith("_error"):
            out.append(f"{where}{k[:-6]}: {v}")
    return out


def _find_bfm(bfm):
    from v2m_bench import load_bfm
    from v2m_bench.errors import V2MError

    try:
        return load_bfm(bfm)
    except (V2MError, OSError) as e:
        raise StepSkipped(f"no BFM ({' '.join(str(e).split())[:200]}): set V2M_BFM_DIR or --bfm") from None


# ------------------------------------------------------------------------------------- steps
def step_gpu_tests(ctx) -> dict:
    """``pytest -m gpu`` in a subprocess."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs", "tests/models/test_gpu.py"]
    env = dict(os.environ, MPLBACKEND="Agg")
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ctx.time_left())
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise StepTimeout(f"pytest ran past {ctx.time_left():.0f} s; output tail: {out[-2000:]}") from None
    text = res.stdout + res.stderr
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "errors", "deselected")}
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary[-1] if summary else ""):
        counts[k] += int(n)
    counts["errors"] += counts.pop("error")
    out = {"command": " ".join(cmd[1:]), "returncode": res.returncode, **counts, "output_tail": text[-3000:]}
    if res.returncode not in (0, 5):  # 5: nothing collected/selected
        out["error"] = f"pytest exited with {res.returncode}: {counts['failed']} failed, {counts['errors']} errors"
    return out


def step_supervised_throughput(ctx) -> dict:
    import dataclasses

    import torch

    from bench_train import bench_fit, bench_step, trainer_config

    dev = _device(ctx.dry)
    a = _bench_args(ctx.dry, ctx.bfm)
    channels = tuple(int(c) for c in a.channels.split(","))
    batch = 4 if ctx.dry else 128
    n_iter = 1 if ctx.dry else 40
    frames = (20, 30, 40) if ctx.dry else (300, 550, 800)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = {"device": str(dev), "batch_size": batch, "channels": list(channels), "step": {}}
    for f in frames:
        r = bench_step("supervised", dev, batch, channels, f, n_iter, a.amp, n_classes=200)
        out["step"][str(f)] = {"frames": f, "iterations_per_s": r["iterations_per_s"],
                               "minutes_for_50k": 50_000 / r["iterations_per_s"] / 60.0}
    mean = out["step"][str(frames[1])]
    out["step_minutes_for_50k"] = mean["minutes_for_50k"]
    loader = "cpu" if ctx.dry else "gpu"

    def whole_loop():
        ds, _ = _fake(ctx.dry)
        cfg = trainer_config("supervised", a, dev, batch=batch, iterations=3 if ctx.dry else 150, loader=loader)
        r = bench_fit(dataclasses.replace(cfg, seed=0), ds)
        return {"loader": loader, "crops": [a.min_frames, a.max_frames], "iterations_per_s": r["steady_iterations_per_s"],
                "samples_per_s": r["samples_per_s"], "minutes_for_50k": r["minutes_for_50k"]}

    _part(out, "fit", whole_loop)
    if "fit" in out:
        out["fit_minutes_for_50k"] = out["fit"]["minutes_for_50k"]
    return out


def step_unsupervised_step_rate(ctx) -> dict:
    from bench_train import bench_task_step, make_task, pretrained_parts, trainer_config
    from v2m_models.unsupervised import RECIPES

    dev = _device(ctx.dry)
    a = _bench_args(ctx.dry, ctx.bfm)
    ds, _ = _fake(ctx.dry)
    n_iter, warmup = (1, 1) if ctx.dry else (15, 2)
    out = {"device": str(dev), "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        parts = pretrained_parts(a, ds, dev, Path(tmp))
        out["bfm"] = bool(parts.mesh)
        for name, preset in RECIPES.items():
            over = dict(preset, recipe=name)
            if ctx.dry:
                over["batch_size"] = 4
            if not parts.mesh:
                if name == "official":
                    out["recipes"][name] = {"status": "skipped", "reason": "no BFM: the posed mesh loss and the triplet need it"}
                    continue
                over["mesh_weight"] = 0.0
            cfg = trainer_config("unsupervised", a, dev, batch=over.pop("batch_size"), iterations=n_iter + 2, workers=0,
                                 ckpts=parts, **over)

            def rate(cfg=cfg):
                r = bench_task_step(make_task(cfg, ds), n_iter, warmup)
                return {"batch_size": int(cfg.batch_size), "iterations_per_s": r["iterations_per_s"],
                        "samples_per_s": r["samples_per_s"], "minutes_for_50k": 50_000 / r["iterations_per_s"] / 60.0,
                        "mesh_loss": bool(cfg.mesh_weight > 0), "triplet": bool(cfg.triplet_weight > 0)}

            _part(out["recipes"], name, rate)
            _free_cuda()
    return out


def step_score_cuda(ctx) -> dict:
    from v2m_bench import ScoreConfig, score
    from v2m_bench.formats import write_predictions, write_references

    dev = _device(ctx.dry)
    model = _find_bfm(ctx.bfm)
    n_id, per = (3, 3) if ctx.dry else (301, 3)
    boot = 10 if ctx.dry else 1000
    rng = np.random.default_rng(0)

    def coeffs(n, scale):
        s = rng.normal(size=(n, model.n_shape)) * model.shape_std * scale + model.shape_mean
        e = rng.normal(size=(n, model.n_expression)) * model.expression_std * scale + model.expression_mean
        return s.astype(np.float32), e.astype(np.float32)

    names = [f"Case_{i:04d}" for i in range(n_id)]
    out = {"identities": n_id, "predictions": n_id * per, "bootstrap": boot}
    with tempfile.TemporaryDirectory() as tmp:
        refs, preds = Path(tmp) / "references.h5", Path(tmp) / "predictions.h5"
        rs, re_ = coeffs(n_id, 1.0)
        write_references(refs, names, ["m" if i % 2 else "f" for i in range(n_id)], shape=rs, expression=re_)
        ps, pe = coeffs(n_id * per, 0.5)
        write_predictions(preds, np.repeat(names, per), [f"utt_{k:05d}" for k in range(n_id * per)], shape=ps, expression=pe)
        device = None if ctx.dry else "cuda"
        cfg = ScoreConfig(bootstrap=boot, device=device, progress=False)
        t = time.perf_counter()
        rep = score(preds, refs, model, config=cfg)
        out["first_s"] = time.perf_counter() - t
        if not ctx.dry:  # warm: CUDA context, kernels and numba already loaded
            t = time.perf_counter()
            rep = score(preds, refs, model, config=cfg)
            out["warm_s"] = time.perf_counter() - t
        out["device"] = device or "cpu"
        out["ER"] = float(rep.metrics["ER"].value) if "ER" in rep.metrics else None
        exe = Path(sys.executable).with_name("v2m-bench")
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "v2m_cli.bench"]
        cmd += ["score", str(preds), "--references", str(refs), "--bootstrap", str(boot), "--no-progress"]
        cmd += ["--device", device] if device else []
        if ctx.bfm:
            cmd += ["--bfm", str(ctx.bfm)]
        out["cli_command"] = "v2m-bench " + " ".join(cmd[cmd.index("score"):])

        def cli():
            t = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, ctx.time_left()))
            if res.returncode != 0:
                raise RuntimeError(f"exit {res.returncode}: {(res.stdout + res.stderr)[-1000:]}")
            return time.perf_counter() - t

        _part(out, "cli_s", cli)
        if not ctx.dry:  # the CPU engine on this machine's cores, for comparison

            def cpu():
                t = time.perf_counter()
                score(preds, refs, model, config=ScoreConfig(bootstrap=boot, progress=False))
                return time.perf_counter() - t

            _part(out, "cpu_s", cpu)
    return out


def step_fan_throughput(ctx) -> dict:
    import torch

    from face_alignment.models import FAN, ResNetDepth

    dev = _device(ctx.dry)
    if ctx.dry:
        fan, depth, size, dsize, batch, n = FAN(1), ResNetDepth(layers=[1, 1, 1, 1]), 64, 224, 1, 1
    else:
        fan, depth, size, dsize, batch, n = FAN(4), ResNetDepth(), 256, 256, 32, 10
    torch.manual_seed(0)
    fan, depth = fan.to(dev).eval(), depth.to(dev).eval()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = {"device": str(dev), "batch": batch, "input": size, "fan_modules": fan.num_modules, "dtypes": {}}
    for dtype in ([torch.float32] if ctx.dry else [torch.float32, torch.float16]):
        name = str(dtype).replace("torch.", "")
        _part(out["dtypes"], name, lambda dtype=dtype: _fan_rates(torch, fan, depth, dtype, dev, batch, size, dsize, n, ctx.dry))
    return out


def _fan_rates(torch, fan, depth, dtype, dev, batch: int, size: int, dsize: int, n: int, dry: bool) -> dict:
    """Images/s of the FAN and of the depth net in ``dtype`` (inference, ``n`` timed batches)."""
    f, d = fan.to(dtype), depth.to(dtype)
    x = torch.randn(batch, 3, size, size, device=dev, dtype=dtype)
    xd = torch.randn(batch, 71, dsize, dsize, device=dev, dtype=dtype)  # the image and 68 heatmaps, as the API
    with torch.inference_mode():
        for _ in range(0 if dry else 3):
            f(x), d(xd)
        _sync(torch, dev)
        t = time.perf_counter()
        for _ in range(n):
            heat = f(x)[-1]
        _sync(torch, dev)
        t_fan = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for _ in range(n):
            d(xd)
        _sync(torch, dev)
        t_depth = (time.perf_counter() - t) / n
    return {"fan_images_per_s": batch / t_fan, "depth_images_per_s": batch / t_depth,
            "fan_and_depth_images_per_s": batch / (t_fan + t_depth), "heatmaps": list(heat.shape)}


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, dry: bool, out_dir: str) -> None:
    """One rank of the 2-rank run: the supervised trainer on the random build; saves its weights."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if dry:
        torch.set_num_threads(1)
    from bench_train import make_task, trainer_config
    from v2m_models.training import fit

    a = _bench_args(dry)
    ds, _ = _fake(dry)
    dev = torch.device("cpu") if dry else torch.device("cuda", rank)
    cfg = trainer_config("supervised", a, dev, batch=4 if dry else 128, iterations=2 if dry else 60,
                         loader="cpu" if dry else "gpu", workers=0, log_every=1 if dry else 20)
    task = make_task(cfg, ds)
    t = time.perf_counter()
    r = fit(task, Path(out_dir) / "ddp.pt")
    wall = time.perf_counter() - t
    torch.save({"weights": {k: v.detach().cpu() for k, v in task.modules["model"].state_dict().items()},
                "iterations_per_s": r.iterations_per_s, "wall_s": wall}, Path(out_dir) / f"rank{rank}.pt")


def step_nccl_2rank(ctx) -> dict:
    import torch
    import torch.multiprocessing as mp

    if ctx.dry:
        backend, method = "gloo", "fork"
    else:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < 2:
            raise StepSkipped(f"{n} GPU(s) here: the 2-rank NCCL run needs two")
        backend, method = "nccl", "spawn"
    with tempfile.TemporaryDirectory() as tmp:
        pc = mp.start_processes(_ddp_worker, args=(2, _free_port(), ctx.dry, tmp), nprocs=2, join=False,
                                start_method=method)
        try:
            while not pc.join(timeout=1.0):
                if ctx.time_left() <= 0:
                    raise StepTimeout("the 2-rank run ran past its time limit")
        finally:
            for p in pc.processes:
                if p.is_alive():
                    p.terminate()
        r0 = torch.load(Path(tmp) / "rank0.pt", weights_only=True)
        r1 = torch.load(Path(tmp) / "rank1.pt", weights_only=True)
    same = all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
    out = {"backend": backend, "ranks": 2, "iterations_per_s": r0["iterations_per_s"], "wall_s": r0["wall_s"],
           "ranks_agree": bool(same)}
    if not same:
        out["error"] = "the two ranks ended with different weights"
    return out


# ------------------------------------------------------------------------------------- running
class _Context:
    def __init__(self, dry: bool, bfm, deadline: float):
        self.dry = dry
        self.bfm = bfm
        self.deadline = deadline

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def _alarm(signum, frame):
    raise StepTimeout("the step ran past its time limit")


def run_step(name: str, fn, ctx_args: dict, limit: float, grace: float = 5.0) -> dict:
    """Run ``fn(ctx)`` with a time limit; the record of the step (never raises but KeyboardInterrupt).

    The limit is enforced by SIGALRM in this process after ``limit + grace`` seconds (a long call
    into C, e.g. a CUDA synchronisation, ends first); subprocesses get what is left of ``limit``
    (``ctx.time_left()``) and time out themselves first."""
    ctx = _Context(deadline=time.monotonic() + limit, **ctx_args)
    t, c = time.perf_counter(), time.process_time()
    rec: dict = {"timeout_s": round(limit, 1)}
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit + grace)
    try:
        rec.update(fn(ctx))
        parts = _part_errors(rec)
        if parts and "error" not in rec:
            rec["error"] = "; ".join(parts)
        rec["status"] = "error" if "error" in rec else "ok"
    except StepSkipped as e:
        rec.update(status="skipped", reason=str(e))
    except StepTimeout as e:
        rec.update(status="timeout", error=str(e)[:3000])
    except BaseException as e:  # noqa: BLE001 - any failure of a step is a figure of the check
        if isinstance(e, KeyboardInterrupt):
            raise
        rec.update(status="error", error=f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}",
                   traceback=traceback.format_exc()[-3000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _free_cuda()
    rec["seconds"] = time.perf_counter() - t
    rec["cpu_seconds"] = time.process_time() - c  # this process's CPU time (not the subprocesses')
    return rec


def _machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["bf16"] = bool(torch.cuda.is_bf16_supported())
    return info


def _goals(steps: dict) -> dict:
    def get(step, *keys):
        v = steps.get(step, {})
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    g = {}
    fit_min = get("supervised_throughput", "fit_minutes_for_50k")
    step_min = get("supervised_throughput", "step_minutes_for_50k")
    g["supervised_50k_minutes"] = {"goal": f"<= {GOAL_SUPERVISED_MIN:g}", "fit": fit_min, "step": step_min,
                                   "met": None if fit_min is None else bool(fit_min <= GOAL_SUPERVISED_MIN)}
    warm = get("score_cuda", "warm_s")
    g["score_cuda_seconds"] = {"goal": f"<= {GOAL_SCORE_S:g}", "warm": warm, "cli": get("score_cuda", "cli_s"),
                               "cpu": get("score_cuda", "cpu_s"),
                               "met": None if warm is None else bool(warm <= GOAL_SCORE_S)}
    return g


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="The JSON of figures (written atomically).")
    ap.add_argument("--dry-run", action="store_true", help="Every step at toy size on the CPU (checks the script).")
    ap.add_argument("--bfm", default=None, help="BFM folder (default: $V2M_BFM_DIR, the user cache).")
    ap.add_argument("--steps", default=",".join(STEPS), help="Comma-separated subset of: " + ", ".join(STEPS))
    ap.add_argument("--time-scale", type=float, default=1.0, help="Multiply every step's time limit.")
    a = ap.parse_args(argv)
    steps = [s for s in a.steps.split(",") if s]
    for s in steps:
        if s not in STEPS:
            ap.error(f"unknown step {s!r} (choose from {', '.join(STEPS)})")
    import torch

    threads = torch.get_num_threads()
    if a.dry_run:  # toy sizes: one thread is faster than two competing ones on a shared machine
        torch.set_num_threads(1)
    try:
        return _run(a, steps)
    finally:
        torch.set_num_threads(threads)


def _run(a, steps) -> int:
    from v2m_bench.fileio import write_text

    fns = {"gpu_tests": step_gpu_tests, "supervised_throughput": step_supervised_throughput,
           "unsupervised_step_rate": step_unsupervised_step_rate, "score_cuda": step_score_cuda,
           "fan_throughput": step_fan_throughput, "nccl_2rank": step_nccl_2rank}
    t0 = time.perf_counter()
    result = {"check": "gpu_check", "dry_run": bool(a.dry_run), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": _machine(), "steps": {}}
    for name in steps:
        limit = TIMEOUTS[name] * float(a.time_scale)
        print(f"[gpu_check] {name} (limit {limit:.0f} s) ...", flush=True)
        rec = run_step(name, fns[name], {"dry": bool(a.dry_run), "bfm": a.bfm}, limit)
        result["steps"][name] = rec
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']:.1f} s"
              + (f" ({rec.get('error') or rec.get('reason')})" if rec["status"] != "ok" else ""), flush=True)
        result["total_s"] = time.perf_counter() - t0
        result["goals"] = _goals(result["steps"])
        write_text(a.out, json.dumps(result, indent=2, default=str) + "\n")  # after each step: partial results survive
    print(f"[gpu_check] wrote {a.out} ({result['total_s']:.0f} s)")
    return 0 if all(r["status"] in ("ok", "skipped") for r in result["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
