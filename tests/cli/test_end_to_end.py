"""End to end on the synthetic world: build -> train supervised -> predict -> score.

A CI-sized version of examples/synthetic_end_to_end.sh. A world of
``N_IDENTITIES`` made-up people on the real BFM (v2m_data.synth) is built with the precomputed
landmarks (v2m_data.building); a tiny supervised model (v2m_models.supervised) is trained from
scratch on its F-Z identities, predicts the A-E identities' faces from their voices
(v2m_models.predict, three utterances per identity as the benchmark), and v2m_bench.scoring scores
them against the build's references beside the mean face.

The claims, each with a 95 % paired bootstrap interval over the test identities of
``ER(mean face) - ER(model)`` (positive = the model is better):

- the supervised model beats the mean face on ER: the interval lies above zero;
- the same model trained on shuffled voice/target pairs does not: its interval reaches zero or
  lies below it.

Why the world is set up as it is (all through :class:`v2m_data.synth.SynthConfig` options; the
defaults are untouched):

- ``gender_width_shift=1.5`` (default 0.4): the voice link of the default world was too weak to
  learn from 32 training identities (the interval crossed zero in the world tried; at 180
  training identities the default world is learnt, see examples/synthetic_end_to_end.sh). With
  men's and women's mean shapes 3 standard deviations apart along the width direction, gender
  (which the voice's pitch and formants reveal) predicts ER.
- ``test_fraction=0.5``: ~40 test identities, enough for the interval to be informative.
- ``female_fraction=0.5``: the population's mean face is the model's mean face in expectation,
  so a predictor of the population mean has no edge over the mean face.

The model: encoder widths (64, 32, 32, 32, 32, 4), i.e. a 4-d embedding. From so few identities
a wide embedding memorises each training speaker's face (training loss falls, test error rises,
and memorised wrong faces are worse than the mean face); the narrow one can only carry what
generalises (gender, and a little face width).

The shuffled control uses ``shuffle_mode="iteration"`` (a fresh permutation of the
identity -> target pairing every iteration). A single fixed permutation of ~40 identities leaves a
chance correlation between the voices' and their wrong targets' genders (of order
``1 / sqrt(40)``); a model learns it and beat the mean face with it (interval above zero) in 2 of
11 runs tried (3 worlds of 80-96 identities, 3-5 training seeds each); with the permutation re-drawn every iteration,
in none of the same 11. Re-drawing leaves the voices no information about their targets.

Everything is seeded (``SEED``); the assertions were checked with world/training seeds 1, 2 and 3.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.shared]

#: World and training seed (the claims held for 1, 2 and 3; override with V2M_E2E_SEED).
SEED = int(os.environ.get("V2M_E2E_SEED", "1"))
N_IDENTITIES = 80
WORLD = dict(images_per_identity=2, videos_per_identity=2, utterances_per_video=2, duration=(1.5, 2.5), image_size=64,
             supersample=1, test_fraction=0.5, female_fraction=0.5, gender_width_shift=1.5)
TRAIN = dict(iterations=300, batch_size=16, lr=2e-3, device="cpu", workers=0, min_frames=100, max_frames=200,
             encoder_channels=(64, 32, 32, 32, 32, 4), log_every=50, val_every=0, ckpt_every=0, progress=False,
             target_fallback=True)
N_BOOT = 2000


@pytest.fixture(scope="module")
def world(tmp_path_factory, bfm, bfm_dir):
    """The built synthetic world: (root, build folder, truth.h5)."""
    from v2m_data.building import BuildConfig, build
    from v2m_data.synth import make_world

    root = tmp_path_factory.mktemp("e2e")
    summary = make_world(root / "world", N_IDENTITIES, SEED, bfm, progress=False, **WORLD)
    out = root / "build"
    build(BuildConfig(voxceleb=str(root / "world"), vggface=str(root / "world" / "vggface"), out=str(out),
                      bfm=str(bfm_dir), detector="precomputed", crop_sizes=(32,), identities_per_shard=32, progress=False),
          log=lambda s: None)
    return root, out, summary


@pytest.fixture(scope="module")
def runs(world):
    """Train, predict and score the model and the shuffled control: {name: (checkpoint, predictions, fit result)}."""
    import torch

    from v2m_models.predict import predict
    from v2m_models.supervised import SupervisedConfig, train_supervised

    root, data, _ = world
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: threads cost more than they give (and the order of sums stays fixed)
    try:
        out = {}
        for name, extra in (("model", {}), ("shuffled", dict(shuffle_pairs=True, shuffle_mode="iteration"))):
            ck = root / f"{name}.pt"
            res = train_supervised(SupervisedConfig(data=str(data), seed=SEED, **TRAIN, **extra), ck, log=lambda s: None)
            pred = root / f"{name}.h5"
            predict(ck, data, pred, device="cpu")
            out[name] = (ck, pred, res)
    finally:
        torch.set_num_threads(threads)
    return out


def per_identity_er(predictions, references, bfm):
    """ER of every identity (mean over its predictions), as v2m_bench.scoring aggregates it.

    Returns
    -------
    names : ndarray of str, sorted
    er : ndarray (n,) float64
    """
    from v2m_bench import metrics
    from v2m_bench.formats import read_predictions, read_references

    p = read_predictions(predictions)
    r = read_references(references)
    row = {n: i for i, n in enumerate(np.asarray(r.identity).astype(str))}
    ids = np.asarray(p.identity).astype(str)
    ref_v = r.to_vertices(bfm, np.array([row[n] for n in ids]))
    er = metrics.are(p.to_vertices(bfm, np.arange(len(ids))), ref_v)["ER"]
    names, inv = np.unique(ids, return_inverse=True)
    return names, np.bincount(inv, weights=er) / np.bincount(inv)


def improvement(mean_face_er, model_er):
    """Mean of ``mean_face_er - model_er`` over identities and its 95 % paired bootstrap interval."""
    from v2m_bench.stats import bootstrap_ci

    d, lo, hi = bootstrap_ci(np.asarray(mean_face_er) - np.asarray(model_er), n_boot=N_BOOT, seed=SEED)
    return float(d), float(lo), float(hi)


def test_the_build_has_both_sides_and_references(world, runs):
    from v2m_bench.formats import read_references
    from v2m_models.training import load_checkpoint

    _, data, summary = world
    refs = read_references(data / "references.h5")
    assert summary.n_test >= 30 and len(refs.identity) >= 0.9 * summary.n_test
    ck = load_checkpoint(runs["model"][0])
    assert len(ck["task"]["classes"]) >= 0.9 * summary.n_train and ck["task"]["shuffled"] is False
    sh = load_checkpoint(runs["shuffled"][0])
    assert sh["task"]["shuffled"] is True and sh["task"]["shuffle_mode"] == "iteration"


def test_supervised_model_beats_the_mean_face_on_er(world, runs, bfm):
    from v2m_bench.scoring import ScoreConfig, score

    _, data, _ = world
    _, pred, res = runs["model"]
    report = score(pred, data / "references.h5", bfm, config=ScoreConfig(bootstrap=N_BOOT, seed=SEED))
    model = report.per_identity["ER"]
    mean_face = report.chance_per_identity["ER"].reindex(model.index)
    assert report.n_identities >= 30 and report.n_predictions == 3 * report.n_identities and not report.missing
    d, lo, hi = improvement(mean_face.to_numpy(), model.to_numpy())
    print(f"\nER model {report.metrics['ER'].value:.4f} [{report.metrics['ER'].ci_low:.4f}, {report.metrics['ER'].ci_high:.4f}]"
          f", mean face {report.chance['ER'].value:.4f}; improvement {d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
          f" over {report.n_identities} identities; ARE_mean {report.metrics['ARE_mean'].value:.4f}"
          f" (mean face {report.chance['ARE_mean'].value:.4f})")
    assert lo > 0, (d, lo, hi)
    # the training loop's own validation (same references, same three utterances) agrees
    assert res.metrics["ER"] < res.metrics["ER_meanface"]
    assert res.metrics["ER"] == pytest.approx(report.metrics["ER"].value, rel=1e-3)
    # the scorer's ER is what per_identity_er computes (so the control below is scored the same way)
    names, er = per_identity_er(pred, data / "references.h5", bfm)
    assert names.tolist() == model.index.tolist()
    np.testing.assert_allclose(er, model.to_numpy(), rtol=1e-6)


def test_shuffled_pairs_do_not_beat_the_mean_face(world, runs, bfm):
    _, data, _ = world
    pred = runs["shuffled"][1]
    names, er = per_identity_er(pred, data / "references.h5", bfm)
    _, mf = per_identity_er_mean_face(data / "references.h5", bfm, names)
    d, lo, hi = improvement(mf, er)
    print(f"\nshuffled: ER {er.mean():.4f}, mean face {mf.mean():.4f}; improvement {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    assert lo <= 0, (d, lo, hi)
    # and it is the voice that made the difference: the model's improvement is clearly larger
    _, model_er = per_identity_er(runs["model"][1], data / "references.h5", bfm)
    dm, lom, _ = improvement(mf, model_er)
    assert lom > hi, ((dm, lom), (d, lo, hi))


def per_identity_er_mean_face(references, bfm, names):
    """ER of the mean face (zero coefficients) against each named identity's reference."""
    from v2m_bench import metrics
    from v2m_bench.formats import read_references

    r = read_references(references)
    row = {n: i for i, n in enumerate(np.asarray(r.identity).astype(str))}
    ref_v = r.to_vertices(bfm, np.array([row[n] for n in names]))
    mf = np.broadcast_to(bfm.mean, ref_v.shape)
    return names, metrics.are(mf, ref_v)["ER"].astype(np.float64)
