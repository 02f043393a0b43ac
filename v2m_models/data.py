"""Training data over a built dataset folder: voice crops, identity labels, faces and 3DMM targets.

A build folder (``v2m-build-dataset``, :mod:`v2m_data.building`) is opened with
:func:`v2m_data.shards.open_dataset`; this module turns one of its splits into training batches.

Design
------
**Batches are indexed by the iteration number.** :class:`VoiceBatches` is a map-style dataset
whose item ``i`` is the whole batch of iteration ``i`` (for this process's rank): which
utterances, the crop length and the crop starts are a pure function of ``(seed, i)``
(:class:`BatchPlanner`). So a batch does not depend on the number of loader workers, on their
order, or on whether training was interrupted: resuming at iteration ``k`` just asks for items
``k, k + 1, ...`` (exact resume), and the CPU and GPU loaders give the same batches.

**Sampling.** Utterances are drawn without replacement within an epoch: the global batch of
iteration ``i`` is positions ``[i B, (i + 1) B)`` of the endless sequence ``perm_0, perm_1, ...``
where ``perm_e`` is a permutation of the sampled utterances drawn from ``(seed, e)``. With
``world_size`` processes (DistributedDataParallel) rank ``r`` takes the ``r``-th slice of
``B / world_size`` of that global batch, so N GPUs see exactly the samples one GPU would.
``sampling="identity"`` instead draws an identity uniformly, then one of its utterances
(with replacement), for speaker-balanced batches.

**Crops (Wen et al.).** One crop length ``L`` per batch, uniform in ``[min_frames, max_frames]``
(300-800 frames = 3-8 s), so every sample of a batch has the same length and the voice encoder's
BatchNorm never sees padding. An utterance shorter than ``L`` is *looped* (frames
``start, ..., n-1, 0, 1, ...`` wrapping around): every frame of the crop is real, normalised speech
(zero padding would feed silence-like frames to BatchNorm and the time average), and the
per-utterance normalisation of the features makes the seam harmless. Test-time inputs are whole
utterances (:func:`whole_utterances`, :func:`pad_batch`), run through the encoder with their
lengths in eval mode.

**Features in memory.** :class:`FeatureBank` keeps the selected utterances' frames in one
contiguous ``(F, 64)`` float32 array in RAM (default; forked loader workers share it
copy-on-write) or as the shards' read-only memory maps (``in_memory=False``: nothing is copied and
the OS page cache holds what is used). For a GPU, :class:`DeviceVoiceBatches` uploads the bank to
the device once (optionally as float16: 12 GB for the 113K training utterances of VoxCeleb1) and
cuts the crops there with one gather per batch, so the host loader is out of the loop.

**Targets (supervised).** The target of a training identity is the per-coefficient *median* of
its frontal, well-fitted image fits (``|yaw| <= 15``, ``|pitch| <= 15`` degrees,
``residual_normalized <= 0.05``: the candidates of the benchmark's reference rule,
:mod:`v2m_data.references`), over the 40 shape and 10 expression coefficients
(:func:`identity_targets`). The median of several fits is a less noisy estimate of the person's
face than any one fit; ``method="reference"`` instead takes the single fit the benchmark's
reference rule would choose (needs the model's coefficient standard deviations). An identity
without candidates gets no target (NaN) and is left out of supervised training (with
``fallback=True`` the median over all its valid fits is used instead). Targets are normalised by
training-set statistics (:class:`CoefficientStats`: per-coefficient mean and standard deviation
over the training identities, each identity counted once), saved with the checkpoint and used to
de-normalise predictions.

``source="identity"`` (``v2m-train supervised --targets identity``) instead takes each identity's
label stored in the build's shards (``identity_fit/``, :mod:`v2m_data.labels`: a robust aggregate
over its accepted fits, the same label the benchmark's references use by default); the default
``source="image"`` makes the target from the per-image fits as above (the paper's labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from v2m_bench.errors import ValidationError

__all__ = [
    "CropConfig",
    "TargetRule",
    "CoefficientStats",
    "identity_targets",
    "FeatureBank",
    "FaceBank",
    "BatchPlanner",
    "BatchPlan",
    "triplet_items",
    "VoiceBatches",
    "DeviceVoiceBatches",
    "TrainingSet",
    "training_set",
    "make_loader",
    "crop_rows",
    "whole_utterances",
    "pad_batch",
    "utterance_ids",
    "select_test_utterances",
    "seed_worker",
]

N_COEFFICIENTS = 50  # 40 shape + 10 expression


# ------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class CropConfig:
    """Random training crops of the normalised log-mel features.

    Attributes
    ----------
    min_frames, max_frames : int
        Range of the crop length (frames of 10 ms), drawn once per batch; 300-800 as Wen et al.
    """

    min_frames: int = 300
    max_frames: int = 800

    def __post_init__(self):
        if int(self.min_frames) < 1 or int(self.max_frames) < int(self.min_frames):
            raise ValidationError(
                f"need 1 <= min_frames <= max_frames, got {self.min_frames} and {self.max_frames}", key="crop"
            )


@dataclass(frozen=True)
class TargetRule:
    """How the supervised target of an identity is made from its image fits.

    Attributes
    ----------
    method : {"median", "reference"}
        Per-coefficient median of the candidates' fits, or the one fit the benchmark's reference
        rule (:func:`v2m_data.references.select_references`) picks.
    max_yaw, max_pitch : float
        Degrees; candidates are frontal within these.
    max_residual : float
        Candidates have ``residual_normalized`` at most this.
    fallback : bool
        An identity without candidates takes the median of all its valid fits (else no target).
    source : {"image", "identity"}
        ``image``: the target is made from the per-image fits by ``method``; ``identity``: the
        identity label of the shards (``identity_fit/shape`` and ``expression``; the other fields
        are then unused).
    """

    method: str = "median"
    max_yaw: float = 15.0
    max_pitch: float = 15.0
    max_residual: float = 0.05
    fallback: bool = False
    source: str = "image"

    def __post_init__(self):
        if self.source not in ("image", "identity"):
            raise ValidationError(f"must be 'image' or 'identity', got {self.source!r}", key="target.source")
        if self.method not in ("median", "reference"):
            raise ValidationError(f"must be 'median' or 'reference', got {self.method!r}", key="target.method")
        for k in ("max_yaw", "max_pitch", "max_residual"):
            v = float(getattr(self, k))
            if not np.isfinite(v) or v < 0:
                raise ValidationError(f"expected a finite number >= 0, got {v!r}", key=f"target.{k}")


@dataclass(frozen=True)
class CoefficientStats:
    """Per-coefficient mean and standard deviation of the 50 targets (40 shape + 10 expression).

    Attributes
    ----------
    mean, std : tuple of float, length 50
        BFM units (std floored at a tiny positive value).
    """

    mean: tuple
    std: tuple

    @classmethod
    def fit(cls, targets: np.ndarray) -> "CoefficientStats":
        """Statistics of ``targets`` (I, 50), NaN rows ignored.

        Raises
        ------
        ValidationError
            When fewer than two rows are finite.
        """
        t = np.asarray(targets, np.float64)
        ok = np.isfinite(t).all(axis=1)
        if ok.sum() < 2:
            raise ValidationError(f"need at least two identities with targets, found {int(ok.sum())}", key="targets")
        mean = t[ok].mean(axis=0)
        std = t[ok].std(axis=0)
        std = np.maximum(std, 1e-6 * max(float(np.abs(mean).max()), 1.0))
        return cls(tuple(float(x) for x in mean), tuple(float(x) for x in std))

    @classmethod
    def identity(cls, n: int = N_COEFFICIENTS) -> "CoefficientStats":
        """Mean 0, std 1 (no normalisation)."""
        return cls(tuple([0.0] * n), tuple([1.0] * n))

    def normalise(self, coefficients):
        """``(c - mean) / std`` for (..., 50) numpy arrays or torch tensors."""
        m, s = self._arrays(coefficients)
        return (coefficients - m) / s

    def denormalise(self, z):
        """``z * std + mean`` for (..., 50) numpy arrays or torch tensors."""
        m, s = self._arrays(z)
        return z * s + m

    def _arrays(self, like):
        m = np.asarray(self.mean, np.float32)
        s = np.asarray(self.std, np.float32)
        if hasattr(like, "new_tensor"):
            return like.new_tensor(m), like.new_tensor(s)
        return m.astype(np.asarray(like).dtype, copy=False), s.astype(np.asarray(like).dtype, copy=False)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "CoefficientStats":
        return cls(tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"]))


# ------------------------------------------------------------------------------------- targets
def identity_targets(split, rule: TargetRule = TargetRule(), shape_std=None, expression_std=None):
    """Supervised target coefficients of every identity of a split.

    Parameters
    ----------
    split : v2m_data.shards.SplitData
    rule : TargetRule
    shape_std, expression_std : array (40,) / (10,), optional
        The model's coefficient standard deviations; needed by ``method="reference"``.

    Returns
    -------
    targets : ndarray, float32, shape (I, 50)
        40 shape then 10 expression coefficients (BFM units); NaN rows for identities without a
        target.
    n_fits : ndarray, int64, shape (I,)
        Fits the target was made from (0: none).
    """
    n_id = split.n_identities
    out = np.full((n_id, N_COEFFICIENTS), np.nan, np.float32)
    n_fits = np.zeros(n_id, np.int64)
    if rule.source == "identity":
        idf = getattr(split, "identity_fit", {}) or {}
        if "shape" not in idf:
            raise ValidationError(
                "the build's shards hold no identity labels (identity_fit/); rebuild it or use --targets image", key="targets"
            )
        coeff = np.concatenate([np.asarray(idf["shape"], np.float64), np.asarray(idf["expression"], np.float64)], axis=1)
        has = (np.asarray(idf["n_images"]) > 0) & np.isfinite(coeff).all(1)
        out[has] = coeff[has]
        n_fits[has] = np.asarray(idf["n_images"], np.int64)[has]
        return out, n_fits
    if split.n_images == 0:
        return out, n_fits
    fit = split.fit
    ident = split.images["identity"].astype(np.int64)
    sh = np.asarray(fit["shape"], np.float64)
    ex = np.asarray(fit["expression"], np.float64)
    pose = np.asarray(fit["pose"], np.float64).reshape(-1, 3)
    rn = np.asarray(fit["residual_normalized"], np.float64)
    valid = np.isfinite(sh).all(1) & np.isfinite(ex).all(1) & np.isfinite(pose).all(1) & np.isfinite(rn)
    with np.errstate(invalid="ignore"):
        cand = valid & (np.abs(pose[:, 0]) <= rule.max_yaw) & (np.abs(pose[:, 1]) <= rule.max_pitch) & (rn <= rule.max_residual)
    coeff = np.concatenate([sh, ex], axis=1)
    if rule.method == "reference":
        if shape_std is None or expression_std is None:
            raise ValidationError("method='reference' needs the model's shape_std and expression_std", key="target.method")
        from v2m_data.references import ReferenceRule, select_references

        rr = ReferenceRule(max_yaw=rule.max_yaw, max_pitch=rule.max_pitch, max_residual=rule.max_residual)
        choice = select_references(
            ident, sh, ex, pose, np.where(valid, rn, np.nan), shape_std, expression_std,
            n_identities=n_id, paths=split.images["path"], rule=rr,
        )
        has = choice.row >= 0
        out[has] = coeff[choice.row[has]]
        n_fits[has] = 1
    else:
        order = np.argsort(ident, kind="stable")
        bounds = np.searchsorted(ident[order], np.arange(n_id + 1))
        for n in range(n_id):
            rows = order[bounds[n]:bounds[n + 1]]
            use = rows[cand[rows]]
            if len(use) == 0 and rule.fallback:
                use = rows[valid[rows]]
            if len(use):
                out[n] = np.median(coeff[use], axis=0)
                n_fits[n] = len(use)
    if rule.fallback and rule.method == "reference":
        for n in np.flatnonzero(n_fits == 0):
            rows = np.flatnonzero((ident == n) & valid)
            if len(rows):
                out[n] = np.median(coeff[rows], axis=0)
                n_fits[n] = len(rows)
    return out, n_fits


# ------------------------------------------------------------------------------------- banks
def crop_rows(offset, n_frames, starts, length: int):
    """Frame rows of looped crops: ``offset + (start + arange(length)) % n_frames``.

    Parameters
    ----------
    offset, n_frames, starts : array (B,) int (numpy arrays or torch tensors)
        First row of each utterance in the bank, its number of frames (>= 1), the crop start
        (``0 <= start < n_frames``).
    length : int
        Crop length L.

    Returns
    -------
    (B, L) int64 rows into the bank (same array type as the inputs).
    """
    if hasattr(offset, "new_tensor"):
        import torch

        ar = torch.arange(int(length), device=offset.device, dtype=torch.int64)
        return offset[:, None] + torch.remainder(starts[:, None] + ar[None, :], n_frames[:, None])
    ar = np.arange(int(length), dtype=np.int64)
    return np.asarray(offset, np.int64)[:, None] + (np.asarray(starts, np.int64)[:, None] + ar[None, :]) % np.asarray(n_frames, np.int64)[:, None]


class FeatureBank:
    """The frames of a set of utterances, ready for cropping.

    Parameters
    ----------
    split : v2m_data.shards.SplitData
    utterances : array of int, optional
        Utterance numbers of ``split`` to hold (default: all), in this order: bank item ``k`` is
        utterance ``utterances[k]``.
    in_memory : bool
        Copy the frames into one contiguous ``(F, n_mels)`` float32 array (default) or keep the
        shards' read-only memory maps (nothing copied).

    Attributes
    ----------
    utterances : (K,) int64
    n_frames : (K,) int64
    n_mels : int
    """

    def __init__(self, split, utterances=None, *, in_memory: bool = True):
        u = np.arange(split.n_utterances, dtype=np.int64) if utterances is None else np.asarray(utterances, np.int64).reshape(-1)
        self.utterances = u
        self.n_frames = split.utterances["n_frames"][u].astype(np.int64)
        if len(u) and int(self.n_frames.min()) < 1:
            raise ValidationError("an utterance has no frames", key="n_frames")
        shard = split.utterances["shard"][u].astype(np.int64)
        soff = split.utterances["offset"][u].astype(np.int64)
        self.in_memory = bool(in_memory)
        n_mels = int(split.shards[0].attrs["n_mels"]) if split.shards else 64
        self.n_mels = n_mels
        if self.in_memory:
            total = int(self.n_frames.sum())
            frames = np.empty((total, n_mels), np.float32)
            offset = np.concatenate([[0], np.cumsum(self.n_frames)[:-1]]).astype(np.int64) if len(u) else np.zeros(0, np.int64)
            for s in np.unique(shard):
                src = split.shards[int(s)].features_array()
                for k in np.flatnonzero(shard == s):
                    frames[offset[k]:offset[k] + self.n_frames[k]] = src[soff[k]:soff[k] + self.n_frames[k]]
            self._arrays = [frames]
            self._array_of = np.zeros(len(u), np.int64)
            self.offset = offset
        else:
            used = np.unique(shard)
            self._arrays = [split.shards[int(s)].features_array() for s in used]
            self._array_of = np.searchsorted(used, shard).astype(np.int64)
            self.offset = soff

    def __len__(self) -> int:
        return int(len(self.utterances))

    @property
    def frames(self) -> np.ndarray:
        """The contiguous ``(F, n_mels)`` frame array (``in_memory`` banks only)."""
        if not self.in_memory:
            raise ValidationError("a memory-mapped bank has one array per shard", key="frames")
        return self._arrays[0]

    def crops(self, items, starts, length: int) -> np.ndarray:
        """Looped crops ``(B, n_mels, length)`` float32 of bank items ``items`` from ``starts``."""
        items = np.asarray(items, np.int64)
        out = np.empty((len(items), int(length), self.n_mels), np.float32)
        rows = crop_rows(self.offset[items], self.n_frames[items], starts, length)
        arr_of = self._array_of[items]
        for a in np.unique(arr_of):
            sel = np.flatnonzero(arr_of == a)
            out[sel] = self._arrays[int(a)][rows[sel]]
        return np.ascontiguousarray(out.transpose(0, 2, 1))

    def utterance(self, item: int) -> np.ndarray:
        """Whole utterance ``(n_mels, n_frames)`` float32 of bank item ``item``."""
        a = self._arrays[int(self._array_of[item])]
        o, n = int(self.offset[item]), int(self.n_frames[item])
        return np.ascontiguousarray(np.asarray(a[o:o + n], np.float32).T)


class FaceBank:
    """Face crops of a split in memory: ``(M, S, S, 3)`` uint8 for the chosen images.

    Parameters
    ----------
    split : v2m_data.shards.SplitData
    size : int
        Crop side (a size the build stored: 64 or 120 by default).
    images : array of int, optional
        Image numbers (default: all).
    """

    def __init__(self, split, size: int = 64, images=None):
        self.images = np.arange(split.n_images, dtype=np.int64) if images is None else np.asarray(images, np.int64)
        sizes = {int(s) for sh in split.shards for s in np.atleast_1d(sh.attrs.get("crop_sizes", []))}
        if int(size) not in sizes:
            raise ValidationError(f"the build stored crop sizes {sorted(sizes)}, not {size}", key="face_size")
        self.size = int(size)
        self.crops = split.crops(self.images, size=self.size) if len(self.images) else np.zeros((0, size, size, 3), np.uint8)
        self.identity = split.images["identity"][self.images].astype(np.int64) if len(self.images) else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(len(self.images))

    def batch(self, items) -> np.ndarray:
        """Faces ``(B, 3, S, S)`` float32 in [-1, 1] (RGB) of bank items ``items``."""
        x = self.crops[np.asarray(items, np.int64)].astype(np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) / 127.5 - 1.0


# ------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class BatchPlan:
    """What one rank's batch of one iteration holds.

    Attributes
    ----------
    items : (b,) int64
        Bank items (positions in the :class:`FeatureBank`).
    length : int
        Crop length.
    starts : (b,) int64
        Crop starts.
    face_items : (b,) int64 or None
        Face-bank items (an image of each sample's identity), when faces are sampled.
    positive_items, negative_items : (b,) int64 or None
        With triplets: for each sample, another utterance of its identity (the sample's own
        utterance when its identity has only one) and an utterance of another identity.
    positive_starts, negative_starts : (b,) int64 or None
        Their crop starts (crops of the same ``length``).
    """

    items: np.ndarray
    length: int
    starts: np.ndarray
    face_items: np.ndarray | None = None
    positive_items: np.ndarray | None = None
    negative_items: np.ndarray | None = None
    positive_starts: np.ndarray | None = None
    negative_starts: np.ndarray | None = None


class BatchPlanner:
    """Maps an iteration number to a :class:`BatchPlan` (a pure function of the seed and it).

    Parameters
    ----------
    n_frames : (K,) int
        Frames of each bank item.
    batch_size : int
        Global batch size (over all ranks); divisible by ``world_size``.
    crop : CropConfig
    seed : int
    rank, world_size : int
    sampling : {"utterance", "identity"}
        Epochs of utterances without replacement, or a uniform identity then one of its
        utterances.
    groups : (K,) int, optional
        Identity of each bank item (needed by ``sampling="identity"`` and by faces).
    face_groups : (M,) int, optional
        Identity of each face-bank item: each sample also gets a random face of its identity.
    triplets : bool
        Each sample also gets a positive (another utterance of its identity, uniformly; its own
        utterance, another crop, when the identity has only one) and a negative (a uniform other
        identity, then a uniform utterance of it), drawn from ``(seed, iteration)`` like the rest
        of the plan (:func:`triplet_items`). Needs ``groups`` with at least two identities.
    """

    def __init__(self, n_frames, batch_size: int, crop: CropConfig, seed: int, *, rank: int = 0, world_size: int = 1,
                 sampling: str = "utterance", groups=None, face_groups=None, triplets: bool = False):
        self.n_frames = np.asarray(n_frames, np.int64)
        if len(self.n_frames) == 0:
            raise ValidationError("no utterances to sample from", key="utterances")
        if int(batch_size) < 1 or int(batch_size) % int(world_size):
            raise ValidationError(f"batch size {batch_size} must be positive and divisible by the world size {world_size}", key="batch_size")
        if sampling not in ("utterance", "identity"):
            raise ValidationError(f"must be 'utterance' or 'identity', got {sampling!r}", key="sampling")
        self.batch_size = int(batch_size)
        self.local = self.batch_size // int(world_size)
        self.crop = crop
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.sampling = sampling
        self.groups = None if groups is None else np.asarray(groups, np.int64)
        self.triplets = bool(triplets)
        if (sampling == "identity" or face_groups is not None or self.triplets) and self.groups is None:
            raise ValidationError("identity sampling, faces and triplets need the items' groups", key="groups")
        if self.groups is not None:
            order = np.argsort(self.groups, kind="stable")
            self._group_ids, starts = np.unique(self.groups[order], return_index=True)
            self._group_items = np.split(order, starts[1:])
            if self.triplets and len(self._group_ids) < 2:
                raise ValidationError("triplets need at least two training identities", key="groups")
        self._faces = None
        if face_groups is not None:
            fg = np.asarray(face_groups, np.int64)
            fo = np.argsort(fg, kind="stable")
            ids, st = np.unique(fg[fo], return_index=True)
            per = dict(zip(ids.tolist(), np.split(fo, st[1:])))
            missing = sorted(set(np.unique(self.groups).tolist()) - set(per))
            if missing:
                raise ValidationError(f"{len(missing)} identities have utterances but no face", key="faces")
            self._faces = per
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, 0x7E9, epoch])
            self._perm_cache = (epoch, rng.permutation(len(self.n_frames)))
        return self._perm_cache[1]

    def items_of(self, iteration: int) -> np.ndarray:
        """Bank items of this rank's share of the global batch of ``iteration``."""
        lo = iteration * self.batch_size + self.rank * self.local
        if self.sampling == "identity":
            rng = np.random.default_rng([self.seed, 0x1D, iteration])
            g = rng.integers(0, len(self._group_ids), self.batch_size)
            u = rng.random(self.batch_size)
            g, u = g[self.rank * self.local:(self.rank + 1) * self.local], u[self.rank * self.local:(self.rank + 1) * self.local]
            return np.array([self._group_items[gi][int(ui * len(self._group_items[gi]))] for gi, ui in zip(g, u)], np.int64)
        n = len(self.n_frames)
        pos = np.arange(lo, lo + self.local, dtype=np.int64)
        epoch, within = np.divmod(pos, n)
        out = np.empty(self.local, np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self._perm(int(e))[within[sel]]
        return out

    def plan(self, iteration: int) -> BatchPlan:
        """The plan of ``iteration`` for this rank."""
        iteration = int(iteration)
        items = self.items_of(iteration)
        rng = np.random.default_rng([self.seed, 0xC0, iteration])
        length = int(rng.integers(self.crop.min_frames, self.crop.max_frames + 1))
        u = rng.random(self.batch_size)[self.rank * self.local:(self.rank + 1) * self.local]
        n = self.n_frames[items]
        hi = np.where(n >= length, n - length + 1, n)
        starts = np.minimum((u * hi).astype(np.int64), hi - 1)
        faces = None
        if self._faces is not None:
            v = rng.random(self.batch_size)[self.rank * self.local:(self.rank + 1) * self.local]
            faces = np.array([self._faces[int(g)][int(x * len(self._faces[int(g)]))] for g, x in zip(self.groups[items], v)], np.int64)
        trip = {}
        if self.triplets:
            u3 = np.random.default_rng([self.seed, 0x7219, iteration]).random((5, self.batch_size))
            u3 = u3[:, self.rank * self.local:(self.rank + 1) * self.local]
            pos, neg = triplet_items(items, self.groups, u3[0], u3[1], u3[2], group_items=(self._group_ids, self._group_items))
            trip = {"positive_items": pos, "negative_items": neg}
            for k, it, w in (("positive_starts", pos, u3[3]), ("negative_starts", neg, u3[4])):
                n = self.n_frames[it]
                hi = np.where(n >= length, n - length + 1, n)
                trip[k] = np.minimum((w * hi).astype(np.int64), hi - 1)
        return BatchPlan(items=items, length=length, starts=starts, face_items=faces, **trip)


def triplet_items(items, groups, u_pos, u_neg_group, u_neg_item, group_items=None):
    """Positives and negatives of anchor bank items, from uniform draws (a pure function).

    Parameters
    ----------
    items : (b,) int
        Anchor bank items.
    groups : (K,) int
        Identity of each bank item.
    u_pos, u_neg_group, u_neg_item : (b,) float in [0, 1)
        Uniform draws: the positive among the anchor identity's other utterances; the negative
        identity among the other identities; the negative utterance among that identity's.
    group_items : tuple, optional
        ``(identities, items of each)`` as sorted by ``np.unique`` (computed when not given).

    Returns
    -------
    positive : (b,) int64
        Another item of the anchor's identity (the anchor itself when its identity has one item).
    negative : (b,) int64
        An item of another identity.
    """
    items = np.asarray(items, np.int64)
    groups = np.asarray(groups, np.int64)
    if group_items is None:
        order = np.argsort(groups, kind="stable")
        ids, st = np.unique(groups[order], return_index=True)
        group_items = (ids, np.split(order, st[1:]))
    ids, per = group_items
    if len(ids) < 2:
        raise ValidationError("triplets need at least two identities", key="groups")
    gpos = np.searchsorted(ids, groups[items])
    pos = np.empty(len(items), np.int64)
    neg = np.empty(len(items), np.int64)
    for j, (a, g) in enumerate(zip(items, gpos)):
        mine = per[int(g)]
        if len(mine) == 1:
            pos[j] = a
        else:
            others = mine[mine != a]
            pos[j] = others[min(int(u_pos[j] * len(others)), len(others) - 1)]
        k = min(int(u_neg_group[j] * (len(ids) - 1)), len(ids) - 2)
        k += k >= g
        theirs = per[int(k)]
        neg[j] = theirs[min(int(u_neg_item[j] * len(theirs)), len(theirs) - 1)]
    return pos, neg


# ------------------------------------------------------------------------------------- batches
class VoiceBatches:
    """Map-style dataset (for ``torch.utils.data.DataLoader(batch_size=None)``): item ``i`` is the
    batch of iteration ``i``.

    Parameters
    ----------
    bank : FeatureBank
    planner : BatchPlanner
    labels : (K,) int, optional
        Class label of each bank item (the training identity number).
    targets : (C, 50) float, optional
        Normalised target coefficients per label (``targets[label]``).
    faces : FaceBank, optional
        With a planner made with ``face_groups``: a face of each sample's identity.

    Returns (per item)
    ------------------
    dict of torch tensors
        ``features`` (b, 64, L) float32; ``item`` (b,) int64 bank items; ``utterance`` (b,) int64
        split utterance numbers; ``label`` (b,) int64; ``target`` (b, 50) float32; ``face``
        (b, 3, S, S) float32 in [-1, 1] and ``face_item`` (b,) int64 (the last four when given);
        with a planner made with ``triplets``: ``positive`` and ``negative`` (b, 64, L) float32
        crops and ``positive_item``, ``negative_item`` (b,) int64.
    """

    def __init__(self, bank: FeatureBank, planner: BatchPlanner, *, labels=None, targets=None, faces: FaceBank | None = None):
        self.bank = bank
        self.planner = planner
        self.labels = None if labels is None else np.asarray(labels, np.int64)
        self.targets = None if targets is None else np.asarray(targets, np.float32)
        self.faces = faces

    def __len__(self) -> int:
        return 2**62

    def numpy_batch(self, iteration: int) -> dict:
        """The batch of ``iteration`` as numpy arrays."""
        p = self.planner.plan(iteration)
        out = {
            "features": self.bank.crops(p.items, p.starts, p.length),
            "item": p.items,
            "utterance": self.bank.utterances[p.items],
        }
        if self.labels is not None:
            out["label"] = self.labels[p.items]
            if self.targets is not None:
                out["target"] = self.targets[out["label"]]
        if self.faces is not None and p.face_items is not None:
            out["face"] = self.faces.batch(p.face_items)
            out["face_item"] = p.face_items
        if p.positive_items is not None:
            out["positive"] = self.bank.crops(p.positive_items, p.positive_starts, p.length)
            out["negative"] = self.bank.crops(p.negative_items, p.negative_starts, p.length)
            out["positive_item"] = p.positive_items
            out["negative_item"] = p.negative_items
        return out

    def __getitem__(self, iteration: int) -> dict:
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.numpy_batch(int(iteration)).items()}


class DeviceVoiceBatches:
    """The same batches as :class:`VoiceBatches`, cut on a torch device from a device-resident bank.

    The frames (and faces, labels, targets) are uploaded once; each batch is one gather on the
    device. Iterate with :meth:`iterate`.

    Parameters
    ----------
    source : VoiceBatches
        Its bank must be ``in_memory``.
    device : str or torch.device
    dtype : torch.dtype, optional
        Storage type of the frames on the device (e.g. ``torch.float16`` to halve the memory);
        batches are returned as float32 unless ``keep_dtype``.
    keep_dtype : bool
    """

    def __init__(self, source: VoiceBatches, device, dtype=None, keep_dtype: bool = False):
        import torch

        self.source = source
        self.device = torch.device(device)
        bank = source.bank
        self.frames = torch.as_tensor(bank.frames).to(self.device, dtype=dtype or torch.float32)
        self.offset = torch.as_tensor(bank.offset, device=self.device)
        self.n_frames = torch.as_tensor(bank.n_frames, device=self.device)
        self.utterances = torch.as_tensor(bank.utterances, device=self.device)
        self.labels = None if source.labels is None else torch.as_tensor(source.labels, device=self.device)
        self.targets = None if source.targets is None else torch.as_tensor(source.targets, device=self.device)
        self.faces = None
        if source.faces is not None:
            self.faces = torch.as_tensor(source.faces.crops, device=self.device)
        self.keep_dtype = bool(keep_dtype)

    def batch(self, iteration: int) -> dict:
        """The batch of ``iteration`` (tensors on the device)."""
        import torch

        p = self.source.planner.plan(int(iteration))
        items = torch.as_tensor(p.items).to(self.device, non_blocking=True)
        starts = torch.as_tensor(p.starts).to(self.device, non_blocking=True)
        rows = crop_rows(self.offset[items], self.n_frames[items], starts, p.length)
        x = self.frames[rows].transpose(1, 2)
        if not self.keep_dtype:
            x = x.float()
        out = {"features": x.contiguous(), "item": items, "utterance": self.utterances[items]}
        if self.labels is not None:
            out["label"] = self.labels[items]
            if self.targets is not None:
                out["target"] = self.targets[out["label"]]
        if self.faces is not None and p.face_items is not None:
            fi = torch.as_tensor(p.face_items).to(self.device, non_blocking=True)
            out["face"] = self.faces[fi].permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out["face_item"] = fi
        if p.positive_items is not None:
            for k in ("positive", "negative"):
                ti = torch.as_tensor(getattr(p, f"{k}_items")).to(self.device, non_blocking=True)
                ts = torch.as_tensor(getattr(p, f"{k}_starts")).to(self.device, non_blocking=True)
                xk = self.frames[crop_rows(self.offset[ti], self.n_frames[ti], ts, p.length)].transpose(1, 2)
                out[k] = (xk if self.keep_dtype else xk.float()).contiguous()
                out[f"{k}_item"] = ti
        return out

    def iterate(self, start: int, stop: int) -> Iterator[dict]:
        for i in range(int(start), int(stop)):
            yield self.batch(i)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy and Python's ``random`` of a loader worker from torch's seed.

    The batches themselves do not use these generators (they are drawn from ``(seed, iteration)``);
    this only keeps any other randomness in a worker reproducible.
    """
    import random

    import torch

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(batches: VoiceBatches, start: int, stop: int, *, workers: int = 0, pin_memory: bool = False,
                seed: int = 0, prefetch_factor: int = 4):
    """A DataLoader yielding the batches of iterations ``start, ..., stop - 1`` in order.

    Parameters
    ----------
    batches : VoiceBatches
    start, stop : int
    workers : int
        Worker processes (0: in this process).
    pin_memory : bool
        Page-locked batches for fast, asynchronous host-to-GPU copies.
    seed : int
        Seed of the loader's base generator (what :func:`seed_worker` derives worker seeds from).
    prefetch_factor : int
        Batches prepared ahead per worker.
    """
    import torch
    from torch.utils.data import DataLoader

    g = torch.Generator()
    g.manual_seed(int(seed))
    kwargs = {}
    if workers > 0:
        kwargs.update(prefetch_factor=int(prefetch_factor), worker_init_fn=seed_worker)
    return DataLoader(
        batches, batch_size=None, sampler=range(int(start), int(stop)), num_workers=int(workers),
        pin_memory=bool(pin_memory), generator=g, **kwargs,
    )


# ------------------------------------------------------------------------------------- training set
@dataclass
class TrainingSet:
    """The training side of a build, as the trainers use it.

    Attributes
    ----------
    split : v2m_data.shards.SplitData
    identities : (C,) int64
        Split identity numbers of the classes, in label order.
    names : list of str
        VGGFace names of the classes.
    utterances : (K,) int64
        Utterances used (those of the classes), in bank order.
    labels : (K,) int64
        Class of each used utterance.
    targets : (C, 50) float32 or None
        Raw (BFM units) target coefficients per class (supervised only).
    n_fits : (C,) int64 or None
    shuffled : bool
        The identity -> target mapping was permuted (``shuffle_pairs``).
    """

    split: object
    identities: np.ndarray
    names: list
    utterances: np.ndarray
    labels: np.ndarray
    targets: np.ndarray | None = None
    n_fits: np.ndarray | None = None
    shuffled: bool = False


def training_set(split, *, with_targets: bool = False, rule: TargetRule = TargetRule(), shape_std=None,
                 expression_std=None, shuffle_pairs: bool = False, seed: int = 0) -> TrainingSet:
    """Choose the classes (identities) and utterances of a training split.

    Parameters
    ----------
    split : v2m_data.shards.SplitData
    with_targets : bool
        Supervised: keep only identities with a target (:func:`identity_targets`).
    rule, shape_std, expression_std
        See :func:`identity_targets`.
    shuffle_pairs : bool
        Debugging control: randomly permute which identity gets which target (so voices carry
        no information about their targets).
    seed : int
        Seed of that permutation.

    Returns
    -------
    TrainingSet
    """
    n_id = split.n_identities
    u_id = split.utterances["identity"].astype(np.int64)
    has_utt = np.bincount(u_id, minlength=n_id) > 0
    targets = n_fits = None
    keep = has_utt
    if with_targets:
        t, nf = identity_targets(split, rule, shape_std, expression_std)
        keep = has_utt & (nf > 0)
    ids = np.flatnonzero(keep).astype(np.int64)
    if len(ids) == 0:
        raise ValidationError("no training identity has utterances" + (" and a target" if with_targets else ""), key="train")
    label_of = np.full(n_id, -1, np.int64)
    label_of[ids] = np.arange(len(ids))
    utt = np.flatnonzero(label_of[u_id] >= 0).astype(np.int64)
    if with_targets:
        targets = t[ids]
        n_fits = nf[ids]
        if shuffle_pairs:
            perm = np.random.default_rng([int(seed), 0x5F]).permutation(len(ids))
            targets = targets[perm]
            n_fits = n_fits[perm]
    return TrainingSet(
        split=split, identities=ids, names=[str(x) for x in split.identities["name"][ids]], utterances=utt,
        labels=label_of[u_id[utt]], targets=targets, n_fits=n_fits, shuffled=bool(shuffle_pairs and with_targets),
    )


# ------------------------------------------------------------------------------------- test time
def utterance_ids(paths) -> list:
    """Benchmark utterance ids ``<video>_<nnnnn>`` of VoxCeleb paths ``idNNNNN/<video>/<nnnnn>.wav``."""
    out = []
    for p in paths:
        parts = str(p).replace("\\", "/").split("/")
        stem = parts[-1].rsplit(".", 1)[0]
        video = parts[-2] if len(parts) >= 2 else ""
        out.append(f"{video}_{stem}" if video else stem)
    return out


def select_test_utterances(split, per_identity: int = 3, names=None):
    """The utterances the benchmark scores: per identity, the first ``per_identity`` in sorted order
    of video id then utterance id (as the official evaluation code takes them).

    Parameters
    ----------
    split : v2m_data.shards.SplitData
        Usually the test split.
    per_identity : int
        3 in the benchmark; identities with fewer utterances contribute what they have.
    names : sequence of str, optional
        Only these identities (VGGFace names, e.g. those of references.h5), in this order; names
        not in the split are ignored. Default: every identity of the split with utterances.

    Returns
    -------
    identity : list of str
        VGGFace name of each chosen utterance.
    utterances : (N,) int64
        Utterance numbers in ``split``.
    ids : list of str
        Benchmark utterance ids ``<video>_<nnnnn>``.
    """
    if int(per_identity) < 1:
        raise ValidationError(f"must be >= 1, got {per_identity}", key="per_identity")
    all_names = [str(x) for x in split.identities["name"]]
    row = {n: i for i, n in enumerate(all_names)}
    order = range(len(all_names)) if names is None else [row[str(n)] for n in names if str(n) in row]
    u_id = split.utterances["identity"].astype(np.int64)
    paths = split.utterances["path"]
    ident, utts, ids = [], [], []
    for n in order:
        mine = np.flatnonzero(u_id == n)
        keyed = sorted(mine.tolist(), key=lambda u: _video_utt_key(paths[u]))[: int(per_identity)]
        for u in keyed:
            ident.append(all_names[n])
            utts.append(u)
        ids.extend(utterance_ids(paths[keyed]))
    return ident, np.asarray(utts, np.int64), ids


def _video_utt_key(path) -> tuple:
    parts = str(path).replace("\\", "/").split("/")
    return (parts[-2] if len(parts) >= 2 else "", parts[-1])


def whole_utterances(split, utterances: Sequence[int]) -> list:
    """Whole normalised features ``(n_mels, n_frames)`` float32 of the given utterance numbers."""
    return [split.utterance_features(int(u)) for u in utterances]


def pad_batch(features: Sequence[np.ndarray], max_frames: int | None = None):
    """Zero-pad a list of ``(n_mels, T_i)`` arrays into a batch.

    Parameters
    ----------
    features : sequence of (n_mels, T_i) float arrays
    max_frames : int, optional
        Truncate longer utterances to this many frames.

    Returns
    -------
    x : torch.Tensor, (B, n_mels, max T_i) float32
    lengths : torch.Tensor, (B,) int64
    """
    import torch

    if not features:
        raise ValidationError("no utterances to batch", key="features")
    lens = [f.shape[1] if max_frames is None else min(f.shape[1], int(max_frames)) for f in features]
    x = np.zeros((len(features), features[0].shape[0], max(lens)), np.float32)
    for i, (f, n) in enumerate(zip(features, lens)):
        x[i, :, :n] = f[:, :n]
    return torch.from_numpy(x), torch.as_tensor(lens, dtype=torch.int64)
