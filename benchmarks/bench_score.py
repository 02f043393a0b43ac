"""Benchmark: ICP point-to-plane RMSE + part RMSE on the full-size test case.

Builds the A-E test case at full size from the BFM: ``--n-identities`` references (random shape and
expression coefficients from the BFM statistics, seeded) with 3 predictions each (other random
faces, drawn closer to the mean as regressed predictions are), 53,215 vertices each. Times
``v2m_bench.metrics.icp_scores`` (global ICP + the six part ICPs of ``topology.bfm_regions``): wall
time, CPU time and peak RSS. When ``import open3d`` works, also times Open3D's point-to-plane ICP
(``registration_icp`` with ``TransformationEstimationPointToPlane``, the same initial alignment,
the same iteration cap, target normals = the same area-weighted vertex normals), mesh by mesh on
``--open3d-sample`` predictions, extrapolates it to the whole case and prints the speed-up and the
agreement of the RMSE values. Open3D is optional: the library never imports it.

    python benchmarks/bench_score.py [--bfm DIR] [--n-identities 301] [--open3d-sample 20]
        [--engine auto|numba|kdtree] [--compare-engines]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _random_faces(model, n: int, rng: np.random.Generator, scale: float, batch: int = 128) -> np.ndarray:
    out = np.empty((n, model.n_vertices, 3), np.float32)
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        shape = rng.normal(size=(hi - lo, model.n_shape)) * model.shape_std * scale + model.shape_mean
        expr = rng.normal(size=(hi - lo, model.n_expression)) * model.expression_std * scale + model.expression_mean
        out[lo:hi] = model.vertices(shape.astype(np.float32), expr.astype(np.float32))
    return out


def _kabsch(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """4x4 rigid transform taking p (N, 3) onto q (N, 3) (least squares over vertex pairs)."""
    mp, mq = p.mean(0), q.mean(0)
    u, _, vt = np.linalg.svd((p - mp).T @ (q - mq))
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = r, mq - r @ mp
    return out


def _p2plane_rmse(p, q, nrm, transform, upm):
    """Point-to-plane RMSE (mm) of p moved by ``transform`` against its nearest vertices of q.

    Open3D's ``inlier_rmse`` is the point-to-point RMSE of the correspondences, whatever the
    estimation method, so the same score as v2m_bench's is computed here from Open3D's transform.
    """
    from scipy.spatial import cKDTree

    x = p @ transform[:3, :3].T + transform[:3, 3]
    nn = cKDTree(q).query(x)[1]
    d = np.einsum("ij,ij->i", x - q[nn], nrm[nn])
    return float(np.sqrt(np.mean(d * d))) / upm


def _open3d_scores(o3d, pred, ref, triangles, regions, max_iter, upm):
    """Open3D point-to-plane ICP of one prediction: global, then each region from the global result.

    Returns (registration seconds, global RMSE, {region: RMSE}); RMSEs in mm, point-to-plane.
    """
    from v2m_bench.geometry import vertex_normals

    reg = o3d.pipelines.registration
    est = reg.TransformationEstimationPointToPlane()
    crit = reg.ICPConvergenceCriteria(max_iteration=max_iter)
    p = pred.astype(np.float64)
    q = ref.astype(np.float64)
    nrm = vertex_normals(q, triangles)

    def cloud(pts, normals=None):
        c = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
        if normals is not None:
            c.normals = o3d.utility.Vector3dVector(normals)
        return c

    t0 = time.perf_counter()
    init = _kabsch(p, q)
    g = reg.registration_icp(cloud(p), cloud(q, nrm), 1e12, init, est, crit)
    transforms = {}
    for name, mask in regions.items():
        r = reg.registration_icp(cloud(p[mask]), cloud(q[mask], nrm[mask]), 1e12, g.transformation, est, crit)
        transforms[name] = r.transformation
    seconds = time.perf_counter() - t0
    parts = {name: _p2plane_rmse(p[m], q[m], nrm[m], transforms[name], upm) for name, m in regions.items()}
    return seconds, _p2plane_rmse(p, q, nrm, g.transformation, upm), parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bfm", default=None, help="3DDFA train.configs folder (default: $V2M_BFM_DIR or the user cache)")
    ap.add_argument("--n-identities", type=int, default=301)
    ap.add_argument("--predictions-per-identity", type=int, default=3)
    ap.add_argument("--open3d-sample", type=int, default=20, help="predictions scored with Open3D (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="v2m_bench threads (default: all CPUs, at most 8)")
    ap.add_argument("--prediction-scale", type=float, default=0.5,
                    help="std of the predictions' coefficients, in BFM standard deviations (references: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", default="auto", choices=["auto", "numba", "kdtree"],
                    help="exhaustive nearest-vertex search of v2m_bench.metrics.icp (auto: numba when it imports)")
    ap.add_argument("--compare-engines", action="store_true",
                    help="also time the other engine on the same case and compare the scores")
    args = ap.parse_args(argv)

    from v2m_bench import load_bfm
    from v2m_bench.metrics import DEFAULT_ICP_CONFIG, icp_scores
    from v2m_bench.topology import bfm_regions

    from v2m_bench.errors import BFMNotFoundError

    try:
        model = load_bfm(args.bfm)
    except BFMNotFoundError as e:  # a message on how to get the model, not a traceback
        print(f"{Path(__file__).name}: {e}", file=sys.stderr)
        return 2
    regions = bfm_regions(model)
    n_id, per = args.n_identities, args.predictions_per_identity
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    refs = _random_faces(model, n_id, rng, 1.0)
    preds = _random_faces(model, n_id * per, rng, args.prediction_scale)
    group = np.repeat(np.arange(n_id), per)
    t_build = time.perf_counter() - t0
    rss_data = _rss_mb()
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average before scoring {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"case: {n_id} references x {per} predictions = {n_id * per} meshes of {model.n_vertices} vertices "
          f"(built in {t_build:.1f} s; RSS with the data {rss_data:.0f} MB); regions "
          + ", ".join(f"{k} {int(v.sum())}" for k, v in regions.items()))

    try:
        import numba  # noqa: F401 - the compiled engine needs it
    except ImportError:
        if args.engine == "numba":
            raise SystemExit("error: engine numba: numba is not installed (pip install numba)") from None
        engine = "kdtree"
    else:
        engine = "kdtree" if args.engine == "kdtree" else "numba"
    # compile (or load from numba's cache) before timing: a one-off per installation, reported apart
    w0 = time.perf_counter()
    icp_scores(preds[:1], refs[:1], model.triangles, regions, engine=engine)
    print(f"engine {engine}: warm-up on one mesh (includes numba compilation or cache load) {time.perf_counter() - w0:.2f} s")
    c0, w0 = time.process_time(), time.perf_counter()
    glob, parts = icp_scores(preds, refs, model.triangles, regions, group=group, threads=args.threads, engine=engine)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    rss_peak = _rss_mb()
    if args.compare_engines:
        other = "kdtree" if engine == "numba" else "numba"
        c1, w1 = time.process_time(), time.perf_counter()
        g2, p2 = icp_scores(preds, refs, model.triangles, regions, group=group, threads=args.threads, engine=other)
        w_other, c_other = time.perf_counter() - w1, time.process_time() - c1
        pairs = [(g2.rmse, glob.rmse)] + [(p2[k].rmse, parts[k].rmse) for k in parts]
        same = all(np.array_equal(a, b) for a, b in pairs)
        rel = max(float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))) for a, b in pairs)
        print(f"engine {other}: wall {w_other:.2f} s, CPU {c_other:.2f} s; RMSEs (global and parts) "
              + ("identical" if same else f"differ from {engine} by at most {rel:.1e} relative"))
    print(f"v2m_bench.metrics.icp_scores ({engine}; global + {len(regions)} part ICPs): wall {wall:.2f} s, CPU {cpu:.2f} s, "
          f"{wall / len(preds) * 1e3:.1f} ms per prediction; peak RSS {rss_peak:.0f} MB "
          f"(+{rss_peak - rss_data:.0f} MB over the data)")
    print(f"  global RMSE mean {glob.rmse.mean():.4f} mm (min {glob.rmse.min():.4f}, max {glob.rmse.max():.4f}); "
          f"iterations mean {glob.iterations.mean():.1f}, capped {int((~glob.converged).sum())}")
    print("  part RMSE mean (mm): " + ", ".join(f"{k} {v.rmse.mean():.4f}" for k, v in parts.items()))

    if args.open3d_sample <= 0:
        return 0
    try:
        import open3d as o3d
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        print(f"open3d not importable ({type(e).__name__}: {e}); comparison skipped "
              "(pip install open3d; on Debian it needs apt-get install libusb-1.0-0)")
        return 0
    k = min(args.open3d_sample, len(preds))
    sample = np.linspace(0, len(preds) - 1, k).round().astype(int)
    o_g = np.empty(k)
    o_p = {name: np.empty(k) for name in regions}
    upm = DEFAULT_ICP_CONFIG.units_per_mm
    t0 = time.perf_counter()
    t_reg = 0.0
    for i, b in enumerate(sample):
        sec, o_g[i], pr = _open3d_scores(o3d, preds[b], refs[group[b]], model.triangles, regions,
                                         DEFAULT_ICP_CONFIG.max_iterations, upm)
        t_reg += sec
        for name in regions:
            o_p[name][i] = pr[name]
    t_o3d = (time.perf_counter() - t0) / k
    t_reg /= k
    full = t_o3d * len(preds)
    print(f"open3d {o3d.__version__} registration_icp point-to-plane (global + {len(regions)} parts, max "
          f"{DEFAULT_ICP_CONFIG.max_iterations} iterations, mesh by mesh, then the same point-to-plane score): "
          f"{t_o3d * 1e3:.0f} ms per prediction ({t_reg * 1e3:.0f} ms of it registration) on {k} predictions "
          f"-> {full:.0f} s for the case (extrapolated); speed-up of v2m_bench: {full / wall:.1f}x "
          f"({t_reg * len(preds) / wall:.1f}x against registration alone)")
    ours = glob.rmse[sample]
    rel = ours / o_g - 1
    print(f"  global RMSE, v2m_bench vs open3d on the sample: mean {ours.mean():.4f} vs {o_g.mean():.4f} mm; "
          f"relative difference mean {rel.mean():+.2%}, max |.| {np.abs(rel).max():.2%}")
    for name in regions:
        ours_p = parts[name].rmse[sample]
        rel = ours_p / o_p[name] - 1
        print(f"  {name}: mean {ours_p.mean():.4f} vs {o_p[name].mean():.4f} mm; relative difference mean "
              f"{rel.mean():+.2%}, median |.| {np.median(np.abs(rel)):.2%}, max |.| {np.abs(rel).max():.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
