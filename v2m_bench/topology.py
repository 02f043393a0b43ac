"""Named points and part regions on the 53,215-vertex BFM (3DDFA v1 / SynergyNet topology).

All vertex ids are 0-based. The BFM frame is +x = the subject's left, +y up, +z out of the face.
"Left" and "right" always mean the SUBJECT's own left and right: the subject's left eye is at
x > 0, which is on the right of a frontal picture of the face.

Contents
--------
- ``OICD`` and ``ARE_PAIRS``: the vertex pairs of the official line metrics (ARE), exactly as the
  official evaluation code uses them (``OICD`` is 2217-14607, which is not a mirror pair).
- ``KEYPOINTS_68``: the 68 iBUG landmarks (3DDFA ``keypoints_sim.npy``, vertex = row // 3).
- ``REGION_NAMES`` and ``region_masks`` / ``bfm_regions``: six disjoint part regions (left eye,
  right eye, nose, mouth, left cheek, right cheek) defined from the 68 landmarks on the mean shape;
  see ``region_masks`` for the exact definition and ``docs/metrics.md`` for pictures.
- ``FROZEN_REGIONS`` and ``check_regions``: the vertex count and SHA-256 of every region on the
  public 3DDFA BFM, so that a changed definition or a different model is detected.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .errors import ValidationError

__all__ = [
    "OICD",
    "ARE_PAIRS",
    "KEYPOINTS_68",
    "REGION_NAMES",
    "REGION_KEYPOINTS",
    "REGION_MARGINS",
    "REGION_NZ_MIN",
    "FROZEN_REGIONS",
    "region_masks",
    "bfm_regions",
    "region_checksum",
    "check_regions",
]

#: Vertex pair whose 3-D distance normalises every line metric (outer-eye-corner distance as the
#: official code defines it; 14607 is NOT the mirror of 2217, the landmarks are 2215 and 14066).
OICD: tuple[int, int] = (2217, 14607)

#: Vertex pairs of the four ARE line metrics: ear-to-ear, forehead, mid-face, cheek.
ARE_PAIRS: dict[str, tuple[int, int]] = {
    "ER": (20636, 34153),
    "FR": (1678, 42117),
    "MR": (2130, 15003),
    "CR": (2294, 13635),
}

#: Vertex ids of the 68 iBUG landmarks on the BFM (0-based, iBUG order: 0-16 jaw contour from the
#: subject's right to left, 17-26 brows, 27-35 nose, 36-47 eyes, 48-67 lips).
KEYPOINTS_68: tuple[int, ...] = (
    21873, 22149, 21653, 21036, 43236, 44918, 46166, 47135, 47914, 48695, 49667, 50924, 52613,
    33678, 33005, 32469, 32709, 38695, 39392, 39782, 39987, 40154, 40893, 41059, 41267, 41661,
    42367, 8161, 8177, 8187, 8192, 6515, 7243, 8204, 9163, 9883, 2215, 3886, 4920, 5828, 4801,
    3640, 10455, 11353, 12383, 14066, 12653, 11492, 5522, 6025, 7495, 8215, 8935, 10395, 10795,
    9555, 8836, 8236, 7636, 6915, 5909, 7384, 8223, 9064, 10537, 8829, 8229, 7629,
)

#: The six part regions, in the order of the paper's part-RMSE figure. "left"/"right" are the
#: subject's own (left = +x).
REGION_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth", "left_cheek", "right_cheek")

#: Landmarks (iBUG indices 0..67, not vertex ids) whose frontal convex hull seeds each region.
#: Eyes: the six eye-contour points. Nose: the nine nose points plus the two inner eye corners
#: (the nose-cheek junction runs from the inner eye corner to the nostril wing). Mouth: the twelve
#: outer-lip points. Cheeks: the jaw contour from just below the ear to the jaw angle (1-4 / 12-15),
#: the outer eye corner, the lower eyelid, the inner eye corner, the nostril wing and the mouth corner.
REGION_KEYPOINTS: dict[str, tuple[int, ...]] = {
    "left_eye": (42, 43, 44, 45, 46, 47),
    "right_eye": (36, 37, 38, 39, 40, 41),
    "nose": (27, 28, 29, 30, 31, 32, 33, 34, 35, 39, 42),
    "mouth": (48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59),
    "left_cheek": (12, 13, 14, 15, 45, 46, 47, 42, 35, 54),
    "right_cheek": (1, 2, 3, 4, 36, 41, 40, 39, 31, 48),
}

#: Margin added around each hull, as a fraction of the OICD length of the same mesh.
REGION_MARGINS: dict[str, float] = {
    "left_eye": 0.08,
    "right_eye": 0.08,
    "nose": 0.04,
    "mouth": 0.05,
    "left_cheek": 0.0,
    "right_cheek": 0.0,
}

#: A vertex can belong to a region only if the z component of its unit vertex normal on the mean
#: shape exceeds this. 0.3 (within about 72.5 degrees of the frontal viewing direction) keeps the
#: cheeks off the side of the head and the ears; the nose takes every vertex that faces the front
#: at all (> 0), so that the sides of the nostril wings are part of it.
REGION_NZ_MIN: dict[str, float] = {
    "left_eye": 0.3,
    "right_eye": 0.3,
    "nose": 0.0,
    "mouth": 0.3,
    "left_cheek": 0.3,
    "right_cheek": 0.3,
}

#: Order in which overlaps are resolved: a candidate of an earlier region is removed from the
#: later ones.
_PRIORITY: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth", "left_cheek", "right_cheek")

#: Vertex count and SHA-256 (of ``numpy.packbits(mask)``) of each region on the public 3DDFA BFM
#: (its mean shape, triangles and keypoints). ``check_regions`` compares against these.
#: Computed with this module's definition from the public 3DDFA files it depends on (md5:
#: u_shp.npy 60f98b75..., u_exp.npy 97491b2f..., visualize/tri.mat 1fc4d7a3...,
#: keypoints_sim.npy eb2c5dba...). Left/right counts differ by under 2.1 %.
FROZEN_REGIONS: dict[str, tuple[int, str]] = {
    "left_eye": (1200, "5b16bf9e81a2b849e8c79a4834ff18ef44d976c8d2a0217f7a0dee5e4ee08c7c"),
    "right_eye": (1207, "7e3a417ce8ebca38850ddc210eea3e37a15548d8a874fd66c132cc5e94fa591b"),
    "nose": (2089, "8420b6bd09e5e4180f5d368b7394d8022e92841154904ec072a381f7f7deaa0c"),
    "mouth": (1313, "96bb60f5119b6b7c03670371cc310da3294840da461989f4d784a5f590017a63"),
    "left_cheek": (4206, "2fe4fcf1f2617861a36c163343becf3182aa3b30136cde608ebd1698ca0af820"),
    "right_cheek": (4119, "dc01445dfc76a9358c25441f88a570076266f6ee433877c77741297caa9616cf"),
}


def _hull_distance(points: np.ndarray, hull_pts: np.ndarray) -> np.ndarray:
    """Euclidean distance from 2-D ``points`` (M, 2) to the convex hull of ``hull_pts`` (K, 2).

    Zero inside or on the hull. Exact: the hull polygon is built with scipy's ConvexHull, a point is
    inside when it is on the inner side of every edge line, otherwise the distance is the smallest
    distance to an edge segment.
    """
    from scipy.spatial import ConvexHull

    hull = ConvexHull(hull_pts)
    poly = hull_pts[hull.vertices]  # counter-clockwise
    a = poly
    b = np.roll(poly, -1, axis=0)
    e = b - a  # (E, 2)
    rel = points[:, None, :] - a[None, :, :]  # (M, E, 2)
    cross = e[None, :, 0] * rel[..., 1] - e[None, :, 1] * rel[..., 0]
    inside = np.all(cross >= 0.0, axis=1)
    t = np.clip(np.einsum("mek,ek->me", rel, e) / np.einsum("ek,ek->e", e, e)[None], 0.0, 1.0)
    closest = a[None] + t[..., None] * e[None]
    dist = np.linalg.norm(points[:, None, :] - closest, axis=-1).min(axis=1)
    return np.where(inside, 0.0, dist)


def _largest_component(mask: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Keep the largest piece of ``mask`` connected through triangle edges (ties: lowest vertex id)."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return mask
    local = np.full(mask.shape[0], -1, dtype=np.int64)
    local[idx] = np.arange(idx.size)
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    edges = local[edges]
    edges = edges[(edges >= 0).all(axis=1)]
    graph = sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(idx.size, idx.size))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    first = np.full(sizes.size, idx.size, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(idx.size))
    best = np.flatnonzero(sizes == sizes.max())
    keep = np.zeros_like(mask)
    keep[idx[labels == best[np.argmin(first[best])]]] = True
    return keep


def region_masks(mean, keypoints, triangles, *, normals=None) -> dict[str, np.ndarray]:
    """Six disjoint part regions of a face mesh, as boolean vertex masks.

    Definition (computed on the given mesh, normally the BFM mean shape, in float64):

    1. ``d`` = the 3-D distance between the ``OICD`` vertices (2217, 14607).
    2. Work in the frontal projection: vertex ``i`` is the 2-D point ``(x_i, y_i)``.
    3. ``n_i`` = unit vertex normal (area-weighted mean of the incident triangles' normals,
       :func:`v2m_bench.geometry.vertex_normals`).
    4. For each region ``r``: ``H_r`` = the 2-D convex hull of the landmarks
       ``REGION_KEYPOINTS[r]``. Vertex ``i`` is a candidate of ``r`` when ``n_i,z > REGION_NZ_MIN[r]``
       and the 2-D distance from ``(x_i, y_i)`` to ``H_r`` is <= ``REGION_MARGINS[r] * d``
       (the distance is 0 inside the hull).
    5. Overlaps go to the first region in the order left eye, right eye, nose, mouth, left cheek,
       right cheek (each region drops the candidates of the regions before it).
    6. Each region keeps only its largest piece connected through triangle edges (this drops a few
       stray vertices on the ears).

    "left"/"right" are the subject's own: the left eye and the left cheek are at x > 0.

    Parameters
    ----------
    mean : array_like, shape (N, 3)
        Vertex positions (BFM units, micrometres), BFM frame (+x subject's left, +y up, +z out).
    keypoints : array_like, shape (68,), int
        Vertex ids of the 68 iBUG landmarks.
    triangles : array_like, shape (F, 3), int
        0-based triangles wound counter-clockwise seen from outside.
    normals : array_like, shape (N, 3), optional
        Unit vertex normals of ``mean`` (to reuse them); computed from ``triangles`` when omitted.

    Returns
    -------
    dict
        ``{name: ndarray bool (N,)}`` for every name of ``REGION_NAMES``, in that order.

    Raises
    ------
    ValidationError
        Wrong shapes or vertex ids out of range.
    """
    mean = np.asarray(mean, dtype=np.float64)
    if mean.ndim != 2 or mean.shape[1] != 3:
        raise ValidationError(f"expected a (N, 3) mesh, found {mean.shape}", key="mean")
    n = mean.shape[0]
    kp = np.asarray(keypoints, dtype=np.int64).reshape(-1)
    if kp.shape != (68,):
        raise ValidationError(f"expected 68 keypoint vertex ids, found {kp.shape[0]}", key="keypoints")
    if max(OICD) >= n:
        raise ValidationError(f"the mesh has {n} vertices; the regions need the BFM topology (53,215)", key="mean")
    if kp.min() < 0 or kp.max() >= n:
        raise ValidationError(f"vertex ids outside 0..{n - 1}", key="keypoints")
    tri = np.asarray(triangles, dtype=np.int64)
    if tri.ndim != 2 or tri.shape[1] != 3 or tri.min() < 0 or tri.max() >= n:
        raise ValidationError(f"expected (F, 3) vertex ids in 0..{n - 1}, found shape {tri.shape}", key="triangles")
    if normals is None:
        from .geometry import vertex_normals

        normals = vertex_normals(mean, tri)
    normals = np.asarray(normals, dtype=np.float64)
    if normals.shape != mean.shape:
        raise ValidationError(f"expected normals of shape {mean.shape}, found {normals.shape}", key="normals")

    d = float(np.linalg.norm(mean[OICD[0]] - mean[OICD[1]]))
    xy = mean[:, :2]
    taken = np.zeros(n, dtype=bool)
    out = {}
    for name in _PRIORITY:
        hull_pts = xy[kp[list(REGION_KEYPOINTS[name])]]
        margin = REGION_MARGINS[name] * d
        # a point outside the hull's bounding box grown by the margin is farther than the margin
        # from the hull: only the others need the exact distance (the same mask, far less work)
        near = np.all((xy >= hull_pts.min(axis=0) - margin) & (xy <= hull_pts.max(axis=0) + margin), axis=1)
        idx = np.flatnonzero((normals[:, 2] > REGION_NZ_MIN[name]) & ~taken & near)
        dist = _hull_distance(xy[idx], hull_pts)
        mask = np.zeros(n, dtype=bool)
        mask[idx[dist <= margin]] = True
        taken |= mask  # step 5 works on the candidates, before step 6 trims them
        out[name] = _largest_component(mask, tri)
    return {name: out[name] for name in REGION_NAMES}


def bfm_regions(model) -> dict[str, np.ndarray]:
    """``region_masks`` on a :class:`~v2m_bench.bfm.MorphableModel`'s mean shape.

    Returns
    -------
    dict
        ``{name: ndarray bool (n_vertices,)}`` in ``REGION_NAMES`` order.
    """
    return region_masks(model.mean, model.keypoints, model.triangles)


def region_checksum(mask) -> str:
    """SHA-256 hex digest of ``numpy.packbits`` of a boolean vertex mask (shape (N,))."""
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    return hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()


def check_regions(masks) -> None:
    """Raise ``ValidationError`` unless ``masks`` are the frozen regions of the public BFM.

    Parameters
    ----------
    masks : dict
        ``{name: bool (53215,)}`` as returned by ``region_masks`` / ``bfm_regions``.

    Raises
    ------
    ValidationError
        A region is missing, or its vertex count or SHA-256 differs from ``FROZEN_REGIONS`` (for
        example a model whose mean shape, triangles or keypoints differ from the public 3DDFA BFM).
    """
    for name, (count, digest) in FROZEN_REGIONS.items():
        if name not in masks:
            raise ValidationError("region missing", key=name)
        m = np.asarray(masks[name], dtype=bool)
        got = int(m.sum())
        if got != count or region_checksum(m) != digest:
            raise ValidationError(
                f"region differs from the frozen BFM definition ({got} vertices, sha256 "
                f"{region_checksum(m)[:12]}...; expected {count}, {digest[:12]}...): the model's mean "
                "shape, triangles or keypoints are not those of the public 3DDFA BFM",
                key=name,
            )
