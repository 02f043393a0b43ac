"""Import the official Cross-Modal-Perceptionist prediction layout into predictions.h5.

The official evaluation scripts write one OBJ per prediction as
``FOLDER/<VGGFace1 name>/<video id>_<utterance id>.obj`` (53,215 ``v x y z`` lines, optionally
with colours after xyz, then the faces). :func:`convert_cmp` reads every such file and writes a
predictions.h5 with ``vertices``: identity = the folder name, utterance = the file stem.

Units. The official code does not write BFM units: it writes ``s * (u + W a)``, the BFM
vertices multiplied by a predicted 3DDFA pose scale ``s`` (the supervised model's whitening
puts the mean of ``s`` at 5.920184e-4, the scale that maps the BFM onto a 120-pixel crop), so
its meshes are about 107 units wide where the BFM mean face is 180,000. Its own metrics are
scale-free (ratios, or a rescaling by the outer-eye distance), so this never showed.
``units="official"`` divides by that mean scale and stores BFM units; the per-mesh scale is
not recoverable, so absolute sizes are then right only to within a few per cent.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bfm import N_VERTICES
from .errors import ValidationError
from .fileio import progress as progress_bar
from .formats import UNITS_TO_BFM, write_predictions

__all__ = [
    "OFFICIAL_SCALE",
    "CONVERT_UNITS",
    "ConvertResult",
    "read_obj_vertices",
    "find_cmp_files",
    "convert_cmp",
]

#: Mean of the predicted pose scale in the official supervised model (its whitening constant):
#: official OBJ coordinates / OFFICIAL_SCALE ~= BFM units.
OFFICIAL_SCALE = 5.920184194110334e-4

#: Accepted ``units`` of convert_cmp: the file units plus "official" (see the module docstring).
CONVERT_UNITS = ("bfm", "mm", "m", "official")

#: Plausible largest extent of a face mesh in BFM units (the BFM mean face: 180,069 x 210,924 x
#: 147,945). A tenfold margin each way catches a units mix-up (a factor of 1,000) and nothing else.
_PLAUSIBLE_EXTENT_BFM = (2.0e4, 2.0e6)

_VERTEX_LINE = re.compile(rb"^[ \t]*v[ \t]+([^\r\n]*)", re.MULTILINE)


def read_obj_vertices(path: str | os.PathLike, expected_vertices: int | None = None) -> np.ndarray:
    """The vertex positions of an OBJ file (``v x y z [w | r g b]`` lines; everything else ignored).

    Parameters
    ----------
    path : str or path-like
    expected_vertices : int, optional
        Required number of vertices.

    Returns
    -------
    ndarray, float32, shape (V, 3), in the file's units.

    Raises
    ------
    ValidationError
        No vertices, an unparsable ``v`` line, or a vertex count other than ``expected_vertices``;
        the message names the file.
    """
    path = Path(path)
    data = path.read_bytes()
    rows = _VERTEX_LINE.findall(data)
    if not rows:
        raise ValidationError("no 'v x y z' lines: not an OBJ mesh", path=path)
    if expected_vertices is not None and len(rows) != expected_vertices:
        raise ValidationError(f"{len(rows)} vertices, expected {expected_vertices}", path=path)
    try:  # numpy's C parser; trailing "# ..." comments and extra columns (colours) are ignored
        values = np.loadtxt(io.BytesIO(b"\n".join(rows)), dtype=np.float64, usecols=(0, 1, 2), ndmin=2)
    except ValueError:
        values = None
    if values is None:  # ragged rows (some with colours) or bad text: parse line by line for the message
        values = np.empty((len(rows), 3), np.float64)
        for i, row in enumerate(rows):
            parts = row.split(b"#", 1)[0].split()
            try:
                if len(parts) < 3:
                    raise ValueError("fewer than 3 numbers")
                values[i] = [float(p) for p in parts[:3]]
            except ValueError:
                text = row.decode("utf-8", "replace")[:60]
                raise ValidationError(f"vertex {i + 1}: cannot read 'v {text}'", path=path) from None
    if not np.isfinite(values).all():
        i = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise ValidationError(f"vertex {i + 1} is NaN or infinite", path=path)
    return values.astype(np.float32)


def find_cmp_files(folder: str | os.PathLike) -> list[tuple[str, str, Path]]:
    """The OBJ files of the official layout ``FOLDER/<Name>/<video>_<utt>.obj``.

    Returns
    -------
    list of (identity, utterance, path), sorted by identity then utterance.

    Raises
    ------
    ValidationError
        The folder does not exist, holds OBJ files directly (not in per-identity folders), or
        holds no OBJ file at all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValidationError("no such folder" if not folder.exists() else "not a folder", path=folder)
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".obj")
    if loose:
        raise ValidationError(
            f"{len(loose)} .obj files directly in the folder (e.g. {loose[0]!r}); expected FOLDER/<Name>/<video>_<utt>.obj",
            path=folder,
        )
    root = folder.resolve()
    out = []
    for sub in sorted(folder.iterdir()):
        _check_entry(sub, root, folder)
        if not sub.is_dir():
            continue
        if sub.name.startswith("."):
            raise ValidationError(f"hidden folder {_shown(sub.name)}: identity folders cannot start with '.'; "
                                  "move it out of FOLDER", path=folder)
        ident = _utf8(sub.name, sub)
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() != ".obj":
                continue
            _check_entry(f, root, folder)
            if f.name.startswith("."):
                raise ValidationError("hidden .obj file: utterance names cannot start with '.'; move it out of FOLDER",
                                      path=_shown(f))
            if not f.is_file():
                raise ValidationError("not a regular file (a folder, FIFO or device named .obj)", path=_shown(f))
            out.append((ident, _utf8(f.stem, f), f))
    if not out:
        raise ValidationError("no .obj files in FOLDER/<Name>/ (expected FOLDER/<Name>/<video>_<utt>.obj)", path=folder)
    return out


