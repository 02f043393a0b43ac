"""The dataset build: VoxCeleb1 voices + VGGFace faces -> HDF5 shards, references.h5, manifest.json.

``v2m-build-dataset`` (:mod:`v2m_cli.build`) is a thin wrapper around :func:`build` and
:func:`merge` (also ``v2m_data.build`` and ``v2m_data.merge``; the package is named ``building``
so that ``v2m_data.build`` stays the function).

Modules
-------
::

    config.py        BuildConfig (what to build), BuildResult (what was done)
    orchestrator.py  build() and merge(): resolve inputs, plan, lock, resume, run the shards, finish
    lock.py          BuildLock: OUT/.lock held with fcntl.flock
    out_folder.py    what a build may write into OUT, the temporary files of a killed build
    scan.py          scan_identity(): the input files of one identity
    worker.py        build_shard(): one shard in a worker (stages, packing, one atomic file)
    audio_stage.py   process_utterances(): features of every utterance (audio.extract_features)
    image_stage.py   process_images(): face gate, landmarks, crops of every image
    fit_stage.py     fit_images(): one batched 3DMM fit; rotation_to_angles()
    shard_writer.py  pack_shard(): per-item records -> the columns of the shard file
    manifest.py      the plan, shard fingerprints, references.h5 + manifest.json
    failures.py      per-item failure records and their one-line reasons

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
   audio features of every utterance (load, VAD, log-mel, normalise:
   :func:`v2m_data.audio.extract_features`), face landmarks of every image through the detector
   interface (:mod:`v2m_data.landmarks`; the VGGFace box is given when annotated), face crops, one
   batched 3DMM fit of all the shard's images (:func:`v2m_data.fitting.fit_landmarks`), the identity labels
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
shard that process builds (:func:`v2m_data.building.worker.worker_resources`: a one-entry,
process-local cache keyed by the detector settings and model path; a deliberate piece of process
state). The other one: the BLAS and OpenMP thread pools run on one thread while any shard of the
process is being built (:class:`v2m_data.threads.OneBlasThread`), because OpenBLAS rounds
differently on different thread counts; a lock and a depth count make that safe when one process
builds several shards on threads (a dask worker with several threads).
"""

from __future__ import annotations

from .audio_stage import process_utterances
from .config import BuildConfig, BuildResult
from .fit_stage import fit_images, rotation_to_angles
from .image_stage import process_images
from .lock import BuildLock, BuildLockedError
from .orchestrator import build, merge
from .out_folder import MANIFEST_FORMAT
from .scan import AUDIO_SUFFIXES, IMAGE_SUFFIXES, IdentityFiles, scan_identity
from .worker import ShardTask, build_shard

__all__ = [
    "BuildConfig",
    "BuildResult",
    "BuildLockedError",
    "BuildLock",
    "ShardTask",
    "IdentityFiles",
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
