"""One shard, as a worker builds it: the stages of its items, the packing, one atomic file.

The landmark detector and the model are created once per worker process and reused for every
shard that process builds (:func:`worker_resources`: a one-entry, process-local cache keyed by the
detector settings and model path; a deliberate piece of process state). Every shard is computed
with BLAS on one thread (:func:`v2m_data.threads.one_blas_thread`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..audio import AudioConfig
from ..facegate import FaceGateConfig
from ..fitting import FitConfig
from ..identities import Identity
from ..labels import LabelRule
from ..shards import write_shard
from ..threads import one_blas_thread
from .audio_stage import process_utterances
from .fit_stage import fit_images
from .image_stage import process_images
from .scan import IdentityFiles
from .shard_writer import pack_shard

__all__ = ["ShardTask", "build_shard", "worker_resources"]


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to build one shard (picklable)."""

    name: str
    split: str
    index: int
    fingerprint: str
    identities: tuple
    files: tuple
    wav_root: str
    images_root: str
    out_path: str
    detector: str
    detector_options: tuple
    device: str
    bfm: str
    audio: AudioConfig
    fit: FitConfig
    crop_sizes: tuple
    crop_scale: float
    face_gate: FaceGateConfig = field(default_factory=FaceGateConfig)
    identity_label: LabelRule = field(default_factory=LabelRule)
    progress: bool = False

def worker_resources(detector: str, device: str, options: tuple, bfm_path: str, fit: FitConfig, need_detector: bool) -> dict:
    """The detector and model of this process, created on first use and reused (see the module docs).

    Returns
    -------
    dict
        ``{"model": MorphableModel, "system": KeypointSystem, "detector": LandmarkDetector or None}``
        (the detector is made only when ``need_detector``).
    """
    key = (detector, device, options, bfm_path, fit)
    cache = worker_resources.__dict__.setdefault("cache", {})
    entry = cache.get(key)
    if entry is None:
        from v2m_bench.bfm import load_bfm

        from ..fitting import KeypointSystem

        model = load_bfm(bfm_path)
        entry = {"model": model, "system": KeypointSystem.from_model(model, fit), "detector": None}
        cache.clear()  # one entry: a process serves one build
        cache[key] = entry
    if need_detector and entry["detector"] is None:
        from ..landmarks import make_detector

        entry["detector"] = make_detector(detector, device, **dict(options))
    return entry


def build_shard(task: ShardTask) -> dict:
    """Build one shard file (atomic) and return its report plus timings.

    Returns
    -------
    dict
        ``{"name", "counts", "failures", "timings", "items"}`` (``timings`` in seconds, not written).
    """
    t0 = time.perf_counter()
    timings = {}
    wav_root, images_root = Path(task.wav_root), Path(task.images_root)
    idents = [Identity(**d) for d in task.identities]
    files = [IdentityFiles(tuple(tuple(u) for u in f[0]), tuple(tuple(i) for i in f[1]), tuple(f[2]), int(f[3])) for f in task.files]
    ident_files = [(i, f, row) for row, (i, f) in enumerate(zip(idents, files))]
    notes: list = []
    for _, f, _ in ident_files:
        notes.extend(f.notes)
    n_images_in = sum(len(f.images) for f in files)
    with one_blas_thread():
        res = worker_resources(task.detector, task.device, task.detector_options, task.bfm, task.fit, n_images_in > 0)
        timings["setup"] = time.perf_counter() - t0
        t = time.perf_counter()
        utt, f_audio = process_utterances(ident_files, wav_root, task.audio, progress=task.progress)
        timings["audio"] = time.perf_counter() - t
        t = time.perf_counter()
        if n_images_in:
            img, f_img = process_images(
                ident_files, images_root, res["detector"], task.crop_sizes, task.crop_scale, gate=task.face_gate, progress=task.progress
            )
        else:
            img, f_img = [], []
        timings["landmarks"] = time.perf_counter() - t
        t = time.perf_counter()
        system = res["system"]
        n_shape = int(system.n_shape)
        n_exp = int(system.n_coeff) - n_shape
        if img:
            lm = np.stack([r["landmarks"][:, :2] for r in img]).astype(np.float64)
            fr = fit_images(lm, system, task.fit)
        else:
            fr = None
        timings["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    content = pack_shard(
        task, idents, files, notes=notes, utterances=utt, audio_failures=f_audio, images=img, image_failures=f_img,
        fits=fr, n_shape=n_shape, n_exp=n_exp,
    )
    write_shard(task.out_path, content)
    timings["write"] = time.perf_counter() - t
    counts = content.report["counts"]
    return {
        "name": task.name,
        "counts": counts,
        "failures": content.report["failures"],
        "timings": timings,
        "items": counts["utterances_found"] + counts["images_found"],
    }
