"""One convention for every command: outputs are --out, every option has help, required ones say
so, defaults are shown, and each program answers --version."""

import click
import pytest
from click.testing import CliRunner

from v2m_bench import __version__
from v2m_cli import bench, build, predict, train

PROGRAMS = {"v2m-bench": bench.main, "v2m-build-dataset": build.main, "v2m-train": train.main, "v2m-predict": predict.main}
# commands that only read (print, check) or write into a fixed place the user chose elsewhere
NO_OUTPUT = {"v2m-bench score", "v2m-bench fetch-bfm", "v2m-build-dataset audit"}


def _commands():
    for prog, group in PROGRAMS.items():
        yield prog, group
        for name, cmd in getattr(group, "commands", {}).items():
            yield f"{prog} {name}", cmd


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
def test_every_program_has_version(prog):
    res = CliRunner().invoke(PROGRAMS[prog], ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"{prog}, version {__version__}"


@pytest.mark.parametrize("name, cmd", list(_commands()), ids=[n for n, _ in _commands()])
def test_options_have_help_and_outputs_are_out(name, cmd):
    opts = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden and p.name != "help"]
    for p in opts:
        assert p.help, f"{name}: {p.opts[0]} has no help text"
        unset = p.default in (None, "") or p.default is getattr(click.core, "UNSET", None)
        if not unset and p.default not in (False, ()) and not p.is_flag and not p.multiple:
            assert p.show_default, f"{name}: {p.opts[0]} does not show its default ({p.default!r})"
    text = CliRunner().invoke(cmd, ["--help"], prog_name=name).output
    for p in opts:
        if p.required:
            line = " ".join(text.split())
            assert "[required]" in line, f"{name}: a required option is not marked [required]"
    writes = any(p.name == "out" for p in opts)
    args = [p.name for p in cmd.params if isinstance(p, click.Argument)]
    assert "out" not in args, f"{name}: the output is positional; use --out"
    if isinstance(cmd, click.Group) or name in NO_OUTPUT:
        return
    assert writes, f"{name}: a command that writes takes --out"
