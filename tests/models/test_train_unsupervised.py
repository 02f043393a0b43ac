"""The unsupervised pipeline (v2m_models.unsupervised, ``v2m-train unsupervised``): tiny synthetic
world -> build -> voice encoder -> teacher -> GAN + student with each KD loss -> predictions.h5 ->
v2m_bench.score; exact resume, frozen parts, the mesh loss, GAN-only mode, one-line errors.

Tiny nets (narrow encoder, generator, trunk and MobileNetV2s), batches of 4, a few iterations, CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.models.test_models_data import build_tiny
from tests.models.test_train_supervised import enc_config, same, same_state, sup_config
from tests.models.test_train_teacher import teacher_config
from v2m_bench import ScoreConfig, score
from v2m_bench.errors import ValidationError
from v2m_bench.formats import read_predictions
from v2m_data.shards import open_dataset
from v2m_models.kd import KD_NAMES
from v2m_models.predict import predict
from v2m_models.supervised import train_supervised, train_voice_encoder
from v2m_models.teacher import train_teacher
from v2m_models.training import load_checkpoint, read_metrics
from v2m_models.data import BatchPlanner, CropConfig, triplet_items
from v2m_models.unsupervised import (
    RECIPES,
    UnsupervisedConfig,
    UnsupervisedTask,
    gan_training_set,
    load_predictor,
    mesh_distance,
    mesh_gram,
    posed_vertices,
    train_unsupervised,
    triplet_margin_loss,
)

TINY_NETS = dict(student_width=0.25, student_last_channels=32, generator_channels=(32, 16, 16, 8, 8),
                 trunk_channels=(8, 8, 8, 8, 8), crd_negatives=8)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny world (half the identities in the test split) with a voice encoder and a teacher."""
    root = tmp_path_factory.mktemp("unsup")
    data = build_tiny(root, n=8, seed=2, crop_sizes=(64, 120), test_fraction=0.5)
    enc = root / "enc.pt"
    train_voice_encoder(enc_config(data, iterations=3), enc)
    teacher = root / "teacher.pt"
    train_teacher(teacher_config(data, iterations=3), teacher)
    return data, enc, teacher


def unsup_config(data, enc, teacher, recipe="paper", **kw):
    base = dict(RECIPES[recipe], recipe=recipe)
    base.update(data=str(data), encoder=str(enc), teacher=None if teacher is None else str(teacher), iterations=2, batch_size=4, device="cpu",
                workers=0, min_frames=16, max_frames=40, log_every=1, val_every=0, ckpt_every=0, progress=False, seed=3,
                **TINY_NETS)
    base.update(kw)
    return UnsupervisedConfig(**base)


@pytest.mark.parametrize("kd", KD_NAMES)
def test_each_kd_loss_runs_end_to_end_and_yields_valid_predictions(pipeline, tmp_path, kd, bfm):
    data, enc, teacher = pipeline
    ck = tmp_path / f"{kd}.pt"
    r = train_unsupervised(unsup_config(data, enc, teacher, kd=kd), ck)
    assert r.iteration == 2
    assert all(np.isfinite(v) for v in r.train.values()) and "loss_kd" in r.train and "loss_mesh" in r.train
    assert np.isfinite(r.metrics["val_kd_param"]) and "ER" in r.metrics and "ER_cascade" in r.metrics
    c = load_checkpoint(ck)
    assert c["kind"] == "unsupervised" and c["task"]["kd"] == kd and c["predictor"] == "v2m_models.unsupervised:load_predictor"
    out = tmp_path / f"{kd}.h5"
    res = predict(ck, data, out, device="cpu")
    refs = open_dataset(data).references()
    assert res.n_predictions == 3 * len(refs.identity)
    p = read_predictions(out, n_vertices=None)
    assert p.attrs["checkpoint_kind"] == "unsupervised" and np.isfinite(p.shape).all() and np.isfinite(p.expression).all()
    rep = score(out, data / "references.h5", bfm, config=ScoreConfig(bootstrap=0, chance=False))
    assert rep.n_predictions == res.n_predictions
    assert all(np.isfinite(m.value) for m in rep.metrics.values())


