"""HDF5 shards: round trip, byte reproducibility, atomic writes, the torch-free reader."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest

from v2m_bench.errors import ValidationError
from v2m_data.shards import (
    ShardContent,
    ShardFile,
    open_dataset,
    read_shard_report,
    shard_fingerprint_matches,
    write_shard,
)


def _content(seed: int, split: str = "train", index: int = 0, n_id: int = 2) -> ShardContent:
    rng = np.random.default_rng(seed)
    frames = rng.integers(3, 40, size=5)
    feats = rng.normal(size=(int(frames.sum()), 64)).astype(np.float32)
    m = 4
    return ShardContent(
        split=split,
        index=index,
        fingerprint=f"fp-{seed}",
        identities=[
            {"vox_id": f"id{10001 + seed * 10 + i}", "name": n, "gender": g, "key": n}
            for i, (n, g) in enumerate([("Zoë_X", "f"), ("Bob_Y", "m")][:n_id])
        ],
        utterances={
            "identity": np.array([0, 0, 1, 1, 1], np.int32),
            "path": np.array([f"id1/v/{i:05d}.wav" for i in range(5)], dtype=object),
            "duration": rng.uniform(1, 5, 5).astype(np.float32),
            "voiced_duration": rng.uniform(1, 4, 5).astype(np.float32),
            "n_frames": frames.astype(np.int64),
            "offset": np.concatenate([[0], np.cumsum(frames)[:-1]]).astype(np.int64),
            "features": feats,
        },
        images={
            "identity": np.array([0, 1, 1, 1], np.int32),
            "image_id": np.array([f"{i:08d}" for i in range(m)], dtype=object),
            "path": np.array([f"Zoë_X/{i:08d}.jpg" for i in range(m)], dtype=object),
            "box": rng.uniform(0, 100, (m, 4)).astype(np.float32),
            "annotated_pose": np.array([3, 1, np.nan, 2], np.float32),
            "landmarks": rng.uniform(0, 100, (m, 68, 2)).astype(np.float32),
            "crop_box": rng.uniform(0, 100, (m, 4)).astype(np.float32),
            "crop64": rng.integers(0, 256, (m, 64, 64, 3)).astype(np.uint8),
            "crop120": rng.integers(0, 256, (m, 120, 120, 3)).astype(np.uint8),
        },
        fit={
            "shape": rng.normal(size=(m, 40)).astype(np.float32),
            "expression": rng.normal(size=(m, 10)).astype(np.float32),
            "scale": rng.uniform(size=m).astype(np.float32),
            "rotation": np.tile(np.eye(3, dtype=np.float32), (m, 1, 1)),
            "translation": rng.normal(size=(m, 2)).astype(np.float32),
            "pose": rng.normal(size=(m, 3)).astype(np.float32),
            "residual": rng.uniform(size=m).astype(np.float32),
            "residual_normalized": rng.uniform(size=m).astype(np.float32),
            "converged": np.array([True, False, True, True]),
        },
        report={"shard": f"{split}-{index:05d}", "counts": {"utterances_ok": 5}, "failures": [{"stage": "audio", "item": "x.wav", "reason": "ünïcode reason"}]},
        n_mels=64,
        crop_sizes=(64, 120),
        landmark_dims=2,
    )


def _md5(p):
    return hashlib.md5(p.read_bytes()).hexdigest()


def test_round_trip_through_open_dataset(tmp_path):
    c0, c1 = _content(0), _content(1, index=1)
    t = _content(2, split="test", n_id=1)
    t.utterances["identity"][:] = 0
    t.images["identity"][:] = 0
    write_shard(tmp_path / "shards" / "train-00000.h5", c0)
    write_shard(tmp_path / "shards" / "train-00001.h5", c1)
    write_shard(tmp_path / "shards" / "test-00000.h5", t)
    ds = open_dataset(tmp_path)
    assert ds.manifest is None and ds.splits == ["test", "train"]
    assert [s.path.name for s in ds.shards] == ["test-00000.h5", "train-00000.h5", "train-00001.h5"]
    tr = ds.split("train")
    assert (tr.n_identities, tr.n_utterances, tr.n_images) == (4, 10, 8)
    assert list(tr.identities["name"]) == ["Zoë_X", "Bob_Y", "Zoë_X", "Bob_Y"]
    # identity numbers are global: the second shard's rows point at identities 2 and 3
    assert tr.utterances["identity"].tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert tr.images["identity"].tolist() == [0, 1, 1, 1, 2, 3, 3, 3]
    for k, c in ((0, c0), (1, c1)):
        for u in range(5):
            o, n = int(c.utterances["offset"][u]), int(c.utterances["n_frames"][u])
            got = tr.utterance_features(5 * k + u)
            assert got.shape == (64, n) and got.dtype == np.float32
            np.testing.assert_array_equal(got, c.utterances["features"][o : o + n].T)
    view = tr.utterance_features(7, copy=False)
    assert isinstance(view, np.memmap)  # read from the file's pages, not a copy
    assert not view.flags.writeable
    crops = tr.crops([7, 0, 4], size=120)
    np.testing.assert_array_equal(crops[0], c1.images["crop120"][3])
    np.testing.assert_array_equal(crops[1], c0.images["crop120"][0])
    np.testing.assert_array_equal(crops[2], c1.images["crop120"][0])
    assert tr.crops([1], 64).shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(tr.fit["shape"][4:], c1.fit["shape"])
    assert tr.fit["converged"].dtype == bool and tr.fit["converged"].tolist()[:4] == [True, False, True, True]
    assert np.isnan(tr.images["annotated_pose"][2])
    assert tr.images["path"][0] == "Zoë_X/00000000.jpg"
    assert tr.images_of(3).tolist() == [5, 6, 7] and tr.utterances_of(2).tolist() == [5, 6]
    te = ds.split("test")
    assert (te.n_identities, te.n_utterances) == (1, 5)
    assert ds.failures()[0]["reason"] == "ünïcode reason"
    # the reader pickles without its memory maps (a DataLoader worker reopens them)
    tr2 = pickle.loads(pickle.dumps(ds)).split("train")
    np.testing.assert_array_equal(tr2.utterance_features(3), tr.utterance_features(3))


def test_same_content_same_bytes(tmp_path):
    a = write_shard(tmp_path / "a.h5", _content(3))
    b = write_shard(tmp_path / "b.h5", _content(3))
    assert _md5(a) == _md5(b)
    c = write_shard(tmp_path / "c.h5", _content(4))
    assert _md5(a) != _md5(c)
    assert read_shard_report(a)["failures"][0]["reason"] == "ünïcode reason"


def test_write_is_atomic(tmp_path):
    good = write_shard(tmp_path / "s.h5", _content(5))
    before = _md5(good)
    bad = _content(6)
    bad.report = {"not json": object()}  # fails after every dataset has been written
    with pytest.raises(TypeError):
        write_shard(tmp_path / "s.h5", bad)
    assert _md5(good) == before  # the old file survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no temporary left behind


def test_fingerprint_check_and_damaged_files(tmp_path):
    p = write_shard(tmp_path / "s.h5", _content(7))
    assert shard_fingerprint_matches(p, "fp-7")
    assert not shard_fingerprint_matches(p, "fp-8")
    assert not shard_fingerprint_matches(tmp_path / "missing.h5", "fp-7")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert not shard_fingerprint_matches(p, "fp-7")
    with pytest.raises(ValidationError, match="truncated or damaged"):
        ShardFile(p)


def test_empty_shard(tmp_path):
    c = _content(8)
    c.utterances = {k: v[:0] for k, v in c.utterances.items()}
    c.utterances["features"] = np.zeros((0, 64), np.float32)
    c.images = {k: v[:0] for k, v in c.images.items()}
    c.fit = {k: v[:0] for k, v in c.fit.items()}
    write_shard(tmp_path / "shards" / "train-00000.h5", c)
    tr = open_dataset(tmp_path).split("train")
    assert (tr.n_identities, tr.n_utterances, tr.n_images) == (2, 0, 0)
    assert tr.crops([], 64).shape == (0, 64, 64, 3)
    assert tr.shards[0].features_array().shape == (0, 64)
