"""Training speed: loader-only throughput, model-step-only throughput and the full training loop of
each trainer (``v2m-train voice-encoder``, ``v2m-train supervised``).

Run from the repository root::

    python benchmarks/bench_train.py [--device cpu|cuda] [--batch-size 128] [--iterations 30]
        [--channels 64,256,384,576,864,64] [--identities 200] [--utterances 10] [--frames 800]
        [--workers 2] [--loaders cpu,gpu] [--json OUT]

No dataset is needed: a random feature bank in the build's layout (``--identities`` x
``--utterances`` utterances of about ``--frames`` frames, random fits for the targets) stands in for
a build folder, so the figures are those of the code, not of a disk. Reported, per setting:

- ``loader``: batches/s and samples/s of the batch source alone (the CPU DataLoader with its
  workers and pinned memory, or the device-resident bank with on-device cropping), including the
  host-to-device copy;
- ``step``: iterations/s of forward + backward + Adam on one fixed batch already on the device
  (the model's bound);
- ``fit``: iterations/s and samples/s of :func:`v2m_models.training.fit` (loader + steps +
  logging), excluding setup; and the projected time of 50,000 iterations.

The training loop is model-bound (GPU-bound on a GPU) when ``fit`` ≈ ``step`` and ``loader`` is well
above both; a ``bound`` line per fit says which it is (``fit / step`` and ``loader / fit`` in samples/s).
Timings are wall-clock on whatever else the machine is doing (its load average is printed before
and after): on a shared machine they are provisional.

Examples::

    # the paper's recipe on one GPU (goal: 50K iterations in <= 5 min, GPU-bound)
    python benchmarks/bench_train.py --device cuda --json bench_train_gpu.json
    # a CPU run that finishes in minutes: the full-width model for a few iterations, then tiny nets
    python benchmarks/bench_train.py --device cpu --iterations 5 --loader-batches 10 --identities 40 --utterances 5
    python benchmarks/bench_train.py --device cpu --batch-size 16 --channels 64,32,32,32,32,4 \
        --min-frames 100 --max-frames 200 --frames 200 --iterations 200 --loader-batches 200 \
        --identities 40 --utterances 5 --workers 1 --threads 1

Tiny nets on a busy machine: use ``--threads 1`` (two intra-op threads competing with other
processes made the tiny-net figures about ten times slower on the shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from v2m_models.data import BatchPlanner, CropConfig, DeviceVoiceBatches, FeatureBank, VoiceBatches, make_loader  # noqa: E402
from v2m_models.nets import VOICE_CHANNELS, SpeakerClassifier, SupervisedModel, VoiceEncoder  # noqa: E402
from v2m_models.supervised import SupervisedConfig, SupervisedTask, VoiceEncoderConfig, VoiceEncoderTask  # noqa: E402
from v2m_models.training import fit, make_adam, read_metrics, resolve_amp, resolve_device  # noqa: E402


# ------------------------------------------------------------------------------------- fake build
class _Shard:
    def __init__(self, frames):
        self._f = frames
        self.attrs = {"n_mels": frames.shape[1], "crop_sizes": np.array([64])}

    def features_array(self):
        return self._f


def fake_dataset(n_id: int, per_id: int, mean_frames: int, seed: int = 0):
    """A stand-in for ``open_dataset(...)`` with one random training split (no test split)."""
    rng = np.random.default_rng(seed)
    u = n_id * per_id
    n = np.clip(rng.normal(mean_frames, mean_frames / 4, u), 100, None).astype(np.int64)
    off = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    frames = rng.standard_normal((int(n.sum()), 64), dtype=np.float32)
    ident = np.repeat(np.arange(n_id), per_id)
    m = n_id * 2
    split = SimpleNamespace(
        split="train", shards=[_Shard(frames)], n_identities=n_id, n_utterances=u, n_images=m,
        identities={"name": np.array([f"Fake_{i:05d}" for i in range(n_id)], object)},
        utterances={"identity": ident, "n_frames": n, "shard": np.zeros(u, np.int64), "offset": off,
                    "path": np.array([f"id{i}/v/{k:05d}.wav" for i, k in zip(ident, range(u))], object)},
        images={"identity": np.repeat(np.arange(n_id), 2), "path": np.array([f"x/{k}.jpg" for k in range(m)], object)},
        fit={"shape": rng.normal(0, 1e5, (m, 40)).astype(np.float32), "expression": rng.normal(0, 1, (m, 10)).astype(np.float32),
             "pose": np.zeros((m, 3), np.float32), "residual_normalized": np.full(m, 0.01, np.float32)},
    )
    ds = SimpleNamespace(splits=["train"], manifest=None, references_path=Path("/nonexistent/references.h5"),
                         root=Path("fake"), split=lambda name: split)
    return ds, split


# ------------------------------------------------------------------------------------- measures
def bench_loader(split, kind, device, batch, workers, crop, n_batches):
    bank = FeatureBank(split)
    planner = BatchPlanner(bank.n_frames, batch, crop, seed=0)
    vb = VoiceBatches(bank, planner, labels=split.utterances["identity"])
    if kind == "gpu":
        src = DeviceVoiceBatches(vb, device)
        it = src.iterate(0, n_batches + 3)
    else:
        loader = make_loader(vb, 0, n_batches + 3, workers=workers, pin_memory=device.type == "cuda")
        it = (dict((k, v.to(device, non_blocking=True)) for k, v in b.items()) for b in loader)
    for _ in range(3):  # warm-up: worker start, first allocations
        b = next(it)
    _sync(device)
    t = time.perf_counter()
    for _ in range(n_batches):
        b = next(it)
    _sync(device)
    dt = time.perf_counter() - t
    del b
    return {"batches_per_s": n_batches / dt, "samples_per_s": n_batches * batch / dt}


def bench_step(kind, device, batch, channels, frames, n_iter, amp, n_classes=200):
    torch.manual_seed(0)
    enc = VoiceEncoder(channels)
    model = (SpeakerClassifier(n_classes, enc) if kind == "voice-encoder" else SupervisedModel(enc)).to(device)
    opt = make_adam(model.parameters(), 1e-4, device=device)
    dtype, use_scaler = resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    x = torch.randn(batch, 64, frames, device=device)
    y = torch.randint(0, n_classes, (batch,), device=device)
    t50 = torch.randn(batch, 50, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
            if kind == "voice-encoder":
                loss = torch.nn.functional.cross_entropy(out.float(), y)
            else:
                loss = ((out["coefficients"].float() - t50) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(3):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(n_iter):
        step()
    _sync(device)
    dt = time.perf_counter() - t
    return {"iterations_per_s": n_iter / dt, "samples_per_s": n_iter * batch / dt}


def bench_fit(kind, ds, device, batch, channels, workers, loader, crop, n_iter, amp):
    common = dict(data="fake", iterations=n_iter, batch_size=batch, device=str(device), workers=workers, loader=loader,
                  min_frames=crop.min_frames, max_frames=crop.max_frames, encoder_channels=channels,
                  log_every=max(1, n_iter // 5), val_every=0, ckpt_every=0, progress=False, amp=amp)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "voice-encoder":
            task = VoiceEncoderTask(VoiceEncoderConfig(**common), dataset=ds)
        else:
            task = SupervisedTask(SupervisedConfig(**common), dataset=ds)
        r = fit(task, Path(tmp) / "b.pt")
        m = read_metrics(Path(tmp) / "b.metrics.csv")
    # the logged rates between log points, without the first (loader start-up, first allocations)
    steady = m[(m.phase == "train") & (m.metric == "it_per_s")].value.to_numpy()[1:]
    ips = float(np.median(steady)) if len(steady) else r.iterations_per_s
    return {"iterations_per_s": r.iterations_per_s, "steady_iterations_per_s": ips, "samples_per_s": ips * batch,
            "minutes_for_50k": 50_000 / ips / 60.0}


def bound(step: dict, fit_r: dict, loader: dict) -> dict:
    """Which part bounds the training loop: the model (``fit`` close to ``step``, the loader well
    ahead) or the loader (``fit`` well below ``step`` and the loader not much faster than ``fit``).

    The thresholds (fit >= 0.8 step: model-bound; loader < 1.5 x fit: loader-bound) are rules of
    thumb: the loader runs concurrently with the steps (workers) or in series (the device bank),
    so neither ratio alone decides."""
    f = fit_r["samples_per_s"]
    fs = f / max(step["samples_per_s"], 1e-12)
    lf = loader["samples_per_s"] / max(f, 1e-12)
    if fs >= 0.8:
        verdict = "model"
    elif lf < 1.5:
        verdict = "loader"
    else:
        verdict = "neither alone: per-iteration overhead, or loader and steps competing for the same cores"
    return {"fit_over_step": fs, "loader_over_fit": lf, "bound": verdict}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=30, help="Timed iterations per fit/step measurement.")
    ap.add_argument("--loader-batches", type=int, default=30)
    ap.add_argument("--channels", default=",".join(map(str, VOICE_CHANNELS)))
    ap.add_argument("--identities", type=int, default=200)
    ap.add_argument("--utterances", type=int, default=10, help="Utterances per identity.")
    ap.add_argument("--frames", type=int, default=800, help="Mean frames per utterance.")
    ap.add_argument("--min-frames", type=int, default=300)
    ap.add_argument("--max-frames", type=int, default=800)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loaders", default="cpu,gpu", help="Which loaders to time (gpu = device bank, on --device).")
    ap.add_argument("--trainers", default="voice-encoder,supervised")
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    channels = tuple(int(c) for c in a.channels.split(","))
    crop = CropConfig(a.min_frames, a.max_frames)
    ds, split = fake_dataset(a.identities, a.utterances, a.frames)
    info = {
        "machine": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "batch_size": a.batch_size, "channels": channels, "crop": [a.min_frames, a.max_frames],
        "bank_frames": int(split.utterances["n_frames"].sum()), "workers": a.workers, "amp": a.amp,
    }
    print(json.dumps(info))
    results = {"info": info, "loader": {}, "step": {}, "fit": {}, "bound": {}}
    loaders = [x for x in a.loaders.split(",") if x]
    for kind in loaders:
        r = bench_loader(split, kind, device, a.batch_size, a.workers, crop, a.loader_batches)
        results["loader"][kind] = r
        print(f"loader {kind:>3} ({a.workers} workers): {r['batches_per_s']:8.1f} batches/s {r['samples_per_s']:10.0f} samples/s")
    mid = (a.min_frames + a.max_frames) // 2
    for kind in [x for x in a.trainers.split(",") if x]:
        r = bench_step(kind, device, a.batch_size, channels, mid, a.iterations, a.amp, n_classes=a.identities)
        results["step"][kind] = r
        print(f"step {kind:>13} ({mid} frames): {r['iterations_per_s']:8.2f} it/s {r['samples_per_s']:10.0f} samples/s")
        for loader in loaders:
            r = bench_fit(kind, ds, device, a.batch_size, channels, a.workers, loader, crop, a.iterations, a.amp)
            results["fit"][f"{kind}/{loader}"] = r
            print(f"fit  {kind:>13} loader {loader}: {r['steady_iterations_per_s']:8.2f} it/s "
                  f"{r['samples_per_s']:10.0f} samples/s; 50K iterations: {r['minutes_for_50k']:.1f} min")
            b = bound(results["step"][kind], r, results["loader"][loader])
            results["bound"][f"{kind}/{loader}"] = b
            print(f"bound {kind:>12} loader {loader}: fit/step {b['fit_over_step']:.2f}, loader/fit {b['loader_over_fit']:.1f}"
                  f" -> {b['bound']}")
    info["load_avg_end"] = os.getloadavg()
    print(json.dumps({"load_avg_end": info["load_avg_end"]}))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
