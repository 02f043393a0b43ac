"""The output folder: what a build writes there (names, format markers), the check that a folder
may be written, and the removal of the temporary files a killed build leaves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from v2m_bench.errors import ValidationError
from v2m_bench.formats import REFERENCES_FORMAT

from ..shards import SHARD_FORMAT

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "check_out", "clean_tmp", "h5_format", "is_shard_name"]

MANIFEST_FORMAT = "v2m-dataset-manifest"
MANIFEST_VERSION = 1

#: Temporary files this tool leaves when killed: ``.<destination name>.<8 or 16 hex digits>.tmp``.
_TMP = re.compile(r"^\.(?P<name>.+)\.(?:[0-9a-f]{8}|[0-9a-f]{16})\.tmp$")
_SHARD_FILE = re.compile(r"^(?:test|train)-\d{5}\.h5$")
_JOB_FILE = re.compile(r"^job-\d{5}-of-\d{5}\.json$")
_LOCK_FILE = re.compile(r"^\.lock(?:-job-\d{5}-of-\d{5})?$")
_TOP_FILES = ("manifest.json", "references.h5")


def is_shard_name(name: str) -> bool:
    """True for the name of a shard file (``test-00000.h5``, ``train-00012.h5``)."""
    return bool(_SHARD_FILE.match(name))


def _tmp_of(p: Path, allowed) -> bool:
    """True when ``p`` is a temporary file of a destination name that ``allowed`` accepts."""
    m = _TMP.match(p.name)
    return bool(m) and p.is_file() and not p.is_symlink() and allowed(m.group("name"))


def h5_format(path: Path) -> str | None:
    """The ``format`` attribute of an HDF5 file (None: a link, no file, unreadable or unmarked)."""
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


def check_out(out: Path) -> None:
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
            if h5_format(p) != REFERENCES_FORMAT:
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
                    if h5_format(q) != SHARD_FORMAT:
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


def clean_tmp(out: Path, names: Sequence[str] | None) -> int:
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

