"""BLAS and OpenMP on one thread: the one guard the build and the 3DMM fit use.

OpenBLAS rounds differently on different thread counts (the float32 ``(F, 513) @ (513, 64)`` mel
projection with F >= 64 frames, and the fit's products on a few hundred faces, differ in the last
bits on 1 and 2 threads), so the build computes every shard with BLAS on one thread, wherever it
runs; the fit also runs faster so (its products are small; threaded BLAS only spins against the
fit's chunk threads).
"""

from __future__ import annotations

import threading

from v2m_bench.errors import V2MError

__all__ = ["OneBlasThread", "one_blas_thread"]


class OneBlasThread:
    """BLAS and OpenMP thread pools on one thread while any holder in this process is inside.

    A context manager. OpenBLAS's pool (pthreads build) is process-wide, and its holders may run
    on several threads of one process (shards on the threads of a dask worker with
    ``threads_per_worker > 1``). A plain ``threadpool_limits(1)`` per holder is then wrong twice:
    threadpoolctl (>= 3.6) lets only one "controlling" thread change OpenBLAS and silently ignores
    the others, and the first holder to leave restores the original thread count while the others
    still compute (their bytes then depend on timing; the last one then "restores" the 1 it saw on
    entry and leaves the process on one thread). Here the first holder in sets every
    process-wide pool to one thread and the last one out restores it, under a lock, setting the
    libraries directly (any thread may); pools whose limit is per thread (OpenMP, OpenBLAS built
    on OpenMP) are set by each holder's own thread and restored by it. The depth count and the
    saved limits are a deliberate piece of process state: the thread pools they guard are one.

    Parameters
    ----------
    required : bool, default True
        Without ``threadpoolctl``: raise :class:`~v2m_bench.errors.V2MError` (True) or do nothing
        (False).
    """

    _lock = threading.Lock()
    _depth = 0
    _saved: tuple = ()

    def __init__(self, required: bool = True):
        self.required = bool(required)
        self._mine: tuple = ()

    def _controllers(self) -> list | None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - installed with scikit-learn (a librosa dependency)
            if self.required:
                raise V2MError("the build needs threadpoolctl (pip install threadpoolctl)") from None
            return None
        return list(ThreadpoolController().lib_controllers)

    @staticmethod
    def _per_thread(lib) -> bool:
        return lib.user_api == "openmp" or getattr(lib, "threading_layer", None) == "openmp"

    @staticmethod
    def _set(lib, n: int) -> None:
        # threadpoolctl's own setter without its one-controlling-thread rule for OpenBLAS
        getattr(lib, "_real_set_num_threads", lib.set_num_threads)(int(n))

    def __enter__(self) -> "OneBlasThread":
        cls = type(self)
        libs = self._controllers()
        if libs is None:
            self._mine = None
            return self
        with cls._lock:
            if cls._depth == 0:
                cls._saved = tuple((lib, lib.num_threads) for lib in libs if not self._per_thread(lib))
                for lib, _ in cls._saved:
                    self._set(lib, 1)
            cls._depth += 1
        self._mine = tuple((lib, lib.num_threads) for lib in libs if self._per_thread(lib))
        for lib, _ in self._mine:
            self._set(lib, 1)
        return self

    def __exit__(self, *exc) -> None:
        if self._mine is None:  # no threadpoolctl, nothing was changed
            return
        cls = type(self)
        for lib, n in self._mine:
            self._set(lib, n)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0:
                saved, cls._saved = cls._saved, ()
                for lib, n in saved:
                    self._set(lib, n)


def one_blas_thread(required: bool = True) -> OneBlasThread:
    """BLAS and OpenMP on one thread inside the ``with`` block, also when several threads of the
    process hold it at once (:class:`OneBlasThread`)."""
    return OneBlasThread(required)
