"""The image -> 3DMM teacher (v2m_models.teacher, ``v2m-train teacher``): targets in the crop frame,
learning, exact resume, loading checkpoints and plain state dicts, one-line errors.

Tiny MobileNetV2s (width 0.25, last conv 32) on a tiny synthetic world with 120x120 crops, CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.models.test_models_data import build_tiny
from tests.models.test_train_supervised import same, same_state, sup_config
from v2m_bench.errors import ValidationError
from v2m_data.fitting import project
from v2m_data.shards import open_dataset
from v2m_models.data import FaceBank
from v2m_models.supervised import train_supervised
from v2m_models.teacher import (
    TeacherConfig,
    TeacherTask,
    crop_pose,
    load_teacher,
    param_stats,
    reference_images,
    teacher_pairs,
    train_teacher,
)
from v2m_models.training import load_checkpoint, read_metrics


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("teacher"), n=8, seed=1, crop_sizes=(64, 120))


def teacher_config(data, **kw):
    base = dict(data=str(data), iterations=4, batch_size=4, lr=3e-3, device="cpu", width_mult=0.25, last_channels=32,
                log_every=1, val_every=0, ckpt_every=0, progress=False, seed=2)
    base.update(kw)
    return TeacherConfig(**base)


def _rotation(yaw, pitch, roll):
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


def test_crop_pose_projects_like_the_fit_in_crop_pixels():
    rng = np.random.default_rng(0)
    m = 5
    scale = rng.uniform(2e-4, 6e-4, m)
    rot = np.stack([_rotation(*rng.uniform(-0.5, 0.5, 3)) for _ in range(m)])
    trans = rng.uniform(50, 150, (m, 2))
    box = np.column_stack([trans - rng.uniform(40, 60, (m, 2)), trans + rng.uniform(40, 60, (m, 2))])
    pts = rng.normal(size=(m, 7, 3)) * 50_000
    p = crop_pose(scale, rot, trans, box, 120).reshape(m, 3, 4)
    img = project(pts, scale, rot, trans)  # image pixels, y down
    side = np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
    corner = (box[:, :2] + box[:, 2:]) / 2 - side[:, None] / 2
    want = (img - corner[:, None]) * (120 / side)[:, None, None]
    homog = np.concatenate([pts, np.ones((m, 7, 1))], axis=2)
    got = np.einsum("mij,mnj->mni", p, homog)
    assert np.allclose(got[..., 0], want[..., 0], atol=1e-6)
    assert np.allclose(120 - got[..., 1], want[..., 1], atol=1e-6)
    assert np.allclose(p[:, 2, 3], 0)


def test_pairs_and_statistics(world):
    ds = open_dataset(world)
    tr = ds.split("train")
    imgs, params = teacher_pairs(tr, 120)
    assert params.shape == (len(imgs), 62) and np.isfinite(params).all() and len(imgs) == tr.n_images
    assert np.allclose(params[:, 12:52], tr.fit["shape"][imgs]) and np.allclose(params[:, 52:], tr.fit["expression"][imgs])
    strict, _ = teacher_pairs(tr, 120, max_residual=float(np.median(tr.fit["residual_normalized"])))
    assert 0 < len(strict) < len(imgs)
    st = param_stats(params)
    z = st.normalise(params)
    # every varying entry is normalised on its own scale (rotation entries ~1e-3, shapes ~1e5)
    varying = params.std(0) > 0
    assert np.allclose(z[:, varying].std(0), 1, atol=1e-3) and np.allclose(z[:, ~varying], 0)
    names, rimgs, rows, refs = reference_images(ds)
    assert names == refs.identity.tolist() and len(rimgs) == len(names)
    ts = ds.split("test")
    for n, i in zip(names, rimgs):  # the first of the reference's source images
        sources = str(refs.source_image[list(refs.identity).index(n)]).split(";")
        assert str(ts.images["path"][i]) == sources[0]


def test_teacher_fits_its_training_pairs_better_than_the_mean(world, tmp_path):
    out = tmp_path / "fit.pt"
    r = train_teacher(teacher_config(world, iterations=100, batch_size=8, lr=5e-3, dropout=0.0, log_every=10), out)
    m = read_metrics(tmp_path / "fit.metrics.csv")
    loss = m[(m.phase == "train") & (m.metric == "loss")].value.to_numpy()
    # normalised targets: the mean predictor scores ~1 (~0.97 -> ~0.3 here)
    assert loss[0] > 0.9 and loss[-1] < 0.6 * loss[0], loss
    # in eval mode on the training crops: well below the mean predictor's error
    task = TeacherTask(teacher_config(world))
    reg, info = load_teacher(out)
    assert info["kind"] == "teacher" and info["iteration"] == 100
    with torch.no_grad():
        z = reg(torch.from_numpy(task.faces.batch(np.arange(len(task.faces)))))["params"].numpy()
    err = np.mean((z - task.targets) ** 2)
    mean_err = np.mean(task.targets ** 2)
    assert err < 0.6 * mean_err, (err, mean_err)  # ~0.31 vs ~0.98 here
    # validation on the test split: a parameter loss and, when the BFM is at hand (the metrics read
    # its vertex ids; this build's own model is a small test mesh), the bench metrics
    assert np.isfinite(r.metrics["val_loss"])
    from v2m_models.supervised import usable_bfm

    has_bfm = usable_bfm(None, open_dataset(world)) is not None
    assert ({"ER", "ARE_mean", "NME", "ER_meanface"} <= set(r.metrics)) == has_bfm


def test_teacher_on_64x64_crops_upsampled_like_the_gan_faces(world, tmp_path):
    t64 = TeacherTask(teacher_config(world, face_size=64))
    t120 = TeacherTask(teacher_config(world))
    assert t64.faces.crops.shape[1:] == (64, 64, 3) and t120.faces.crops.shape[1:] == (120, 120, 3)
    assert np.array_equal(t64.targets, t120.targets)  # the pose is in the network input's pixels
    out = tmp_path / "t64.pt"
    train_teacher(teacher_config(world, face_size=64, iterations=1), out)
    reg, _ = load_teacher(out)
    assert reg.net.input_size == 120 and load_checkpoint(out)["task"]["net"]["face_size"] == 64
    x = torch.from_numpy(t64.faces.batch([0, 1]))
    up = torch.nn.functional.interpolate(x, size=(120, 120), mode="bilinear", align_corners=True)
    with torch.no_grad():
        assert torch.allclose(reg(x)["params"], reg(up)["params"], atol=1e-6)


def test_exact_resume(world, tmp_path):
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    train_teacher(teacher_config(world, iterations=4), full)
    train_teacher(teacher_config(world, iterations=2), half)
    r = train_teacher(teacher_config(world, iterations=4), half, resume=True)
    assert r.start == 2 and r.iteration == 4
    a, b = load_checkpoint(full), load_checkpoint(half)
    assert same_state(a["modules"]["model"], b["modules"]["model"]) and same(a["optimizers"], b["optimizers"])
    other = tmp_path / "other.pt"
    train_teacher(teacher_config(world, iterations=4, seed=9), other)
    assert not same_state(a["modules"]["model"], load_checkpoint(other)["modules"]["model"])
    assert a["kind"] == "teacher" and a["predictor"] == "" and len(a["task"]["stats"]["mean"]) == 62


def test_load_teacher_state_dicts_and_bad_inputs(world, tmp_path, bfm):
    ck = tmp_path / "t.pt"
    train_teacher(teacher_config(world, iterations=1), ck)
    reg, _ = load_teacher(ck)
    x = torch.from_numpy(FaceBank(open_dataset(world).split("test"), 120).batch([0, 1]))
    with torch.no_grad():
        want = reg(x)["params"]
    # a plain state dict of the same architecture (with a DataParallel prefix) loads; its outputs are
    # de-whitened with the BFM's param_whitening statistics
    state = {"module." + k: v for k, v in reg.net.backbone.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "plain.pth")
    plain, info = load_teacher(tmp_path / "plain.pth", bfm=bfm.source)
    assert info["kind"] == "state_dict"
    with torch.no_grad():
        out = plain(x)
    assert torch.allclose(out["params"], want, atol=1e-5)
    want_c = out["params"][:, 12:] * torch.as_tensor(np.concatenate([bfm.shape_std, bfm.expression_std])) + \
        torch.as_tensor(np.concatenate([bfm.shape_mean, bfm.expression_mean]))
    assert torch.allclose(out["coefficients"], want_c.float(), rtol=1e-5)
    # bgr: the 3DDFA convention, channels swapped and scaled
    bgr, _ = load_teacher(tmp_path / "plain.pth", bfm=bfm.source, input_format="bgr")
    with torch.no_grad():
        assert torch.allclose(bgr(x.flip(1) * (128 / 127.5))["params"], want, atol=1e-5)
    # wrong architecture, wrong kind, missing and unreadable files: one-line errors
    bad = dict(state)
    bad["module.classifier.weight"] = torch.zeros(10, 32)
    torch.save(bad, tmp_path / "ten.pth")
    with pytest.raises(ValidationError, match="10 outputs"):
        load_teacher(tmp_path / "ten.pth", bfm=bfm.source)
    other = dict(state)
    other["module.features.1.conv.0.0.weight"] = torch.zeros(3, 1, 3, 3)
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(ValidationError, match="not the same architecture"):
        load_teacher(tmp_path / "other.pth", bfm=bfm.source)
    sup = tmp_path / "sup.pt"
    train_supervised(sup_config(world, iterations=1), sup)
    with pytest.raises(ValidationError, match="'supervised' checkpoint, not a teacher"):
        load_teacher(sup)
    with pytest.raises(ValidationError, match="no such teacher checkpoint"):
        load_teacher(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValidationError, match="cannot read"):
        load_teacher(tmp_path / "junk.pt")


def test_cli(world, tmp_path):
    from v2m_cli.train import main

    runner = CliRunner()
    out = tmp_path / "cli.pt"
    args = ["teacher", "--data", str(world), "--out", str(out), "--iterations", "2", "--batch-size", "4", "--device", "cpu",
            "--width-mult", "0.25", "--last-channels", "16", "--val-every", "0", "--no-progress", "--lr", "0.002"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(out)
    assert ck["kind"] == "teacher" and ck["config"]["last_channels"] == 16 and ck["config"]["lr"] == 0.002
    res = runner.invoke(main, ["teacher", "--data", str(world), "--out", str(out), "--iterations", "3", "--resume",
                               "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out)["iteration"] == 3
    res = runner.invoke(main, [*args[:4], str(tmp_path / "t2.pt"), "--face-size", "96", "--device", "cpu"])
    assert res.exit_code == 2 and "error:" in res.output and "96" in res.output
    res = runner.invoke(main, ["teacher", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "z.pt")])
    assert res.exit_code == 2 and "error:" in res.output and "nope" in res.output
    with pytest.raises(ValidationError):
        teacher_config(world, dropout=1.5)
