"""Where units run: a process pool, a Dask cluster, or in-process, behind one small interface
(submit / wait_any / restart / shutdown) that the scheduler drives."""

from __future__ import annotations

import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Callable, Sequence


class _SerialFuture:
    def __init__(self, fn: Callable, args: tuple) -> None:
        try:
            self._value, self._error = fn(*args), None
        except BaseException as err:  # noqa: BLE001 - re-raised by result()
            self._value, self._error = None, err

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def done(self) -> bool:
        return True


def die_with_parent(parent_pid: int) -> None:
    """Pool-worker initializer: ask Linux to kill this worker when its parent dies.

    A worker orphaned by a killed ``cemnet curate`` would otherwise live on, holding memory
    and maybe memory-mapped staging files. No effect where ``prctl`` is unavailable."""
    try:
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _pool_context() -> Any:
    """fork on Linux (cheap), but spawn once tensorstore (N5 / precomputed sources) is loaded in
    this process: its threads make a forked child abort. (Not forkserver: its server keeps the
    environment of its first start, and remote sources take their settings from the environment.)"""
    import multiprocessing as mp

    linux_fork = sys.platform.startswith("linux") and "tensorstore" not in sys.modules
    return mp.get_context("fork" if linux_fork else "spawn")


class Executor:
    """A process pool, a Dask cluster, or in-process execution, behind submit / wait_any."""

    def __init__(self, workers: int = 2, scheduler: str | None = None) -> None:
        self.kind = "dask" if scheduler else ("serial" if workers <= 1 else "processes")
        self.workers = max(1, workers)
        # Tasks handed to the pool at once: enough to keep every worker busy; the rest wait in
        # the scheduler's backlog (waiting on 100k futures at a time is quadratic).
        self.max_in_flight = 4 * self.workers if workers > 1 else 1
        if scheduler:
            from distributed import Client

            self._client = Client(scheduler)
            self.max_in_flight = max(64, 4 * sum(self._client.nthreads().values()))
        elif workers > 1:
            self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=_pool_context(),
                                   initializer=die_with_parent, initargs=(os.getpid(),))

    def submit(self, fn: Callable, *args: Any) -> Any:
        if self.kind == "dask":
            return self._client.submit(fn, *args, pure=False)
        if self.kind == "processes":
            return self._pool.submit(fn, *args)
        return _SerialFuture(fn, args)

    def wait_any(self, futures: Sequence[Any]) -> list[Any]:
        if self.kind == "dask":
            from distributed import wait

            done, _ = wait(list(futures), return_when="FIRST_COMPLETED")
            return list(done)
        if self.kind == "processes":
            done, _ = futures_wait(list(futures), return_when=FIRST_COMPLETED)
            return list(done)
        return list(futures)

    def restart(self) -> None:
        """A fresh process pool after a worker died (the old pool is broken for good)."""
        if self.kind == "processes":
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()

    def shutdown(self, cancel: bool = False) -> None:
        if self.kind == "dask":
            self._client.close()
        elif self.kind == "processes":
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
