"""``v2m-bench export``: write the meshes of a predictions or references file as OBJ or PLY."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import progress_enabled, user_errors


@click.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the meshes into (created).")
@click.option("--format", "fmt", type=click.Choice(["obj", "ply"]), default="obj", show_default=True,
              help="OBJ (text, 1-based faces) or binary little-endian PLY.")
@click.option("--units", type=click.Choice(["bfm", "mm"]), default="bfm", show_default=True,
              help="Coordinates in BFM units (micrometres) or millimetres.")
@click.option("--bfm", type=click.Path(path_type=Path), default=None,
              help="BFM folder (3DDFA train.configs) or .npz; default: $V2M_BFM_DIR, then the user cache.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@user_errors
def command(file, out, fmt, units, bfm, progress):
    """Write every mesh of FILE (a predictions.h5 or references.h5) as a mesh file.

    Predictions go to OUT/<identity>/<utterance>.obj (the layout convert-cmp reads), references to
    OUT/<identity>.obj; OUT/index.csv lists the rows and their files. Names from the file are made
    safe for paths (nothing is written outside OUT). Triangles are the BFM's, counter-clockwise
    seen from outside.

    \b
    Example:
      v2m-bench export predictions.h5 --out meshes --format ply --units mm
    """
    from v2m_bench.export import export_meshes

    result = export_meshes(file, out, bfm, format=fmt, units=units, progress=progress_enabled(progress))
    click.echo(str(result))
