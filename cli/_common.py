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