@pytest.mark.parametrize("kd,recipe", [("pkt", "paper"), ("crd", "paper"), ("pkt", "official")])
def test_exact_resume(pipeline, tmp_path, kd, recipe):
    data, enc, teacher = pipeline
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    train_unsupervised(unsup_config(data, enc, teacher, recipe, kd=kd, iterations=4), full)
    train_unsupervised(unsup_config(data, enc, teacher, recipe, kd=kd, iterations=2), half)
    r = train_unsupervised(unsup_config(data, enc, teacher, recipe, kd=kd, iterations=4), half, resume=True)
    assert r.start == 2 and r.iteration == 4
    a, b = load_checkpoint(full), load_checkpoint(half)
    assert set(a["modules"]) == {"encoder", "teacher", "generator", "critic", "student", "kd"}
    for k in a["modules"]:
        assert same_state(a["modules"][k], b["modules"][k]), k
    assert same(a["optimizers"], b["optimizers"])
    m = read_metrics(tmp_path / "half.metrics.csv")
    assert m[(m.phase == "train") & (m.metric == "loss_student")].iteration.tolist() == [1, 2, 3, 4]
    trip = m[(m.phase == "train") & (m.metric == "loss_triplet")]
    assert trip.iteration.tolist() == ([1, 2, 3, 4] if recipe == "official" else [])
    assert a["config"]["recipe"] == recipe and a["task"]["recipe"]["name"] == recipe
    assert a["task"]["recipe"]["joint_generator"] is (recipe == "official")
    other = tmp_path / "other.pt"
    train_unsupervised(unsup_config(data, enc, teacher, recipe, kd=kd, iterations=4, seed=8), other)
    assert not same_state(a["modules"]["student"], load_checkpoint(other)["modules"]["student"])


def test_pretrained_parts_stay_frozen_and_the_parts_learn(pipeline, tmp_path):
    data, enc, teacher = pipeline
    ck = tmp_path / "u.pt"
    train_unsupervised(unsup_config(data, enc, teacher, iterations=3), ck)
    c = load_checkpoint(ck)
    e = load_checkpoint(enc)["modules"]["model"]
    want = {k[len("encoder."):]: v for k, v in e.items() if k.startswith("encoder.")}
    assert same_state({k[len("module."):]: v for k, v in c["modules"]["encoder"].items()}, want)
    t = load_checkpoint(teacher)["modules"]["model"]
    assert same_state({k[len("module."):]: v for k, v in c["modules"]["teacher"].items()}, t)
    # the student starts from the teacher's statistics, not its weights, and moved
    assert torch.equal(c["modules"]["student"]["param_mean"], t["param_mean"])
    fresh = tmp_path / "zero.pt"
    train_unsupervised(unsup_config(data, enc, teacher, iterations=1, lr=1e-12), fresh)
    z = load_checkpoint(fresh)["modules"]
    assert not same_state(c["modules"]["generator"], z["generator"])
    assert not same_state(c["modules"]["student"], z["student"])


def test_the_student_learns_the_teacher_on_generated_faces(pipeline, tmp_path):
    data, enc, teacher = pipeline
    ck = tmp_path / "s.pt"
    train_unsupervised(unsup_config(data, enc, teacher, iterations=40, lr=2e-3, log_every=5, mesh_weight=0.0), ck)
    m = read_metrics(tmp_path / "s.metrics.csv")
    lp = m[(m.phase == "train") & (m.metric == "loss_param")].value.to_numpy()
    # ~4e-4 -> ~1e-4 here; with a learning rate of 1e-7 it stays at ~8e-4
    assert lp[-1] < 0.5 * lp[0], lp


def test_recipe_presets(pipeline):
    data, enc, teacher = pipeline
    paper = UnsupervisedConfig(data=str(data), encoder=str(enc), teacher=str(teacher))
    assert paper.recipe == "paper"
    assert {k: getattr(paper, k) for k in RECIPES["paper"]} == RECIPES["paper"]
    assert RECIPES["paper"] == dict(batch_size=128, param_weight=1.0, mesh_weight=0.5, mesh_space="neutral",
                                    triplet_weight=0.0, triplet_margin=1.0, joint_generator=False)
    off = UnsupervisedConfig.from_recipe("official", data=str(data), encoder=str(enc), teacher=str(teacher))
    assert (off.recipe, off.batch_size, off.param_weight, off.mesh_weight, off.mesh_space, off.triplet_weight,
            off.triplet_margin, off.joint_generator, off.kd) == ("official", 64, 0.0, 0.5, "posed", 1.5, 1.0, True, "pkt")
    mine = UnsupervisedConfig.from_recipe("official", data=str(data), encoder=str(enc), teacher=str(teacher),
                                          joint_generator=False, batch_size=8)
    assert not mine.joint_generator and mine.batch_size == 8 and mine.triplet_weight == 1.5
    with pytest.raises(ValidationError, match="unknown recipe"):
        UnsupervisedConfig.from_recipe("cvpr", data=str(data), encoder=str(enc), teacher=str(teacher))
    for bad, key in ((dict(mesh_space="world"), "mesh_space"), (dict(triplet_weight=-1.0), "triplet_weight"),
                     (dict(triplet_margin=float("nan")), "triplet_margin")):
        with pytest.raises(ValidationError) as e:
            unsup_config(data, enc, teacher, **bad)
        assert e.value.key == key


