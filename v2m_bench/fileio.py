"""The project's file plumbing: atomic, link-safe writes, file hashes and progress bars.

Every module of voice2mesh that writes a file, hashes a file or shows a progress bar uses these
helpers, so they all give the same guarantees:

- :func:`atomic_path` / :func:`write_bytes` / :func:`write_text`: the content goes to a temporary
  file with an unpredictable name, created exclusively (``O_CREAT | O_EXCL``, so a planted link
  is never followed) in the destination folder; it is flushed to disk, then renamed over the
  destination. A failure at any point removes the temporary file and leaves an existing
  destination untouched. A destination that is a symbolic link is refused, never written
  through or replaced.
- :func:`open_exclusive`: create a new file (lock files, markers) without following a link.
- :func:`sha256_file`, :func:`md5_file`: streamed hashes.
- :func:`progress`: a tqdm bar on an interactive terminal (or when asked), nothing otherwise.

Imports with the standard library alone (tqdm is imported when a bar is shown).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import sys
from pathlib import Path
from typing import Iterator

from .errors import ValidationError

__all__ = [
    "atomic_path",
    "write_bytes",
    "write_text",
    "open_exclusive",
    "refuse_link",
    "sha256_file",
    "md5_file",
    "progress",
    "progress_enabled",
]

_CHUNK = 1 << 20


def refuse_link(path: str | os.PathLike) -> Path:
    """Raise :class:`ValidationError` when ``path`` is a symbolic link; return it as a Path."""
    path = Path(path)
    if path.is_symlink():
        raise ValidationError("is a symbolic link; refusing to write through or replace it", path=str(path))
    return path


def _umask() -> int:
    # Read without changing it (os.umask would set process-wide state, racing other threads).
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _new_temp(folder: Path, name: str) -> Path:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    stem = os.fsdecode(os.fsencode(name)[:64])  # names are limited in bytes (255), not characters
    for _ in range(100):
        tmp = folder / f".{stem}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
        os.close(fd)
        return tmp
    raise OSError(f"{folder}: could not create a temporary file")  # pragma: no cover


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary path; on success, move it over ``path`` atomically.

    The temporary file already exists (empty, created exclusively in ``path``'s folder) when the
    block starts: fill it by name (``h5py.File(tmp, "w")``, ``torch.save(obj, tmp)``, ...). When
    the block ends without an exception the file is fsynced, given the usual permissions
    (0666 less the umask) and renamed over ``path``; otherwise it is removed.

    Parameters
    ----------
    path : path
        The destination. Refused (:class:`~v2m_bench.errors.ValidationError`) when it is a
        symbolic link or a folder.
    mkdir : bool
        Create missing parent folders.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "out.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "out.txt").read_text()
    'hello'
    """
    path = refuse_link(path)
    if path.is_dir():
        raise ValidationError("is a folder, expected a file path", path=str(path))
    folder = path.parent
    if mkdir:
        folder.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(folder, path.name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        refuse_link(path)  # planted while the block ran
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return path


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    return write_bytes(path, text.encode(encoding))


def open_exclusive(path: str | os.PathLike, mode: int = 0o644) -> int:
    """Open ``path`` for reading and writing without ever following a symbolic link.

    Creates the file when missing; an existing regular file is opened as it is (not truncated).
    A symbolic link at ``path`` is refused (:class:`~v2m_bench.errors.ValidationError`).
    Returns an OS file descriptor (close it with :func:`os.close`).
    """
    path = Path(path)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    refuse_link(path)
    try:
        return os.open(path, flags, mode)
    except OSError as e:
        if path.is_symlink():
            raise ValidationError("is a symbolic link; refusing to open it", path=str(path)) from None
        raise e


def _hash_file(path: str | os.PathLike, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    return _hash_file(path, "sha256")


def md5_file(path: str | os.PathLike) -> str:
    """Hex md5 of a file's bytes, read in 1 MiB blocks (the checksums the BFM release publishes)."""
    return _hash_file(path, "md5")


def progress_enabled(flag: bool | None) -> bool:
    """Progress bars are on when asked (True), off when refused (False), else on a terminal only."""
    if flag is not None:
        return bool(flag)
    return sys.stderr.isatty()


class _NoBar:
    """Stands in for a tqdm bar when none is shown."""

    def __init__(self, iterable=None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    @staticmethod
    def write(s, file=None, end="\n"):
        """Print a line, as ``tqdm.write`` does (standard output by default)."""
        print(s, file=file if file is not None else sys.stdout, end=end)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it",
             enabled: bool | None = None, **kwargs):
    """A progress bar over ``iterable`` (or a manual one, with ``total``).

    Parameters
    ----------
    iterable : iterable, optional
    total : int, optional
    desc, unit : str
        The bar's label and unit.
    enabled : bool or None
        True: always shown; False: never; None: shown when stderr is a terminal.

    Returns
    -------
    tqdm or a silent stand-in with the same ``update`` / ``close`` / iteration interface.
    """
    if not progress_enabled(enabled):
        return _NoBar(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for v2m_bench
        return _NoBar(iterable)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, **kwargs)
