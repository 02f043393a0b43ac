"""Digest of every output the project makes on one fixed case, for bit-for-bit before/after checks.

A refactoring must leave every score, build and checkpoint identical. This script runs the commands
a user runs on a fixed synthetic case and writes one fingerprint (sha256 over dtype, shape and
bytes) per array, per HDF5 dataset and attribute, per score and per checkpoint tensor:

1. ``v2m-build-dataset synth`` (8 identities, seed 3), then the build with ``--detector
   precomputed``: every dataset and attribute of every shard and of ``references.h5``, and the
   manifest without its timings, paths and versions;
2. ``v2m-train supervised`` (20 iterations, the README's tiny model) and ``v2m-predict``: every
   tensor of the checkpoint's model state and every array of the predictions file;
3. ``v2m-bench toy`` and ``v2m-bench score --json`` on its files and on the tiny model's
   predictions: every metric, interval, p-value and per-identity row;
4. the metric functions on seeded BFM meshes: ``are``, ``nme``, ``rmse_v2v`` and ``icp_scores``
   with per-vertex distances and transforms, with both ICP engines, globally and per part.

Usage::

    python benchmarks/output_digest.py --work DIR --out before.json     # on the old code
    python benchmarks/output_digest.py --work DIR2 --out after.json     # on the new code
    python benchmarks/output_digest.py --compare before.json after.json

``--compare`` prints the entries that differ, those only in one file (a new metric is not a
change of an old one), and exits 1 when any common entry differs. Needs the BFM (``--bfm`` or
``V2M_BFM_DIR``); takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# manifest fields that name the machine, the time or the folders, not the data
_VOLATILE = {"time", "seconds", "elapsed", "started", "finished", "created", "timestamp", "path", "paths",
             "versions", "version", "host", "hostname", "python", "platform", "root", "out", "voxceleb",
             "vggface", "duration_s", "wall_s", "timings", "throughput",
             # fingerprints of the input files and of the build (they include file times)
             "fingerprint", "inputs", "build"}


def _volatile(key: str) -> bool:
    """True for a field that is not data (matched on each name of a dotted or @ path)."""
    import re

    names = [n.split("[")[0] for n in re.split(r"[.@:/]", key)]
    return any(n in _VOLATILE or "version" in n or "time" in n.lower() for n in names[1:])


def _fp(a) -> str:
    a = np.asarray(a)
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    if a.dtype.kind == "O":
        h.update(repr(a.tolist()).encode())
    else:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:24]


def _h5(path: Path, prefix: str, out: dict) -> None:
    import h5py

    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[f"{prefix}:{name}"] = _fp(obj[()])
            for k, v in obj.attrs.items():
                if not _volatile(f"{prefix}:{name}@{k}"):
                    out[f"{prefix}:{name}@{k}"] = _fp(v)
        visit("/", f)
        f.visititems(visit)


def _json(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not _volatile(f"{prefix}.{k}"):
                _json(v, f"{prefix}.{k}", out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _json(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = repr(obj)


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def digest(work: Path) -> dict:
    import torch

    from v2m_bench import load_bfm, metrics
    from v2m_bench.topology import bfm_regions

    out: dict[str, str] = {}
    work.mkdir(parents=True, exist_ok=False)
    # 1. build
    _run([_bin("v2m-build-dataset"), "synth", "--out", "world", "--identities", "8", "--seed", "3"], work)
    _run([_bin("v2m-build-dataset"), "--voxceleb", "world", "--vggface", "world/vggface", "--detector", "precomputed",
          "--out", "build", "--no-progress"], work)
    for p in sorted((work / "build").rglob("*.h5")):
        _h5(p, f"build/{p.relative_to(work / 'build')}", out)
    _json(json.loads((work / "build" / "manifest.json").read_text()), "build/manifest", out)
    # 2. train and predict
    _run([_bin("v2m-train"), "supervised", "--data", "build", "--out", "tiny.pt", "--iterations", "20", "--batch-size", "8",
          "--channels", "64,32,32,32,32,16", "--min-frames", "100", "--max-frames", "200", "--workers", "0",
          "--device", "cpu", "--val-every", "0"], work)
    ck = torch.load(work / "tiny.pt", map_location="cpu", weights_only=False)
    state = ck.get("model", ck.get("state_dict", ck)) if isinstance(ck, dict) else ck
    for k, v in sorted(state.items()):
        if torch.is_tensor(v):
            out[f"checkpoint:{k}"] = _fp(v.numpy())
    _run([_bin("v2m-predict"), "--checkpoint", "tiny.pt", "--data", "build", "--out", "tiny_predictions.h5", "--device", "cpu"], work)
    _h5(work / "tiny_predictions.h5", "predictions", out)
    # 3. the score command
    _run([_bin("v2m-bench"), "toy", "--out", "toy"], work)
    for name, pred, ref, extra in (
        ("toy", "toy/good.h5", "toy/references.h5", ["--baseline", "toy/noisy.h5"]),
        ("tiny", "tiny_predictions.h5", "build/references.h5", []),
    ):
        _run([_bin("v2m-bench"), "score", pred, "--references", ref, "--bootstrap", "200", "--no-cache",
              "--json", f"{name}.json", "--csv", f"{name}.csv", *extra], work)
        doc = json.loads((work / f"{name}.json").read_text())
        doc.pop("provenance", None)
        _json(doc, f"score/{name}", out)
        lines = [ln for ln in (work / f"{name}.csv").read_text().splitlines() if not ln.startswith("#")]
        rows = list(csv.reader(lines))
        for j, col in enumerate(rows[0]):  # per column: a new column is not a change of the others
            out[f"score/{name}.csv[{col}]"] = _fp(np.array([r[j] for r in rows[1:]], dtype=object))
    # 4. the metric functions
    bfm = load_bfm()
    rng = np.random.default_rng(7)
    refs = bfm.vertices(rng.normal(size=(6, 40)) * bfm.shape_std, rng.normal(size=(6, 10)) * bfm.expression_std)
    preds = bfm.vertices(rng.normal(size=(12, 40)) * bfm.shape_std * 0.5, np.zeros((12, 10)))
    group = np.repeat(np.arange(6), 2)
    ref_per = refs[group]
    for k, v in metrics.are(preds, ref_per).items():
        out[f"metrics/are.{k}"] = _fp(v)
    out["metrics/nme"] = _fp(metrics.nme(preds, ref_per))
    for scale in (False, True):
        v2v = metrics.rmse_v2v(preds, ref_per, with_scale=scale)
        out[f"metrics/rmse_v2v[scale={scale}]"] = _fp(np.asarray(v2v.rmse if hasattr(v2v, "rmse") else v2v))
    regions = bfm_regions(bfm)
    icp_scores = getattr(metrics, "icp_scores", None)
    if icp_scores is None:  # before the metrics package re-exported it
        from v2m_bench.icp import icp_scores
    for engine in ("numba", "kdtree"):
        for scale in (False, True):
            glob, parts = icp_scores(preds, refs, bfm.triangles, regions=regions, group=group, with_scale=scale,
                                     engine=engine, return_distances=True)
            items = [("global", glob), *sorted(parts.items())]
            for part, r in items:
                for field in ("rmse", "distances", "rotation", "translation", "scale", "iterations"):
                    if getattr(r, field, None) is not None:
                        out[f"metrics/icp[{engine},scale={scale}].{part}.{field}"] = _fp(getattr(r, field))
    return out


_SHOWN = 12  # entries listed per side when one side has more


def compare(a: dict, b: dict) -> int:
    a = {k: v for k, v in a.items() if not _volatile(k)}
    b = {k: v for k, v in b.items() if not _volatile(k)}
    common = sorted(set(a) & set(b))
    diff = [k for k in common if a[k] != b[k]]
    print(f"{len(common)} common entries, {len(diff)} differ; {len(set(a) - set(b))} only in the first, "
          f"{len(set(b) - set(a))} only in the second")
    for k in diff:
        print(f"  differs: {k}")
    for side, keys in (("first", sorted(set(a) - set(b))), ("second", sorted(set(b) - set(a)))):
        for k in keys[:_SHOWN]:
            print(f"  only in the {side}: {k}")
        if len(keys) > _SHOWN:
            print(f"  ... and {len(keys) - _SHOWN} more only in the {side}")
    return 1 if diff else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="new folder for the case")
    ap.add_argument("--out", type=Path, help="digest JSON to write")
    ap.add_argument("--bfm", help="BFM folder (default: $V2M_BFM_DIR)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two digests")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*(json.loads(p.read_text()) for p in args.compare))
    if not (args.work and args.out):
        ap.error("--work and --out are required (or --compare A B)")
    if args.bfm:
        os.environ["V2M_BFM_DIR"] = args.bfm
    if not os.environ.get("V2M_BFM_DIR"):
        print("error: the BFM is needed: --bfm DIR or V2M_BFM_DIR", file=sys.stderr)
        return 2
    d = digest(args.work.resolve())
    from v2m_bench.fileio import write_text

    write_text(args.out, json.dumps(d, indent=1, sort_keys=True) + "\n")
    print(f"{len(d)} entries -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
