"""Where the mediapipe backend loses the face's signal, and what does not bring it back.

On a synthetic world (e.g. the one ``benchmarks/bench_fidelity.py`` writes to ``WORK/world``)
runs the ``mediapipe`` backend's model on every image with its annotated box, fits each image's
68 points (``v2m_data.fitting``, contour off) and prints, per variant, the NME against the true
landmarks and the correlation of the fitted ER ratio with the true one (per image):

- ``shipped``: the 68 points of the backend (shipped 468 -> 68 weights);
- ``true jaw`` / ``true <group>``: the backend's points with one group replaced by the true ones;
  ``only <group>``: the true points with one group taken from the backend;
- ``mirrored``: averaged with the model's output on the mirrored crop;
- ``learned``: 468 -> 68 weights fitted by least squares (prior: the shipped weights) on a
  second, posed calibration world, applied here;
- ``dense``: the BFM fitted to all 468 points at their corresponding vertices (a plain
  alternating affine-camera / ridge fit, three prior strengths).

Usage::

    V2M_BFM_DIR=... python benchmarks/bench_mediapipe_variants.py --world /tmp/fidelity/world --calibration /tmp/mpmap/posed

(the calibration world is made when missing: 48 identities x 3 images, seed 469, default poses).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np


def _read(world: Path, det, mirrored: bool = False):
    import h5py

    from v2m_data.images import load_image

    with h5py.File(world / "truth.h5", "r") as t:
        files = [x.decode() if isinstance(x, bytes) else str(x) for x in t["image/file"][()]]
        boxes = np.asarray(t["image/box"][()], np.float64)
        truth = np.asarray(t["image/landmarks"][()], np.float64)
        ident = np.asarray(t["image/identity_index"][()])
        shapes = np.asarray(t["identity/shape"][()], np.float64)
    pts, flipped = [], []
    for f, bx in zip(files, boxes):
        img = load_image(world / f)
        pts.append(det.detect_mesh(img, bx)[0])
        if mirrored:
            w = img.shape[1]
            p = det.detect_mesh(np.ascontiguousarray(img[:, ::-1]), np.array([w - 1 - bx[2], bx[1], w - 1 - bx[0], bx[3]]))[0]
            p[:, 0] = w - 1 - p[:, 0]
            flipped.append(p)
    return np.stack(pts), (np.stack(flipped) if mirrored else None), truth, ident, shapes


def learned_weights(index, prior, pts, truth, lam: float = 1e-4) -> np.ndarray:
    """Per iBUG point, weights over ``index`` fitted to the truth (sum 1, ridge towards ``prior``)."""
    box = np.ptp(truth, axis=1)
    s = np.sqrt(box[:, 0] * box[:, 1])
    out = np.empty_like(prior)
    k = index.shape[1]
    for j in range(len(index)):
        a = (pts[:, index[j], :2] / s[:, None, None]).transpose(0, 2, 1).reshape(-1, k)
        y = (truth[:, j, :] / s[:, None]).reshape(-1)
        h = a.T @ a + lam * len(y) * np.eye(k)
        g = a.T @ y + lam * len(y) * prior[j]
        h1, hg = np.linalg.solve(h, np.ones(k)), np.linalg.solve(h, g)
        out[j] = hg + (1.0 - hg.sum()) / h1.sum() * h1
    return out


def dense_fit(obs, vertices, model, system, lam_scale: float, iters: int = 8) -> np.ndarray:
    """Shape coefficients (40,) of the BFM fitted to ``obs`` (V, 2) pixels at ``vertices`` (V,)."""
    v = np.asarray(vertices)
    rows = (3 * v[:, None] + np.arange(3)).reshape(-1)
    basis = np.concatenate([model.shape_basis[rows], model.expression_basis[rows]], 1).astype(np.float64) * system.std
    mu = model.mean[v].astype(np.float64)
    n, nv = basis.shape[1], len(v)
    lam = system.lambdas * lam_scale * nv / 68.0
    o = np.asarray(obs, np.float64).copy()
    o[:, 1] *= -1.0
    w = system.prior.copy()
    for _ in range(iters):
        x3 = mu + (basis @ w).reshape(nv, 3)
        p, *_ = np.linalg.lstsq(np.c_[x3, np.ones(nv)], o, rcond=None)
        u, sv, vt = np.linalg.svd(p[:3].T, full_matrices=False)
        s, r, t = sv.mean(), u @ vt, p[3]
        bp = np.einsum("ij,vjn->vin", r, basis.reshape(nv, 3, n)).reshape(2 * nv, n) * s
        rhs = (o - t).reshape(-1) - s * (mu @ r.T).reshape(-1)
        w = np.linalg.solve(bp.T @ bp + np.diag(lam * s * s), bp.T @ rhs + lam * s * s * system.prior)
    return (w * system.std)[: model.n_shape]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, help="A synthetic world (truth.h5) to measure on.")
    ap.add_argument("--calibration", required=True, help="A second, posed world for the learned weights (made when missing).")
    args = ap.parse_args(argv)
    from v2m_bench.bfm import load_bfm
    from v2m_bench.errors import V2MError
    from v2m_data.fitting import FitConfig, KeypointSystem, fit_landmarks
    from v2m_data.labels import ratios_of_shapes
    from v2m_data.landmarks import landmark_nme, make_detector
    from v2m_data.mediapipe_map import ibug_from_mediapipe, load_map
    from v2m_data.synth import make_world

    try:
        model = load_bfm(None)
        det = make_detector("mediapipe")
    except V2MError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cal = Path(args.calibration)
    if not (cal / "truth.h5").is_file():
        if cal.exists():
            shutil.rmtree(cal)
        make_world(cal, 48, 469, model, images_per_identity=3, videos_per_identity=1, utterances_per_video=1,
                   duration=(1.0, 1.2), image_size=256, progress=False)
    m = load_map()
    pts, flip, truth, ident, shapes = _read(Path(args.world), det, mirrored=True)
    cpts, _, ctruth, _, _ = _read(cal, det)
    true_er = ratios_of_shapes(model, shapes)["ER"][ident]
    cfg = FitConfig()
    ks = KeypointSystem.from_model(model, cfg)

    def row(name, lm68=None, shape=None):
        if shape is None:
            fr = fit_landmarks(lm68[..., :2], ks, cfg)
            er, ok = ratios_of_shapes(model, fr.shape)["ER"], fr.valid
        else:
            er, ok = ratios_of_shapes(model, shape)["ER"], np.ones(len(shape), bool)
        nme = "" if lm68 is None else f"{100 * landmark_nme(lm68, truth).mean():.2f} %"
        print(f"| {name} | {nme} | {np.corrcoef(er[ok], true_er[ok])[0, 1]:.3f} |", flush=True)

    print(f"{len(pts)} images; {len(cpts)} calibration images\n")
    print("| variant | NME | ER correlation per image |\n|---|---|---|")
    base = ibug_from_mediapipe(pts, m)[..., :2]
    row("shipped", base)
    row("true points (reference)", truth)
    groups = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36), "eyes": range(36, 48), "mouth": range(48, 68)}
    for g, r in groups.items():
        a = base.copy()
        a[:, list(r)] = truth[:, list(r)]
        row(f"true {g}", a)
        a = truth.copy()
        a[:, list(r)] = base[:, list(r)]
        row(f"only {g}", a)
    from scipy.spatial import cKDTree

    _, perm = cKDTree(m.points).query(m.points * np.array([-1.0, 1.0, 1.0]))
    row("mirrored", ibug_from_mediapipe((pts + flip[:, perm]) / 2.0, m)[..., :2])
    from v2m_data.mediapipe_map import ibug_weights

    q = model.mean[model.keypoints].astype(np.float64)
    idx, w0 = ibug_weights(m.points, q, k=24)
    w = learned_weights(idx, w0, cpts, ctruth)
    row("learned (k 24)", np.einsum("kj,nkjd->nkd", w, pts[:, idx, :2]))
    for ls in (0.3, 1.0, 3.0):
        shp = np.stack([dense_fit(p[:, :2], m.vertex, model, ks, ls) for p in pts])
        row(f"dense 468, prior x {ls:g}", shape=shp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
