"""What a build is asked to do (:class:`BuildConfig`) and what it did (:class:`BuildResult`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from v2m_bench.errors import ValidationError

from ..audio import AudioConfig
from ..facegate import FaceGateConfig
from ..fitting import FitConfig
from ..labels import LabelRule
from ..references import ReferenceRule

__all__ = ["BuildConfig", "BuildResult", "config_dict"]


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
                from ..audit import verdict

                lines.append(f"label quality: {verdict(self.manifest['quality'])} (v2m-build-dataset audit OUT)")
        if self.timings:
            lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return "\n".join(lines)



def config_dict(c) -> dict:
    """A config dataclass as a JSON-ready dict (tuples become lists), as the manifest and the
    shards record it."""
    d = dataclasses.asdict(c)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
