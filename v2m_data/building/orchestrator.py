"""The build's orchestration: resolve the inputs, plan the shards, take the lock, skip finished
shards, run the others (in this process, on loky workers or on a dask cluster), then write the
references and the manifest; and the merge of shard-array jobs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from v2m_bench.errors import V2MError, ValidationError
from v2m_bench.fileio import progress as progress_bar
from v2m_bench.fileio import write_bytes

from ..identities import find_vggface_dirs, job_shards, plan_shards, select_identities, vggface_names
from ..references import ReferenceRule, read_overrides
from ..shards import read_shard_report, shard_fingerprint_matches
from .config import BuildConfig, BuildResult
from .failures import short_reason
from .lock import BuildLock
from .manifest import add_totals, dump_json, finalize, plan_payload, shard_fingerprint
from .out_folder import MANIFEST_FORMAT, check_out, clean_tmp
from .scan import scan_identity
from .worker import ShardTask, build_shard, worker_resources

__all__ = ["build", "merge"]


def _resolve(config: BuildConfig) -> dict:
    """Validate the inputs (fatal errors) and resolve every path once, in the main process."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValidationError("exists and is not a folder (--out)", path=str(out))
    vox = Path(config.voxceleb)
    if not vox.is_dir():
        raise ValidationError("no such VoxCeleb folder (--voxceleb)", path=str(vox))
    wav_root = vox / "wav" if (vox / "wav").is_dir() else vox
    images_root, annotations = find_vggface_dirs(config.vggface, config.vggface_annotations)
    meta = Path(config.vox_meta) if config.vox_meta else vox / "vox1_meta.csv"
    if not meta.is_file():
        raise ValidationError(
            "no such metadata file" + ("" if config.vox_meta else " (give --vox-meta)"), path=str(meta)
        )
    from v2m_bench.bfm import find_bfm_dir, load_bfm

    bfm_path = find_bfm_dir(config.bfm).resolve()
    model = load_bfm(bfm_path)
    overrides = read_overrides(config.reference_overrides) if config.reference_overrides else None
    device = config.device
    if device == "auto":
        from ..landmarks import resolve_device

        device = resolve_device("auto") if config.detector == "fan" else "cpu"
    return {
        "wav_root": wav_root.resolve(),
        "images_root": images_root.resolve(),
        "annotations": annotations.resolve() if annotations else None,
        "meta": meta.resolve(),
        "bfm_path": bfm_path,
        "model": model,
        "overrides": overrides,
        "device": device,
    }


