"""A small offscreen software rasteriser for triangle meshes (numpy only; no display, no OpenGL).

Used to render synthetic face photos (``v2m_data.synth``) and the benchmark report's figures
(shaded grey meshes, per-vertex error heat maps, region colours, front and profile views).

Camera model
------------
Weak perspective (scaled orthographic projection), the same as ``v2m_data.fitting.project``.
For a model point ``X`` (any units; BFM units for the BFM) the pixel position is::

    u = s * (R @ X)[0] + t[0]
    v = t[1] - s * (R @ X)[1]          # image y points down, the camera frame's y points up

``R`` (3x3, a rotation) maps the model frame to the camera frame: x to the image right, y to the
image top, z towards the viewer. ``R = I`` therefore shows a BFM face frontally and upright, with
the subject's left (+x) on the image right. ``s`` is pixels per model unit and ``t`` the pixel
position of the model origin. Pixel ``(col, row)`` has its centre at ``(u, v) = (col, row)``
(0-based; the centre of the top-left pixel is ``(0, 0)``), the convention of ``v2m_data.images``
for landmarks, so :func:`project` puts keypoints exactly on the rendered surface.

Depth is the camera-frame ``z = (R @ X)[2]`` (model units): larger is nearer the viewer. A pixel
shows the nearest triangle whose interior (or edge) contains the pixel centre.

Rasterisation
-------------
Vectorised over triangles: the pixel centres inside each projected triangle's bounding box are
enumerated with ``np.repeat`` in chunks of at most ``max_candidates`` (pixel, triangle) pairs,
barycentric coordinates are affine functions of the pixel position (exact under an orthographic
camera), and the z-buffer is resolved per chunk with a lexsort (pixel, then depth, then triangle
id) and merged into the image buffers. Ties in depth go to the higher triangle index, so the
output is deterministic. Triangles are counter-clockwise seen from their front side (the BFM
convention: normals point out); with ``cull_backfaces=True`` (the default) triangles seen from
behind are not drawn, otherwise they are drawn and lit with their normal flipped (two-sided).

A 53,215-vertex, 105,840-triangle BFM face at 256x256 renders in about 0.1 s on one core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .errors import ValidationError

__all__ = [
    "RenderResult",
    "render_mesh",
    "rasterize",
    "project",
    "fit_camera",
    "view_rotation",
    "mesh_vertex_normals",
    "SHADINGS",
]

SHADINGS = ("lambert", "flat", "none")

_DEFAULT_GREY = 0.78
_EDGE_EPS = 1e-9  # barycentric tolerance: pixel centres on shared edges belong to both triangles


# ------------------------------------------------------------------------------------- camera
def view_rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation from the model frame to the camera frame for a head pose given in degrees.

    ``R = Rz(roll) @ Rx(pitch) @ Ry(yaw)`` (yaw applied first), with the signs chosen so that for
    a face looking along +z:

    - ``yaw > 0`` turns the face towards the image right (the nose moves to +x; the subject turns
      to their own left, so ``yaw=90`` shows the subject's right profile);
    - ``pitch > 0`` tilts the face up (the nose moves to the image top);
    - ``roll > 0`` rotates the image of the face counter-clockwise.

    Parameters
    ----------
    yaw, pitch, roll : float or array_like
        Angles in degrees; arrays broadcast together.

    Returns
    -------
    ndarray, shape (..., 3, 3), float64
        Proper rotations (det +1).
    """
    y, p, r = np.broadcast_arrays(*(np.deg2rad(np.asarray(a, dtype=np.float64)) for a in (yaw, pitch, roll)))
    cy, sy, cp, sp, cr, sr = np.cos(y), np.sin(y), np.cos(p), np.sin(p), np.cos(r), np.sin(r)
    one, zero = np.ones_like(y), np.zeros_like(y)
    ry = np.stack([np.stack([cy, zero, sy], -1), np.stack([zero, one, zero], -1), np.stack([-sy, zero, cy], -1)], -2)
    # pitch up: the +z axis goes to (0, sin p, cos p)
    rx = np.stack([np.stack([one, zero, zero], -1), np.stack([zero, cp, sp], -1), np.stack([zero, -sp, cp], -1)], -2)
    rz = np.stack([np.stack([cr, -sr, zero], -1), np.stack([sr, cr, zero], -1), np.stack([zero, zero, one], -1)], -2)
    return rz @ rx @ ry


