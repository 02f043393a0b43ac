"""The Basel Face Model in the 3DDFA (v1) ``train.configs`` layout.

The model has 53,215 vertices, 40 shape and 10 expression components. Vertices are in BFM units
(micrometres; the mean face is about 180,000 units = 18 cm wide), in a canonical frame: +x is the
subject's left, +y up, +z out of the face (towards a camera looking at it).

``load_bfm`` finds the files (explicit path > ``$V2M_BFM_DIR`` > the user cache directory where
``v2m-bench fetch-bfm`` puts them), reads the 3DDFA layout (``.npy`` arrays, the MATLAB
``tri.mat`` and ``param_whitening.pkl`` read with a restricted unpickler) and keeps a single
``.npz`` cache of its own so later loads are one file read.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BFMNotFoundError, ValidationError
from .fileio import atomic_path, md5_file

__all__ = [
    "MorphableModel",
    "load_bfm",
    "find_bfm_dir",
    "default_cache_dir",
    "BFM_FILES",
    "GENUINE_MD5",
    "N_VERTICES",
    "N_SHAPE",
    "N_EXPRESSION",
]

N_VERTICES = 53215
N_SHAPE = 40
N_EXPRESSION = 10

#: Files of the 3DDFA v1 layout, relative to the ``train.configs`` folder.
BFM_FILES = (
    "u_shp.npy",
    "u_exp.npy",
    "w_shp_sim.npy",
    "w_exp_sim.npy",
    "keypoints_sim.npy",
    "param_whitening.pkl",
    "tri.mat",
)

#: md5 of the files of the public 3DDFA release (tri.mat is the one under ``visualize/``).
GENUINE_MD5 = {
    "u_shp.npy": "60f98b75ebd5ba340ec94ecc25a2c290",
    "u_exp.npy": "97491b2f84de6edec8755548ba025828",
    "w_shp_sim.npy": "74d41d465580924456defd99401cfcdd",
    "w_exp_sim.npy": "7566556b7760b8691f3a6fddbdd38fcc",
    "keypoints_sim.npy": "eb2c5dba664428a6c2878fd0d1a4f6e8",
    "param_whitening.pkl": "9dda273b67cfe666435f7d16c60d6e68",
    "tri.mat": "1fc4d7a3ef8612afe50b5f5bc91a1cb1",
}

_CACHE_FORMAT = 2


def default_cache_dir() -> Path:
    """The user cache directory of voice2mesh.

    ``$V2M_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/voice2mesh``, else ``~/.cache/voice2mesh``.
    """
    env = os.environ.get("V2M_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "voice2mesh"


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that admits dicts and numpy arrays and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core"):
                module = module.replace("numpy.core", "numpy._core" if hasattr(np, "_core") else "numpy.core", 1)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only dicts and numpy arrays are allowed")


#: Largest BFM side file read (param_whitening.pkl, tri.mat; the genuine ones are < 2 MB).
_MAX_SIDE_FILE = 16 << 20


def _check_size(path: Path, limit: int = _MAX_SIDE_FILE) -> None:
    size = path.stat().st_size
    if size > limit:
        raise ValidationError(f"{size} bytes, more than the {limit} a BFM file of this kind can hold", path=path)


def _real_array(arr, path: Path, key: str | None = None, *, integer: bool = False) -> np.ndarray:
    """Refuse non-numeric, complex, non-finite (or, with ``integer``, fractional) arrays."""
    if not isinstance(arr, np.ndarray):
        raise ValidationError(f"expected a numpy array, found {type(arr).__name__}", path=path, key=key)
    if arr.dtype.kind not in "biuf":
        raise ValidationError(f"expected real numbers, found dtype {arr.dtype}", path=path, key=key)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValidationError("holds NaN or infinite values", path=path, key=key)
        if integer and not np.all(arr == np.round(arr)):
            raise ValidationError("holds fractional ids, expected whole numbers", path=path, key=key)
    return arr


def _load_whitening(path: Path) -> dict[str, np.ndarray]:
    _check_size(path)
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            RecursionError, MemoryError) as e:
        raise ValidationError(f"cannot read the pickle: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                              path=path) from None
    if not isinstance(obj, dict):
        raise ValidationError(f"expected a dict, found {type(obj).__name__}", path=path)
    out = {}
    for key in ("param_mean", "param_std"):
        if key not in obj:
            raise ValidationError("missing entry", path=path, key=key)
        # only arrays: a nested list could be a "billion laughs" of shared references
        arr = _real_array(obj[key], path, key)
        if arr.size != 62:
            raise ValidationError(f"expected shape (62,), found {arr.shape}", path=path, key=key)
        arr = arr.astype(np.float32).reshape(-1)
        if not np.all(np.isfinite(arr)):
            raise ValidationError("holds values too large for float32", path=path, key=key)
        out[key] = arr
    if not np.all(out["param_std"] > 0):
        raise ValidationError("standard deviations must be > 0", path=path, key="param_std")
    return out


def _load_triangles(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    _check_size(path)
    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises several types for a bad file
        raise ValidationError(f"cannot read the MATLAB file: {e}", path=path) from None
    if "tri" not in mat:
        raise ValidationError("missing variable", path=path, key="tri")
    tri = _real_array(np.asarray(mat["tri"]), path, "tri", integer=True)
    if tri.ndim != 2 or 3 not in tri.shape or tri.size == 0:
        raise ValidationError(f"expected a (3, F) array, found {tri.shape}", path=path, key="tri")
    if tri.shape[0] == 3 and tri.shape[1] != 3:
        tri = tri.T
    if tri.min() < 1 or tri.max() > N_VERTICES:
        raise ValidationError(f"vertex ids outside 1..{N_VERTICES}", path=path, key="tri")
    tri = tri.astype(np.int64) - 1  # MATLAB ids are 1-based
    # 3DDFA's tri.mat winds clockwise seen from outside; re-wind counter-clockwise so that
    # normals point out of the face (what OBJ/PLY viewers and renderers expect).
    return np.ascontiguousarray(tri[:, [0, 2, 1]])


def _load_npy(path: Path, shape: tuple[int, ...], *, integer: bool = False) -> np.ndarray:
    # the header first: its shape and dtype are checked before anything is allocated
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                hshape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                hshape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise ValidationError(f"not a .npy array file ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                              path=path) from None
    if tuple(hshape) != shape:
        raise ValidationError(f"expected shape {shape}, found {tuple(hshape)}", path=path)
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise ValidationError(f"expected real numbers, found dtype {dtype}", path=path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValidationError(f"cannot read the array: {e}", path=path) from None
    return _real_array(arr, path, integer=integer)


@dataclass(eq=False)
class MorphableModel:
    """A linear 3D morphable model: ``v = mean + shape_basis @ shape + expression_basis @ expression``.

    Attributes
    ----------
    mean : ndarray, shape (53215, 3), float32
        Mean face (neutral shape plus mean expression offset ``u_exp``), BFM units.
    shape_basis : ndarray, shape (159645, 40), float32
        Shape basis; rows interleave x0, y0, z0, x1, ...
    expression_basis : ndarray, shape (159645, 10), float32
        Expression basis, same row layout.
    triangles : ndarray, shape (105840, 3), int64
        0-based vertex ids of each triangle, wound counter-clockwise seen from outside (the
        3DDFA ``tri.mat`` winds the other way; its 2nd and 3rd columns are swapped on load).
    keypoints : ndarray, shape (68,), int64
        Vertex ids of the 68 iBUG landmarks.
    shape_mean, shape_std : ndarray, shape (40,), float32
        Statistics of fitted shape coefficients (3DDFA ``param_whitening``).
    expression_mean, expression_std : ndarray, shape (10,), float32
        Statistics of fitted expression coefficients.
    pose_mean, pose_std : ndarray, shape (12,), float32
        Statistics of the 3x4 pose matrix entries.
    is_genuine : bool
        True when the files' md5 match the public 3DDFA release (``GENUINE_MD5``).
    md5 : dict
        md5 of each source file.
    source : str
        Where the model was loaded from.
    """

    mean: np.ndarray
    shape_basis: np.ndarray
    expression_basis: np.ndarray
    triangles: np.ndarray
    keypoints: np.ndarray
    shape_mean: np.ndarray
    shape_std: np.ndarray
    expression_mean: np.ndarray
    expression_std: np.ndarray
    pose_mean: np.ndarray
    pose_std: np.ndarray
    md5: dict = field(default_factory=dict)
    source: str = ""
    _torch_cache: dict = field(default_factory=dict, repr=False)
    _incidence: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ properties
    @property
    def n_vertices(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_shape(self) -> int:
        return int(self.shape_basis.shape[1])

    @property
    def n_expression(self) -> int:
        return int(self.expression_basis.shape[1])

    @property
    def is_genuine(self) -> bool:
        return bool(self.md5) and all(self.md5.get(k) == v for k, v in GENUINE_MD5.items())

    def __repr__(self) -> str:
        kind = "genuine" if self.is_genuine else "non-genuine"
        return (
            f"MorphableModel({self.n_vertices} vertices, {self.n_shape} shape + {self.n_expression} "
            f"expression, {kind}, source={self.source!r})"
        )

    # ------------------------------------------------------------------ geometry
    def vertices(self, shape, expression=None):
        """Mesh vertices for coefficient vectors.

        Parameters
        ----------
        shape : array_like or torch.Tensor, shape (B, 40) or (40,)
            Shape coefficients (3DDFA BFM units).
        expression : array_like or torch.Tensor, shape (B, 10) or (10,), optional
            Expression coefficients; zeros when omitted.

        Returns
        -------
        ndarray or torch.Tensor, shape (B, 53215, 3) (or (53215, 3) for 1-D input)
            float32 vertices in BFM units; a torch tensor (on the input's device, differentiable)
            when ``shape`` is a torch tensor, else a numpy array.
        """
        if _is_torch(shape):
            return self._vertices_torch(shape, expression)
        shape = np.asarray(shape, dtype=np.float32)
        single = shape.ndim == 1
        shape = np.atleast_2d(shape)
        if shape.shape[-1] != self.n_shape:
            raise ValidationError(f"expected {self.n_shape} shape coefficients, found {shape.shape[-1]}", key="shape")
        if expression is None:
            expression = np.zeros((shape.shape[0], self.n_expression), np.float32)
        expression = np.atleast_2d(np.asarray(expression, dtype=np.float32))
        if expression.shape[-1] != self.n_expression:
            raise ValidationError(
                f"expected {self.n_expression} expression coefficients, found {expression.shape[-1]}",
                key="expression",
            )
        if expression.shape[0] != shape.shape[0]:
            raise ValidationError(
                f"batch sizes differ: shape {shape.shape[0]}, expression {expression.shape[0]}", key="expression"
            )
        flat = shape @ self.shape_basis.T + expression @ self.expression_basis.T
        flat += self.mean.reshape(1, -1)
        v = flat.reshape(shape.shape[0], self.n_vertices, 3)
        return v[0] if single else v

    def _vertices_torch(self, shape, expression):
        import torch

        single = shape.dim() == 1
        if single:
            shape = shape[None]
        if expression is None:
            expression = shape.new_zeros((shape.shape[0], self.n_expression))
        elif expression.dim() == 1:
            expression = expression[None]
        key = (str(shape.device), shape.dtype)
        if key not in self._torch_cache:
            coeff_basis = np.concatenate([self.shape_basis, self.expression_basis], axis=1)
            self._torch_cache[key] = (
                torch.as_tensor(coeff_basis.T.copy(), dtype=shape.dtype, device=shape.device),
                torch.as_tensor(self.mean.reshape(-1), dtype=shape.dtype, device=shape.device),
            )
        basis_t, mean_t = self._torch_cache[key]
        coeff = torch.cat([shape, expression.to(shape.dtype)], dim=1)
        v = torch.addmm(mean_t, coeff, basis_t).reshape(shape.shape[0], self.n_vertices, 3)
        return v[0] if single else v

    def vertex_normals(self, v):
        """Unit vertex normals (area-weighted average of the incident face normals).

        Parameters
        ----------
        v : ndarray or torch.Tensor, shape (B, 53215, 3) or (53215, 3)

        Returns
        -------
        Same kind and shape as ``v``: outward unit normals (+z at the nose tip of the mean face).
        """
        from .geometry import vertex_normals

        return vertex_normals(v, self.triangles)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as one ``.npz`` file (written atomically) and return its path."""
        path = Path(path)
        arrays = {k: getattr(self, k) for k in _ARRAY_FIELDS}
        md5_keys = np.array(sorted(self.md5), dtype=str)
        md5_vals = np.array([self.md5[k] for k in sorted(self.md5)], dtype=str)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, format=np.int64(_CACHE_FORMAT), md5_keys=md5_keys, md5_values=md5_vals, **arrays)
        return path


