"""The face gate (v2m_data.facegate) alone, inside process_images, and in a build."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from v2m_data.facegate import FaceGateConfig, box_iou, check_box, check_crop, check_image_size, crop_spread
from v2m_data.identities import Identity
from v2m_data.images import ImageTooLargeError, decode_image, image_size_from_header, read_pts, read_vggface_annotations
from v2m_data.landmarks import detector_box_from_landmarks
from v2m_data.building import IdentityFiles, process_images

GATE = FaceGateConfig()


def made_up_images(size: int = 160) -> dict:
    rng = np.random.default_rng(0)
    xx, _ = np.meshgrid(np.arange(size), np.arange(size))
    return {
        "gradient": np.repeat((xx * 255.0 / (size - 1))[..., None], 3, 2).astype(np.uint8),
        "grey": np.full((size, size, 3), 128, np.uint8),
        "noise": rng.integers(0, 256, (size, size, 3)).astype(np.uint8),
    }


def photo_and_made_up_images(shared_dir, root):
    """``root/Some_One`` with the shared photo (image 00000001, its annotated box) and the made-up
    images (00000002-00000004, a box in the middle); returns the annotation items."""
    import shutil

    import cv2

    faces = shared_dir / "samples" / "faces"
    d = root / "Some_One"
    d.mkdir()
    shutil.copy(faces / "takeo.ppm", d / "00000001.ppm")
    box = tuple(float(v) for v in detector_box_from_landmarks(read_pts(faces / "takeo.pts"), 1.3))
    items = [("Some_One/00000001.ppm", "00000001", 1, box, 3.0)]
    for k, (name, img) in enumerate(made_up_images().items(), start=2):
        cv2.imwrite(str(d / f"0000000{k}.png"), img)
        items.append((f"Some_One/0000000{k}.png", f"0000000{k}", 1, (40.0, 40.0, 120.0, 120.0), 3.0))
    return items


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRC) but whose pixel data is a few bytes."""
    import cv2

    ok, buf = cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))
    data = bytearray(buf.tobytes())
    assert ok and data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# ------------------------------------------------------------------------------------ pure checks
@pytest.mark.parametrize(
    "box, part",
    [
        ((200, 200, 260, 260), "box outside the image"),
        ((-50, -50, 20, 20), "mostly outside"),
        ((80, 40, 40, 90), "degenerate box"),
        ((-10, -20, -30, -40), "degenerate box"),
        ((10, 10, 10, 50), "degenerate box"),
        ((10, np.nan, 50, 50), "degenerate box"),
        ((10, 10, 20, 50), "box too small"),
    ],
)
def test_bad_boxes_are_refused_with_their_reason(box, part):
    why = check_box(box, 120, 160, GATE)
    assert why is not None and part in why


def test_good_box_and_partly_outside_box_pass():
    assert check_box((40, 30, 120, 110), 120, 160, GATE) is None
    # 75 % of the area inside: accepted (limit 50 %)
    assert check_box((-20, 30, 60, 110), 120, 160, GATE) is None
    assert "mostly outside" in check_box((-20, 30, 60, 110), 120, 160, FaceGateConfig(min_box_inside=0.8))


def test_image_size_limits():
    assert "too small" in check_image_size(1, 1, GATE)
    assert "too small" in check_image_size(31, 500, GATE)
    assert check_image_size(32, 32, GATE) is None
    assert "too large" in check_image_size(10_000, 5_000, GATE)


def test_pixel_limit_is_checked_on_the_header_before_decoding():
    data = png_with_header_size(20_000, 30_000)
    assert image_size_from_header(data) == (20_000, 30_000)
    with pytest.raises(ImageTooLargeError, match="not decoded"):
        decode_image(data, source="bomb.png", max_pixels=40_000_000)
    # below the limit the (corrupt) pixel data is decoded and fails as an unreadable image
    with pytest.raises(Exception) as e:
        decode_image(data, source="bomb.png", max_pixels=10**9)
    assert not isinstance(e.value, ImageTooLargeError)


def test_crop_spread_separates_uniform_crops(shared_dir):
    from v2m_data.images import crop_face, load_image

    faces = shared_dir / "samples" / "faces"
    img = load_image(faces / "takeo.ppm")
    box = detector_box_from_landmarks(read_pts(faces / "takeo.pts"), 1.3)
    face_crop = crop_face(img, box, 120)
    assert crop_spread(face_crop) > 20
    assert check_crop(face_crop, GATE) is None
    assert "near-uniform" in check_crop(np.full((120, 120, 3), 200, np.uint8), GATE)
    assert crop_spread(np.zeros((5, 8, 8, 3), np.uint8)).shape == (5,)


def test_box_iou_values():
    np.testing.assert_allclose(box_iou([0, 0, 10, 10], [0, 0, 10, 10]), 1.0)
    np.testing.assert_allclose(box_iou([0, 0, 10, 10], [5, 0, 15, 10]), 50 / 150)
    np.testing.assert_allclose(box_iou([0, 0, 10, 10], [20, 20, 30, 30]), 0.0)


