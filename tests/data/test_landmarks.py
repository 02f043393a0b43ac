"""Face images, iBUG .pts files, VGGFace lists, face crops and the landmark backends."""

from __future__ import annotations

import importlib.util
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from v2m_bench.errors import DownloadError, V2MError, ValidationError
from v2m_data.images import (
    crop_face,
    load_image,
    read_pts,
    read_vggface_annotations,
    square_box,
    write_pts,
)
from v2m_data.landmarks import (
    FAN_WEIGHT_FILES,
    detector_box_from_landmarks,
    landmark_box,
    landmark_nme,
    make_detector,
)

cv2 = pytest.importorskip("cv2")

NME_BOUND = 0.05


def _write_png(path: Path, rgb: np.ndarray) -> Path:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _random_points(seed=0, n=68):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 500, size=(n, 2))).astype(np.float32)


# ------------------------------------------------------------------ images


def test_load_image_rgb_order_and_odd_path(tmp_path):
    rgb = np.zeros((7, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[2, 3] = (1, 2, 3)
    odd = tmp_path / "ünï cødé [1].png"
    _write_png(odd, rgb)
    out = load_image(odd)
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, rgb)  # RGB, not BGR


def test_load_image_grey_becomes_three_channels(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    ok, buf = cv2.imencode(".png", grey)
    p = tmp_path / "g.png"
    p.write_bytes(buf.tobytes())
    out = load_image(p)
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[..., 1], grey)


@pytest.mark.parametrize(
    "content, words",
    [(b"", "empty"), (b"this is not an image at all" * 10, "not a readable image"), (None, "not a readable image")],
)
def test_bad_image_errors_name_the_file(tmp_path, content, words):
    p = tmp_path / "broken_face.jpg"
    if content is None:  # a JPEG cut after its header: corrupt
        ok, buf = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))
        content = buf.tobytes()[:40]
    p.write_bytes(content)
    with pytest.raises(ValidationError) as ei:
        load_image(p)
    assert str(p) in str(ei.value) and words in str(ei.value)