_ARRAY_FIELDS = (
    "mean",
    "shape_basis",
    "expression_basis",
    "triangles",
    "keypoints",
    "shape_mean",
    "shape_std",
    "expression_mean",
    "expression_std",
    "pose_mean",
    "pose_std",
)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _from_npz(path: Path) -> MorphableModel:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z or int(z["format"]) != _CACHE_FORMAT:
                raise ValidationError("not a voice2mesh model cache (missing or wrong 'format')", path=path)
            missing = [k for k in _ARRAY_FIELDS if k not in z]
            if missing:
                raise ValidationError("missing array", path=path, key=missing[0])
            arrays = {k: z[k] for k in _ARRAY_FIELDS}
            md5 = dict(zip(z["md5_keys"].tolist(), z["md5_values"].tolist()))
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, ValidationError):
            raise
        raise ValidationError(f"cannot read the model cache: {e}", path=path) from None
    return MorphableModel(**arrays, md5=md5, source=str(path))


def _from_train_configs(folder: Path) -> MorphableModel:
    missing = [f for f in BFM_FILES if not (folder / f).is_file()]
    if missing:
        raise BFMNotFoundError(
            f"{folder}: incomplete BFM folder, missing {', '.join(missing)}. " + _HOW_TO_GET
        )
    n3 = N_VERTICES * 3
    u_shp = _load_npy(folder / "u_shp.npy", (n3, 1))
    u_exp = _load_npy(folder / "u_exp.npy", (n3, 1))
    w_shp = _load_npy(folder / "w_shp_sim.npy", (n3, N_SHAPE))
    w_exp = _load_npy(folder / "w_exp_sim.npy", (n3, N_EXPRESSION))
    kp = _load_npy(folder / "keypoints_sim.npy", (204,), integer=True).astype(np.int64)
    if not (np.all(kp[0::3] % 3 == 0) and np.all(kp[1::3] == kp[0::3] + 1) and np.all(kp[2::3] == kp[0::3] + 2)):
        raise ValidationError("expected rows 3k, 3k+1, 3k+2 for each keypoint", path=folder / "keypoints_sim.npy")
    white = _load_whitening(folder / "param_whitening.pkl")
    tri = _load_triangles(folder / "tri.mat")
    md5 = {f: md5_file(folder / f) for f in BFM_FILES}
    pm, ps = white["param_mean"], white["param_std"]
    return MorphableModel(
        mean=(u_shp + u_exp).reshape(N_VERTICES, 3).astype(np.float32),
        shape_basis=np.ascontiguousarray(w_shp, dtype=np.float32),
        expression_basis=np.ascontiguousarray(w_exp, dtype=np.float32),
        triangles=tri,
        keypoints=kp[0::3] // 3,
        shape_mean=pm[12:52].copy(),
        shape_std=ps[12:52].copy(),
        expression_mean=pm[52:62].copy(),
        expression_std=ps[52:62].copy(),
        pose_mean=pm[:12].copy(),
        pose_std=ps[:12].copy(),
        md5=md5,
        source=str(folder),
    )


