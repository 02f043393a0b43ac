"""Study: how the ICP RMSE and RMSE_v2v rank predictors against the error to the true faces.

A synthetic world where the truth is known: ``--identities`` true faces (shapes drawn as
:func:`v2m_data.synth.sample_shapes` draws the synthetic world's identities, expressions from
the BFM statistics at ``--expression-scale``), and a reference per identity that is an imperfect
fit of its true face (whitened shape coefficients off by ``--fit-noise``, expression by twice
that), as a landmark fit is. Predictors, ``--predictions`` per identity:

- ``mean face``: zero shape coefficients, mean expression;
- ``supervised r=...``: a regression whose (whitened) inputs correlate ``r`` with the true
  coefficients: ``z_hat = r**2 z + r sqrt(1 - r**2) e`` (the conditional mean, shrunk to the
  mean face as regressions are), mean expression;
- ``shuffled r=0.9``: the best supervised predictions given to the wrong identities (a random
  derangement): a control that must rank with the mean face or below;
- ``truth + noise s mm``: the true face with iid Gaussian noise of ``s`` mm per axis on every
  vertex.

Each predictor is scored against the references with the ICP point-to-plane RMSE
(:func:`v2m_bench.metrics.icp_scores`) and :func:`v2m_bench.metrics.rmse_v2v`, and against the true
faces with RMSE_v2v (the true error). Prints one row per predictor (identity macro means, mm)
and Kendall's tau between each metric's ranking of the predictors and the true error's.

    python benchmarks/study_rmse_v2v.py [--bfm DIR] [--identities 40] [--predictions 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _kendall(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    s = 0
    n = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
            n += 1
    return float(s / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bfm", default=None)
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--predictions", type=int, default=2)
    ap.add_argument("--fit-noise", type=float, default=0.3, help="sd of the reference fits' error, whitened units")
    ap.add_argument("--expression-scale", type=float, default=0.5, help="sd of the true expressions, in BFM sds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from v2m_bench import load_bfm
    from v2m_bench.errors import BFMNotFoundError
    from v2m_bench.metrics import icp_scores
    from v2m_bench.metrics import rmse_v2v
    from v2m_data.synth import sample_shapes

    try:
        model = load_bfm(args.bfm)
    except BFMNotFoundError as e:
        print(f"{Path(__file__).name}: {e}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    n, k = args.identities, args.predictions
    std_s = model.shape_std.astype(np.float64)
    std_e = model.expression_std.astype(np.float64)
    mean_e = model.expression_mean.astype(np.float64)
    _, z = sample_shapes(model, rng.random(n) < 0.5, rng)
    e_true = mean_e + rng.normal(size=(n, model.n_expression)) * std_e * args.expression_scale

    def verts(zs, es):
        return model.vertices((zs * std_s).astype(np.float32), es.astype(np.float32)).astype(np.float64)

    truth = verts(z, e_true)
    z_ref = z + rng.normal(size=z.shape) * args.fit_noise
    e_ref = e_true + rng.normal(size=e_true.shape) * std_e * 2 * args.fit_noise
    refs = verts(z_ref, e_ref)
    group = np.repeat(np.arange(n), k)
    zk = z[group]
    mean_ek = np.tile(mean_e, (n * k, 1))

    def supervised(r):
        return verts(r * r * zk + r * np.sqrt(1 - r * r) * rng.normal(size=zk.shape), mean_ek)

    predictors = {"mean face": verts(np.zeros_like(zk), mean_ek)}
    for r in (0.9, 0.7, 0.5, 0.3):
        predictors[f"supervised r={r}"] = supervised(r)
    perm = rng.permutation(n)
    while np.any(perm == np.arange(n)):
        perm = rng.permutation(n)
    best = predictors["supervised r=0.9"]
    predictors["shuffled r=0.9"] = best.reshape(n, k, -1, 3)[perm].reshape(best.shape)
    for s in (0.5, 1.0, 2.0):
        predictors[f"truth + noise {s} mm"] = truth[group] + rng.normal(size=(n * k,) + truth.shape[1:]) * s * 1000

    print(f"world: {n} identities x {k} predictions, reference fit noise {args.fit_noise} (whitened), "
          f"expression sd {args.expression_scale}; seed {args.seed}")
    print(f"reference vs truth, RMSE_v2v: {rmse_v2v(refs, truth).mean():.3f} mm")
    rows = []
    for name, pred in predictors.items():
        glob, _ = icp_scores(pred, refs, model.triangles, group=group)
        v2v = rmse_v2v(pred, refs[group])
        true = rmse_v2v(pred, truth[group])
        macro = [float(np.mean(x.reshape(n, k).mean(axis=1))) for x in (np.asarray(glob.rmse), v2v, true)]
        rows.append((name, *macro))
    print(f"{'predictor':24s} {'ICP RMSE':>9s} {'RMSE_v2v':>9s} {'true error':>10s}")
    for name, icp, v2v, true in rows:
        print(f"{name:24s} {icp:9.3f} {v2v:9.3f} {true:10.3f}")
    true = [r[3] for r in rows]
    print(f"Kendall tau with the true error over {len(rows)} predictors: ICP RMSE {_kendall([r[1] for r in rows], true):+.2f}, "
          f"RMSE_v2v {_kendall([r[2] for r in rows], true):+.2f}")
    for label, col in (("ICP RMSE", 1), ("RMSE_v2v", 2)):
        order = [r[0] for r in sorted(rows, key=lambda r: r[col])]
        print(f"order by {label}: " + " < ".join(order))
    print("order by the true error: " + " < ".join(r[0] for r in sorted(rows, key=lambda r: r[3])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
