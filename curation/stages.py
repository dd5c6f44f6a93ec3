"""The corpus-wide stages after extraction: 4. dedup, 5. filter, the pixels each needs or no
longer needs, and the corpus's pixel statistics."""

from __future__ import annotations

import json
import math
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from curation.corpus import CorpusIndex, PixelSelection, hash_from_db
from curation.dedup import greedy_groups
from curation.exemplars import visit_keys
from curation.executor import Executor
from curation.missing_chunks import label_missing_chunk_patches
from curation.pixels import sweep_unreferenced_shards, sync_pixels
from curation.settings import CurateSettings


def deduplicate(index: CorpusIndex, settings: CurateSettings, progress: bool = True) -> dict[str, int]:
    """Stage 4: near-duplicate groups per dataset (CEM500K) or across all sources."""
    t0 = time.perf_counter()
    table = index.patch_table(["id", "source", "axis", "slice", "y", "x", "hash"])
    if len(table["id"]) == 0:
        return {}
    # Visit patches in a seeded random order fixed per patch by its provenance (not by its id:
    # a corpus written before provenance ids numbered them in the order units finished): the
    # same every run, unchanged for old patches when new ones come, and known while cutting
    # (see curation.exemplars).
    keys = visit_keys(settings.seed, table["source"], table["axis"], table["slice"], table["y"], table["x"])
    canonical = np.lexsort((table["x"], table["y"], table["slice"], table["axis"], table["source"], keys))
    table = {k: v[canonical] for k, v in table.items()}
    datasets = {r["name"]: (r["dataset"] or r["name"]) for r in index.sources()}
    keys = np.array([datasets.get(s, s) for s in table["source"]], dtype=object)
    if settings.dedup_scope == "global":
        keys[:] = "*"
    ids, hashes = table["id"].astype(np.int64), hash_from_db(table["hash"])
    group_id = ids.copy()
    bar = tqdm(total=len(ids), desc="dedup", unit="patch", disable=not progress)
    if settings.dedup_scope != "none":
        # One stable sort groups the patches by dataset (a scan per dataset was quadratic for a
        # manifest of 100k single-image datasets); each group keeps the canonical order.
        _, dataset_no = np.unique(keys.astype(str), return_inverse=True)
        by_dataset = np.argsort(dataset_no.reshape(-1), kind="stable")
        bounds = np.flatnonzero(np.diff(dataset_no.reshape(-1)[by_dataset])) + 1
        for sel in np.split(by_dataset, bounds):
            # sel keeps the visiting order (a stable sort of a sorted table): visit it as it comes
            groups = greedy_groups(hashes[sel], settings.dedup_distance, progress=bar, order=np.arange(len(sel)))
            group_id[sel] = ids[sel][groups]
    bar.close()
    duplicate = group_id != ids
    index.set_decisions(ids, {"group_id": group_id})
    index.record_stage("dedup", time.perf_counter() - t0, {"scope": settings.dedup_scope, "patches": int(len(ids))})
    return {"patches": int(len(ids)), "exemplars": int((~duplicate).sum())}


def filter_batch(root: str, shards: list[str], shard_no: np.ndarray, rows: np.ndarray, sizes: np.ndarray,
                 patch_size: int, patch_filter: Any) -> Any:
    """Run ``patch_filter`` on patches read straight from their shards (in a worker or in-process)."""
    from curation.corpus import read_rows

    maps: dict[int, np.ndarray] = {}

    def shard(i: int) -> np.ndarray:
        if i not in maps:
            maps[i] = np.load(Path(root) / shards[i], mmap_mode="r")
        return maps[i]

    return patch_filter(read_rows(shard, shard_no, rows, patch_size), sizes)


