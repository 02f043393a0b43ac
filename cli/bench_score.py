"""``v2m-bench score``: score a predictions file on the A–E benchmark."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import progress_enabled, user_errors


@click.command("score")
@click.argument("predictions", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--references", "-r", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="references.h5 (one reference mesh per test identity), from v2m-build-dataset.")
@click.option("--bfm", type=click.Path(path_type=Path), default=None,
              help="BFM folder (3DDFA train.configs) or .npz; default: $V2M_BFM_DIR, then the user cache.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the summary as JSON.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False, path_type=Path), help="Write one row per identity as CSV.")
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path),
              help="Another predictions file: relative change and paired bootstrap p-value per metric.")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap resamples over identities for the 95% intervals (0: none).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the bootstrap.")
@click.option("--strict", is_flag=True, help="Reference identities without predictions are an error.")
@click.option("--with-scale", is_flag=True, help="Let the registrations (ICP and the RMSE_v2v alignment) fit a scale too.")
@click.option("--device", default=None, help="torch device for the ICP (e.g. cuda); default numpy on the CPU.")
@click.option("--engine", type=click.Choice(["auto", "numba", "kdtree"]), default="auto", show_default=True,
              help="ICP implementation: numba (compiled) or the numpy path with k-d trees (same scores up to rounding; numba is faster).")
@click.option("--expect-references", metavar="SHA256", default=None,
              help="Refuse references whose content fingerprint (printed under the table; JSON provenance) differs; "
                   "a prefix of at least 12 hex characters is enough.")
@click.option("--no-cache", is_flag=True, help="Compute the mean-face scores afresh instead of reading them from the user cache.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@user_errors
def command(predictions, references, bfm, json_out, csv_out, baseline, bootstrap, seed, strict, with_scale, device, engine,
            expect_references, no_cache, progress):
    """Score PREDICTIONS (a predictions.h5) against the benchmark references.

    Prints ER, FR, MR, CR, their mean (ARE), NME, the ICP point-to-plane RMSE, the vertex-to-vertex
    RMSE, the six part RMSEs and the six part vertex-to-vertex RMSEs, each with a 95% bootstrap
    interval over identities, next to the mean-face predictor, and the references' content
    fingerprint.

    \b
    Example:
      v2m-bench score predictions.h5 --references references.h5 --json scores.json
    """
    from v2m_bench import load_bfm
    from v2m_bench.scoring import ScoreConfig, score

    model = load_bfm(bfm)
    config = ScoreConfig(bootstrap=bootstrap, seed=seed, strict=strict, with_scale=with_scale, device=device,
                         engine=engine, expect_references=expect_references, chance_cache=not no_cache,
                         progress=progress_enabled(progress))
    report = score(predictions, references, model, baseline=baseline, config=config)
    if report.missing:
        shown = ", ".join(report.missing[:5]) + (" ..." if len(report.missing) > 5 else "")
        click.echo(f"warning: {len(report.missing)} reference identities have no prediction ({shown})", err=True)
    if not model.is_genuine:
        click.echo("note: the BFM files are not the public 3DDFA release (md5 differ): dense-mesh metrics "
                   "are not comparable with the paper's numbers", err=True)
    click.echo(report.table())
    if json_out:
        report.to_json(json_out)
        click.echo(f"wrote {json_out}")
    if csv_out:
        report.to_csv(csv_out)
        click.echo(f"wrote {csv_out}")