def test_triplet_items_are_proper_and_deterministic():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), [1, 2, 3, 4, 5, 6])  # identity 0 has a single utterance
    items = rng.permutation(len(groups))
    u = rng.random((3, len(items)))
    pos, neg = triplet_items(items, groups, *u)
    assert np.array_equal(groups[pos], groups[items])
    assert np.all(groups[neg] != groups[items])
    single = groups[items] == 0
    assert np.array_equal(pos[single], items[single]) and np.all(pos[~single] != items[~single])
    # every other utterance / identity is reachable
    many = np.repeat(items[groups[items] == 5][:1], 4000)
    pos, neg = triplet_items(many, groups, *rng.random((3, len(many))))
    assert set(pos.tolist()) == set(np.flatnonzero(groups == 5).tolist()) - {int(many[0])}
    assert set(groups[neg].tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValidationError, match="two identities"):
        triplet_items([0, 1], [3, 3], [0.1, 0.2], [0.1, 0.2], [0.1, 0.2])
    # the planner: a pure function of (seed, iteration), each rank gets its slice of the global plan
    n_frames = rng.integers(20, 60, len(groups))
    kw = dict(sampling="utterance", groups=groups, triplets=True)
    one = BatchPlanner(n_frames, 8, CropConfig(10, 30), 5, **kw)
    ranks = [BatchPlanner(n_frames, 8, CropConfig(10, 30), 5, rank=r, world_size=2, **kw) for r in (0, 1)]
    for it in (0, 3):
        p = one.plan(it)
        q = [r.plan(it) for r in ranks]
        for k in ("items", "positive_items", "negative_items", "positive_starts", "negative_starts"):
            assert np.array_equal(getattr(p, k), np.concatenate([getattr(x, k) for x in q])), k
        assert np.array_equal(p.positive_items, one.plan(it).positive_items)
        for k in ("positive", "negative"):
            st, n = getattr(p, f"{k}_starts"), n_frames[getattr(p, f"{k}_items")]
            assert np.all((st >= 0) & (st < n) & ((st + p.length <= n) | (n < p.length))), k
    assert not np.array_equal(one.plan(0).negative_items, one.plan(1).negative_items)
    plain = BatchPlanner(n_frames, 8, CropConfig(10, 30), 5, sampling="utterance", groups=groups).plan(2)
    withp = one.plan(2)
    assert np.array_equal(plain.items, withp.items) and np.array_equal(plain.starts, withp.starts)
    assert plain.positive_items is None


def test_triplet_term_is_zero_beyond_the_margin():
    d_ap = torch.tensor([1.0, 2.0, 0.5])
    assert triplet_margin_loss(d_ap, d_ap + 0.75, 0.75).item() == 0.0
    assert triplet_margin_loss(d_ap, d_ap + 2.0, 0.75).item() == 0.0
    # 0.25 short of the margin on one sample only
    got = triplet_margin_loss(d_ap, d_ap + torch.tensor([0.75, 0.5, 1.0]), 0.75).item()
    assert abs(got - 0.25 / 3) < 1e-7
    # torch's reference on flattened vertices
    rng = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(4, 30, 3, generator=rng) for _ in range(3))
    want = torch.nn.TripletMarginLoss(margin=1.0, eps=0.0)(a.flatten(1), p.flatten(1), n.flatten(1))
    assert torch.allclose(triplet_margin_loss(mesh_distance(a, p), mesh_distance(a, n), 1.0), want, atol=1e-5)


