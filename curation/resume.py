"""What an earlier run on the corpus left: a source's name in it, whether its patches still
hold (same files, same settings), and which finished shards are damaged."""

from __future__ import annotations

import json
import sys
from typing import Any

from tqdm import tqdm

from curation.corpus import CorpusIndex, verify_shards
from curation.settings import PATCH_SETTINGS, PLAN_SETTINGS


def unique_name(index: CorpusIndex, wanted: str, path: str) -> str:
    """``wanted``, or ``wanted-2``, ``wanted-3`` ... when another path already holds that name."""
    name, k = wanted, 1
    while True:
        row = index.source(name)
        if row is None or row["path"] == path:
            return name
        k += 1
        name = f"{wanted}-{k}"


# The reader options whose change re-cuts a source.
READER_OPTIONS = ("voxel_size", "axes", "key", "scale_level", "channel", "stack", "roi", "roi_unit")


def why_cut_again(row: dict | None, fingerprint: str, cut: dict[str, Any], spec_json: dict[str, Any]) -> str | None:
    """Why the patches an earlier run cut from this source must go, or None if they still hold."""
    if row is None:
        return None
    if row.get("fingerprint") not in (None, fingerprint):
        return "its files changed (sizes or times)"
    old = json.loads(row["cut_settings"]) if row.get("cut_settings") else {}
    keys = PATCH_SETTINGS + (PLAN_SETTINGS if row["status"] != "done" else ())
    diff = [f"{k} {old[k]} -> {cut[k]}" for k in keys if k in old and old[k] != cut[k]]
    reader = json.loads(row["reader"]) if row.get("reader") else {}
    diff += [f"reader {k} {reader.get(k)} -> {spec_json.get(k)}" for k in READER_OPTIONS
             if reader and reader.get(k) != spec_json.get(k)]
    return f"the settings that cut it changed ({', '.join(diff)})" if diff else None


def drop_damaged_shards(index: CorpusIndex, paths: set[str], progress: bool = True) -> dict[str, str]:
    """Verify the shards of finished units (a resume, or sources added to a corpus) and drop
    each damaged one with its patches, so it is cut again; returns {source: note} for the
    sources that lost shards. A damaged source not among ``paths`` (this run's sources) is
    named: its patches stay out of the corpus until a run that includes it cuts them again."""
    index.flush()  # the verifier reads committed rows through its own connection
    problems, _ = verify_shards(index.root, progress=progress)
    lost: dict[str, list[dict]] = {}
    for bad in problems:
        n = index.drop_task(bad["source"], bad["key"])
        lost.setdefault(bad["source"], []).append(bad)
        tqdm.write(f"{index.root / bad['shard']}: {bad['problem']}; its {n} patches were dropped", file=sys.stderr)
    notes = {}
    for source, bad in lost.items():
        row = index.source(source)
        if row is not None and row["path"] not in paths:
            tqdm.write(f"{source} ({row['path']}) is not among this run's sources: give it again to cut "
                       f"its {len(bad)} damaged shard(s) again", file=sys.stderr)
        notes[source] = f"cut again where {len(bad)} shard(s) failed verification ({', '.join(b['key'] for b in bad)})"
    return notes
