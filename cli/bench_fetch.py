"""``v2m-bench fetch-bfm``: download the 3DDFA Basel Face Model files with md5 checks."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import click

from v2m_bench.download import BFM_URLS, ChecksumError, default_bfm_dest, fetch_bfm
from v2m_bench.errors import DownloadError

from ._common import UserError, progress_enabled, user_errors


@click.command(name="fetch-bfm")
@click.option(
    "--base-url",
    metavar="URL",
    default=None,
    help="Mirror to fetch from instead of github.com/cleardusk/3DDFA: every file is fetched as "
    "URL/NAME from one flat folder (tri.mat included). http://, https:// or file:// URLs.",
)
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder to write the files into. Default: <cache>/bfm/train.configs, where load_bfm and "
    "every v2m-bench command find the model without V2M_BFM_DIR.",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="With --base-url only: accept files whose md5 differs from the genuine 3DDFA release "
    "(a warning says the model is not genuine). Files from the public URLs are always verified.",
)
@click.option("--force", is_flag=True, help="Download every file again even if a verified copy is there.")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bars (default: only on an interactive terminal)."
)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Network timeout in seconds.")
@user_errors
def command(base_url, dest, no_verify, force, progress, timeout):
    """Download the seven 3DDFA BFM files (train.configs layout) and check their md5.

    \b
    Source: github.com/cleardusk/3DDFA (train.configs/ and visualize/tri.mat).
    The BFM-derived files are for academic use under the Basel Face Model licence.
    Files already present with the right md5 are kept, so a rerun resumes.
    """
    if no_verify and base_url is None:
        raise UserError("--no-verify needs --base-url: files from the public 3DDFA URLs are always verified")
    source = base_url or "github.com/cleardusk/3DDFA"
    click.echo(f"fetching {len(BFM_URLS)} BFM files from {source}", err=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            where = fetch_bfm(
                dest=dest,
                base_url=base_url,
                verify=not no_verify,
                force=force,
                progress=progress_enabled(progress),
                timeout=timeout,
                log=lambda line: click.echo(f"  {line}", err=True),
            )
    except ChecksumError as e:
        if e.mirror:
            raise UserError(
                f"{e.name}: md5 mismatch for {e.url}: expected {e.expected}, got {e.got}; the mirror's file is "
                "not the genuine 3DDFA one (pass --no-verify to accept a non-genuine model)"
            ) from None
        raise
    except DownloadError as e:
        raise UserError(f"{e}; without internet access, point V2M_BFM_DIR (or --bfm) at a folder holding the seven "
                        "files, or fetch them from a mirror with --base-url URL") from None
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)

    where = where.resolve()
    click.echo(f"BFM files are in {where}")
    if dest is None or where == default_bfm_dest().resolve():
        env = os.environ.get("V2M_BFM_DIR")
        if env and Path(env).expanduser().resolve() != where:
            click.echo(f"note: V2M_BFM_DIR={env} takes precedence; unset it to use these files")
        else:
            click.echo("next: nothing to set, load_bfm() and v2m-bench find them there")
    else:
        click.echo(f"next: export V2M_BFM_DIR={where}   (or pass --bfm {where})")
