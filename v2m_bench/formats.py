"""The benchmark's file formats: ``predictions.h5`` and ``references.h5`` (version 1).

The full specification is ``docs/formats.md``. In short:

predictions.h5
    ``identity`` (N,) and ``utterance`` (N,) UTF-8 strings, the pair unique per row; then either
    ``shape`` (N, 40) and ``expression`` (N, 10) 3DDFA BFM coefficients, or ``vertices``
    (N, 53215, 3) with a dataset attribute ``units`` in {bfm, mm, m}. File attributes
    ``format="v2m-predictions"``, ``version=1``, optionally ``model`` (a free-text name).
references.h5
    One row per test identity: ``identity`` (M,), ``gender`` (M,) ('m' or 'f'), coefficients or
    vertices as above, optional provenance datasets ``source_image`` (M,) str and
    ``fit_residual`` (M,) float, optional file attribute ``selection_rule``. File attributes
    ``format="v2m-references"``, ``version=1``.

Readers validate everything (one-line :class:`~v2m_bench.errors.ValidationError` naming the file
and the dataset or attribute) and return small dataclasses. Vertex datasets are read lazily: the
returned object keeps the file path and reads rows on demand, so a 903 x 53,215 x 3 file (577 MB)
never has to be in memory at once. Writers validate first and write atomically (a temporary file
in the destination folder, then ``os.replace``), so an existing file survives any failure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import h5py
import numpy as np

from .bfm import N_EXPRESSION, N_SHAPE, N_VERTICES
from .errors import ValidationError
from .fileio import atomic_path

__all__ = [
    "PREDICTIONS_FORMAT",
    "REFERENCES_FORMAT",
    "MAX_ROWS",
    "PLAUSIBLE_FACTOR",
    "check_face_meshes",
    "FORMAT_VERSION",
    "UNITS_TO_BFM",
    "GENDERS",
    "LazyVertices",
    "Predictions",
    "References",
    "Coverage",
    "write_predictions",
    "read_predictions",
    "write_references",
    "read_references",
    "check_coverage",
]

PREDICTIONS_FORMAT = "v2m-predictions"
#: Most rows a predictions or references file may hold (checked before reading).
MAX_ROWS = 10_000_000
REFERENCES_FORMAT = "v2m-references"
#: The version this code writes and the newest it reads.
FORMAT_VERSION = 1
#: Factor from each allowed ``units`` to BFM units (micrometres): 1 mm = 1,000 BFM units.
UNITS_TO_BFM = {"bfm": 1.0, "mm": 1_000.0, "m": 1_000_000.0}
GENDERS = ("m", "f")

#: Rows read at a time when scanning a vertex dataset (32 x 53,215 x 3 float32 = 20 MB).
_SCAN_ROWS = 32


# --------------------------------------------------------------------------- small helpers
def attr_str(value: Any) -> str | None:
    """An HDF5 attribute as a str (vlen str, fixed-length bytes, 0-d arrays), else None."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return str(value)
    return None


def _py(value: Any) -> Any:
    """An HDF5 attribute value as plain Python (str, int, float, list)."""
    s = attr_str(value)
    if s is not None:
        return s
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    return value


