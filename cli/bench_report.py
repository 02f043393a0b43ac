"""``v2m-bench report``: a static HTML page of a predictions file's scores, charts and faces."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import progress_enabled, user_errors


@click.command("report")
@click.argument("predictions", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--references", "-r", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="references.h5 (one reference mesh per test identity).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write index.html and its images into (created).")
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path),
              help="Another predictions file shown beside PREDICTIONS (relative change, paired bootstrap p-value).")
@click.option("--bfm", type=click.Path(path_type=Path), default=None,
              help="BFM folder (3DDFA train.configs) or .npz; default: $V2M_BFM_DIR, then the user cache.")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap resamples over identities for the 95% intervals (0: none).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the bootstrap.")
@click.option("--strict", is_flag=True, help="Reference identities without predictions are an error.")
@click.option("--with-scale", is_flag=True, help="Let the registrations (ICP and the RMSE_v2v alignment) fit a scale too.")
@click.option("--image-size", default=320, show_default=True, type=click.IntRange(min=32),
              help="Pixels (width = height) of each rendered face.")
@click.option("--expect-references", metavar="SHA256", default=None,
              help="Refuse references whose content fingerprint (printed under the table; JSON provenance) differs; "
                   "a prefix of at least 12 hex characters is enough.")
@click.option("--no-cache", is_flag=True, help="Compute the mean-face scores afresh instead of reading them from the user cache.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
@user_errors
def command(predictions, references, out, baseline, bfm, bootstrap, seed, strict, with_scale, image_size, expect_references,
            no_cache, progress):
    """Write an HTML report of PREDICTIONS (a predictions.h5) scored against the references.

    The page (OUT/index.html, viewable offline) shows the score table with 95% intervals beside
    the paper's numbers, the mean-face predictor and the baseline file; bar charts per metric;
    cumulative per-vertex error curves; the mean error drawn on the face; the best, median and
    worst identities rendered; and the per-identity table.

    \b
    Example:
      v2m-bench report predictions.h5 --references references.h5 --out report
    """
    from v2m_bench import load_bfm
    from v2m_bench.report import write_report
    from v2m_bench.scoring import ScoreConfig

    model = load_bfm(bfm)
    config = ScoreConfig(bootstrap=bootstrap, seed=seed, strict=strict, with_scale=with_scale,
                         expect_references=expect_references, chance_cache=not no_cache, progress=progress_enabled(progress))
    index = write_report(predictions, references, out, model, baseline=baseline, config=config,
                         image_size=image_size)
    if not model.is_genuine:
        click.echo("note: the BFM files are not the public 3DDFA release (md5 differ): dense-mesh metrics "
                   "are not comparable with the paper's numbers", err=True)
    click.echo(f"wrote {index}")
