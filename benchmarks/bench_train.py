"""Training speed: loader-only throughput, model-step-only throughput and the full training loop of
each trainer (``v2m-train voice-encoder``, ``supervised``, ``teacher``, ``unsupervised``).

Run from the repository root::

    python benchmarks/bench_train.py [--device cpu|cuda] [--trainers voice-encoder,supervised,teacher,unsupervised]
        [--batch-size N] [--iterations 30] [--channels 64,256,384,576,864,64] [--identities 200]
        [--utterances 10] [--images 2] [--frames 800] [--workers 2] [--loaders cpu,gpu]
        [--width-mult 1.0] [--last-channels 1280] [--student-width 1.0] [--student-last-channels 1280]
        [--generator-channels 1024,512,256,128,64] [--trunk-channels 32,64,128,256,512] [--kd pkt]
        [--threads N] [--json OUT]

No dataset is needed: a random build stands in for a build folder (``--identities`` x
``--utterances`` utterances of about ``--frames`` random log-mel frames, ``--images`` random face
crops (64x64 and 120x120) per identity with random fits), so the figures are those of the code,
not of a disk. The ``unsupervised`` trainer needs a voice encoder and a teacher: both are made in a
temporary folder by one-iteration ``fit`` runs of the voice-encoder and teacher trainers on the
same random build (the networks of ``--channels`` and ``--width-mult``/``--last-channels``; their
weights do not matter for the speed). Its mesh loss needs the morphable model (``--bfm``, else
``$V2M_BFM_DIR`` / the cache); without one it runs with ``mesh_weight=0`` (a 50x50 quadratic form
per sample: no measurable cost) and says so.

Networks are the paper's by default (voice encoder :data:`~v2m_models.nets.VOICE_CHANNELS`,
MobileNetV2 width 1.0 with a 1280-channel last conv for the teacher and the student, Wen et al.'s
generator and critic); the options above make them smaller. The batch is each trainer's default
(128; the unsupervised trainer's paper recipe too) unless ``--batch-size`` sets one for all. Reported, per setting:

- ``loader``: batches/s and samples/s of the batch source alone, including the host-to-device
  copy. For voice-encoder/supervised: the CPU DataLoader with its workers and pinned memory, or
  the device-resident bank with on-device cropping (``cpu``, ``gpu``), shared by both. For
  teacher/unsupervised: the trainer's own ``Task.batches`` (teacher ``cpu``: crops gathered in the
  training process; ``gpu``: crops on the device; unsupervised as the voice trainers, with faces);
- ``step``: iterations/s and samples/s of forward + backward + Adam. Voice-encoder/supervised: one
  fixed batch of the mid crop length already on the device (the model's bound); on CUDA every
  measurement runs with ``fit``'s settings (cuDNN autotuning, TF32). Teacher/unsupervised:
  ``Task.train_step`` on real batches of the trainer, drawn beforehand and already on the device
  (for unsupervised: the critic, generator and student updates with the frozen encoder and teacher
  forward passes and the KD loss). The projected time of the trainer's default iteration count at
  that rate is the model's alone (no loader, no logging);
- ``fit``: iterations/s and samples/s of :func:`v2m_models.training.fit` (loader + steps +
  logging), excluding setup, and the projected time of the trainer's default iteration count
  (50,000; 20,000 for ``teacher``).

The training loop is model-bound (GPU-bound on a GPU) when ``fit`` ≈ ``step`` and ``loader`` is well
above both; a ``bound`` line per fit says which it is (``fit / step`` and ``loader / fit`` in samples/s).
Timings are wall-clock on whatever else the machine is doing (its load average is printed before
and after): on a shared machine they are provisional.

Examples::

    # the paper's recipes on one GPU (goal: 50K iterations in <= 5 min, GPU-bound)
    python benchmarks/bench_train.py --device cuda --json bench_train_gpu.json
    # a CPU run that finishes in minutes: the full-width models for a few iterations, then tiny nets
    python benchmarks/bench_train.py --device cpu --batch-size 8 --iterations 5 --loader-batches 10 \
        --identities 40 --utterances 5 --threads 1
    python benchmarks/bench_train.py --device cpu --batch-size 16 --channels 64,32,32,32,32,4 \
        --min-frames 100 --max-frames 200 --frames 200 --iterations 200 --loader-batches 200 \
        --identities 40 --utterances 5 --workers 1 --threads 1 --trainers voice-encoder,supervised
    # the image trainers with small networks
    python benchmarks/bench_train.py --device cpu --trainers teacher,unsupervised --batch-size 8 \
        --width-mult 0.25 --last-channels 32 --student-width 0.25 --student-last-channels 32 \
        --generator-channels 32,16,16,8,8 --trunk-channels 8,8,8,8,8 --channels 64,32,32,32,32,4 \
        --identities 40 --utterances 5 --iterations 20 --threads 1

Tiny nets on a busy machine: use ``--threads 1`` (two intra-op threads competing with other
processes made the tiny-net figures about ten times slower on the shared 2-core machine).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from v2m_models.teacher import TeacherConfig, TeacherTask, usable_bfm  # noqa: E402
from v2m_models.training import (  # noqa: E402
    DistEnv,
    Run,
    fit,
    make_adam,
    read_metrics,
    resolve_amp,
    resolve_device,
    seed_everything,
)
from v2m_models.unsupervised import GENERATOR_CHANNELS, TRUNK_CHANNELS, UnsupervisedConfig, UnsupervisedTask  # noqa: E402

TRAINERS = ("voice-encoder", "supervised", "teacher", "unsupervised")
CONFIGS = {"voice-encoder": VoiceEncoderConfig, "supervised": SupervisedConfig, "teacher": TeacherConfig,
           "unsupervised": UnsupervisedConfig}


def config_default(kind: str, name: str):
    """The default of config field ``name`` of trainer ``kind`` (e.g. its iterations or batch size)."""
    return {f.name: f.default for f in dataclasses.fields(CONFIGS[kind])}[name]


# ------------------------------------------------------------------------------------- fake build
class _Shard:
    def __init__(self, frames, crop_sizes=(64,)):
        self._f = frames
        self.attrs = {"n_mels": frames.shape[1], "crop_sizes": np.array(sorted(set(crop_sizes)))}

    def features_array(self):
        return self._f


def fake_dataset(n_id: int, per_id: int, mean_frames: int, seed: int = 0, images_per_id: int = 2,
                 crop_sizes=(64, 120)):
    """A stand-in for ``open_dataset(...)`` with one random training split (no test split).

    Utterances of random frames; ``images_per_id`` images per identity with random face crops of
    ``crop_sizes`` (``split.crops``) and random converged fits (shape, expression, camera, crop box)."""
    rng = np.random.default_rng(seed)
    u = n_id * per_id
    n = np.clip(rng.normal(mean_frames, mean_frames / 4, u), 100, None).astype(np.int64)
    off = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    frames = rng.standard_normal((int(n.sum()), 64), dtype=np.float32)
    ident = np.repeat(np.arange(n_id), per_id)
    m = n_id * int(images_per_id)
    # a camera per image: ~200 px faces in a 256 px image, small random rotations
    ang = rng.uniform(-0.3, 0.3, (m, 3))
    rot = np.empty((m, 3, 3))
    for k, (a, b, c) in enumerate(ang):
        ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
        rot[k] = (np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])
                  @ np.array([[ca, 0, sa], [0, 1, 0], [-sa, 0, ca]]))
    centre = rng.uniform(110, 146, (m, 2))
    half = rng.uniform(80, 110, (m, 1))
    crop_cache: dict = {}

    def crops(indices, size: int = 64):
        if int(size) not in crop_cache:
            crop_cache[int(size)] = np.random.default_rng([seed, int(size)]).integers(0, 256, (m, size, size, 3), np.uint8)
        return crop_cache[int(size)][np.atleast_1d(np.asarray(indices, np.int64))]

    split = SimpleNamespace(
        split="train", shards=[_Shard(frames, crop_sizes)], n_identities=n_id, n_utterances=u, n_images=m,
        identities={"name": np.array([f"Fake_{i:05d}" for i in range(n_id)], object)},
        utterances={"identity": ident, "n_frames": n, "shard": np.zeros(u, np.int64), "offset": off,
                    "path": np.array([f"id{i}/v/{k:05d}.wav" for i, k in zip(ident, range(u))], object)},
        images={"identity": np.repeat(np.arange(n_id), images_per_id), "path": np.array([f"x/{k}.jpg" for k in range(m)], object),
                "crop_box": np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)},
        fit={"shape": rng.normal(0, 1e5, (m, 40)).astype(np.float32), "expression": rng.normal(0, 1, (m, 10)).astype(np.float32),
             "pose": np.zeros((m, 3), np.float32), "residual_normalized": np.full(m, 0.01, np.float32),
             "scale": rng.uniform(8e-4, 1.2e-3, m).astype(np.float32), "rotation": rot.astype(np.float32),
             "translation": centre.astype(np.float32), "converged": np.ones(m, bool)},
        crops=crops,
    )
    ds = SimpleNamespace(splits=["train"], manifest=None, references_path=Path("/nonexistent/references.h5"),
                         root=Path("fake"), split=lambda name: split)
    return ds, split


# ------------------------------------------------------------------------------------- trainers
def trainer_config(kind: str, a, device, *, batch: int, iterations: int, loader: str = "cpu", workers: int | None = None,
                   log_every: int = 0, ckpts=None, **over):
    """The config of trainer ``kind`` for a benchmark run on the fake build (validation and
    intermediate checkpoints off; networks from the command line)."""
    common = dict(data="fake", iterations=iterations, batch_size=batch, device=str(device),
                  workers=a.workers if workers is None else workers, loader=loader, min_frames=a.min_frames,
                  max_frames=a.max_frames, log_every=log_every, val_every=0, ckpt_every=0, progress=False, amp=a.amp)
    channels = tuple(int(c) for c in a.channels.split(","))
    if kind == "voice-encoder":
        kw = dict(common, encoder_channels=channels, val_train_utterances=0)
    elif kind == "supervised":
        kw = dict(common, encoder_channels=channels)
    elif kind == "teacher":
        kw = dict(common, width_mult=a.width_mult, last_channels=a.last_channels, face_size=a.face_size,
                  input_size=a.input_size)
    elif kind == "unsupervised":
        kw = dict(common, encoder=str(ckpts.encoder), teacher=str(ckpts.teacher), kd=a.kd,
                  student_width=a.student_width, student_last_channels=a.student_last_channels,
                  generator_channels=tuple(int(c) for c in a.generator_channels.split(",")),
                  trunk_channels=tuple(int(c) for c in a.trunk_channels.split(",")), bfm=a.bfm,
                  **({} if ckpts.mesh else {"mesh_weight": 0.0}))
    else:
        raise SystemExit(f"unknown trainer {kind!r} (choose from {', '.join(TRAINERS)})")
    kw.update(over)
    return CONFIGS[kind](**kw)


def make_task(cfg, ds):
    kind = {VoiceEncoderConfig: VoiceEncoderTask, SupervisedConfig: SupervisedTask, TeacherConfig: TeacherTask,
            UnsupervisedConfig: UnsupervisedTask}[type(cfg)]
    return kind(cfg, dataset=ds)


def pretrained_parts(a, ds, device, folder: Path):
    """A voice encoder and a teacher checkpoint for the unsupervised trainer: one-iteration ``fit``
    runs (batch 4, the shortest crops) of the voice-encoder and teacher trainers on the fake build,
    with the networks of the command line; and whether the mesh loss can run (a morphable model)."""
    enc, teacher = folder / "encoder.pt", folder / "teacher.pt"
    fit(make_task(trainer_config("voice-encoder", a, device, batch=4, iterations=1, workers=0,
                                 max_frames=a.min_frames), ds), enc)
    fit(make_task(trainer_config("teacher", a, device, batch=4, iterations=1, workers=0), ds), teacher)
    mesh = usable_bfm(a.bfm, ds) is not None
    return SimpleNamespace(encoder=enc, teacher=teacher, mesh=mesh)


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


def bench_task_loader(task, n_batches):
    """Batches/s and samples/s of ``task.batches`` alone (3 warm-up batches), including the copy to the device."""
    cfg = task.config
    dev = resolve_device(cfg.device)
    run = Run(cfg, DistEnv(), dev)
    it = task.batches(run, 0, n_batches + 3)
    try:
        for _ in range(3):
            b = next(it)
        _sync(dev)
        t = time.perf_counter()
        for _ in range(n_batches):
            b = next(it)
        _sync(dev)
        dt = time.perf_counter() - t
        del b
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    n = task.samples_per_iteration()
    return {"batches_per_s": n_batches / dt, "samples_per_s": n_batches * n / dt}


def seconds_per_step(task, n=10, warmup=2):
    """Mean seconds of ``task.train_step`` over ``n`` iterations after ``warmup``, on batches of the
    trainer drawn beforehand (already on the device): the model's bound, without the loader.

    Same device settings as :func:`v2m_models.training.fit` (seed, cuDNN autotuning and TF32 on CUDA)."""
    cfg = task.config
    dev = resolve_device(cfg.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    run = Run(cfg, DistEnv(), dev)
    task.setup(run)
    for m in task.modules.values():
        m.train()
    src = task.batches(run, 0, warmup + n)
    try:
        batches = [next(src) for _ in range(warmup + n)]
    finally:
        close = getattr(src, "close", None)
        if close is not None:
            close()
    for i in range(warmup):
        run.iteration = i
        task.train_step(batches[i], run)
    _sync(dev)
    t = time.perf_counter()
    for i in range(warmup, warmup + n):
        run.iteration = i
        task.train_step(batches[i], run)
    _sync(dev)
    return (time.perf_counter() - t) / n


def bench_task_step(task, n_iter, warmup=2):
    s = seconds_per_step(task, n_iter, warmup)
    kind = _kind_of(task.config)
    total = config_default(kind, "iterations")
    return {"iterations_per_s": 1.0 / s, "samples_per_s": task.samples_per_iteration() / s,
            "default_iterations": total, "minutes_for_default": total * s / 60.0}


def _kind_of(cfg) -> str:
    return next(k for k, c in CONFIGS.items() if type(cfg) is c)


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
    total = config_default(kind, "iterations")
    return {"iterations_per_s": n_iter / dt, "samples_per_s": n_iter * batch / dt,
            "default_iterations": total, "minutes_for_default": total * dt / n_iter / 60.0}


def bench_fit(cfg, ds):
    """Iterations/s of :func:`v2m_models.training.fit` of the config's trainer (setup excluded)."""
    n_iter, batch = int(cfg.iterations), int(cfg.batch_size)
    cfg = dataclasses.replace(cfg, log_every=max(1, n_iter // 5))
    with tempfile.TemporaryDirectory() as tmp:
        r = fit(make_task(cfg, ds), Path(tmp) / "b.pt")
        m = read_metrics(Path(tmp) / "b.metrics.csv")
    # the logged rates between log points, without the first (loader start-up, first allocations)
    steady = m[(m.phase == "train") & (m.metric == "it_per_s")].value.to_numpy()[1:]
    ips = float(np.median(steady)) if len(steady) else r.iterations_per_s
    total = config_default(_kind_of(cfg), "iterations")
    return {"iterations_per_s": r.iterations_per_s, "steady_iterations_per_s": ips, "samples_per_s": ips * batch,
            "minutes_for_50k": 50_000 / ips / 60.0, "default_iterations": total, "minutes_for_default": total / ips / 60.0}


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


def _k(n: int) -> str:
    return f"{n // 1000}K" if n % 1000 == 0 else str(n)


# ------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="Batch of every trainer (default: each trainer's own, 128).")
    ap.add_argument("--iterations", type=int, default=30, help="Timed iterations per fit/step measurement.")
    ap.add_argument("--loader-batches", type=int, default=30)
    ap.add_argument("--channels", default=",".join(map(str, VOICE_CHANNELS)),
                    help="Voice-encoder widths (voice-encoder, supervised, and the unsupervised trainer's frozen encoder).")
    ap.add_argument("--identities", type=int, default=200)
    ap.add_argument("--utterances", type=int, default=10, help="Utterances per identity.")
    ap.add_argument("--images", type=int, default=2, help="Face images per identity (teacher, unsupervised).")
    ap.add_argument("--frames", type=int, default=800, help="Mean frames per utterance.")
    ap.add_argument("--min-frames", type=int, default=300)
    ap.add_argument("--max-frames", type=int, default=800)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loaders", default="cpu,gpu", help="Which loaders to time (gpu = device bank, on --device).")
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument("--width-mult", type=float, default=1.0, help="Teacher MobileNetV2 width (also the unsupervised teacher).")
    ap.add_argument("--last-channels", type=int, default=None, help="Teacher last conv width (default 1280).")
    ap.add_argument("--face-size", type=int, default=120, help="Teacher's stored crop size (120; 64 = upsampled 64x64 crops).")
    ap.add_argument("--input-size", type=int, default=120, help="Teacher network input size.")
    ap.add_argument("--student-width", type=float, default=1.0)
    ap.add_argument("--student-last-channels", type=int, default=None, help="Student last conv width (default 1280).")
    ap.add_argument("--generator-channels", default=",".join(map(str, GENERATOR_CHANNELS)))
    ap.add_argument("--trunk-channels", default=",".join(map(str, TRUNK_CHANNELS)))
    ap.add_argument("--kd", default="pkt", help="Unsupervised distillation loss.")
    ap.add_argument("--bfm", default=None, help="Morphable model for the unsupervised mesh loss (default: $V2M_BFM_DIR / cache).")
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    trainers = [x for x in a.trainers.split(",") if x]
    for t in trainers:
        if t not in TRAINERS:
            ap.error(f"unknown trainer {t!r} (choose from {', '.join(TRAINERS)})")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    if device.type == "cuda":  # what fit sets; set here once so every measurement (and their order) sees it
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    channels = tuple(int(c) for c in a.channels.split(","))
    crop = CropConfig(a.min_frames, a.max_frames)
    ds, split = fake_dataset(a.identities, a.utterances, a.frames, images_per_id=a.images,
                             crop_sizes=(64, 120, a.face_size))
    batch_of = {t: int(a.batch_size or config_default(t, "batch_size")) for t in TRAINERS}
    info = {
        "machine": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "batch_size": a.batch_size or config_default("voice-encoder", "batch_size"),
        "batch_sizes": {t: batch_of[t] for t in trainers}, "trainers": trainers, "channels": channels,
        "crop": [a.min_frames, a.max_frames], "bank_frames": int(split.utterances["n_frames"].sum()),
        "images": int(split.n_images), "workers": a.workers, "amp": a.amp,
        "teacher": {"width_mult": a.width_mult, "last_channels": a.last_channels, "face_size": a.face_size,
                    "input_size": a.input_size},
        "unsupervised": {"kd": a.kd, "student_width": a.student_width, "student_last_channels": a.student_last_channels,
                         "generator_channels": a.generator_channels, "trunk_channels": a.trunk_channels},
    }
    print(json.dumps(info))
    results = {"info": info, "loader": {}, "step": {}, "fit": {}, "bound": {}}
    loaders = [x for x in a.loaders.split(",") if x]
    voice = [t for t in trainers if t in ("voice-encoder", "supervised")]
    for kind in loaders if voice else []:
        b = batch_of[voice[0]]
        r = bench_loader(split, kind, device, b, a.workers, crop, a.loader_batches)
        results["loader"][kind] = r
        print(f"loader {kind:>3} ({a.workers} workers): {r['batches_per_s']:8.1f} batches/s {r['samples_per_s']:10.0f} samples/s")
    mid = (a.min_frames + a.max_frames) // 2
    with tempfile.TemporaryDirectory() as parts_dir:
        ckpts = None
        if "unsupervised" in trainers:
            t = time.perf_counter()
            ckpts = pretrained_parts(a, ds, device, Path(parts_dir))
            info["unsupervised"]["mesh_loss"] = ckpts.mesh
            print(f"unsupervised: encoder and teacher checkpoints made by one-iteration fits in {time.perf_counter() - t:.1f} s"
                  + ("" if ckpts.mesh else "; no morphable model found (--bfm / $V2M_BFM_DIR): mesh_weight 0"))
        for kind in trainers:
            b = batch_of[kind]
            total = config_default(kind, "iterations")
            if kind in ("voice-encoder", "supervised"):
                r = bench_step(kind, device, b, channels, mid, a.iterations, a.amp, n_classes=a.identities)
                what = f"({mid} frames)"
                kind_loaders = {ld: results["loader"][ld] for ld in loaders}
            else:
                kind_loaders = {}
                for ld in loaders:
                    cfg = trainer_config(kind, a, device, batch=b, iterations=a.loader_batches + 3, loader=ld, ckpts=ckpts)
                    lr_ = bench_task_loader(make_task(cfg, ds), a.loader_batches)
                    results["loader"][f"{kind}/{ld}"] = kind_loaders[ld] = lr_
                    note = f" ({a.workers} workers)" if kind == "unsupervised" and ld == "cpu" else ""
                    print(f"loader {kind:>13} {ld:>3}{note}: {lr_['batches_per_s']:8.1f} batches/s "
                          f"{lr_['samples_per_s']:10.0f} samples/s")
                cfg = trainer_config(kind, a, device, batch=b, iterations=a.iterations + 2, workers=0, ckpts=ckpts)
                r = bench_task_step(make_task(cfg, ds), a.iterations)
                what = "(train_step)"
            results["step"][kind] = r
            print(f"step {kind:>13} {what}: {r['iterations_per_s']:8.2f} it/s {r['samples_per_s']:10.0f} samples/s "
                  f"(batch {b}); {_k(total)} iterations: {r['minutes_for_default']:.1f} min (step only)")
            for loader in loaders:
                cfg = trainer_config(kind, a, device, batch=b, iterations=a.iterations, loader=loader, ckpts=ckpts)
                r = bench_fit(cfg, ds)
                results["fit"][f"{kind}/{loader}"] = r
                print(f"fit  {kind:>13} loader {loader}: {r['steady_iterations_per_s']:8.2f} it/s "
                      f"{r['samples_per_s']:10.0f} samples/s; {_k(total)} iterations: {r['minutes_for_default']:.1f} min")
                bd = bound(results["step"][kind], r, kind_loaders[loader])
                results["bound"][f"{kind}/{loader}"] = bd
                print(f"bound {kind:>12} loader {loader}: fit/step {bd['fit_over_step']:.2f}, loader/fit {bd['loader_over_fit']:.1f}"
                      f" -> {bd['bound']}")
    info["load_avg_end"] = os.getloadavg()
    print(json.dumps({"load_avg_end": info["load_avg_end"]}))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
