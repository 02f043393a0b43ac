"""The build's output-folder lock (``OUT/.lock``, ``fcntl.flock``)."""

from __future__ import annotations

import errno
import fcntl
import os
import platform
from pathlib import Path

from v2m_bench.errors import V2MError, ValidationError
from v2m_bench.fileio import open_exclusive

__all__ = ["BuildLock", "BuildLockedError"]


class BuildLockedError(V2MError):
    """Another build holds the output folder's lock."""


class BuildLock:
    """``OUT/.lock`` held with ``fcntl.flock`` for the duration of a build.

    A complete build and ``merge`` hold it exclusively and write their pid into it; shard-array
    jobs hold it shared (so several jobs run together while a complete build is refused) plus an
    exclusive ``OUT/.lock-job-I-of-N`` naming their pid. flock locks die with their process, so a
    killed build never blocks the rerun. The file is removed by the last holder.

    Parameters
    ----------
    out : path
    job : (int, int), optional
        ``(shard_index, num_shards)`` for a shard-array job.
    """

    def __init__(self, out: str | os.PathLike, job: tuple | None = None):
        self.out = Path(out)
        self.job = job
        self._fds: list = []

    @property
    def path(self) -> Path:
        return self.out / ".lock"

    def _job_path(self) -> Path:
        i, n = self.job
        return self.out / f".lock-job-{i:05d}-of-{n:05d}"

    @staticmethod
    def _holder(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def _take(self, path: Path, mode: int, write_pid: bool) -> int:
        for _ in range(20):
            fd = open_exclusive(path, 0o666)  # never through a planted link
            if os.fstat(fd).st_nlink != 1:  # a hard link to someone's file: never truncate it
                os.close(fd)
                raise ValidationError("has other hard links; refusing to use it as the build lock", path=str(path))
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise BuildLockedError(self._busy_message(path)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock
                os.close(fd)
                continue
            if write_pid:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {platform.node()}\n".encode())
            return fd
        raise BuildLockedError(f"{path}: cannot take the lock (the file keeps being replaced)")

    def _busy_message(self, path: Path) -> str:
        holder = self._holder(path)
        if not holder:
            jobs = sorted(self.out.glob(".lock-job-*"))
            pids = [f"{p.name[len('.lock-job-'):]}: {self._holder(p)}" for p in jobs if self._holder(p)]
            holder = "shard-array jobs" + (f" ({'; '.join(pids)})" if pids else "")
        return (
            f"{self.out}: another build is running on this output folder (held by {holder}); "
            "wait for it to finish or choose another --out"
        )

    def acquire(self) -> "BuildLock":
        self.out.mkdir(parents=True, exist_ok=True)
        if self.job is None:
            self._fds.append((self.path, self._take(self.path, fcntl.LOCK_EX, True), True))
        else:
            self._fds.append((self._job_path(), self._take(self._job_path(), fcntl.LOCK_EX, True), True))
            try:
                fd = self._take(self.path, fcntl.LOCK_SH, False)
            except BaseException:
                self.release()
                raise
            self._fds.append((self.path, fd, False))
        return self

    def release(self) -> None:
        while self._fds:
            path, fd, exclusive = self._fds.pop()
            try:
                if not exclusive:
                    try:  # the last shared holder removes the file
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        exclusive = True
                    except OSError:
                        pass
                if exclusive:
                    try:
                        if os.fstat(fd).st_ino == os.stat(path).st_ino:
                            path.unlink()
                    except FileNotFoundError:
                        pass
            finally:
                os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