def _where(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _preview(items: Iterable[str], k: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(s) for s in items[:k])
    return shown + (f", ... ({len(items)} in all)" if len(items) > k else "")


def _positions(n: int, indices) -> np.ndarray:
    """Normalise an index (None, int, slice, int array, bool mask) to row positions."""
    if indices is None:
        return np.arange(n)
    try:
        return np.arange(n)[indices]
    except IndexError as e:
        raise ValidationError(f"row index out of range for {n} rows: {e}", key="indices") from None


# --------------------------------------------------------------------------- plausible faces
#: A mesh is taken for a face at its declared units when its extent along each axis is within
#: this factor (either way) of the model's mean face (BFM: 180,069 x 210,924 x 147,945 units).
#: A units mix-up (x1,000), a collapsed or all-zero mesh and overflowing coefficients fail it.
PLAUSIBLE_FACTOR = 10.0


def check_face_meshes(vertices, model, *, path=None, key: str = "vertices", rows=None) -> np.ndarray:
    """Refuse meshes that are not faces at their declared units (:data:`PLAUSIBLE_FACTOR`).

    Parameters
    ----------
    vertices : ndarray, shape (B, N, 3) or (N, 3)
        Meshes in BFM units (micrometres).
    model : MorphableModel
        Its mean face gives the expected size.
    path, key : optional
        Named in the message (the file and the dataset the rows come from).
    rows : int array, optional
        File row of each mesh, for the message.

    Returns
    -------
    ndarray
        ``vertices``, unchanged.

    Raises
    ------
    ValidationError
        Naming the first bad row, its extents and the accepted range.
    """
    v = out = np.asarray(vertices)
    if v.ndim == 2:
        v = v[None]
    if v.shape[0] == 0:
        return out
    rows = np.arange(v.shape[0]) if rows is None else np.atleast_1d(np.asarray(rows))
    # per-axis extremes by strided passes over the flat rows (a reduction over the middle axis of
    # (B, N, 3) is about ten times slower); NaN and inf propagate into them
    flat = v.reshape(v.shape[0], -1)
    hi_v = np.stack([flat[:, k::3].max(axis=1) for k in range(3)], axis=1).astype(np.float64)
    lo_v = np.stack([flat[:, k::3].min(axis=1) for k in range(3)], axis=1).astype(np.float64)
    finite = np.isfinite(hi_v).all(axis=1) & np.isfinite(lo_v).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        what = "its coefficients are so large that vertices overflow" if key != "vertices" else "non-finite vertices"
        raise ValidationError(f"row {int(rows[i])}: {what}; not a face", path=_where(path), key=key)
    ext = hi_v - lo_v
    mean = np.asarray(model.mean, np.float64)
    want = mean.max(axis=0) - mean.min(axis=0)
    lo, hi = want / PLAUSIBLE_FACTOR, want * PLAUSIBLE_FACTOR
    bad = ((ext < lo) | (ext > hi)).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        e = " x ".join(f"{x:,.4g}" for x in ext[i])
        m = " x ".join(f"{x:,.0f}" for x in want)
        raise ValidationError(
            f"row {int(rows[i])}: the mesh is {e} BFM units across (x, y, z), not a face at the declared units "
            f"(the model's mean face is {m}; accepted: 1/{PLAUSIBLE_FACTOR:g} to {PLAUSIBLE_FACTOR:g} times that "
            f"on each axis; {int(bad.sum())} of {v.shape[0]} meshes read so far fail); check 'units' or the predictor",
            path=_where(path), key=key,
        )
    return out


# --------------------------------------------------------------------------- validation of arrays
def _check_strings(values, key: str, n: int | None, path: Path | None) -> np.ndarray:
    """1-D array of non-empty str; returns a numpy unicode array."""
    arr = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if arr.ndim != 1:
        raise ValidationError(f"expected a 1-D array of strings, found shape {arr.shape}", path=_where(path), key=key)
    out = []
    for i, s in enumerate(arr.tolist()):
        if isinstance(s, bytes):
            try:
                s = s.decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationError(f"row {i} is not valid UTF-8", path=_where(path), key=key) from None
        if not isinstance(s, str):
            raise ValidationError(f"expected strings, row {i} is {type(s).__name__}", path=_where(path), key=key)
        if not s:
            raise ValidationError(f"row {i} is an empty string", path=_where(path), key=key)
        out.append(s)
    if n is not None and len(out) != n:
        raise ValidationError(f"expected {n} rows (as in 'identity'), found {len(out)}", path=_where(path), key=key)
    return np.array(out, dtype=str) if out else np.array([], dtype="<U1")


def _check_float(values, key: str, shape: tuple, path: Path | None, row_offset: int = 0) -> np.ndarray:
    """A finite float array of the expected shape (None = any size) as float32."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise ValidationError(f"expected floating-point numbers, found dtype {arr.dtype}", path=_where(path), key=key)
    _check_shape(arr.shape, key, shape, path)
    arr = arr.astype(np.float32, copy=False)
    _check_finite(arr, key, path, row_offset)
    return arr


def _check_shape(actual: tuple, key: str, shape: tuple, path: Path | None) -> None:
    if len(actual) != len(shape) or any(s is not None and a != s for a, s in zip(actual, shape)):
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValidationError(f"expected shape {want}, found {tuple(actual)}", path=_where(path), key=key)


def _check_finite(arr: np.ndarray, key: str, path: Path | None, row_offset: int = 0) -> None:
    if arr.size and not np.isfinite(arr).all():
        bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1) if arr.ndim > 1 else ~np.isfinite(arr)
        rows = np.flatnonzero(bad) + row_offset
        raise ValidationError(
            f"NaN or infinite values in {rows.size} row(s), first at row {rows[0]}", path=_where(path), key=key
        )


def _check_unique(keys: list[tuple], key: str, what: str, path: Path | None) -> None:
    seen: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        j = seen.setdefault(k, i)
        if j != i:
            shown = k[0] if len(k) == 1 else k
            raise ValidationError(f"duplicate {what} {shown!r} at rows {j} and {i}", path=_where(path), key=key)


def _check_units(units, path: Path | None) -> str:
    s = attr_str(units)
    if s not in UNITS_TO_BFM:
        raise ValidationError(
            f"attribute 'units' is {units!r}; expected one of {', '.join(UNITS_TO_BFM)}", path=_where(path), key="vertices"
        )
    return s


# --------------------------------------------------------------------------- lazy vertices
class LazyVertices:
    """Rows of an HDF5 ``vertices`` dataset, read from the file only when indexed.

    Behaves like a read-only array of shape (N, V, 3): ``len()``, ``.shape``, ``.dtype``,
    ``lv[i]`` / ``lv[idx]`` / ``lv[a:b]`` (each opens the file, reads those rows, closes it) and
    ``np.asarray(lv)`` (reads everything). Values are float32 in the file's ``units``.
    """

    def __init__(self, path: str | os.PathLike, key: str, shape: tuple[int, int, int], rows: np.ndarray | None = None):
        self.path = Path(path)
        self.key = key
        self._file_shape = tuple(int(s) for s in shape)
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int, int]:
        n = self._file_shape[0] if self._rows is None else len(self._rows)
        return (n, self._file_shape[1], self._file_shape[2])

    @property
    def dtype(self):
        return np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return 3

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyVertices({str(self.path)!r}, {self.key!r}, shape={self.shape})"

    def subset(self, indices) -> "LazyVertices":
        """A LazyVertices over some of these rows (nothing is read)."""
        pos = np.atleast_1d(_positions(len(self), indices))
        rows = pos if self._rows is None else self._rows[pos]
        return LazyVertices(self.path, self.key, self._file_shape, rows)

    def _read_rows(self, file_rows: np.ndarray) -> np.ndarray:
        """Read file rows in any order (duplicates allowed) as float32 (k, V, 3)."""
        if file_rows.size == 0:
            return np.empty((0,) + self._file_shape[1:], np.float32)
        uniq, inverse = np.unique(file_rows, return_inverse=True)
        try:
            with h5py.File(self.path, "r") as f:
                dset = f[self.key]
                if tuple(dset.shape) != self._file_shape:
                    raise ValidationError(
                        f"dataset changed since the file was read: shape {dset.shape}, was {self._file_shape}",
                        path=self.path,
                        key=self.key,
                    )
                if uniq[-1] - uniq[0] + 1 == uniq.size:  # a contiguous run: one hyperslab
                    data = dset[int(uniq[0]) : int(uniq[-1]) + 1]
                else:
                    data = dset[uniq.tolist()]
        except OSError as e:
            raise ValidationError(f"cannot read rows: {e}", path=self.path, key=self.key) from None
        return np.asarray(data, dtype=np.float32)[inverse.reshape(-1)]

    def __getitem__(self, indices) -> np.ndarray:
        pos = _positions(len(self), indices)
        single = pos.ndim == 0
        pos = np.atleast_1d(pos)
        file_rows = pos if self._rows is None else self._rows[pos]
        out = self._read_rows(file_rows)
        return out[0] if single else out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


# --------------------------------------------------------------------------- dataclasses
class _MeshRows:
    """Methods shared by Predictions and References (rows of coefficients or vertices)."""

    identity: np.ndarray
    shape: np.ndarray | None
    expression: np.ndarray | None
    vertices: Any
    units: str | None
    path: Path | None

    def __len__(self) -> int:
        return int(len(self.identity))

    @property
    def n_vertices(self) -> int | None:
        """Vertices per mesh of a vertex file; None for coefficients (the model decides)."""
        return None if self.vertices is None else int(self.vertices.shape[1])

    @property
    def kind(self) -> str:
        """``"vertices"`` or ``"coefficients"``."""
        return "vertices" if self.vertices is not None else "coefficients"

    def to_vertices(self, model=None, indices=None) -> np.ndarray:
        """Vertices in BFM units for some or all rows.

        Parameters
        ----------
        model : MorphableModel, optional
            Needed for coefficient rows (``v = mean + bases @ coefficients``); for vertex rows it
            is optional and, when given, its vertex count is checked.
        indices : int, slice, int array or bool mask, optional
            Rows to return (all when omitted). For a file-backed object only these rows are read.

        Returns
        -------
        ndarray, float32, shape (k, V, 3) (or (V, 3) for an int index), BFM units (micrometres).
        """
        pos = _positions(len(self), indices)
        if self.vertices is not None:
            v = self.vertices[pos]
            v = np.asarray(v, dtype=np.float32)
            factor = UNITS_TO_BFM[self.units or "bfm"]
            if factor != 1.0:
                v = v * np.float32(factor)
            if model is not None and v.shape[-2] != model.n_vertices:
                raise ValidationError(
                    f"{v.shape[-2]} vertices per mesh, the model has {model.n_vertices}",
                    path=_where(self.path),
                    key="vertices",
                )
            _check_finite(v.reshape((-1,) + v.shape[-2:]), "vertices", self.path)
            return v
        if model is None:
            raise ValidationError("coefficient rows need a MorphableModel to give vertices", path=_where(self.path), key="shape")
        if model.n_shape != self.shape.shape[1] or model.n_expression != self.expression.shape[1]:
            raise ValidationError(
                f"the model has {model.n_shape} shape / {model.n_expression} expression components, the file "
                f"{self.shape.shape[1]} / {self.expression.shape[1]}",
                path=_where(self.path),
                key="shape",
            )
        return model.vertices(self.shape[pos], self.expression[pos])

    def iter_vertices(self, model=None, chunk_size: int = _SCAN_ROWS, indices=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(positions, vertices)`` chunks of at most ``chunk_size`` rows (BFM units).

        Memory stays at ``chunk_size`` meshes whatever the file size.
        """
        pos = np.atleast_1d(_positions(len(self), indices))
        chunk_size = max(1, int(chunk_size))
        for start in range(0, pos.size, chunk_size):
            p = pos[start : start + chunk_size]
            yield p, self.to_vertices(model, p)

    def _subset_fields(self, pos: np.ndarray) -> dict:
        return dict(
            shape=None if self.shape is None else self.shape[pos],
            expression=None if self.expression is None else self.expression[pos],
            vertices=None
            if self.vertices is None
            else (self.vertices.subset(pos) if isinstance(self.vertices, LazyVertices) else self.vertices[pos]),
            units=self.units,
        )


def _coerce_coefficients(obj) -> None:
    """Let in-memory construction take lists: coefficients become float32 arrays."""
    for key in ("shape", "expression"):
        if getattr(obj, key) is not None:
            setattr(obj, key, np.asarray(getattr(obj, key), dtype=np.float32))


def _mesh_repr(obj, extra: str) -> str:
    where = f", path={str(obj.path)!r}" if obj.path is not None else ""
    units = f", units={obj.units!r}" if obj.vertices is not None else ""
    return f"{type(obj).__name__}({len(obj)} rows, {obj.kind}{units}{extra}{where})"


@dataclass(eq=False, repr=False)
class Predictions(_MeshRows):
    """The rows of a predictions.h5 file (or predictions made in memory).

    Attributes
    ----------
    identity, utterance : ndarray of str, shape (N,)
        VGGFace1 name of the speaker (as in vox1_meta.csv) and utterance id; the pair is unique.
    shape, expression : ndarray, float32, shape (N, 40) / (N, 10), or None
        3DDFA BFM coefficients (when the file holds coefficients).
    vertices : LazyVertices or ndarray, shape (N, V, 3), or None
        Meshes (when the file holds vertices), in ``units``; file-backed rows are read on demand.
    units : str or None
        ``"bfm"``, ``"mm"`` or ``"m"`` for vertices; None for coefficients.
    attrs : dict
        File attributes (``format``, ``version``, ``model``, ...).
    path : Path or None
        The file read.
    """

    identity: np.ndarray
    utterance: np.ndarray
    shape: np.ndarray | None = None
    expression: np.ndarray | None = None
    vertices: Any = None
    units: str | None = None
    attrs: dict = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self):
        self.identity = np.asarray(self.identity, dtype=str)
        self.utterance = np.asarray(self.utterance, dtype=str)
        _coerce_coefficients(self)

    @property
    def model(self) -> str | None:
        """The free-text ``model`` file attribute, if any."""
        return self.attrs.get("model")

    def subset(self, indices) -> "Predictions":
        """The given rows as a new Predictions (vertex rows stay lazy)."""
        pos = np.atleast_1d(_positions(len(self), indices))
        return Predictions(
            identity=self.identity[pos], utterance=self.utterance[pos], attrs=dict(self.attrs), path=self.path,
            **self._subset_fields(pos),
        )

    def __repr__(self) -> str:
        ids = len(set(self.identity.tolist()))
        return _mesh_repr(self, f", {ids} identities, model={self.model!r}")