def test_missing_image_error_names_the_file(tmp_path):
    with pytest.raises(ValidationError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")


# ------------------------------------------------------------------ .pts


def test_pts_round_trip_is_one_based_on_disk(tmp_path):
    pts = _random_points(1)
    p = tmp_path / "a.pts"
    write_pts(p, pts)
    lines = p.read_text().splitlines()
    assert lines[0] == "version: 1" and lines[1].replace(" ", "") == "n_points:68" and lines[2] == "{"
    assert lines[-1] == "}" and len(lines) == 68 + 4
    x0, y0 = map(float, lines[3].split())
    assert x0 == pytest.approx(float(pts[0, 0]) + 1, abs=1e-5) and y0 == pytest.approx(float(pts[0, 1]) + 1, abs=1e-5)
    back = read_pts(p)
    assert back.dtype == np.float32 and back.shape == (68, 2)
    np.testing.assert_allclose(back, pts, atol=1e-4)


def test_write_pts_drops_z(tmp_path):
    pts3 = np.concatenate([_random_points(2), np.full((68, 1), 7.0, np.float32)], 1)
    write_pts(tmp_path / "b.pts", pts3)
    np.testing.assert_allclose(read_pts(tmp_path / "b.pts"), pts3[:, :2], atol=1e-4)


def test_read_pts_known_file_values(tmp_path):
    body = "\n".join(f"{i + 1}.5 {2 * i + 1}" for i in range(68))
    p = tmp_path / "k.pts"
    p.write_text(f"version: 1\nn_points:  68\n{{\n{body}\n}}")  # no final newline, as in 300W files
    pts = read_pts(p)
    np.testing.assert_allclose(pts[:, 0], np.arange(68) + 0.5)
    np.testing.assert_allclose(pts[:, 1], 2 * np.arange(68))


@pytest.mark.parametrize(
    "text, words",
    [
        ("version: 1\nn_points: 68\n{\n1 2\n}\n", "lists 1 points"),
        ("version: 1\nn_points: 2\n{\n1 2\n3 4\n}\n", "expected 68 points"),
        ("version: 1\nn_points: 1\n{\n1 x\n}\n", "line 4"),
        ("version: 1\nn_points: 1\n{\n1 2\n", "no '}'"),
        ("hello\n", "line 1"),
    ],
)
def test_read_pts_malformed(tmp_path, text, words):
    p = tmp_path / "bad.pts"
    p.write_text(text)
    with pytest.raises(ValidationError) as ei:
        read_pts(p)
    assert "bad.pts" in str(ei.value) and words in str(ei.value)


def test_read_pts_any_count_when_asked(tmp_path):
    p = tmp_path / "five.pts"
    write_pts(p, _random_points(7, n=5))
    assert read_pts(p, n_points=None).shape == (5, 2)
    with pytest.raises(ValidationError, match="expected 68"):
        read_pts(p)


# ------------------------------------------------------------------ VGGFace lists


def test_vggface_annotations(tmp_path):
    p = tmp_path / "Some_Name.txt"
    p.write_text(
        "00000001 http://a.b/c.jpg 158.59 119.19 334.87 295.47 4.00 3.90 1\n"
        "00000002 http://a.b/d.jpg 119.19 119.19 295.47 295.47 2.00 4.20 0\n"
    )
    df = read_vggface_annotations(p)
    assert list(df.columns)[:9] == ["id", "url", "left", "top", "right", "bottom", "pose", "detection_score", "curation"]
    assert df["id"].tolist() == ["00000001", "00000002"]
    assert df["left"].iloc[0] == pytest.approx(158.59) and df["bottom"].iloc[1] == pytest.approx(295.47)
    assert df["curation"].tolist() == [1, 0]
    assert df["frontal"].tolist() == [True, False]  # pose > 2, strictly


def test_vggface_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "X.txt"
    p.write_text("00000001 http://a 1 2 3 4 5 6 1\n00000002 http://b 1 2 3\n")
    with pytest.raises(ValidationError, match=r"X\.txt: line 2"):
        read_vggface_annotations(p)


def test_vggface_shared_files(shared_dir):
    files = sorted((shared_dir / "data" / "vggface" / "files").glob("*.txt"))
    if not files:
        pytest.skip("no VGGFace annotation files under shared/data/vggface/files")
    df = read_vggface_annotations(files[0])
    first = files[0].read_text().split("\n", 1)[0].split()
    assert len(df) == sum(1 for ln in files[0].read_text().splitlines() if ln.strip())
    assert df["id"].iloc[0] == first[0] and df["url"].iloc[0] == first[1]
    assert (df["right"] > df["left"]).all() and (df["bottom"] > df["top"]).all()


# ------------------------------------------------------------------ crops


def test_crop_inside_image_is_exact():
    img = np.arange(100 * 80 * 3, dtype=np.uint64).reshape(100, 80, 3).astype(np.uint8)
    out = crop_face(img, (10, 20, 30, 40), 20)  # a 20x20 box, no resize
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, img[20:40, 10:30])


def test_crop_makes_square_around_box_centre():
    img = np.zeros((100, 100, 3), np.uint8)
    img[50, 50] = 255
    out = crop_face(img, (40, 30, 60, 70), 40)  # 20 wide, 40 high: square of side 40 centred at (50, 50)
    ys, xs = np.nonzero(out[..., 0])
    assert (ys.tolist(), xs.tolist()) == ([20], [20])


@pytest.mark.parametrize("size", [64, 120])
def test_crop_pads_at_borders(size):
    img = np.full((50, 50, 3), 200, np.uint8)
    out = crop_face(img, (-25, -25, 25, 25), size, pad_value=7)  # the image covers the bottom-right quarter
    assert out.shape == (size, size, 3)
    q = size // 4
    assert (out[:q, :q] == 7).all()  # top-left: padding
    assert (out[-q:, -q:] == 200).all()  # bottom-right: image
    assert (out[:q, -q:] == 7).all() and (out[-q:, :q] == 7).all()


