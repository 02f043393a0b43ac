"""Generate v2m_data/data/mediapipe_bfm.npz: where MediaPipe's 468 points lie on the BFM.

Renders a synthetic world of frontal faces (``v2m_data.synth.make_world`` with no head rotation),
runs the ``mediapipe`` backend's model on each render, looks every point up in the renderer's
triangle buffer, averages the surface points on the mean face, and derives the 68 iBUG
interpolation weights (:mod:`v2m_data.mediapipe_map`). Prints how consistent the points are
and the NME of the derived 68 points against the renders' true landmarks.

Usage::

    V2M_BFM_DIR=... python benchmarks/make_mediapipe_map.py --work /tmp/mpmap --out v2m_data/data/mediapipe_bfm.npz
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=32)
    ap.add_argument("--images-per-identity", type=int, default=2)
    ap.add_argument("--seed", type=int, default=468, help="World seed (keep it apart from the benchmark worlds' seeds).")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--k", type=int, default=16, help="MediaPipe points each iBUG point is interpolated from.")
    ap.add_argument("--work", required=True, help="Folder for the world (reused when present).")
    ap.add_argument("--out", required=True, help="The .npz to write.")
    args = ap.parse_args(argv)
    import h5py

    from v2m_bench.bfm import load_bfm
    from v2m_bench.errors import V2MError
    from v2m_data.landmarks import landmark_nme, make_detector
    from v2m_data.mediapipe_map import ibug_from_mediapipe, make_map, save_map, world_samples
    from v2m_data.synth import make_world

    try:
        model = load_bfm(None)
        det = make_detector("mediapipe")
    except V2MError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = Path(args.work) / "frontal"
    t0 = time.perf_counter()
    if not (world / "truth.h5").is_file():
        if world.exists():
            shutil.rmtree(world)
        make_world(world, args.identities, args.seed, model, images_per_identity=args.images_per_identity,
                   videos_per_identity=1, utterances_per_video=1, duration=(1.0, 1.2), image_size=args.image_size,
                   yaw_std=0.0, pitch_std=0.0, roll_std=0.0, progress=False)
    samples, logits = world_samples(world, det, model, progress=None)
    m = make_map(samples, model, k=args.k)
    save_map(args.out, m)
    # in-sample check: the derived 68 points against the renders' true landmarks
    with h5py.File(world / "truth.h5", "r") as t:
        files = [x.decode() if isinstance(x, bytes) else str(x) for x in t["image/file"][()]]
        boxes = np.asarray(t["image/box"][()], np.float64)
        truth = np.asarray(t["image/landmarks"][()], np.float64)
    from v2m_data.images import load_image

    pred = np.stack([ibug_from_mediapipe(det.detect_mesh(load_image(world / f), b)[0], m)[:, :2] for f, b in zip(files, boxes)])
    nme = landmark_nme(pred, truth)
    print(f"{len(samples)} frontal renders, {time.perf_counter() - t0:.0f} s; logits {logits.min():.1f} .. {logits.max():.1f}")
    print(f"point spread on the mean face (mm): median {np.median(m.spread) / 1000:.2f}, 90th pct {np.percentile(m.spread, 90) / 1000:.2f}")
    print(f"NME of the derived 68 points on these renders: {100 * nme.mean():.2f} % (jaw {100 * landmark_nme(pred[:, :17], truth[:, :17]).mean():.2f} %)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
