"""``v2m-bench toy``: toy benchmark files from the model's statistics, deterministic, scoreable."""

import numpy as np
from click.testing import CliRunner

from v2m_bench import read_predictions, read_references, score
from v2m_bench.scoring import ScoreConfig
from v2m_cli.bench import main


def test_toy_files_are_deterministic_and_complete(small_model, tmp_path):
    npz = tmp_path / "model.npz"
    small_model.save(npz)
    for d in ("a", "b"):
        res = CliRunner().invoke(main, ["toy", "--out", str(tmp_path / d), "--bfm", str(npz), "--identities", "4"])
        assert res.exit_code == 0, res.output
    ra, rb = read_references(tmp_path / "a" / "references.h5", n_vertices=None), read_references(tmp_path / "b" / "references.h5", n_vertices=None)
    assert ra.identity.tolist() == rb.identity.tolist() and len(ra.identity) == 4
    assert np.array_equal(ra.shape, rb.shape)
    for name in ("good", "noisy"):
        pa = read_predictions(tmp_path / "a" / f"{name}.h5", n_vertices=None)
        assert np.array_equal(pa.shape, read_predictions(tmp_path / "b" / f"{name}.h5", n_vertices=None).shape)
        assert sorted(set(pa.identity.tolist())) == sorted(ra.identity.tolist()) and len(pa.identity) == 12
    good = read_predictions(tmp_path / "a" / "good.h5", n_vertices=None)
    noisy = read_predictions(tmp_path / "a" / "noisy.h5", n_vertices=None)
    truth = np.repeat(ra.shape, 3, axis=0)
    assert np.abs(good.shape - truth).mean() < np.abs(noisy.shape - truth).mean()
    res = CliRunner().invoke(main, ["toy", "--out", str(tmp_path / "c"), "--bfm", str(npz), "--identities", "0"])
    assert res.exit_code == 2 and "--identities" in res.output


def test_the_good_toy_model_scores_better(bfm, bfm_dir, tmp_path):
    res = CliRunner().invoke(main, ["toy", "--out", str(tmp_path), "--bfm", str(bfm_dir), "--identities", "5"])
    assert res.exit_code == 0, res.output
    cfg = ScoreConfig(bootstrap=0, chance=False)
    good = score(tmp_path / "good.h5", tmp_path / "references.h5", bfm, config=cfg).metrics
    noisy = score(tmp_path / "noisy.h5", tmp_path / "references.h5", bfm, config=cfg).metrics
    assert good["ARE_mean"].value < noisy["ARE_mean"].value and good["NME"].value < noisy["NME"].value
