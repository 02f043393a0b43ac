"""Identities of the dataset build: VoxCeleb1 metadata x VGGFace names, the A–E split, shards.

The candidate identities are the rows of VoxCeleb1's ``vox1_meta.csv`` (read with
:func:`v2m_bench.split.read_vox1_meta`: tab- or comma-separated, quoted or not) whose
``VGGFace1 ID`` is also a VGGFace identity. VGGFace names come from the annotation folder
(``files/<Name>.txt``) and/or the image folder (``<images>/<Name>/``). The split is v2m_bench's
A–E rule (:func:`v2m_bench.split.split_of`): names starting A–E are test identities, F–Z train.
On the released metadata with every name present: 1,251 identities, 309 test, 942 train; the
candidate list is compared with the frozen hashes by :func:`v2m_bench.split.check_metadata`.

Names are never used as raw paths. :func:`validate_component` accepts a name or id only when it is
one plain path component (no ``/``, ``\\``, NUL or control characters, not ``.``/``..``, no
leading dot, no surrounding whitespace); a row whose name or id fails is rejected with the reason
(:attr:`IdentityTable.rejected`) instead of being looked up. Output files are named by shard
number, never by identity; :func:`safe_key` gives each name an ASCII key usable as a file or HDF5
name where one is needed.

Shards: identities are grouped per split, sorted by VoxCeleb1 id, ``per_shard`` at a time
(:func:`plan_shards`); shard ``g`` of the global list (test shards first) belongs to job
``g % num_shards`` of a job array (:func:`job_shards`).
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from v2m_bench.errors import ValidationError
from v2m_bench.split import SplitCheck, check_metadata, read_vox1_meta, split_of

__all__ = [
    "Identity",
    "IdentityTable",
    "ShardPlan",
    "validate_component",
    "safe_key",
    "vggface_names",
    "find_vggface_dirs",
    "select_identities",
    "plan_shards",
    "job_shards",
    "SPLITS",
]

#: Split names, in the order shards are numbered.
SPLITS = ("test", "train")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def validate_component(value: str, what: str = "name") -> str:
    """Check that ``value`` is safe to use as one path component and return it.

    Parameters
    ----------
    value : str
        A VGGFace name, VoxCeleb1 id, video id or image id from a user file.
    what : str
        Named in the error message.

    Returns
    -------
    str
        ``value`` unchanged.

    Raises
    ------
    ValidationError
        Empty; ``.`` or ``..``; contains ``/``, ``\\``, NUL or a control character; starts with a
        dot; has leading or trailing whitespace; longer than 255 bytes.
    """
    v = str(value)
    why = None
    if v == "":
        why = "is empty"
    elif v in (".", ".."):
        why = "is a relative folder reference"
    elif "/" in v or "\\" in v:
        why = "contains a path separator"
    elif _CONTROL.search(v):
        why = "contains a control character"
    elif v.startswith("."):
        why = "starts with a dot"
    elif v != v.strip():
        why = "has leading or trailing whitespace"
    elif len(v.encode("utf-8")) > 255:
        why = "is longer than 255 bytes"
    if why:
        raise ValidationError(f"{v!r} {why}; refusing to use it as a file name", key=what)
    return v


def safe_key(name: str) -> str:
    """An ASCII key for ``name`` made of ``[A-Za-z0-9._-]`` (validated with :func:`validate_component`).

    Accents are folded (``Zoë`` -> ``Zoe``), other characters become ``_``; when the key differs
    from the name, ``-`` and the first 8 hex digits of the name's SHA-1 are appended so that
    different names never share a key.
    """
    validate_component(name)
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    key = _UNSAFE.sub("_", folded).lstrip(".") or "_"
    if key != name:
        key = f"{key}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"
    return key


@dataclass(frozen=True)
class Identity:
    """One VoxCeleb1 identity with its VGGFace name.

    Attributes
    ----------
    vox_id : str
        VoxCeleb1 id, e.g. ``"id10001"`` (its folder under ``wav/``).
    name : str
        VGGFace1 name, e.g. ``"A.J._Buckley"`` (its folder/annotation file under VGGFace).
    gender : str
        As in the metadata, lower-cased (``"m"``/``"f"`` in the release).
    split : str
        ``"test"`` (A–E) or ``"train"``.
    key : str
        :func:`safe_key` of the name.
    nationality, set : str
        Metadata columns (``""`` when absent).
    """

    vox_id: str
    name: str
    gender: str
    split: str
    key: str
    nationality: str = ""
    set: str = ""

    def to_dict(self) -> dict:
        return {
            "vox_id": self.vox_id,
            "name": self.name,
            "gender": self.gender,
            "split": self.split,
            "key": self.key,
            "nationality": self.nationality,
            "set": self.set,
        }


@dataclass
class IdentityTable:
    """The result of :func:`select_identities`.

    Attributes
    ----------
    identities : list of Identity
        Candidates (metadata ∩ VGGFace, valid names), sorted by ``vox_id``; after ``limit``.
    n_meta : int
        Rows of the metadata file.
    not_in_vggface : list of str
        Metadata names with no VGGFace annotation file or image folder (empty when no VGGFace
        names were given).
    rejected : list of dict
        ``{"vox_id", "name", "reason"}`` of rows whose id or name is not a safe path component.
    check : SplitCheck
        The candidate list (before ``limit``) compared with the frozen A–E split.
    limited : bool
        True when ``limit`` cut the list.
    """

    identities: list
    n_meta: int
    not_in_vggface: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    check: SplitCheck | None = None
    limited: bool = False

    def by_split(self, split: str) -> list:
        return [i for i in self.identities if i.split == split]

    @property
    def counts(self) -> dict:
        """``{"meta", "candidates", "test", "train", "not_in_vggface", "rejected"}``."""
        return {
            "meta": self.n_meta,
            "candidates": len(self.identities),
            "test": len(self.by_split("test")),
            "train": len(self.by_split("train")),
            "not_in_vggface": len(self.not_in_vggface),
            "rejected": len(self.rejected),
        }

    def summary(self) -> str:
        """One line: counts, and how the candidate list compares with the frozen split."""
        c = self.counts
        line = (
            f"{c['meta']} identities in the metadata, {c['candidates']} candidates "
            f"({c['test']} test A–E / {c['train']} train F–Z)"
        )
        if c["not_in_vggface"]:
            line += f", {c['not_in_vggface']} without VGGFace data"
        if c["rejected"]:
            line += f", {c['rejected']} rejected names"
        if self.check is not None:
            if self.check.ok:
                line += "; matches the frozen A–E split"
            else:
                diff = [d for d in self.check.differences if "name list" not in d]
                line += "; differs from the frozen A–E split (" + ("; ".join(diff) or "same counts, other names") + ")"
        if self.limited:
            line += " (limited)"
        return line


def find_vggface_dirs(vggface: str | os.PathLike, annotations: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """Locate the VGGFace image root and annotation folder.

    Parameters
    ----------
    vggface : path
        The VGGFace folder: images in ``<vggface>/images/<Name>/`` when that folder exists, else
        in ``<vggface>/<Name>/``.
    annotations : path, optional
        The folder of ``<Name>.txt`` files; default ``<vggface>/files`` when it exists.

    Returns
    -------
    (images_root, annotations_dir or None)

    Raises
    ------
    ValidationError
        ``vggface`` (or a given ``annotations``) is not a folder.
    """
    root = Path(vggface)
    if not root.is_dir():
        raise ValidationError("no such VGGFace folder", path=str(root))
    images = root / "images" if (root / "images").is_dir() else root
    if annotations is not None:
        ann = Path(annotations)
        if not ann.is_dir():
            raise ValidationError("no such VGGFace annotation folder", path=str(ann))
    else:
        ann = root / "files" if (root / "files").is_dir() else None
    return images, ann


def vggface_names(annotations: str | os.PathLike | None = None, images: str | os.PathLike | None = None) -> set:
    """VGGFace names found as ``<annotations>/<Name>.txt`` and/or ``<images>/<Name>/`` folders.

    Hidden entries (starting with a dot) and the ``files``/``images`` folders themselves are ignored.
    """
    names: set = set()
    if annotations is not None:
        for p in Path(annotations).iterdir():
            if p.suffix == ".txt" and not p.name.startswith(".") and p.is_file():
                names.add(p.stem)
    if images is not None:
        for p in Path(images).iterdir():
            if p.is_dir() and not p.name.startswith(".") and p.name not in ("files", "images"):
                names.add(p.name)
    return names


def select_identities(
    meta: str | os.PathLike,
    names: Iterable[str] | None = None,
    *,
    limit: int | None = None,
) -> IdentityTable:
    """Read the metadata, intersect with the VGGFace names, split A–E, validate names.

    Parameters
    ----------
    meta : path
        ``vox1_meta.csv``.
    names : iterable of str, optional
        VGGFace names available (:func:`vggface_names`); ``None`` keeps every metadata row.
    limit : int, optional
        Keep only the first ``limit`` candidates by VoxCeleb1 id (for trial builds).

    Returns
    -------
    IdentityTable

    Raises
    ------
    ValidationError
        The metadata file is missing, unreadable or malformed (names the file).
    """
    meta = Path(meta)
    if not meta.is_file():
        raise ValidationError("no such metadata file (VoxCeleb1 vox1_meta.csv)", path=str(meta))
    df = read_vox1_meta(meta)
    available = None if names is None else set(names)
    rows, rejected, missing = [], [], []
    for rec in df.to_dict("records"):
        vox_id, name = rec["VoxCeleb1 ID"], rec["VGGFace1 ID"]
        try:
            validate_component(vox_id, "VoxCeleb1 ID")
            validate_component(name, "VGGFace1 ID")
            split = split_of(name)
        except ValidationError as e:
            rejected.append({"vox_id": vox_id, "name": name, "reason": str(e)})
            continue
        if available is not None and name not in available:
            missing.append(name)
            continue
        rows.append(
            Identity(
                vox_id=vox_id,
                name=name,
                gender=str(rec.get("Gender", "")).lower(),
                split=split,
                key=safe_key(name),
                nationality=str(rec.get("Nationality", "")),
                set=str(rec.get("Set", "")),
            )
        )
    rows.sort(key=lambda i: i.vox_id)
    check = check_metadata([i.name for i in rows])
    limited = False
    if limit is not None:
        if int(limit) < 1:
            raise ValidationError(f"must be >= 1, got {limit}", key="limit_identities")
        limited = len(rows) > int(limit)
        rows = rows[: int(limit)]
    return IdentityTable(
        identities=rows,
        n_meta=len(df),
        not_in_vggface=sorted(missing),
        rejected=rejected,
        check=check,
        limited=limited,
    )


@dataclass(frozen=True)
class ShardPlan:
    """One shard: a group of identities of one split.

    Attributes
    ----------
    split : str
    index : int
        Index within the split.
    number : int
        Global index (test shards first); job ``number % num_shards`` of an array builds it.
    identities : tuple of Identity
    """

    split: str
    index: int
    number: int
    identities: tuple

    @property
    def name(self) -> str:
        """File stem, e.g. ``"train-00003"``."""
        return f"{self.split}-{self.index:05d}"


def plan_shards(identities: Sequence[Identity], per_shard: int) -> list:
    """Group identities into shards: per split, sorted by VoxCeleb1 id, ``per_shard`` at a time.

    Returns
    -------
    list of ShardPlan
        Test shards first, then train; ``number`` counts through both.
    """
    if int(per_shard) < 1:
        raise ValidationError(f"must be >= 1, got {per_shard}", key="identities_per_shard")
    out = []
    for split in SPLITS:
        ids = sorted((i for i in identities if i.split == split), key=lambda i: i.vox_id)
        for j in range(0, len(ids), int(per_shard)):
            out.append(ShardPlan(split, j // int(per_shard), len(out), tuple(ids[j : j + int(per_shard)])))
    return out


def job_shards(shards: Sequence[ShardPlan], shard_index: int = 0, num_shards: int = 1) -> list:
    """The shards job ``shard_index`` of ``num_shards`` builds: those with ``number % num_shards == shard_index``."""
    if int(num_shards) < 1:
        raise ValidationError(f"must be >= 1, got {num_shards}", key="num_shards")
    if not 0 <= int(shard_index) < int(num_shards):
        raise ValidationError(f"must be in [0, {num_shards}), got {shard_index}", key="shard_index")
    return [s for s in shards if s.number % int(num_shards) == int(shard_index)]
