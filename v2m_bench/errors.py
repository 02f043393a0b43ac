"""Exception types of voice2mesh.

Every error a user can cause (a missing file, a wrong dataset shape, a missing model) is raised
as one of these, with a one-line message that names the file, key or field at fault. The command
line turns them into ``error: <message>`` and exit status 2, never a traceback.
"""

from __future__ import annotations

__all__ = ["V2MError", "ValidationError", "BFMNotFoundError", "DownloadError"]


class V2MError(Exception):
    """Base class of every error voice2mesh raises on purpose."""


class ValidationError(V2MError, ValueError):
    """A file or an array does not have the expected content.

    Parameters
    ----------
    message : str
        What is wrong, in one line.
    path : str, optional
        The file at fault; prefixed to the message.
    key : str, optional
        The dataset, attribute or field at fault; prefixed to the message.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None):
        self.path = None if path is None else str(path)
        self.key = key
        where = ""
        if self.path is not None:
            where += f"{self.path}: "
        if key is not None:
            where += f"{key}: "
        super().__init__(where + message)


class BFMNotFoundError(V2MError, FileNotFoundError):
    """No Basel Face Model files could be found where they were looked for."""


class DownloadError(V2MError, OSError):
    """A download failed or its content did not match the expected checksum."""
