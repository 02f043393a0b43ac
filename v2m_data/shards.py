"""HDF5 shards of the built dataset, and a torch-free reader over a build folder.

A build folder ``OUT/`` (see :mod:`v2m_data.building`) holds ``shards/<split>-<nnnnn>.h5``, one per
group of identities, ``references.h5`` and ``manifest.json``. This module writes one shard
(:func:`write_shard`, atomic, byte-reproducible) and reads a whole folder (:func:`open_dataset`).

Shard layout (format ``"v2m-shard"``, version 1)
------------------------------------------------
File attributes: ``format``, ``version``, ``split`` ("test"/"train"), ``index`` (within the split),
``fingerprint`` (SHA-256 of the shard's inputs and build parameters; a rerun skips a shard whose
fingerprint matches), ``n_identities``, ``n_utterances``, ``n_images``, ``n_mels``, ``crop_sizes``
(int array), ``landmark_dims`` (2 or 3).

``identity/``: ``vox_id``, ``name``, ``gender``, ``key`` -- (I,) UTF-8 strings, sorted by vox_id.

``utterance/`` (U successful utterances, ordered by identity then relative path):
  ``identity`` (U,) int32 row in ``identity/``; ``path`` (U,) str, relative to the VoxCeleb ``wav``
  root (``idNNNNN/<video>/<nnnnn>.wav``); ``duration`` (U,) float32 seconds decoded;
  ``voiced_duration`` (U,) float32 seconds kept by the VAD; ``n_frames`` (U,) int64;
  ``offset`` (U,) int64 first row in ``features``; ``features`` (sum n_frames, n_mels) float32,
  contiguous and uncompressed, so readers memory-map it: utterance ``u`` is
  ``features[offset[u] : offset[u] + n_frames[u]].T`` (normalised log-mel, Wen et al.).

``image/`` (M successful images, ordered by identity then image id):
  ``identity`` (M,) int32; ``image_id`` (M,) str (file stem); ``path`` (M,) str relative to the
  VGGFace image root (``<Name>/<id>.jpg``); ``box`` (M, 4) float32 box handed to the landmark
  detector (the VGGFace annotation box, or the detector's own; NaN when unknown);
  ``annotated_pose`` (M,) float32 VGGFace ``pose`` column (NaN when not annotated);
  ``landmarks`` (M, 68, 2) float32 0-based pixels; ``landmarks_depth`` (M, 68) float32 (only with a
  3-D detector); ``crop_box`` (M, 4) float32 the square the crops were cut from;
  ``crop<S>`` (M, S, S, 3) uint8 RGB crops for each size S in ``crop_sizes`` (64: GAN, 120:
  image->3DMM network).

``fit/`` (M,), the 3DMM landmark fit (:func:`v2m_data.fitting.fit_landmarks`): ``shape`` (M, 40) and
  ``expression`` (M, 10) float32 BFM coefficients; ``scale`` (M,) px per BFM unit; ``rotation``
  (M, 3, 3); ``translation`` (M, 2) px; ``pose`` (M, 3) float32 degrees ``(yaw, pitch, roll)`` with
  ``R = Rz(roll) Rx(pitch) Ry(yaw)`` as :func:`v2m_bench.render.view_rotation` (yaw > 0: face
  turned towards the image right; pitch > 0: tilted up);
  ``residual`` (M,) px mean landmark distance; ``residual_normalized`` (M,); ``converged`` (M,) bool;
  ``in_identity_label`` (M,) bool, the fits the identity's label below was made from.

``identity_fit/`` (I,), the identity-level label (:mod:`v2m_data.labels`): ``shape`` (I, 40) and
  ``expression`` (I, 10) float32, a robust aggregate of the identity's accepted fits (NaN rows when
  it has none); ``shape_spread`` (I, 40) float32 per-coefficient standard deviation over those fits
  (NaN below two); ``n_images`` (I,) int32. Attributes ``estimator`` and ``rule`` (JSON of
  :class:`v2m_data.labels.LabelRule`).

``report``: a scalar UTF-8 string holding JSON: ``{"counts": {...}, "failures": [...]}`` -- every
per-item failure of this shard with its reason (what ``manifest.json`` collects).

All datasets are written without timestamps (``track_times=False``) in a fixed order, so the same
inputs give the same bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from v2m_bench.errors import ValidationError
from v2m_bench.fileio import atomic_path, write_bytes

__all__ = [
    "SHARD_FORMAT",
    "SHARD_VERSION",
    "ShardContent",
    "write_shard",
    "read_shard_attrs",
    "read_shard_report",
    "shard_fingerprint_matches",
    "ShardFile",
    "SplitData",
    "BuildDataset",
    "open_dataset",
    "atomic_write_bytes",
]

SHARD_FORMAT = "v2m-shard"
SHARD_VERSION = 1
_STR = h5py.string_dtype("utf-8")


# --------------------------------------------------------------------------------------- writing
@dataclass
class ShardContent:
    """Everything one shard holds (arrays as documented in the module docstring).

    ``identities`` is a list of dicts with ``vox_id``, ``name``, ``gender``, ``key``; ``utterances``,
    ``images`` and ``fit`` map dataset names to arrays; ``report`` is JSON-serialisable.
    """

    split: str
    index: int
    fingerprint: str
    identities: list
    utterances: dict
    images: dict
    fit: dict
    report: dict
    n_mels: int
    crop_sizes: tuple
    landmark_dims: int
    identity_fit: dict | None = None
    identity_fit_attrs: dict | None = None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and link-safely (:func:`v2m_bench.fileio.write_bytes`)."""
    return write_bytes(path, data)


