"""The software rasteriser (v2m_bench.render): coverage, z-buffer, interpolation, culling, camera."""

from __future__ import annotations

import numpy as np
import pytest

from v2m_bench.errors import ValidationError
from v2m_bench.render import fit_camera, project, rasterize, render_mesh, view_rotation

# With rotation I, scale 1 and translation (0, 0) a model point (x, y, z) lands on pixel (x, -y):
# tests write pixel positions (u, v) as model points (u, -v, z).


def _model(points_uv, z=0.0):
    p = np.asarray(points_uv, dtype=np.float64)
    z = np.broadcast_to(np.asarray(z, dtype=np.float64), (p.shape[0],))
    return np.stack([p[:, 0], -p[:, 1], z], 1)


def _render(vertices, triangles, size=(40, 50), **kw):
    kw.setdefault("shading", "none")
    kw.setdefault("output", "float")
    return render_mesh(vertices, triangles, image_size=size, scale=1.0, translation=(0.0, 0.0), **kw)


def _inside_reference(uv, h, w):
    """Pixel centres strictly inside / strictly outside (by > 1e-6 px) a triangle, brute force."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    signs = []
    for k in range(3):
        a, b = uv[k], uv[(k + 1) % 3]
        ex, ey = b - a
        length = np.hypot(ex, ey)
        signs.append((ex * (yy - a[1]) - ey * (xx - a[0])) / length)
    s = np.stack(signs)
    # the triangle is counter-clockwise in the y-up frame = clockwise in pixels: inside means s < 0
    return np.all(s < -1e-6, axis=0), np.any(s > 1e-6, axis=0)


# --------------------------------------------------------------------------------- coverage
def test_single_triangle_covers_exactly_the_pixel_centres_inside_it():
    uv = np.array([[3.3, 30.7], [41.2, 27.9], [17.6, 2.4]])  # counter-clockwise in the y-up frame
    h, w = 40, 50
    res = _render(_model(uv), [[0, 1, 2]], (h, w))
    inside, outside = _inside_reference(uv, h, w)
    assert res.mask[inside].all()
    assert not res.mask[outside].any()
    e1, e2 = uv[1] - uv[0], uv[2] - uv[0]
    area = 0.5 * abs(e1[0] * e2[1] - e1[1] * e2[0])
    assert abs(res.mask.sum() - area) < 0.06 * area
    # every covered pixel reports the triangle, barycentrics summing to one, and z = 0
    assert np.all(res.triangle_id[res.mask] == 0)
    np.testing.assert_allclose(res.barycentric[res.mask].sum(-1), 1.0, atol=1e-5)
    assert np.all(np.isnan(res.depth[~res.mask]))


def test_pixels_on_a_shared_edge_leave_no_gap():
    # a square split along its diagonal: every pixel centre inside the square is covered
    uv = np.array([[5.0, 5.0], [25.0, 5.0], [25.0, 25.0], [5.0, 25.0]])
    tri = [[0, 3, 2], [0, 2, 1]]  # counter-clockwise in the y-up frame
    res = _render(_model(uv), tri, (32, 32))
    assert res.mask[5:26, 5:26].all()
    assert res.mask.sum() == 21 * 21


def test_back_faces_are_not_drawn_unless_asked():
    uv = np.array([[3.3, 30.7], [41.2, 27.9], [17.6, 2.4]])
    front = _render(_model(uv), [[0, 1, 2]])
    back = _render(_model(uv), [[0, 2, 1]])
    assert front.mask.sum() > 300
    assert not back.mask.any()
    two_sided = _render(_model(uv), [[0, 2, 1]], cull_backfaces=False)
    assert np.array_equal(two_sided.mask, front.mask)
    # lit from the viewer, the back side (normal flipped towards the viewer) is lit, not black
    lit = _render(_model(uv), [[0, 2, 1]], cull_backfaces=False, shading="flat", light_dir=(0, 0, 1), ambient=0.0)
    assert np.all(lit.image[lit.mask] > 0.7)


def test_mesh_seen_from_behind_is_culled():
    # a dome facing +z vanishes when turned around (yaw 180) with culling, appears without
    u = np.linspace(-1, 1, 12)
    gx, gy = np.meshgrid(u, u)
    v = np.stack([gx, gy, np.sqrt(2.0 - gx**2 - gy**2)], -1).reshape(-1, 3)
    idx = np.arange(144).reshape(12, 12)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    tri = np.concatenate([np.stack([a, b, d], -1).reshape(-1, 3), np.stack([a, d, c], -1).reshape(-1, 3)])
    front = render_mesh(v, tri, image_size=(32, 32))
    behind = render_mesh(v, tri, image_size=(32, 32), rotation=view_rotation(180, 0, 0))
    behind2 = render_mesh(v, tri, image_size=(32, 32), rotation=view_rotation(180, 0, 0), cull_backfaces=False)
    assert front.mask.sum() > 500
    assert not behind.mask.any()
    assert behind2.mask.sum() == front.mask.sum()


# --------------------------------------------------------------------------------- z-buffer
@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_z_buffer_keeps_the_nearer_triangle(order):
    uv_a = np.array([[2.0, 30.0], [30.0, 30.0], [16.0, 2.0]])
    uv_b = uv_a + [8.0, 3.0]
    v = np.concatenate([_model(uv_a, z=5.0), _model(uv_b, z=-5.0)])  # A is nearer (larger z)
    tris = np.array([[0, 1, 2], [3, 4, 5]])[list(order)]
    colors = np.array([[1, 0, 0]] * 3 + [[0, 0, 1]] * 3, dtype=float)
    res = _render(v, tris, (40, 45), colors=colors)
    in_a, out_a = _inside_reference(uv_a, 40, 45)
    in_b, _ = _inside_reference(uv_b, 40, 45)
    both = in_a & in_b
    assert both.sum() > 100 and (in_b & out_a).sum() > 20
    assert np.all(res.image[both] == [1, 0, 0])
    np.testing.assert_allclose(res.depth[both], 5.0)
    only_b = in_b & out_a
    assert np.all(res.image[only_b] == [0, 0, 1])
    np.testing.assert_allclose(res.depth[only_b], -5.0)


def test_z_buffer_with_interpenetrating_triangles():
    # two triangles crossing each other: the visible one switches along the intersection line
    uv = np.array([[2.0, 30.0], [38.0, 30.0], [20.0, 2.0]])
    v = np.concatenate([_model(uv, z=[-10.0, 10.0, 0.0]), _model(uv, z=[10.0, -10.0, 0.0])])
    res = _render(v, [[0, 1, 2], [3, 4, 5]], (32, 40))
    xs = np.arange(40)[None].repeat(32, 0)
    # z of the first triangle grows with x (it goes from -10 at u=2 to +10 at u=38): it wins right of u=20
    assert np.all(res.triangle_id[res.mask & (xs > 21)] == 0)
    assert np.all(res.triangle_id[res.mask & (xs < 19)] == 1)


# ----------------------------------------------------------------------------- interpolation
def test_vertex_colours_are_interpolated_barycentrically():
    uv = np.array([[2.0, 38.0], [62.0, 38.0], [2.0, 2.0]])
    colors = np.eye(3)
    res = _render(_model(uv), [[0, 1, 2]], (40, 64), colors=colors)
    yy, xx = np.nonzero(res.mask)
    # the barycentrics of pixel (x, y) in this right triangle, computed independently
    b1 = (xx - 2.0) / 60.0
    b2 = (38.0 - yy) / 36.0
    expect = np.stack([1 - b1 - b2, b1, b2], 1)
    np.testing.assert_allclose(res.image[yy, xx], expect, atol=1e-5)
    np.testing.assert_allclose(res.barycentric[yy, xx], expect, atol=1e-5)
    # "nearest" takes the colour of the vertex with the largest weight
    near = _render(_model(uv), [[0, 1, 2]], (40, 64), colors=colors, color_mode="nearest")
    top2 = np.sort(expect, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-6  # no tie between the two largest weights
    assert clear.sum() > 1000
    assert np.array_equal(near.image[yy, xx][clear].argmax(1), expect[clear].argmax(1))
    assert set(np.unique(near.image[res.mask])) <= {0.0, 1.0}


def test_depth_is_interpolated():
    uv = np.array([[2.0, 38.0], [62.0, 38.0], [2.0, 2.0]])
    res = _render(_model(uv, z=[0.0, 60.0, 36.0]), [[0, 1, 2]], (40, 64))
    yy, xx = np.nonzero(res.mask)
    np.testing.assert_allclose(res.depth[yy, xx], (xx - 2.0) + (38.0 - yy), atol=1e-3)


def test_lambert_shading_follows_the_normal():
    # a square facing +z and one tilted 60 degrees about the vertical axis, light from the viewer
    sq = np.array([[-1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]])
    tri = [[0, 1, 2], [0, 2, 3]]
    kw = dict(image_size=(20, 20), shading="lambert", light_dir=(0, 0, 1), ambient=0.2, diffuse=0.8, output="float", colors=(0.5, 0.5, 0.5))
    flat = render_mesh(sq, tri, **kw)
    np.testing.assert_allclose(flat.image[flat.mask], 0.5, atol=1e-6)
    tilted = render_mesh(sq @ view_rotation(60, 0, 0).T, tri, **kw)
    np.testing.assert_allclose(tilted.image[tilted.mask], 0.5 * (0.2 + 0.8 * 0.5), atol=1e-6)
    # light from behind: ambient only
    dark = render_mesh(sq, tri, **{**kw, "light_dir": (0, 0, -1)})
    np.testing.assert_allclose(dark.image[dark.mask], 0.5 * 0.2, atol=1e-6)


def test_background_image_shows_where_the_mesh_is_not():
    uv = np.array([[3.3, 30.7], [41.2, 27.9], [17.6, 2.4]])
    bg = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    res = render_mesh(_model(uv), [[0, 1, 2]], image_size=(40, 50), scale=1.0, translation=(0, 0), background=bg)
    assert res.image.dtype == np.uint8
    assert np.array_equal(res.image[~res.mask], bg[~res.mask])
    assert not np.array_equal(res.image[res.mask], bg[res.mask])


# ------------------------------------------------------------------------------------ camera
def test_view_rotation_signs():
    nose = np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(view_rotation(90, 0, 0) @ nose, [1, 0, 0], atol=1e-12)  # turns to image right
    np.testing.assert_allclose(view_rotation(0, 90, 0) @ nose, [0, 1, 0], atol=1e-12)  # looks up
    np.testing.assert_allclose(view_rotation(0, 0, 90) @ [1.0, 0, 0], [0, 1, 0], atol=1e-12)  # counter-clockwise
    r = view_rotation([10, -20], [5, 7], [-3, 30])
    assert r.shape == (2, 3, 3)
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), (2, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0)


def test_project_matches_the_fitting_camera_model():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 3))
    r = view_rotation(20, -10, 5)
    p = project(x, r, 2.5, (10.0, 20.0))
    cam = x @ r.T
    np.testing.assert_allclose(p[:, 0], 2.5 * cam[:, 0] + 10.0)
    np.testing.assert_allclose(p[:, 1], 20.0 - 2.5 * cam[:, 1])
    assert project(x[None].repeat(3, 0), r, 2.5, (10.0, 20.0)).shape == (3, 7, 2)


def test_fit_camera_fits_the_mesh_with_the_margin(small_model):
    r = view_rotation(25, 10, 0)
    s, t = fit_camera(small_model.mean, r, (80, 120), margin=0.1)
    p = project(small_model.mean, r, s, t)
    lo, hi = p.min(0), p.max(0)
    assert lo[0] >= 0.1 * 119 - 1e-6 and hi[0] <= 0.9 * 119 + 1e-6
    assert lo[1] >= 0.1 * 79 - 1e-6 and hi[1] <= 0.9 * 79 + 1e-6
    # the tight side touches its margins
    assert np.isclose(hi[1] - lo[1], 0.8 * 79) or np.isclose(hi[0] - lo[0], 0.8 * 119)


def _keypoints_on_the_render(model, yaw, size=(96, 96)):
    r = view_rotation(yaw, 5, 0)
    res = render_mesh(model.mean, model.triangles, rotation=r, image_size=size)
    kp3 = model.mean[model.keypoints]
    kp = res.project(kp3)
    col, row = np.round(kp).astype(int).T
    return res, kp3 @ r.T, col, row


def _near_mask(mask, col, row):
    """Covered within one pixel (a vertex on the mesh's border projects onto the silhouette edge)."""
    h, w = mask.shape
    hits = np.zeros(col.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            c, r = np.clip(col + dx, 0, w - 1), np.clip(row + dy, 0, h - 1)
            hits |= mask[r, c]
    return hits


@pytest.mark.parametrize("yaw", [0, 25])
def test_projected_keypoints_land_on_the_rendered_small_model(small_model, yaw):
    res, cam, col, row = _keypoints_on_the_render(small_model, yaw)
    assert _near_mask(res.mask, col, row).all()
    # keypoints off the grid's border are covered exactly, and the dome being convex they are the
    # visible surface: the rendered depth there is theirs (to about a pixel of slope)
    n_side = 24
    i, j = np.divmod(small_model.keypoints, n_side)
    interior = (i > 0) & (i < n_side - 1) & (j > 0) & (j < n_side - 1)
    assert interior.sum() > 50
    assert res.mask[row[interior], col[interior]].all()
    np.testing.assert_allclose(res.depth[row[interior], col[interior]], cam[interior, 2], atol=3.0 / res.scale)
    # and a keypoint moved 10 px off the mesh is not covered: the test can fail
    assert not _near_mask(res.mask, np.array([int(res.project(small_model.mean).min(0)[0]) - 10]), row[:1]).any()


@pytest.mark.shared
@pytest.mark.parametrize("yaw", [0, -25])
def test_projected_keypoints_land_on_the_rendered_bfm(bfm, yaw):
    res, cam, col, row = _keypoints_on_the_render(bfm, yaw, (160, 160))
    assert _near_mask(res.mask, col, row).all()
    assert res.mask[row, col].mean() > 0.9
    # the nose tip (keypoint 30) is visible: the rendered surface there is the keypoint's depth
    assert res.mask[row[30], col[30]]
    assert abs(res.depth[row[30], col[30]] - cam[30, 2]) < 2_000  # 2 mm
    # frontal mean face: the image is about left-right symmetric and the nose is in the middle
    if yaw == 0:
        assert abs(col[30] - 79.5) < 3
        assert abs(res.mask.sum() - res.mask[:, ::-1].sum()) < 0.02 * res.mask.sum()


# ----------------------------------------------------------------------------- determinism
def test_output_is_deterministic_and_independent_of_chunking(small_model):
    v = small_model.vertices(np.random.default_rng(2).normal(size=40) * small_model.shape_std)
    colors = np.random.default_rng(3).random((small_model.n_vertices, 3))
    kw = dict(colors=colors, rotation=view_rotation(15, -5, 3), image_size=(64, 72))
    a = render_mesh(v, small_model.triangles, **kw)
    b = render_mesh(v, small_model.triangles, **kw)
    c = render_mesh(v, small_model.triangles, max_candidates=7, **kw)
    assert a.image.tobytes() == b.image.tobytes()
    assert np.array_equal(a.triangle_id, c.triangle_id)
    assert a.image.tobytes() == c.image.tobytes()
    assert np.array_equal(a.depth, c.depth, equal_nan=True)


def test_rasterize_tie_goes_to_the_higher_triangle_index():
    uv = np.array([[2.0, 30.0], [30.0, 30.0], [16.0, 2.0]])
    xy = np.concatenate([uv, uv])
    tri_id, _, _ = rasterize(xy, np.zeros(6), [[0, 1, 2], [3, 4, 5]], (32, 32))
    assert set(np.unique(tri_id)) == {-1, 1}


def test_bad_arguments_raise_validation_errors():
    v = np.zeros((3, 3))
    with pytest.raises(ValidationError, match="shading"):
        render_mesh(v, [[0, 1, 2]], shading="phong")
    with pytest.raises(ValidationError, match="colors"):
        render_mesh(np.eye(3), [[0, 1, 2]], colors=np.zeros((2, 3)), scale=1.0)
    with pytest.raises(ValidationError, match="triangles"):
        render_mesh(np.eye(3), [[0, 1, 5]], scale=1.0)
    with pytest.raises(ValidationError, match="scale"):
        render_mesh(np.eye(3), [[0, 1, 2]], fit="none")
    with pytest.raises(ValidationError, match="image_size"):
        render_mesh(np.eye(3), [[0, 1, 2]], image_size=(0, 5))