def test_crop_scale_and_resize():
    img = np.zeros((200, 200, 3), np.uint8)
    img[80:120, 80:120] = 255  # the box
    out = crop_face(img, (80, 80, 120, 120), 64, scale=2.0)  # 80x80 square -> 64x64: box fills the middle half
    assert out.shape == (64, 64, 3)
    assert out[32, 32, 0] == 255 and out[2, 2, 0] == 0
    frac = (out[..., 0] > 127).mean()
    assert frac == pytest.approx(0.25, abs=0.03)
    np.testing.assert_allclose(square_box((80, 80, 120, 120), 2.0), [60, 60, 140, 140])


def test_crop_rejects_bad_inputs():
    img = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValidationError, match="box"):
        crop_face(img, (5, 5, 4, 9), 8)
    with pytest.raises(ValidationError, match="size"):
        crop_face(img, (1, 1, 5, 5), 0)
    with pytest.raises(ValidationError, match="image"):
        crop_face(img.astype(np.float32), (1, 1, 5, 5), 8)


# ------------------------------------------------------------------ helpers and factory


def test_nme_definition():
    ref = np.zeros((68, 2))
    ref[:, 0] = np.linspace(0, 40, 68)
    ref[:, 1] = np.linspace(0, 90, 68)  # box 40 x 90 -> normaliser 60
    pred = ref + np.array([3.0, 4.0])  # every point 5 px off
    assert float(landmark_nme(pred, ref)) == pytest.approx(5.0 / 60.0)
    assert landmark_nme(np.stack([pred, ref]), np.stack([ref, ref])).tolist() == pytest.approx([5 / 60, 0.0])


def test_detector_box_from_landmarks_uses_inner_points():
    pts = np.zeros((68, 2))
    pts[:17] = [[-1000, -1000]]  # the jaw contour must not move the box
    pts[17:] = np.stack([np.linspace(10, 30, 51), np.linspace(20, 60, 51)], 1)
    b = detector_box_from_landmarks(pts, scale=1.5)
    np.testing.assert_allclose(b, [-10, 10, 50, 70])


def test_make_detector_rejects_unknown_names_and_options():
    with pytest.raises(ValidationError, match="unknown landmark backend"):
        make_detector("nope")
    with pytest.raises(ValidationError, match="colour"):
        make_detector("precomputed", colour="red")


# ------------------------------------------------------------------ precomputed backend


def test_precomputed_returns_the_files_points(tmp_path):
    pts_a = _random_points(3)
    pts_b = np.concatenate([_random_points(4), np.ones((68, 1), np.float32)], 1)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"never read")
    write_pts(tmp_path / "a.pts", pts_a)
    np.save(tmp_path / "b.npy", pts_b)
    det = make_detector("precomputed")
    res = det.detect_with_reasons([tmp_path / "a.jpg", str(tmp_path / "b.jpg"), tmp_path / "c.jpg"])
    np.testing.assert_allclose(res[0].points, pts_a, atol=1e-4)
    np.testing.assert_array_equal(res[1].points, pts_b)
    assert res[1].points.dtype == np.float32
    assert res[2].points is None and "c.npy or c.pts" in res[2].reason


