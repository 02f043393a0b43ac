"""The CUDA paths (marked ``gpu``; skipped without CUDA): every trainer on the device with each
mixed precision (bf16, and fp16 with the grad scaler), the device feature bank against the CPU
batches, and CPU/CUDA agreement of the first training step.

``benchmarks/gpu_check.py`` runs them (``pytest -m gpu``) on a machine with a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models.test_models_data import build_tiny
from tests.models.test_train_supervised import enc_config, sup_config
from tests.models.test_train_teacher import teacher_config
from tests.models.test_train_unsupervised import unsup_config
from v2m_models.data import BatchPlanner, CropConfig, DeviceVoiceBatches, FaceBank, FeatureBank, VoiceBatches
from v2m_models.supervised import train_supervised, train_voice_encoder
from v2m_models.teacher import train_teacher
from v2m_models.training import load_checkpoint, read_metrics, resolve_amp
from v2m_models.unsupervised import gan_training_set, train_unsupervised

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world with a voice encoder and a teacher trained on the GPU."""
    root = tmp_path_factory.mktemp("gpu")
    data = build_tiny(root, n=8, seed=2, crop_sizes=(64, 120), test_fraction=0.5)
    enc, teacher = root / "enc.pt", root / "teacher.pt"
    train_voice_encoder(enc_config(data, iterations=3, device="cuda"), enc)
    train_teacher(teacher_config(data, iterations=3, device="cuda"), teacher)
    return data, enc, teacher


def _train(kind, world, out, **kw):
    data, enc, teacher = world
    if kind == "voice-encoder":
        return train_voice_encoder(enc_config(data, **kw), out)
    if kind == "supervised":
        return train_supervised(sup_config(data, **kw), out)
    if kind == "teacher":
        return train_teacher(teacher_config(data, **kw), out)
    recipe = kind.split("/")[1]
    return train_unsupervised(unsup_config(data, enc, teacher, recipe, **kw), out)


def _first(path, metric):
    m = read_metrics(path.with_name(path.stem + ".metrics.csv"))
    return float(m[(m.phase == "train") & (m.metric == metric)].value.iloc[0])


TRAINERS = ["voice-encoder", "supervised", "teacher", "unsupervised/paper", "unsupervised/official"]
#: the first logged loss of each trainer, computed from the initial weights (dropout off for the teacher;
#: the GAN's critic loss, which no dropout touches, for the unsupervised trainer)
LOSS = {"voice-encoder": "loss", "supervised": "loss", "teacher": "loss", "unsupervised/paper": "loss_d",
        "unsupervised/official": "loss_d"}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", TRAINERS)
def test_every_trainer_trains_on_cuda_in_mixed_precision(world, tmp_path, kind, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    out = tmp_path / "m.pt"
    r = _train(kind, world, out, device="cuda", amp=amp, iterations=3)
    assert r.iteration == 3 and all(np.isfinite(v) for v in r.train.values()), r.train
    ck = load_checkpoint(out)
    assert ck["config"]["device"] == "cuda" and ck["config"]["amp"] == amp
    assert all(t.device.type == "cpu" for m in ck["modules"].values() for t in m.values())
    scalers = ck["scalers"]
    if amp == "fp16":  # a live GradScaler per optimiser group: finite positive scale
        assert scalers and all(0 < float(s["scale"]) < float("inf") for s in scalers.values()), scalers
    else:
        assert all(s == {} for s in scalers.values()), scalers  # disabled scalers keep no state
    if kind == "unsupervised/official":
        assert "generator" in scalers and "student" not in scalers  # one joint backward
        assert np.isfinite(r.train["loss_triplet"])


@pytest.mark.parametrize("kind", TRAINERS)
def test_the_first_step_agrees_between_cpu_and_cuda(world, tmp_path, kind):
    """Same initial weights and batch: the first logged loss on CUDA in float32 (TF32 matmuls) is the CPU's."""
    a, b = tmp_path / "cpu.pt", tmp_path / "cuda.pt"
    kw = {"dropout": 0.0} if kind == "teacher" else {}
    _train(kind, world, a, device="cpu", iterations=1, **kw)
    _train(kind, world, b, device="cuda", amp="off", iterations=1, **kw)
    x, y = _first(a, LOSS[kind]), _first(b, LOSS[kind])
    assert abs(x - y) <= 2e-2 * abs(x) + 1e-6, (x, y)


def test_auto_precision_is_bf16_where_supported():
    dev = torch.device("cuda")
    want = (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    assert resolve_amp("auto", dev) == want
    assert resolve_amp("fp16", dev) == (torch.float16, True) and resolve_amp("off", dev) == (None, False)


def test_the_device_feature_bank_cuts_the_cpu_batches(world):
    data, _, _ = world
    from v2m_data.shards import open_dataset

    tr = open_dataset(data).split("train")
    tset, images, face_labels = gan_training_set(tr)
    bank = FeatureBank(tr, tset.utterances)
    planner = BatchPlanner(bank.n_frames, 6, CropConfig(16, 40), 4, groups=tset.labels, face_groups=face_labels,
                           triplets=True)
    src = VoiceBatches(bank, planner, labels=tset.labels, faces=FaceBank(tr, 64, images))
    dev = DeviceVoiceBatches(src, "cuda")
    half = DeviceVoiceBatches(src, "cuda", dtype=torch.float16)
    for it in (0, 1, 7):
        want = src[it]
        got = dev.batch(it)
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].device.type == "cuda" and torch.equal(got[k].cpu(), v), k
        h = half.batch(it)["features"].cpu()
        assert h.dtype == torch.float32 and torch.allclose(h, want["features"], rtol=1e-3, atol=1e-3)


def test_gpu_loader_trains_as_the_cpu_loader(world, tmp_path):
    a, b = tmp_path / "cpu_loader.pt", tmp_path / "gpu_loader.pt"
    _train("supervised", world, a, device="cuda", amp="off", iterations=2, loader="cpu")
    _train("supervised", world, b, device="cuda", amp="off", iterations=2, loader="gpu")
    x, y = _first(a, "loss"), _first(b, "loss")
    assert abs(x - y) <= 1e-4 * abs(x) + 1e-7, (x, y)
