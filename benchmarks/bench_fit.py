"""Speed of ``v2m_data.fitting.fit_landmarks`` against a plain per-face implementation.

Run from the repository root::

    python benchmarks/bench_fit.py [--bfm DIR] [--faces 20000] [--reference-faces 400] [--json OUT]

The faces are synthetic (BFM keypoints of random shape/expression/pose drawn from the model's
statistics, projected to ~200 px, 1 px noise), so only the model is needed (``--bfm`` or
``$V2M_BFM_DIR``). The reference below is the classic alternating algorithm written the
straightforward way: a Python loop over faces, ``np.linalg.lstsq`` on the full keypoint system
(136 rows + ridge rows) for the affine camera, the expression and the shape at every iteration,
the same number of iterations, the same camera decomposition and the same regularisation as the
batched code. It is run on the first ``--reference-faces`` faces and its answers are compared with
the batched ones (they must agree to ~1e-8). Timings are wall-clock, best of ``--repeat``; the
machine, its load average and the thread settings are printed with them: on a shared machine the
figures are provisional.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from _machine import machine  # noqa: E402  (benchmarks/_machine.py, beside this script)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v2m_bench import load_bfm  # noqa: E402
from v2m_data.fitting import FitConfig, KeypointSystem, fit_landmarks, project  # noqa: E402


# ---------------------------------------------------------------------------------------- data
def rotation(yaw, pitch, roll):
    y, p, r = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (yaw, pitch, roll))
    o, z = np.ones_like(y), np.zeros_like(y)
    ry = np.stack([np.stack([np.cos(y), z, np.sin(y)], -1), np.stack([z, o, z], -1), np.stack([-np.sin(y), z, np.cos(y)], -1)], -2)
    rx = np.stack([np.stack([o, z, z], -1), np.stack([z, np.cos(p), -np.sin(p)], -1), np.stack([z, np.sin(p), np.cos(p)], -1)], -2)
    rz = np.stack([np.stack([np.cos(r), -np.sin(r), z], -1), np.stack([np.sin(r), np.cos(r), z], -1), np.stack([z, z, o], -1)], -2)
    return rz @ rx @ ry


def synthetic_landmarks(model, n, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    shape = rng.normal(size=(n, model.n_shape)) * model.shape_std + model.shape_mean
    expr = rng.normal(size=(n, model.n_expression)) * model.expression_std + model.expression_mean
    rot = rotation(rng.uniform(-40, 40, n), rng.uniform(-20, 20, n), rng.uniform(-20, 20, n))
    kp = model.mean[model.keypoints].astype(np.float64)
    scale = 200.0 / np.ptp(kp[:, 0]) * rng.uniform(0.8, 1.25, n)
    trans = rng.uniform(150.0, 350.0, (n, 2))
    rows = (3 * model.keypoints[:, None] + np.arange(3)).reshape(-1)
    x3 = (
        kp.reshape(-1)
        + shape @ model.shape_basis[rows].astype(np.float64).T
        + expr @ model.expression_basis[rows].astype(np.float64).T
    ).reshape(n, 68, 3)
    return project(x3, scale, rot, trans) + rng.normal(size=(n, 68, 2)) * noise


# ---------------------------------------------------------------------------------------- reference
class ReferenceFit:
    """The classic alternating fit, one face at a time, with ``np.linalg.lstsq`` everywhere."""

    def __init__(self, model, config: FitConfig):
        kp = model.keypoints
        rows = (3 * kp[:, None] + np.arange(3)).reshape(-1)
        self.ns, self.ne = model.n_shape, model.n_expression
        self.a_shape = model.shape_basis[rows].astype(np.float64).reshape(68, 3, self.ns)
        self.a_expr = model.expression_basis[rows].astype(np.float64).reshape(68, 3, self.ne)
        self.x0 = model.mean[kp].astype(np.float64)
        size = np.sqrt(((self.x0 - self.x0.mean(0)) ** 2).sum(1).mean())
        self.std_s = model.shape_std.astype(np.float64)
        self.std_e = model.expression_std.astype(np.float64)
        self.mu_s = model.shape_mean.astype(np.float64) if config.shape_prior == "model" else np.zeros(self.ns)
        self.mu_e = model.expression_mean.astype(np.float64) if config.expression_prior == "model" else np.zeros(self.ne)
        # ridge rows: sqrt(lambda L^2) (c - mu) / sigma
        self.reg_s = np.sqrt(config.shape_lambda) * size / self.std_s
        self.reg_e = np.sqrt(config.expression_lambda) * size / self.std_e
        self.n_iter = config.iterations

    def _ridge(self, design, target, reg, mu):
        a = np.vstack([design, np.diag(reg)])
        b = np.concatenate([target, reg * mu])
        return np.linalg.lstsq(a, b, rcond=None)[0]

    def fit(self, landmarks):
        o = np.array(landmarks[:, :2], dtype=np.float64)
        o[:, 1] *= -1.0  # y up
        alpha, beta = self.mu_s.copy(), self.mu_e.copy()
        for it in range(self.n_iter + 1):
            x = self.x0 + self.a_shape @ alpha + self.a_expr @ beta  # (68, 3)
            # affine camera by the Gold Standard algorithm: normalise, linear LS (8 unknowns), denormalise
            xm, om = x.mean(0), o.mean(0)
            nx = np.sqrt(3.0 / ((x - xm) ** 2).sum(1).mean())
            no = np.sqrt(2.0 / ((o - om) ** 2).sum(1).mean())
            xn, on = nx * (x - xm), no * (o - om)
            design = np.zeros((136, 8))
            design[0::2, :3], design[0::2, 3] = xn, 1.0
            design[1::2, 4:7], design[1::2, 7] = xn, 1.0
            p = np.linalg.lstsq(design, on.reshape(-1), rcond=None)[0].reshape(2, 4)
            m = p[:, :3] * nx / no
            u, _, vt = np.linalg.svd(m, full_matrices=False)  # closest orthonormal rows
            r2 = u @ vt
            rot = np.vstack([r2, np.cross(r2[0], r2[1])])
            y = (x - xm) @ r2.T
            s = (y * (o - om)).sum() / (y * y).sum()
            t = om - s * r2 @ xm
            if it == self.n_iter:
                break
            target = (o - t) / s  # (68, 2), model units
            # expression with the shape fixed, then the shape with the new expression
            d_e = np.einsum("ra,kai->kri", r2, self.a_expr).reshape(136, self.ne)
            rest = (self.x0 + self.a_shape @ alpha) @ r2.T
            beta = self._ridge(d_e, (target - rest).reshape(-1), self.reg_e, self.mu_e)
            d_s = np.einsum("ra,kai->kri", r2, self.a_shape).reshape(136, self.ns)
            rest = (self.x0 + self.a_expr @ beta) @ r2.T
            alpha = self._ridge(d_s, (target - rest).reshape(-1), self.reg_s, self.mu_s)
        proj = s * x @ r2.T + t
        return dict(
            shape=alpha,
            expression=beta,
            scale=s,
            rotation=rot,
            translation=np.array([t[0], -t[1]]),
            residual=np.sqrt(((proj - o) ** 2).sum(1)).mean(),
        )


# ---------------------------------------------------------------------------------------- timing
def best_of(fn, repeat):
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bfm", default=None, help="BFM folder (default: $V2M_BFM_DIR or the user cache)")
    ap.add_argument("--faces", type=int, default=20000)
    ap.add_argument("--reference-faces", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the reference then runs with the BLAS default
        from contextlib import nullcontext

        def threadpool_limits(**_):
            return nullcontext()

    from v2m_bench.errors import BFMNotFoundError

    try:
        model = load_bfm(args.bfm)
    except BFMNotFoundError as e:  # a message on how to get the model, not a traceback
        print(f"{Path(__file__).name}: {e}", file=sys.stderr)
        return 2
    lm = synthetic_landmarks(model, args.faces)
    cfg = FitConfig()
    system = KeypointSystem.from_model(model, cfg)
    out = {"machine": machine(), "faces": args.faces, "n_iter": cfg.iterations, "load_before": os.getloadavg()}
    print(f"machine: {out['machine']}")
    print(f"load average before: {out['load_before']}")

    t_prep, _ = best_of(lambda: KeypointSystem.from_model(model, cfg), args.repeat)
    out["precompute_s"] = t_prep
    fit_landmarks(lm[:512], system, cfg)  # warm-up
    rows = []
    for label, c in [
        ("batched, 1 thread", FitConfig(n_threads=1)),
        (f"batched, {out['machine']['cpus_available']} threads", FitConfig()),
        ("batched + refine=2", FitConfig(refine=2)),
        ("batched, contour=True (8 iterations)", FitConfig(contour=True)),
    ]:
        sys_c = system if (c.contour, c.solver) == (cfg.contour, cfg.solver) else KeypointSystem.from_model(model, c)
        t, res = best_of(lambda: fit_landmarks(lm, sys_c, c), args.repeat)
        rows.append((label, args.faces / t))
        print(f"{label:40s} {args.faces / t:10.0f} faces/s   ({t:.3f} s for {args.faces}; valid {res.valid.mean():.4f}, converged {res.converged.mean():.4f})")
        if label.startswith("batched, 1"):
            batched_1 = args.faces / t
        elif label.startswith("batched, ") and "threads" in label:
            batched_n = args.faces / t
            batched_res = res
    out["batched"] = dict(rows)

    # reference, same iterations / regularisation, one face at a time (BLAS single-threaded, its fastest)
    ref = ReferenceFit(model, cfg)
    nref = min(args.reference_faces, args.faces)
    with threadpool_limits(limits=1, user_api="blas"):
        t_ref, ref_out = best_of(lambda: [ref.fit(lm[i]) for i in range(nref)], max(1, args.repeat - 1))
    ref_rate = nref / t_ref
    print(f"{'reference (per face, lstsq)':40s} {ref_rate:10.0f} faces/s   ({t_ref:.3f} s for {nref})")
    out["reference_faces_per_s"] = ref_rate
    out["speedup_1_thread"] = batched_1 / ref_rate
    out["speedup_all_threads"] = batched_n / ref_rate
    print(f"speed-up over the reference: {batched_1 / ref_rate:.1f}x (1 thread), {batched_n / ref_rate:.1f}x (all threads)")

    # agreement with the reference on the same faces
    b = batched_res
    diffs = {
        "shape_rel": max(np.abs((r["shape"] - b.shape[i]) / model.shape_std).max() for i, r in enumerate(ref_out)),
        "expression_rel": max(np.abs((r["expression"] - b.expression[i]) / model.expression_std).max() for i, r in enumerate(ref_out)),
        "rotation": max(np.abs(r["rotation"] - b.rotation[i]).max() for i, r in enumerate(ref_out)),
        "scale_rel": max(abs(r["scale"] / b.scale[i] - 1.0) for i, r in enumerate(ref_out)),
        "translation_px": max(np.abs(r["translation"] - b.translation[i]).max() for i, r in enumerate(ref_out)),
        "residual_px": max(abs(r["residual"] - b.residual[i]) for i, r in enumerate(ref_out)),
    }
    out["max_abs_difference_vs_reference"] = diffs
    print("max |batched - reference| over", nref, "faces:", {k: f"{v:.2e}" for k, v in diffs.items()})
    ok = diffs["shape_rel"] < 1e-6 and diffs["expression_rel"] < 1e-6 and diffs["rotation"] < 1e-8 and diffs["residual_px"] < 1e-6
    out["agrees_with_reference"] = bool(ok)
    out["load_after"] = os.getloadavg()
    print(f"agrees with the reference: {ok}")
    print(f"load average after: {out['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
