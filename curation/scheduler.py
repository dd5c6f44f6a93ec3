"""The extraction scheduler: opens this run's sources, feeds their inspections and units to an
executor a few at a time, and records each result as it comes (stages 1-3 of
:mod:`curation.pipeline`)."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, deque
from concurrent.futures.process import BrokenProcessPool
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
from curation.units import Inspection, Unit, plan_units
from curation.workers import inspect_source, run_unit


def _problem(err: BaseException) -> str:
    text = str(err)
    return text if text else type(err).__name__


def extract(
    index: CorpusIndex, specs: Sequence[Any], settings: CurateSettings, executor: Executor, progress: bool = True
) -> None:
    """Run stages 1-3 for every source not finished yet; commit unit by unit."""
    root, cfg = str(index.root), settings.to_json()
    pending: dict[Any, tuple[str, Any]] = {}  # future -> (what, payload)
    names: dict[str, Any] = {}
    changed: dict[str, str] = {}  # source -> note: cut again (its files or its settings changed)
    open_work: Counter[str] = Counter()  # source -> its queued or running, unfinished inspect / units
    # Work waits here and enters the pool a few tasks at a time, units of sources already open
    # before new sources: few sources in flight, so few staging copies alive at once.
    unit_backlog: deque[Unit] = deque()
    inspect_backlog: deque[str] = deque()
    # Tasks that were in the pool when a worker process died (OOM killer, SIGBUS ...): they run
    # again one at a time, so the one that kills its worker is found and only its source fails.
    suspects: set[tuple[str, str]] = set()
    lost_units: dict[str, list[str]] = {}  # source -> units skipped for bad data in their range
    bad_z: dict[str, list[tuple[int, int]]] = {}  # source -> z-ranges missing from its staged copies
    missing: dict[str, set[tuple[int, ...]]] = {}  # source -> boxes of absent chunks read as fill value
    cut = {k: cfg[k] for k in (*PATCH_SETTINGS, *PLAN_SETTINGS)}
    recut = drop_damaged_shards(index, {str(spec.path) for spec in specs}, progress)
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
        why = why_cut_again(row, fingerprint, cut, spec_json)
        if name in recut:
            changed[name] = recut[name]
        if why:
            n = index.forget_source(name)  # never mix patches of two versions of a file or of a cut
            if n:
                changed[name] = f"cut again, {why}: its {n} earlier patches were discarded"
                tqdm.write(f"{spec.path}: {changed[name]}", file=sys.stderr)
            index.upsert_source(name, missing_chunks=None)  # found again by the new cut
            row = index.source(name)
        if row is not None and row["status"] == "done" and index.done_tasks(name) == index.all_tasks(name):
            if row.get("fingerprint") is None or row.get("cut_settings") is None:  # older corpus: baseline now
                index.upsert_source(name, fingerprint=fingerprint, cut_settings=cut)
            continue  # finished in an earlier run, every shard intact
        index.upsert_source(name, path=str(spec.path), dataset=spec_json.get("dataset") or name,
                            reader=spec_json, status="running", error=None, fingerprint=fingerprint,
                            cut_settings=cut)
        names[name] = spec_json
        missing[name] = {tuple(b) for b in json.loads((row or {}).get("missing_chunks") or "[]")}
        index.clear_skipped(str(spec.path), parts=True)  # its bad ranges are tried again
        inspect_backlog.append(name)
        open_work[name] += 1

    staging_area = StagingArea(index.root, use_ram=executor.kind != "dask")
    for path in staging_area.discard_leftovers():  # safe: the index holds the corpus lock
        tqdm.write(f"removed {path}, staging left by an earlier run that was killed", file=sys.stderr)
    staging_area.start_janitor()  # before the pool forks its workers: they must not hold its pipe
    exemplars = ExemplarStore(index, settings, staging_area)
    cfg["stage_dirs"] = exemplars.stage_dirs
    bar = tqdm(total=0, desc="extract", unit="unit", disable=not progress, dynamic_ncols=True)
    bar.total = len(inspect_backlog)
    waiting_planes: dict[str, tuple[list[Unit], set[str]]] = {}  # source -> (plane units, open xy keys)
    failed: set[str] = set()
    t_source: dict[str, float] = {n: time.perf_counter() for n in names}
    n_patches = 0

    def submit(units: list[Unit]) -> None:
        unit_backlog.extend(units)
        open_work.update(u.source for u in units)
        bar.total += len(units)
        bar.refresh()

    def launch(fn: Callable, *args: Any) -> Any:
        try:
            return executor.submit(fn, *args)
        except BrokenProcessPool:  # a worker died while none of our tasks was waiting on it
            executor.restart()
            return executor.submit(fn, *args)

    def fill() -> None:
        while len(pending) < (1 if suspects else executor.max_in_flight) and (unit_backlog or inspect_backlog):
            if unit_backlog:
                unit = unit_backlog.popleft()
                if unit.source in failed:  # its source already failed: skip, do not run
                    open_work[unit.source] -= 1
                    suspects.discard((unit.source, unit.key))
                    bar.update(1)
                    continue
                pending[launch(run_unit, unit)] = ("unit", unit)
            else:
                name = inspect_backlog.popleft()
                pending[launch(inspect_source, name, names[name], root, cfg)] = ("inspect", name)

    def finish_source(name: str) -> None:
        count = index.db.execute("SELECT COUNT(*) FROM patches WHERE source=?", (name,)).fetchone()[0]
        lost = lost_units.get(name, [])
        crossing = "; xz / yz patches crossing those z-ranges are left out" if bad_z.get(name) else ""
        if missing.get(name):
            record_missing_chunks(index, name, sorted(missing[name]))
        if bad_z.get(name):  # its xz / yz units were cut around lost z-ranges: a re-run cuts them whole again
            with index.write():
                index.db.execute("DELETE FROM tasks WHERE source=? AND (key LIKE 'xz-%' OR key LIKE 'yz-%')", (name,))
        index.upsert_source(
            name, status="partial" if lost else "done", n_patches=count, seconds=time.perf_counter() - t_source[name],
            error=f"{len(lost)} unit(s) unreadable, skipped: {', '.join(lost)}; the rest is cut{crossing}"
            if lost else None)
        staging_area.release(name)
        index.clear_skipped(names[name]["path"])

    def lose_unit(unit: Unit, err: BaseException) -> None:
        """A unit failed on bad data in its range: skip the range, keep the rest of the source.
        An xy range the xz / yz planes needed is left out of them too (see Unit.bad_z)."""
        where = f"{'xy' if unit.kind == 'stage' else unit.kind} {unit.start}-{unit.stop}"
        if unit.kind in ("xy", "stage") and (unit.staging or unit.staging_t):
            bad_z.setdefault(unit.source, []).append((unit.start, unit.stop))
        lost_units.setdefault(unit.source, []).append(where)
        index.add_skipped(f"{names[unit.source]['path']} ({where})", _problem(err))
        tqdm.write(f"skipped {names[unit.source]['path']} ({where}): {_problem(err)}", file=sys.stderr)

    def task_id(what: str, payload: Any) -> tuple[str, str]:
        return (payload, "inspect") if what == "inspect" else (payload.source, payload.key)

    def worker_died(what: str, payload: Any) -> None:
        crashed = [(what, payload), *pending.values()]
        pending.clear()
        executor.restart()
        bar.update(-1)  # the task that reported the crash is counted again when it is redone
        if len(crashed) == 1 and task_id(what, payload) in suspects:  # it ran alone: it is the one
            name = task_id(what, payload)[0]
            suspects.discard(task_id(what, payload))
            fail_source(name, names[name]["path"], RuntimeError(
                "a worker process died while reading or cutting it (killed for lack of memory? "
                "try a smaller --memory-mb)"))
            bar.update(1)
            return
        for w, p in reversed(crashed):
            (unit_backlog if w == "unit" else inspect_backlog).appendleft(p)
            suspects.add(task_id(w, p))
        open_work[task_id(what, payload)[0]] += 1  # back in the queue
        tqdm.write(f"a worker process died; the pool was restarted and the {len(crashed)} tasks it held "
                   "run again one at a time", file=sys.stderr)

    def fail_source(name: str, path: str, err: BaseException) -> None:
        failed.add(name)
        staging_area.release(name)
        problem = _problem(err)
        index.upsert_source(name, status="failed", error=problem)
        index.add_skipped(path, problem)
        tqdm.write(f"skipped {path}: {problem}", file=sys.stderr)

    def maybe_release_planes(name: str) -> None:
        plane_units, open_xy = waiting_planes.get(name, ([], set()))
        if name in waiting_planes and not open_xy:
            del waiting_planes[name]
            for u in plane_units:
                u.bad_z = bad_z.get(name, [])
            submit(plane_units)
        if name not in waiting_planes and not open_work[name] and name not in failed:
            finish_source(name)

    try:
        fill()
        while pending:
            for fut in executor.wait_any(list(pending)):
                what, payload = pending.pop(fut)
                bar.update(1)
                name = payload if what == "inspect" else payload.source
                open_work[name] -= 1
                if name in failed:
                    continue
                try:
                    result = fut.result()
                except BrokenProcessPool:  # a worker died: every task in the pool is lost
                    worker_died(what, payload)
                    break  # the other futures of this wait were broken too, and are requeued
                except Exception as err:  # noqa: BLE001 - one bad source must not stop the run
                    suspects.discard(task_id(what, payload))
                    if what == "inspect":  # the source cannot even be opened and sampled
                        fail_source(name, names[name]["path"], err)
                        continue
                    lose_unit(payload, err)  # a bad range: the rest of the source is still good
                    result = None
                else:
                    suspects.discard(task_id(what, payload))
                if what == "inspect":
                    insp: Inspection = result
                    index.upsert_source(
                        name, shape_zyx=list(insp.info["shape"]), dtype=str(insp.info["dtype"]),
                        voxel_size_zyx=insp.info.get("voxel_size"),
                        voxel_size_from=insp.info.get("voxel_size_from"),
                        axes=insp.planes, uint8_rule=insp.converter.describe(),
                        notes=insp.notes + ([changed[name]] if name in changed else []),
                    )
                    if insp.result is not None:
                        missing[name].update(insp.result.missing)
                        exemplars.commit(name, insp.result)
                        n_patches += len(insp.result.rows)
                    else:
                        done = index.done_tasks(name)
                        units = plan_units(name, names[name], insp, root, cfg)
                        xy = units.pop("xy", [])
                        planes = [u for us in units.values() for u in us if u.key not in done]
                        todo_xy = [u for u in xy if u.key not in done]
                        if planes:
                            shape, kinds = tuple(insp.info["shape"]), {u.kind for u in planes}
                            try:
                                zyx = staging_area.create(name, shape) if "xz" in kinds else None
                                xzy = staging_area.create(name, shape, "xzy") if "yz" in kinds else None
                            except OSError as err:  # e.g. no room for the staged copies
                                fail_source(name, names[name]["path"], err)
                                continue
                            for u in xy + planes:
                                u.staging, u.staging_t = zyx, xzy
                            for u in xy:
                                if u.key in done:  # cut in an earlier run: only its data is needed
                                    u.kind, u.key = "stage", "stage-" + u.key
                                    todo_xy.append(u)
                            waiting_planes[name] = (planes, {u.key for u in todo_xy})
                        submit(todo_xy)
                else:
                    unit: Unit = payload
                    if result is not None:
                        missing[name].update(result.missing)
                    if result is not None and unit.kind != "stage":
                        exemplars.commit(name, result)
                        n_patches += len(result.rows)
                    if name in waiting_planes:
                        waiting_planes[name][1].discard(unit.key)
                bar.set_postfix(patches=n_patches)
                maybe_release_planes(name)
            fill()
    except KeyboardInterrupt:
        bar.close()
        executor.shutdown(cancel=True)
        print("\ninterrupted: finished units are saved; run the same command again to resume", file=sys.stderr)
        raise
    finally:
        exemplars.close()  # its staged units are gone before the janitor is sent away
        staging_area.close()
    bar.close()
    index.record_stage("exemplars", 0.0, exemplars.counts)
