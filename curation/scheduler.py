"""The extraction scheduler (stages 1-3 of :mod:`curation.pipeline`).

:class:`Scheduler` opens this run's sources, feeds their inspections and units to an executor
a few at a time, and records each result as it comes. Its state is named on the object (the
backlogs, the tasks in the pool, the suspects after a worker died) and per source in a
:class:`SourceState`; each event has its handler:

- :meth:`Scheduler.on_inspected`: a source was opened and sampled -> plan and queue its units;
- :meth:`Scheduler.on_unit_done` / :meth:`Scheduler.on_unit_failed`: a unit finished, or hit bad
  data in its range (that range is skipped, the rest of the source goes on);
- :meth:`Scheduler.on_worker_died`: a worker process died -> the tasks it held run again one at a
  time, and the one that kills its worker again fails its source only;
- :meth:`Scheduler.fail_source` / :meth:`Scheduler.on_source_finished`: a source ends.

The executor is anything with ``submit``, ``wait_any``, ``restart``, ``shutdown``, ``kind``,
``workers`` and ``max_in_flight`` (:class:`curation.executor.Executor`); tests drive the
scheduler with a fake one.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from curation.corpus import CorpusIndex
from curation.exemplar_store import ExemplarStore
from curation.executor import Executor
from curation.missing_chunks import record_missing_chunks
from curation.readers import ReaderError, source_fingerprint
from curation.resume import drop_damaged_shards, unique_name, why_cut_again
from curation.settings import PATCH_SETTINGS, PLAN_SETTINGS, CurateSettings
from curation.staging import StagingArea
from curation.units import Inspection, Unit, UnitKind, plan_units
from curation.workers import inspect_source, run_unit

WORKER_DIED = ("a worker process died while reading or cutting it (killed for lack of memory? "
               "try a smaller --memory-mb)")


def _problem(err: BaseException) -> str:
    text = str(err)
    return text if text else type(err).__name__


@dataclass
class SourceState:
    """What the scheduler knows of one source while this run cuts it."""

    spec: dict[str, Any]  # its SourceSpec as JSON, with its unique name in the corpus
    started: float = field(default_factory=time.perf_counter)
    open_work: int = 1  # queued or running, unfinished tasks (its inspection to begin with)
    failed: bool = False
    note: str | None = None  # why it is cut again (its files, settings or shards changed)
    plane_units: list[Unit] | None = None  # xz / yz units held back until its xy units staged the volume
    open_xy: set[str] = field(default_factory=set)  # keys of the xy units they wait for
    lost_units: list[str] = field(default_factory=list)  # ranges skipped for bad data ("xy 20-24")
    bad_z: list[tuple[int, int]] = field(default_factory=list)  # z-ranges missing from its staged copies
    missing: set[tuple[int, ...]] = field(default_factory=set)  # boxes of absent chunks read as fill value


@dataclass(frozen=True)
class Task:
    """What one future in the executor computes: a source's inspection (``unit`` None) or a unit."""

    source: str
    unit: Unit | None = None

    @property
    def id(self) -> tuple[str, str]:
        return (self.source, "inspect") if self.unit is None else (self.source, self.unit.key)


