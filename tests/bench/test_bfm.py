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


# ------------------------------------------------------------------ hostile or broken BFM files
def _bfm_with(bfm_dir, tmp_path, name, data):
    """A BFM folder linking the genuine files except ``name``, which holds ``data`` (bytes)."""
    folder = tmp_path / "bfm"
    folder.mkdir()
    for f in BFM_FILES:
        if f != name:
            (folder / f).symlink_to(bfm_dir / f)
    (folder / name).write_bytes(data)
    return folder


def _whitening(bfm_dir, **changes):
    with open(bfm_dir / "param_whitening.pkl", "rb") as fh:
        d = pickle.load(fh, encoding="latin1")
    d.update(changes)
    return pickle.dumps(d)


def _npy(arr=None, header_shape=None, dtype="<f4"):
    import io

    buf = io.BytesIO()
    if header_shape is None:
        np.save(buf, arr, allow_pickle=False)
    else:
        np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": header_shape})
        buf.write(b"\0" * 64)
    return buf.getvalue()


def _laughs(depth=40, width=10):
    x = [1.0]
    for _ in range(depth):
        x = [x] * width  # shared references: a tiny pickle, 10**40 floats once expanded
    return pickle.dumps({"param_mean": x, "param_std": x})


N3 = 53215 * 3


@pytest.mark.parametrize(
    "name, make, match",
    [
        ("param_whitening.pkl", lambda d: _whitening(d, param_mean="abc" * 30), "param_mean: expected a numpy array, found str"),
        ("param_whitening.pkl", lambda d: _whitening(d, param_mean={"a": 1}), "param_mean: expected a numpy array, found dict"),
        ("param_whitening.pkl", lambda d: _laughs(), "param_mean: expected a numpy array, found list"),
        ("param_whitening.pkl", lambda d: _whitening(d, param_std=np.zeros(62, np.float32)), "param_std: standard deviations must be > 0"),
        ("param_whitening.pkl", lambda d: _whitening(d, param_std=np.full(62, np.nan, np.float32)), "param_std: holds NaN"),
        ("param_whitening.pkl", lambda d: _whitening(d, param_mean=np.zeros(62, np.complex64)), "param_mean: expected real numbers, found dtype complex64"),
        ("u_shp.npy", lambda d: _npy(header_shape=(10**11, 1)), r"expected shape \(159645, 1\), found \(100000000000, 1\)"),
        ("u_shp.npy", lambda d: _npy(np.full((N3, 1), "x")), "expected real numbers, found dtype <U1"),
        ("u_shp.npy", lambda d: _npy(np.full((N3, 1), np.nan, np.float32)), "holds NaN or infinite values"),
        ("u_shp.npy", lambda d: _npy(np.ones((N3, 1), np.complex64)), "expected real numbers, found dtype complex64"),
        ("u_shp.npy", lambda d: b"1.0\n2.0\n", r"not a .npy array file"),
        ("keypoints_sim.npy", lambda d: _npy(np.load(d / "keypoints_sim.npy") + 0.5), "fractional ids"),
        ("tri.mat", lambda d: _mat(np.full((3, 10), 1.5)), "tri: holds fractional ids"),
        ("tri.mat", lambda d: _mat(np.zeros((3, 0))), r"tri: expected a \(3, F\) array, found \(3, 0\)"),
        ("tri.mat", lambda d: _mat(np.array([["a", "b", "c"]])), "tri: expected real numbers"),
    ],
    ids=["str-mean", "dict-mean", "billion-laughs", "zero-std", "nan-std", "complex-mean", "huge-header", "str-dtype",
         "nan", "complex", "text-npy", "fractional-keypoints", "fractional-tri", "empty-tri", "str-tri"],
)
def test_bad_bfm_files_are_one_line_errors_naming_the_file(bfm_dir, tmp_path, name, make, match):
    folder = _bfm_with(bfm_dir, tmp_path, name, make(bfm_dir))
    with pytest.raises(ValidationError, match=match) as info:
        load_bfm(folder, cache=False)
    msg = str(info.value)
    assert "\n" not in msg and str(folder / name) in msg
    assert "pickled" not in msg


def _mat(tri):
    import io

    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, {"tri": tri})
    return buf.getvalue()


def test_oversized_pickle_is_refused_before_reading(bfm_dir, tmp_path):
    folder = _bfm_with(bfm_dir, tmp_path, "param_whitening.pkl", b"\0" * (17 << 20))
    with pytest.raises(ValidationError, match=r"param_whitening.pkl: 17825792 bytes, more than"):
        load_bfm(folder, cache=False)