def test_mesh_distances_and_posed_vertices(small_model):
    rng = np.random.default_rng(1)
    std = np.concatenate([small_model.shape_std, small_model.expression_std])
    a, b = rng.normal(size=(2, 3, 50)) * std
    va = small_model.vertices(a[:, :40], a[:, 40:]) / 1000.0
    vb = small_model.vertices(b[:, :40], b[:, 40:]) / 1000.0
    want = np.sqrt(((va - vb) ** 2).reshape(3, -1).sum(1))
    g = torch.as_tensor(mesh_gram(small_model))
    got = mesh_distance(torch.as_tensor(a), torch.as_tensor(b), g, small_model.n_vertices)
    assert np.allclose(got.numpy(), want, rtol=1e-5)
    pose = rng.normal(size=(3, 12))
    basis = np.concatenate([small_model.shape_basis, small_model.expression_basis], axis=1)
    pv = posed_vertices(torch.as_tensor(pose), torch.as_tensor(a), torch.as_tensor(small_model.mean, dtype=torch.float64),
                        torch.as_tensor(basis, dtype=torch.float64)).numpy()
    p = pose.reshape(3, 3, 4)
    v = small_model.vertices(a[:, :40], a[:, 40:]).astype(np.float64)
    assert np.allclose(pv, np.einsum("bij,bnj->bni", p[:, :, :3], v) + p[:, None, :, 3], rtol=1e-4, atol=1e-2)


def test_the_generator_learns_from_the_student_only_when_joint(pipeline, tmp_path):
    data, enc, teacher = pipeline

    def gen(name, **kw):
        train_unsupervised(unsup_config(data, enc, teacher, "official", **kw), tmp_path / f"{name}.pt")
        return load_checkpoint(tmp_path / f"{name}.pt")["modules"]["generator"]

    gan = gen("gan", kd="none")
    assert same_state(gen("detached", joint_generator=False), gan)  # triplets on, the GAN terms alone
    assert not same_state(gen("joint"), gan)
    # joint with every student term weighted 0: the generator's gradients are the GAN's, bit for bit
    assert same_state(gen("zero", param_weight=0.0, mesh_weight=0.0, triplet_weight=0.0, kd_weight=0.0), gan)


def test_mesh_gram_gives_the_mean_squared_vertex_distance(small_model):
    rng = np.random.default_rng(0)
    g = mesh_gram(small_model)
    a = rng.normal(size=(3, 50)) * np.concatenate([small_model.shape_std, small_model.expression_std])
    b = a + rng.normal(size=(3, 50)) * np.concatenate([small_model.shape_std, small_model.expression_std]) * 0.3
    va = small_model.vertices(a[:, :40], a[:, 40:])
    vb = small_model.vertices(b[:, :40], b[:, 40:])
    want = (((va - vb) / 1000.0) ** 2).sum(-1).mean(-1)
    d = a - b
    assert np.allclose(np.einsum("bi,ij,bj->b", d, g, d), want, rtol=1e-6)


def test_gan_training_set_pairs_voices_with_faces_of_the_same_identity(pipeline):
    data, _, _ = pipeline
    tr = open_dataset(data).split("train")
    tset, images, face_labels = gan_training_set(tr)
    ids_img = tr.images["identity"][images]
    assert np.array_equal(tset.identities[face_labels], ids_img)
    assert np.array_equal(tset.identities[tset.labels], tr.utterances["identity"][tset.utterances])
    assert set(np.unique(face_labels)) == set(range(len(tset.names)))


def test_gan_only_mode_and_errors(pipeline, tmp_path):
    data, enc, teacher = pipeline
    gan = tmp_path / "gan.pt"
    r = train_unsupervised(unsup_config(data, enc, None, kd="none"), gan)
    c = load_checkpoint(gan)
    assert c["kind"] == "gan" and c["predictor"] == "" and set(c["modules"]) == {"encoder", "generator", "critic"}
    assert r.metrics == {}  # nothing to score without a face regressor
    # the student never feeds back into the GAN: a distillation run trains the same generator
    full = tmp_path / "full.pt"
    train_unsupervised(unsup_config(data, enc, teacher, kd="pkt"), full)
    f = load_checkpoint(full)
    assert same_state(f["modules"]["generator"], c["modules"]["generator"])
    assert same_state(f["modules"]["critic"], c["modules"]["critic"])
    with pytest.raises(ValidationError, match="no face predictor"):
        predict(gan, data, tmp_path / "x.h5", device="cpu")
    with pytest.raises(ValidationError, match="no student"):
        load_predictor(c, torch.device("cpu"))
    with pytest.raises(ValidationError, match="--teacher"):
        unsup_config(data, enc, None)
    with pytest.raises(ValidationError, match="--encoder"):
        unsup_config(data, "", teacher)
    with pytest.raises(ValidationError, match="unknown distillation"):
        unsup_config(data, enc, teacher, kd="fitnet")
    with pytest.raises(ValidationError, match="not a teacher"):
        UnsupervisedTask(unsup_config(data, enc, enc))
    with pytest.raises(ValidationError, match="no such teacher"):
        UnsupervisedTask(unsup_config(data, enc, tmp_path / "nope.pt"))