def test_precomputed_folder_and_npy_first(tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    a, b = _random_points(5), _random_points(6)
    np.save(lm / "x.npy", a)
    write_pts(lm / "x.pts", b)
    det = make_detector("precomputed", folder=str(lm))
    np.testing.assert_array_equal(det.detect([tmp_path / "x.png"])[0], a)
    det = make_detector("precomputed", folder=str(lm), suffixes=[".pts"])
    np.testing.assert_allclose(det.detect([tmp_path / "x.png"])[0], b, atol=1e-4)


def test_precomputed_bad_file_and_array_input(tmp_path):
    np.save(tmp_path / "y.npy", np.zeros((5, 2)))
    det = make_detector("precomputed")
    with pytest.raises(ValidationError, match=r"y\.npy.*\(5, 2\)"):
        det.detect([tmp_path / "y.jpg"])
    with pytest.raises(ValidationError, match="paths"):
        det.detect([np.zeros((4, 4, 3), np.uint8)])


# ------------------------------------------------------------------ dlib backend

SAMPLES = [("breakingbad", ".jpg"), ("takeo", ".ppm")]


def _dlib_available():
    if importlib.util.find_spec("dlib") is None:
        return "dlib is not installed (pip install dlib-bin)"
    if importlib.util.find_spec("face_recognition_models") is None:
        return "face_recognition_models (dlib's 68-point model) is not installed"
    return None


@pytest.fixture(scope="module")
def dlib_detector():
    why = _dlib_available()
    if why:
        pytest.skip(why)
    return make_detector("dlib")


@pytest.fixture(scope="module")
def face_samples(shared_dir):
    faces = shared_dir / "samples" / "faces"
    if not faces.is_dir():
        pytest.skip(f"no annotated face samples in {faces}")
    return [(name, load_image(faces / (name + ext)), read_pts(faces / (name + ".pts"))) for name, ext in SAMPLES]


@pytest.mark.shared
def test_dlib_nme_with_detector_like_box(dlib_detector, face_samples):
    images = [im for _, im, _ in face_samples]
    boxes = [detector_box_from_landmarks(gt) for _, _, gt in face_samples]
    preds = dlib_detector.detect(images, boxes)
    for (name, im, gt), pred in zip(face_samples, preds):
        assert pred.shape == (68, 2) and pred.dtype == np.float32
        nme = float(landmark_nme(pred, gt))
        assert nme < NME_BOUND, f"{name}: NME {nme:.4f}"


@pytest.mark.shared
def test_dlib_nme_without_box(dlib_detector, face_samples):
    res = dlib_detector.detect_with_reasons([im for _, im, _ in face_samples])
    for (name, im, gt), r in zip(face_samples, res):
        assert r.points is not None, r.reason
        nme = float(landmark_nme(r.points, gt))
        assert nme < NME_BOUND, f"{name}: NME {nme:.4f}"


@pytest.mark.shared
def test_dlib_tight_annotation_box_on_frontal_face(dlib_detector, face_samples):
    name, im, gt = face_samples[1]  # takeo: frontal, so the 68-point box is a fair face box
    pred = dlib_detector.detect([im], [landmark_box(gt)])[0]
    assert float(landmark_nme(pred, gt)) < NME_BOUND


@pytest.mark.parametrize("backend, module", [("dlib", "dlib"), ("fan", "face_alignment")])
def test_missing_backend_package_is_a_clear_error(monkeypatch, backend, module):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # makes "import <module>" fail
    with pytest.raises(V2MError, match="pip install"):
        make_detector(backend)


def test_dlib_no_face_gives_none_and_reason(dlib_detector):
    res = dlib_detector.detect_with_reasons([np.zeros((120, 160, 3), np.uint8)])
    assert res[0].points is None and "no face" in res[0].reason


def test_dlib_box_moves_the_landmarks(dlib_detector):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(200, 300, 3), dtype=np.uint8)
    a = dlib_detector.detect([img], [(20, 30, 120, 130)])[0]
    b = dlib_detector.detect([img], [(170, 60, 270, 160)])[0]
    # the predictor starts from a mean shape placed in the box: landmarks follow the box
    assert landmark_box(a)[0] < 120 and landmark_box(b)[0] > 120


# ------------------------------------------------------------------ fan backend (offline, random weights)


