"""curation.scheduler.Scheduler driven by a fake executor (tests/curation_executors.py): real
units on real EM data, run in this process, with a worker's death or a task's failure made on
purpose, so each handler's effect on the corpus is checked deterministically."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from curation_executors import FakeExecutor
from PIL import Image

from curation.corpus import CorpusIndex
from curation.readers import SourceSpec
from curation.scheduler import WORKER_DIED, Scheduler
from curation.settings import CurateSettings
from curation.staging import StagingArea

NEUROPROOF = "neuroproof_fibsem_medulla/training_sample1/grayscale_maps"
ISBI = "isbi2012/train/images"


def _rows(corpus_dir: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(corpus_dir / "index.sqlite")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _schedule(tmp_path: Path, specs: list[SourceSpec], executor: FakeExecutor,
              settings: CurateSettings | None = None, staging_area: StagingArea | None = None) -> Scheduler:
    """Run the scheduler (extraction only) on ``specs`` into ``tmp_path / "c"``; the index is
    closed (and committed) when it returns or raises."""
    index = CorpusIndex(tmp_path / "c", (settings or CurateSettings()).to_json())
    try:
        scheduler = Scheduler(index, settings or CurateSettings(), executor, staging_area=staging_area,
                              progress=False)
        scheduler.run(specs)
    finally:
        index.close()
    return scheduler


def _isbi_images(shared_data: Path, n: int) -> list[SourceSpec]:
    """n real 512^2 ISBI 2012 slices as n 2D sources (4 patches each, cut during inspection)."""
    files = sorted((shared_data / ISBI).glob("*.png"), key=lambda f: int(f.stem))[:n]
    return [SourceSpec(path=str(f), name=f"isbi{k}") for k, f in enumerate(files)]


def _small_volume(shared_data: Path, name: str = "np") -> SourceSpec:
    """112 x 224 x 224 of NeuroProof's isotropic FIB-SEM: xy units, then xz / yz units."""
    return SourceSpec(path=str(shared_data / NEUROPROOF), name=name, stack=True, voxel_size=(10, 10, 10),
                      roi=(0, 112, 0, 224, 0, 224))


def test_units_finish_and_plane_units_wait_for_the_xy_units_that_stage_them(shared_data, tmp_path):
    executor = FakeExecutor(max_in_flight=3)
    scheduler = _schedule(tmp_path, [_small_volume(shared_data)], executor, CurateSettings(patches_per_unit=32))
    kinds = [key.split("-")[0] for fn, source, key in executor.ran]
    assert kinds[0] == "inspect" and kinds.count("inspect") == 1
    assert kinds.count("xy") == 4 and kinds.count("xz") >= 1 and kinds.count("yz") >= 1
    # the xz / yz units are cut from the staged volume: none is submitted before every xy unit finished
    events = [(event, task[2].split("-")[0]) for event, task in executor.events]
    last_xy = max(i for i, e in enumerate(events) if e == ("finish", "xy"))
    assert min(i for i, (event, kind) in enumerate(events) if kind in ("xz", "yz")) > last_xy
    assert max(executor.held) == 3 and executor.restarts == 0
    state = scheduler.sources["np"]
    assert state.open_work == 0 and state.plane_units is None and not state.failed and not state.lost_units
    # 112 xy planes of 1 patch, 224 xz and 224 yz planes of one 112 px high edge strip each
    assert _rows(tmp_path / "c", "SELECT status, n_patches FROM sources") == [("done", 112 + 224 + 224)]
    assert len(_rows(tmp_path / "c", "SELECT key FROM tasks")) == len(executor.ran) - 1
    assert not list((tmp_path / "c" / "work").glob("*.npy")), "staging must go when the source is done"


def test_a_worker_that_dies_once_reruns_the_tasks_it_held_one_at_a_time(shared_data, tmp_path, capsys):
    died = []

    def dies_once(task):
        if task[1] == "isbi2" and not died:
            died.append(task)
            return True
        return False

    executor = FakeExecutor(max_in_flight=4, dies=dies_once)
    _schedule(tmp_path, _isbi_images(shared_data, 6), executor, CurateSettings(filter="none"))
    assert executor.restarts == 1
    assert executor.held == [4, 4, 4, 1, 1, 1, 1]  # isbi2 died holding isbi2-5, which then ran alone
    assert [t[1] for t in executor.ran].count("isbi2") == 2
    assert _rows(tmp_path / "c", "SELECT DISTINCT status FROM sources") == [("done",)]
    assert _rows(tmp_path / "c", "SELECT COUNT(*) FROM patches")[0][0] == 6 * 4
    assert "a worker process died; the pool was restarted and the 4 tasks it held" in capsys.readouterr().err


