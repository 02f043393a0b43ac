"""``v2m-bench convert-cmp FOLDER --out OUT.h5``: import the official release's OBJ predictions."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import out_option, progress_enabled, user_errors


@click.command("convert-cmp")
@click.argument("folder", type=click.Path(path_type=Path))
@out_option("predictions.h5 to write (atomically).", dir_okay=False)
@click.option(
    "--units",
    type=click.Choice(["bfm", "mm", "m", "official"]),
    default="bfm",
    show_default=True,
    help="Units of the OBJ coordinates. 'official': meshes written by the official "
    "Cross-Modal-Perceptionist scripts (BFM units times the predicted pose scale, ~5.92e-4); "
    "they are divided by 5.920184e-4 and stored in BFM units. See docs/formats.md.",
)
@click.option("--model-name", "--model", "model_name", default=None,
              help="Model name stored in the file attribute 'model'.")
@click.option(
    "--compression",
    type=click.Choice(["none", "gzip", "lzf"]),
    default="none",
    show_default=True,
    help="HDF5 compression of the vertices.",
)
@click.option(
    "--no-scale-check",
    is_flag=True,
    help="Accept meshes whose size is implausible for a face in --units (normally a units mix-up).",
)
@click.option(
    "--expected-vertices",
    type=click.IntRange(min=1),
    default=53215,
    show_default=True,
    hidden=True,
    help="Vertices per OBJ (the 3DDFA BFM has 53,215).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@user_errors
def command(folder, out, units, model_name, compression, no_scale_check, expected_vertices, progress):
    """Convert FOLDER/<Name>/<video>_<utt>.obj meshes into a predictions.h5 (--out).

    FOLDER is the official release's prediction layout: one folder per VGGFace1 name holding one
    OBJ per utterance (53,215 vertices). Identity = folder name, utterance = file stem. OUT is
    written atomically; an existing OUT is replaced only when the conversion succeeds.
    """
    from v2m_bench.convert import convert_cmp

    result = convert_cmp(
        folder,
        out,
        units=units,
        expected_vertices=expected_vertices,
        model=model_name,
        compression=None if compression == "none" else compression,
        check_scale=not no_scale_check,
        progress=progress_enabled(progress),
    )
    click.echo(str(result))
