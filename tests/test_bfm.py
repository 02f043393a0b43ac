import pickle
import shutil

import numpy as np
import pytest

from v2m_bench import BFMNotFoundError, ValidationError, load_bfm
from v2m_bench.bfm import BFM_FILES, find_bfm_dir


def test_small_model_vertices_are_linear(small_model):
    m = small_model
    rng = np.random.default_rng(1)
    a, e = rng.normal(size=(2, 40)) * m.shape_std, rng.normal(size=(2, 10))
    v = m.vertices(a, e)
    assert v.shape == (2, m.n_vertices, 3) and v.dtype == np.float32
    # linearity: v(a1) + v(a2) - mean == v(a1 + a2)
    both = m.vertices(a.sum(0), e.sum(0))
    np.testing.assert_allclose(v[0] + v[1] - m.mean, both, rtol=1e-4, atol=1.0)
    np.testing.assert_array_equal(m.vertices(np.zeros(40)), m.mean)


def test_torch_vertices_match_numpy(small_model):
    torch = pytest.importorskip("torch")
    m = small_model
    rng = np.random.default_rng(2)
    a, e = rng.normal(size=(3, 40)) * m.shape_std, rng.normal(size=(3, 10))
    vt = m.vertices(torch.tensor(a, dtype=torch.float64, requires_grad=True), torch.tensor(e))
    assert isinstance(vt, torch.Tensor) and vt.shape == (3, m.n_vertices, 3)
    np.testing.assert_allclose(vt.detach().numpy(), m.vertices(a, e), rtol=1e-4, atol=2.0)
    vt.sum().backward()  # differentiable


def test_wrong_coefficient_count_names_field(small_model):
    with pytest.raises(ValidationError, match="shape"):
        small_model.vertices(np.zeros((2, 39)))
    with pytest.raises(ValidationError, match="expression"):
        small_model.vertices(np.zeros((2, 40)), np.zeros((3, 10)))


def test_normals_point_outward_and_are_unit(small_model):
    m = small_model
    n = m.vertex_normals(m.mean[None])[0]
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-5)
    centre = np.argmin(np.linalg.norm(m.mean[:, :2], axis=1))
    assert n[centre, 2] > 0.99  # the top of the dome faces +z


def test_save_and_reload_roundtrip(small_model, tmp_path):
    p = small_model.save(tmp_path / "m.npz")
    m2 = load_bfm(p)
    for k in ("mean", "shape_basis", "triangles", "keypoints", "shape_std", "expression_mean"):
        np.testing.assert_array_equal(getattr(m2, k), getattr(small_model, k))


def test_missing_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("V2M_BFM_DIR", raising=False)
    monkeypatch.setenv("V2M_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(BFMNotFoundError, match="fetch-bfm"):
        find_bfm_dir()
    with pytest.raises(BFMNotFoundError, match="no such file"):
        load_bfm(tmp_path / "nowhere")


# ---------------------------------------------------------------- the real 3DDFA layout
def test_shared_bfm_loads(bfm):
    assert bfm.n_vertices == 53215 and bfm.n_shape == 40 and bfm.n_expression == 10
    assert bfm.triangles.shape == (105840, 3) and bfm.triangles.min() == 0
    assert bfm.keypoints[:5].tolist() == [21873, 22149, 21653, 21036, 43236]
    assert bfm.keypoints[-3:].tolist() == [8829, 8229, 7629]
    # the shared stand-in has interpolated bases: not the public files
    assert not bfm.is_genuine
    assert bfm.md5["u_shp.npy"] == "60f98b75ebd5ba340ec94ecc25a2c290"
    assert abs(bfm.shape_std[0] - 5.9e5) < 1e4 and abs(bfm.expression_mean[0] + 0.97) < 0.01
    n = bfm.vertex_normals(bfm.mean)
    assert n[bfm.keypoints[30], 2] > 0.9  # nose tip normal faces the camera


def test_cache_is_written_and_reused(bfm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("V2M_CACHE_DIR", str(tmp_path))
    m1 = load_bfm(bfm_dir)
    caches = list((tmp_path / "bfm").glob("bfm-*.npz"))
    assert len(caches) == 1
    m2 = load_bfm(bfm_dir)
    np.testing.assert_array_equal(m1.shape_basis, m2.shape_basis)
    assert m2.md5 == m1.md5


def test_restricted_unpickler_refuses_code(bfm_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bfm_dir, bad)
    (bad / "param_whitening.pkl").chmod(0o644)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (bad / "param_whitening.pkl").write_bytes(pickle.dumps({"param_mean": Evil()}))
    with pytest.raises(ValidationError, match="param_whitening.pkl.*refused"):
        load_bfm(bad, cache=False)


def test_incomplete_folder_names_missing_file(bfm_dir, tmp_path):
    bad = tmp_path / "partial"
    bad.mkdir()
    for f in BFM_FILES[:3]:
        shutil.copy(bfm_dir / f, bad / f)
    with pytest.raises(BFMNotFoundError, match="w_exp_sim.npy"):
        load_bfm(bad, cache=False)
