"""Which patches of a corpus hold pixels, and re-cutting the others from their sources.

By default a corpus stores pixels only for the patches it keeps (exemplars that pass the
filter); every other patch keeps its full provenance row (``offset = -1``: no pixels) and can be
re-cut from its source. See ``docs/corpus_format.md``.

* While a source is cut, a unit writes all its patches to a *unit staging* file (RAM when
  ``/dev/shm`` has room, else ``CORPUS/work/units``); the main process keeps the exemplars of
  what was cut so far (:class:`curation.exemplars.OnlineExemplars`), writes their pixels to the
  unit's shard (:func:`store_unit_pixels`) and deletes the staging file at once.
* After dedup, :func:`sync_pixels` rewrites the shards of units whose set of patches with pixels
  must change: final exemplars without pixels are re-cut (:func:`recut_rows`) before the filter
  reads them, and after the filter the pixels of duplicates and filtered patches are dropped.

A unit's shard ``shards/<source>/<key>[.vN].npy`` holds the pixels of its rows that have them,
in id order; a rewrite writes the next version ``N`` and deletes the old file only after the
index points at the new one, so a crash at any point leaves a consistent corpus.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from curation.corpus import CorpusIndex, atomic_save_npy, hash_from_db, npy_nbytes

_VERSION = re.compile(r"^(?P<unit>.+?)(?:\.v(?P<n>\d+))?\.npy$")


def unit_shard(shard: str) -> tuple[str, int]:
    """``shards/s/xy-00000.v3.npy`` -> (``shards/s/xy-00000.npy``, 3): the unit's own name and version."""
    head, _, name = shard.rpartition("/")
    m = _VERSION.match(name)
    if not m:
        return shard, 0
    return f"{head}/{m['unit']}.npy" if head else f"{m['unit']}.npy", int(m["n"] or 0)


def versioned(shard: str, n: int) -> str:
    base, _ = unit_shard(shard)
    return base if n == 0 else base[: -len(".npy")] + f".v{n}.npy"


# ----------------------------------------------------------------------------- during extraction
def store_unit_pixels(root: Path, staged: str, shard: str, rows: list[tuple], keep: np.ndarray,
                      remove: Any = None) -> list[tuple]:
    """Write the pixels of ``rows[keep]`` from a unit's staging file to its shard; delete the
    staging file (with ``remove(path)`` if given: freeing a 50 MB file in RAM takes ~20 ms, which
    the caller may do in the background); return the rows with their new offsets (-1 where no
    pixels are stored).

    Rows are ``(source, shard, offset, axis, slice, y, x, h, w, hash)`` with ``offset`` the
    patch's position in the staging file."""
    patches = np.load(staged, mmap_mode="r")
    take = np.flatnonzero(keep)
    atomic_save_npy(root / shard, np.ascontiguousarray(patches[np.array([rows[i][2] for i in take], dtype=np.int64)]))
    del patches
    (remove or os.unlink)(staged)
    offsets = np.full(len(rows), -1, dtype=np.int64)
    offsets[take] = np.arange(len(take))
    return [(r[0], r[1], int(o), *r[3:]) for r, o in zip(rows, offsets.tolist())]


# ----------------------------------------------------------------------------- re-cutting
def _box(rows: dict[str, np.ndarray], pick: np.ndarray, axis: str) -> tuple[slice, slice, slice]:
    """The (z, y, x) box of the volume covering the patches ``pick`` (all cut in ``axis``)."""
    s, y, x = rows["slice"][pick], rows["y"][pick], rows["x"][pick]
    h, w = rows["h"][pick], rows["w"][pick]
    plane_rows = slice(int(y.min()), int((y + h).max()))
    plane_cols = slice(int(x.min()), int((x + w).max()))
    through = slice(int(s.min()), int(s.max()) + 1)
    if axis == "xy":
        return through, plane_rows, plane_cols
    if axis == "xz":  # the plane is (z, x) at y = slice
        return plane_rows, through, plane_cols
    return plane_rows, plane_cols, through  # yz: (z, y) at x = slice


