"""v2m_models.predict and v2m-predict: the benchmark's utterances, whole, de-normalised, in
v2m_bench's predictions format; predictor selection by checkpoint kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.models.test_models_data import build_tiny
from tests.models.test_train_supervised import enc_config, sup_config
from v2m_bench.errors import ValidationError
from v2m_bench.formats import read_predictions
from v2m_data.shards import open_dataset
from v2m_models.data import CoefficientStats
from v2m_models.predict import predict, resolve_predictor, prediction_selection
from v2m_models.supervised import load_predictor, train_supervised, train_voice_encoder
from v2m_models.training import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    # more test identities than the default quarter, and three videos per identity
    data = build_tiny(root, n=8, seed=2, test_fraction=0.5, videos_per_identity=3)
    ck = root / "sup.pt"
    train_supervised(sup_config(data, iterations=3), ck)
    return data, ck


def test_predictions_follow_the_protocol_and_the_model(trained, tmp_path):
    data, ck = trained
    out = tmp_path / "p.h5"
    res = predict(ck, data, out, device="cpu", batch_size=3)
    p = read_predictions(out, n_vertices=None)
    ds = open_dataset(data)
    refs = ds.references()
    assert p.model == "sup.pt" and p.attrs["checkpoint_kind"] == "supervised" and p.attrs["checkpoint_iteration"] == 3
    # three utterances per reference identity: the first three by video id then utterance id
    test = ds.split("test")
    assert sorted(set(p.identity.tolist())) == sorted(refs.identity.tolist())
    assert res.n_predictions == len(p.identity) == 3 * len(refs.identity)
    for name in refs.identity:
        n = int(np.flatnonzero(test.identities["name"] == name)[0])
        paths = sorted(test.utterances["path"][test.utterances_of(n)],
                       key=lambda s: (s.split("/")[-2], s.split("/")[-1]))[:3]
        want = ["_".join(q.split("/")[-2:])[: -len(".wav")] for q in paths]
        assert p.utterance[p.identity == name].tolist() == want
    # values: the model on each whole utterance alone, de-normalised by the checkpoint's statistics
    c = load_checkpoint(ck)
    pred = load_predictor(c, torch.device("cpu"))
    stats = CoefficientStats.from_dict(c["task"]["stats"])
    _, _, utts, ids, _ = prediction_selection(ds)
    assert ids == p.utterance.tolist()
    with torch.no_grad():
        for row, u in enumerate(utts):
            x = torch.as_tensor(test.utterance_features(int(u)))[None]
            z = pred.model(x)["coefficients"].numpy()
            c50 = stats.denormalise(z)[0]
            assert np.allclose(p.shape[row], c50[:40], rtol=1e-4, atol=1e-3 * np.abs(c50[:40]).max())
            assert np.allclose(p.expression[row], c50[40:], rtol=1e-4, atol=1e-3 * np.abs(c50[40:]).max() + 1e-6)
    # not all the same (the model depends on the voice), and on the scale of the training targets
    assert np.ptp(p.shape[:, 0]) > 0
    assert np.abs(np.log(np.abs(p.shape).mean() / np.abs(np.asarray(stats.mean[:40])).mean())) < np.log(100)


def test_per_identity_and_identity_choice(trained, tmp_path):
    data, ck = trained
    one = predict(ck, data, tmp_path / "one.h5", device="cpu", per_identity=1)
    assert one.n_predictions == one.n_identities
    names = [str(x) for x in open_dataset(data).split("test").identities["name"]]
    allp = predict(ck, data, tmp_path / "all.h5", device="cpu", identities=names + ["Zz_Nobody"])
    assert allp.n_identities == len(names) and allp.missing == ["Zz_Nobody"]


def test_checkpoints_without_a_face_predictor_are_refused(trained, tmp_path):
    data, ck = trained
    enc = tmp_path / "enc.pt"
    train_voice_encoder(enc_config(data, iterations=1), enc)
    with pytest.raises(ValidationError, match="no face predictor"):
        predict(enc, data, tmp_path / "x.h5", device="cpu")
    c = load_checkpoint(ck)
    for bad in ("os:system", "v2m_models.supervised:no_such_function", "v2m_models_evil.x:y"):
        with pytest.raises(ValidationError, match="predictor"):
            resolve_predictor({**c, "predictor": bad}, torch.device("cpu"))
    assert not (tmp_path / "x.h5").exists()


def test_cli(trained, tmp_path):
    from v2m_cli.predict import main

    data, ck = trained
    runner = CliRunner()
    out = tmp_path / "cli.h5"
    res = runner.invoke(main, ["--checkpoint", str(ck), "--data", str(data), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "predictions for" in res.output and out.is_file()
    assert read_predictions(out, n_vertices=None).model == "sup.pt"
    res = runner.invoke(main, ["--checkpoint", str(ck), "--data", str(data)])
    assert res.exit_code == 2 and "--out" in res.output
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, {"nothing": 1})
    res = runner.invoke(main, ["--checkpoint", str(bad), "--data", str(data), "--out", str(tmp_path / "y.h5")])
    assert res.exit_code == 2 and "error:" in res.output and "not a v2m-checkpoint" in res.output
