"""Write the meshes of a predictions.h5 or references.h5 file as OBJ or PLY files.

:func:`export_meshes` writes one file per row into a folder:

- predictions: ``OUT/<identity>/<utterance>.<ext>`` (the official release's layout, so
  ``v2m-bench convert-cmp`` reads an OBJ export back);
- references: ``OUT/<identity>.<ext>``;

plus ``OUT/index.csv`` mapping every row (identity, utterance) to its file. Which kind a file
holds is read from its ``format`` attribute.

Names come from the file, so they are made safe before they become paths
(:func:`safe_name`): every character other than letters, digits, ``.``, ``_``, ``-`` and ``+``
becomes ``_`` (path separators included), leading dots and trailing dots/spaces are removed, and
reserved device names (``CON``, ``NUL``, ...) get a leading ``_``; a name that had to change gets
``_`` plus 8 hex digits of the SHA-256 of the original appended, so that two different names
cannot end up in the same file. Every path is checked to lie inside ``OUT`` before writing.

Meshes are the BFM vertices (``Predictions.to_vertices``) in BFM units (micrometres) or
millimetres, with the BFM's triangles (counter-clockwise seen from outside, normals out).
OBJ: ``v x y z`` lines then 1-based ``f a b c`` lines. PLY: binary little-endian, float32
``x y z`` per vertex, faces as a ``uchar`` count and three ``int`` vertex ids.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ValidationError
from .fileio import progress as progress_bar
from .fileio import write_bytes

__all__ = ["EXPORT_FORMATS", "EXPORT_UNITS", "ExportResult", "safe_name", "obj_bytes", "ply_bytes", "write_mesh",
           "export_meshes"]

EXPORT_FORMATS = ("obj", "ply")
#: Output units and the factor from BFM units (micrometres).
EXPORT_UNITS = {"bfm": 1.0, "mm": 1e-3}

_UNSAFE = re.compile(r"[^\w.+-]", re.UNICODE)
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_MAX_NAME = 120
_MAX_NAME_BYTES = 240


def safe_name(name: str) -> str:
    """A file-name-safe version of ``name`` (one path component; see the module docstring).

    Names made only of letters, digits and ``._-+`` (not starting with a dot) come back
    unchanged; any other name is cleaned and gets ``_<8 hex digits of its SHA-256>`` appended.

    Examples
    --------
    >>> safe_name("A.J._Buckley")
    'A.J._Buckley'
    >>> safe_name("../../etc/passwd")[:14]
    '_.._etc_passwd'
    """
    s = str(name)
    clean = unicodedata.normalize("NFC", s)
    clean = _UNSAFE.sub("_", clean).lstrip(".").rstrip(". ")
    if clean.split(".")[0].upper() in _RESERVED:
        clean = "_" + clean
    clean = clean[:_MAX_NAME]
    # file systems count bytes (255 a name): room for "_<8 hex>" and a suffix
    clean = clean.encode("utf-8")[:_MAX_NAME_BYTES].decode("utf-8", "ignore")
    if clean != s or not clean:
        clean = f"{clean}_{hashlib.sha256(s.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return clean


def _inside(root: Path, path: Path) -> Path:
    r = root.resolve()
    p = path.resolve()
    if p != r and r not in p.parents:
        raise ValidationError(f"refusing to write outside the output folder: {path}", path=root)
    return path


def obj_bytes(vertices, triangles) -> bytes:
    """An OBJ file: ``v x y z`` lines (9 significant digits: float32 round-trips) and 1-based faces.

    Parameters
    ----------
    vertices : array_like, shape (N, 3)
    triangles : array_like, shape (F, 3), int, 0-based
    """
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    out = io.StringIO()
    out.write(("v %.9g %.9g %.9g\n" * v.shape[0]) % tuple(v.ravel()))
    out.write(_obj_faces(triangles))
    return out.getvalue().encode("ascii")


def _obj_faces(triangles) -> str:
    t = np.asarray(triangles, dtype=np.int64).reshape(-1, 3) + 1
    return ("f %d %d %d\n" * t.shape[0]) % tuple(t.ravel())


def ply_bytes(vertices, triangles, comment: str | None = None) -> bytes:
    """A binary little-endian PLY: float32 ``x y z`` vertices, ``uchar``-counted ``int`` faces.

    Parameters
    ----------
    vertices : array_like, shape (N, 3)
    triangles : array_like, shape (F, 3), int, 0-based
    comment : str, optional
        One header comment line (newlines are replaced by spaces).
    """
    v = np.ascontiguousarray(np.asarray(vertices, dtype="<f4").reshape(-1, 3))
    t = np.asarray(triangles, dtype=np.int64).reshape(-1, 3)
    head = ["ply", "format binary_little_endian 1.0"]
    if comment:
        head.append("comment " + " ".join(str(comment).split()))
    head += [f"element vertex {v.shape[0]}", "property float x", "property float y", "property float z",
             f"element face {t.shape[0]}", "property list uchar int vertex_indices", "end_header"]
    faces = np.empty(t.shape[0], dtype=[("n", "u1"), ("i", "<i4", (3,))])
    faces["n"] = 3
    faces["i"] = t
    return ("\n".join(head) + "\n").encode("ascii") + v.tobytes() + faces.tobytes()


def write_mesh(path, vertices, triangles, fmt: str | None = None) -> Path:
    """Write one mesh as OBJ or PLY (format from ``fmt`` or the suffix), atomically.

    Parameters
    ----------
    path : str or path-like
    vertices : array_like, shape (N, 3)
    triangles : array_like, shape (F, 3), int, 0-based, counter-clockwise seen from outside
    fmt : {"obj", "ply"}, optional
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in EXPORT_FORMATS:
        raise ValidationError(f"unknown mesh format {fmt!r}; expected obj or ply", key="format")
    data = obj_bytes(vertices, triangles) if fmt == "obj" else ply_bytes(vertices, triangles)
    write_bytes(path, data)
    return path


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_meshes` wrote."""

    out: Path
    kind: str
    n_meshes: int
    format: str
    units: str
    files: tuple

    def __str__(self) -> str:
        return f"wrote {self.n_meshes} {self.kind} meshes ({self.format}, {self.units} units) into {self.out}"


def _file_kind(path: Path) -> str:
    import h5py

    from .formats import PREDICTIONS_FORMAT, REFERENCES_FORMAT, attr_str

    try:
        with h5py.File(path, "r") as f:
            fmt = attr_str(f.attrs["format"]) if "format" in f.attrs else None
    except FileNotFoundError:
        raise ValidationError("no such file", path=path) from None
    except OSError as e:
        raise ValidationError(f"not a readable HDF5 file ({e})", path=path) from None
    kinds = {PREDICTIONS_FORMAT: "predictions", REFERENCES_FORMAT: "references"}
    if fmt not in kinds:
        raise ValidationError(f"is {fmt!r}; expected {PREDICTIONS_FORMAT!r} or {REFERENCES_FORMAT!r}", path=path,
                              key="format")
    return kinds[fmt]


def export_meshes(path, out, model=None, *, format: str = "obj", units: str = "bfm", chunk_size: int = 16,
                  progress: bool = False) -> ExportResult:
    """Write every row of a predictions.h5 or references.h5 as a mesh file.

    Parameters
    ----------
    path : str or path-like
        A predictions.h5 or references.h5 (told apart by the ``format`` attribute).
    out : str or path-like
        Output folder (created). Existing files of the same names are replaced.
    model : MorphableModel or path, optional
        The BFM (triangles; vertices of coefficient rows); found as :func:`~v2m_bench.bfm.load_bfm` does.
    format : {"obj", "ply"}
    units : {"bfm", "mm"}
        BFM units (micrometres) or millimetres.
    chunk_size : int
        Rows read at a time.
    progress : bool
        Show a progress bar.

    Returns
    -------
    ExportResult

    Raises
    ------
    ValidationError
        An unreadable file or one of another format, an unknown format or units, two rows whose
        names give the same file, or ``out`` being a file.
    """
    from .bfm import MorphableModel, load_bfm
    from .formats import read_predictions, read_references

    fmt = str(format).lower()
    if fmt not in EXPORT_FORMATS:
        raise ValidationError(f"unknown format {format!r}; expected obj or ply", key="format")
    if units not in EXPORT_UNITS:
        raise ValidationError(f"unknown units {units!r}; expected bfm or mm", key="units")
    path = Path(path)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValidationError("exists and is not a folder", path=out)
    kind = _file_kind(path)
    rows = read_predictions(path) if kind == "predictions" else read_references(path)
    if not isinstance(model, MorphableModel):
        model = load_bfm(model)
    ids = np.asarray(rows.identity).astype(str)
    utts = np.asarray(rows.utterance).astype(str) if kind == "predictions" else None
    rel = []
    for i, ident in enumerate(ids.tolist()):
        name = safe_name(ident)
        rel.append(Path(name) / f"{safe_name(utts[i])}.{fmt}" if utts is not None else Path(f"{name}.{fmt}"))
    seen = {}
    for i, r in enumerate(rel):
        key = r.as_posix().lower()  # case-insensitive file systems
        if key in seen:
            raise ValidationError(f"rows {seen[key]} and {i} would both be written to {r.as_posix()}", path=path)
        seen[key] = i
    out.mkdir(parents=True, exist_ok=True)
    targets = [_inside(out, out / r) for r in rel]
    factor = EXPORT_UNITS[units]
    faces = _obj_faces(model.triangles).encode("ascii") if fmt == "obj" else None
    bar = progress_bar(total=len(rel), desc="export", unit="mesh", enabled=progress)
    try:
        for pos, verts in rows.iter_vertices(model, chunk_size=chunk_size):
            for j, row in enumerate(pos.tolist()):
                v = verts[j].astype(np.float64) * factor
                if fmt == "obj":
                    data = (("v %.9g %.9g %.9g\n" * v.shape[0]) % tuple(v.ravel())).encode("ascii") + faces
                else:
                    data = ply_bytes(v, model.triangles, comment=f"voice2mesh {kind}, units {units}")
                write_bytes(targets[row], data)
            bar.update(len(pos))
    finally:
        bar.close()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["identity", "utterance", "file"] if utts is not None else ["identity", "file"])
    for i, r in enumerate(rel):
        w.writerow([ids[i], utts[i], r.as_posix()] if utts is not None else [ids[i], r.as_posix()])
    write_bytes(out / "index.csv", buf.getvalue().encode("utf-8"))
    return ExportResult(out=out, kind=kind, n_meshes=len(rel), format=fmt, units=units,
                        files=tuple(targets))