_HOW_TO_GET = (
    "Get the 3DDFA BFM files with `v2m-bench fetch-bfm` (downloads them into the user cache), "
    "or point V2M_BFM_DIR (or --bfm) at a folder holding "
    + ", ".join(BFM_FILES)
    + "."
)


def find_bfm_dir(path: str | os.PathLike | None = None) -> Path:
    """Resolve where the model files are: ``path`` > ``$V2M_BFM_DIR`` > ``<cache>/bfm/train.configs``.

    Returns the folder (or ``.npz`` file) found. Raises :class:`BFMNotFoundError` with instructions
    when nothing is there.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise BFMNotFoundError(f"{p}: no such file or folder. " + _HOW_TO_GET)
        return p
    env = os.environ.get("V2M_BFM_DIR")
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise BFMNotFoundError(f"V2M_BFM_DIR={env}: no such file or folder. " + _HOW_TO_GET)
        return p
    p = default_cache_dir() / "bfm" / "train.configs"
    if p.is_dir() and all((p / f).is_file() for f in BFM_FILES):
        return p
    raise BFMNotFoundError("no Basel Face Model found (no --bfm path, V2M_BFM_DIR unset, nothing in " f"{p}). " + _HOW_TO_GET)


def _cache_key(folder: Path) -> str:
    h = hashlib.sha256(str(folder.resolve()).encode())
    for f in BFM_FILES:
        st = (folder / f).stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def load_bfm(path: str | os.PathLike | None = None, *, cache: bool = True) -> MorphableModel:
    """Load the 53,215-vertex BFM (40 shape + 10 expression components).

    Parameters
    ----------
    path : str or path-like, optional
        A 3DDFA ``train.configs`` folder, or a ``.npz`` written by :meth:`MorphableModel.save`.
        When omitted: ``$V2M_BFM_DIR``, else the user cache (where ``v2m-bench fetch-bfm`` writes).
    cache : bool, default True
        Keep a single ``.npz`` copy in ``<cache>/bfm/`` keyed by the folder's path, file sizes and
        modification times, and read it instead of the folder next time.

    Returns
    -------
    MorphableModel

    Raises
    ------
    BFMNotFoundError
        Nothing found; the message says how to get the files.
    ValidationError
        A file is there but unreadable or of the wrong shape; the message names it.
    """
    where = find_bfm_dir(path)
    if where.is_file():
        return _from_npz(where)
    cache_file = default_cache_dir() / "bfm" / f"bfm-{_cache_key(where)}.npz" if cache else None
    if cache_file is not None and cache_file.is_file():
        try:
            model = _from_npz(cache_file)
            model.source = str(where)
            return model
        except ValidationError:
            pass  # a stale or broken cache is rebuilt below
    model = _from_train_configs(where)
    if cache_file is not None:
        try:
            model.save(cache_file)
        except OSError:
            pass  # a read-only cache folder only costs speed
    return model
