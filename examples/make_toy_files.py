"""Write a toy references.h5 and two predictions.h5 files to try `v2m-bench score` without any dataset.

References: 20 made-up test identities with BFM coefficients drawn from the model's statistics.
"good.h5" predicts each identity's shape with noise (3 utterances each); "noisy.h5" with much more
noise. Usage:

    python examples/make_toy_files.py --out toy [--bfm DIR] [--identities 20] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from v2m_bench import load_bfm, write_predictions, write_references


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bfm", default=None, help="BFM folder (default: $V2M_BFM_DIR, then the user cache)")
    ap.add_argument("--identities", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model = load_bfm(args.bfm)
    rng = np.random.default_rng(args.seed)
    n = args.identities
    names = [f"{chr(ord('A') + i % 5)}toy_Person_{i:03d}" for i in range(n)]
    shape = rng.normal(size=(n, 40)) * model.shape_std * 0.7
    expr = model.expression_mean + rng.normal(size=(n, 10)) * model.expression_std * 0.2
    args.out.mkdir(parents=True, exist_ok=True)
    write_references(args.out / "references.h5", names, rng.choice(["m", "f"], size=n), shape=shape, expression=expr,
                     selection_rule="toy: coefficients drawn from the BFM statistics")
    ids = np.repeat(names, 3)
    utts = np.array([f"toyvideo{k}/0000{k}" for k in range(3)] * n)
    for name, noise in (("good", 0.3), ("noisy", 1.0)):
        s = np.repeat(shape, 3, axis=0) + rng.normal(size=(3 * n, 40)) * model.shape_std * noise
        e = np.repeat(expr, 3, axis=0)
        write_predictions(args.out / f"{name}.h5", ids, utts, shape=s, expression=e, model=f"toy-{name}")
    print(f"wrote {args.out}/references.h5, {args.out}/good.h5, {args.out}/noisy.h5")


if __name__ == "__main__":
    main()