def apply_filter(
    index: CorpusIndex, settings: CurateSettings, batch: int = 512, progress: bool = True,
    executor: Executor | None = None,
) -> None:
    """Stage 5: run the patch filter on exemplars (removed patches keep their reason and score).

    Exemplars it must judge that have no pixels stored (an exemplars-only corpus after its
    dedup changed, or a filter changed) are re-cut from their sources first.

    Only exemplars not yet judged by this very filter are read from the index (an O(exemplars)
    query, not the whole corpus). With a parallel ``executor`` the numpy filters (stats,
    logistic) run in its workers; the CEM500K classifier stays in this process (torch has its
    own threads, and maybe a GPU).
    """
    from curation.filters import Cem500kClassifierFilter, build_filter

    store_needed_pixels(index, settings, progress)  # re-cut exemplars stored without pixels
    t0 = time.perf_counter()
    patch_filter = build_filter(settings.filter)
    signature = json.dumps(patch_filter.describe(), sort_keys=True) if patch_filter else "none"
    # exemplars whose pixels could not be re-cut (reported by sync_pixels)
    index.mark_exemplars_without_pixels("no pixels: its source could not be re-cut")
    todo = index.exemplars_to_judge(["id", "shard", "offset", "h", "w"], signature)
    ids = todo["id"].astype(np.int64)
    bar = tqdm(total=len(ids), desc="filter", unit="patch", disable=not progress)
    parallel = (executor is not None and executor.kind != "serial" and patch_filter is not None
                and not isinstance(patch_filter, Cem500kClassifierFilter))
    if parallel:  # smaller batches so both workers get some on a small corpus
        batch = max(64, min(batch, math.ceil(len(ids) / (2 * executor.workers))))

    def record(pick: np.ndarray, res: Any) -> None:
        if res is None:
            keep, reason, score = np.ones(len(pick), bool), np.full(len(pick), "", object), np.full(len(pick), np.nan)
        else:
            keep, reason, score = res.keep, res.reason, res.score
        index.set_decisions(ids[pick], {
            "filter_sig": np.full(len(pick), signature, dtype=object),
            "score": np.asarray(score, dtype=float),
            "filter_reason": np.where(keep, "", reason).astype(object),
        })
        bar.update(len(pick))

    def job(pick: np.ndarray) -> tuple:
        shards, shard_no = np.unique(todo["shard"][pick], return_inverse=True)
        sizes = np.stack([todo["h"][pick], todo["w"][pick]], 1).astype(np.int64)
        return (str(index.root), shards.tolist(), shard_no.reshape(-1), todo["offset"][pick].astype(np.int64),
                sizes, index.patch_size, patch_filter)

    picks = [np.arange(start, min(start + batch, len(ids))) for start in range(0, len(ids), batch)]
    if patch_filter is None:
        for pick in picks:
            record(pick, None)
    elif parallel:
        pending = {executor.submit(filter_batch, *job(pick)): pick for pick in picks}
        while pending:
            for fut in executor.wait_any(list(pending)):
                try:
                    record(pending[fut], fut.result())
                    del pending[fut]
                except BrokenProcessPool:  # a worker died: judge what is left in this process
                    tqdm.write("a worker process died; the filter goes on in the main process", file=sys.stderr)
                    executor.restart()
                    for pick in pending.values():
                        record(pick, filter_batch(*job(pick)))
                    pending.clear()
                    break
    else:
        for pick in picks:
            record(pick, filter_batch(*job(pick)))
    bar.close()
    label_missing_chunk_patches(index)  # fill value from absent chunks is not data: its own reason
    index.decide_status()  # final verdict of every patch from its group and its filter result
    index.meta["filter"] = patch_filter.describe() if patch_filter else {"name": "none"}
    index.record_stage("filter", time.perf_counter() - t0, {"evaluated": int(len(ids))})


def filter_signature(settings: CurateSettings) -> str:
    """What ``filter_sig`` holds for patches judged by ``settings.filter``."""
    from curation.filters import build_filter

    patch_filter = build_filter(settings.filter)
    return json.dumps(patch_filter.describe(), sort_keys=True) if patch_filter else "none"


def store_needed_pixels(index: CorpusIndex, settings: CurateSettings, progress: bool = True) -> dict[str, int]:
    """Before the filter: pixels for every exemplar it must judge or that stays kept (re-cut
    where extraction did not store them), and with ``keep_all_pixels`` for every patch."""
    t0 = time.perf_counter()
    selection = (PixelSelection.every_patch() if settings.keep_all_pixels
                 else PixelSelection.for_filter(filter_signature(settings)))
    counts = sync_pixels(index, selection, settings.memory_mb, progress)
    index.record_stage("pixels", time.perf_counter() - t0, counts)
    return counts


def drop_unneeded_pixels(index: CorpusIndex, settings: CurateSettings, progress: bool = True) -> dict[str, int]:
    """After the filter: drop the pixels of duplicates and filtered patches (exemplars-only
    storage); with ``keep_all_pixels`` nothing is dropped."""
    if settings.keep_all_pixels:
        return {}
    t0 = time.perf_counter()
    counts = sync_pixels(index, PixelSelection.kept(), settings.memory_mb, progress)
    index.flush()
    counts["swept"] = sweep_unreferenced_shards(index)
    seconds, info = index.stages().get("pixels", (0.0, {}))
    index.record_stage("pixels", seconds + time.perf_counter() - t0,
                       {**info, "dropped": counts["dropped"], "shards_rewritten": counts["shards"]})
    return counts


def corpus_stats(root: Path, max_patches: int = 20000, seed: int = 0) -> dict[str, float]:
    """Mean and std (in [0, 1] units) of the kept patches' true pixels, from a sample."""
    from curation.corpus import Corpus

    corpus = Corpus(root)
    if len(corpus) == 0:
        return {"mean": 0.5, "std": 0.25, "n_sampled": 0}
    pick = np.random.default_rng(seed).permutation(len(corpus))[:max_patches]
    total = total_sq = count = 0  # exact integers; the zero padding adds nothing to the sums
    for start in range(0, len(pick), 1024):
        patches, sizes = corpus.get_padded(np.sort(pick[start : start + 1024]))
        total += int(patches.sum(dtype=np.uint64))
        total_sq += int(np.square(patches, dtype=np.uint16).sum(dtype=np.uint64))
        count += int(np.prod(sizes, axis=1).sum())
    mean = total / count / 255.0
    total_sq /= 255.0**2
    return {"mean": float(mean), "std": float(math.sqrt(max(total_sq / count - mean**2, 0.0))), "n_sampled": int(len(pick))}