def test_bad_annotation_lines_are_collected_not_raised(tmp_path):
    ann = tmp_path / "Some_One.txt"
    ann.write_text(
        "00000001 http://x/1.jpg 10 10 90 90 3 4.5 1\n"
        "00000002 http://x/2.jpg 10 10 90 90 3 4.5 inf\n"
        "00000003 http://x/3.jpg 10 10 90\n"
        "00000004 http://x/4.jpg 10 nan 90 90 3 4.5 1\n"
    )
    with pytest.raises(Exception, match="line 2"):
        read_vggface_annotations(ann)
    bad: list = []
    df = read_vggface_annotations(ann, bad_lines=bad)
    assert list(df["id"]) == ["00000001"]
    assert [(b[0], b[1]) for b in bad] == [(2, "00000002"), (3, "00000003"), (4, "00000004")]
    assert "not finite" in bad[0][2] and "expected 9 fields" in bad[1][2]


# ------------------------------------------------------------------------------------ dlib confirmation
@pytest.fixture(scope="module")
def dlib_detector():
    pytest.importorskip("dlib")
    from v2m_data.landmarks import make_detector

    try:
        return make_detector("dlib")
    except Exception as e:  # noqa: BLE001 - the model package may be absent
        pytest.skip(f"dlib detector unavailable: {e}")


def test_dlib_confirms_the_shared_photos_and_refuses_made_up_images(shared_dir, dlib_detector):
    from v2m_data.images import load_image

    faces = shared_dir / "samples" / "faces"
    for stem, suffix in (("takeo", ".ppm"), ("breakingbad", ".jpg")):
        img = load_image(faces / (stem + suffix))
        box = detector_box_from_landmarks(read_pts(faces / f"{stem}.pts"), 1.3)
        assert dlib_detector.face_overlap(img, box, GATE) >= 0.5, stem
    for name, img in made_up_images().items():
        assert dlib_detector.face_overlap(img, (40, 40, 120, 120), GATE) < GATE.min_overlap, name


def test_process_images_gates_faceless_images(shared_dir, dlib_detector, tmp_path):
    """dlib with annotated boxes: the photo is kept, every made-up image is a 'face' failure."""
    import cv2
    import shutil

    faces = shared_dir / "samples" / "faces"
    d = tmp_path / "Some_One"
    items = photo_and_made_up_images(shared_dir, tmp_path)
    cv2.imwrite(str(d / "00000005.png"), np.zeros((1, 1, 3), np.uint8))
    items.append(("Some_One/00000005.png", "00000005", 1, (0.0, 0.0, 1.0, 1.0), 3.0))
    shutil.copy(faces / "takeo.ppm", d / "00000006.ppm")
    items.append(("Some_One/00000006.ppm", "00000006", 1, (400.0, 400.0, 500.0, 500.0), 3.0))
    shutil.copy(faces / "takeo.ppm", d / "00000007.ppm")
    items.append(("Some_One/00000007.ppm", "00000007", 1, (100.0, 100.0, 50.0, 50.0), 3.0))
    ident = Identity("id1", "Some_One", "m", "train", "Some_One")
    files = IdentityFiles((), tuple(items), (), 0)
    recs, fails = process_images([(ident, files, 0)], tmp_path, dlib_detector, (64,), 1.3)
    assert [r["image_id"] for r in recs] == ["00000001"]
    why = {f["item"].split("/")[1][:8]: (f["stage"], f["reason"]) for f in fails}
    assert set(why) == {"00000002", "00000003", "00000004", "00000005", "00000006", "00000007"}
    assert all(stage == "face" for stage, _ in why.values())
    for k in ("00000002", "00000003", "00000004"):
        assert why[k][1].startswith("no face in the annotated box"), why[k]
    assert "too small" in why["00000005"][1]
    assert "box outside the image" in why["00000006"][1]
    assert "degenerate box" in why["00000007"][1]


def test_confirm_none_lets_the_made_up_images_through(dlib_detector, tmp_path):
    import cv2

    d = tmp_path / "Some_One"
    d.mkdir()
    cv2.imwrite(str(d / "00000002.png"), made_up_images()["gradient"])
    ident = Identity("id1", "Some_One", "m", "train", "Some_One")
    files = IdentityFiles((), (("Some_One/00000002.png", "00000002", 1, (40.0, 40.0, 120.0, 120.0), 3.0),), (), 0)
    recs, _ = process_images([(ident, files, 0)], tmp_path, dlib_detector, (64,), 1.3, gate=FaceGateConfig(confirm="none"))
    assert len(recs) == 1  # without the gate's confirmation the gradient gets 68 landmarks


