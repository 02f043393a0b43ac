"""Helpers shared by the click commands: turn voice2mesh errors into one line and exit 2."""

from __future__ import annotations

import errno
import functools
import os

import click

from v2m_bench.errors import V2MError
from v2m_bench.fileio import progress_enabled  # noqa: F401 - the commands' progress switch


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class UserError(click.ClickException):
    """A user-caused error: printed as ``error: <message>``, exit status 2."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def user_errors(fn):
    """Decorator: re-raise V2MError (and OSError on user files) as a one-line UserError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except V2MError as e:
            raise UserError(str(e)) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            raise UserError(f"{e.filename}: {e.strerror}") from None
        except OSError as e:  # disk full, read-only file system, ...: what was finished is kept
            if e.errno is None:
                raise
            what = e.strerror or os.strerror(e.errno)
            advice = "; free some space and rerun (finished work is kept)" if e.errno in _FULL else ""
            raise UserError(f"{e.filename}: {what}{advice}" if e.filename else f"{what}{advice}") from None

    return wrapper


def out_option(help: str, *, path_type=None, file_okay: bool = True, dir_okay: bool = True):
    """``--out PATH`` (required), also accepting the older positional form for one release.

    The decorated command takes ``out``. A positional output (``merge OUT``) still works, with a
    deprecation note on stderr; both at once, or neither, is a usage error.
    """
    from pathlib import Path

    ptype = click.Path(file_okay=file_okay, dir_okay=dir_okay, path_type=path_type or Path)

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, out=None, legacy_out=None, **kwargs):
            ctx = click.get_current_context()
            if out is not None and legacy_out is not None:
                raise click.UsageError(f"give the output once: --out {out} or the positional {legacy_out}", ctx)
            if out is None and legacy_out is None:
                raise click.UsageError("Missing option '--out'.", ctx)
            if legacy_out is not None:
                click.echo(f"note: the positional output is deprecated and will be removed; use --out {legacy_out}",
                           err=True)
                out = legacy_out
            return fn(*args, out=out, **kwargs)

        wrapper = click.option("--out", "out", type=ptype, default=None, help=f"{help}  [required]")(wrapper)
        return click.argument("legacy_out", required=False, metavar="", type=ptype)(wrapper)

    return deco
