"""Benchmark: the steps of ``v2m-bench score`` other than the ICP, timed one by one in-process.

Reads the case that ``bench_score_cli.py --work DIR`` writes (``DIR/references.h5``,
``DIR/predictions.h5``: 301 references x 3 predictions as BFM coefficients) and times, over the
same chunks of 96 predictions as ``score``: coefficients to vertices, the face-plausibility
check, ARE + NME, RMSE_v2v (global, then global + the six parts, with the compiled sums and with
numpy's), and the part regions computed and read from the user cache. Prints CPU and wall seconds, the best of ``--runs``, and the load.

    python benchmarks/bench_score_steps.py --work /tmp/v2m_score_case [--bfm DIR] [--runs 3]

Exit 2 when the BFM or the case files cannot be found.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()
import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from v2m_bench import load_bfm, metrics, scoring  # noqa: E402
from v2m_bench.errors import BFMNotFoundError  # noqa: E402
from v2m_bench.formats import read_predictions, read_references  # noqa: E402
from v2m_bench.topology import bfm_regions  # noqa: E402

T_IMPORT = time.perf_counter() - T0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder with references.h5 and predictions.h5 (bench_score_cli.py --work)")
    ap.add_argument("--bfm", default=None, help="3DDFA train.configs folder (default: $V2M_BFM_DIR or the user cache)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    work = Path(args.work)
    try:
        model = load_bfm(args.bfm)
    except BFMNotFoundError as e:
        print(f"{Path(__file__).name}: {e}", file=sys.stderr)
        return 2
    if not ((work / "references.h5").exists() and (work / "predictions.h5").exists()):
        print(f"{Path(__file__).name}: no case in {work}; write it with bench_score_cli.py --work {work}", file=sys.stderr)
        return 2
    preds, refs = read_predictions(work / "predictions.h5"), read_references(work / "references.h5")
    regions = bfm_regions(model)
    pos = {n: i for i, n in enumerate(np.asarray(refs.identity).astype(str))}
    ria = np.array([pos[i] for i in np.asarray(preds.identity).astype(str)])
    order = np.argsort(ria, kind="stable")
    chunks = [order[c] for c in scoring.iter_chunks(len(order), scoring.ScoreConfig().chunk_size)]

    def best(f):
        times = []
        for _ in range(args.runs):
            c, w = time.process_time(), time.perf_counter()
            out = f()
            times.append((time.process_time() - c, time.perf_counter() - w))
        return min(times), out

    def vertices():
        out = []
        for rows in chunks:
            used, local = np.unique(ria[rows], return_inverse=True)
            out.append((preds.to_vertices(model, rows), refs.to_vertices(model, used), local, rows, used))
        return out

    def check():
        from v2m_bench.formats import check_face_meshes

        for pv, rv, _, rows, used in data:
            check_face_meshes(pv, model, rows=rows)
            check_face_meshes(rv, model, rows=used)

    def are_nme():
        for pv, rv, local, _, _ in data:
            rb = rv[local]
            metrics.are(pv, rb)
            metrics.nme_official(pv, rb, model.keypoints)

    def v2v(parts, engine=None):
        def run():
            for pv, rv, local, rows, _ in data:
                rb = rv[local]
                for lo in range(0, len(rows), 16):
                    metrics.rmse_v2v(pv[lo : lo + 16], rb[lo : lo + 16], regions=regions if parts else None, engine=engine)
        return run

    t_vert, data = best(vertices)
    rows = [(f"coefficients to vertices ({len(order)} + {len(pos)} meshes)", t_vert),
            ("face-plausibility check", best(check)[0]), ("ARE + NME", best(are_nme)[0]),
            ("RMSE_v2v, global", best(v2v(False))[0]), ("RMSE_v2v, global + six parts", best(v2v(True))[0]),
            ("RMSE_v2v, global + six parts, engine='numpy'", best(v2v(True, "numpy"))[0]),
            ("regions computed (imports already made)", best(lambda: bfm_regions(model))[0])]
    print(f"{len(order)} predictions, {len(pos)} references; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}; "
          f"best of {args.runs}; imports of numpy and v2m_bench {T_IMPORT:.2f} s wall")
    for name, (cpu, wall) in rows:
        print(f"{name}: {cpu:.2f} s CPU, {wall:.2f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