def _fill_fan_cache(root: Path):
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN, ResNetDepth

    ck = root / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.manual_seed(0)
    # face-alignment 1.5.0: FAN = torch.load(weights_only=True) + load_state_dict; depth = a dict
    # with 'state_dict' whose keys carry a 'module.' prefix; s3fd = load_state_dict_from_url.
    torch.save(FAN(4).state_dict(), ck / FAN_WEIGHT_FILES["3DFAN-4"])
    torch.save({"state_dict": {"module." + k: v for k, v in ResNetDepth().state_dict().items()}}, ck / FAN_WEIGHT_FILES["depth"])
    torch.save(s3fd().state_dict(), ck / FAN_WEIGHT_FILES["s3fd"])
    return ck


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A TORCH_HOME of its own, with downloads turned into URLErrors (no network is used)."""
    pytest.importorskip("face_alignment", reason="face-alignment is not installed (pip install face-alignment)")
    import face_alignment.utils
    import torch.hub

    def offline(url, *a, **k):
        raise urllib.error.URLError(f"offline test: refused to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(face_alignment.utils, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_fan_empty_cache_says_where_to_put_weights(offline_hub):
    with pytest.raises(DownloadError) as ei:
        make_detector("fan", device="cpu", face_detector="none")
    assert FAN_WEIGHT_FILES["3DFAN-4"] in str(ei.value) and str(offline_hub / "hub" / "checkpoints") in str(ei.value)


@pytest.mark.slow
def test_fan_loads_prefilled_cache_offline(offline_hub):
    _fill_fan_cache(offline_hub)
    det = make_detector("fan", device="cpu")  # default sfd detector: its weights come from the cache too
    assert det.n_dims == 3
    assert type(det._fa.face_alignment_net).__name__ == "FAN"  # not wrapped by torch.compile on the CPU
    # a texture repeating every 100 px across and 50 px down: crops shifted by (100, 50) see the same pixels
    tile = np.random.default_rng(0).integers(0, 255, size=(50, 100, 3), dtype=np.uint8)
    img = np.ascontiguousarray(np.tile(tile, (8, 5, 1)))  # 400 x 500
    box = np.array([100.0, 100.0, 200.0, 200.0])
    res = det.detect_with_reasons([img, img], [box, None], progress=False)
    pts = res[0].points
    assert pts is not None, res[0].reason
    assert pts.shape == (68, 3) and pts.dtype == np.float32 and np.isfinite(pts).all()
    # face-alignment crops a square of side 200 * (w + h) / 195 centred near the box centre; with
    # random weights the points fall anywhere in that crop, never outside it
    side = 200.0 * (box[2] - box[0] + box[3] - box[1]) / 195.0
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2 - 0.12 * (box[3] - box[1])])
    assert np.all(np.abs(pts[:, :2] - centre) <= side / 2 + 4.0)
    # the same face content under a shifted box: the points move with the box, in image pixels
    shift = np.array([100.0, 50.0])
    pts2 = det.detect([img], [box + np.tile(shift, 2)], progress=False)[0]
    np.testing.assert_allclose(pts2[:, :2] - pts[:, :2], np.broadcast_to(shift, (68, 2)), atol=2.0)
    np.testing.assert_allclose(pts2[:, 2], pts[:, 2], atol=1e-3)
    # no box: the (random) s3fd detector either finds something or says why
    r = res[1]
    assert (r.points is not None and r.points.shape == (68, 3)) or "no face" in r.reason


@pytest.mark.slow
def test_fan_without_detector_needs_boxes(offline_hub):
    _fill_fan_cache(offline_hub)
    (offline_hub / "hub" / "checkpoints" / FAN_WEIGHT_FILES["s3fd"]).unlink()  # not needed with face_detector='none'
    det = make_detector("fan", device="cpu", face_detector="none")
    r = det.detect_with_reasons([np.zeros((64, 64, 3), np.uint8)], progress=False)[0]
    assert r.points is None and "no box" in r.reason