def _rotation(rotation) -> np.ndarray:
    if rotation is None:
        return np.eye(3)
    r = np.asarray(rotation, dtype=np.float64)
    if r.shape != (3, 3) or not np.all(np.isfinite(r)):
        raise ValidationError(f"expected a finite (3, 3) matrix, found shape {r.shape}", key="rotation")
    return r


def _image_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValidationError(f"expected (height, width), found {image_size!r}", key="image_size") from None
    if h < 1 or w < 1:
        raise ValidationError(f"expected positive (height, width), found {(h, w)}", key="image_size")
    return h, w


def project(vertices, rotation=None, scale: float = 1.0, translation=(0.0, 0.0), image_size=None) -> np.ndarray:
    """Project model points to pixel coordinates with the camera :func:`render_mesh` uses.

    Parameters
    ----------
    vertices : array_like, shape (..., N, 3)
        Points in the model frame (model units, e.g. BFM units).
    rotation : array_like, shape (3, 3), optional
        Model frame -> camera frame; identity when omitted.
    scale : float
        Pixels per model unit.
    translation : array_like, shape (2,)
        Pixel position ``(x, y)`` of the model origin.
    image_size : (int, int), optional
        Only checked when given (the projection does not depend on it).

    Returns
    -------
    ndarray, shape (..., N, 2), float64
        0-based pixel coordinates ``(x right, y down)``; the centre of pixel ``(col, row)`` is
        ``(col, row)``. Pass ``RenderResult.scale``/``.translation``/``.rotation`` to land on a
        rendered image.
    """
    if image_size is not None:
        _image_size(image_size)
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim < 2 or v.shape[-1] != 3:
        raise ValidationError(f"expected shape (..., N, 3), found {v.shape}", key="vertices")
    r = _rotation(rotation)
    t = np.asarray(translation, dtype=np.float64).reshape(2)
    cam = v @ r[:2].T
    out = float(scale) * cam
    out[..., 1] *= -1.0
    return out + t


def fit_camera(vertices, rotation=None, image_size=(256, 256), margin: float = 0.05) -> tuple[float, np.ndarray]:
    """Scale and translation that fit the projected points into the image with a margin.

    The bounding box of the projected points is centred in the image and scaled so that its
    longer side (relative to the image) spans ``1 - 2 * margin`` of the image.

    Parameters
    ----------
    vertices : array_like, shape (N, 3)
    rotation : array_like, shape (3, 3), optional
    image_size : (int, int)
        ``(height, width)`` in pixels.
    margin : float
        Free border on each side, as a fraction of the image size, in [0, 0.5).

    Returns
    -------
    scale : float
        Pixels per model unit.
    translation : ndarray, shape (2,), float64
        Pixel position of the model origin.
    """
    h, w = _image_size(image_size)
    if not 0.0 <= margin < 0.5:
        raise ValidationError(f"expected a value in [0, 0.5), found {margin!r}", key="margin")
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    v = v[np.all(np.isfinite(v), axis=1)]
    if v.shape[0] == 0:
        raise ValidationError("no finite vertices to fit the camera to", key="vertices")
    cam = v @ _rotation(rotation)[:2].T
    lo, hi = cam.min(axis=0), cam.max(axis=0)
    extent = np.maximum(hi - lo, 1e-12)
    avail = np.array([w - 1.0, h - 1.0]) * (1.0 - 2.0 * margin)
    scale = float(np.min(np.maximum(avail, 1e-12) / extent))
    centre = (lo + hi) / 2.0
    t = np.array([(w - 1.0) / 2.0 - scale * centre[0], (h - 1.0) / 2.0 + scale * centre[1]])
    return scale, t


# ------------------------------------------------------------------------------------ normals
def mesh_vertex_normals(vertices, triangles) -> np.ndarray:
    """Unit vertex normals of a mesh (area-weighted mean of the incident face normals).

    Parameters
    ----------
    vertices : array_like, shape (N, 3)
    triangles : array_like, shape (F, 3), int
        Counter-clockwise seen from the front (outward normals).

    Returns
    -------
    ndarray, shape (N, 3), float64. A vertex in no triangle gets a zero normal.
    """
    v = np.asarray(vertices, dtype=np.float64)
    tri = np.asarray(triangles, dtype=np.int64)
    fn = np.cross(v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]])
    idx = tri.reshape(-1)
    n = v.shape[0]
    acc = np.stack([np.bincount(idx, weights=np.repeat(fn[:, k], 3), minlength=n) for k in range(3)], axis=1)
    norm = np.linalg.norm(acc, axis=1, keepdims=True)
    return acc / np.maximum(norm, 1e-300)