def _shown(p) -> str:
    """A path for a message: undecodable bytes shown as escapes, never raising."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def _utf8(name: str, path: Path) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("name is not valid UTF-8 (identities and utterances are stored as UTF-8); rename it",
                              path=_shown(path)) from None
    return name


def _check_entry(p: Path, root: Path, folder: Path) -> None:
    """Refuse links leading out of FOLDER, dangling links, FIFOs, sockets and devices."""
    if p.is_symlink():
        if not p.exists():
            raise ValidationError("dangling symbolic link", path=_shown(p))
        target = p.resolve()
        if target != root and root not in target.parents:
            raise ValidationError(f"symbolic link to {_shown(target)}, outside {_shown(folder)}; "
                                  "convert-cmp reads only what is inside FOLDER", path=_shown(p))
    if p.exists() and not (p.is_dir() or p.is_file()):
        raise ValidationError("not a regular file or folder (a FIFO, socket or device)", path=_shown(p))


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_cmp` wrote."""

    path: Path
    n_meshes: int
    n_identities: int
    units: str
    n_vertices: int

    def __str__(self) -> str:
        return (
            f"wrote {self.path}: {self.n_meshes} meshes of {self.n_identities} identities, "
            f"{self.n_vertices} vertices each, units {self.units}"
        )


def _check_scale(v: np.ndarray, units: str, path: Path) -> None:
    extent_bfm = float(np.ptp(v, axis=0).max()) * UNITS_TO_BFM[units]
    lo, hi = _PLAUSIBLE_EXTENT_BFM
    if not lo <= extent_bfm <= hi:
        size = extent_bfm / UNITS_TO_BFM[units]
        raise ValidationError(
            f"the mesh is {size:.4g} {units} across, not the size of a face in {units} "
            f"(the BFM mean face is 210,924 bfm = 211 mm = 0.211 m); pass the right --units "
            "(official meshes: --units official), or --no-scale-check",
            path=path,
        )


def convert_cmp(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    units: str = "bfm",
    expected_vertices: int | None = N_VERTICES,
    model: str | None = None,
    compression: str | None = None,
    check_scale: bool = True,
    progress: bool = False,
) -> ConvertResult:
    """Convert ``FOLDER/<Name>/<video>_<utt>.obj`` meshes into a predictions.h5 file.

    Parameters
    ----------
    folder : str or path-like
        The official output layout (one folder per VGGFace1 name).
    out : str or path-like
        predictions.h5 to write (atomically: on any error an existing file is left as it was).
    units : {"bfm", "mm", "m", "official"}, default "bfm"
        Units of the OBJ coordinates. bfm/mm/m are stored as they are with that ``units``
        attribute; "official" divides by :data:`OFFICIAL_SCALE` and stores ``bfm`` (see the
        module docstring).
    expected_vertices : int or None, default 53215
        Vertices every OBJ must have (None: any count, the same in every file).
    model : str, optional
        Free-text model name for the file attribute ``model``.
    compression : {None, "gzip", "lzf"}
    check_scale : bool, default True
        Refuse meshes whose size is implausible for a face in ``units`` (a units mix-up).
    progress : bool, default False
        Show a progress bar over the files.

    Returns
    -------
    ConvertResult
    """
    if units not in CONVERT_UNITS:
        raise ValidationError(f"unknown units {units!r}; expected one of {', '.join(CONVERT_UNITS)}", key="units")
    files = find_cmp_files(folder)
    file_units = "bfm" if units == "official" else units
    factor = 1.0 / OFFICIAL_SCALE if units == "official" else 1.0
    counts = {"v": expected_vertices}

    def meshes():
        it = files
        if progress:
            it = progress_bar(files, total=len(files), desc="convert-cmp", unit="mesh", enabled=True)
        for _, _, path in it:
            v = read_obj_vertices(path, counts["v"])
            if counts["v"] is None:
                counts["v"] = v.shape[0]  # any count allowed, but the same in every file
            if factor != 1.0:
                v = v * np.float32(factor)
            if check_scale:
                _check_scale(v, file_units, path)
            yield v

    attrs = {"converted_from": "official Cross-Modal-Perceptionist OBJ layout (v2m-bench convert-cmp)"}
    if units == "official":
        attrs["official_scale_divided"] = OFFICIAL_SCALE
    path = write_predictions(
        out,
        [f[0] for f in files],
        [f[1] for f in files],
        vertices=meshes(),
        units=file_units,
        model=model,
        attrs=attrs,
        n_vertices=expected_vertices,
        compression=compression,
    )
    return ConvertResult(
        path=Path(path),
        n_meshes=len(files),
        n_identities=len({f[0] for f in files}),
        units=file_units,
        n_vertices=int(counts["v"]),
    )
