"""`cemnet curate`: sources -> uint8 planes -> patches + hashes -> dedup -> filter -> corpus.

Work is split into small units that run in parallel (a process pool by default, a Dask cluster
when given a scheduler address) and are recorded in the corpus index as they finish (committed
every few seconds), so Ctrl-C loses only the units in flight, a crash the last seconds of work,
and re-running the same command resumes:

1. *inspect* a source (one per file / stacked folder): open it, read its metadata, fit the
   uint8 mapping on a sample, plan the planes. A 2D image is patched in the same unit, unless
   it exceeds ``memory_mb`` and its reader can read regions (TIFF, HDF5, zarr): then *band* units
   cut it in rows of patches, in parallel.
2. *xy* units cut z-ranges of a volume; when the volume also gets xz/yz planes they write the
   uint8 data into staging memmaps (in RAM when they fit, else ``CORPUS/work``) as they go: the
   volume as read for the xz planes and an x-first copy for the yz planes, so that
   3. *plane* units (xz, yz) cut y- or x-ranges from contiguous staged data instead of
   re-decoding the source (slice folders and compressed TIFFs cannot be read sideways cheaply),
   and never read a staged file sideways (ruinous once it no longer fits in RAM).
   Memory per unit stays bounded (``memory_mb``), so volumes larger than RAM are fine.
4. *dedup* per dataset (or globally) and 5. *filter* the exemplars (in the worker pool).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from curation.corpus import CorpusIndex, write_index_cache
from curation.executor import Executor
from curation.remote import forget_unreadable
from curation.remote_sampling import expand_sampled
from curation.scheduler import Scheduler
from curation.settings import CurateSettings
from curation.stages import apply_filter, corpus_stats, deduplicate, drop_unneeded_pixels
from curation.workers import release_scratch_buffers


def curate(
    specs: Sequence[Any],
    out: str | os.PathLike,
    settings: CurateSettings | None = None,
    *,
    workers: int = 2,
    scheduler: str | None = None,
    skipped: Sequence[tuple[str, str]] = (),
    progress: bool = True,
    report: bool = True,
    executor: Executor | None = None,
) -> Path:
    """Build or extend the corpus at ``out`` from ``specs`` (``curation.readers.SourceSpec``).

    Returns the corpus folder. Sources finished in an earlier run are skipped; units finished
    before an interruption are kept. The work runs on ``executor`` when given (the caller shuts
    it down), else on one made from ``workers`` and ``scheduler``.

    Raises:
        curation.corpus.CorpusLockedError: another run (or open ``CorpusIndex``) is writing ``out``.
    """
    settings = settings or CurateSettings()
    forget_unreadable()  # remote chunks that failed in an earlier run in this process are asked again
    specs = expand_sampled(specs, settings)  # sampling budgets -> chunk-aligned blocks, each a source
    index = CorpusIndex(out, settings.to_json())  # holds the corpus lock until closed
    restore = _interrupt_on_termination()
    try:
        for path, problem in skipped:
            index.add_skipped(str(path), problem)
        own_executor = executor is None
        executor = executor or Executor(workers, scheduler)
        t0 = time.perf_counter()
        try:
            Scheduler(index, settings, executor, progress=progress).run(specs)
            index.record_stage("extract", time.perf_counter() - t0, {"workers": executor.workers,
                                                                   "executor": executor.kind})
            deduplicate(index, settings, progress)
            apply_filter(index, settings, progress=progress, executor=executor)
            drop_unneeded_pixels(index, settings, progress)
        finally:
            if own_executor:
                executor.shutdown()
            release_scratch_buffers()  # in-process (serial) runs: do not hold the buffers
        index.flush()  # readers (the cache, stats, report) see committed data only
        write_index_cache(index.root)  # after the last write to index.sqlite of this run
        index.meta["stats"] = corpus_stats(index.root)
        index.save_meta()
        if report:
            from curation.report import write_report

            write_report(index)
    finally:
        index.close()  # also when interrupted: a notebook can run curate again at once
        restore()
    return Path(out)


def _interrupt_on_termination() -> Callable[[], None]:
    """Make SIGTERM and SIGHUP (a job scheduler's stop, a closed terminal) end the run like
    Ctrl-C: finished work committed, staging removed. Returns what restores the old handlers.
    Only the main thread can set handlers; elsewhere this does nothing."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    old = {s: signal.signal(s, interrupt) for s in wanted}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore
