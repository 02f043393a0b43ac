"""``v2m-build-dataset``: build the training/test shards, references.h5 and manifest.json.

::

    v2m-build-dataset --voxceleb DIR --vggface DIR --out DIR [options]     # build (resumes)
    v2m-build-dataset merge --out OUT                                       # finish a shard array
    v2m-build-dataset synth --out OUT --identities N                        # a synthetic world
    v2m-build-dataset fetch-vggface --annotations DIR --out DIR [options]   # download VGGFace
    v2m-build-dataset audit BUILD [--truth WORLD/truth.h5] [--out DIR]      # label quality

Exit status: 0 when the build finished (per-item failures are recorded in OUT/manifest.json, not
fatal); 2 with a one-line ``error: ...`` for fatal input errors (missing folders, unreadable
metadata, no model, another build holding OUT).
"""

from __future__ import annotations

import click

from v2m_bench import __version__

from ._common import UserError, out_option, progress_enabled, user_errors


def _options(values) -> tuple:
    out = []
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--detector-option expects KEY=VALUE, got {item!r}")
        v: object = value
        if value.lower() in ("true", "false"):
            v = value.lower() == "true"
        else:
            try:
                v = int(value)
            except ValueError:
                try:
                    v = float(value)
                except ValueError:
                    v = value
        out.append((key.strip(), v))
    return tuple(sorted(out))


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="v2m-build-dataset")
@click.option("--voxceleb", metavar="DIR", help="VoxCeleb1 folder (wav/<id>/<video>/<n>.wav, or the wav folder itself).")
@click.option("--vggface", metavar="DIR", help="VGGFace folder (images/<Name>/<id>.jpg or <Name>/<id>.jpg; files/<Name>.txt).")
@click.option("--vox-meta", metavar="CSV", help="vox1_meta.csv (default: <voxceleb>/vox1_meta.csv).")
@click.option("--vggface-annotations", metavar="DIR", help="Folder of VGGFace <Name>.txt files (default: <vggface>/files).")
@click.option("--out", metavar="DIR", help="Output folder (resumed when it holds a previous build).")
@click.option("--bfm", metavar="DIR", help="3DDFA train.configs folder or model .npz (default: $V2M_BFM_DIR, then the cache).")
@click.option("--detector", type=click.Choice(["fan", "dlib", "precomputed", "mediapipe"]), default="fan", show_default=True,
              help="Landmark detector: face-alignment 3D-FAN (the paper's), dlib, <image>.pts/.npy files, or MediaPipe's 468-point model.")
@click.option("--detector-option", "detector_option", multiple=True, metavar="KEY=VALUE",
              help="Option of the detector's config (e.g. predictor_path=..., folder=..., face_detector=sfd); repeatable.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True,
              help="Device of the fan detector (auto: CUDA when available).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Parallel shard workers.")
@click.option("--backend", type=click.Choice(["loky", "dask"]), default="loky", show_default=True,
              help="joblib backend; dask uses a dask.distributed client (see --scheduler).")
@click.option("--scheduler", metavar="ADDRESS", help="dask scheduler address (default with --backend dask: a local cluster).")
@click.option("--limit-identities", type=click.IntRange(min=1), help="Only the first K identities by VoxCeleb1 id.")
@click.option("--identities-per-shard", type=click.IntRange(min=1), default=8, show_default=True,
              help="Identities in each shard (the unit of work, resumption and parallelism).")
@click.option("--shard-index", type=click.IntRange(min=0), default=0, show_default=True, help="This job's index in a job array.")
@click.option("--num-shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Jobs in the array (>1: write only this job's shards; finish with `merge OUT`).")
@click.option("--reference-overrides", metavar="FILE", help="CSV (identity,image) or JSON {identity: image} of hand-picked references.")
@click.option("--reference-rule", type=click.Choice(["identity", "image"]), default="identity", show_default=True,
              help="References: each identity's label (aggregate of its fits, neutral expression) or one picked image's fit.")
@click.option("--face-confirm", type=click.Choice(["auto", "dlib", "none"]), default="auto", show_default=True,
              help="Face gate: confirm a face in each annotated box with the detector's own evidence, dlib's HOG detector, or not.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: only on a terminal).")
