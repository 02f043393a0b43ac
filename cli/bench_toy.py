"""``v2m-bench toy``: toy references and predictions to try the benchmark without a dataset."""

from __future__ import annotations

from pathlib import Path

import click

from v2m_bench import load_bfm
from v2m_bench.toy import make_toy_files

from ._common import user_errors


@click.command(name="toy")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write references.h5, good.h5 and noisy.h5 into.")
@click.option("--bfm", type=click.Path(path_type=Path), default=None,
              help="BFM folder (3DDFA train.configs) or .npz; default: $V2M_BFM_DIR, then the user cache.")
@click.option("--identities", type=click.IntRange(min=1), default=20, show_default=True,
              help="Made-up test identities (three predictions each).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same files).")
@user_errors
def command(out, bfm, identities, seed):
    """Write toy benchmark files: references of made-up identities drawn from the BFM statistics,
    and two predictions files, good.h5 (the shapes plus a little noise) and noisy.h5 (more)."""
    files = make_toy_files(out, load_bfm(bfm), identities=identities, seed=seed)
    click.echo(f"wrote {files.references}, {files.good}, {files.noisy}")
