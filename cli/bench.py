"""``v2m-bench``: score predictions on the A–E benchmark, fetch the BFM, import other layouts."""

from __future__ import annotations

import click

from v2m_bench import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="v2m-bench")
def main():
    """The Voice2Mesh A–E benchmark: scoring, model files and format conversion."""


def _register():
    # each command lives in its own module; imported here so `v2m-bench --help` lists them all
    from . import bench_convert, bench_export, bench_fetch, bench_report, bench_score, bench_toy

    for mod in (bench_score, bench_report, bench_export, bench_toy, bench_fetch, bench_convert):
        main.add_command(mod.command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