def test_a_task_that_kills_its_worker_every_time_fails_only_its_source(shared_data, tmp_path):
    executor = FakeExecutor(dies=lambda task: task[1] == "greedy" and task[2].startswith("xy-"))
    specs = [_small_volume(shared_data, "greedy"), *_isbi_images(shared_data, 3)]
    scheduler = _schedule(tmp_path, specs, executor)
    status = dict(_rows(tmp_path / "c", "SELECT name, status FROM sources"))
    assert status == {"greedy": "failed", "isbi0": "done", "isbi1": "done", "isbi2": "done"}
    assert _rows(tmp_path / "c", "SELECT error FROM sources WHERE name = 'greedy'") == [(WORKER_DIED,)]
    assert _rows(tmp_path / "c", "SELECT path FROM skipped") == [(specs[0].path,)]
    assert scheduler.sources["greedy"].failed and not scheduler.unit_backlog
    assert not list((tmp_path / "c" / "work").glob("*.npy")), "a failed source's staging must go"


def test_a_source_that_fails_inspection_is_skipped_and_reported_and_the_rest_goes_on(shared_data, tmp_path):
    image = np.asarray(Image.open(sorted((shared_data / ISBI).glob("*.png"))[0]))
    Image.fromarray(image[:100, :100]).save(tmp_path / "crop.png")  # real data, smaller than half a patch
    specs = [_isbi_images(shared_data, 1)[0], SourceSpec(path=str(tmp_path / "crop.png"), name="crop"),
             _small_volume(shared_data)]
    executor = FakeExecutor()
    _schedule(tmp_path, specs, executor)
    status = dict(_rows(tmp_path / "c", "SELECT name, status FROM sources"))
    assert status == {"isbi0": "done", "crop": "failed", "np": "done"}
    ((path, problem),) = _rows(tmp_path / "c", "SELECT path, problem FROM skipped")
    assert path == str(tmp_path / "crop.png") and "smaller than half a patch" in problem
    assert not [t for t in executor.ran if t[1] == "crop" and t[0] == "run_unit"]


class _FullDisk(StagingArea):
    """Staging on a disk with 1 MB free."""

    def free_bytes(self, folder: Path) -> int:
        return 10**6


def test_no_room_to_stage_a_volume_fails_that_source_only(shared_data, tmp_path):
    """A staged copy written through a memory map into a full disk would kill the worker with
    SIGBUS; the space is checked and reserved up front, and only that source is skipped."""
    volume, image = _small_volume(shared_data), _isbi_images(shared_data, 1)[0]  # 5.6 MB to stage
    executor = FakeExecutor()
    _schedule(tmp_path, [volume, image], executor, staging_area=_FullDisk(tmp_path / "c", use_ram=False))
    assert dict(_rows(tmp_path / "c", "SELECT name, status FROM sources")) == {"np": "failed", "isbi0": "done"}
    ((error,),) = _rows(tmp_path / "c", "SELECT error FROM sources WHERE name = 'np'")
    assert error.startswith(f"not enough free space in {tmp_path / 'c' / 'work'} to stage") and "GiB free" in error
    assert _rows(tmp_path / "c", "SELECT path FROM skipped") == [(volume.path,)]
    assert not list((tmp_path / "c" / "work").glob("*.npy"))
    assert not [t for t in executor.ran if t[1] == "np" and t[0] == "run_unit"]


def test_ctrl_c_stops_the_run_and_keeps_the_finished_units(shared_data, tmp_path, capsys):
    executor = FakeExecutor(max_in_flight=1, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        _schedule(tmp_path, [_small_volume(shared_data)], executor, CurateSettings(patches_per_unit=32))
    assert "interrupted: finished units are saved" in capsys.readouterr().err
    assert [k for (k,) in _rows(tmp_path / "c", "SELECT key FROM tasks ORDER BY key")] == ["xy-00000", "xy-00032"]
    assert not list((tmp_path / "c" / "work").glob("*.npy")) and not list(
        Path("/dev/shm").glob(StagingArea(tmp_path / "c")._ram_prefix + "*")), "staging left behind"
