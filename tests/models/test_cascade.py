"""The cascade baseline (v2m_models.cascade, ``v2m-predict cascade``): predictions equal
teacher(upsample(generator(encoder(voice)))) computed by hand; generator from an unsupervised or a
GAN-only checkpoint; one-line errors; the plain ``v2m-predict --checkpoint`` form still works."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from tests.models.test_models_data import build_tiny
from tests.models.test_train_supervised import enc_config, sup_config
from tests.models.test_train_teacher import teacher_config
from tests.models.test_train_unsupervised import unsup_config
from v2m_bench.errors import ValidationError
from v2m_bench.formats import read_predictions
from v2m_data.shards import open_dataset
from v2m_models.cascade import load_cascade, predict_cascade
from v2m_models.nets import Generator, ImageTo3DMM, MobileNetV2, VoiceEncoder
from v2m_models.predict import prediction_selection
from v2m_models.supervised import train_supervised, train_voice_encoder
from v2m_models.teacher import train_teacher
from v2m_models.training import load_checkpoint, save_checkpoint
from v2m_models.unsupervised import train_unsupervised


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    data = build_tiny(root, n=8, seed=4, crop_sizes=(64, 120), test_fraction=0.5)
    enc, teacher = root / "enc.pt", root / "teacher.pt"
    train_voice_encoder(enc_config(data, iterations=2), enc)
    # a teacher trained enough that its output visibly depends on the image
    train_teacher(teacher_config(data, iterations=30, batch_size=8, lr=5e-3, dropout=0.0), teacher)
    unsup, gan = root / "unsup.pt", root / "gan.pt"
    train_unsupervised(unsup_config(data, enc, teacher, iterations=2), unsup)
    train_unsupervised(unsup_config(data, enc, None, kd="none", iterations=2), gan)
    # Two iterations leave the generator's faces almost independent of the voice (the embeddings
    # of different speakers are within a few hundredths of each other, and most of the tiny
    # generator's units are inactive), so give the GAN checkpoint a generator that depends on the
    # voice by construction (see _voice_dependent_generator).
    ck = load_checkpoint(gan)
    ds = open_dataset(data)
    split, _, utts, _, _ = prediction_selection(ds)
    features = [split.utterance_features(int(u)) for u in utts]
    enc = _encoder(ck)
    with torch.no_grad():
        e = torch.cat([enc(torch.as_tensor(f)[None], normalize=True) for f in features])
    ck["modules"]["generator"] = _voice_dependent_generator(ck["modules"]["generator"], e)
    save_checkpoint(gan, ck)
    faces = _faces(gan, features)
    centre = faces[:, :, 24:40, 24:40]
    assert float(centre.amax() - centre.amin()) > 1.0, "the generated faces should differ between voices"
    return data, teacher, unsup, gan


def _voice_dependent_generator(state, e):
    """Generator weights under which the face is ``tanh(k d.(e - mean))`` away from the borders.

    ``e`` (n, 64): the embeddings of the voices it will see. The first layer maps an embedding to
    ``1 + k d.(e - mean)`` on every channel and pixel, where ``d`` is the unit direction from the
    mean to the farthest embedding and ``k`` scales that farthest one to exactly 1, so the value
    lies in [0, 2] and the ReLUs pass it unchanged. Each upsampling layer averages its inputs
    (interior pixels keep the value), and the last layer subtracts 1. The farthest voice's face is
    therefore tanh(+-1) = +-0.76 in the interior, the mean voice's 0: faces differ by construction.
    """
    state = {k: torch.zeros_like(v) for k, v in state.items()}
    mean = e.mean(0)
    far = e[(e - mean).norm(dim=1).argmax()] - mean
    d = far / far.norm()
    k = 1.0 / (e - mean).matmul(d).abs().max()
    state["model.0.weight"][:] = (k * d)[:, None, None, None]
    state["model.0.bias"][:] = 1.0 - k * d.dot(mean)
    last = max(int(name.split(".")[1]) for name in state)
    for name, w in state.items():
        layer = int(name.split(".")[1])
        if name.endswith("weight") and 0 < layer < last:
            w[:] = 1.0 / (4 * w.shape[0])  # 4 kernel taps reach each interior pixel
        elif name.endswith("weight") and layer == last:
            w[:] = 1.0 / w.shape[0]
        elif name.endswith("bias") and layer == last:
            w[:] = -1.0
    return state


def _encoder(ck):
    enc = VoiceEncoder(tuple(ck["task"]["encoder"]["channels"]))
    enc.load_state_dict({k[len("module."):]: v for k, v in ck["modules"]["encoder"].items()})
    return enc.eval()


def _generator(ck):
    state = ck["modules"]["generator"]
    gen = Generator(state["model.0.weight"].shape[0], tuple(ck["config"]["generator_channels"]))
    gen.load_state_dict(state)
    return gen.eval()


def _faces(generator_ck, features):
    """generator(encoder(voice)) for each feature array, (n, 3, 64, 64)."""
    g = load_checkpoint(generator_ck)
    enc, gen = _encoder(g), _generator(g)
    with torch.no_grad():
        return torch.cat([gen(enc(torch.as_tensor(f)[None], normalize=True)) for f in features])


def _by_hand(generator_ck, teacher_ck, features):
    """teacher(upsample(generator(encoder(voice)))), from the raw state dicts."""
    g = load_checkpoint(generator_ck)
    enc, gen = _encoder(g), _generator(g)
    t = load_checkpoint(teacher_ck)
    net = t["task"]["net"]
    mb = MobileNetV2(62, width_mult=net["width_mult"], last_channels=net["last_channels"])
    mb.load_state_dict({k[len("net.backbone."):]: v for k, v in t["modules"]["model"].items() if k.startswith("net.backbone.")})
    mean = torch.tensor(t["task"]["stats"]["mean"])
    std = torch.tensor(t["task"]["stats"]["std"])
    for m in (enc, gen, mb):
        m.eval()
    out = []
    with torch.no_grad():
        for f in features:
            face = gen(enc(torch.as_tensor(f)[None], normalize=True))
            assert face.shape == (1, 3, 64, 64)
            big = F.interpolate(face, size=(120, 120), mode="bilinear", align_corners=True)
            out.append((mb(big) * std + mean)[0, 12:].numpy())
    return np.stack(out)


@pytest.mark.parametrize("which", ["unsup", "gan"])
def test_cascade_is_the_teacher_on_the_upsampled_generated_face(trained, tmp_path, which):
    data, teacher, unsup, gan = trained
    gen_ck = unsup if which == "unsup" else gan
    out = tmp_path / "c.h5"
    res = predict_cascade(gen_ck, teacher, data, out, device="cpu", batch_size=2)
    p = read_predictions(out, n_vertices=None)
    ds = open_dataset(data)
    split, names, utts, ids, _ = prediction_selection(ds)
    assert p.utterance.tolist() == ids and res.n_predictions == len(utts) == 3 * len(ds.references().identity)
    assert p.attrs["checkpoint_kind"] == "cascade" and p.attrs["generator_kind"] == ("unsupervised" if which == "unsup" else "gan")
    assert p.model == f"cascade:{gen_ck.name}+teacher.pt"
    want = _by_hand(gen_ck, teacher, [split.utterance_features(int(u)) for u in utts])
    got = np.concatenate([p.shape, p.expression], axis=1)
    scale = np.abs(want).max(axis=0) + 1e-6
    assert np.allclose(got / scale, want / scale, atol=1e-4)
    if which == "gan":  # the generator made voice-dependent: so is the prediction
        assert (np.ptp(got, axis=0) > 1e-3 * scale).any()


def test_the_unsupervised_prediction_is_the_student_not_the_teacher(trained, tmp_path):
    from v2m_models.predict import predict

    data, teacher, unsup, _ = trained
    a = read_predictions(predict(unsup, data, tmp_path / "u.h5", device="cpu").path, n_vertices=None)
    b = read_predictions(predict_cascade(unsup, teacher, data, tmp_path / "c.h5", device="cpu").path, n_vertices=None)
    assert a.utterance.tolist() == b.utterance.tolist()
    assert not np.allclose(a.shape, b.shape)


def test_bad_inputs(trained, tmp_path):
    data, teacher, unsup, gan = trained
    sup = tmp_path / "sup.pt"
    train_supervised(sup_config(data, iterations=1), sup)
    with pytest.raises(ValidationError, match="'supervised' checkpoint, not a generator"):
        load_cascade(sup, teacher)
    with pytest.raises(ValidationError, match="not a teacher"):
        load_cascade(unsup, gan)
    with pytest.raises(ValidationError, match="no such teacher checkpoint"):
        load_cascade(unsup, tmp_path / "missing.pt")
    with pytest.raises(ValidationError, match="no such checkpoint"):
        load_cascade(tmp_path / "missing.pt", teacher)


def test_a_plain_state_dict_of_another_architecture_is_refused(trained, tmp_path, monkeypatch):
    """Refused for its architecture before the BFM (its parameter statistics) is looked for."""
    monkeypatch.setenv("V2M_BFM_DIR", str(tmp_path / "no-bfm-here"))
    _, _, unsup, _ = trained
    torch.save(ImageTo3DMM(MobileNetV2(62, width_mult=0.5, last_channels=16)).backbone.state_dict(), tmp_path / "w.pth")
    torch.save({k: v for k, v in torch.load(tmp_path / "w.pth").items() if "features.18" not in k}, tmp_path / "cut.pth")
    with pytest.raises(ValidationError, match="not the same architecture"):
        load_cascade(unsup, tmp_path / "cut.pth")


def test_cli(trained, tmp_path):
    from v2m_cli.predict import main

    data, teacher, unsup, gan = trained
    runner = CliRunner()
    out = tmp_path / "cli.h5"
    res = runner.invoke(main, ["cascade", "--generator", str(gan), "--teacher", str(teacher), "--data", str(data),
                               "--out", str(out), "--device", "cpu", "--model-name", "baseline"])
    assert res.exit_code == 0, res.output
    assert "predictions for" in res.output and read_predictions(out, n_vertices=None).model == "baseline"
    # the plain form predicts with the unsupervised checkpoint's student
    res = runner.invoke(main, ["--checkpoint", str(unsup), "--data", str(data), "--out", str(tmp_path / "u.h5"),
                               "--device", "cpu"])
    assert res.exit_code == 0, res.output
    state = ImageTo3DMM(MobileNetV2(62, width_mult=0.5, last_channels=16)).backbone.state_dict()
    torch.save({k: v for k, v in state.items() if "features.18" not in k}, tmp_path / "cut.pth")
    for gen, tea, msg in ((teacher, teacher, "not a generator"), (unsup, unsup, "not a teacher"),
                          (unsup, tmp_path / "nope.pt", "no such teacher checkpoint"),
                          (unsup, tmp_path / "cut.pth", "not the same architecture")):
        res = runner.invoke(main, ["cascade", "--generator", str(gen), "--teacher", str(tea), "--data", str(data),
                                   "--out", str(tmp_path / "bad.h5"), "--device", "cpu"])
        assert res.exit_code == 2 and "error:" in res.output and msg in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "bad.h5").exists()
    res = runner.invoke(main, ["cascade", "--generator", str(gan), "--data", str(data), "--out", str(tmp_path / "x.h5")])
    assert res.exit_code == 2 and "--teacher" in res.output
