"""v2m_models.data: crops, batch plans, banks, loaders, targets, test-utterance selection.

The build-backed tests use a tiny synthetic world rendered with the small random model
(conftest.make_small_model), so they need nothing outside the repository.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import make_small_model
from v2m_bench.errors import ValidationError
from v2m_data.building import BuildConfig, build
from v2m_data.shards import open_dataset
from v2m_data.synth import make_world
from v2m_models.data import (
    BatchPlanner,
    CoefficientStats,
    CropConfig,
    DeviceVoiceBatches,
    FaceBank,
    FeatureBank,
    TargetRule,
    VoiceBatches,
    crop_rows,
    identity_targets,
    make_loader,
    pad_batch,
    select_test_utterances,
    training_set,
    utterance_ids,
)


def build_tiny(root, n=8, seed=0, crop_sizes=(32, 64), **world):
    """A tiny world with the small model, built (face crops of ``crop_sizes``); returns the build folder."""
    model = make_small_model(0)
    opts = dict(images_per_identity=3, videos_per_identity=2, utterances_per_video=2, duration=(0.8, 1.4),
                 image_size=64, supersample=1)
    opts.update(world)
    make_world(root / "w", n, seed, model, progress=False, **opts)
    npz = root / "model.npz"
    model.save(npz)
    out = root / "build"
    build(BuildConfig(voxceleb=str(root / "w"), vggface=str(root / "w" / "vggface"), out=str(out), bfm=str(npz),
                      detector="precomputed", crop_sizes=tuple(crop_sizes), identities_per_shard=3, progress=False),
          log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


# ------------------------------------------------------------------------------------- crops
def test_crop_rows_loop_short_utterances_and_match_torch():
    off = np.array([0, 10, 13])
    n = np.array([10, 3, 7])
    starts = np.array([2, 1, 0])
    rows = crop_rows(off, n, starts, 5)
    assert rows.tolist() == [[2, 3, 4, 5, 6], [11, 12, 10, 11, 12], [13, 14, 15, 16, 17]]
    t = crop_rows(torch.as_tensor(off), torch.as_tensor(n), torch.as_tensor(starts), 5)
    assert isinstance(t, torch.Tensor) and t.tolist() == rows.tolist()


def test_crop_config_validates():
    with pytest.raises(ValidationError):
        CropConfig(10, 5)
    with pytest.raises(ValidationError):
        CropConfig(0, 5)


# ------------------------------------------------------------------------------------- planner
def test_planner_epochs_cover_every_item_once_and_are_seeded():
    n = np.full(10, 50)
    p = BatchPlanner(n, 5, CropConfig(20, 30), seed=3)
    first = np.concatenate([p.plan(i).items for i in range(2)])
    assert sorted(first.tolist()) == list(range(10))  # epoch 0 = a permutation
    second = np.concatenate([p.plan(i).items for i in range(2, 4)])
    assert sorted(second.tolist()) == list(range(10))
    assert first.tolist() != second.tolist()  # a fresh permutation per epoch
    again = BatchPlanner(n, 5, CropConfig(20, 30), seed=3)
    for i in (0, 7, 3):  # any order: a pure function of (seed, iteration)
        a, b = p.plan(i), again.plan(i)
        assert a.items.tolist() == b.items.tolist() and a.length == b.length and a.starts.tolist() == b.starts.tolist()
    other = BatchPlanner(n, 5, CropConfig(20, 30), seed=4)
    assert any(other.plan(i).items.tolist() != p.plan(i).items.tolist() for i in range(3))


def test_planner_crop_lengths_and_starts():
    n = np.array([5, 40, 100, 33])
    p = BatchPlanner(n, 4, CropConfig(30, 60), seed=0)
    lengths = set()
    for i in range(200):
        pl = p.plan(i)
        lengths.add(pl.length)
        assert 30 <= pl.length <= 60
        nn = n[pl.items]
        assert np.all(pl.starts >= 0) and np.all(pl.starts < nn)
        long = nn >= pl.length
        assert np.all(pl.starts[long] + pl.length <= nn[long])  # long utterances are not looped
    assert len(lengths) > 10


def test_planner_ranks_split_the_global_batch():
    n = np.arange(20) + 40
    single = BatchPlanner(n, 8, CropConfig(10, 30), seed=5)
    ranks = [BatchPlanner(n, 8, CropConfig(10, 30), seed=5, rank=r, world_size=2) for r in range(2)]
    for i in range(6):
        s = single.plan(i)
        parts = [r.plan(i) for r in ranks]
        assert np.concatenate([q.items for q in parts]).tolist() == s.items.tolist()
        assert np.concatenate([q.starts for q in parts]).tolist() == s.starts.tolist()
        assert {q.length for q in parts} == {s.length}
    with pytest.raises(ValidationError):
        BatchPlanner(n, 7, CropConfig(10, 30), seed=5, rank=0, world_size=2)


def test_identity_sampling_is_balanced():
    groups = np.array([0] * 18 + [1, 2])  # identity 0 has most utterances
    p = BatchPlanner(np.full(20, 50), 10, CropConfig(10, 20), seed=0, sampling="identity", groups=groups)
    g = np.concatenate([groups[p.plan(i).items] for i in range(300)])
    frac = np.bincount(g, minlength=3) / len(g)
    assert np.all(np.abs(frac - 1 / 3) < 0.05)
    u = BatchPlanner(np.full(20, 50), 10, CropConfig(10, 20), seed=0, groups=groups)
    gu = np.concatenate([groups[u.plan(i).items] for i in range(30)])
    assert np.bincount(gu)[0] / len(gu) == pytest.approx(0.9)


# ------------------------------------------------------------------------------------- stats, targets
def test_coefficient_stats_round_trip_numpy_and_torch():
    rng = np.random.default_rng(0)
    t = rng.normal(5.0, 3.0, (30, 50)).astype(np.float32)
    t[3] = np.nan
    st = CoefficientStats.fit(t)
    z = st.normalise(t[~np.isnan(t).any(1)])
    assert np.allclose(z.mean(0), 0, atol=1e-5) and np.allclose(z.std(0), 1, atol=1e-4)
    back = st.denormalise(torch.as_tensor(z))
    assert isinstance(back, torch.Tensor)
    assert np.allclose(back.numpy(), t[~np.isnan(t).any(1)], atol=1e-4)
    assert CoefficientStats.from_dict(st.to_dict()) == st
    with pytest.raises(ValidationError):
        CoefficientStats.fit(t[:1])


def _fake_split(identity, shape, expression, pose, rn, paths=None):
    m = len(identity)
    return SimpleNamespace(
        n_identities=int(max(identity)) + 1 if m else 0,
        n_images=m,
        images={"identity": np.asarray(identity), "path": np.asarray(paths or [f"x/{i:03d}.jpg" for i in range(m)], object)},
        fit={"shape": np.asarray(shape, np.float32), "expression": np.asarray(expression, np.float32),
             "pose": np.asarray(pose, np.float32), "residual_normalized": np.asarray(rn, np.float32)},
    )


def test_identity_targets_median_of_frontal_good_fits():
    # identity 0: three frontal fits + one profile (excluded); identity 1: only a profile;
    # identity 2: one frontal fit with a bad residual and one NaN fit
    shape = np.zeros((7, 40))
    shape[:, 0] = [1.0, 2.0, 10.0, 100.0, 7.0, 5.0, np.nan]
    expr = np.zeros((7, 10))
    expr[:, 1] = [0.1, 0.3, 0.2, 9.0, 1.0, 2.0, 0.0]
    pose = np.zeros((7, 3))
    pose[3, 0] = 40.0  # profile
    pose[4, 0] = -30.0
    rn = np.array([0.01, 0.02, 0.03, 0.01, 0.01, 0.2, 0.01])
    split = _fake_split([0, 0, 0, 0, 1, 2, 2], shape, expr, pose, rn)
    t, nf = identity_targets(split)
    assert nf.tolist() == [3, 0, 0]
    assert t[0, 0] == 2.0 and t[0, 41] == pytest.approx(0.2)
    assert np.isnan(t[1]).all() and np.isnan(t[2]).all()
    tf, nff = identity_targets(split, TargetRule(fallback=True))
    assert nff.tolist() == [3, 1, 1] and tf[1, 0] == 7.0 and tf[2, 0] == 5.0  # the NaN fit never counts
    # the reference rule picks one of the candidates: the one closest to the median, near-neutral
    tr, nr = identity_targets(split, TargetRule(method="reference"), np.ones(40), np.ones(10))
    assert nr.tolist() == [1, 0, 0] and tr[0, 0] == 2.0
    with pytest.raises(ValidationError):
        identity_targets(split, TargetRule(method="reference"))
    with pytest.raises(ValidationError):
        TargetRule(method="mean")


# ------------------------------------------------------------------------------------- build-backed
def test_feature_bank_ram_and_memmap_match_the_stored_features(tiny):
    split = open_dataset(tiny).split("train")
    utt = np.arange(split.n_utterances)[::-1].copy()
    ram = FeatureBank(split, utt)
    mm = FeatureBank(split, utt, in_memory=False)
    for k in range(len(utt)):
        ref = split.utterance_features(int(utt[k]))
        assert np.array_equal(ram.utterance(k), ref) and np.array_equal(mm.utterance(k), ref)
    items = np.array([0, 3, 5, 1])
    n = ram.n_frames[items]
    starts = n // 3
    L = int(n.max()) + 7  # longer than every utterance: looped
    a, b = ram.crops(items, starts, L), mm.crops(items, starts, L)
    assert a.shape == (4, 64, L) and np.array_equal(a, b)
    for j, k in enumerate(items):
        full = split.utterance_features(int(utt[k]))
        want = full[:, (starts[j] + np.arange(L)) % full.shape[1]]
        assert np.array_equal(a[j], want)


def test_loader_batches_do_not_depend_on_workers_and_resume_anywhere(tiny):
    split = open_dataset(tiny).split("train")
    ts = training_set(split)
    bank = FeatureBank(split, ts.utterances)
    planner = BatchPlanner(bank.n_frames, 4, CropConfig(20, 60), seed=1)
    vb = VoiceBatches(bank, planner, labels=ts.labels)
    seq0 = list(make_loader(vb, 0, 6, workers=0))
    seq2 = list(make_loader(vb, 0, 6, workers=2, seed=9))
    tail = list(make_loader(vb, 3, 6, workers=0))
    for a, b in zip(seq0, seq2):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(seq0[3:], tail):
        assert all(torch.equal(a[k], b[k]) for k in a)
    x = seq0[0]
    assert x["features"].dtype == torch.float32 and x["features"].shape[:2] == (4, 64)
    assert torch.equal(x["label"], torch.as_tensor(ts.labels[x["item"].numpy()]))
    # the device bank (here on the CPU) cuts the same batches
    dev = DeviceVoiceBatches(vb, "cpu")
    for i, b in enumerate(dev.iterate(0, 6)):
        assert all(torch.equal(b[k], seq0[i][k]) for k in seq0[i])
    half = DeviceVoiceBatches(vb, "cpu", dtype=torch.float16).batch(2)["features"]
    assert half.dtype == torch.float32 and torch.allclose(half, seq0[2]["features"], atol=2e-3, rtol=1e-3)


def test_targets_faces_and_shuffled_pairs(tiny):
    split = open_dataset(tiny).split("train")
    # the small random model's fits have poorly determined poses: take every valid fit
    rule = TargetRule(fallback=True)
    ts = training_set(split, with_targets=True, rule=rule)
    assert len(ts.names) >= 3 and np.isfinite(ts.targets).all() and (ts.n_fits > 0).all()
    assert set(np.unique(ts.labels)) == set(range(len(ts.names)))
    assert all(split.utterances["identity"][u] == ts.identities[lab] for u, lab in zip(ts.utterances, ts.labels))
    sh = training_set(split, with_targets=True, rule=rule, shuffle_pairs=True, seed=0)
    assert sh.shuffled and sh.names == ts.names
    assert sorted(map(tuple, sh.targets.tolist())) == sorted(map(tuple, ts.targets.tolist()))
    assert not np.array_equal(sh.targets, ts.targets)
    st = CoefficientStats.fit(ts.targets)
    st_sh = CoefficientStats.fit(sh.targets)  # a permutation keeps the statistics
    assert np.allclose(st_sh.mean, st.mean, rtol=1e-9) and np.allclose(st_sh.std, st.std, rtol=1e-9)
    bank = FeatureBank(split, ts.utterances)
    faces = FaceBank(split, 32, np.flatnonzero(np.isin(split.images["identity"], ts.identities)))
    label_of = {int(i): k for k, i in enumerate(ts.identities)}
    planner = BatchPlanner(bank.n_frames, 6, CropConfig(20, 40), seed=0, groups=ts.labels,
                           face_groups=[label_of[int(i)] for i in faces.identity])
    vb = VoiceBatches(bank, planner, labels=ts.labels, targets=st.normalise(ts.targets), faces=faces)
    b = vb[0]
    assert b["face"].shape == (6, 3, 32, 32) and float(b["face"].min()) >= -1 and float(b["face"].max()) <= 1
    img_id = faces.identity[b["face_item"].numpy()]
    assert np.array_equal(ts.identities[b["label"].numpy()], img_id)  # a face of the same person
    assert torch.allclose(b["target"], torch.as_tensor(st.normalise(ts.targets)[b["label"].numpy()]))
    with pytest.raises(ValidationError):
        FaceBank(split, 120)


def test_select_test_utterances_sorted_by_video_then_utterance():
    paths = np.array(["id1/vB/00001.wav", "id1/vA/00002.wav", "id1/vA/00001.wav", "id1/vC/00001.wav",
                      "id2/zz/00003.wav", "id2/aa/00009.wav"], object)
    split = SimpleNamespace(
        identities={"name": np.array(["Ann_X", "Bob_Y", "Cid_Z"], object)},
        utterances={"identity": np.array([0, 0, 0, 0, 1, 1]), "path": paths},
    )
    names, utts, ids = select_test_utterances(split, 3)
    assert names == ["Ann_X"] * 3 + ["Bob_Y"] * 2
    assert utts.tolist() == [2, 1, 0, 5, 4]
    assert ids == ["vA_00001", "vA_00002", "vB_00001", "aa_00009", "zz_00003"]
    names, utts, _ = select_test_utterances(split, 1, names=["Bob_Y", "Nobody"])
    assert names == ["Bob_Y"] and utts.tolist() == [5]
    assert utterance_ids(["id10001/1TmvLk8sB-g/00001.wav"]) == ["1TmvLk8sB-g_00001"]


def test_pad_batch_pads_and_truncates():
    a, b = np.ones((64, 5), np.float32), 2 * np.ones((64, 3), np.float32)
    x, n = pad_batch([a, b])
    assert x.shape == (2, 64, 5) and n.tolist() == [5, 3]
    assert float(x[1, :, 3:].abs().sum()) == 0 and float(x[1, :, :3].mean()) == 2
    x, n = pad_batch([a, b], max_frames=4)
    assert x.shape == (2, 64, 4) and n.tolist() == [4, 3]
    with pytest.raises(ValidationError):
        pad_batch([])
