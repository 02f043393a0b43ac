"""The synthetic world (v2m_data.synth): layout and formats, truth, determinism, the voice link."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import soundfile as sf

from tests.conftest import make_small_model
from v2m_bench.errors import ValidationError
from v2m_bench.render import project, render_mesh, view_rotation
from v2m_bench.split import read_vox1_meta, split_of
from v2m_data.images import read_pts, read_vggface_annotations
from v2m_data.synth import (
    META_HEADER,
    SynthConfig,
    VoiceLink,
    face_measures,
    make_world,
    measure_reference,
    sample_shapes,
    synthesize_speech,
)

TINY = dict(images_per_identity=2, videos_per_identity=1, utterances_per_video=2, image_size=96, duration=(1.0, 1.0))


def _build(path, model, n=5, seed=7, **kw):
    return make_world(path, n, seed, model, progress=False, **{**TINY, **kw})


@pytest.fixture(scope="module")
def model():
    return make_small_model(0)


@pytest.fixture(scope="module")
def world(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("synth") / "world"
    summary = _build(root, model)
    return root, summary


def _truth(root):
    out = {}
    with h5py.File(root / "truth.h5", "r") as f:
        out["attrs"] = dict(f.attrs)
        for g in ("identity", "image", "utterance"):
            out[g] = {k: (v.asstr()[()] if h5py.check_string_dtype(v.dtype) else v[()]) for k, v in f[g].items()}
    return out


def estimate_f0(x, sr=16000, fmin=60.0, fmax=400.0):
    """Median autocorrelation pitch (Hz) over the loudest 40 ms frames of a waveform."""
    frame, hop = int(0.04 * sr), int(0.01 * sr)
    n = 1 + (len(x) - frame) // hop
    frames = x[np.arange(frame)[None] + hop * np.arange(n)[:, None]] * np.hanning(frame)
    energy = (frames**2).sum(1)
    frames = frames[energy > 0.25 * np.percentile(energy, 95)]
    ac = np.fft.irfft(np.abs(np.fft.rfft(frames, 2 * frame)) ** 2)[:, :frame]
    lo, hi = int(sr / fmax), int(sr / fmin)
    lag = lo + np.argmax(ac[:, lo:hi], axis=1)
    return float(np.median(sr / lag))


# ---------------------------------------------------------------------------------- layout
def test_metadata_parses_and_populates_both_splits(world):
    root, summary = world
    text = (root / "vox1_meta.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0] == META_HEADER == "VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet"
    meta = read_vox1_meta(root / "vox1_meta.csv")
    assert meta["VoxCeleb1 ID"].tolist() == [f"id{10001 + i}" for i in range(5)]
    names = meta["VGGFace1 ID"].tolist()
    assert names == sorted(names) and len(set(names)) == 5
    splits = [split_of(n) for n in names]
    assert "test" in splits and "train" in splits
    assert summary.n_test == splits.count("test") and summary.n_train == splits.count("train")
    assert set(meta["Gender"]) == {"m", "f"}
    assert set(meta["Set"]) <= {"dev", "test"}
    assert tuple(names) == summary.names


def test_audio_files_are_16k_mono_pcm16(world):
    root, summary = world
    wavs = sorted((root / "wav").glob("*/*/*.wav"))
    assert len(wavs) == summary.n_utterances == 5 * 1 * 2
    for p in wavs:
        ident, video, utt = p.relative_to(root / "wav").parts
        assert ident in summary.ids
        assert len(video) == 11 and all(c.isalnum() or c in "-_" for c in video)
        assert utt in ("00001.wav", "00002.wav")
        info = sf.info(str(p))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        assert info.frames == 16000
    x, _ = sf.read(str(wavs[0]))
    assert 0.01 < np.sqrt(np.mean(x**2)) < 0.5 and np.abs(x).max() < 1.0


def test_vggface_annotations_images_and_landmarks(world):
    root, summary = world
    for name in summary.names:
        ann = read_vggface_annotations(root / "vggface" / "files" / f"{name}.txt")
        assert ann["id"].tolist() == ["00000001", "00000002"]
        assert (ann["curation"] == 1).all()
        assert all(u.startswith("http://example.invalid/") for u in ann["url"])
        for _, row in ann.iterrows():
            img = cv2.imread(str(root / "vggface" / "images" / name / f"{row['id']}.jpg"), cv2.IMREAD_COLOR)
            assert img is not None and img.shape == (96, 96, 3)
            pts = read_pts(root / "vggface" / "images" / name / f"{row['id']}.pts")
            assert pts.shape == (68, 2)
            assert (pts >= 0).all() and (pts <= 95).all()
            box = row[["left", "top", "right", "bottom"]].to_numpy(float)
            assert 0 <= box[0] < box[2] <= 95 and 0 <= box[1] < box[3] <= 95
            assert (pts[:, 0] >= box[0]).all() and (pts[:, 0] <= box[2]).all()
            assert (pts[:, 1] >= box[1]).all() and (pts[:, 1] <= box[3]).all()
            # the box is detector-like: somewhat larger than the landmarks' bounding box
            assert box[2] - box[0] > 1.05 * np.ptp(pts[:, 0])


# ----------------------------------------------------------------------------------- truth
def test_truth_matches_the_files_and_the_model(world, model):
    root, summary = world
    t = _truth(root)
    a, ident, img, utt = t["attrs"], t["identity"], t["image"], t["utterance"]
    assert a["format"] == "v2m-synth-truth" and a["version"] == 1 and a["seed"] == 7
    assert list(ident["id"]) == list(summary.ids) and list(ident["name"]) == list(summary.names)
    assert list(ident["split"]) == [split_of(n) for n in summary.names]
    assert ident["shape"].shape == (5, 40) and img["expression"].shape == (10, 10)
    # face measures and the link, exactly as documented
    meas = face_measures(model, ident["shape"])
    np.testing.assert_allclose(ident["face_width"], meas["width"])
    ref = measure_reference(model)
    np.testing.assert_allclose(ident["face_width_z"], (meas["width"] - ref["width_mean"]) / ref["width_std"])
    link = VoiceLink()
    np.testing.assert_allclose(a["link_coefficients"], link.coefficients())
    mean = link.mean(ident["gender"] == "f", ident["face_width_z"], ident["face_length_z"])
    np.testing.assert_allclose(ident["pitch"], mean[:, 0] + ident["pitch_noise"])
    np.testing.assert_allclose(ident["formant_scale"], mean[:, 1] + ident["formant_scale_noise"])
    np.testing.assert_allclose(ident["rate"], mean[:, 2] + ident["rate_noise"])
    # each image's camera reproduces its .pts from the model's keypoints
    for k in range(len(img["file"])):
        i = img["identity_index"][k]
        v = model.vertices(ident["shape"][i], img["expression"][k])
        lm = project(v[model.keypoints], img["rotation"][k], img["scale"][k], img["translation"][k])
        np.testing.assert_allclose(lm, img["landmarks"][k], atol=1e-6)
        pts = read_pts(root / Path(img["file"][k]).with_suffix(".pts"))
        np.testing.assert_allclose(pts, lm, atol=1e-4)
        np.testing.assert_allclose(img["rotation"][k], view_rotation(img["yaw"][k], img["pitch"][k], img["roll"][k]))
        assert abs(img["yaw"][k]) <= 30 and abs(img["pitch"][k]) <= 15
    # utterances: files exist, speech sits inside the clip, f0 near the identity's pitch
    assert len(utt["file"]) == 10
    for k, f in enumerate(utt["file"]):
        assert (root / f).is_file()
        assert 0 < utt["speech_start"][k] < utt["speech_end"][k] < utt["duration"][k]
    ratio = utt["f0"] / ident["pitch"][utt["identity_index"]]
    assert np.all(np.abs(np.log(ratio)) < 0.1)


def test_landmarks_lie_on_the_rendered_face(world, model):
    root, _ = world
    t = _truth(root)
    ident, img = t["identity"], t["image"]
    for k in range(len(img["file"])):
        i = img["identity_index"][k]
        v = model.vertices(ident["shape"][i], img["expression"][k])
        # the random small model folds over in places: its back faces count as surface here
        res = render_mesh(
            v, model.triangles, rotation=img["rotation"][k], image_size=(96, 96), scale=img["scale"][k],
            translation=img["translation"][k], cull_backfaces=False,
        )
        mask = cv2.dilate(res.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        col, row = np.round(img["landmarks"][k]).astype(int).T
        assert mask[row, col].all()
        assert res.mask.sum() > 0.05 * 96 * 96


def test_supersampling_keeps_the_face_in_place(tmp_path, model):
    # the same world drawn with and without supersampling: the face sits on the same pixels to a
    # small fraction of a pixel (a half-pixel slip of the supersampled camera moves it ~0.25 px)
    def centroids(ss):
        root = tmp_path / f"ss{ss}"
        make_world(root, 3, 2, model, progress=False, **{**TINY, "utterances_per_video": 1, "duration": (0.5, 0.5), "background": (0.0, 0.0, 1.0), "supersample": ss})
        out = []
        for f in _truth(root)["image"]["file"]:
            photo = cv2.imread(str(root / f))[..., ::-1] / 255.0
            yy, xx = np.nonzero(np.linalg.norm(photo - [0.0, 0.0, 1.0], axis=-1) > 0.5)
            out.append((xx.mean(), yy.mean()))
        return np.array(out)

    diff = centroids(1) - centroids(2)
    assert np.all(np.abs(diff.mean(0)) < 0.12), diff


def test_same_seed_same_bytes(tmp_path, model, world):
    root_a, _ = world
    root_b = tmp_path / "again"
    _build(root_b, model)

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}

    da, db = digest(root_a), digest(root_b)
    assert len(da) == 1 + 1 + 10 + 5 + 10 + 10  # meta, truth, wavs, annotation files, jpgs, pts
    assert da == db
    root_c = tmp_path / "other"
    _build(root_c, model, seed=8)
    dc = digest(root_c)
    assert dc["truth.h5"] != da["truth.h5"]
    assert dc["vox1_meta.csv"] != da["vox1_meta.csv"]


def test_bad_arguments(tmp_path, model, world):
    root, _ = world
    with pytest.raises(ValidationError, match="not empty"):
        _build(root, model)
    with pytest.raises(ValidationError, match="imgs_per_identity"):
        make_world(tmp_path / "x", 3, 0, model, imgs_per_identity=2)
    with pytest.raises(ValidationError, match="n_identities"):
        make_world(tmp_path / "y", 0, 0, model)
    with pytest.raises(ValidationError, match="duration"):
        SynthConfig(duration=(2.0, 1.0))
    with pytest.raises(ValidationError, match="pitch_noise"):
        VoiceLink(pitch_noise=-1.0)


# ------------------------------------------------------------------------------ voice link
def test_link_coefficients_show_in_the_sampled_population(model):
    rng = np.random.default_rng(0)
    n = 4000
    female = rng.random(n) < 0.5
    ref = measure_reference(model)
    shape, z = sample_shapes(model, female, rng, SynthConfig(), ref)
    meas = face_measures(model, shape)
    zw = (meas["width"] - ref["width_mean"]) / ref["width_std"]
    zl = (meas["length"] - ref["length_mean"]) / ref["length_std"]
    # the standardisation is right (first order) and men's faces are wider
    assert abs(zw.std() - 1.0) < 0.15 and abs(zl.std() - 1.0) < 0.15
    assert zw[~female].mean() - zw[female].mean() > 0.5
    link = VoiceLink()
    values, _ = link.sample(female, zw, zl, rng)
    x = np.stack([~female, female, zw, zl], 1).astype(float)
    coef, *_ = np.linalg.lstsq(x, values, rcond=None)
    np.testing.assert_allclose(coef[:, 0], [120.0, 210.0, -10.0, -5.0], atol=1.0)
    np.testing.assert_allclose(coef[:, 1], [1.0, 1.16, -0.03, -0.04], atol=0.005)
    np.testing.assert_allclose(coef[:, 2], [4.2, 4.6, -0.25, 0.0], atol=0.05)


def test_world_audio_has_the_truth_pitch(world):
    root, _ = world
    t = _truth(root)
    utt, ident = t["utterance"], t["identity"]
    est = np.array([estimate_f0(sf.read(str(root / f))[0]) for f in utt["file"]])
    np.testing.assert_allclose(est, utt["f0"], rtol=0.06)
    female = ident["gender"][utt["identity_index"]] == "f"
    assert est[female].mean() - est[~female].mean() > 50


def test_face_width_is_heard_in_the_pitch(model):
    # noise-free link: f0 estimated from the audio recovers the link's coefficient on face width
    rng = np.random.default_rng(5)
    n = 30
    female = np.arange(n) % 2 == 1
    ref = measure_reference(model)
    shape, _ = sample_shapes(model, female, rng, SynthConfig(), ref)
    meas = face_measures(model, shape)
    zw = (meas["width"] - ref["width_mean"]) / ref["width_std"]
    zl = (meas["length"] - ref["length_mean"]) / ref["length_std"]
    values = VoiceLink().mean(female, zw, zl)
    est = np.array([estimate_f0(synthesize_speech(rng, p, fs, r, 1.0)[0]) for p, fs, r in values])
    x = np.stack([~female, female, zw, zl], 1).astype(float)
    coef, *_ = np.linalg.lstsq(x, est, rcond=None)
    assert -13.0 < coef[2] < -7.0
    assert -8.0 < coef[3] < -2.0
    assert 110 < coef[0] < 130 and 195 < coef[1] < 225


def test_formant_scale_moves_the_spectrum_up():
    def centroid(fs):
        x, _ = synthesize_speech(np.random.default_rng(3), 150.0, fs, 4.4, 1.5, snr_db=60.0)
        spec = np.abs(np.fft.rfft(x)) ** 2
        f = np.fft.rfftfreq(x.size, 1 / 16000)
        band = (f > 200) & (f < 3000)  # the F1-F2 region, no fricatives
        return (f[band] * spec[band]).sum() / spec[band].sum()

    assert centroid(1.3) > 1.12 * centroid(1.0)


def test_speech_is_framed_by_silence():
    x, info = synthesize_speech(np.random.default_rng(1), 120.0, 1.0, 4.4, 2.0, snr_db=30.0)
    sr = 16000
    s0, s1 = int(info["speech_start"] * sr), int(info["speech_end"] * sr)
    assert 0 < s0 < s1 < x.size
    rms = lambda a: np.sqrt(np.mean(a.astype(float) ** 2))  # noqa: E731
    assert rms(x[:s0]) < 0.1 * rms(x[s0:s1])
    assert rms(x[s1:]) < 0.1 * rms(x[s0:s1])
    assert info["n_syllables"] >= 4


# ------------------------------------------------------------------------------------- BFM
@pytest.mark.shared
def test_bfm_world_landmarks_coincide_with_the_face_in_the_photo(tmp_path, bfm):
    blue = (0.0, 0.0, 1.0)
    root = tmp_path / "bfm_world"
    s = make_world(root, 4, 11, bfm, progress=False, **{**TINY, "image_size": 128, "background": blue})
    assert s.n_test >= 1 and s.n_train >= 1
    t = _truth(root)
    ident, img = t["identity"], t["image"]
    assert tuple(t["attrs"]["measure.width_vertices"]) == (20636, 34153)
    v0 = bfm.vertices(ident["shape"][0])
    assert abs(np.linalg.norm(v0[20636] - v0[34153]) - ident["face_width"][0]) < 1.0
    for k, f in enumerate(img["file"]):
        photo = cv2.imread(str(root / f))[..., ::-1].astype(float) / 255.0
        face = np.linalg.norm(photo - blue, axis=-1) > 0.3  # pixels that are not the background
        pts = read_pts(root / Path(f).with_suffix(".pts"))
        col, row = np.round(pts).astype(int).T
        near = cv2.dilate(face.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert near[row, col].all(), f
        assert face[row, col].mean() > 0.9
        # the face in the photo is where the truth's mesh and camera put it
        i = img["identity_index"][k]
        v = bfm.vertices(ident["shape"][i], img["expression"][k])
        res = render_mesh(v, bfm.triangles, rotation=img["rotation"][k], image_size=(128, 128), scale=img["scale"][k], translation=img["translation"][k])
        iou = (res.mask & face).sum() / (res.mask | face).sum()
        assert iou > 0.9, (f, iou)