@dataclass(eq=False, repr=False)
class References(_MeshRows):
    """The rows of a references.h5 file: one reference mesh per test identity.

    Attributes
    ----------
    identity : ndarray of str, shape (M,)
        VGGFace1 names, unique.
    gender : ndarray of str, shape (M,)
        ``"m"`` or ``"f"``.
    shape, expression, vertices, units
        As in :class:`Predictions`.
    source_image : ndarray of str, shape (M,), or None
        Provenance: the image each reference was fitted to, or the images an identity label was
        made from, joined by ``;``.
    fit_residual : ndarray, float32, shape (M,), or None
        Provenance: the fit's residual (its unit is the file attribute ``fit_residual_units``).
    attrs : dict
        File attributes (``format``, ``version``, ``selection_rule``, ...).
    path : Path or None
    """

    identity: np.ndarray
    gender: np.ndarray
    shape: np.ndarray | None = None
    expression: np.ndarray | None = None
    vertices: Any = None
    units: str | None = None
    source_image: np.ndarray | None = None
    fit_residual: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self):
        self.identity = np.asarray(self.identity, dtype=str)
        self.gender = np.asarray(self.gender, dtype=str)
        _coerce_coefficients(self)

    @property
    def selection_rule(self) -> str | None:
        return self.attrs.get("selection_rule")

    def index(self) -> dict[str, int]:
        """identity -> row."""
        return {name: i for i, name in enumerate(self.identity.tolist())}

    def subset(self, indices) -> "References":
        pos = np.atleast_1d(_positions(len(self), indices))
        return References(
            identity=self.identity[pos],
            gender=self.gender[pos],
            source_image=None if self.source_image is None else self.source_image[pos],
            fit_residual=None if self.fit_residual is None else self.fit_residual[pos],
            attrs=dict(self.attrs),
            path=self.path,
            **self._subset_fields(pos),
        )

    def __repr__(self) -> str:
        return _mesh_repr(self, f", selection_rule={self.selection_rule!r}")