# -------------------------------------------------------------------------------- rasteriser
def _chunks(counts: np.ndarray, limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, stop) ranges whose counts sum to at most ``limit`` (at least one item)."""
    csum = np.cumsum(counts)
    n = counts.shape[0]
    start = 0
    base = 0
    while start < n:
        stop = int(np.searchsorted(csum, base + limit, side="right"))
        stop = max(stop, start + 1)
        yield start, stop
        base = int(csum[stop - 1])
        start = stop


def rasterize(
    xy,
    z,
    triangles,
    image_size,
    *,
    cull_backfaces: bool = True,
    max_candidates: int = 1 << 21,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-buffered coverage of projected triangles.

    Parameters
    ----------
    xy : array_like, shape (N, 2)
        Pixel coordinates of the vertices (x right, y down; pixel centres at integers).
    z : array_like, shape (N,)
        Depth of the vertices; larger is nearer the viewer.
    triangles : array_like, shape (F, 3), int
        0-based vertex ids, counter-clockwise seen from the front (in a y-up frame).
    image_size : (int, int)
        ``(height, width)``.
    cull_backfaces : bool
        Skip triangles seen from behind (and degenerate ones).
    max_candidates : int
        Most (pixel, triangle) candidate pairs processed at once (bounds memory, ~100 bytes each).

    Returns
    -------
    triangle_id : ndarray, shape (H, W), int64
        The visible triangle at each pixel, -1 where none.
    barycentric : ndarray, shape (H, W, 3), float64
        Barycentric coordinates of the pixel centre in that triangle (0 where none).
    depth : ndarray, shape (H, W), float64
        Interpolated depth at the pixel centre, NaN where no triangle.
    """
    h, w = _image_size(image_size)
    xy = np.asarray(xy, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    tri = np.asarray(triangles)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValidationError(f"expected shape (N, 2), found {xy.shape}", key="xy")
    if z.shape[0] != xy.shape[0]:
        raise ValidationError(f"expected {xy.shape[0]} depths, found {z.shape[0]}", key="z")
    if tri.ndim != 2 or tri.shape[1] != 3 or tri.dtype.kind not in "iu":
        raise ValidationError(f"expected an integer (F, 3) array, found {tri.dtype} {tri.shape}", key="triangles")
    tri = tri.astype(np.int64, copy=False)
    if tri.size and (tri.min() < 0 or tri.max() >= xy.shape[0]):
        raise ValidationError(f"vertex ids outside 0..{xy.shape[0] - 1}", key="triangles")

    x0, y0 = xy[tri[:, 0], 0], xy[tri[:, 0], 1]
    x1, y1 = xy[tri[:, 1], 0], xy[tri[:, 1], 1]
    x2, y2 = xy[tri[:, 2], 0], xy[tri[:, 2], 1]
    # twice the signed area in the y-down pixel frame: counter-clockwise in the y-up camera frame
    # (a triangle seen from the front) is negative here
    area2 = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    ok = np.isfinite(area2) & (area2 != 0) & np.isfinite(z[tri]).all(axis=1)
    if cull_backfaces:
        ok &= area2 < 0
    xmin = np.ceil(np.minimum(np.minimum(x0, x1), x2) - 1e-9)
    xmax = np.floor(np.maximum(np.maximum(x0, x1), x2) + 1e-9)
    ymin = np.ceil(np.minimum(np.minimum(y0, y1), y2) - 1e-9)
    ymax = np.floor(np.maximum(np.maximum(y0, y1), y2) + 1e-9)
    with np.errstate(invalid="ignore"):
        xmin, xmax = np.clip(xmin, 0, w - 1), np.clip(xmax, -1, w - 1)
        ymin, ymax = np.clip(ymin, 0, h - 1), np.clip(ymax, -1, h - 1)
    ok &= (xmax >= xmin) & (ymax >= ymin)
    ids = np.flatnonzero(ok)

    best_z = np.full(h * w, -np.inf)
    best_t = np.full(h * w, -1, dtype=np.int64)
    if ids.size:
        # barycentric weights of vertices 1 and 2 and the depth are affine in (px, py):
        # b1 = ((px - x0)(y2 - y0) - (x2 - x0)(py - y0)) / area2, b2 = ((x1 - x0)(py - y0) - (px - x0)(y1 - y0)) / area2
        inv = 1.0 / area2[ids]
        ax0, ay0 = x0[ids], y0[ids]
        e1x, e1y = (x1 - x0)[ids], (y1 - y0)[ids]
        e2x, e2y = (x2 - x0)[ids], (y2 - y0)[ids]
        zt = z[tri[ids]]
        b1_coef = np.stack([e2y * inv, -e2x * inv], 1)
        b2_coef = np.stack([-e1y * inv, e1x * inv], 1)
        bx0 = xmin[ids].astype(np.int64)
        by0 = ymin[ids].astype(np.int64)
        nx = (xmax[ids] - xmin[ids] + 1).astype(np.int64)
        ny = (ymax[ids] - ymin[ids] + 1).astype(np.int64)
        counts = nx * ny
        for a, b in _chunks(counts, max(int(max_candidates), 1)):
            cnt = counts[a:b]
            total = int(cnt.sum())
            local = np.repeat(np.arange(a, b), cnt)  # index into ids
            offs = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            px = bx0[local] + offs % nx[local]
            py = by0[local] + offs // nx[local]
            dx = px - ax0[local]
            dy = py - ay0[local]
            b1 = b1_coef[local, 0] * dx + b1_coef[local, 1] * dy
            b2 = b2_coef[local, 0] * dx + b2_coef[local, 1] * dy
            b0 = 1.0 - b1 - b2
            inside = (b0 >= -_EDGE_EPS) & (b1 >= -_EDGE_EPS) & (b2 >= -_EDGE_EPS)
            if not inside.any():
                continue
            local, px, py = local[inside], px[inside], py[inside]
            b0, b1, b2 = b0[inside], b1[inside], b2[inside]
            zt_l = zt[local]
            zc = b0 * zt_l[:, 0] + b1 * zt_l[:, 1] + b2 * zt_l[:, 2]
            pix = py * w + px
            tid = ids[local]
            order = np.lexsort((tid, zc, pix))
            pix, zc, tid = pix[order], zc[order], tid[order]
            last = np.ones(pix.shape[0], dtype=bool)
            last[:-1] = pix[1:] != pix[:-1]
            pix, zc, tid = pix[last], zc[last], tid[last]
            cur_z, cur_t = best_z[pix], best_t[pix]
            better = (zc > cur_z) | ((zc == cur_z) & (tid > cur_t))
            best_z[pix[better]] = zc[better]
            best_t[pix[better]] = tid[better]

    tri_id = best_t.reshape(h, w)
    bary = np.zeros((h, w, 3))
    depth = np.full((h, w), np.nan)
    hit = np.flatnonzero(best_t >= 0)
    if hit.size:
        t = best_t[hit]
        px = (hit % w).astype(np.float64)
        py = (hit // w).astype(np.float64)
        i0, i1, i2 = tri[t, 0], tri[t, 1], tri[t, 2]
        dx, dy = px - xy[i0, 0], py - xy[i0, 1]
        e1x, e1y = xy[i1, 0] - xy[i0, 0], xy[i1, 1] - xy[i0, 1]
        e2x, e2y = xy[i2, 0] - xy[i0, 0], xy[i2, 1] - xy[i0, 1]
        inv = 1.0 / area2[t]
        b1 = (dx * e2y - e2x * dy) * inv
        b2 = (e1x * dy - dx * e1y) * inv
        bb = np.stack([1.0 - b1 - b2, b1, b2], 1)
        bary.reshape(-1, 3)[hit] = bb
        depth.reshape(-1)[hit] = best_z[hit]
    return tri_id, bary, depth


# --------------------------------------------------------------------------------- rendering
@dataclass(frozen=True, eq=False)
class RenderResult:
    """What :func:`render_mesh` returns; unpacks as ``image, mask, depth = render_mesh(...)``.

    Attributes
    ----------
    image : ndarray, shape (H, W, 3)
        RGB, uint8 (``output="uint8"``) or float32 in [0, 1] (``output="float"``).
    mask : ndarray, shape (H, W), bool
        Pixels covered by the mesh.
    depth : ndarray, shape (H, W), float32
        Camera-frame z of the visible surface (model units; larger = nearer), NaN off the mesh.
    triangle_id : ndarray, shape (H, W), int64
        Visible triangle per pixel, -1 off the mesh.
    barycentric : ndarray, shape (H, W, 3), float32
        Barycentric coordinates of each pixel centre in its triangle.
    rotation : ndarray, shape (3, 3)
    scale : float
    translation : ndarray, shape (2,)
        The camera used (for :func:`project`).
    """

    image: np.ndarray
    mask: np.ndarray
    depth: np.ndarray
    triangle_id: np.ndarray
    barycentric: np.ndarray
    rotation: np.ndarray
    scale: float
    translation: np.ndarray

    def __iter__(self):
        return iter((self.image, self.mask, self.depth))

    def project(self, vertices) -> np.ndarray:
        """:func:`project` with this rendering's camera: (..., N, 3) -> (..., N, 2) pixels."""
        return project(vertices, self.rotation, self.scale, self.translation)


def _unit(v, key: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.shape != (3,) or not np.all(np.isfinite(a)) or not np.linalg.norm(a) > 0:
        raise ValidationError(f"expected a finite non-zero 3-vector, found {v!r}", key=key)
    return a / np.linalg.norm(a)


def _background(background, h: int, w: int) -> np.ndarray:
    b = np.asarray(background)
    if b.dtype == np.uint8:
        b = b.astype(np.float64) / 255.0
    else:
        b = b.astype(np.float64)
    if b.shape == (3,):
        return np.broadcast_to(b, (h, w, 3)).copy()
    if b.shape == (h, w, 3):
        return b.copy()
    raise ValidationError(f"expected an (r, g, b) colour or an ({h}, {w}, 3) image, found shape {b.shape}", key="background")


def render_mesh(
    vertices,
    triangles,
    *,
    colors=None,
    rotation=None,
    image_size: Sequence[int] = (256, 256),
    scale: float | None = None,
    translation=None,
    fit: str = "auto",
    margin: float = 0.05,
    light_dir=(0.3, 0.4, 1.0),
    ambient: float = 0.35,
    diffuse: float | None = None,
    background=(1.0, 1.0, 1.0),
    shading: str = "lambert",
    cull_backfaces: bool = True,
    normals=None,
    color_mode: str = "interpolate",
    output: str = "uint8",
    max_candidates: int = 1 << 21,
) -> RenderResult:
    """Render a triangle mesh with an orthographic camera, a z-buffer and Lambert shading.

    Parameters
    ----------
    vertices : array_like, shape (N, 3)
        Model-frame positions (any units; BFM units for the BFM).
    triangles : array_like, shape (F, 3), int
        0-based vertex ids, counter-clockwise seen from the front (outward normals).
    colors : array_like, shape (N, 3) or (3,), optional
        Per-vertex (or one) RGB albedo in [0, 1]; uniform grey (0.78) when omitted.
    rotation : array_like, shape (3, 3), optional
        Model -> camera rotation (see :func:`view_rotation`); identity = frontal view.
    image_size : (int, int)
        ``(height, width)`` in pixels.
    scale, translation : float, array_like (2,), optional
        Camera (pixels per model unit; pixel position of the model origin). When ``scale`` is
        omitted and ``fit="auto"``, both are chosen by :func:`fit_camera` with ``margin``. When
        only ``scale`` is given, the origin goes to the image centre.
    fit : {"auto", "none"}
        ``"none"`` requires ``scale``.
    margin : float
        Border fraction for ``fit="auto"``.
    light_dir : array_like, shape (3,)
        Direction towards a distant light in the camera frame (x right, y up, z to the viewer).
    ambient, diffuse : float
        Shade ``= ambient + diffuse * max(0, n . l)``; ``diffuse`` defaults to ``1 - ambient``.
    background : (r, g, b) or array_like (H, W, 3)
        Floats in [0, 1] or uint8; an image is used as is behind the mesh.
    shading : {"lambert", "flat", "none"}
        ``"lambert"``: per-pixel interpolated vertex normals; ``"flat"``: triangle normals;
        ``"none"``: the colours unlit (e.g. heat maps, region colours).
    cull_backfaces : bool
        Skip triangles seen from behind; otherwise draw them with flipped normals.
    normals : array_like, shape (N, 3), optional
        Model-frame vertex normals to use instead of computing them.
    color_mode : {"interpolate", "nearest"}
        Barycentric interpolation of vertex colours, or the colour of the nearest vertex of the
        triangle (sharp region boundaries).
    output : {"uint8", "float"}
        Image dtype: uint8 (rounded) or float32 in [0, 1].
    max_candidates : int
        Memory bound of the rasteriser (see :func:`rasterize`).

    Returns
    -------
    RenderResult
        Unpacks as ``(image, mask, depth)``; also holds the triangle ids, barycentrics and the
        camera (``rotation``, ``scale``, ``translation``) for :func:`project`.
    """
    h, w = _image_size(image_size)
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValidationError(f"expected shape (N, 3), found {v.shape}", key="vertices")
    tri = np.asarray(triangles)
    if shading not in SHADINGS:
        raise ValidationError(f"unknown shading {shading!r}; expected one of {', '.join(SHADINGS)}", key="shading")
    if color_mode not in ("interpolate", "nearest"):
        raise ValidationError(f"unknown color_mode {color_mode!r}; expected interpolate or nearest", key="color_mode")
    if output not in ("uint8", "float"):
        raise ValidationError(f"unknown output {output!r}; expected uint8 or float", key="output")
    r = _rotation(rotation)
    if scale is None:
        if fit != "auto":
            raise ValidationError("give scale (and translation) or fit='auto'", key="scale")
        scale, t = fit_camera(v, r, (h, w), margin)
    else:
        scale = float(scale)
        if not np.isfinite(scale) or scale <= 0:
            raise ValidationError(f"expected a positive number, found {scale!r}", key="scale")
        t = np.array([(w - 1) / 2.0, (h - 1) / 2.0]) if translation is None else np.asarray(translation, np.float64).reshape(2)

    cam = v @ r.T
    xy = np.empty((v.shape[0], 2))
    xy[:, 0] = scale * cam[:, 0] + t[0]
    xy[:, 1] = t[1] - scale * cam[:, 1]
    tri_id, bary, depth = rasterize(xy, cam[:, 2], tri, (h, w), cull_backfaces=cull_backfaces, max_candidates=max_candidates)
    tri = tri.astype(np.int64, copy=False)

    mask = tri_id >= 0
    image = _background(background, h, w)
    hit = np.flatnonzero(mask.reshape(-1))
    if hit.size:
        t_hit = tri_id.reshape(-1)[hit]
        b_hit = bary.reshape(-1, 3)[hit]
        corners = tri[t_hit]  # (P, 3)
        if colors is None:
            albedo = np.full((hit.size, 3), _DEFAULT_GREY)
        else:
            c = np.asarray(colors, dtype=np.float64)
            if c.shape == (3,):
                albedo = np.broadcast_to(c, (hit.size, 3))
            elif c.shape == (v.shape[0], 3):
                if color_mode == "interpolate":
                    albedo = np.einsum("pk,pkc->pc", b_hit, c[corners])
                else:
                    albedo = c[corners[np.arange(hit.size), np.argmax(b_hit, axis=1)]]
            else:
                raise ValidationError(f"expected shape ({v.shape[0]}, 3) or (3,), found {c.shape}", key="colors")
        if shading == "none":
            shade = np.ones((hit.size, 1))
        else:
            amb = float(ambient)
            dif = 1.0 - amb if diffuse is None else float(diffuse)
            light = _unit(light_dir, "light_dir")
            if shading == "flat":
                a, b_, c_ = cam[corners[:, 0]], cam[corners[:, 1]], cam[corners[:, 2]]
                n = np.cross(b_ - a, c_ - a)
            else:
                if normals is None:
                    vn = mesh_vertex_normals(cam, tri)
                else:
                    vn = np.asarray(normals, dtype=np.float64)
                    if vn.shape != v.shape:
                        raise ValidationError(f"expected shape {v.shape}, found {vn.shape}", key="normals")
                    vn = vn @ r.T
                n = np.einsum("pk,pkc->pc", b_hit, vn[corners])
            n = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-300)
            if not cull_backfaces:
                # a triangle seen from behind is lit on its back side
                x_, y_ = xy[corners, 0], xy[corners, 1]
                area2 = (x_[:, 1] - x_[:, 0]) * (y_[:, 2] - y_[:, 0]) - (x_[:, 2] - x_[:, 0]) * (y_[:, 1] - y_[:, 0])
                n[area2 > 0] *= -1.0
            shade = (amb + dif * np.clip(n @ light, 0.0, None))[:, None]
        image.reshape(-1, 3)[hit] = albedo * shade
    image = np.clip(image, 0.0, 1.0)
    if output == "uint8":
        image = np.round(image * 255.0).astype(np.uint8)
    else:
        image = image.astype(np.float32)
    return RenderResult(
        image=image,
        mask=mask,
        depth=depth.astype(np.float32),
        triangle_id=tri_id,
        barycentric=bary.astype(np.float32),
        rotation=r,
        scale=float(scale),
        translation=np.asarray(t, dtype=np.float64),
    )
