"""Per-stage throughput of the dataset build (v2m_data.building) and a projection of the full build.

    python benchmarks/bench_build.py [--identities 4] [--images 10] [--utterances 8] [--seconds 8.2]
                                     [--image-size 256] [--fit-faces 4000] [--fan] [--json out.json]

Single-threaded (OMP/MKL/OpenBLAS/torch threads = 1, set before numpy is imported), so each
figure is per core. The inputs are a synthetic world (:func:`v2m_data.synth.make_world`) in the
real layouts: rendered BFM faces (``--image-size`` px JPEGs with .pts landmarks and VGGFace boxes)
and source-filter speech of ``--seconds`` seconds on average (VoxCeleb1: 153,516 utterances,
352 h, i.e. 8.2 s each). The model is the BFM of ``$V2M_BFM_DIR`` (the small random test model
when unset: the fit figure then is not the BFM's).

Stages, each timed on its own:

* audio        process_utterances: load + webrtc VAD + log-mel + normalise, per utterance;
* images       process_images with the precomputed detector: decode + .pts + 64/120 crops;
* dlib         process_images with the dlib 68-point predictor given the VGGFace box;
* fan (cpu)    with ``--fan``: face-alignment's 3D-FAN on the CPU given the box, with random
               weights of the real architecture (same compute; no real weights exist here);
* fit          fit_images (one batched fit_landmarks, one thread) on ``--fit-faces`` landmark sets;
* write        write_shard of the world as one shard (MB/s);
* end-to-end   build() with the precomputed detector, one worker (items/s).

The projection of the full 1,251-identity build (153,516 utterances, ~140,000 images) on one GPU
+ 16 cores assumes the CPU stages scale linearly over 16 worker processes and states the FAN GPU
throughput as an assumption (it cannot be measured here: no GPU, no real weights).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from _machine import machine  # noqa: E402  (benchmarks/_machine.py, beside this script)

FULL_UTTERANCES = 153_516
FULL_AUDIO_HOURS = 352.0
FULL_IMAGES = 140_000
CORES = 16
#: Assumed 3D-FAN throughput on one modern GPU with face-alignment's one-face-at-a-time API
#: (box given, FAN-4 + depth network, 256x256 input): a range, not a measurement.
FAN_GPU_IMG_S = (40.0, 120.0)


def _model():
    from v2m_bench.bfm import load_bfm

    if os.environ.get("V2M_BFM_DIR"):
        return load_bfm(), "BFM ($V2M_BFM_DIR)"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import make_small_model

    return make_small_model(0), "small random test model (set V2M_BFM_DIR for the BFM)"


def _ident_files(root: Path):
    from v2m_data.identities import find_vggface_dirs, select_identities, vggface_names
    from v2m_data.building import scan_identity

    images, ann = find_vggface_dirs(root / "vggface")
    table = select_identities(root / "vox1_meta.csv", vggface_names(ann, images))
    out = []
    for row, ident in enumerate(table.identities):
        out.append((ident, scan_identity(ident, root / "wav", images, ann), row))
    return out, images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=4)
    ap.add_argument("--images", type=int, default=10, help="images per identity")
    ap.add_argument("--utterances", type=int, default=8, help="utterances per identity (2 videos)")
    ap.add_argument("--seconds", type=float, default=8.2, help="mean utterance duration (uniform +-25 %%)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--fit-faces", type=int, default=4000)
    ap.add_argument("--fan", action="store_true", help="also time the 3D-FAN on the CPU (random weights)")
    ap.add_argument("--fan-images", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from v2m_data.audio import AudioConfig
    from v2m_data.fitting import FitConfig, KeypointSystem
    from v2m_data.landmarks import make_detector
    from v2m_data.building import BuildConfig, build, fit_images, process_images, process_utterances
    from v2m_data.synth import make_world

    info = machine(threads=1)
    model, model_name = _model()
    rows: dict = {}
    with tempfile.TemporaryDirectory(prefix="v2m-bench-build-") as tmp:
        tmp = Path(tmp)
        root = tmp / "world"
        t = time.perf_counter()
        d = args.seconds
        make_world(
            root, args.identities, 0, model, images_per_identity=args.images, videos_per_identity=2,
            utterances_per_video=max(1, args.utterances // 2), duration=(0.75 * d, 1.25 * d),
            image_size=args.image_size, progress=False,
        )
        rows["world_generation_s"] = time.perf_counter() - t
        model_path = tmp / "model.npz"
        model.save(model_path)
        ifs, images_root = _ident_files(root)
        n_utt = sum(len(f.utterances) for _, f, _ in ifs)
        n_img = sum(len(f.images) for _, f, _ in ifs)

        # audio (after a warm-up utterance: imports, filterbank)
        from v2m_data.building import IdentityFiles

        i0, f0, r0 = ifs[0]
        process_utterances([(i0, IdentityFiles(f0.utterances[:1], (), (), 0), r0)], root / "wav", AudioConfig())
        t = time.perf_counter()
        recs, fails = process_utterances(ifs, root / "wav", AudioConfig())
        dt = time.perf_counter() - t
        audio_s = sum(r["duration"] for r in recs)
        rows["audio"] = {"utterances": n_utt, "failed": len(fails), "audio_s": audio_s, "wall_s": dt,
                         "utt_per_s": len(recs) / dt, "x_real_time": audio_s / dt}

        # images with precomputed landmarks (decode + .pts + crops)
        det = make_detector("precomputed")
        t = time.perf_counter()
        img_recs, fails = process_images(ifs, images_root, det, (64, 120), 1.3)
        dt = time.perf_counter() - t
        rows["images_precomputed"] = {"images": n_img, "failed": len(fails), "wall_s": dt, "img_per_s": n_img / dt}

        # dlib with the VGGFace box
        try:
            det = make_detector("dlib")
            process_images(ifs[:1], images_root, det, (64, 120), 1.3)  # warm-up
            t = time.perf_counter()
            recs_d, fails = process_images(ifs, images_root, det, (64, 120), 1.3)
            dt = time.perf_counter() - t
            truth = {r["path"]: r["landmarks"] for r in img_recs}
            from v2m_data.landmarks import landmark_nme

            nme = [float(landmark_nme(r["landmarks"], truth[r["path"]])) for r in recs_d if r["path"] in truth]
            rows["images_dlib"] = {"images": n_img, "failed": len(fails), "wall_s": dt, "img_per_s": n_img / dt,
                                   "nme_vs_rendered_truth_median": float(np.median(nme)) if nme else None}
        except Exception as e:  # noqa: BLE001 - report, do not stop the benchmark
            rows["images_dlib"] = {"error": f"{type(e).__name__}: {e}"}

        # FAN on the CPU with random weights
        if args.fan:
            rows["images_fan_cpu"] = _fan_cpu(ifs, images_root, tmp, args.fan_images)

        # fitting
        lm = np.stack([r["landmarks"][:, :2] for r in img_recs]).astype(np.float64)
        reps = int(np.ceil(args.fit_faces / len(lm)))
        rng = np.random.default_rng(0)
        big = np.tile(lm, (reps, 1, 1))[: args.fit_faces] + rng.normal(0, 0.5, (args.fit_faces, 68, 2))
        system = KeypointSystem.from_model(model, FitConfig())
        fit_images(big[:64], system, FitConfig())  # warm-up
        t = time.perf_counter()
        fr = fit_images(big, system, FitConfig())
        dt = time.perf_counter() - t
        rows["fit"] = {"faces": len(big), "valid": int(fr.valid.sum()), "wall_s": dt, "faces_per_s": len(big) / dt}

        # end-to-end build (one worker) and writing
        out = tmp / "out"
        t = time.perf_counter()
        res = build(
            BuildConfig(voxceleb=str(root), vggface=str(root / "vggface"), out=str(out), bfm=str(model_path),
                        detector="precomputed", identities_per_shard=args.identities, progress=False),
            log=lambda s: None,
        )
        dt = time.perf_counter() - t
        shard_bytes = sum(p.stat().st_size for p in (out / "shards").glob("*.h5"))
        w = res.timings.get("shards.write", float("nan"))
        rows["end_to_end"] = {"wall_s": dt, "items": n_utt + n_img, "items_per_s": (n_utt + n_img) / dt,
                              "stage_s": {k: round(v, 3) for k, v in res.timings.items()}}
        rows["write"] = {"bytes": shard_bytes, "wall_s": w, "mb_per_s": shard_bytes / 1e6 / w if w else None}
        frames = res.counts.get("frames", 0)
        feat_bytes = frames * 64 * 4
        rows["write"]["feature_bytes"] = feat_bytes
        rows["write"]["image_bytes"] = shard_bytes - feat_bytes

    proj = project(rows)
    report = {"machine": info, "model": model_name, "args": vars(args) | {"json": str(args.json) if args.json else None},
              "rows": rows, "projection": proj}
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


def _fan_cpu(ifs, images_root, tmp: Path, n: int) -> dict:
    try:
        import torch
        from face_alignment.detection.sfd.net_s3fd import s3fd  # noqa: F401
        from face_alignment.models import FAN, ResNetDepth
    except ImportError as e:
        return {"error": f"face-alignment not installed ({e})"}
    from v2m_data.landmarks import FAN_WEIGHT_FILES, make_detector
    from v2m_data.building import IdentityFiles, process_images

    torch.set_num_threads(1)
    home = tmp / "torch"
    ck = home / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), ck / FAN_WEIGHT_FILES["3DFAN-4"])
    torch.save({"state_dict": {"module." + k: v for k, v in ResNetDepth().state_dict().items()}}, ck / FAN_WEIGHT_FILES["depth"])
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    try:
        import torch.hub

        torch.hub._hub_dir = None
        det = make_detector("fan", "cpu", face_detector="none")
        ident, files, row = ifs[0]
        sub = IdentityFiles((), files.images[:n], (), 0)
        process_images([(ident, IdentityFiles((), files.images[:1], (), 0), row)], images_root, det, (64, 120), 1.3)
        t = time.perf_counter()
        recs, fails = process_images([(ident, sub, row)], images_root, det, (64, 120), 1.3)
        dt = time.perf_counter() - t
        return {"images": len(sub.images), "failed": len(fails), "wall_s": dt, "img_per_s": len(sub.images) / dt,
                "note": "random weights of the real architecture, CPU, 1 thread"}
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old


def project(rows: dict) -> dict:
    """Wall time of the full build on 1 GPU + 16 cores from the per-core figures (see module docs)."""
    a = rows["audio"]
    audio_core_s = FULL_AUDIO_HOURS * 3600.0 / a["x_real_time"]
    img_core_s = FULL_IMAGES / rows["images_precomputed"]["img_per_s"]
    fit_core_s = FULL_IMAGES / rows["fit"]["faces_per_s"]
    w = rows["write"]
    total_bytes = FULL_AUDIO_HOURS * 3600.0 * 100 * 64 * 4 * 0.9 + FULL_IMAGES * (64 * 64 * 3 + 120 * 120 * 3 + 800)
    write_core_s = total_bytes / 1e6 / w["mb_per_s"] if w.get("mb_per_s") else float("nan")
    cpu_common = audio_core_s + img_core_s + fit_core_s + write_core_s
    out = {
        "assumptions": [
            f"{FULL_UTTERANCES} utterances, {FULL_AUDIO_HOURS:g} h of audio (VoxCeleb1), {FULL_IMAGES} images",
            f"{CORES} worker processes, CPU stages scale linearly (no shared-disk bottleneck)",
            "voiced audio = 90 % of the decoded audio (features stored per voiced 10 ms frame)",
            f"3D-FAN on one GPU: {FAN_GPU_IMG_S[0]:g}-{FAN_GPU_IMG_S[1]:g} images/s in all (assumed, not measured: "
            "no GPU and no real weights here); decode/crop CPU work is counted separately",
        ],
        "core_hours": {
            "audio": audio_core_s / 3600,
            "images_decode_crop": img_core_s / 3600,
            "fit": fit_core_s / 3600,
            "write": write_core_s / 3600,
        },
        "output_gb": total_bytes / 1e9,
    }
    # disk traffic: 16-bit wavs read, JPEGs read (~60 kB each, assumed), shards written
    io_bytes = FULL_AUDIO_HOURS * 3600.0 * 16000 * 2 + FULL_IMAGES * 60e3 + total_bytes
    out["io_gb"] = io_bytes / 1e9
    out["io_wall_h_at_500_mb_s"] = io_bytes / 500e6 / 3600
    out["assumptions"].append("disk: 500 MB/s in all for reading the wavs and JPEGs (~60 kB each) and writing the shards")
    dl = rows.get("images_dlib", {})
    if "img_per_s" in dl:
        dlib_core_s = FULL_IMAGES / dl["img_per_s"]  # includes decode + crops
        out["core_hours"]["dlib_landmarks"] = dlib_core_s / 3600
        out["wall_h_dlib_16_cores"] = (cpu_common - img_core_s + dlib_core_s) / CORES / 3600
    out["wall_h_precomputed_16_cores"] = cpu_common / CORES / 3600
    cpu_wall = cpu_common / CORES
    out["wall_h_fan_gpu"] = [max(cpu_wall, FULL_IMAGES / r) / 3600 for r in FAN_GPU_IMG_S[::-1]]
    fan = rows.get("images_fan_cpu", {})
    if "img_per_s" in fan:
        fan_core_s = FULL_IMAGES / fan["img_per_s"]
        out["core_hours"]["fan_cpu_landmarks"] = fan_core_s / 3600
        out["wall_h_fan_cpu_16_cores"] = (cpu_common - img_core_s + fan_core_s) / CORES / 3600
    return out


def _print(rep: dict) -> None:
    m, r, p = rep["machine"], rep["rows"], rep["projection"]
    print(f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, 1 thread, load {m['load_avg_1_5_15']}")
    print(f"model: {rep['model']}")
    a = r["audio"]
    print(f"audio features   {a['utterances']:5d} utt  {a['audio_s']:7.1f} s audio  {a['utt_per_s']:7.1f} utt/s  {a['x_real_time']:6.0f}x real time")
    i = r["images_precomputed"]
    print(f"decode+crops     {i['images']:5d} img  {i['img_per_s']:7.1f} img/s (precomputed landmarks)")
    d = r.get("images_dlib", {})
    if "img_per_s" in d:
        print(f"dlib landmarks   {d['images']:5d} img  {d['img_per_s']:7.1f} img/s incl. decode+crops (NME vs rendered truth {d['nme_vs_rendered_truth_median']:.3f})")
    else:
        print(f"dlib landmarks   {d.get('error')}")
    f = r.get("images_fan_cpu")
    if f:
        print(f"fan (cpu)        {f.get('images', 0):5d} img  {f.get('img_per_s', float('nan')):7.2f} img/s incl. decode+crops {f.get('note', f.get('error', ''))}")
    ft = r["fit"]
    print(f"fit              {ft['faces']:5d}      {ft['faces_per_s']:7.0f} faces/s ({ft['valid']} valid)")
    w = r["write"]
    print(f"write shards     {w['bytes'] / 1e6:7.1f} MB in {w['wall_s']:.3f} s = {w['mb_per_s']:.0f} MB/s")
    e = r["end_to_end"]
    print(f"end-to-end       {e['items']:5d} items {e['items_per_s']:7.1f} items/s ({e['wall_s']:.1f} s, one worker)")
    print("projection, full build (1,251 identities) on one GPU + 16 cores:")
    for s in p["assumptions"]:
        print(f"  - {s}")
    print("  core-hours: " + ", ".join(f"{k} {v:.2f}" for k, v in p["core_hours"].items()) + f"; output {p['output_gb']:.0f} GB")
    print(f"  compute wall: precomputed landmarks {60 * p['wall_h_precomputed_16_cores']:.1f} min; "
          + (f"dlib {60 * p['wall_h_dlib_16_cores']:.1f} min; " if "wall_h_dlib_16_cores" in p else "")
          + f"FAN on the GPU {60 * p['wall_h_fan_gpu'][0]:.0f}-{60 * p['wall_h_fan_gpu'][1]:.0f} min (GPU-bound)"
          + (f"; FAN on 16 CPU cores {p['wall_h_fan_cpu_16_cores']:.1f} h" if "wall_h_fan_cpu_16_cores" in p else ""))
    print(f"  disk: {p['io_gb']:.0f} GB moved, {60 * p['io_wall_h_at_500_mb_s']:.0f} min at 500 MB/s (overlaps the compute)")


if __name__ == "__main__":
    sys.exit(main())
