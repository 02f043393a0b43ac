"""ICP point-to-plane RMSE and part RMSE (v2m_bench.metrics.icp and its engines in v2m_bench.metrics._icp)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from v2m_bench.errors import ValidationError
from v2m_bench.geometry import vertex_normals
from v2m_bench.metrics._icp import plan as icp_plan_mod
from v2m_bench.metrics._icp import search as icp_search
from v2m_bench.metrics._icp.algebra import rowsum
from v2m_bench.metrics._icp.walk import normals32
from v2m_bench.metrics.icp import (
    DEFAULT_ICP_CONFIG,
    IcpConfig,
    icp_rmse,
    icp_scores,
    iteration_vertices,
    nearest_vertices,
    part_rmse,
)


def _faces(model, n, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    shape = rng.normal(size=(n, model.n_shape)) * model.shape_std * scale + model.shape_mean
    expr = rng.normal(size=(n, model.n_expression)) * model.expression_std * scale + model.expression_mean
    return model.vertices(shape.astype(np.float32), expr.astype(np.float32))


def _grid_dome(n_side=48):
    """A smooth, face-sized dome on a regular grid (BFM units) and its triangles."""
    u = np.linspace(-1.0, 1.0, n_side)
    gx, gy = np.meshgrid(u, u)
    z = 60_000.0 * np.sqrt(np.clip(1.2 - 0.6 * gx**2 - 0.4 * gy**2, 0.0, None))
    v = np.stack([80_000.0 * gx, 90_000.0 * gy, z], -1).reshape(-1, 3)
    idx = np.arange(n_side * n_side).reshape(n_side, n_side)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    tri = np.concatenate([np.stack([a, b, d], -1).reshape(-1, 3), np.stack([a, d, c], -1).reshape(-1, 3)])
    return v, tri, gx.reshape(-1), gy.reshape(-1)


def _icosphere(radius=80_000.0, subdiv=4):
    t = (1 + 5**0.5) / 2
    v = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
         (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    f = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2), (10, 7, 6),
         (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10),
         (8, 6, 7), (9, 8, 1)]
    verts = [np.array(p, float) / np.linalg.norm(p) for p in v]
    faces = f
    for _ in range(subdiv):
        cache, new = {}, []

        def mid(i, j):
            key = (min(i, j), max(i, j))
            if key not in cache:
                p = verts[i] + verts[j]
                verts.append(p / np.linalg.norm(p))
                cache[key] = len(verts) - 1
            return cache[key]

        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new
    return np.array(verts) * radius, np.array(faces, dtype=np.int64)


# ------------------------------------------------------------------------------- basic behaviour
def test_identical_meshes_score_zero(small_model):
    v = small_model.mean
    res = icp_rmse(v, v, small_model.triangles)
    assert res.rmse.shape == (1,)
    assert res.rmse[0] < 1e-5
    np.testing.assert_allclose(res.rotation[0], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(res.translation[0], 0.0, atol=0.05)
    assert res.scale[0] == 1.0


def test_rigidly_moved_copy_recovers_the_inverse_transform(small_model):
    ref = _faces(small_model, 1, 1)[0].astype(np.float64)
    rot = Rotation.from_rotvec([0.12, -0.3, 0.2]).as_matrix()
    shift = np.array([15_000.0, -7_000.0, 30_000.0])
    pred = ref @ rot.T + shift
    res = icp_rmse(pred, ref, small_model.triangles)
    assert res.rmse[0] < 1e-3
    np.testing.assert_allclose(res.rotation[0], rot.T, atol=1e-5)
    np.testing.assert_allclose(res.translation[0], -rot.T @ shift, atol=2.0)
    aligned = pred @ res.rotation[0].T + res.translation[0]
    assert np.abs(aligned - ref).max() < 5.0  # micrometres


def test_with_scale_recovers_a_scaled_copy(small_model):
    ref = _faces(small_model, 1, 2)[0].astype(np.float64)
    rot = Rotation.from_rotvec([0.0, 0.25, 0.05]).as_matrix()
    pred = 1.07 * ref @ rot.T + np.array([1000.0, 2000.0, -500.0])
    rigid = icp_rmse(pred, ref, small_model.triangles)
    sim = icp_rmse(pred, ref, small_model.triangles, with_scale=True)
    assert sim.scale[0] == pytest.approx(1 / 1.07, rel=1e-6)
    assert sim.rmse[0] < 1e-3
    assert rigid.rmse[0] > 100 * sim.rmse[0]  # a rigid fit cannot undo the scale


@pytest.mark.parametrize("engine", ["numba", "kdtree"])
def test_with_scale_keeps_the_correspondence_scale(small_model, engine):
    """The scale comes from the closed-form Umeyama fit over all vertex pairs and the ICP refines
    only rotation and translation. A point-to-plane cost cannot estimate a scale: shrinking the
    prediction towards one point on the surface drives it to zero (before this rule these
    predictions collapsed to scales of 0.014-0.04 and 4e-5)."""
    if engine == "numba":
        pytest.importorskip("numba")
    ref = _faces(small_model, 2, seed=11)
    pred = _faces(small_model, 6, seed=12, scale=0.6)
    group = np.repeat([0, 1], 3)
    res = icp_scores(pred, ref, small_model.triangles, None, group=group, with_scale=True, engine=engine)[0]
    for b in range(6):  # Umeyama by hand, in float64
        p = pred[b].astype(np.float64)
        q = ref[group[b]].astype(np.float64)
        pc, qc = p - p.mean(0), q - q.mean(0)
        u, sv, vt = np.linalg.svd(pc.T @ qc)
        d = np.array([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])
        want = (sv * d).sum() / (pc * pc).sum()
        assert res.scale[b] == pytest.approx(want, rel=1e-6)
    assert 0.5 < res.scale.min() and res.scale.max() < 2.0
    rigid = icp_scores(pred, ref, small_model.triangles, None, group=group, engine=engine)[0]
    assert np.all(res.rmse > 0.2 * rigid.rmse)  # no collapse to a point


def test_offset_surface_scores_the_offset():
    """Every vertex of a sphere moved out by d along its normal: rigid ICP cannot undo it.

    (On a coarse mesh the tangent plane of a vertex bends away from the sphere, so sliding the
    points between vertices lowers the distances by up to R * theta^2 / 2; at 3 mm spacing on a
    radius of 80 mm that is under 3 % of d.)
    """
    v, tri = _icosphere(subdiv=5)
    d = 500.0  # 0.5 mm
    n = vertex_normals(v, tri)
    res = icp_rmse(v + d * n, v, tri, return_distances=True)
    assert res.rmse[0] == pytest.approx(d / 1000, rel=0.03)
    assert np.all(res.distances[0] > 0)  # outside the reference surface: positive
    inner = icp_rmse(v - d * n, v, tri, return_distances=True)
    assert inner.rmse[0] == pytest.approx(d / 1000, rel=0.03)
    assert np.all(inner.distances[0] < 0)


def test_distances_and_nearest_are_consistent(small_model):
    ref, pred = _faces(small_model, 2, 3)
    res = icp_rmse(pred, ref, small_model.triangles, return_distances=True)
    assert res.distances.shape == (1, small_model.n_vertices) and res.distances.dtype == np.float32
    assert res.rmse[0] == pytest.approx(np.sqrt(np.mean(res.distances[0].astype(np.float64) ** 2)), rel=1e-6)
    # recompute the distances from the returned transform and nearest vertices
    aligned = res.scale[0] * pred.astype(np.float64) @ res.rotation[0].T + res.translation[0]
    nrm = vertex_normals(ref.astype(np.float64), small_model.triangles)
    q = ref.astype(np.float64)[res.nearest[0]]
    d = np.einsum("ij,ij->i", aligned - q, nrm[res.nearest[0]]) / 1000
    np.testing.assert_allclose(res.distances[0], d, atol=2e-4)


def test_normals_match_geometry_vertex_normals(small_model):
    v = _faces(small_model, 1, 4)[0]
    v = v - v.mean(axis=0)
    np.testing.assert_allclose(normals32(v.astype(np.float32), small_model.triangles),
                               vertex_normals(v.astype(np.float64), small_model.triangles), atol=2e-6)


def test_iteration_vertices_are_frozen():
    ids = iteration_vertices(53215, 2048)
    assert ids.shape == (2048,) and np.all(np.diff(ids) > 0)
    # the hash order is part of the metric's definition: these values must never change
    assert ids[:5].tolist() == [0, 11, 25, 50, 62]
    assert int(ids.sum()) == FROZEN_ITERATION_SUM
    assert iteration_vertices(10, 2048).tolist() == list(range(10))
    region = np.arange(1000, 3000)
    sub = iteration_vertices(region, 512)
    assert sub.size == 512 and np.isin(sub, region).all()


FROZEN_ITERATION_SUM = 54000734  # sum of the 2048 BFM iteration vertices (frozen)


# ---------------------------------------------------------------------------- nearest vertices
def test_walk_finds_the_nearest_vertex_on_a_smooth_mesh(small_model):
    # faces about as far apart as the paper's predictions (RMSE 1.4-1.7 mm)
    refs = _faces(small_model, 3, 5, scale=0.2)
    preds = _faces(small_model, 3, 6, scale=0.2)
    res = icp_rmse(preds, refs, small_model.triangles, return_distances=True, nearest="walk")
    aligned = res.scale[:, None, None] * np.matmul(preds.astype(np.float64), res.rotation.transpose(0, 2, 1))
    aligned += res.translation[:, None, :]
    for b in range(3):
        exact = cKDTree(refs[b].astype(np.float64)).query(aligned[b])[1]
        assert (res.nearest[b] == exact).mean() >= 0.999
    exact_res = icp_rmse(preds, refs, small_model.triangles, nearest="exact")
    np.testing.assert_allclose(res.rmse, exact_res.rmse, rtol=2e-3)
    default = icp_rmse(preds, refs, small_model.triangles)
    np.testing.assert_allclose(default.rmse, exact_res.rmse, rtol=2e-3)


def test_nearest_vertices_walk_reaches_far_vertices():
    v, tri, _, _ = _grid_dome(32)
    target = v[[0, 500, 1023]] + np.array([0.0, 0.0, 2000.0])
    got = nearest_vertices(target, v, tri, start=[1023, 0, 512])
    np.testing.assert_array_equal(got[0], [0, 500, 1023])


@pytest.mark.slow
def test_walk_against_exhaustive_search_on_bfm_faces(bfm):
    """Realistic pairs: a prediction near the mean (0.5 sd) against a reference (1 sd)."""
    refs = _faces(bfm, 3, 10)
    preds = _faces(bfm, 3, 11, scale=0.5)
    walk = icp_rmse(preds, refs, bfm.triangles, return_distances=True, nearest="walk")
    aligned = walk.scale[:, None, None] * np.matmul(preds.astype(np.float64), walk.rotation.transpose(0, 2, 1))
    aligned += walk.translation[:, None, :]
    nrm = vertex_normals(refs.astype(np.float64), bfm.triangles)
    exhaustive = []
    for b in range(3):
        exact = cKDTree(refs[b].astype(np.float64)).query(aligned[b])[1]
        agree = (walk.nearest[b] == exact).mean()
        # measured 97.6-99.3 %: the walk stays on the corresponding sheet where the surface folds
        assert agree >= 0.97, agree
        d = np.einsum("ij,ij->i", aligned[b] - refs[b][exact], nrm[b][exact]) / 1000
        exhaustive.append(np.sqrt(np.mean(d**2)))
    # the walk's score is biased upwards (it never finds a nearer vertex than the exhaustive one)
    assert np.all(walk.rmse >= np.array(exhaustive) - 1e-6)
    np.testing.assert_allclose(walk.rmse, exhaustive, rtol=0.05)
    # the default scores with the exhaustive search; the walk only steers the iterations
    default = icp_rmse(preds, refs, bfm.triangles, return_distances=True)
    full = icp_rmse(preds, refs, bfm.triangles, nearest="exact", config=IcpConfig(n_iteration_vertices=10**6))
    np.testing.assert_allclose(default.rmse, full.rmse, rtol=0.015)
    for b in range(3):
        x = default.scale[b] * preds[b].astype(np.float64) @ default.rotation[b].T + default.translation[b]
        np.testing.assert_array_equal(default.nearest[b], cKDTree(refs[b].astype(np.float64)).query(x)[1])


# ------------------------------------------------------------------------------ batch behaviour
def test_batch_independence_and_groups(small_model):
    refs = _faces(small_model, 2, 7)
    preds = _faces(small_model, 5, 8)
    group = np.array([0, 1, 1, 0, 1])
    batch = icp_rmse(preds, refs, small_model.triangles, group=group, return_distances=True)
    for b in range(5):
        alone = icp_rmse(preds[b], refs[group[b]], small_model.triangles, return_distances=True)
        np.testing.assert_array_equal(alone.rmse[0], batch.rmse[b])
        np.testing.assert_array_equal(alone.rotation[0], batch.rotation[b])
        np.testing.assert_array_equal(alone.distances[0], batch.distances[b])
    # reversed order and one thread: same numbers
    rev = icp_rmse(preds[::-1], refs, small_model.triangles, group=group[::-1], threads=1)
    np.testing.assert_array_equal(rev.rmse[::-1], batch.rmse)
    # one reference broadcast to every prediction
    one = icp_rmse(preds, refs[0], small_model.triangles)
    np.testing.assert_array_equal(one.rmse[[0, 3]], batch.rmse[[0, 3]])
    # the walk everywhere (layered all-vertex score) is batch independent too
    wb = icp_rmse(preds, refs, small_model.triangles, group=group, nearest="walk")
    for b in (1, 4):
        np.testing.assert_array_equal(icp_rmse(preds[b], refs[group[b]], small_model.triangles, nearest="walk").rmse[0],
                                      wb.rmse[b])


def test_part_rmse_sees_a_local_offset_only_in_its_region():
    v, tri, gx, gy = _grid_dome(64)
    n = vertex_normals(v, tri)
    # a zero-mean ripple (no rigid component) inside a disk; nothing elsewhere
    inside = (gx - 0.35) ** 2 + (gy - 0.1) ** 2 < 0.3**2
    other = (gx + 0.4) ** 2 + (gy + 0.2) ** 2 < 0.3**2
    amp = 300.0
    ripple = amp * np.cos(2 * np.pi * gx / 0.1) * np.cos(2 * np.pi * gy / 0.1)
    offset = np.where(inside, ripple, 0.0)
    pred = v + offset[:, None] * n
    regions = {"bumpy": inside, "flat": other}
    parts = part_rmse(pred, v, tri, regions)
    expected = np.sqrt(np.mean(offset[inside] ** 2)) / 1000
    assert parts["bumpy"][0] == pytest.approx(expected, rel=0.1)
    assert parts["flat"][0] < 0.02 * expected
    glob, full = icp_scores(pred, v, tri, regions, return_distances=True)
    assert glob.rmse[0] == pytest.approx(np.sqrt(np.mean(offset**2)) / 1000, rel=0.1)
    assert set(full) == {"bumpy", "flat"}
    np.testing.assert_array_equal(full["bumpy"].vertex_ids, np.flatnonzero(inside))
    assert full["bumpy"].distances.shape == (1, inside.sum())
    np.testing.assert_array_equal(full["flat"].rmse, parts["flat"])


def test_part_rmse_of_a_moved_region_is_zero_after_local_icp():
    """A region moved rigidly on its own: the global fit sees it, the local ICP removes it."""
    v, tri, gx, gy = _grid_dome(48)
    region = (gx - 0.3) ** 2 + (gy - 0.2) ** 2 < 0.25**2
    pred = v.copy()
    rot = Rotation.from_rotvec([0.0, 0.0, 0.05]).as_matrix()
    c = v[region].mean(axis=0)
    pred[region] = (v[region] - c) @ rot.T + c + np.array([0.0, 0.0, 400.0])
    glob, parts = icp_scores(pred, v, tri, {"moved": region})
    assert glob.rmse[0] > 0.05
    assert parts["moved"].rmse[0] < 0.02 * glob.rmse[0] * np.sqrt(v.shape[0] / region.sum())


# --------------------------------------------------------------------------------- validation
def test_bad_inputs_raise_validation_errors_naming_the_argument(small_model):
    v = small_model.mean
    tri = small_model.triangles
    with pytest.raises(ValidationError, match="pred"):
        icp_rmse(v[:, :2], v, tri)
    with pytest.raises(ValidationError, match="ref"):
        icp_rmse(v, v[:-1], tri)
    with pytest.raises(ValidationError, match="triangles"):
        icp_rmse(v, v, tri[:, :2])
    with pytest.raises(ValidationError, match="triangles"):
        icp_rmse(v, v, tri + v.shape[0])
    with pytest.raises(ValidationError, match="group"):
        icp_rmse(np.stack([v, v, v]), np.stack([v, v]), tri)
    with pytest.raises(ValidationError, match="group"):
        icp_rmse(np.stack([v, v]), np.stack([v, v]), tri, group=[0, 2])
    with pytest.raises(ValidationError, match="regions"):
        part_rmse(v, v, tri, {"x": np.ones(3, bool)})
    with pytest.raises(ValidationError, match="regions"):
        part_rmse(v, v, tri, {"x": np.zeros(v.shape[0], bool)})
    bad = v.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValidationError, match="pred"):
        icp_rmse(bad, v, tri)
    bad[3, 1] = np.inf
    for engine in ("numba", "kdtree"):  # the compiled centring checks the references as it reads them
        with pytest.raises(ValidationError, match="ref: contains NaN or infinite"):
            icp_rmse(v, bad, tri, engine=engine)
        with pytest.raises(ValidationError, match="ref: contains NaN or infinite"):
            icp_rmse(v, bad.astype(np.float64)[::1], tri, engine=engine)
    with pytest.raises(ValidationError, match="max_iterations"):
        IcpConfig(max_iterations=0)
    with pytest.raises(ValidationError, match="nearest"):
        icp_rmse(v, v, tri, nearest="kdtree")
    with pytest.raises(ValidationError, match="score_nearest"):
        IcpConfig(score_nearest="fast")
    assert DEFAULT_ICP_CONFIG == IcpConfig()


def test_torch_backend_matches_numpy(small_model):
    pytest.importorskip("torch")
    refs = _faces(small_model, 2, 12, scale=0.2)
    preds = _faces(small_model, 4, 13, scale=0.2)
    group = np.array([0, 0, 1, 1])
    mask = small_model.mean[:, 0] > 0
    a, ap = icp_scores(preds, refs, small_model.triangles, {"half": mask}, group=group, nearest="walk")
    b, bp = icp_scores(preds, refs, small_model.triangles, {"half": mask}, group=group, nearest="walk", device="cpu")
    np.testing.assert_allclose(b.rmse, a.rmse, rtol=1e-5)
    np.testing.assert_allclose(bp["half"].rmse, ap["half"].rmse, rtol=1e-5)
    # the definition (exhaustive score and parts) on a torch device: the numpy path with torch
    # walks, against the default (compiled when numba imports)
    c, cp = icp_scores(preds, refs, small_model.triangles, {"half": mask}, group=group, device="cpu")
    d, dp = icp_scores(preds, refs, small_model.triangles, {"half": mask}, group=group)
    np.testing.assert_allclose(c.rmse, d.rmse, rtol=1e-5)
    np.testing.assert_allclose(cp["half"].rmse, dp["half"].rmse, rtol=1e-5)
    assert (c.nearest is None) and not np.allclose(c.rmse, a.rmse, rtol=1e-9)  # not the walk scores again


# ------------------------------------------------------------------ exhaustive search engines
def _folded_sheet(n_side=20, seed=0):
    """A grid sheet folded back over itself (like lips or an eyelid), plus duplicated vertices:
    the walk alone misses the nearest vertex there, and duplicates make exact distance ties."""
    u = np.linspace(-1.0, 1.0, n_side)
    gx, gy = np.meshgrid(u, u)
    # fold along y: the upper half bends back under the lower half, 1.5 mm apart
    z = np.where(gy > 0, -1_500.0 * gy, 0.0)
    yy = np.where(gy > 0, -gy * 0.9, gy)
    v = np.stack([40_000.0 * gx, 40_000.0 * yy, z + 300.0 * np.sin(5 * gx)], -1).reshape(-1, 3)
    idx = np.arange(n_side * n_side).reshape(n_side, n_side)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    tri = np.concatenate([np.stack([a, b, d], -1).reshape(-1, 3), np.stack([a, d, c], -1).reshape(-1, 3)])
    # duplicate a few vertices exactly (a second strip of triangles on the copies)
    dup = np.arange(5)
    v = np.concatenate([v, v[dup]])
    extra = np.stack([n_side * n_side + dup[:-1], n_side * n_side + dup[1:], idx[1, 1:5]], -1)
    return v, np.concatenate([tri, extra])


def _brute_nearest(points, q):
    """Exhaustive nearest vertex in float64 from float32 coordinates, lowest id on ties."""
    x = points.astype(np.float32).astype(np.float64)
    qq = q.astype(np.float32).astype(np.float64)
    d = ((x[:, None, :] - qq[None, :, :]) ** 2).sum(-1)
    return d.argmin(axis=1)


@pytest.mark.parametrize("engine", ["numba", "kdtree"])
def test_exhaustive_engines_find_the_exact_nearest_vertex(engine):
    pytest.importorskip("numba") if engine == "numba" else None
    v, tri = _folded_sheet()
    n = v.shape[0]
    rng = np.random.default_rng(3)
    q32 = (v - v.mean(0)).astype(np.float32)[None]
    # points near the surface, on both sheets of the fold, and far away; starts anywhere
    pts = q32[0][rng.integers(0, n, 2000)] + rng.normal(scale=[2_000, 2_000, 1_200], size=(2000, 3))
    pts = np.concatenate([pts, rng.normal(scale=60_000, size=(200, 3)), q32[0][:5]]).astype(np.float32)
    start = rng.integers(0, n, pts.shape[0])
    plan = icp_plan_mod.make_plan(tri.astype(np.int64), n, {}, DEFAULT_ICP_CONFIG)
    kernels = icp_search.exact_engine(engine)
    search = icp_search.make_search(q32, plan.whole.graph.nbr, kernels, DEFAULT_ICP_CONFIG.max_walk_steps)
    got = search.query(pts[None], np.array([0]), start[None])[0]
    want = _brute_nearest(pts, q32[0])
    if engine == "numba":
        np.testing.assert_array_equal(got, want)  # the lowest id wins exact ties
    else:  # the k-d tree breaks exact ties its own way: compare distances
        d = lambda i: ((pts.astype(np.float64) - q32[0][i].astype(np.float64)) ** 2).sum(1)  # noqa: E731
        np.testing.assert_array_equal(d(got), d(want))
    # the walk alone is not exhaustive on this sheet: the check above is not trivially satisfied
    walk = nearest_vertices(pts, q32[0], tri, start=start)[0]
    assert (walk != want).sum() > 20


def test_score_kernel_finds_the_exact_nearest_vertex():
    """``score_exact`` checks the walk's answers in groups of points (by grid column) sharing one
    gathered candidate list (float32 counts): the same answers as brute force, ties to the lowest
    id included, where the walk ends on the wrong sheet of a fold or on a duplicated vertex, and
    for points far outside the grid (grouped with its edge columns)."""
    nnk = pytest.importorskip("v2m_bench.metrics._icp.kernels")

    v, tri = _folded_sheet()
    n = v.shape[0]
    rng = np.random.default_rng(8)
    q32 = np.ascontiguousarray((v - v.mean(0)).astype(np.float32)[None])
    near_sheet = q32[0][rng.integers(0, n, 3000)] + rng.normal(scale=[2_000, 2_000, 1_200], size=(3000, 3))
    on_copies = q32[0][np.repeat(np.arange(5), 20)] + rng.normal(scale=30.0, size=(100, 3))  # exact ties
    far = rng.normal(scale=60_000, size=(100, 3))
    pts = np.concatenate([near_sheet, on_copies, far, q32[0][:5]]).astype(np.float32)
    plan = icp_plan_mod.make_plan(tri.astype(np.int64), n, {}, DEFAULT_ICP_CONFIG)
    nbr = plan.whole.graph.nbr
    nrm = nnk.normals32(q32, tri.astype(np.int64))
    grid = nnk.build_grids(q32, icp_search.GRID_CELL)
    pose = (np.ascontiguousarray(np.eye(3)[None]), np.ones(1), np.zeros((1, 3)))
    near, d, ss = nnk.score_exact(np.ascontiguousarray(pts[None]), pose, np.zeros(1, np.int64), (q32, nrm, nbr), grid,
                                  DEFAULT_ICP_CONFIG.max_walk_steps)
    want = _brute_nearest(pts, q32[0])
    np.testing.assert_array_equal(near[0], want)
    np.testing.assert_array_equal(d[0], ((pts - q32[0][want]) * nrm[0][want]).sum(1, dtype=np.float32))
    np.testing.assert_array_equal(ss, rowsum(d.astype(np.float64) ** 2))  # the RMSE's sum, same order
    # not trivially satisfied: the walk alone misses on the fold, and copies tie exactly
    walk = nearest_vertices(pts, q32[0], tri, start=np.arange(pts.shape[0]) % n)[0]
    assert (walk != want).sum() > 20
    dist = ((pts.astype(np.float64)[:, None] - q32[0].astype(np.float64)[None]) ** 2).sum(-1)
    two = np.sort(dist, axis=1)[:, :2]
    assert (two[:, 0] == two[:, 1]).sum() >= 100


def test_numba_and_kdtree_engines_give_the_same_scores(small_model):
    """numba runs the compiled pipeline, kdtree the numpy one: same nearest vertices and the same
    scores up to rounding (the sums and 6x6 solves group terms differently)."""
    pytest.importorskip("numba")

    ref = _faces(small_model, 2, seed=11)
    pred = _faces(small_model, 6, seed=12, scale=0.6)
    n = small_model.n_vertices
    regions = {"left": small_model.mean[:, 0] > 0, "band": np.abs(small_model.mean[:, 1]) < 0.3 * np.ptp(small_model.mean[:, 1])}
    group = np.repeat([0, 1], 3)
    out = {}
    for engine in ("numba", "kdtree"):
        for with_scale in (False, True):
            out[engine, with_scale] = icp_scores(pred, ref, small_model.triangles, regions, group=group, engine=engine,
                                                 return_distances=True, with_scale=with_scale)
    for with_scale in (False, True):
        (ga, pa), (gb, pb) = out["numba", with_scale], out["kdtree", with_scale]
        np.testing.assert_allclose(ga.rmse, gb.rmse, rtol=1e-6)
        np.testing.assert_allclose(ga.rotation, gb.rotation, atol=1e-9)
        np.testing.assert_allclose(ga.scale, gb.scale, rtol=1e-6)
        np.testing.assert_array_equal(ga.iterations, gb.iterations)
        assert (ga.nearest == gb.nearest).mean() > 0.999
        np.testing.assert_allclose(ga.distances, gb.distances, atol=1e-6 * np.abs(gb.distances).max())
        for k in regions:
            np.testing.assert_allclose(pa[k].rmse, pb[k].rmse, rtol=1e-6)
            np.testing.assert_allclose(pa[k].rotation, pb[k].rotation, atol=1e-9)
            np.testing.assert_allclose(pa[k].translation, pb[k].translation, atol=1e-6 * np.abs(gb.translation).max())
            assert (pa[k].nearest == pb[k].nearest).mean() > 0.999
        assert ga.rmse.min() > 0 and n == ga.nearest.shape[1]
    assert np.abs(out["numba", True][0].scale - 1).max() > 1e-4  # the scaled runs really scale


def test_compiled_pipeline_matches_the_numpy_one_in_every_mode(small_model):
    """nearest="exact" (exhaustive searches in the global iterations too) and a prediction scored
    alone or in a batch, with any number of threads: the compiled path agrees with the numpy path
    and with itself bit for bit."""
    pytest.importorskip("numba")
    ref = _faces(small_model, 3, seed=21)
    pred = _faces(small_model, 9, seed=22, scale=0.6)
    group = np.repeat([0, 1, 2], 3)
    regions = {"left": small_model.mean[:, 0] > 0}
    a = icp_scores(pred, ref, small_model.triangles, regions, group=group, engine="numba", nearest="exact")
    b = icp_scores(pred, ref, small_model.triangles, regions, group=group, engine="kdtree", nearest="exact")
    np.testing.assert_allclose(a[0].rmse, b[0].rmse, rtol=1e-6)
    np.testing.assert_allclose(a[1]["left"].rmse, b[1]["left"].rmse, rtol=1e-6)
    full = icp_scores(pred, ref, small_model.triangles, regions, group=group, engine="numba", threads=3)
    alone = icp_scores(pred[4:5], ref[1:2], small_model.triangles, regions, engine="numba", threads=1)
    np.testing.assert_array_equal(full[0].rmse[4:5], alone[0].rmse)
    np.testing.assert_array_equal(full[0].rotation[4:5], alone[0].rotation)
    np.testing.assert_array_equal(full[1]["left"].rmse[4:5], alone[1]["left"].rmse)


def test_engine_choice_is_validated_and_falls_back_without_numba(small_model, monkeypatch):
    import sys

    ref = _faces(small_model, 1, seed=1)
    with pytest.raises(ValidationError, match="engine"):
        icp_rmse(ref, ref, small_model.triangles, engine="fast")
    monkeypatch.setitem(sys.modules, "v2m_bench.metrics._icp.kernels", None)  # as if numba were not installed
    assert icp_search.exact_engine(None) is None
    with pytest.raises(ValidationError, match="numba is not installed"):
        icp_rmse(ref, ref, small_model.triangles, engine="numba")
    pred = _faces(small_model, 1, seed=2)
    fallback = icp_rmse(pred, ref, small_model.triangles).rmse
    monkeypatch.delitem(sys.modules, "v2m_bench.metrics._icp.kernels")
    np.testing.assert_array_equal(fallback, icp_rmse(pred, ref, small_model.triangles, engine="kdtree").rmse)


def test_ball_search_bounds_the_second_nearest_vertex():
    """``search_ball`` (the part ICPs' searches that let a point be re-used while it moves less
    than half the gap to its second-nearest vertex): exact nearest vertex within the radius, and a
    second-nearest bound that is never above the truth; checked by brute force on the folded
    sheet with duplicated vertices."""
    nnk = pytest.importorskip("v2m_bench.metrics._icp.grid_kernels")
    v, tri = _folded_sheet()
    q32 = (v - v.mean(0)).astype(np.float32)[None]
    rng = np.random.default_rng(5)
    pts = (q32[0][rng.integers(0, v.shape[0], 1500)] + rng.normal(scale=[2_000, 2_000, 1_200], size=(1500, 3))).astype(np.float32)
    grid = nnk.build_grids(q32, 5.0)
    axes = grid[0]
    qq = q32[0].astype(np.float64)
    n_ties = n_found = 0
    for x, r0 in zip(pts.astype(np.float64), rng.uniform(500.0, 6_000.0, pts.shape[0])):
        y = x[axes[0]]
        c, d2, lb2 = nnk.search_ball(y[0], y[1], y[2], r0, 0, grid)
        dist = ((x - qq) ** 2).sum(1)
        order = np.lexsort((np.arange(dist.size), dist))
        if dist[order[0]] <= r0 * r0:
            n_found += 1
            assert c == order[0] and d2 == dist[order[0]]
            assert lb2 <= dist[order[1]] and lb2 <= r0 * r0
            n_ties += dist[order[1]] == dist[order[0]]
            assert lb2 >= min(dist[order[1]], r0 * r0) * (1 - 1e-12)  # and it is the tight bound
        else:  # nothing within r0: at most a farther vertex seen on the way
            assert c == -1 or d2 > r0 * r0
    assert n_found > 500 and n_ties > 0


def test_point_reuse_in_the_part_icps_does_not_change_results(small_model, monkeypatch):
    pytest.importorskip("numba")
    from v2m_bench.metrics._icp import compiled_engine

    ref = _faces(small_model, 2, seed=31)
    pred = _faces(small_model, 6, seed=32, scale=0.6)
    group = np.repeat([0, 1], 3)
    regions = {"left": small_model.mean[:, 0] > 0, "top": small_model.mean[:, 1] > 0}
    out = []
    for margin in (0.0, 0.2, 1.0):
        monkeypatch.setattr(compiled_engine, "CERT_MARGIN_MM", margin)
        out.append(icp_scores(pred, ref, small_model.triangles, regions, group=group, engine="numba", return_distances=True)[1])
    for other in out[1:]:
        for k in regions:
            np.testing.assert_array_equal(out[0][k].rotation, other[k].rotation)
            np.testing.assert_array_equal(out[0][k].iterations, other[k].iterations)
            np.testing.assert_array_equal(out[0][k].nearest, other[k].nearest)


def test_compiled_kernels_compile_once_whatever_the_batch(small_model):
    """Arrays reach the kernels in one layout, so a user's first run compiles each kernel once
    (about 15 s in all), not once per batch shape (a (1, S) array is also Fortran-ordered)."""
    nnk = pytest.importorskip("v2m_bench.metrics._icp.kernels")
    ref = _faces(small_model, 2, seed=41)
    pred = _faces(small_model, 6, seed=42, scale=0.6)
    regions = {"left": small_model.mean[:, 0] > 0}
    icp_scores(pred[:1], ref[:1], small_model.triangles, regions, engine="numba")
    icp_scores(pred[:3], ref[:1], small_model.triangles, regions, engine="numba", threads=1)
    icp_scores(pred, ref, small_model.triangles, regions, group=np.repeat([0, 1], 3), engine="numba", with_scale=True)
    icp_scores(pred[:2], ref[:2], small_model.triangles, None, engine="numba", nearest="exact", return_distances=True)
    for name in ("normals32", "build_grids", "cross_covariance", "icp_iterate", "score_exact"):
        assert len(getattr(nnk, name).signatures) == 1, (name, getattr(nnk, name).signatures)
    # the references' centring reads float32 arrays in place and any other input as float64 rows
    kinds = {(str(sig[0].dtype), sig[0].layout) for sig in nnk.center_references.signatures}
    assert kinds <= {("float32", "C"), ("float64", "C")}, kinds


@pytest.mark.parametrize("ncols", [300, 30])  # ~17 vertices per column (insertion sort), ~170 (merge sort)
def test_column_grid_orders_vertices_by_column_then_depth_then_id(ncols):
    nnk = pytest.importorskip("v2m_bench.metrics._icp.grid_kernels")
    rng = np.random.default_rng(0)
    key = rng.integers(0, ncols, 5000)
    depth = rng.integers(0, 20, 5000).astype(np.float32)  # many equal depths: ids break the ties
    starts, items = nnk.column_sort(key, depth, ncols)
    np.testing.assert_array_equal(items, np.lexsort((np.arange(5000), depth, key)))
    np.testing.assert_array_equal(np.diff(starts), np.bincount(key, minlength=ncols))