def recut_rows(spec_json: dict[str, Any], converter_json: dict[str, Any], rows: dict[str, np.ndarray],
               patch_size: int, memory_mb: int = 256) -> np.ndarray:
    """Cut the patches described by ``rows`` (columns ``axis``, ``slice``, ``y``, ``x``, ``h``,
    ``w``; one source) again from the source: uint8 (n, P, P), zero-padded like the shards.

    Reads, per plane orientation, the box covering the patches at once when it fits
    ``memory_mb`` (a unit's patches do: units were planned that way), else plane by plane.
    """
    from curation.convert import Uint8Converter
    from curation.readers import SourceSpec, open_volume

    converter = Uint8Converter(**converter_json)
    p = patch_size
    n = len(rows["axis"])
    out = np.zeros((n, p, p), dtype=np.uint8)
    axes = np.asarray(rows["axis"]).astype(str)
    with open_volume(SourceSpec.from_json(spec_json)) as volume:
        itemsize = max(np.dtype(volume.dtype).itemsize, 4)
        for axis in ("xy", "xz", "yz"):
            todo = np.flatnonzero(axes == axis)
            if not len(todo):
                continue
            box = _box(rows, todo, axis)
            whole = np.prod([b.stop - b.start for b in box]) * itemsize <= memory_mb * 2**20
            groups = [todo] if whole else [todo[rows["slice"][todo] == s] for s in np.unique(rows["slice"][todo])]
            for pick in groups:
                z, y, x = box if whole else _box(rows, pick, axis)
                block = converter(volume.read(z, y, x))
                origin = (z.start, y.start, x.start)
                for i in pick.tolist():
                    s, py, px, h, w = (int(rows[c][i]) for c in ("slice", "y", "x", "h", "w"))
                    if axis == "xy":
                        part = block[s - origin[0], py - origin[1] : py - origin[1] + h, px - origin[2] : px - origin[2] + w]
                    elif axis == "xz":
                        part = block[py - origin[0] : py - origin[0] + h, s - origin[1], px - origin[2] : px - origin[2] + w]
                    else:
                        part = block[py - origin[0] : py - origin[0] + h, px - origin[1] : px - origin[1] + w, s - origin[2]]
                    out[i, :h, :w] = part
    return out


class RecutError(RuntimeError):
    """Patches cannot be re-cut from their source (it changed, or it is unreadable now)."""


def recut_source_rows(source: dict[str, Any], rows: dict[str, np.ndarray], patch_size: int,
                      memory_mb: int = 256) -> np.ndarray:
    """:func:`recut_rows` for a ``sources`` row of the index, checked: the source must be
    unchanged since it was cut (its fingerprint) and every re-cut patch must have the hash
    recorded when it was first cut. Raises :class:`RecutError` with one clear sentence."""
    from curation.hashing import dhash_batch
    from curation.readers import source_fingerprint

    path = source["path"]
    try:
        if source.get("fingerprint") and source_fingerprint(path) != source["fingerprint"]:
            raise RecutError(f"{path}: the source changed since its patches were cut; run `cemnet curate` "
                             "on it again to cut it anew")
        spec = json.loads(source["reader"])
        patches = recut_rows(spec, json.loads(source["uint8_rule"]), rows, patch_size, memory_mb)
    except RecutError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable now: one sentence naming the source
        raise RecutError(f"{path}: cannot re-cut patches ({err})") from err
    sizes = np.stack([rows["h"], rows["w"]], 1).astype(np.int64).reshape(-1, 2)
    got = dhash_batch(patches, sizes, patch_size)
    bad = np.flatnonzero(got != hash_from_db(np.asarray(rows["hash"], dtype=np.int64)))
    if len(bad):
        raise RecutError(f"{path}: {len(bad)} re-cut patch(es) differ from the ones cut before (e.g. #"
                         f"{int(rows['id'][bad[0]])}); run `cemnet curate` on the source again to cut it anew")
    return patches


# ----------------------------------------------------------------------------- rewriting shards
_TABLE = ("id", "source", "shard", "offset", "axis", "slice", "y", "x", "h", "w", "hash")


