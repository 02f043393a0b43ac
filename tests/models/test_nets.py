"""Shapes, ranges and invariants of the networks in v2m_models.nets (tiny inputs, CPU)."""

from __future__ import annotations

import pytest
import torch

from v2m_bench.errors import ValidationError
from v2m_models.nets import (
    CoefficientHead,
    Discriminator,
    FaceTrunk,
    Generator,
    IdentityClassifier,
    ImageTo3DMM,
    MobileNetV2,
    SpeakerClassifier,
    SupervisedModel,
    VoiceEncoder,
    conv_output_length,
    count_parameters,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(1)
    enc = VoiceEncoder()
    # non-trivial BatchNorm statistics so that padding mistakes show up in eval mode
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return enc.eval()


def test_conv_output_length_matches_conv_arithmetic():
    lengths = torch.tensor([1, 2, 3, 31, 32, 33, 300, 800])
    conv = torch.nn.Conv1d(1, 1, 3, 2, 1)
    expected = []
    for n in lengths.tolist():
        h = torch.zeros(1, 1, n)
        for _ in range(5):
            h = conv(h)
        expected.append(h.shape[2])
    assert conv_output_length(lengths).tolist() == expected


@pytest.mark.parametrize("t", [300, 800])
def test_voice_encoder_shape_and_unit_norm(encoder, t):
    with torch.no_grad():
        emb = encoder(torch.randn(2, 64, t))
        raw = encoder(torch.randn(2, 64, t), normalize=False)
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    assert raw.shape == (2, 64)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2), atol=1e-3)


def test_voice_encoder_short_input(encoder):
    with torch.no_grad():
        assert encoder(torch.randn(1, 64, 1)).shape == (1, 64)


def test_voice_encoder_padded_batch_equals_one_by_one(encoder):
    lengths = [300, 173, 800, 45]
    xs = [torch.randn(64, n) for n in lengths]
    batch = torch.zeros(len(xs), 64, max(lengths))
    for i, x in enumerate(xs):
        batch[i, :, : x.shape[1]] = x
    with torch.no_grad():
        padded = encoder(batch, lengths=torch.tensor(lengths))
        single = torch.cat([encoder(x[None]) for x in xs])
        naive = encoder(batch)  # ignoring the padding must give something else
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-4)
    assert (naive[1] - single[1]).abs().max() > 1e-3
    with torch.no_grad():  # also before normalisation (a wrong divisor would cancel out above)
        padded_raw = encoder(batch, lengths=torch.tensor(lengths), normalize=False)
        single_raw = torch.cat([encoder(x[None], normalize=False) for x in xs])
    torch.testing.assert_close(padded_raw, single_raw, atol=1e-5, rtol=1e-4)


def test_voice_encoder_padding_content_is_ignored(encoder):
    x = torch.randn(2, 64, 120)
    lengths = torch.tensor([120, 57])
    y = x.clone()
    y[1, :, 57:] = 100.0  # garbage past the valid length
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, lengths), encoder(y, lengths), atol=1e-6, rtol=1e-5)


def test_voice_encoder_rejects_bad_input(encoder):
    with pytest.raises(ValidationError):
        encoder(torch.randn(2, 40, 100))
    with pytest.raises(ValidationError):
        encoder(torch.randn(2, 64, 100), lengths=torch.tensor([100, 101]))
    with pytest.raises(ValidationError):
        encoder(torch.randn(2, 64, 100), lengths=torch.tensor([100]))


def test_voice_encoder_parameter_count():
    # convs 64*256*3 + 256*384*3 + 384*576*3 + 576*864*3 (no bias) + 864*64*3 + 64; BN 2*(256+384+576+864)
    expected = 3 * (64 * 256 + 256 * 384 + 384 * 576 + 576 * 864 + 864 * 64) + 64 + 2 * (256 + 384 + 576 + 864)
    assert count_parameters(VoiceEncoder()) == expected


def test_speaker_classifier_logits_and_gradient():
    model = SpeakerClassifier(7)
    x = torch.randn(3, 64, 96)
    logits = model(x)
    assert logits.shape == (3, 7)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 6]))
    loss.backward()
    assert model.encoder.model[0].weight.grad is not None
    assert torch.isfinite(model.encoder.model[0].weight.grad).all()