def _run(tasks: list, config: BuildConfig, on_done: Callable[[dict], None]) -> None:
    if not tasks:
        return
    if config.workers == 1 and config.backend == "loky":
        for t in tasks:
            on_done(build_shard(t))
        return
    from joblib import Parallel, delayed

    if config.backend == "loky":
        par = Parallel(n_jobs=int(config.workers), backend="loky", return_as="generator_unordered")
        for r in par(delayed(build_shard)(t) for t in tasks):
            on_done(r)
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise V2MError('--backend dask needs dask.distributed: pip install "dask[distributed]"') from None
    import joblib

    cluster = None
    try:
        if config.scheduler:
            try:
                client = Client(config.scheduler, timeout="20s")
            except (OSError, TimeoutError) as e:
                raise V2MError(f"cannot connect to the dask scheduler {config.scheduler}: {short_reason(e)}") from None
        else:
            cluster = LocalCluster(n_workers=int(config.workers), threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
            client = Client(cluster)
        try:
            with joblib.parallel_config(backend="dask"):
                results = Parallel(n_jobs=-1, return_as="generator_unordered")(delayed(build_shard)(t) for t in tasks)
                for r in results:
                    on_done(r)
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def build(config: BuildConfig, *, log: Callable[[str], None] | None = None) -> BuildResult:
    """Build the dataset (or this job's part of it in shard-array mode); resumable.

    Parameters
    ----------
    config : BuildConfig
    log : callable, optional
        Receives progress lines (default: print to stderr).

    Returns
    -------
    BuildResult

    Raises
    ------
    V2MError
        Fatal input problems (missing folders or metadata, no model, an unknown detector, a bad
        override file) or another build holding ``OUT`` (:class:`BuildLockedError`).
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    progress = config.progress if config.progress is not None else sys.stderr.isatty()
    timings: dict = {}
    t = time.perf_counter()
    resolved = _resolve(config)
    # fail early on a detector that cannot be made (package or weights missing); in a one-worker
    # build this is the instance every shard reuses
    worker_resources(config.detector, resolved["device"], tuple(config.detector_options), str(resolved["bfm_path"]), config.fit, True)
    out = Path(config.out)
    job = None if int(config.num_shards) == 1 else (int(config.shard_index), int(config.num_shards))
    result = BuildResult(out=out)
    check_out(out)
    with BuildLock(out, job):
        check_out(out)
        names = vggface_names(resolved["annotations"], resolved["images_root"])
        table = select_identities(resolved["meta"], names, limit=config.limit_identities)
        result.identities_summary = table.summary()
        log(f"identities: {table.summary()}")
        shards = plan_shards(table.identities, config.identities_per_shard)
        mine = job_shards(shards, config.shard_index, config.num_shards)
        timings["identities"] = time.perf_counter() - t
        t = time.perf_counter()
        clean_tmp(out, None if job is None else [s.name for s in mine])
        (out / "shards").mkdir(parents=True, exist_ok=True)
        payload = plan_payload(config, resolved, table, shards)
        params, inputs_key = payload["parameters"], payload["inputs"]
        tasks, fingerprints, skipped = [], {}, []
        with progress_bar(total=sum(len(s.identities) for s in mine), desc="scan files", unit="id",
                          enabled=bool(progress)) as bar:
            for s in mine:
                files = []
                for ident in s.identities:
                    files.append(scan_identity(ident, resolved["wav_root"], resolved["images_root"], resolved["annotations"]))
                    bar.update(1)
                fp = shard_fingerprint(params, inputs_key, s, files)
                fingerprints[s.name] = fp
                path = out / "shards" / f"{s.name}.h5"
                if shard_fingerprint_matches(path, fp):
                    skipped.append(s.name)
                    continue
                tasks.append(
                    ShardTask(
                        name=s.name,
                        split=s.split,
                        index=s.index,
                        fingerprint=fp,
                        identities=tuple(i.to_dict() for i in s.identities),
                        files=tuple((f.utterances, f.images, f.notes, f.annotated_missing) for f in files),
                        wav_root=str(resolved["wav_root"]),
                        images_root=str(resolved["images_root"]),
                        out_path=str(path),
                        detector=config.detector,
                        detector_options=tuple(config.detector_options),
                        device=resolved["device"],
                        bfm=str(resolved["bfm_path"]),
                        audio=config.audio,
                        fit=config.fit,
                        crop_sizes=tuple(int(x) for x in config.crop_sizes),
                        crop_scale=float(config.crop_scale),
                        face_gate=config.face_gate,
                        identity_label=config.identity_label,
                        progress=progress and config.workers == 1 and config.backend == "loky",
                    )
                )
        timings["scan"] = time.perf_counter() - t
        if skipped:
            log(f"resume: {len(skipped)} of {len(mine)} shards already finished, skipped")
        t = time.perf_counter()
        stage_time: dict = {}
        items = sum(len(u) + len(i) for tk in tasks for (u, i, _n, _m) in tk.files)
        with progress_bar(total=items, desc="shards", unit="item", enabled=bool(progress)) as bar:

            def done(rep: dict) -> None:
                result.shards_built += 1
                result.items_processed += rep["items"]
                for k, v in rep["timings"].items():
                    stage_time[k] = stage_time.get(k, 0.0) + v
                bar.update(rep["items"])
                bar.set_postfix_str(f"{result.shards_built}/{len(tasks)} shards")

            _run(tasks, config, done)
        timings["shards"] = time.perf_counter() - t
        timings.update({f"shards.{k}": v for k, v in stage_time.items()})
        result.shards_total = len(mine)
        result.shards_skipped = len(skipped)
        reports = [read_shard_report(out / "shards" / f"{s.name}.h5") for s in mine]
        add_totals(result, reports)
        for s in payload["shards"]:
            if s["file"][len("shards/"):-3] in fingerprints:
                s["fingerprint"] = fingerprints[s["file"][len("shards/"):-3]]
        if job is None:
            t = time.perf_counter()
            result.manifest = finalize(out, payload, config.reference_rule, resolved["overrides"], log, progress)
            timings["references+manifest"] = time.perf_counter() - t
            result.complete = True
            result.n_failures = len(result.manifest["failures"])
            result.failures_by_stage = dict(result.manifest["failures_by_stage"])
        else:
            jobdoc = dict(payload)
            jobdoc["job"] = {"shard_index": job[0], "num_shards": job[1], "shards": [s.name for s in mine]}
            jobdoc["format"] = MANIFEST_FORMAT + "-job"
            (out / "jobs").mkdir(exist_ok=True)
            write_bytes(out / "jobs" / f"job-{job[0]:05d}-of-{job[1]:05d}.json", dump_json(jobdoc))
            log(f"job {job[0]} of {job[1]} done; run `v2m-build-dataset merge --out {out}` when every job has finished")
    result.timings = timings
    return result


def merge(out: str | os.PathLike, *, log: Callable[[str], None] | None = None, progress: bool | None = None) -> BuildResult:
    """Finish a shard-array build: check every job and shard, write references.h5 and manifest.json.

    Parameters
    ----------
    out : path
        The build folder the jobs wrote (``OUT/jobs/job-*.json`` and ``OUT/shards``).

    Returns
    -------
    BuildResult

    Raises
    ------
    V2MError
        No job manifests, jobs that disagree on the plan or parameters, a missing job or shard.
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    out = Path(out)
    if not out.is_dir():
        raise ValidationError("no such build folder", path=str(out))
    with BuildLock(out):
        jobs = sorted((out / "jobs").glob("job-*-of-*.json")) if (out / "jobs").is_dir() else []
        if not jobs:
            raise ValidationError("no job manifests (jobs/job-*-of-*.json); run the shard-array jobs first", path=str(out))
        check_out(out)
        clean_tmp(out, None)
        docs = []
        for p in jobs:
            try:
                docs.append(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as e:
                raise ValidationError(f"unreadable job manifest: {short_reason(e)}", path=str(p)) from None
        first = docs[0]
        n = int(first["job"]["num_shards"])
        keys = ("inputs", "parameters", "identities")
        for p, d in zip(jobs, docs):
            if int(d["job"]["num_shards"]) != n:
                raise ValidationError(f"job of {d['job']['num_shards']} shards mixed with jobs of {n}; remove stale job files", path=str(p))
            for k in keys:
                if d[k] != first[k]:
                    raise ValidationError(f"the jobs disagree on {k} (were they run with different options?)", path=str(p))
            if [{k: v for k, v in s.items() if k != "fingerprint"} for s in d["shards"]] != [
                {k: v for k, v in s.items() if k != "fingerprint"} for s in first["shards"]
            ]:
                raise ValidationError("the jobs disagree on the shard plan", path=str(p))
        have = {int(d["job"]["shard_index"]) for d in docs}
        missing_jobs = [i for i in range(n) if i not in have]
        fps = {}
        for d in docs:
            for s in d["shards"]:
                if "fingerprint" in s:
                    fps[s["file"]] = s["fingerprint"]
        missing = []
        for s in first["shards"]:
            fp = fps.get(s["file"])
            if fp is None or not shard_fingerprint_matches(out / s["file"], fp):
                missing.append(f"{s['file']} (job {s['number'] % n})")
        if missing_jobs or missing:
            what = []
            if missing_jobs:
                what.append(f"jobs not finished: {', '.join(str(i) for i in missing_jobs)}")
            if missing:
                what.append(f"shards missing or incomplete: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
            raise ValidationError("; ".join(what) + "; rerun those jobs (they resume)", path=str(out))
        payload = {k: v for k, v in first.items() if k not in ("job", "format")}
        payload["shards"] = [{**s, "fingerprint": fps[s["file"]]} for s in first["shards"]]
        tools = [d["tools"] for d in docs]
        if any(t != tools[0] for t in tools):
            payload["tools"] = {"job_0": tools[0], "differing_jobs": {str(d["job"]["shard_index"]): d["tools"] for d in docs if d["tools"] != tools[0]}}
        params = payload["parameters"]
        rule = ReferenceRule(**params["reference_rule"])
        ov = payload["inputs"].get("reference_overrides")
        overrides = read_overrides(ov) if ov else None
        result = BuildResult(out=out)
        result.manifest = finalize(out, payload, rule, overrides, log, bool(progress))
        result.complete = True
        result.shards_total = len(payload["shards"])
        result.shards_skipped = len(payload["shards"])
        reports = [read_shard_report(out / s["file"]) for s in payload["shards"]]
        add_totals(result, reports)
        result.n_failures = len(result.manifest["failures"])
        result.failures_by_stage = dict(result.manifest["failures_by_stage"])
        c = payload["identities"]["counts"]
        result.identities_summary = f"{c['candidates']} candidates ({c['test']} test / {c['train']} train)"
    return result