def sync_pixels(index: CorpusIndex, want: Any, memory_mb: int = 256, progress: bool = True) -> dict[str, int]:
    """Make the shards hold pixels exactly for the patches ``want(table)`` selects.

    ``want`` gets the patch table (columns of :data:`_TABLE` plus ``group_id``, ``status``,
    ``filter_sig``, ``filter_reason``) and returns a bool per row. Only shards whose set of
    patches with pixels changes are rewritten; pixels that are kept are copied from the old
    shard, missing ones re-cut. A source that cannot be re-cut is reported (skipped table, stderr)
    and its patches stay without pixels. Returns counts: ``recut``, ``dropped``, ``shards``,
    ``failed``.
    """
    from tqdm import tqdm

    columns = (*_TABLE, "group_id", "status", "filter_sig", "filter_reason")
    table = index.patch_table(columns)
    stats = {"recut": 0, "dropped": 0, "shards": 0, "failed": 0}
    if len(table["id"]) == 0:
        return stats
    wanted = np.asarray(want(table), dtype=bool)
    have = table["offset"].astype(np.int64) >= 0
    change = wanted != have
    if not change.any():
        return stats
    units = np.array([unit_shard(s)[0] for s in table["shard"].tolist()], dtype=object)
    touched = sorted(set(units[change].tolist()))
    rows_of: dict[str, list[int]] = {u: [] for u in touched}
    for i, u in zip(np.flatnonzero(np.isin(units, touched)).tolist(), units[np.isin(units, touched)].tolist()):
        rows_of[u].append(i)
    sources = {r["name"]: r for r in index.sources()}
    p = index.patch_size
    bar = tqdm(total=len(touched), desc="pixels", unit="shard", disable=not progress)
    failed_sources: dict[str, str] = {}
    for unit in touched:
        bar.update(1)
        rows = np.array(rows_of[unit], dtype=np.int64)  # in id order, as the table is
        name = str(table["source"][rows[0]])
        if name in failed_sources:
            continue
        keep = rows[wanted[rows]]
        new = np.zeros((len(keep), p, p), dtype=np.uint8)
        old_shards = sorted(set(table["shard"][rows].tolist()))
        from_old = keep[have[keep]]
        if len(from_old):
            old = np.load(index.root / old_shards[0], mmap_mode="r")  # a unit's rows share one shard
            new[np.searchsorted(keep, from_old)] = old[table["offset"][from_old].astype(np.int64)]
            del old
        missing = keep[~have[keep]]
        if len(missing):
            try:
                cut = recut_source_rows(sources[name], {c: table[c][missing] for c in columns}, p, memory_mb)
            except RecutError as err:
                failed_sources[name] = str(err)
                index.add_skipped(f"{sources[name]['path']} (re-cut)", str(err))
                tqdm.write(f"skipped re-cutting {sources[name]['path']}: {err}", file=sys.stderr)
                continue
            new[np.searchsorted(keep, missing)] = cut
            stats["recut"] += len(missing)
        stats["dropped"] += int((have[rows] & ~wanted[rows]).sum())
        version = max(unit_shard(s)[1] for s in old_shards) + 1
        target = versioned(unit, version)
        atomic_save_npy(index.root / target, new)
        offsets = np.full(len(rows), -1, dtype=np.int64)
        offsets[wanted[rows]] = np.arange(len(keep))
        index.set_decisions(table["id"][rows].astype(np.int64),
                            {"shard": np.full(len(rows), target, dtype=object), "offset": offsets})
        index.flush()  # the index points at the new shard before the old one goes
        for s in old_shards:
            if s != target:
                (index.root / s).unlink(missing_ok=True)
        stats["shards"] += 1
    bar.close()
    stats["failed"] = len(failed_sources)
    return stats


def sweep_unreferenced_shards(index: CorpusIndex) -> int:
    """Remove shard files of this corpus that no patch row points at (left by a crash between a
    rewrite's commit and the removal of the old version). Returns how many were removed."""
    used = {r[0] for r in index.db.execute("SELECT DISTINCT shard FROM patches")}
    tasks = {f"shards/{s}/{k}.npy" for s, k in index.db.execute("SELECT source, key FROM tasks")}
    removed = 0
    for path in (index.root / "shards").glob("*/*.npy"):
        rel = path.relative_to(index.root).as_posix()
        if rel not in used and (rel not in tasks or unit_shard(rel)[1]):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def expected_shard_rows(index: CorpusIndex, source: str) -> dict[str, int]:
    """Unit shard name (``shards/<source>/<key>.npy``) -> (current shard path, rows it must hold)."""
    out: dict[str, Any] = {}
    for shard, n in index.db.execute(
        "SELECT shard, SUM(offset >= 0) FROM patches WHERE source=? GROUP BY shard", (source,)
    ):
        out[unit_shard(shard)[0]] = (shard, int(n or 0))
    return out


def shard_intact(root: Path, shard: str, rows: int, patch_size: int) -> bool:
    path = root / shard
    return path.is_file() and path.stat().st_size == npy_nbytes((rows, patch_size, patch_size))


def staged_unit_path(stage_dirs: list[str], source: str, key: str) -> list[Path]:
    """Candidate staging files of a unit's patches, RAM first."""
    return [Path(d) / f"{source}--{key}.npy" for d in stage_dirs]


def save_staged(stage_dirs: list[str], source: str, key: str, patches: np.ndarray) -> str:
    """Write a unit's patches to the first staging folder with room (RAM, then disk)."""
    last: OSError | None = None
    for path in staged_unit_path(stage_dirs, source, key):
        try:
            atomic_save_npy(path, patches)
            return str(path)
        except OSError as err:  # /dev/shm full: the disk folder next
            last = err
            Path(str(path) + ".tmp").unlink(missing_ok=True)
    assert last is not None
    raise last


def discard_staged_units(stage_dirs: list[str]) -> None:
    """Remove unit staging files (a stopped or killed run's; call while holding the corpus lock)."""
    for d in stage_dirs:
        for path in Path(d).glob("*.npy*") if Path(d).is_dir() else []:
            path.unlink(missing_ok=True)
        try:
            os.rmdir(d)
        except OSError:
            pass