def test_coefficient_head_shapes():
    out = CoefficientHead()(torch.randn(4, 64))
    assert out["shape"].shape == (4, 40)
    assert out["expression"].shape == (4, 10)
    torch.testing.assert_close(out["coefficients"], torch.cat([out["shape"], out["expression"]], 1))


def test_supervised_model_frozen_encoder():
    model = SupervisedModel(freeze_encoder=True)
    model.train()
    assert not model.encoder.training  # BN statistics stay fixed
    before = model.encoder.model[1].running_mean.clone()
    out = model(torch.randn(3, 64, 80))
    assert out["shape"].shape == (3, 40) and out["expression"].shape == (3, 10)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(3))
    out["coefficients"].pow(2).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.shape_head.weight.grad is not None
    torch.testing.assert_close(model.encoder.model[1].running_mean, before)
    assert count_parameters(model, trainable_only=True) == 64 * 40 + 40 + 64 * 10 + 10


def test_generator_output_shape_and_range():
    g = Generator()
    emb = torch.nn.functional.normalize(torch.randn(2, 64), dim=1)
    with torch.no_grad():
        img = g(emb)
        img4 = g(emb[:, :, None, None])
    assert img.shape == (2, 3, 64, 64)
    assert img.min() >= -1.0 and img.max() <= 1.0
    torch.testing.assert_close(img, img4)
    raw = Generator(tanh=False)
    raw.load_state_dict(g.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(torch.tanh(raw(emb)), img)


def test_generator_can_saturate_range_only_with_tanh():
    g = Generator(tanh=False)
    with torch.no_grad():
        g.model[-1].bias.fill_(5.0)
        assert g(torch.randn(1, 64)).min() > 1.0
        g.tanh = True
        assert g(torch.randn(1, 64)).max() <= 1.0


def test_face_trunk_discriminator_classifier():
    trunk = FaceTrunk()
    d = Discriminator(trunk)
    c = IdentityClassifier(5, trunk)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        f = trunk(x)
        assert f.shape == (2, 64)
        assert d(x).shape == (2, 1)
        assert c(x).shape == (2, 5)
        torch.testing.assert_close(d(x), d.head(f))
    assert d.trunk is c.trunk
    with pytest.raises(ValidationError):
        trunk(torch.randn(1, 3, 120, 120))


def test_mobilenet_outputs_and_features():
    net = MobileNetV2(num_outputs=62).eval()
    x = torch.randn(2, 3, 120, 120)
    with torch.no_grad():
        p = net(x)
        out = net(x, return_features=True)
    assert p.shape == (2, 62)
    torch.testing.assert_close(out["params"], p)
    assert out["features"].shape == (2, 1280)
    assert out["early"].shape == (2, 64, 8, 8)
    assert [tuple(m.shape[1:]) for m in out["maps"]] == [(24, 30, 30), (32, 15, 15), (96, 8, 8), (1280, 4, 4)]
    assert net.map_channels == (24, 32, 96, 1280)
    torch.testing.assert_close(out["features"], out["maps"][-1].mean(dim=(2, 3)))


def test_mobilenet_parameter_count():
    n = count_parameters(MobileNetV2(num_outputs=62))
    assert 2_250_000 < n < 2_350_000  # torchvision-style MobileNetV2 features (2.22M) + 1280*62+62
    assert n == 2_303_294
    half = count_parameters(MobileNetV2(num_outputs=62, width_mult=0.5))
    assert half < 0.4 * n


def test_mobilenet_residual_blocks_pass_gradient_to_input():
    net = MobileNetV2(width_mult=0.35)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_image_to_3dmm_slices_and_resize():
    model = ImageTo3DMM(MobileNetV2(num_outputs=62, width_mult=0.35)).eval()
    small = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = model(small, return_features=True)
        up = torch.nn.functional.interpolate(small, size=(120, 120), mode="bilinear", align_corners=True)
        direct = model.backbone(up)
    assert out["params"].shape == (2, 62)
    torch.testing.assert_close(out["params"], direct)
    torch.testing.assert_close(out["pose"], direct[:, :12])
    torch.testing.assert_close(out["shape"], direct[:, 12:52])
    torch.testing.assert_close(out["expression"], direct[:, 52:62])
    assert out["early"].shape[2:] == (8, 8)
    with pytest.raises(ValidationError):
        ImageTo3DMM(MobileNetV2(num_outputs=10, width_mult=0.35))