def _strings(values) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def write_shard(path: str | os.PathLike, content: ShardContent) -> Path:
    """Write one shard atomically (temporary file + ``os.replace``); same content, same bytes.

    Parameters
    ----------
    path : path
        Destination, e.g. ``OUT/shards/train-00003.h5``.
    content : ShardContent

    Returns
    -------
    Path
    """
    path = Path(path)
    c = content
    ident = c.identities

    def fill(tmp):
        with h5py.File(tmp, "w", libver=("earliest", "v110")) as f:
            f.attrs["format"] = SHARD_FORMAT
            f.attrs["version"] = np.int64(SHARD_VERSION)
            f.attrs["split"] = c.split
            f.attrs["index"] = np.int64(c.index)
            f.attrs["fingerprint"] = c.fingerprint
            f.attrs["n_identities"] = np.int64(len(ident))
            f.attrs["n_utterances"] = np.int64(len(c.utterances["path"]))
            f.attrs["n_images"] = np.int64(len(c.images["path"]))
            f.attrs["n_mels"] = np.int64(c.n_mels)
            f.attrs["crop_sizes"] = np.asarray(c.crop_sizes, np.int64)
            f.attrs["landmark_dims"] = np.int64(c.landmark_dims)

            def put(name, value):
                arr = np.asarray(value)
                if arr.dtype == object or arr.dtype.kind == "U":
                    f.create_dataset(name, data=_strings(arr.tolist()), dtype=_STR, track_times=False)
                else:
                    f.create_dataset(name, data=arr, track_times=False)

            for k in ("vox_id", "name", "gender", "key"):
                put(f"identity/{k}", _strings(i[k] for i in ident))
            for k in sorted(c.utterances):
                put(f"utterance/{k}", c.utterances[k])
            for k in sorted(c.images):
                put(f"image/{k}", c.images[k])
            for k in sorted(c.fit):
                put(f"fit/{k}", c.fit[k])
            if c.identity_fit is not None:
                for k in sorted(c.identity_fit):
                    put(f"identity_fit/{k}", c.identity_fit[k])
                for k, v in sorted((c.identity_fit_attrs or {}).items()):
                    f["identity_fit"].attrs[k] = v
            f.create_dataset(
                "report", data=json.dumps(c.report, sort_keys=True, ensure_ascii=False), dtype=_STR, track_times=False
            )

    with atomic_path(path) as tmp:
        fill(tmp)
    return path


# --------------------------------------------------------------------------------------- reading
def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise ValidationError(f"cannot open the shard (truncated or damaged?): {' '.join(str(e).split())}", path=str(path)) from None