# ------------------------------------------------------------------------------------ in a build
def test_build_records_gate_failures_and_never_uses_them(tmp_path):
    """precomputed build of a small world with a 1x1 image, a uniform image, boxes outside /
    degenerate, an ``inf`` annotation line and a header-declared bomb: each is a recorded
    failure with its reason, none is in the shards or the references."""
    import cv2

    from tests.data.test_pipeline import config_for, make_test_world, quiet
    from v2m_data.building import build
    from v2m_data.shards import open_dataset

    root = tmp_path / "w"
    info = make_test_world(root, faults=False)
    info["root"] = root
    name = info["names"][0]  # a test (A-E) identity
    idir = root / "vggface" / "images" / name
    ann = root / "vggface" / "files" / f"{name}.txt"
    good = sorted(idir.glob("*.jpg"))[0]
    pts = good.with_suffix(".pts").read_text()
    line = ann.read_text().splitlines()[0].split()
    lines = []

    def add(image_id: str, data: bytes, box=None, last="1"):
        (idir / f"{image_id}.jpg").write_bytes(data)
        (idir / f"{image_id}.pts").write_text(pts)
        b = box if box is not None else line[2:6]
        lines.append(" ".join([image_id, "http://example.invalid/x.jpg", *map(str, b), line[6], line[7], last]))

    add("80000001", cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes(), box=(0, 0, 1, 1))
    add("80000002", cv2.imencode(".jpg", np.full((96, 96, 3), 90, np.uint8))[1].tobytes())
    add("80000003", good.read_bytes(), box=(500, 500, 560, 560))
    add("80000004", good.read_bytes(), box=(60, 60, 10, 10))
    add("80000005", good.read_bytes(), last="inf")
    add("80000006", png_with_header_size(30_000, 30_000))
    ann.write_text(ann.read_text() + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    build(config_for(info, out), log=quiet)
    import json

    man = json.loads((out / "manifest.json").read_text())
    got = {f["item"].rsplit("/", 1)[-1][:8]: f for f in man["failures"] if f["item"].rsplit("/", 1)[-1].startswith("8000000")}
    assert set(got) == {f"8000000{k}" for k in range(1, 7)}
    assert got["80000001"]["stage"] == "face" and "too small" in got["80000001"]["reason"]
    assert got["80000002"]["stage"] == "face" and "near-uniform" in got["80000002"]["reason"]
    assert got["80000003"]["stage"] == "face" and "box outside the image" in got["80000003"]["reason"]
    assert got["80000004"]["stage"] == "face" and "degenerate box" in got["80000004"]["reason"]
    assert got["80000005"]["stage"] == "image" and "not finite" in got["80000005"]["reason"]
    assert got["80000006"]["stage"] == "face" and "too large" in got["80000006"]["reason"]
    assert man["failures_by_stage"]["face"] == 5
    ds = open_dataset(out)
    used = set()
    for split in ds.splits:
        used |= {str(p) for p in ds.split(split).images["path"]}
    assert not any(Path(p).stem.startswith("8000000") for p in used)
    chosen = [p for c in man["references"]["chosen"] for p in c.get("images", [c.get("image")])]
    assert chosen and not any(Path(p).stem.startswith("8000000") for p in chosen)


def test_header_size_of_jpeg_and_png_without_decoding():
    import cv2

    img = np.zeros((37, 53, 3), np.uint8)
    for ext in (".jpg", ".png", ".bmp"):
        data = cv2.imencode(ext, img)[1].tobytes()
        assert image_size_from_header(data) == (53, 37), ext
    assert image_size_from_header(b"not an image") is None


def test_dlib_build_of_a_real_layout_world_refuses_the_faceless_image(bfm, bfm_dir, dlib_detector, tmp_path):
    """A BFM-rendered world in the real layouts plus one gradient picture with an annotation line:
    the dlib build records it as 'no face in the annotated box' and never fits or uses it."""
    import cv2
    import json

    from tests.data.test_pipeline import quiet
    from v2m_data.building import BuildConfig, build
    from v2m_data.shards import open_dataset
    from v2m_data.synth import make_world

    root = tmp_path / "w"
    summary = make_world(root, 4, 2, bfm, images_per_identity=2, videos_per_identity=1, utterances_per_video=1,
                         duration=(1.0, 1.2), image_size=128, progress=False)
    name = summary.names[0]
    cv2.imwrite(str(root / "vggface" / "images" / name / "00000099.jpg"), made_up_images(128)["gradient"])
    ann = root / "vggface" / "files" / f"{name}.txt"
    ann.write_text(ann.read_text() + "00000099 http://example.invalid/x.jpg 30.00 30.00 98.00 98.00 3.00 4.000 1\n")
    out = tmp_path / "out"
    build(BuildConfig(voxceleb=str(root), vggface=str(root / "vggface"), out=str(out), bfm=str(bfm_dir),
                      detector="dlib", progress=False), log=quiet)
    man = json.loads((out / "manifest.json").read_text())
    bad = [f for f in man["failures"] if f["item"].endswith("00000099.jpg")]
    assert len(bad) == 1 and bad[0]["stage"] == "face" and bad[0]["reason"].startswith("no face in the annotated box")
    assert man["counts"]["images_ok"] == 8  # every rendered face kept
    ds = open_dataset(out)
    for split in ds.splits:
        assert not any(str(p).endswith("00000099.jpg") for p in ds.split(split).images["path"])
    assert not any("00000099" in json.dumps(c) for c in man["references"]["chosen"])