class Scheduler:
    """Runs extraction for every source of a run not finished yet; commits unit by unit."""

    def __init__(self, index: CorpusIndex, settings: CurateSettings, executor: Executor,
                 staging_area: StagingArea | None = None, progress: bool = True) -> None:
        self.index, self.settings, self.executor, self.progress = index, settings, executor, progress
        self.staging_area = staging_area or StagingArea(index.root, use_ram=executor.kind != "dask")
        self.cut_settings = {k: settings.to_json()[k] for k in (*PATCH_SETTINGS, *PLAN_SETTINGS)}
        self.sources: dict[str, SourceState] = {}
        self.pending: dict[Any, Task] = {}  # future -> what it computes
        # Work waits here and enters the pool a few tasks at a time, units of sources already open
        # before new sources: few sources in flight, so few staging copies alive at once.
        self.unit_backlog: deque[Unit] = deque()
        self.inspect_backlog: deque[str] = deque()
        # Tasks that were in the pool when a worker process died (OOM killer, SIGBUS ...): they run
        # again one at a time, so the one that kills its worker is found and only its source fails.
        self.suspects: set[tuple[str, str]] = set()
        self.n_patches = 0
        self.exemplars: ExemplarStore | None = None
        self.stage_dirs: tuple[str, ...] = ()  # where units stage their patches (exemplars-only storage)
        self.bar: Any = None

    # ------------------------------------------------------------------ the run
    def run(self, specs: Sequence[Any]) -> None:
        """Open ``specs`` (``curation.readers.SourceSpec``), then cut every source not done yet."""
        self.open_sources(specs)
        staging_area = self.staging_area
        for path in staging_area.discard_leftovers():  # safe: the index holds the corpus lock
            tqdm.write(f"removed {path}, staging left by an earlier run that was killed", file=sys.stderr)
        staging_area.start_janitor()  # before the pool forks its workers: they must not hold its pipe
        self.exemplars = ExemplarStore(self.index, self.settings, staging_area)
        self.stage_dirs = tuple(self.exemplars.stage_dirs)
        self.bar = tqdm(total=len(self.inspect_backlog), desc="extract", unit="unit", disable=not self.progress,
                        dynamic_ncols=True)
        try:
            self._loop()
        except KeyboardInterrupt:
            self.bar.close()
            self.executor.shutdown(cancel=True)
            print("\ninterrupted: finished units are saved; run the same command again to resume", file=sys.stderr)
            raise
        finally:
            self.exemplars.close()  # its staged units are gone before the janitor is sent away
            staging_area.close()
        self.bar.close()
        self.index.record_stage("exemplars", 0.0, self.exemplars.counts)

    def open_sources(self, specs: Sequence[Any]) -> None:
        """Name each source in the corpus, decide whether an earlier run's patches of it still
        hold, and queue the inspection of each one not finished."""
        index = self.index
        recut = drop_damaged_shards(index, {str(spec.path) for spec in specs}, self.progress)
        for spec in specs:
            spec_json = spec.to_json()
            name = unique_name(index, spec.name or Path(spec.path).stem, str(spec.path))
            spec_json["name"] = name
            row = index.source(name)
            try:
                fingerprint = source_fingerprint(spec.path, spec.key)
            except ReaderError as err:  # a URL that cannot be reached: skip it now, keep what it gave before
                index.add_skipped(str(spec.path), err.problem)
                tqdm.write(f"skipped {err}", file=sys.stderr)
                continue
            why = why_cut_again(row, fingerprint, self.cut_settings, spec_json)
            note = recut.get(name)
            if why:
                n = index.forget_source(name)  # never mix patches of two versions of a file or of a cut
                if n:
                    note = f"cut again, {why}: its {n} earlier patches were discarded"
                    tqdm.write(f"{spec.path}: {note}", file=sys.stderr)
                index.upsert_source(name, missing_chunks=None)  # found again by the new cut
                row = index.source(name)
            if row is not None and row["status"] == "done" and index.done_tasks(name) == index.all_tasks(name):
                if row.get("fingerprint") is None or row.get("cut_settings") is None:  # older corpus: baseline now
                    index.upsert_source(name, fingerprint=fingerprint, cut_settings=self.cut_settings)
                continue  # finished in an earlier run, every shard intact
            index.upsert_source(name, path=str(spec.path), dataset=spec_json.get("dataset") or name,
                                reader=spec_json, status="running", error=None, fingerprint=fingerprint,
                                cut_settings=self.cut_settings)
            missing = {tuple(b) for b in json.loads((row or {}).get("missing_chunks") or "[]")}
            self.sources[name] = SourceState(spec_json, note=note, missing=missing)
            index.clear_skipped(str(spec.path), parts=True)  # its bad ranges are tried again
            self.inspect_backlog.append(name)

    def _loop(self) -> None:
        self._fill()
        while self.pending:
            for fut in self.executor.wait_any(list(self.pending)):
                task = self.pending.pop(fut)
                self.bar.update(1)
                state = self.sources[task.source]
                state.open_work -= 1
                if state.failed:
                    continue
                try:
                    result = fut.result()
                except BrokenProcessPool:  # a worker died: every task in the pool is lost
                    self.on_worker_died(task)
                    break  # the other futures of this wait were broken too, and are requeued
                except Exception as err:  # noqa: BLE001 - one bad source must not stop the run
                    self.suspects.discard(task.id)
                    if task.unit is None:  # the source cannot even be opened and sampled
                        self.fail_source(task.source, err)
                        continue
                    self.on_unit_failed(task.unit, err)
                    self.on_unit_done(task.unit, None)
                else:
                    self.suspects.discard(task.id)
                    if task.unit is None:
                        self.on_inspected(task.source, result)
                    else:
                        self.on_unit_done(task.unit, result)
                self.bar.set_postfix(patches=self.n_patches)
                self._advance(task.source)
            self._fill()

    # ------------------------------------------------------------------ feeding the executor
    def _queue_units(self, units: list[Unit]) -> None:
        self.unit_backlog.extend(units)
        for unit in units:
            self.sources[unit.source].open_work += 1
        self.bar.total += len(units)
        self.bar.refresh()

    def _launch(self, fn: Callable, *args: Any) -> Any:
        try:
            return self.executor.submit(fn, *args)
        except BrokenProcessPool:  # a worker died while none of our tasks was waiting on it
            self.executor.restart()
            return self.executor.submit(fn, *args)

    def _fill(self) -> None:
        """Hand tasks to the executor up to its limit (one at a time while suspects run again)."""
        limit = 1 if self.suspects else self.executor.max_in_flight
        while len(self.pending) < limit and (self.unit_backlog or self.inspect_backlog):
            if self.unit_backlog:
                unit = self.unit_backlog.popleft()
                if self.sources[unit.source].failed:  # its source already failed: skip, do not run
                    self.sources[unit.source].open_work -= 1
                    self.suspects.discard((unit.source, unit.key))
                    self.bar.update(1)
                    continue
                self.pending[self._launch(run_unit, unit)] = Task(unit.source, unit)
            else:
                name = self.inspect_backlog.popleft()
                future = self._launch(inspect_source, name, self.sources[name].spec, str(self.index.root),
                                      self.settings, self.stage_dirs)
                self.pending[future] = Task(name)

    def _advance(self, name: str) -> None:
        """Release a source's plane units once its xy units staged the volume; finish the
        source once nothing of it is left to run."""
        state = self.sources[name]
        if state.plane_units is not None and not state.open_xy:
            planes, state.plane_units = state.plane_units, None
            for unit in planes:
                unit.bad_z = state.bad_z
            self._queue_units(planes)
        if state.plane_units is None and not state.open_work and not state.failed:
            self.on_source_finished(name)

    # ------------------------------------------------------------------ handlers
    def on_inspected(self, name: str, insp: Inspection) -> None:
        """A source was opened and sampled: record what it is; queue its units (a 2D image that
        fits one unit was cut during the inspection)."""
        state = self.sources[name]
        self.index.upsert_source(
            name, shape_zyx=list(insp.info["shape"]), dtype=str(insp.info["dtype"]),
            voxel_size_zyx=insp.info.get("voxel_size"), voxel_size_from=insp.info.get("voxel_size_from"),
            axes=insp.planes, uint8_rule=insp.converter.describe(),
            notes=insp.notes + ([state.note] if state.note else []),
        )
        if insp.result is not None:
            state.missing.update(insp.result.missing)
            self.exemplars.commit(name, insp.result)
            self.n_patches += len(insp.result.rows)
            return
        done = self.index.done_tasks(name)
        units = plan_units(name, state.spec, insp, str(self.index.root), self.settings, self.stage_dirs)
        xy = units.pop("xy", [])
        planes = [u for us in units.values() for u in us if u.key not in done]
        todo_xy = [u for u in xy if u.key not in done]
        if planes:  # the xy units stage the volume for them, the finished ones included
            shape, kinds = tuple(insp.info["shape"]), {u.kind for u in planes}
            try:
                zyx = self.staging_area.create(name, shape) if UnitKind.XZ in kinds else None
                xzy = self.staging_area.create(name, shape, "xzy") if UnitKind.YZ in kinds else None
            except OSError as err:  # e.g. no room for the staged copies
                self.fail_source(name, err)
                return
            for u in xy + planes:
                u.staging, u.staging_t = zyx, xzy
            self.exemplars.defer(name, zyx, xzy)
            for u in xy:
                if u.key in done:  # cut in an earlier run: only its data is needed
                    u.kind, u.key = UnitKind.STAGE, "stage-" + u.key
                    todo_xy.append(u)
            state.plane_units, state.open_xy = planes, {u.key for u in todo_xy}
        self._queue_units(todo_xy)

    def on_unit_done(self, unit: Unit, result: Any) -> None:
        """A unit finished (``result`` None: it failed and its range was skipped): record it."""
        state = self.sources[unit.source]
        if result is not None:
            state.missing.update(result.missing)
            if unit.kind != UnitKind.STAGE:
                self.exemplars.commit(unit.source, result)
                self.n_patches += len(result.rows)
        state.open_xy.discard(unit.key)

    def on_unit_failed(self, unit: Unit, err: BaseException) -> None:
        """A unit failed on bad data in its range: skip the range, keep the rest of the source.
        An xy range the xz / yz planes needed is left out of them too (see Unit.bad_z)."""
        state = self.sources[unit.source]
        where = f"{'xy' if unit.kind == UnitKind.STAGE else unit.kind.value} {unit.start}-{unit.stop}"
        if unit.kind in (UnitKind.XY, UnitKind.STAGE) and (unit.staging or unit.staging_t):
            state.bad_z.append((unit.start, unit.stop))
        state.lost_units.append(where)
        self.index.add_skipped(f"{state.spec['path']} ({where})", _problem(err))
        tqdm.write(f"skipped {state.spec['path']} ({where}): {_problem(err)}", file=sys.stderr)

    def on_worker_died(self, task: Task) -> None:
        """Every task in the pool is lost: restart the pool and run them again one at a time; a
        task that was already running alone is the one that kills its worker: its source fails."""
        crashed = [task, *self.pending.values()]
        self.pending.clear()
        self.executor.restart()
        self.bar.update(-1)  # the task that reported the crash is counted again when it is redone
        if len(crashed) == 1 and task.id in self.suspects:
            self.suspects.discard(task.id)
            self.fail_source(task.source, RuntimeError(WORKER_DIED))
            self.bar.update(1)
            return
        for lost in reversed(crashed):
            if lost.unit is None:
                self.inspect_backlog.appendleft(lost.source)
            else:
                self.unit_backlog.appendleft(lost.unit)
            self.suspects.add(lost.id)
        self.sources[task.source].open_work += 1  # back in the queue
        tqdm.write(f"a worker process died; the pool was restarted and the {len(crashed)} tasks it held "
                   "run again one at a time", file=sys.stderr)

    def fail_source(self, name: str, err: BaseException) -> None:
        """Give up on a source: skipped and reported; its finished units stay for a re-run."""
        state = self.sources[name]
        state.failed = True
        self.exemplars.settle(name)  # its units cut so far: their exemplars, from its staged copies
        self.staging_area.release(name)
        problem = _problem(err)
        self.index.upsert_source(name, status="failed", error=problem)
        self.index.add_skipped(state.spec["path"], problem)
        tqdm.write(f"skipped {state.spec['path']}: {problem}", file=sys.stderr)

    def on_source_finished(self, name: str) -> None:
        """Nothing of a source is left to run: record it done (or partial, with the ranges lost)."""
        state, index = self.sources[name], self.index
        crossing = "; xz / yz patches crossing those z-ranges are left out" if state.bad_z else ""
        if state.missing:
            record_missing_chunks(index, name, sorted(state.missing))
        if state.bad_z:  # its xz / yz units were cut around lost z-ranges: a re-run cuts them whole again
            index.forget_plane_units(name)
        lost = state.lost_units
        index.upsert_source(
            name, status="partial" if lost else "done", n_patches=index.count_patches(name),
            seconds=time.perf_counter() - state.started,
            error=f"{len(lost)} unit(s) unreadable, skipped: {', '.join(lost)}; the rest is cut{crossing}"
            if lost else None)
        self.exemplars.settle(name)  # before its staged copies go
        self.staging_area.release(name)
        index.clear_skipped(state.spec["path"])
