"""Records finished units in the index, storing the pixels of their exemplars only."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from curation.corpus import CorpusIndex, hash_from_db
from curation.exemplars import OnlineExemplars, visit_keys
from curation.pixels import PIXEL_ROW_COLUMNS, discard_staged_units, store_settled_pixels, store_unit_pixels
from curation.settings import CurateSettings
from curation.staging import StagingArea
from curation.units import UnitResult


class ExemplarStore:
    """Stores the pixels of a finished unit's exemplars only (see :mod:`curation.pixels`).

    Units stage all their patches in ``stage_dirs`` (RAM first, then ``CORPUS/work/units``);
    :meth:`commit` keeps the patches that are exemplars of everything cut so far in their dedup
    group (:class:`curation.exemplars.OnlineExemplars`, started from the corpus's earlier
    patches), writes their pixels to the unit's shard, removes the staging file and records the
    unit. With ``keep_all_pixels`` units write their shards themselves and this only records.
    """

    def __init__(self, index: CorpusIndex, settings: CurateSettings, staging_area: StagingArea) -> None:
        self.index, self.settings = index, settings
        self.tracker = OnlineExemplars(settings.dedup_distance, enabled=settings.dedup_scope != "none")
        self.stage_dirs = [] if settings.keep_all_pixels else [str(d) for d in staging_area.unit_dirs()]
        discard_staged_units(self.stage_dirs)  # a killed run's (we hold the corpus lock)
        self.counts = {"patches": 0, "stored": 0, "settle_seconds": 0.0}
        self._deleter = ThreadPoolExecutor(max_workers=1)  # frees staging files off the main thread
        self.deferred: dict[str, tuple[str | None, str | None]] = {}  # source -> its staged copies (zyx, xzy)

    def _group(self, source: str) -> str:
        if self.settings.dedup_scope == "global":
            return "*"
        row = self.index.source(source)
        return (row and row["dataset"]) or source

    def _seed(self, group: str) -> None:
        # deferred sources' patches join the group when they settle
        t = self.index.dataset_patch_table(["source", "axis", "slice", "y", "x", "hash"], group, self.deferred)
        keys = visit_keys(self.settings.seed, t["source"], t["axis"], t["slice"], t["y"], t["x"])
        self.tracker.seed(group, hash_from_db(t["hash"].astype(np.int64)), keys)

    def commit(self, source: str, result: UnitResult) -> None:
        rows = result.rows
        if result.staged is not None:
            group = self._group(source)
            if group not in self.tracker.groups:
                self._seed(group)
            cols = list(zip(*rows)) if rows else [()] * 10
            keys = visit_keys(self.settings.seed, cols[0], cols[3], np.array(cols[4], dtype=np.int64),
                              np.array(cols[5], dtype=np.int64), np.array(cols[6], dtype=np.int64))
            keep = self.tracker.admit(group, hash_from_db(np.array(cols[9], dtype=np.int64)), keys)
            rows, checksum = store_unit_pixels(self.index.root, result.staged, result.shard, rows, keep,
                                               remove=lambda path: self._deleter.submit(os.unlink, path))
            self.counts["stored"] += int(keep.sum())
        elif result.deferred:  # pixels come when its source settles
            checksum = None
        else:  # the unit wrote its shard, all of its patches, itself
            checksum = result.checksum
            self.counts["stored"] += len(rows)
        self.counts["patches"] += len(rows)
        self.index.commit_task(source, result.key, result.shard, rows, result.seconds, checksum)

    def defer(self, source: str, zyx: str | None, xzy: str | None) -> None:
        """``source``'s units are cut from its staged copies ``zyx`` / ``xzy``
        (:class:`StagingArea`): they store no pixels; :meth:`settle` does, before the copies go."""
        if self.stage_dirs:  # exemplars only (with keep_all_pixels units write their shards)
            self.deferred[source] = (zyx, xzy)

    def settle(self, source: str) -> None:
        """Store the pixels of a deferred source's exemplars, cut from its staged copies (call it
        before they are released): the exact greedy exemplars of its patches when its dedup group
        holds nothing else, so the dedup that follows finds none missing and none superseded
        (see :meth:`curation.exemplars.OnlineExemplars.settle`; any it still finds missing are
        re-cut from the source as before)."""
        staged = self.deferred.get(source)
        if staged is None:
            return
        t0 = time.perf_counter()
        group = self._group(source)
        if group not in self.tracker.groups:
            self._seed(group)  # without this source's patches
        del self.deferred[source]
        t = self.index.source_patch_table(PIXEL_ROW_COLUMNS, source)
        if len(t["id"]):
            keys = visit_keys(self.settings.seed, t["source"], t["axis"], t["slice"], t["y"], t["x"])
            keep = self.tracker.settle(group, hash_from_db(t["hash"].astype(np.int64)), keys)
            store_settled_pixels(self.index, source, t, keep, *staged, self.settings.memory_mb)
            self.counts["stored"] += int(keep.sum())
        self.counts["settle_seconds"] += time.perf_counter() - t0

    def close(self) -> None:
        self._deleter.shutdown(wait=True)
        discard_staged_units(self.stage_dirs)  # units in flight when the run stopped