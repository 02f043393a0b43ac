"""A plan made once (icp_plan) gives the same scores as icp_scores making its own."""

import numpy as np
import pytest

from v2m_bench.errors import ValidationError
from v2m_bench.metrics import DEFAULT_ICP_CONFIG, icp_plan, icp_scores


def _faces(model, n, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    shape = rng.normal(size=(n, model.n_shape)) * model.shape_std * scale + model.shape_mean
    expr = rng.normal(size=(n, model.n_expression)) * model.expression_std * scale + model.expression_mean
    return model.vertices(shape.astype(np.float32), expr.astype(np.float32))


def _regions(model):
    x = model.mean[:, 0]
    return {"left": x > np.median(x), "right": x <= np.median(x)}


def test_plan_gives_identical_results(small_model):
    ref = _faces(small_model, 2, 0)
    pred = _faces(small_model, 4, 1, 0.5)
    group = np.array([0, 0, 1, 1])
    regions = _regions(small_model)
    plan = icp_plan(small_model.triangles, small_model.n_vertices, regions)
    a, pa = icp_scores(pred, ref, small_model.triangles, regions, group=group, return_distances=True)
    for _ in range(2):  # the plan is reused, not consumed
        b, pb = icp_scores(pred, ref, small_model.triangles, regions, group=group, return_distances=True, plan=plan)
        assert np.array_equal(a.rmse, b.rmse) and np.array_equal(a.distances, b.distances)
        assert np.array_equal(a.rotation, b.rotation)
        for k in regions:
            assert np.array_equal(pa[k].rmse, pb[k].rmse), k
    assert a.rmse.min() > 0.01


def test_a_plan_for_other_regions_or_config_is_refused(small_model):
    regions = _regions(small_model)
    plan = icp_plan(small_model.triangles, small_model.n_vertices, regions)
    ref = _faces(small_model, 1, 0)
    other = {"left": regions["right"], "right": regions["left"]}
    with pytest.raises(ValidationError, match="plan"):
        icp_scores(ref, ref, small_model.triangles, other, plan=plan)
    with pytest.raises(ValidationError, match="plan"):
        icp_scores(ref, ref, small_model.triangles, None, plan=plan)
    from dataclasses import replace

    cfg = replace(DEFAULT_ICP_CONFIG, n_iteration_vertices=DEFAULT_ICP_CONFIG.n_iteration_vertices // 2)
    with pytest.raises(ValidationError, match="plan"):
        icp_scores(ref, ref, small_model.triangles, regions, config=cfg, plan=plan)