# ----------------------------------------------------------------------------- cemnet curate recut
def recut_to_folder(root: str | os.PathLike, status: str, out: str | os.PathLike | None = None,
                    datasets: list[str] | None = None, memory_mb: int = 256,
                    progress: bool = True) -> tuple[int, list[str]]:
    """Write the patches of ``status`` (``duplicate``, ``filtered``, ``kept`` or ``all``) as 8-bit
    TIFFs with CEM500K names (``<source>-LOC-<axis>_<slice>_<y>_<x>.tiff``, true size) to ``out``
    (default ``CORPUS/recut/<status>``), re-cut from their sources where the corpus holds no
    pixels for them, plus ``patches.csv`` (id, provenance, status, reason, group). The corpus
    itself is only read. Patches already in ``out`` are skipped, so an interrupted run resumes.
    Returns (patches written, one problem per source that could not be re-cut).
    """
    import csv

    import tifffile
    from tqdm import tqdm

    from curation.corpus import read_only_index

    root = Path(root)
    if not (root / "corpus.json").is_file():
        raise FileNotFoundError(f"{root}: no corpus.json (not a cemnet corpus)")
    out = Path(out) if out else root / "recut" / status
    out.mkdir(parents=True, exist_ok=True)
    patch_size = int(json.loads((root / "corpus.json").read_text())["settings"]["patch_size"])
    columns = (*_TABLE, "status", "reason", "group_id")
    where, params = ("WHERE p.status = ?", [status]) if status != "all" else ("WHERE 1", [])
    if datasets:
        where += f" AND COALESCE(s.dataset, s.name) IN ({', '.join('?' * len(datasets))})"
        params += list(datasets)
    with read_only_index(root) as db:
        cur = db.execute(f"SELECT {', '.join('p.' + c for c in columns)} FROM patches p JOIN sources s "
                         f"ON s.name = p.source {where} ORDER BY p.source, p.shard, p.id", params)
        rows = cur.fetchall()
        names = [d[0] for d in db.execute("SELECT * FROM sources LIMIT 0").description]
        sources = {r[names.index("name")]: dict(zip(names, r)) for r in db.execute("SELECT * FROM sources")}
    table = {c: np.array([r[k] for r in rows], dtype=object) for k, c in enumerate(columns)}
    stems = [f"{r[1]}-LOC-{r[4]}_{int(r[5]):04d}_{int(r[6])}_{int(r[7])}" for r in rows]
    with open(out / "patches.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "id", "source", "axis", "slice", "y", "x", "h", "w", "status", "reason", "group_id"])
        for stem, r in zip(stems, rows):
            w.writerow([stem + ".tiff", r[0], r[1], r[4], r[5], r[6], r[7], r[8], r[9], r[11], r[12], r[13]])
    todo = np.array([not (out / f"{stem}.tiff").is_file() for stem in stems], dtype=bool)
    units = np.array([f"{r[1]}\0{unit_shard(r[2])[0]}" for r in rows], dtype=object)
    problems: dict[str, str] = {}
    written = 0
    bar = tqdm(total=int(todo.sum()), desc=f"recut {status}", unit="patch", disable=not progress)
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]]) if len(units) else np.zeros(0, int)
    for start, stop in zip(starts.tolist(), np.r_[starts[1:], len(units)].tolist()):  # unit by unit
        pick = np.arange(start, stop)[todo[start:stop]]  # rows come sorted by source and shard
        if not len(pick):
            continue
        name = str(table["source"][pick[0]])
        if name in problems:
            bar.update(len(pick))
            continue
        offsets = table["offset"][pick].astype(np.int64)
        patches = np.zeros((len(pick), patch_size, patch_size), dtype=np.uint8)
        stored = offsets >= 0
        if stored.any():
            shard = np.load(root / str(table["shard"][pick[0]]), mmap_mode="r")
            patches[stored] = shard[offsets[stored]]
        if (~stored).any():
            need = pick[~stored]
            sub = {c: (table[c][need].astype(np.int64) if c not in ("axis", "source", "shard") else table[c][need])
                   for c in _TABLE}
            try:
                patches[~stored] = recut_source_rows(sources[name], sub, patch_size, memory_mb)
            except RecutError as err:
                problems[name] = str(err)
                tqdm.write(f"skipped {name}: {err}", file=sys.stderr)
                bar.update(len(pick))
                continue
        for j, i in enumerate(pick.tolist()):
            h, w = int(table["h"][i]), int(table["w"][i])
            tmp = out / f"{stems[i]}.tiff.tmp"
            tifffile.imwrite(tmp, patches[j, :h, :w])
            os.replace(tmp, out / f"{stems[i]}.tiff")
        written += len(pick)
        bar.update(len(pick))
    bar.close()
    return written, list(problems.values())