def read_shard_attrs(path: str | os.PathLike) -> dict:
    """File attributes of a shard (validated ``format``/``version``)."""
    path = Path(path)
    with _open(path) as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    if attrs.get("format") != SHARD_FORMAT:
        raise ValidationError(f"not a {SHARD_FORMAT} file (format={attrs.get('format')!r})", path=str(path))
    if int(attrs.get("version", -1)) > SHARD_VERSION:
        raise ValidationError(f"version {attrs.get('version')} is newer than this reader ({SHARD_VERSION})", path=str(path))
    return attrs


def read_shard_report(path: str | os.PathLike) -> dict:
    """The ``report`` JSON of a shard (counts and per-item failures)."""
    path = Path(path)
    with _open(path) as f:
        raw = f["report"][()]
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


def shard_fingerprint_matches(path: str | os.PathLike, fingerprint: str) -> bool:
    """True when ``path`` is a complete, readable shard with this fingerprint (a rerun skips it)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        attrs = read_shard_attrs(path)
        read_shard_report(path)
    except (ValidationError, OSError, KeyError, ValueError):
        return False
    return attrs.get("fingerprint") == fingerprint


def _decode(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == object:
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr], dtype=object)
    return arr


class ShardFile:
    """One shard, read on demand.

    Parameters
    ----------
    path : path

    Attributes
    ----------
    path : Path
    attrs : dict
        File attributes (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.attrs = read_shard_attrs(self.path)
        self._features = None

    @property
    def split(self) -> str:
        return str(self.attrs["split"])

    @property
    def index(self) -> int:
        return int(self.attrs["index"])

    @property
    def n_utterances(self) -> int:
        return int(self.attrs["n_utterances"])

    @property
    def n_images(self) -> int:
        return int(self.attrs["n_images"])

    @property
    def n_identities(self) -> int:
        return int(self.attrs["n_identities"])

    def __repr__(self) -> str:
        return (
            f"ShardFile({self.path.name}: {self.n_identities} identities, {self.n_utterances} utterances, "
            f"{self.n_images} images)"
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_features"] = None  # memory maps are reopened in the receiving process
        return state

    def keys(self, group: str) -> list:
        """Dataset names of ``group`` ("identity", "utterance", "image" or "fit")."""
        with _open(self.path) as f:
            return sorted(f[group].keys()) if group in f else []

    def read(self, name: str, index=None) -> np.ndarray:
        """Read dataset ``name`` (e.g. ``"fit/shape"``), whole or rows ``index`` (slice or sorted ints)."""
        with _open(self.path) as f:
            if name not in f:
                raise ValidationError("no such dataset", path=str(self.path), key=name)
            ds = f[name]
            arr = ds[()] if index is None else ds[index]
        return _decode(np.asarray(arr))

    def report(self) -> dict:
        return read_shard_report(self.path)

    def features_array(self) -> np.ndarray:
        """All features of the shard, ``(sum n_frames, n_mels)`` float32, memory-mapped (read-only).

        Falls back to reading into memory when the dataset is not contiguous (e.g. a repacked file).
        """
        if self._features is None:
            with _open(self.path) as f:
                ds = f["utterance/features"]
                shape, dtype = ds.shape, ds.dtype
                offset = ds.id.get_offset() if ds.size else None
                contiguous = ds.chunks is None and ds.compression is None
                if ds.size == 0:
                    arr = np.zeros(shape, dtype)
                elif contiguous and offset is not None:
                    arr = None
                else:
                    arr = ds[()]
            if arr is None:
                arr = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)
            self._features = arr
        return self._features


class SplitData:
    """The utterances and images of one split, concatenated over its shards (index arrays in memory,
    features memory-mapped, crops read on demand).

    Identity, utterance and image numbers are global within the split: identities in shard order,
    utterances and images in shard order then file order.

    Attributes
    ----------
    split : str
    shards : list of ShardFile
    identities : dict of (I,) arrays
        ``vox_id``, ``name``, ``gender``, ``key`` (str) and ``shard`` (int, position in ``shards``).
    utterances : dict of (U,) arrays
        ``identity`` (global identity number), ``path``, ``duration``, ``voiced_duration``,
        ``n_frames``, ``shard``, ``row`` (row within the shard), ``offset`` (within the shard).
    images : dict of (M,) arrays
        ``identity``, ``image_id``, ``path``, ``box``, ``annotated_pose``, ``landmarks``,
        ``crop_box``, ``shard``, ``row`` (and ``landmarks_depth`` with a 3-D detector).
    fit : dict of (M, ...) arrays
        ``shape``, ``expression``, ``scale``, ``rotation``, ``translation``, ``pose``, ``residual``,
        ``residual_normalized``, ``converged`` (and ``in_identity_label``).
    identity_fit : dict of (I, ...) arrays
        The identity-level labels (``shape``, ``expression``, ``shape_spread``, ``n_images``);
        empty for shards written without them.
    """

    _UTT = ("identity", "path", "duration", "voiced_duration", "n_frames", "offset")
    _IMG_SKIP = ("identity",)

    def __init__(self, split: str, shards: Sequence[ShardFile]):
        self.split = split
        self.shards = list(shards)
        ident: dict = {k: [] for k in ("vox_id", "name", "gender", "key", "shard")}
        utt: dict = {k: [] for k in (*self._UTT, "shard", "row")}
        img: dict = {}
        fit: dict = {}
        idfit: dict = {}
        have_idfit = True
        base = 0
        for s_i, sh in enumerate(self.shards):
            with _open(sh.path) as f:
                for k in ("vox_id", "name", "gender", "key"):
                    ident[k].append(_decode(f[f"identity/{k}"][()]))
                n_id = len(ident["vox_id"][-1])
                ident["shard"].append(np.full(n_id, s_i, np.int32))
                nu = sh.n_utterances
                for k in self._UTT:
                    a = _decode(f[f"utterance/{k}"][()])
                    utt[k].append(a + base if k == "identity" else a)
                utt["shard"].append(np.full(nu, s_i, np.int32))
                utt["row"].append(np.arange(nu, dtype=np.int64))
                ni = sh.n_images
                for k in f["image"].keys():
                    if k.startswith("crop") and k != "crop_box":
                        continue
                    a = _decode(f[f"image/{k}"][()])
                    img.setdefault(k, []).append(a + base if k == "identity" else a)
                img.setdefault("shard", []).append(np.full(ni, s_i, np.int32))
                img.setdefault("row", []).append(np.arange(ni, dtype=np.int64))
                for k in f["fit"].keys():
                    fit.setdefault(k, []).append(f[f"fit/{k}"][()])
                if "identity_fit" in f:
                    for k in f["identity_fit"].keys():
                        idfit.setdefault(k, []).append(f[f"identity_fit/{k}"][()])
                else:
                    have_idfit = False
            base += n_id

        def cat(parts):
            return np.concatenate(parts) if parts else np.zeros(0)

        self.identities = {k: cat(v) for k, v in ident.items()}
        self.utterances = {k: cat(v) for k, v in utt.items()}
        self.images = {k: cat(v) for k, v in img.items()}
        self.fit = {k: cat(v) for k, v in fit.items()}
        self.identity_fit = {k: cat(v) for k, v in idfit.items()} if have_idfit and self.shards else {}

    def __repr__(self) -> str:
        return (
            f"SplitData({self.split}: {len(self.shards)} shards, {self.n_identities} identities, "
            f"{self.n_utterances} utterances, {self.n_images} images)"
        )

    @property
    def n_identities(self) -> int:
        return int(len(self.identities["vox_id"]))

    @property
    def n_utterances(self) -> int:
        return int(len(self.utterances["path"]))

    @property
    def n_images(self) -> int:
        return int(len(self.images.get("row", ())))

    def utterance_features(self, i: int, *, copy: bool = True) -> np.ndarray:
        """Features of utterance ``i``: ``(n_mels, n_frames)`` float32.

        ``copy=False`` returns a read-only ``(n_frames, n_mels)`` view into the memory map instead
        (no copy, frames first).
        """
        s = int(self.utterances["shard"][i])
        o = int(self.utterances["offset"][i])
        n = int(self.utterances["n_frames"][i])
        view = self.shards[s].features_array()[o : o + n]
        return np.ascontiguousarray(view.T) if copy else view

    def crops(self, indices, size: int = 64) -> np.ndarray:
        """Face crops of images ``indices``: ``(len(indices), size, size, 3)`` uint8 RGB."""
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        out = None
        shard = self.images["shard"][idx]
        row = self.images["row"][idx]
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            rows = row[sel]
            order = np.argsort(rows)
            data = self.shards[int(s)].read(f"image/crop{int(size)}", np.sort(rows))
            if out is None:
                out = np.empty((len(idx),) + data.shape[1:], data.dtype)
            out[sel[order]] = data
        if out is None:
            out = np.zeros((0, int(size), int(size), 3), np.uint8)
        return out

    def images_of(self, identity: int) -> np.ndarray:
        """Image numbers of identity ``identity`` (global number)."""
        return np.flatnonzero(self.images["identity"] == identity) if self.n_images else np.zeros(0, np.int64)

    def utterances_of(self, identity: int) -> np.ndarray:
        """Utterance numbers of identity ``identity`` (global number)."""
        return np.flatnonzero(self.utterances["identity"] == identity)


class BuildDataset:
    """A built dataset folder: its shards per split, manifest and references.

    Create with :func:`open_dataset`.

    Attributes
    ----------
    root : Path
    manifest : dict or None
        ``manifest.json`` (None while a build is unfinished).
    shards : list of ShardFile
        Every shard file present, test shards first.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValidationError("no such build folder", path=str(self.root))
        man = self.root / "manifest.json"
        self.manifest = json.loads(man.read_text(encoding="utf-8")) if man.is_file() else None
        files = sorted((self.root / "shards").glob("*.h5")) if (self.root / "shards").is_dir() else []
        self.shards = sorted((ShardFile(p) for p in files), key=lambda s: (s.split != "test", s.index))
        self._splits: dict = {}

    def __repr__(self) -> str:
        return f"BuildDataset({self.root}: {len(self.shards)} shards, splits {self.splits})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_splits"] = {}
        return state

    @property
    def splits(self) -> list:
        return sorted({s.split for s in self.shards})

    def split(self, name: str) -> SplitData:
        """Concatenated view of split ``name`` ("train" or "test")."""
        if name not in self._splits:
            self._splits[name] = SplitData(name, [s for s in self.shards if s.split == name])
        return self._splits[name]

    @property
    def references_path(self) -> Path:
        return self.root / "references.h5"

    def references(self):
        """``references.h5`` read with :func:`v2m_bench.formats.read_references`."""
        from v2m_bench.formats import read_references

        return read_references(self.references_path)

    def failures(self) -> list:
        """Every per-item failure recorded in the manifest (or in the shards when unfinished)."""
        if self.manifest is not None:
            return list(self.manifest.get("failures", []))
        out = []
        for s in self.shards:
            out.extend(s.report().get("failures", []))
        return out


def open_dataset(root: str | os.PathLike) -> BuildDataset:
    """Open a build folder written by ``v2m-build-dataset`` (no torch needed).

    Parameters
    ----------
    root : str or os.PathLike
        The build's ``OUT`` folder.

    Returns
    -------
    BuildDataset

    Examples
    --------
    >>> ds = open_dataset("OUT")                       # doctest: +SKIP
    >>> train = ds.split("train")                      # doctest: +SKIP
    >>> x = train.utterance_features(0)                # doctest: +SKIP
    >>> faces = train.crops([0, 1, 2], size=64)        # doctest: +SKIP
    >>> train.fit["shape"][:3]                         # doctest: +SKIP

    (``x``: (64, n_frames) float32 log-mel features; ``faces``: (3, 64, 64, 3) uint8 crops; the
    fit's shape coefficients (3, 40) float32; the examples need a built ``OUT`` folder.)
    """
    return BuildDataset(root)