@click.pass_context
@user_errors
def main(ctx, voxceleb, vggface, vox_meta, vggface_annotations, out, bfm, detector, detector_option, device, workers,
         backend, scheduler, limit_identities, identities_per_shard, shard_index, num_shards, reference_overrides,
         reference_rule, face_confirm, progress):
    """Build the Voice2Mesh dataset: per-utterance voice features and per-image face landmarks,
    crops and 3DMM fits in HDF5 shards, the benchmark's references.h5 and a manifest.

    \b
    Work is grouped into shards of --identities-per-shard identities (sorted by VoxCeleb1 id).
    A rerun skips finished shards. Per-item failures (bad audio or image, no face, a diverging
    fit) are recorded with their reason in OUT/manifest.json and do not stop the build.
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [n for n, v in (("--voxceleb", voxceleb), ("--vggface", vggface), ("--out", out)) if not v]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (or use a subcommand: merge, synth; see --help)")
    from v2m_data.facegate import FaceGateConfig
    from v2m_data.building import BuildConfig, build
    from v2m_data.references import ReferenceRule

    config = BuildConfig(
        voxceleb=voxceleb,
        vggface=vggface,
        out=out,
        vox_meta=vox_meta,
        vggface_annotations=vggface_annotations,
        bfm=bfm,
        detector=detector,
        detector_options=_options(detector_option),
        device=device,
        workers=workers,
        backend=backend,
        scheduler=scheduler,
        limit_identities=limit_identities,
        shard_index=shard_index,
        num_shards=num_shards,
        identities_per_shard=identities_per_shard,
        reference_overrides=reference_overrides,
        reference_rule=ReferenceRule(mode=reference_rule),
        face_gate=FaceGateConfig(confirm=face_confirm),
        progress=progress_enabled(progress),
    )
    result = build(config, log=lambda s: click.echo(s, err=True))
    click.echo(result.summary())


@main.command()
@out_option("The build folder the job array wrote into.", file_okay=False)
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: only on a terminal).")
@user_errors
def merge(out, progress):
    """Finish a shard-array build in --out: check that every job and shard is there, then write
    references.h5 and manifest.json."""
    from v2m_data.building import merge as do_merge

    result = do_merge(out, log=lambda s: click.echo(s, err=True), progress=progress_enabled(progress))
    click.echo(result.summary())


@main.command()
@out_option("Folder to write the world into (created).", file_okay=False)
@click.option("--identities", "n_identities", type=click.IntRange(min=1), default=12, show_default=True,
              help="Identities in the world (VoxCeleb1-style ids, names A–Z).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed (same seed, same world).")
@click.option("--bfm", metavar="PATH", help="Model to render: 3DDFA train.configs folder or .npz (default: $V2M_BFM_DIR, then the cache).")
@click.option("--images-per-identity", type=click.IntRange(min=1), default=None,
              help="VGGFace images per identity.  [default: the world's, see v2m_data.synth.SynthConfig]")
@click.option("--videos-per-identity", type=click.IntRange(min=1), default=None,
              help="VoxCeleb1 videos per identity.  [default: the world's]")
@click.option("--utterances-per-video", type=click.IntRange(min=1), default=None,
              help="Utterances per video.  [default: the world's]")
@click.option("--image-size", type=click.IntRange(min=32), default=None,
              help="Side of the square images in pixels.  [default: the world's]")
@click.option("--landmark-noise", type=click.FloatRange(0.0, 0.2), default=None,
              help="iid Gaussian noise on the .pts landmarks, fraction of the landmark box (0.02 = 2 %; default 0).")
@click.option("--overwrite", is_flag=True, help="Write over a previous world in --out.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: only on a terminal).")
@user_errors
def synth(out, n_identities, seed, bfm, images_per_identity, videos_per_identity, utterances_per_video, image_size,
          landmark_noise, overwrite, progress):
    """Write a synthetic world (VoxCeleb1 + VGGFace layout, .pts landmarks, truth.h5) into --out,
    to try the build with --voxceleb OUT --vggface OUT/vggface --detector precomputed."""
    from v2m_bench.bfm import load_bfm
    from v2m_data.synth import make_world

    opts = {
        k: v
        for k, v in (
            ("images_per_identity", images_per_identity),
            ("videos_per_identity", videos_per_identity),
            ("utterances_per_video", utterances_per_video),
            ("image_size", image_size),
            ("landmark_noise", landmark_noise),
        )
        if v is not None
    }
    summary = make_world(out, n_identities, seed, load_bfm(bfm), overwrite=overwrite, progress=progress_enabled(progress), **opts)
    click.echo(str(summary))


@main.command(name="fetch-vggface")
@click.option("--annotations", metavar="DIR", required=True, help="Folder of VGGFace <Name>.txt annotation files.")
@click.option("--out", metavar="DIR", required=True, help="Output folder: images/<Name>/<id>.jpg, files/, fetch-manifest.json (resumed).")
@click.option("--vox-meta", metavar="CSV", help="vox1_meta.csv naming the identities to fetch (needed with --identities-from vox1_meta).")
@click.option("--identities-from", type=click.Choice(["vox1_meta", "all"]), default="vox1_meta", show_default=True,
              help="Fetch the identities of vox1_meta.csv, or of every annotation file.")
@click.option("--workers", type=click.IntRange(min=1), default=32, show_default=True, help="Requests in flight at once.")
@click.option("--per-host", type=click.IntRange(min=1), default=2, show_default=True, help="Requests in flight at once to one host.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=15.0, show_default=True,
              help="Seconds per request (connect, each read, whole body).")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Retries of a timeout, connection error, 429 or 5xx (with backoff; Retry-After honoured).")
@click.option("--max-bytes", type=click.IntRange(min=1), default=20_000_000, show_default=True, help="Largest image accepted, bytes.")
@click.option("--curated-only", is_flag=True, help="Only the lines of the curated set (curation field 1).")
@click.option("--limit-per-identity", type=click.IntRange(min=1), help="Only the first K lines of each identity.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: only on a terminal).")
@user_errors
def fetch_vggface(annotations, out, vox_meta, identities_from, workers, per_host, timeout, retries, max_bytes,
                  curated_only, limit_per_identity, progress):
    """Download the VGGFace images named by the annotation files into OUT (the layout --vggface reads).

    \b
    Every response is checked (an image, big enough, the face box inside, not a placeholder
    served for many URLs) before it is kept; every URL gets a line in OUT/fetch-manifest.json.
    A rerun asks only for what is not settled (transient failures are retried).
    """
    from v2m_data.vggface_fetch import FetchConfig, fetch_vggface as do_fetch

    config = FetchConfig(
        annotations=annotations, out=out, vox_meta=vox_meta, identities_from=identities_from, workers=workers,
        per_host=per_host, timeout=timeout, retries=retries, max_bytes=max_bytes, curated_only=curated_only,
        limit_per_identity=limit_per_identity, progress=progress_enabled(progress),
    )
    result = do_fetch(config, log=lambda s: click.echo(s, err=True))
    click.echo(result.summary())


@main.command()
@click.argument("build_dir", metavar="BUILD")
@click.option("--truth", metavar="H5", default=None, help="truth.h5 of the synthetic world OUT was built from: also report fidelity.")
@click.option("--out", "out_dir", metavar="DIR", default=None, help="Write audit.json and audit.png here (default: print only).")
@click.option("--bfm", metavar="DIR", default=None, help="Model (default: the one the build used, then $V2M_BFM_DIR).")
@user_errors
def audit(build_dir, truth, out_dir, bfm):
    """Label-quality audit of a build: how consistent each identity's fits are (ICC over identities
    per ARE ratio), images per identity, fit residual and pose, a plain verdict; with --truth the
    correlation with the true faces per image, per identity and for the references."""
    import json
    from pathlib import Path

    from v2m_bench.bfm import load_bfm
    from v2m_bench.errors import ValidationError
    from v2m_bench.fileio import write_text
    from v2m_data.audit import RATIOS, audit_figure, fidelity, label_quality, verdict
    from v2m_data.shards import open_dataset

    root = Path(build_dir)
    man_path = root / "manifest.json"
    if not man_path.is_file():
        raise ValidationError("no manifest.json (not a finished build folder)", path=str(root))
    try:
        manifest = json.loads(man_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValidationError(f"unreadable manifest ({e})", path=str(man_path)) from None
    model = load_bfm(bfm or manifest.get("inputs", {}).get("bfm"))
    quality = manifest.get("quality")
    if not quality:
        ds = open_dataset(root)
        quality = label_quality([ds.split(s) for s in ds.splits], model)
    icc = quality["icc"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    ipi = quality["images_per_identity"]
    click.echo(f"build: {root}  detector: {manifest.get('parameters', {}).get('detector')}")
    click.echo("ICC(1) over identities: " + ", ".join(f"{k} {fmt(icc.get(k))}" for k in (*RATIOS, "shape")))
    click.echo(
        f"fits: {quality['n_fits']}; identities with fits {ipi['identities_with_fits']}, without {ipi['identities_without_fits']}; "
        f"fits per identity min {ipi['min']} median {ipi['median']:g} max {ipi['max']}"
    )
    for k in ("residual_normalized", "yaw", "pitch"):
        q = quality[k]
        click.echo(f"{k}: p5 {fmt(q['p5'])}  median {fmt(q['p50'])}  p95 {fmt(q['p95'])}")
    click.echo(f"verdict: {verdict(quality)}")
    fid = None
    if truth:
        fid = fidelity(root, truth, model)
        for lev in ("per_image", "per_identity", "references", "mean_face"):
            if lev not in fid:
                continue
            b = fid[lev]
            corr = ", ".join(f"{k} {fmt(b['corr'][k])}" for k in RATIOS) if "corr" in b else ""
            click.echo(f"fidelity {lev} (n={b['n']}): ARE vs truth median {fmt(b['are_median'])}" + (f"; correlation {corr}" if corr else ""))
    if out_dir:
        d = Path(out_dir)
        write_text(d / "audit.json", json.dumps({"quality": quality, "verdict": verdict(quality), "fidelity": fid}, indent=1) + "\n")
        audit_figure(quality, d / "audit.png", fid=fid, title=str(root.name))
        click.echo(f"wrote {d / 'audit.json'} and {d / 'audit.png'}")


if __name__ == "__main__":  # pragma: no cover
    main()