def test_cli(pipeline, tmp_path):
    from v2m_cli.train import main

    data, enc, teacher = pipeline
    runner = CliRunner()
    out = tmp_path / "cli.pt"
    args = ["unsupervised", "--data", str(data), "--out", str(out), "--encoder", str(enc), "--teacher", str(teacher),
            "--kd", "rkd", "--iterations", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0",
            "--min-frames", "16", "--max-frames", "40", "--student-width", "0.25", "--student-last-channels", "16",
            "--generator-channels", "16,16,8,8,8", "--trunk-channels", "8,8,8,8,8", "--val-every", "0", "--no-progress"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(out)
    assert ck["config"]["kd"] == "rkd" and ck["config"]["generator_channels"] == [16, 16, 8, 8, 8]
    # --resume keeps the recipe of the checkpoint (kd, widths, encoder, teacher)
    res = runner.invoke(main, ["unsupervised", "--data", str(data), "--out", str(out), "--iterations", "2", "--resume",
                               "--device", "cpu", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out)["iteration"] == 2
    sup = tmp_path / "sup.pt"
    train_supervised(sup_config(data, iterations=1), sup)
    for bad, msg in ((["--teacher", str(sup)], "not a teacher"), (["--teacher", str(tmp_path / "none.pt")], "no such"),
                     (["--kd", "pkt", "--generator-channels", "1,2"], "5 positive")):
        a = list(args)
        a[4] = str(tmp_path / "bad.pt")
        res = runner.invoke(main, a + bad)
        assert res.exit_code == 2 and msg in res.output, res.output
        assert "Traceback" not in res.output
    # --recipe official: the preset fills the options not given (the batch size is given); resume keeps it
    off = tmp_path / "off.pt"
    a = list(args)
    a[4] = str(off)
    res = runner.invoke(main, a + ["--recipe", "official", "--log-every", "1"])
    assert res.exit_code == 0, res.output
    c = load_checkpoint(off)["config"]
    assert (c["recipe"], c["batch_size"], c["param_weight"], c["mesh_space"], c["triplet_weight"], c["joint_generator"]) == (
        "official", 4, 0.0, "posed", 1.5, True)
    res = runner.invoke(main, ["unsupervised", "--data", str(data), "--out", str(off), "--iterations", "2", "--resume",
                               "--device", "cpu", "--workers", "0", "--no-progress", "--log-every", "1"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(off)["config"]["triplet_weight"] == 1.5
    m = read_metrics(tmp_path / "off.metrics.csv")
    assert m[m.metric == "loss_triplet"].iteration.tolist() == [1, 2]
    res = runner.invoke(main, ["unsupervised", "--data", str(data), "--out", str(off), "--iterations", "3", "--resume",
                               "--device", "cpu", "--workers", "0", "--no-progress", "--detach-generator"])
    assert res.exit_code == 2 and "joint_generator" in res.output, res.output
    no_teacher = [x for i, x in enumerate(args) if x != "--teacher" and (i == 0 or args[i - 1] != "--teacher")]
    no_teacher[no_teacher.index("--out") + 1] = str(tmp_path / "nt.pt")
    res = runner.invoke(main, no_teacher)
    assert res.exit_code == 2 and "error:" in res.output and "--teacher" in res.output


# ------------------------------------------------------------------------------------- DDP on CPU (gloo)
@pytest.mark.slow
def test_ddp_gloo_two_ranks_train_one_model(pipeline, tmp_path):
    import torch.multiprocessing as mp

    from tests.models.test_train_supervised import _free_port

    data, enc, teacher = pipeline
    mp.spawn(_ddp_rank, args=(2, _free_port(), str(data), str(enc), str(teacher), str(tmp_path)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in ("generator", "critic", "student", "kd"):
        assert same_state(w0[k], w1[k]), k  # gradients (and the VID regressors') were averaged
    ck = load_checkpoint(tmp_path / "ddp.pt")
    assert ck["world_size"] == 2 and ck["iteration"] == 2
    assert same_state(ck["modules"]["generator"], w0["generator"])


def _ddp_rank(rank, world, port, data, enc, teacher, out_dir):
    import os

    from v2m_models.training import fit

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    task = UnsupervisedTask(unsup_config(data, enc, teacher, kd="vid"))
    fit(task, os.path.join(out_dir, "ddp.pt"))
    torch.save({k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in task.modules.items()},
               os.path.join(out_dir, f"rank{rank}.pt"))