# --------------------------------------------------------------------------- writing
def _atomic_h5(path: Path, fill) -> Path:
    """Write an HDF5 file atomically and link-safely (:func:`v2m_bench.fileio.atomic_path`)."""
    path = Path(path)
    if path.is_dir():
        raise ValidationError("is a folder, expected a file name", path=path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            fill(f)
    return path


def _filters(compression: str | None) -> dict:
    if compression in (None, "none"):
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    raise ValidationError(f"unknown compression {compression!r}; expected gzip, lzf or None", key="compression")


def _write_strings(f: h5py.File, key: str, values: np.ndarray) -> None:
    f.create_dataset(key, data=np.array(values.tolist(), dtype=object), dtype=h5py.string_dtype("utf-8"))


def _prepare_geometry(n: int, shape, expression, vertices, units, n_vertices, path):
    """Validate the geometry arguments of a writer; vertices may be an iterable (validated later)."""
    have_coeff = shape is not None or expression is not None
    if have_coeff and vertices is not None:
        raise ValidationError("give coefficients (shape, expression) or vertices, not both", path=path, key="vertices")
    if not have_coeff and vertices is None:
        raise ValidationError("give coefficients (shape and expression) or vertices", path=path, key="shape")
    if have_coeff:
        if shape is None or expression is None:
            missing = "shape" if shape is None else "expression"
            raise ValidationError("coefficients need both shape and expression", path=path, key=missing)
        shape = _check_float(shape, "shape", (n, N_SHAPE), path)
        expression = _check_float(expression, "expression", (n, N_EXPRESSION), path)
        return shape, expression, None, None
    units = _check_units(units, path)
    if isinstance(vertices, LazyVertices) or isinstance(vertices, (np.ndarray, list, tuple)) or hasattr(vertices, "__array__"):
        arr = vertices if isinstance(vertices, LazyVertices) else np.asarray(vertices)
        if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
            raise ValidationError(f"expected floating-point numbers, found dtype {arr.dtype}", path=path, key="vertices")
        if arr.ndim != 3 or arr.shape[0] != n or arr.shape[2] != 3 or (n_vertices is not None and arr.shape[1] != n_vertices):
            v = "V" if n_vertices is None else n_vertices
            raise ValidationError(f"expected shape ({n}, {v}, 3), found {tuple(arr.shape)}", path=path, key="vertices")
        vertices = arr  # values are checked chunk by chunk as they are written
    # anything else is an iterable of meshes, checked as it is consumed
    return None, None, vertices, units


def _vertex_chunks(vertices, n: int, chunk: int) -> Iterator[np.ndarray]:
    """Split an array/LazyVertices into row chunks, or pass an iterable's items through as (k, V, 3)."""
    if isinstance(vertices, (np.ndarray, LazyVertices)):
        for start in range(0, n, chunk):
            yield np.asarray(vertices[start : start + chunk])
    else:
        for item in vertices:
            a = np.asarray(item)
            yield a[None] if a.ndim == 2 else a


def _write_vertices(f, vertices, n: int, n_vertices: int | None, units: str, filters: dict, path: Path) -> None:
    dset = None
    v = n_vertices
    row = 0
    for chunk in _vertex_chunks(vertices, n, _SCAN_ROWS):
        if v is None and chunk.ndim == 3:
            v = chunk.shape[1]  # any count allowed: the first mesh fixes it
        chunk = _check_float(chunk, "vertices", (None, v, 3), path, row_offset=row)
        if row + chunk.shape[0] > n:
            raise ValidationError(f"more vertex rows than the {n} identity/utterance rows", path=path, key="vertices")
        if dset is None:
            dset = f.create_dataset("vertices", shape=(n, v, 3), dtype=np.float32, chunks=(1, v, 3), **filters)
            dset.attrs["units"] = units
        dset[row : row + chunk.shape[0]] = chunk
        row += chunk.shape[0]
    if row != n:
        raise ValidationError(f"{row} vertex rows for {n} identity/utterance rows", path=path, key="vertices")


def _write_attrs(f, fmt: str, attrs: dict | None, path: Path, **named) -> None:
    f.attrs["format"] = fmt
    f.attrs["version"] = np.int64(FORMAT_VERSION)
    for k, v in {**(attrs or {}), **{k: v for k, v in named.items() if v is not None}}.items():
        if k in ("format", "version"):
            raise ValidationError("is set by the writer; do not pass it in attrs", path=path, key=k)
        if not isinstance(v, (str, int, float, np.integer, np.floating)) or isinstance(v, bool):
            raise ValidationError(f"file attributes must be str, int or float, found {type(v).__name__}", path=path, key=k)
        f.attrs[k] = v


def write_predictions(
    path: str | os.PathLike,
    identity,
    utterance,
    *,
    shape=None,
    expression=None,
    vertices=None,
    units: str = "bfm",
    model: str | None = None,
    attrs: dict | None = None,
    n_vertices: int | None = N_VERTICES,
    compression: str | None = None,
) -> Path:
    """Write a predictions.h5 file atomically (nothing is left behind or replaced on failure).

    Parameters
    ----------
    path : str or path-like
        Destination; its folder is created if needed; an existing file is replaced only after the
        new one has been written completely.
    identity, utterance : sequence of str, length N
        VGGFace1 name and utterance id (e.g. ``"1TmvLk8sB-g_00001"``) of each row; pairs unique.
    shape, expression : array_like, shape (N, 40) / (N, 10)
        3DDFA BFM coefficients. Give these, or ``vertices``.
    vertices : array_like (N, V, 3), LazyVertices, or an iterable of (V, 3) / (k, V, 3) arrays
        Meshes in ``units``; an iterable is written as it is consumed (N rows in all), so a large
        file never needs to be in memory.
    units : {"bfm", "mm", "m"}
        Units of ``vertices`` (stored as the dataset attribute ``units``).
    model : str, optional
        Free-text name of the model (file attribute ``model``).
    attrs : dict, optional
        Further file attributes (str, int or float).
    n_vertices : int or None, default 53215
        Required vertices per mesh; None accepts any count (for small test models).
    compression : {None, "gzip", "lzf"}
        HDF5 filter of the float datasets.

    Returns
    -------
    Path of the written file.
    """
    path = Path(path)
    identity = _check_strings(identity, "identity", None, path)
    n = len(identity)
    if n == 0:
        raise ValidationError("no rows to write", path=path, key="identity")
    utterance = _check_strings(utterance, "utterance", n, path)
    _check_unique(list(zip(identity.tolist(), utterance.tolist())), "utterance", "(identity, utterance) pair", path)
    if model is not None and not isinstance(model, str):
        raise ValidationError(f"expected a str, found {type(model).__name__}", path=path, key="model")
    shape, expression, vertices, units = _prepare_geometry(n, shape, expression, vertices, units, n_vertices, path)
    filters = _filters(compression)

    def fill(f):
        _write_attrs(f, PREDICTIONS_FORMAT, attrs, path, model=model)
        _write_strings(f, "identity", identity)
        _write_strings(f, "utterance", utterance)
        if shape is not None:
            f.create_dataset("shape", data=shape, **filters)
            f.create_dataset("expression", data=expression, **filters)
        else:
            _write_vertices(f, vertices, n, n_vertices, units, filters, path)

    return _atomic_h5(path, fill)


def write_references(
    path: str | os.PathLike,
    identity,
    gender,
    *,
    shape=None,
    expression=None,
    vertices=None,
    units: str = "bfm",
    source_image=None,
    fit_residual=None,
    selection_rule: str | None = None,
    fit_residual_units: str | None = None,
    attrs: dict | None = None,
    n_vertices: int | None = N_VERTICES,
    compression: str | None = None,
) -> Path:
    """Write a references.h5 file atomically: one reference mesh per test identity.

    Parameters
    ----------
    path : str or path-like
    identity : sequence of str, length M
        VGGFace1 names, unique.
    gender : sequence of {"m", "f"}, length M
    shape, expression, vertices, units, n_vertices, compression
        As in :func:`write_predictions`.
    source_image : sequence of str, length M, optional
        Provenance: the image each reference was fitted to (e.g. ``"Name/00000123.jpg"``).
    fit_residual : array_like, shape (M,), optional
        Provenance: the residual of each fit (finite floats).
    selection_rule : str, optional
        Provenance: how the reference fit was chosen among the identity's fits (file attribute).
    fit_residual_units : str, optional
        Unit of ``fit_residual`` (file attribute), e.g. ``"px RMSE of 68 landmarks"``.
    attrs : dict, optional
        Further file attributes.

    Returns
    -------
    Path of the written file.
    """
    path = Path(path)
    identity = _check_strings(identity, "identity", None, path)
    m = len(identity)
    if m == 0:
        raise ValidationError("no rows to write", path=path, key="identity")
    _check_unique([(s,) for s in identity.tolist()], "identity", "identity", path)
    gender = _check_gender(_check_strings(gender, "gender", m, path), path)
    if source_image is not None:
        source_image = _check_strings(source_image, "source_image", m, path)
    if fit_residual is not None:
        fit_residual = _check_float(fit_residual, "fit_residual", (m,), path)
    for key, value in (("selection_rule", selection_rule), ("fit_residual_units", fit_residual_units)):
        if value is not None and not isinstance(value, str):
            raise ValidationError(f"expected a str, found {type(value).__name__}", path=path, key=key)
    shape, expression, vertices, units = _prepare_geometry(m, shape, expression, vertices, units, n_vertices, path)
    filters = _filters(compression)

    def fill(f):
        _write_attrs(
            f, REFERENCES_FORMAT, attrs, path, selection_rule=selection_rule, fit_residual_units=fit_residual_units
        )
        _write_strings(f, "identity", identity)
        _write_strings(f, "gender", gender)
        if source_image is not None:
            _write_strings(f, "source_image", source_image)
        if fit_residual is not None:
            f.create_dataset("fit_residual", data=fit_residual)
        if shape is not None:
            f.create_dataset("shape", data=shape, **filters)
            f.create_dataset("expression", data=expression, **filters)
        else:
            _write_vertices(f, vertices, m, n_vertices, units, filters, path)

    return _atomic_h5(path, fill)


def _check_gender(gender: np.ndarray, path) -> np.ndarray:
    bad = [(i, g) for i, g in enumerate(gender.tolist()) if g not in GENDERS]
    if bad:
        i, g = bad[0]
        raise ValidationError(f"row {i} is {g!r}; expected 'm' or 'f'", path=_where(path), key="gender")
    return gender


# --------------------------------------------------------------------------- reading
def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if path.is_dir():
        raise ValidationError("is a folder, expected an HDF5 file", path=path)
    try:
        if not h5py.is_hdf5(str(path)):
            raise ValidationError("not an HDF5 file", path=path)
        return h5py.File(path, "r")
    except OSError as e:
        msg = " ".join(str(e).split())
        if "unable to lock file" in msg.lower():
            raise ValidationError(
                "is locked by another program (still being written?); wait until it is done "
                "(on a file system without locks, set HDF5_USE_FILE_LOCKING=FALSE)", path=path) from None
        raise ValidationError(f"cannot open the HDF5 file (truncated or damaged?): {msg}", path=path) from None


def _dataset(f: h5py.File, key: str, path: Path, required: bool = True) -> h5py.Dataset | None:
    link = f.get(key, getlink=True)
    if link is None:
        if required:
            raise ValidationError("missing dataset", path=path, key=key)
        return None
    if isinstance(link, h5py.ExternalLink):
        raise ValidationError(f"is an external link to {link.filename}:{link.path}; external links are refused", path=path, key=key)
    if isinstance(link, h5py.SoftLink):
        raise ValidationError(f"is a soft link to {link.path}; links are refused, store the data itself", path=path, key=key)
    obj = f[key]
    if not isinstance(obj, h5py.Dataset):
        raise ValidationError(f"expected a dataset, found a {type(obj).__name__.lower()}", path=path, key=key)
    if obj.is_virtual:
        raise ValidationError("is a virtual dataset; virtual datasets are refused", path=path, key=key)
    if obj.external:
        raise ValidationError("stores its data in external files; external storage is refused", path=path, key=key)
    return obj


def _read_strings(f, key: str, n: int | None, path: Path, required: bool = True) -> np.ndarray | None:
    dset = _dataset(f, key, path, required)
    if dset is None:
        return None
    if h5py.check_string_dtype(dset.dtype) is None:
        raise ValidationError(f"expected strings, found dtype {dset.dtype}", path=path, key=key)
    if dset.ndim != 1:
        raise ValidationError(f"expected shape (N,), found {dset.shape}", path=path, key=key)
    if n is not None and dset.shape[0] != n:  # checked before anything is read
        raise ValidationError(f"expected {n} rows (as in 'identity'), found {dset.shape[0]}", path=path, key=key)
    if dset.shape[0] > MAX_ROWS:
        raise ValidationError(f"{dset.shape[0]} rows, more than the {MAX_ROWS} a file may hold", path=path, key=key)
    try:
        raw = dset[()]
    except OSError as e:
        raise ValidationError(f"cannot read: {e}", path=path, key=key) from None
    return _check_strings(np.asarray(raw, dtype=object), key, n, path)


def _check_row_counts(f, path: Path, others: tuple) -> None:
    """Refuse an ``identity`` longer than another per-row dataset before reading any of them."""
    ident = _dataset(f, "identity", path)
    if ident.ndim != 1:
        return  # reported by the reader with the usual message
    n = ident.shape[0]
    for key in others:
        if f.get(key, getlink=True) is None:
            continue
        other = _dataset(f, key, path)
        if other.ndim == 0 or other.shape[0] >= n:
            continue
        if key in ("shape", "expression"):
            _check_shape(other.shape, key, (n, N_SHAPE if key == "shape" else N_EXPRESSION), path)
        elif key == "vertices":
            raise ValidationError(f"expected shape ({n}, V, 3), found {other.shape}", path=path, key=key)
        raise ValidationError(f"expected {n} rows (as in 'identity'), found {other.shape[0]}", path=path, key=key)


def _read_float(f, key: str, shape: tuple, path: Path, required: bool = True) -> np.ndarray | None:
    dset = _dataset(f, key, path, required)
    if dset is None:
        return None
    if dset.dtype.kind != "f":
        raise ValidationError(f"expected floating-point numbers, found dtype {dset.dtype}", path=path, key=key)
    _check_shape(dset.shape, key, shape, path)  # before reading
    try:
        data = dset[()]
    except OSError as e:
        raise ValidationError(f"cannot read: {e}", path=path, key=key) from None
    return _check_float(data, key, shape, path)


def _read_format(f, path: Path, expected: str) -> dict:
    attrs = {k: _py(v) for k, v in f.attrs.items()}
    if "format" not in f.attrs:
        raise ValidationError(f"missing file attribute (expected {expected!r})", path=path, key="format")
    fmt = attr_str(f.attrs["format"])
    if fmt != expected:
        raise ValidationError(f"is {attrs['format']!r}, expected {expected!r}", path=path, key="format")
    if "version" not in f.attrs:
        raise ValidationError(f"missing file attribute (expected {FORMAT_VERSION})", path=path, key="version")
    version = f.attrs["version"]
    if isinstance(version, np.ndarray) and version.shape == ():
        version = version[()]
    if not isinstance(version, (int, np.integer)) or isinstance(version, (bool, np.bool_)):
        raise ValidationError(f"expected an integer, found {attrs['version']!r}", path=path, key="version")
    if version > FORMAT_VERSION:
        raise ValidationError(
            f"version {int(version)} is newer than this voice2mesh reads ({FORMAT_VERSION}); upgrade voice2mesh",
            path=path,
            key="version",
        )
    if version < 1:
        raise ValidationError(f"version {int(version)} is not a valid version", path=path, key="version")
    return attrs


def _read_geometry(f, n: int, path: Path, n_vertices: int | None, lazy: bool, check_values: bool) -> dict:
    names = [k for k in ("shape", "expression", "vertices") if f.get(k, getlink=True) is not None]
    if "vertices" in names and ("shape" in names or "expression" in names):
        raise ValidationError("holds both coefficients and vertices; keep one", path=path, key="vertices")
    if "vertices" not in names:
        if not names:
            raise ValidationError("missing dataset (give 'shape' and 'expression', or 'vertices')", path=path, key="shape")
        return dict(
            shape=_read_float(f, "shape", (n, N_SHAPE), path),
            expression=_read_float(f, "expression", (n, N_EXPRESSION), path),
        )
    dset = _dataset(f, "vertices", path)
    if dset.dtype.kind != "f":
        raise ValidationError(f"expected floating-point numbers, found dtype {dset.dtype}", path=path, key="vertices")
    shp = dset.shape
    if len(shp) != 3 or shp[0] != n or shp[2] != 3 or (n_vertices is not None and shp[1] != n_vertices):
        v = "V" if n_vertices is None else n_vertices
        raise ValidationError(f"expected shape ({n}, {v}, 3), found {shp}", path=path, key="vertices")
    if "units" not in dset.attrs:
        raise ValidationError(f"missing attribute 'units' (one of {', '.join(UNITS_TO_BFM)})", path=path, key="vertices")
    units = _check_units(dset.attrs["units"], path)
    data = None
    if check_values or not lazy:
        parts = []
        for start in range(0, n, _SCAN_ROWS):
            try:
                block = np.asarray(dset[start : start + _SCAN_ROWS], dtype=np.float32)
            except OSError as e:
                raise ValidationError(f"cannot read rows {start}..: {e}", path=path, key="vertices") from None
            _check_finite(block, "vertices", path, row_offset=start)
            if not lazy:
                parts.append(block)
        if not lazy:
            data = np.concatenate(parts) if parts else np.empty(shp, np.float32)
    vertices = data if data is not None else LazyVertices(path, "vertices", shp)
    return dict(vertices=vertices, units=units)


def read_predictions(
    path: str | os.PathLike,
    *,
    n_vertices: int | None = N_VERTICES,
    lazy: bool = True,
    check_values: bool = True,
) -> Predictions:
    """Read and validate a predictions.h5 file.

    Parameters
    ----------
    path : str or path-like
    n_vertices : int or None, default 53215
        Required vertices per mesh; None accepts any count.
    lazy : bool, default True
        Keep vertex rows in the file (:class:`LazyVertices`, read on demand) instead of loading
        them; coefficients are always loaded (they are small).
    check_values : bool, default True
        Scan vertex rows for NaN/inf now (in chunks of 32 meshes); when False, rows are checked
        as :meth:`Predictions.to_vertices` reads them.

    Returns
    -------
    Predictions

    Raises
    ------
    ValidationError
        Not an HDF5 file, truncated, wrong ``format``/``version``, a missing dataset, a wrong
        shape or dtype, NaN/inf, a duplicate (identity, utterance) pair, ``units`` not in
        {bfm, mm, m}, an external link, a virtual dataset or external storage. The message
        names the file and the dataset or attribute.
    """
    path = Path(path)
    with _open(path) as f:
        attrs = _read_format(f, path, PREDICTIONS_FORMAT)
        _check_row_counts(f, path, ("utterance", "shape", "expression", "vertices"))
        identity = _read_strings(f, "identity", None, path)
        n = len(identity)
        if n == 0:
            raise ValidationError("no rows", path=path, key="identity")
        utterance = _read_strings(f, "utterance", n, path)
        _check_unique(list(zip(identity.tolist(), utterance.tolist())), "utterance", "(identity, utterance) pair", path)
        geometry = _read_geometry(f, n, path, n_vertices, lazy, check_values)
    if "model" in attrs and not isinstance(attrs["model"], str):
        raise ValidationError(f"expected a str, found {attrs['model']!r}", path=path, key="model")
    return Predictions(identity=identity, utterance=utterance, attrs=attrs, path=path, **geometry)


def read_references(
    path: str | os.PathLike,
    *,
    n_vertices: int | None = N_VERTICES,
    lazy: bool = True,
    check_values: bool = True,
) -> References:
    """Read and validate a references.h5 file (parameters and errors as :func:`read_predictions`).

    Also checked: identities unique, ``gender`` in {m, f}, optional ``source_image`` (M,) strings
    and ``fit_residual`` (M,) finite floats.
    """
    path = Path(path)
    with _open(path) as f:
        attrs = _read_format(f, path, REFERENCES_FORMAT)
        _check_row_counts(f, path, ("gender", "shape", "expression", "vertices"))
        identity = _read_strings(f, "identity", None, path)
        m = len(identity)
        if m == 0:
            raise ValidationError("no rows", path=path, key="identity")
        _check_unique([(s,) for s in identity.tolist()], "identity", "identity", path)
        gender = _check_gender(_read_strings(f, "gender", m, path), path)
        source_image = _read_strings(f, "source_image", m, path, required=False)
        fit_residual = _read_float(f, "fit_residual", (m,), path, required=False)
        geometry = _read_geometry(f, m, path, n_vertices, lazy, check_values)
    return References(
        identity=identity,
        gender=gender,
        source_image=source_image,
        fit_residual=fit_residual,
        attrs=attrs,
        path=path,
        **geometry,
    )


# --------------------------------------------------------------------------- coverage
@dataclass(frozen=True)
class Coverage:
    """Which reference identities have predictions.

    Attributes
    ----------
    n_references : int
        Reference identities.
    n_covered : int
        Reference identities with at least one prediction.
    missing : tuple of str
        Reference identities without any prediction, sorted (NoW-style "missing" count).
    predictions_per_identity : dict
        identity -> number of prediction rows.
    """

    n_references: int
    n_covered: int
    missing: tuple[str, ...]
    predictions_per_identity: dict

    @property
    def complete(self) -> bool:
        return not self.missing

    def __str__(self) -> str:
        s = f"{self.n_covered}/{self.n_references} reference identities have predictions"
        if self.missing:
            s += f"; {len(self.missing)} missing: {_preview(self.missing)}"
        return s


def check_coverage(predictions, references, strict: bool = False) -> Coverage:
    """Check that predictions and references go together.

    Parameters
    ----------
    predictions : Predictions or path
    references : References or path
    strict : bool, default False
        Raise when some reference identities have no prediction (otherwise they are reported in
        ``Coverage.missing``).

    Returns
    -------
    Coverage

    Raises
    ------
    ValidationError
        A prediction identity is not among the references (always), or identities are missing
        under ``strict=True``.
    """
    if not isinstance(predictions, Predictions):
        predictions = read_predictions(predictions, check_values=False)
    if not isinstance(references, References):
        references = read_references(references, check_values=False)
    ref_ids = set(references.identity.tolist())
    counts: dict[str, int] = {}
    for name in predictions.identity.tolist():
        counts[name] = counts.get(name, 0) + 1
    unknown = sorted(set(counts) - ref_ids)
    if unknown:
        raise ValidationError(
            f"{len(unknown)} identities are not in the references"
            + (f" ({references.path})" if references.path is not None else "")
            + f": {_preview(unknown)}",
            path=_where(predictions.path),
            key="identity",
        )
    missing = tuple(sorted(ref_ids - set(counts)))
    cov = Coverage(
        n_references=len(ref_ids),
        n_covered=len(ref_ids) - len(missing),
        missing=missing,
        predictions_per_identity=dict(sorted(counts.items())),
    )
    if strict and missing:
        raise ValidationError(f"no predictions for {len(missing)} reference identities: {_preview(missing)}",
                              path=_where(predictions.path), key="identity")
    return cov
