"""Training infrastructure shared by every voice2mesh trainer.

A trainer is a :class:`Task` (its models, optimisers, batches, one training step, a validation)
run by :func:`fit`, the generic loop. The loop owns everything that is not specific to a model:

- **device and precision**: CUDA when available (``device="auto"``), else CPU; on CUDA mixed
  precision with ``torch.autocast`` (bf16 when the GPU supports it, else fp16 with a
  ``GradScaler``; ``amp="off"`` for float32); CPU runs in float32.
- **multi-GPU**: launched with ``torchrun --nproc-per-node N v2m-train ...``, the loop reads
  ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (:func:`dist_env`), initialises the process group (NCCL
  on CUDA, gloo on CPU), puts each rank on ``cuda:LOCAL_RANK`` and lets the task wrap its trained
  modules in ``DistributedDataParallel`` (:meth:`Run.wrap`). ``batch_size`` is the global batch:
  each rank gets ``batch_size / world_size`` samples, the slice of the batch one process would
  have drawn (:class:`v2m_models.data.BatchPlanner`). Validation, logging and checkpoints happen
  on rank 0 only; before each, the BatchNorm running statistics are averaged over the ranks.
- **checkpoints** (:func:`save_checkpoint`, atomic: a temporary file in the same folder, fsync,
  ``os.replace``) every ``ckpt_every`` iterations and at the end, holding the models, optimisers,
  grad scalers, RNG states, the iteration, the config (a dataclass, stored as a dict with its
  class name) and the task's own state (e.g. the coefficient statistics). ``resume=True``
  continues from the checkpoint at ``out``; because every batch is a pure function of
  ``(seed, iteration)``, training N iterations equals training N/2 and resuming for N/2 (exactly,
  on the same device and thread count).
- **validation** every ``val_every`` iterations and at the end (:meth:`Task.validate`, e.g. the
  bench's ARE on the test references);
- **logging**: a tqdm progress bar, and a CSV metrics log in long format
  (``iteration,phase,metric,value,elapsed_s``; phases ``train`` and ``val``; rows past the resumed
  iteration are dropped on resume) next to the checkpoint (``<out stem>.metrics.csv``).

Checkpoint format (``torch.save`` of a dict, loadable with ``torch.load(weights_only=True)``)
-----------------------------------------------------------------------------------------------
::

    format      "v2m-checkpoint"          version     1
    kind        "voice-encoder" | "supervised" | ... (the task)
    predictor   "module:function" under v2m_models that loads a predictor for this kind, or ""
    config      dict of the config dataclass       config_class  "module.ClassName"
    iteration   iterations done                    complete      iteration >= config iterations
    modules     {name: state_dict}                 optimizers    {name: state_dict}
    scalers     {name: GradScaler state_dict}      rng           torch / cuda / python / numpy states
    task        the task's state (:meth:`Task.state_dict`)
    metrics     the last validation's metrics      versions      torch, voice2mesh, python
    world_size  processes that trained it

Writing a new trainer
---------------------
Subclass :class:`Task`; in :meth:`Task.setup` build the models on ``run.device``, register them
in ``self.modules`` (unwrapped, for checkpoints) and the optimisers in ``self.optimizers``
(:func:`make_adam` picks the fused CUDA kernel); wrap what is trained with ``run.wrap`` for DDP.
:meth:`Task.batches` yields the batches of iterations ``start..stop-1`` (use
:func:`v2m_models.data.make_loader` or a :class:`v2m_models.data.DeviceVoiceBatches`);
:meth:`Task.train_step` runs forward passes under ``run.autocast()`` and updates with
``run.optimize(loss, "name")`` (scaling, unscaling, clipping, stepping), returning detached
0-d tensors to log. The loop only synchronises with the device at log time.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from v2m_bench.errors import ValidationError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "RUNTIME_FIELDS",
    "TrainConfig",
    "DistEnv",
    "dist_env",
    "resolve_device",
    "resolve_amp",
    "Run",
    "Task",
    "FitResult",
    "fit",
    "make_adam",
    "save_checkpoint",
    "load_checkpoint",
    "load_weights",
    "config_to_dict",
    "config_from_dict",
    "metrics_path",
    "read_metrics",
    "seed_everything",
]

CHECKPOINT_FORMAT = "v2m-checkpoint"
CHECKPOINT_VERSION = 1

#: Config fields that may differ on resume (they do not change what is computed, or only extend it;
#: ``data`` may move, the task checks that it holds the same identities).
RUNTIME_FIELDS = frozenset(
    {"data", "iterations", "device", "amp", "loader", "bank_dtype", "workers", "log_every", "val_every", "ckpt_every",
     "progress", "metrics", "bfm", "val_batch_size", "compile"}
)


# ------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Options every trainer has (subclasses add their own).

    Attributes
    ----------
    data : str
        Build folder (``v2m-build-dataset --out``).
    iterations : int
        Optimiser steps in all (50,000 as the paper).
    batch_size : int
        Global batch (over all DDP ranks); 128 as the paper.
    lr : float
        Adam learning rate.
    betas : tuple of float
        Adam betas.
    weight_decay : float
    grad_clip : float
        Clip the gradient norm to this (0: no clipping).
    seed : int
        Model initialisation, batches and crops all follow from it.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    amp : {"auto", "bf16", "fp16", "off"}
        Mixed precision on CUDA (``auto``: bf16 when supported, else fp16); CPU always float32.
    loader : {"cpu", "gpu"}
        ``cpu``: DataLoader workers cut crops from the RAM bank and pin them; ``gpu``: the feature
        bank lives on the device and crops are cut there (:class:`~v2m_models.data.DeviceVoiceBatches`).
    bank_dtype : {"float32", "float16"}
        Storage of the device bank (``loader="gpu"``).
    workers : int
        DataLoader workers (``loader="cpu"``).
    min_frames, max_frames : int
        Crop length range (frames).
    sampling : {"utterance", "identity"}
    log_every, val_every, ckpt_every : int
        Iterations between log rows, validations and checkpoints (0: only at the end).
    val_batch_size : int
        Whole utterances per forward pass in validation.
    metrics : str, optional
        CSV metrics log (default: next to the checkpoint, ``<stem>.metrics.csv``).
    progress : bool
        A progress bar (rank 0; tqdm, hidden when stderr is not a terminal).
    bfm : str, optional
        Model for geometric validation metrics (default: ``$V2M_BFM_DIR``, the build's, the cache).
    compile : bool
        ``torch.compile`` the trained modules (CUDA).
    """

    data: str = ""
    iterations: int = 50_000
    batch_size: int = 128
    lr: float = 2e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    loader: str = "cpu"
    bank_dtype: str = "float32"
    workers: int = 2
    min_frames: int = 300
    max_frames: int = 800
    sampling: str = "utterance"
    log_every: int = 50
    val_every: int = 2000
    ckpt_every: int = 2000
    val_batch_size: int = 16
    metrics: str | None = None
    progress: bool = True
    bfm: str | None = None
    compile: bool = False

    def __post_init__(self):
        def bad(k, why):
            raise ValidationError(why, key=k)

        for k in ("iterations", "batch_size"):
            if int(getattr(self, k)) < 1:
                bad(k, f"must be >= 1, got {getattr(self, k)}")
        for k in ("workers", "log_every", "val_every", "ckpt_every", "seed"):
            if int(getattr(self, k)) < 0:
                bad(k, f"must be >= 0, got {getattr(self, k)}")
        if not (float(self.lr) > 0 and np.isfinite(self.lr)):
            bad("lr", f"must be a positive number, got {self.lr}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            bad("amp", f"must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.loader not in ("cpu", "gpu"):
            bad("loader", f"must be cpu or gpu, got {self.loader!r}")
        if self.bank_dtype not in ("float32", "float16", "bfloat16"):
            bad("bank_dtype", f"must be float32, float16 or bfloat16, got {self.bank_dtype!r}")
        if self.sampling not in ("utterance", "identity"):
            bad("sampling", f"must be utterance or identity, got {self.sampling!r}")
        if not 1 <= int(self.min_frames) <= int(self.max_frames):
            bad("min_frames", f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        self.betas = tuple(float(b) for b in self.betas)


def config_to_dict(config) -> dict:
    """A config dataclass as a plain dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls, d: dict, **overrides):
    """Rebuild a config dataclass ``cls`` from :func:`config_to_dict` output (unknown keys ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    kw.update(overrides)
    return cls(**kw)


# ------------------------------------------------------------------------------------- environment
@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(environ=None) -> DistEnv:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (as torchrun sets them)."""
    env = os.environ if environ is None else environ
    try:
        ws = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValidationError(f"bad torchrun environment: {e}", key="RANK/WORLD_SIZE/LOCAL_RANK") from None
    if ws < 1 or not 0 <= rank < ws or local < 0:
        raise ValidationError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={ws} LOCAL_RANK={local}", key="RANK")
    return DistEnv(rank=rank, world_size=ws, local_rank=local)


def resolve_device(name: str, env: DistEnv = DistEnv()):
    """The torch device for ``name`` ("auto", "cpu", "cuda", "cuda:N"); under DDP on CUDA, ``cuda:LOCAL_RANK``."""
    import torch

    name = str(name or "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValidationError(f"not a torch device: {name!r}", key="device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValidationError("CUDA was asked for but is not available", key="device")
        if env.distributed or dev.index is None:
            dev = torch.device("cuda", env.local_rank if env.distributed else (dev.index or 0))
    return dev


def resolve_amp(amp: str, device):
    """(autocast dtype or None, use a GradScaler) for ``amp`` on ``device``."""
    import torch

    if device.type != "cuda" or amp == "off":
        return None, False
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (torch.bfloat16, False) if amp == "bf16" else (torch.float16, True)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's legacy generator and Python's ``random``."""
    import torch

    torch.manual_seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    random.seed(int(seed))


def make_adam(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, device=None):
    """Adam with the fused CUDA kernel on CUDA (one launch per step), the default kernel elsewhere."""
    import torch

    params = [p for p in params if p.requires_grad]
    fused = device is not None and getattr(device, "type", str(device)) == "cuda"
    kw = {"fused": True} if fused else {}
    return torch.optim.Adam(params, lr=float(lr), betas=tuple(betas), weight_decay=float(weight_decay), **kw)


# ------------------------------------------------------------------------------------- run context
class Run:
    """What a :class:`Task` sees of the loop: device, precision, distribution and the update step.

    Attributes
    ----------
    config : TrainConfig
    env : DistEnv
    device : torch.device
    amp_dtype : torch.dtype or None
        The autocast dtype (None: float32).
    iteration : int
        The iteration being run (0-based).
    log : callable
        ``log(str)``: a message for the user (rank 0 only).
    """

    def __init__(self, config: TrainConfig, env: DistEnv, device, log: Callable[[str], None] = lambda s: None):
        import torch

        self.config = config
        self.env = env
        self.device = device
        self.amp_dtype, self._use_scaler = resolve_amp(config.amp, device)
        self.iteration = 0
        self._scalers: dict = {}
        self._log = log
        self._torch = torch

    def log(self, msg: str) -> None:
        if self.env.is_main:
            self._log(msg)

    def autocast(self):
        """Context manager: mixed precision on CUDA (per ``config.amp``), nothing on CPU."""
        if self.amp_dtype is None:
            return nullcontext()
        return self._torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def scaler(self, name: str):
        """The GradScaler of optimiser ``name`` (a disabled pass-through unless fp16 on CUDA)."""
        if name not in self._scalers:
            self._scalers[name] = self._torch.amp.GradScaler(self.device.type, enabled=self._use_scaler)
        return self._scalers[name]

    def wrap(self, module, **ddp_kwargs):
        """``module`` in DistributedDataParallel when distributed (else itself); compiled with ``config.compile``."""
        m = module
        if self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            m = DDP(m, device_ids=ids, **ddp_kwargs)
        if self.config.compile:
            m = self._torch.compile(m)
        return m

    def optimize(self, loss, name: str, optimizer, parameters=None) -> None:
        """Backward ``loss`` and step ``optimizer`` (grad scaling, optional clipping, zeroing).

        Parameters
        ----------
        loss : 0-d tensor
        name : str
            Which scaler (one per optimiser, or per group of optimisers stepped together).
        optimizer : torch.optim.Optimizer or sequence of them
            Several optimisers share the one backward pass and the scaler ``name`` (e.g. a
            generator trained jointly with the network fed its images).
        parameters : iterable of tensors, optional
            What to clip (default: the optimisers' parameters) when ``config.grad_clip > 0``.
        """
        scaler = self.scaler(name)
        opts = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        for o in opts:
            o.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.config.grad_clip > 0:
            for o in opts:
                scaler.unscale_(o)
            params = parameters if parameters is not None else [p for o in opts for g in o.param_groups for p in g["params"]]
            self._torch.nn.utils.clip_grad_norm_(params, float(self.config.grad_clip))
        for o in opts:
            scaler.step(o)
        scaler.update()

    def barrier(self) -> None:
        if self.env.distributed:
            import torch.distributed as dist

            dist.barrier()


class Task:
    """One trainer (subclass it). See the module docstring.

    Attributes
    ----------
    kind : str
        Written to checkpoints; selects the predictor.
    predictor : str
        ``"v2m_models.<module>:<function>"`` loading a predictor from a checkpoint dict ("" if none).
    config : TrainConfig
    modules : dict of str to nn.Module
        Unwrapped models (saved in checkpoints).
    optimizers : dict of str to Optimizer
    """

    kind: str = ""
    predictor: str = ""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.modules: dict = {}
        self.optimizers: dict = {}

    def setup(self, run: Run) -> None:
        """Build models and optimisers on ``run.device`` (called once, before any state is loaded)."""
        raise NotImplementedError

    def batches(self, run: Run, start: int, stop: int) -> Iterator[dict]:
        """Batches of iterations ``start .. stop - 1``, in order (tensors on any device)."""
        raise NotImplementedError

    def train_step(self, batch: dict, run: Run) -> dict:
        """One iteration; returns detached 0-d tensors to log (e.g. ``{"loss": loss.detach()}``)."""
        raise NotImplementedError

    def validate(self, run: Run) -> dict:
        """Validation metrics (floats); called on rank 0 with the modules in train mode (restore it)."""
        return {}

    def state_dict(self) -> dict:
        """Task state for the checkpoint (what a predictor or a resume needs beyond the modules)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` on resume (after :meth:`setup`)."""

    def samples_per_iteration(self) -> int:
        return int(self.config.batch_size)

    def close(self) -> None:
        """Release loaders etc."""


# ------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    import torch

    py = random.getstate()
    npst = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [str(npst[0]), npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: dict) -> None:
    import torch

    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        v, inner, g = state["python"]
        random.setstate((v, tuple(inner), g))
    if "numpy" in state:
        a, keys, pos, has, cached = state["numpy"]
        np.random.set_state((a, np.asarray(keys, np.uint32), pos, has, cached))
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):  # a different number of GPUs: keep the fresh state
            pass


def save_checkpoint(path, payload: dict) -> Path:
    """Write ``payload`` with ``torch.save`` atomically (temporary file, fsync, ``os.replace``)."""
    import torch

    from v2m_bench.fileio import write_bytes

    buf = io.BytesIO()
    torch.save(payload, buf)
    return write_bytes(path, buf.getvalue())


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read and validate a voice2mesh checkpoint (``torch.load(weights_only=True)``: no code runs).

    Raises
    ------
    ValidationError
        Missing, empty, damaged, holding pickled code (refused, never run), not a voice2mesh
        checkpoint of a version this code reads, with fields of the wrong type, or with NaN or
        infinite weights. One line naming the file and the field.
    """
    import pickle

    import torch

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ValidationError("no such checkpoint", path=where)
    if path.stat().st_size == 0:
        raise ValidationError("is empty (0 bytes), not a checkpoint", path=where)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        m = re.search(r"(?:unsupported|Unsupported global:?) GLOBAL ([\w.]+)", text)
        if m or "nsupported" in text:
            what = f" ({m.group(1)})" if m else ""
            raise ValidationError(f"holds pickled code or objects other than weights{what}; refused: checkpoints "
                                  "are only ever loaded as plain weights, never run", path=where) from None
        raise ValidationError(f"cannot read the checkpoint (damaged or not a torch file): {_after(text)}",
                              path=where) from None
    except Exception as e:  # noqa: BLE001 - any other failure is a bad file
        text = " ".join(str(e).split()) or type(e).__name__
        raise ValidationError(f"cannot read the checkpoint (truncated, damaged or not a torch file): {text[:200]}",
                              path=where) from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValidationError(f"not a {CHECKPOINT_FORMAT} file", path=where)
    version = ck.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValidationError(f"expected an integer, found {version!r}", path=where, key="version")
    if version > CHECKPOINT_VERSION:
        raise ValidationError(f"version {version} is newer than this code ({CHECKPOINT_VERSION})", path=where)
    for k in ("kind", "config", "modules", "iteration"):
        if k not in ck:
            raise ValidationError("incomplete checkpoint", path=where, key=k)
    for k, typ in (("kind", str), ("config", dict), ("modules", dict), ("iteration", int)):
        if not isinstance(ck[k], typ) or isinstance(ck[k], bool):
            article = "an" if typ.__name__[0] in "aeiou" else "a"
            raise ValidationError(f"expected {article} {typ.__name__}, found {type(ck[k]).__name__}", path=where, key=k)
    if not isinstance(ck.get("predictor", ""), str):
        raise ValidationError(f"expected a str, found {type(ck['predictor']).__name__}", path=where, key="predictor")
    for name, state in ck["modules"].items():
        if not isinstance(state, dict):
            raise ValidationError(f"expected a dict of tensors, found {type(state).__name__}", path=where,
                                  key=f"modules.{name}")
        for tname, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise ValidationError(f"expected a tensor, found {type(t).__name__}", path=where,
                                      key=f"modules.{name}.{tname}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValidationError("holds NaN or infinite weights (the training diverged?)", path=where,
                                      key=f"modules.{name}.{tname}")
    return ck


def _after(text: str) -> str:
    """The reason in a torch.load error, without torch's advice to turn weights_only off."""
    for marker in ("WeightsUnpickler error:", "Do it only if you got the file from a trusted source."):
        if marker in text:
            text = text.split(marker, 1)[1].strip()
    return text.split(" Check the documentation")[0][:200] or "unreadable"


def load_weights(module, state: dict, *, path=None, key: str = "modules") -> None:
    """``module.load_state_dict(state)`` with a one-line :class:`ValidationError` on a mismatch."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        raise ValidationError(f"the weights do not fit the model: {detail[:300]}", path=None if path is None else str(path),
                              key=key) from None


def _versions() -> dict:
    import torch

    try:
        from importlib.metadata import version

        v2m = version("voice2mesh")
    except Exception:  # noqa: BLE001
        v2m = "unknown"
    return {"torch": str(torch.__version__), "voice2mesh": str(v2m), "python": str(platform.python_version())}


def _payload(task: Task, run: Run, iteration: int, metrics: dict) -> dict:
    cfg = task.config
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": task.kind,
        "predictor": task.predictor,
        "config": config_to_dict(cfg),
        "config_class": f"{type(cfg).__module__}.{type(cfg).__qualname__}",
        "iteration": int(iteration),
        "complete": bool(iteration >= cfg.iterations),
        "modules": {k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in task.modules.items()},
        "optimizers": {k: o.state_dict() for k, o in task.optimizers.items()},
        "scalers": {k: s.state_dict() for k, s in run._scalers.items()},
        "rng": _rng_state(),
        "task": task.state_dict(),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "versions": _versions(),
        "world_size": int(run.env.world_size),
    }


# ------------------------------------------------------------------------------------- metrics log
def metrics_path(config: TrainConfig, out) -> Path:
    """Where the CSV metrics log of a run writing ``out`` goes."""
    if config.metrics:
        return Path(config.metrics)
    out = Path(out)
    return out.with_name(out.stem + ".metrics.csv")


_CSV_HEADER = ["iteration", "phase", "metric", "value", "elapsed_s"]


class _MetricsLog:
    def __init__(self, path: Path, start: int, enabled: bool):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if start > 0 and path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    try:
                        if int(row["iteration"]) <= start:
                            keep.append(row)
                    except (KeyError, ValueError):
                        continue
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, _CSV_HEADER)
        w.writeheader()
        w.writerows(keep)
        from v2m_bench.fileio import write_text

        write_text(path, buf.getvalue())

    def write(self, iteration: int, phase: str, values: dict, elapsed: float) -> None:
        if not self.enabled or not values:
            return
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            for k, v in values.items():
                w.writerow([int(iteration), phase, k, repr(float(v)), f"{elapsed:.3f}"])


def read_metrics(path):
    """The CSV metrics log as a pandas DataFrame (columns iteration, phase, metric, value, elapsed_s)."""
    import pandas as pd

    return pd.read_csv(path)


# ------------------------------------------------------------------------------------- the loop
@dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes
    ----------
    checkpoint : Path
    start, iteration : int
        Iteration resumed from (0 for a fresh run) and reached.
    seconds : float
        Wall time of the training iterations (excluding setup and the final validation).
    iterations_per_s, samples_per_s : float
    metrics : dict
        Last validation metrics.
    train : dict
        Mean of the last logged training values.
    """

    checkpoint: Path
    start: int
    iteration: int
    seconds: float
    iterations_per_s: float
    samples_per_s: float
    metrics: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


def _init_process_group(env: DistEnv, device) -> bool:
    import torch.distributed as dist

    if not env.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return True


def _reduce_mean(values: dict, env: DistEnv) -> dict:
    if not env.distributed or not values:
        return values
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.stack([values[k].float() for k in keys])
    dist.all_reduce(t)
    t /= env.world_size
    return {k: t[i] for i, k in enumerate(keys)}


def _average_buffers(task: Task, env: DistEnv) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks, so the
    validated and saved model summarises every rank's data (DDP keeps rank 0's otherwise)."""
    if not env.distributed:
        return
    import torch.distributed as dist

    for m in task.modules.values():
        for b in m.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b /= env.world_size


def _check_resume(ck: dict, task: Task, path: Path) -> None:
    if ck["kind"] != task.kind:
        raise ValidationError(f"is a {ck['kind']!r} checkpoint, cannot resume a {task.kind!r} run", path=str(path))
    stored = ck["config"]
    now = config_to_dict(task.config)
    diff = sorted(k for k in now if k not in RUNTIME_FIELDS and k in stored and stored[k] != now[k])
    if diff:
        k = diff[0]
        raise ValidationError(
            f"resuming with {k}={now[k]!r} but the checkpoint was trained with {stored[k]!r} "
            f"(only {', '.join(sorted(RUNTIME_FIELDS))} may change)", path=str(path), key=k,
        )


def fit(task: Task, out, *, resume: bool = False, env: DistEnv | None = None, log: Callable[[str], None] | None = None,
        progress: bool | None = None) -> FitResult:
    """Run ``task`` for ``task.config.iterations`` iterations, writing the checkpoint ``out``.

    Parameters
    ----------
    task : Task
    out : path
        Checkpoint to write (every ``ckpt_every`` iterations and at the end).
    resume : bool
        Continue from ``out`` when it exists (a fresh run when it does not).
    env : DistEnv, optional
        Default: from the environment (:func:`dist_env`).
    log : callable, optional
        Receives one-line messages (rank 0).
    progress : bool, optional
        Override ``config.progress``.

    Returns
    -------
    FitResult
    """
    import torch

    cfg = task.config
    out = Path(out)
    env = env or dist_env()
    log = log or (lambda s: None)
    device = resolve_device(cfg.device, env)
    owns_group = _init_process_group(env, device)
    try:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(cfg.seed)
        run = Run(cfg, env, device, log)
        task.setup(run)
        start = 0
        last_metrics: dict = {}
        if resume and out.is_file():
            ck = load_checkpoint(out)
            _check_resume(ck, task, out)
            for k, m in task.modules.items():
                if k not in ck["modules"]:
                    raise ValidationError("the checkpoint has no such module", path=str(out), key=k)
                load_weights(m, ck["modules"][k], path=out, key=f"modules.{k}")
            for k, o in task.optimizers.items():
                if k in ck.get("optimizers", {}):
                    o.load_state_dict(ck["optimizers"][k])
            for k, s in ck.get("scalers", {}).items():
                run.scaler(k).load_state_dict(s)
            task.load_state_dict(ck.get("task", {}))
            _set_rng_state(ck.get("rng", {}))
            start = int(ck["iteration"])
            last_metrics = dict(ck.get("metrics", {}))
            log(f"resuming {out} at iteration {start}")
        total = int(cfg.iterations)
        mlog = _MetricsLog(metrics_path(cfg, out), start, env.is_main)
        show = cfg.progress if progress is None else progress
        bar = None
        if show and env.is_main:
            from v2m_bench.fileio import progress as progress_bar

            bar = progress_bar(total=total, initial=start, desc=task.kind, unit="it", enabled=None, dynamic_ncols=True)
        for m in task.modules.values():
            m.train()
        t0 = time.perf_counter()
        sums: dict = {}
        n_acc = 0
        last_log_t, last_log_it = t0, start
        train_means: dict = {}
        it = start

        def checkpoint(i: int) -> None:
            _average_buffers(task, env)
            if env.is_main:
                save_checkpoint(out, _payload(task, run, i, last_metrics))
            run.barrier()

        def validate(i: int) -> None:
            nonlocal last_metrics
            _average_buffers(task, env)
            if env.is_main:
                vals = task.validate(run)
                for m in task.modules.values():
                    m.train()
                if vals:
                    last_metrics = {k: float(v) for k, v in vals.items()}
                    mlog.write(i, "val", last_metrics, time.perf_counter() - t0)
                    if bar is not None:
                        bar.write(f"[{task.kind} {i}] " + ", ".join(f"{k} {v:.4g}" for k, v in last_metrics.items()))
            run.barrier()

        if start < total:
            batches = task.batches(run, start, total)
            try:
                for it in range(start, total):
                    batch = next(batches)
                    run.iteration = it
                    vals = task.train_step(batch, run)
                    for k, v in vals.items():
                        sums[k] = sums[k] + v if k in sums else v
                    n_acc += 1
                    done = it + 1
                    if bar is not None:
                        bar.update(1)
                    if cfg.log_every and (done % cfg.log_every == 0 or done == total):
                        means = _reduce_mean({k: v / n_acc for k, v in sums.items()}, env)
                        train_means = {k: float(v) for k, v in means.items()}
                        now = time.perf_counter()
                        rate = (done - last_log_it) / max(now - last_log_t, 1e-9)
                        row = dict(train_means, it_per_s=rate, samples_per_s=rate * task.samples_per_iteration())
                        mlog.write(done, "train", row, now - t0)
                        if bar is not None:
                            bar.set_postfix({k: f"{v:.4g}" for k, v in train_means.items()}, refresh=False)
                        sums, n_acc = {}, 0
                        last_log_t, last_log_it = now, done
                    if cfg.val_every and done % cfg.val_every == 0 and done < total:
                        validate(done)
                    if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < total:
                        checkpoint(done)
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        done_iters = max(total - start, 0)
        if n_acc:
            train_means = {k: float(v / n_acc) for k, v in _reduce_mean(sums, env).items()}
        if start < total:
            validate(total)
            checkpoint(total)
        else:
            log(f"{out} already has {start} of {total} iterations: nothing to do")
        if bar is not None:
            bar.close()
        task.close()
        rate = done_iters / seconds if seconds > 0 and done_iters else 0.0
        return FitResult(
            checkpoint=out, start=start, iteration=max(total, start), seconds=seconds, iterations_per_s=rate,
            samples_per_s=rate * task.samples_per_iteration(), metrics=dict(last_metrics), train=train_means,
        )
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
