"""Executors for driving curation's scheduler in tests (see curation.executor.Executor for the
interface): a fake one that runs each task in this process with chosen failures, and a real
process pool whose chosen tasks kill their worker."""

from __future__ import annotations

import os
import signal
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from curation.executor import Executor


class FakeFuture:
    """A task submitted to :class:`FakeExecutor`: run when the executor lets it finish."""

    def __init__(self, fn: Callable, args: tuple, dies: bool) -> None:
        self.fn, self.args, self.dies = fn, args, dies
        self.finished, self.value, self.error = False, None, None

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except Exception as err:  # noqa: BLE001 - reported by result(), as a pool does
            self.error = err
        self.finished = True

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def task_of(fn: Callable, args: tuple) -> tuple[str, str, str]:
    """(function name, source, unit key or "inspect") of a task the scheduler submits."""
    if fn.__name__ == "run_unit":
        return fn.__name__, args[0].source, args[0].key
    return fn.__name__, str(args[0]) if args else "", "inspect"


class FakeExecutor:
    """Runs the tasks in this process (real work on real data), one per ``wait_any``: the oldest
    task held finishes, as if the pool ran them in order. Fails the tasks a test picks:

    - ``dies(task)`` true: the task kills its worker when it runs; as in a process pool, every
      task held then reports ``BrokenProcessPool`` until the scheduler restarts the pool;
    - ``interrupt_at``: submitting the n-th ``run_unit`` is stopped by Ctrl-C (``KeyboardInterrupt``).

    Records ``events`` ("submit" or "finish", :func:`task_of` tuple) in order, ``ran`` (the
    tasks submitted), how many tasks it held at each wait (``held``) and its ``restarts``.
    """

    kind = "fake"

    def __init__(self, max_in_flight: int = 4, dies: Callable[[tuple[str, str, str]], bool] | None = None,
                 interrupt_at: int | None = None) -> None:
        self.workers, self.max_in_flight = 2, max_in_flight
        self.dies, self.interrupt_at = dies or (lambda task: False), interrupt_at
        self.events: list[tuple[str, tuple[str, str, str]]] = []
        self.held: list[int] = []
        self.restarts = 0
        self._pool: list[FakeFuture] = []

    @property
    def ran(self) -> list[tuple[str, str, str]]:
        return [task for event, task in self.events if event == "submit"]

    def submit(self, fn: Callable, *args: Any) -> FakeFuture:
        task = task_of(fn, args)
        self.events.append(("submit", task))
        if self.interrupt_at is not None and sum(t[0] == "run_unit" for t in self.ran) == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        future = FakeFuture(fn, args, self.dies(task))
        self._pool.append(future)
        return future

    def wait_any(self, futures: list[Any]) -> list[Any]:
        self.held.append(len(futures))
        oldest = futures[0]  # the scheduler holds its futures in submission order
        if oldest.dies:  # its worker dies: every unfinished task in the pool is lost
            for future in self._pool:
                if not future.finished:
                    future.error = BrokenProcessPool("a process in the process pool was terminated abruptly")
                    future.finished = True
            return [f for f in futures if f.finished]
        oldest.run()
        self.events.append(("finish", task_of(oldest.fn, oldest.args)))
        return [oldest]

    def restart(self) -> None:
        self._pool = []
        self.restarts += 1

    def shutdown(self, cancel: bool = False) -> None:
        pass


def _kill_worker_or_run(kills: Callable[[tuple[str, str, str]], bool], fn: Callable, *args: Any) -> Any:
    """In a pool worker: SIGKILL this worker (as the OOM killer would) if ``kills`` picks the task."""
    if kills(task_of(fn, args)):
        os.kill(os.getpid(), signal.SIGKILL)
    return fn(*args)


class KillingExecutor(Executor):
    """A real process pool whose tasks picked by ``kills`` (a picklable, module-level function
    of :func:`task_of`'s tuple) kill their worker process."""

    def __init__(self, workers: int, kills: Callable[[tuple[str, str, str]], bool]) -> None:
        super().__init__(workers)
        self.kills = kills

    def submit(self, fn: Callable, *args: Any) -> Any:
        return super().submit(_kill_worker_or_run, self.kills, fn, *args)
