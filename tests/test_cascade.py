"""The cascade baseline (v2m_models.cascade, ``v2m-predict cascade``): predictions equal
teacher(upsample(generator(encoder(voice)))) computed by hand; generator from an unsupervised or a
GAN-only checkpoint; one-line errors; the plain ``v2m-predict --checkpoint`` form still works."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from test_models_data import build_tiny
from test_train_supervised import enc_config, sup_config
from test_train_teacher import teacher_config
from test_train_unsupervised import unsup_config
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
    # two iterations leave the generator's faces almost independent of the voice: amplify its
    # first layer so that the generated faces (and the teacher's outputs) differ between voices
    ck = load_checkpoint(gan)
    ck["modules"]["generator"]["model.0.weight"] = ck["modules"]["generator"]["model.0.weight"] * 300.0
    save_checkpoint(gan, ck)
    return data, teacher, unsup, gan


def _by_hand(generator_ck, teacher_ck, features):
    """teacher(upsample(generator(encoder(voice)))), from the raw state dicts."""
    g = load_checkpoint(generator_ck)
    t = load_checkpoint(teacher_ck)
    enc = VoiceEncoder(tuple(g["task"]["encoder"]["channels"]))
    enc.load_state_dict({k[len("module."):]: v for k, v in g["modules"]["encoder"].items()})
    gen = Generator(enc.embed_dim, tuple(g["config"]["generator_channels"]))
    gen.load_state_dict(g["modules"]["generator"])
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
    if which == "gan":  # the amplified generator: the prediction depends on the voice
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
    # a teacher of another architecture saved as a plain state dict
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
