"""The training loop (v2m_models.training) and the voice-encoder / supervised trainers.

Tiny models (narrow encoders), tiny batches and a tiny synthetic world built with the small random
model (tests/models/test_models_data.build_tiny), all on the CPU.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.models.test_models_data import build_tiny
from v2m_bench.errors import ValidationError
from v2m_models.supervised import (
    SupervisedConfig,
    SupervisedTask,
    VoiceEncoderConfig,
    centroid_identification,
    load_encoder,
    train_supervised,
    train_voice_encoder,
)
from v2m_models.training import (
    DistEnv,
    config_from_dict,
    config_to_dict,
    dist_env,
    fit,
    load_checkpoint,
    read_metrics,
    resolve_amp,
    resolve_device,
    save_checkpoint,
)

SMALL = (64, 16, 16, 16, 16, 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("train"), n=8, seed=1)


def sup_config(data, **kw):
    base = dict(data=str(data), iterations=6, batch_size=4, lr=1e-3, device="cpu", workers=0, min_frames=16,
                max_frames=40, encoder_channels=SMALL, log_every=1, val_every=0, ckpt_every=0, progress=False,
                target_fallback=True, seed=3)
    base.update(kw)
    return SupervisedConfig(**base)


def enc_config(data, **kw):
    base = dict(data=str(data), iterations=6, batch_size=4, lr=1e-3, device="cpu", workers=0, min_frames=16,
                max_frames=40, encoder_channels=SMALL, log_every=1, val_every=0, ckpt_every=0, progress=False, seed=3,
                val_train_utterances=8)
    base.update(kw)
    return VoiceEncoderConfig(**base)


def same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else same(a[k], b[k]) for k in a)


def same(x, y) -> bool:
    if isinstance(x, dict):
        return isinstance(y, dict) and same_state(x, y)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(same(p, q) for p, q in zip(x, y))
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    return x == y


# ------------------------------------------------------------------------------------- loop pieces
def test_dist_env_and_devices():
    assert dist_env({}) == DistEnv(0, 1, 0)
    e = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (e.rank, e.world_size, e.local_rank, e.distributed, e.is_main) == (3, 4, 1, True, False)
    with pytest.raises(ValidationError):
        dist_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValidationError):
        dist_env({"RANK": "x"})
    assert resolve_device("cpu").type == "cpu"
    assert resolve_amp("auto", torch.device("cpu")) == (None, False)
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValidationError):
            resolve_device("cuda")


def test_config_round_trip_and_validation():
    c = sup_config("x", betas=(0.5, 0.99))
    d = config_to_dict(c)
    assert d["betas"] == [0.5, 0.99] and d["encoder_channels"] == list(SMALL)
    back = config_from_dict(SupervisedConfig, d)
    assert back == c
    with pytest.raises(ValidationError):
        sup_config("x", amp="fp8")
    with pytest.raises(ValidationError):
        sup_config("x", min_frames=50, max_frames=40)
    with pytest.raises(ValidationError):
        sup_config("x", freeze_encoder=True)  # nothing to freeze


def test_checkpoint_write_is_atomic_and_validated(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"format": "v2m-checkpoint", "version": 1, "kind": "x", "config": {}, "modules": {}, "iteration": 0})
    assert load_checkpoint(p)["kind"] == "x"
    assert [q.name for q in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    torch.save({"format": "something-else"}, tmp_path / "bad.pt")
    with pytest.raises(ValidationError, match="not a v2m-checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "trunc.pt").write_bytes(p.read_bytes()[:50])
    with pytest.raises(ValidationError, match="cannot read"):
        load_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(ValidationError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------- supervised
def test_supervised_exact_resume_and_checkpoint_content(tiny, tmp_path):
    full = tmp_path / "full.pt"
    r = train_supervised(sup_config(tiny, iterations=6), full)
    assert r.iteration == 6 and r.start == 0
    half = tmp_path / "half.pt"
    train_supervised(sup_config(tiny, iterations=3), half)
    assert load_checkpoint(half)["iteration"] == 3
    r2 = train_supervised(sup_config(tiny, iterations=6), half, resume=True)
    assert r2.start == 3 and r2.iteration == 6
    a, b = load_checkpoint(full), load_checkpoint(half)
    assert same_state(a["modules"]["model"], b["modules"]["model"])
    assert same(a["optimizers"], b["optimizers"])
    # and a run that differs (another seed) does not match: the comparison can fail
    other = tmp_path / "other.pt"
    train_supervised(sup_config(tiny, iterations=6, seed=4), other)
    assert not same_state(a["modules"]["model"], load_checkpoint(other)["modules"]["model"])
    # checkpoint content
    assert a["kind"] == "supervised" and a["complete"] and a["predictor"] == "v2m_models.supervised:load_predictor"
    assert a["config"]["encoder_channels"] == list(SMALL) and a["config_class"].endswith("SupervisedConfig")
    t = a["task"]
    assert len(t["stats"]["mean"]) == 50 and len(t["classes"]) >= 3 and t["shuffled"] is False
    assert {"torch", "python", "numpy"} <= set(a["rng"])
    # the metrics log was cut at the resume point and continued: one train row set per iteration
    m = read_metrics(tmp_path / "half.metrics.csv")
    loss = m[(m.phase == "train") & (m.metric == "loss")]
    assert loss.iteration.tolist() == [1, 2, 3, 4, 5, 6]
    mf = read_metrics(tmp_path / "full.metrics.csv")
    assert np.allclose(loss.value.to_numpy(), mf[(mf.phase == "train") & (mf.metric == "loss")].value.to_numpy())


def test_resume_refuses_a_changed_recipe_and_a_finished_run_is_left_alone(tiny, tmp_path):
    out = tmp_path / "s.pt"
    train_supervised(sup_config(tiny, iterations=2), out)
    with pytest.raises(ValidationError, match="lr"):
        train_supervised(sup_config(tiny, iterations=4, lr=5e-4), out, resume=True)
    before = out.read_bytes()
    r = train_supervised(sup_config(tiny, iterations=2), out, resume=True)
    assert r.start == 2 and out.read_bytes() == before
    enc = tmp_path / "e.pt"
    train_voice_encoder(enc_config(tiny, iterations=1), enc)
    with pytest.raises(ValidationError, match="voice-encoder"):
        train_supervised(sup_config(tiny, iterations=2), enc, resume=True)


def test_supervised_learns_the_training_targets(tiny, tmp_path):
    out = tmp_path / "fit.pt"
    r = train_supervised(sup_config(tiny, iterations=300, lr=1e-2, batch_size=8, encoder_channels=(64, 32, 32, 32, 32, 32),
                                    log_every=50), out)
    m = read_metrics(tmp_path / "fit.metrics.csv")
    loss = m[(m.phase == "train") & (m.metric == "loss")].value.to_numpy()
    # normalised targets: predicting the training mean scores ~1; the model must get below it
    # (~0.98 -> ~0.82 here; the tiny world's six speakers are hard to tell apart in 1 s crops)
    assert loss[0] > 0.9 and loss[-1] < 0.9 * loss[0], loss
    assert r.samples_per_s > 0 and r.iterations_per_s > 0


def test_shuffled_pairs_and_validation_metrics(tiny, tmp_path):
    out = tmp_path / "sh.pt"
    r = train_supervised(sup_config(tiny, iterations=2, shuffle_pairs=True, val_every=1), out)
    ck = load_checkpoint(out)
    assert ck["task"]["shuffled"] is True and ck["task"]["shuffle_mode"] == "fixed"
    task_plain = SupervisedTask(sup_config(tiny))
    task_shuf = SupervisedTask(sup_config(tiny, shuffle_pairs=True))
    assert not np.array_equal(task_plain.tset.targets, task_shuf.tset.targets)
    assert sorted(task_plain.tset.targets[:, 0]) == sorted(task_shuf.tset.targets[:, 0])
    # the tiny build has test references: a normalised validation loss is always reported
    assert "val_loss" in r.metrics and np.isfinite(r.metrics["val_loss"])
    m = read_metrics(tmp_path / "sh.metrics.csv")
    assert sorted(set(m[m.phase == "val"].iteration)) == [1, 2]


def test_shuffle_mode_iteration_redraws_the_pairing_every_iteration(tiny, tmp_path):
    from v2m_models.training import Run

    with pytest.raises(ValidationError, match="shuffle_mode"):
        sup_config(tiny, shuffle_pairs=True, shuffle_mode="sometimes")
    cfg = sup_config(tiny, shuffle_pairs=True, shuffle_mode="iteration")
    task = SupervisedTask(cfg)
    plain = SupervisedTask(sup_config(tiny))
    # the training set keeps its pairing; the permutation happens per iteration
    assert np.array_equal(task.tset.targets, plain.tset.targets)
    task.setup(Run(cfg, DistEnv(0, 1, 0), torch.device("cpu")))
    table = torch.as_tensor(task._targets_normalised())
    labels = torch.arange(len(task.tset.names))
    t0, t0_again, t1 = (task._iteration_targets(labels, i) for i in (0, 0, 1))
    assert torch.equal(t0, t0_again)  # a function of (seed, iteration): resumable
    assert not torch.equal(t0, t1) and not torch.equal(t0, table)
    rows = {tuple(r) for r in table.tolist()}
    assert {tuple(r) for r in t0.tolist()} == rows and {tuple(r) for r in t1.tolist()} == rows  # permutations
    # trained: recorded in the checkpoint, not the plain model, and resumed exactly
    full = tmp_path / "it.pt"
    train_supervised(sup_config(tiny, iterations=4, shuffle_pairs=True, shuffle_mode="iteration"), full)
    half = tmp_path / "half.pt"
    train_supervised(sup_config(tiny, iterations=2, shuffle_pairs=True, shuffle_mode="iteration"), half)
    train_supervised(sup_config(tiny, iterations=4, shuffle_pairs=True, shuffle_mode="iteration"), half, resume=True)
    a, b = load_checkpoint(full), load_checkpoint(half)
    assert a["task"]["shuffled"] is True and a["task"]["shuffle_mode"] == "iteration"
    assert same_state(a["modules"]["model"], b["modules"]["model"])
    ref = tmp_path / "plain.pt"
    train_supervised(sup_config(tiny, iterations=4), ref)
    r = load_checkpoint(ref)
    assert r["task"]["shuffle_mode"] == "" and not same_state(a["modules"]["model"], r["modules"]["model"])


def test_voice_encoder_then_supervised_with_a_frozen_encoder(tiny, tmp_path):
    enc = tmp_path / "enc.pt"
    r = train_voice_encoder(enc_config(tiny, iterations=4, val_every=2), enc)
    ck = load_checkpoint(enc)
    assert ck["kind"] == "voice-encoder" and ck["predictor"] == ""
    assert {"train_whole_acc", "test_id_acc", "test_id_chance"} <= set(r.metrics)
    encoder, _ = load_encoder(enc)
    assert encoder.channels == SMALL
    sup = tmp_path / "sup.pt"
    train_supervised(sup_config(tiny, iterations=3, encoder=str(enc), freeze_encoder=True, encoder_channels=(64, 8, 8, 8, 8, 8)), sup)
    s = load_checkpoint(sup)
    assert s["config"]["encoder_channels"] == list(SMALL)  # taken from the encoder checkpoint
    before = {k[len("encoder."):]: v for k, v in ck["modules"]["model"].items() if k.startswith("encoder.")}
    after = {k[len("encoder."):]: v for k, v in s["modules"]["model"].items() if k.startswith("encoder.")}
    assert same_state(before, after)  # frozen: weights and BN statistics untouched
    assert s["task"]["encoder_source"] == str(enc)
    # fine-tuning (not frozen) changes the encoder
    ft = tmp_path / "ft.pt"
    train_supervised(sup_config(tiny, iterations=3, encoder=str(enc)), ft)
    moved = {k[len("encoder."):]: v for k, v in load_checkpoint(ft)["modules"]["model"].items() if k.startswith("encoder.")}
    assert not same_state(before, moved)
    save_checkpoint(tmp_path / "x.pt", {**ck, "modules": {"other": {}}})
    with pytest.raises(ValidationError, match="no 'model' module"):
        load_encoder(tmp_path / "x.pt")


def test_centroid_identification():
    e = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.95, 0.05]], float)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert centroid_identification(e, np.array([0, 0, 1, 1, 0])) == 1.0
    assert centroid_identification(e, np.array([0, 1, 0, 1, 1])) < 0.5


# ------------------------------------------------------------------------------------- DDP on CPU (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_gloo_two_ranks_train_one_model(tiny, tmp_path):
    import torch.multiprocessing as mp

    port = _free_port()
    mp.spawn(_ddp_rank_weights, args=(2, port, str(tiny), str(tmp_path)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert same_state(w0, w1)  # gradients were averaged: both ranks hold the same model
    ck = load_checkpoint(tmp_path / "ddp.pt")
    assert ck["world_size"] == 2 and ck["iteration"] == 3
    assert same_state(ck["modules"]["model"], w0)
    # ... which is not what one rank alone would have learnt from its half of the batches
    single = tmp_path / "single.pt"
    train_supervised(sup_config(tiny, iterations=3, batch_size=2), single)
    assert not same_state(load_checkpoint(single)["modules"]["model"], w0)


def _ddp_rank_weights(rank, world, port, data, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    task = SupervisedTask(sup_config(data, iterations=3))
    fit(task, os.path.join(out_dir, "ddp.pt"))
    torch.save({k: v.detach().cpu() for k, v in task.modules["model"].state_dict().items()},
               os.path.join(out_dir, f"rank{rank}.pt"))


# ------------------------------------------------------------------------------------- CLI
def test_cli_trains_resumes_and_reports_user_errors(tiny, tmp_path):
    from v2m_cli.train import main

    runner = CliRunner()
    out = tmp_path / "cli.pt"
    common = ["--data", str(tiny), "--out", str(out), "--batch-size", "4", "--device", "cpu", "--workers", "0",
              "--min-frames", "16", "--max-frames", "40", "--channels", "64,16,16,16,16,8", "--val-every", "0",
              "--no-progress"]
    res = runner.invoke(main, ["supervised", *common, "--iterations", "2", "--lr", "0.002", "--target-fallback",
                               "--seed", "5"])
    assert res.exit_code == 0, res.output
    assert "iteration 2" in res.output
    ck = load_checkpoint(out)
    assert ck["config"]["lr"] == 0.002 and ck["config"]["seed"] == 5
    # --resume: options left out keep the checkpoint's values (lr, seed, target_fallback, channels)
    res = runner.invoke(main, ["supervised", "--data", str(tiny), "--out", str(out), "--iterations", "4", "--resume",
                               "--device", "cpu", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(out)
    assert ck["iteration"] == 4 and ck["config"]["lr"] == 0.002 and ck["config"]["target_fallback"] is True
    # ... and an explicitly different recipe is refused
    res = runner.invoke(main, ["supervised", "--data", str(tiny), "--out", str(out), "--iterations", "6", "--resume",
                               "--lr", "0.1", "--device", "cpu", "--workers", "0", "--no-progress"])
    assert res.exit_code == 2 and "error:" in res.output and "lr" in res.output
    enc = tmp_path / "enc.pt"
    res = runner.invoke(main, ["voice-encoder", *[a if a != str(out) else str(enc) for a in common], "--iterations", "2"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(enc)["kind"] == "voice-encoder"
    res = runner.invoke(main, ["supervised", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "z.pt"),
                               "--device", "cpu"])
    assert res.exit_code == 2 and "error:" in res.output and "nope" in res.output
    res = runner.invoke(main, ["supervised", *common, "--channels", "1,2"])
    assert res.exit_code == 2
    res = runner.invoke(main, ["supervised", *common, "--freeze-encoder"])
    assert res.exit_code == 2 and "--encoder" in res.output
    sh = tmp_path / "sh.pt"
    res = runner.invoke(main, ["supervised", *[a if a != str(out) else str(sh) for a in common], "--iterations", "1",
                               "--target-fallback", "--shuffle-pairs", "--shuffle-mode", "iteration"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(sh)["task"]["shuffle_mode"] == "iteration"
    res = runner.invoke(main, ["supervised", *common, "--shuffle-pairs", "--shuffle-mode", "sometimes"])
    assert res.exit_code == 2 and "sometimes" in res.output


def test_validation_metrics_need_the_bfm_topology(tmp_path, monkeypatch):
    """A model with 40 + 10 coefficients but another mesh (the small test model a build can be made
    with) cannot serve the metrics, which read fixed BFM vertex ids: none is used, and the log
    says why, for every trainer's validation."""
    from tests.conftest import make_small_model
    from v2m_models.supervised import usable_bfm

    monkeypatch.delenv("V2M_BFM_DIR", raising=False)
    npz = tmp_path / "small.npz"
    make_small_model(0).save(npz)
    logged = []
    assert usable_bfm(str(npz), None, logged.append) is None
    assert len(logged) == 1 and "576 vertices" in logged[0] and "no geometric metrics" in logged[0]

    class Build:  # a build whose manifest names the small model
        manifest = {"inputs": {"bfm": str(npz)}}

    logged.clear()
    assert usable_bfm(None, Build(), logged.append) is None
    assert "576 vertices" in logged[-1]


def test_validation_uses_the_bfm_when_it_is_there(bfm_dir):
    from v2m_models.supervised import usable_bfm

    logged = []
    b = usable_bfm(str(bfm_dir), None, logged.append)
    assert b is not None and b.n_vertices == 53215 and not logged


def test_the_mesh_loss_takes_any_40_plus_10_model(tmp_path, monkeypatch):
    from tests.conftest import make_small_model
    from v2m_models.supervised import usable_bfm

    monkeypatch.delenv("V2M_BFM_DIR", raising=False)
    npz = tmp_path / "small.npz"
    make_small_model(0).save(npz)
    assert usable_bfm(str(npz), None, topology=False).n_vertices == 576
