"""Which patches of a corpus hold pixels, and re-cutting the others from their sources.

By default a corpus stores pixels only for the patches it keeps (exemplars that pass the
filter); every other patch keeps its full provenance row (``offset = -1``: no pixels) and can be
re-cut from its source. See ``docs/corpus_format.md``.

* While a source is cut, a unit writes all its patches to a *unit staging* file (RAM when
  ``/dev/shm`` has room, else ``CORPUS/work/units``); the main process keeps the exemplars of
  what was cut so far (:class:`curation.exemplars.OnlineExemplars`), writes their pixels to the
  unit's shard (:func:`store_unit_pixels`) and deletes the staging file at once.
* A volume staged for its xz / yz planes holds every patch's pixels in the staged copy: its
  units store none, and when the source is done :func:`store_settled_pixels` writes its
  exemplars' pixels, cut from that copy (:func:`cut_from_staged`), to each unit's shard once.
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
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from curation.to_uint8 import Uint8Converter
from curation.corpus import (
    CorpusIndex,
    PixelSelection,
    ReadOnlyIndex,
    atomic_save_npy,
    hash_from_db,
    shard_checksum,
    unit_shard,
    versioned,
)
from curation.hashing import dhash_batch
from curation.readers import SourceSpec, open_volume, source_fingerprint


# ----------------------------------------------------------------------------- during extraction
def store_unit_pixels(root: Path, staged: str, shard: str, rows: list[tuple], keep: np.ndarray,
                      remove: Any = None) -> tuple[list[tuple], str]:
    """Write the pixels of ``rows[keep]`` from a unit's staging file to its shard; delete the
    staging file (with ``remove(path)`` if given: freeing a 50 MB file in RAM takes ~20 ms, which
    the caller may do in the background); return the rows with their new offsets (-1 where no
    pixels are stored) and the :func:`~curation.corpus.shard_checksum` of the shard written.

    Rows are ``(source, shard, offset, axis, slice, y, x, h, w, hash)`` with ``offset`` the
    patch's position in the staging file."""
    patches = np.load(staged, mmap_mode="r")
    take = np.flatnonzero(keep)
    kept = np.ascontiguousarray(patches[np.array([rows[i][2] for i in take], dtype=np.int64)])
    atomic_save_npy(root / shard, kept)
    del patches
    (remove or os.unlink)(staged)
    offsets = np.full(len(rows), -1, dtype=np.int64)
    offsets[take] = np.arange(len(take))
    return [(r[0], r[1], int(o), *r[3:]) for r, o in zip(rows, offsets.tolist())], shard_checksum(kept)


# ----------------------------------------------------------------------------- re-cutting
def _span(values: np.ndarray, sizes: np.ndarray) -> slice:
    return slice(int(values.min()), int((values + sizes).max()))


def recut_rows(spec_json: dict[str, Any], converter_json: dict[str, Any], rows: dict[str, np.ndarray],
               patch_size: int, memory_mb: int = 256) -> np.ndarray:
    """Cut the patches described by ``rows`` (columns ``axis``, ``slice``, ``y``, ``x``, ``h``,
    ``w``; one source) again from the source: uint8 (n, P, P), zero-padded like the shards.

    xy patches: one region read per slice that has some. xz / yz patches (their rows run along
    z): the box covering them is read in z-blocks of at most ``memory_mb`` (float32), each block
    once for all patches, so re-cutting a whole unit reads its part of the volume once. Where a
    single plane of the box exceeds ``memory_mb``, each patch reads its own box instead.
    """
    converter = Uint8Converter(**converter_json)
    p, budget = patch_size, memory_mb * 2**20
    out = np.zeros((len(rows["axis"]), p, p), dtype=np.uint8)
    axes = np.asarray(rows["axis"]).astype(str)
    s_, y_, x_ = (np.asarray(rows[c], dtype=np.int64) for c in ("slice", "y", "x"))
    h_, w_ = np.asarray(rows["h"], dtype=np.int64), np.asarray(rows["w"], dtype=np.int64)
    with open_volume(SourceSpec.from_json(spec_json)) as volume:
        itemsize = max(np.dtype(volume.dtype).itemsize, 4)

        def read(z: slice, y: slice, x: slice) -> np.ndarray:
            return converter(volume.read(z, y, x))

        for s in np.unique(s_[axes == "xy"]).tolist():  # xy: patch[a, b] = V[s, y + a, x + b]
            pick = np.flatnonzero((axes == "xy") & (s_ == s))
            ys, xs = _span(y_[pick], h_[pick]), _span(x_[pick], w_[pick])
            groups = [pick] if (ys.stop - ys.start) * (xs.stop - xs.start) * itemsize <= budget else [[i] for i in pick]
            for group in groups:
                ys, xs = _span(y_[group], h_[group]), _span(x_[group], w_[group])
                plane = read(slice(s, s + 1), ys, xs)[0]
                for i in np.atleast_1d(group).tolist():
                    out[i, : h_[i], : w_[i]] = plane[y_[i] - ys.start : y_[i] - ys.start + h_[i],
                                                     x_[i] - xs.start : x_[i] - xs.start + w_[i]]
        for axis in ("xz", "yz"):  # xz: patch[a, b] = V[y + a, s, x + b]; yz: V[y + a, x + b, s]
            pick = np.flatnonzero(axes == axis)
            if not len(pick):
                continue
            through = _span(s_[pick], np.ones(len(pick), dtype=np.int64))
            along = _span(x_[pick], w_[pick])
            ybox, xbox = (through, along) if axis == "xz" else (along, through)
            plane_bytes = (ybox.stop - ybox.start) * (xbox.stop - xbox.start) * itemsize
            if plane_bytes > budget:  # a huge plane: each patch reads its own box
                blocks = [(i, (slice(y_[i], y_[i] + h_[i]),) + ((slice(s_[i], s_[i] + 1), slice(x_[i], x_[i] + w_[i]))
                           if axis == "xz" else (slice(x_[i], x_[i] + w_[i]), slice(s_[i], s_[i] + 1))))
                          for i in pick.tolist()]
            else:
                zs = _span(y_[pick], h_[pick])
                step = max(1, budget // plane_bytes)
                blocks = [(None, (slice(z0, min(z0 + step, zs.stop)), ybox, xbox)) for z0 in range(zs.start, zs.stop, step)]
            for only, (z, yb, xb) in blocks:
                block = read(z, yb, xb)
                for i in (pick if only is None else [only]):
                    a0, a1 = max(y_[i], z.start), min(y_[i] + h_[i], z.stop)  # patch rows in this block
                    if a0 >= a1:
                        continue
                    rows_in = slice(a0 - z.start, a1 - z.start)
                    cols = slice(x_[i] - (xb.start if axis == "xz" else yb.start), None)
                    cols = slice(cols.start, cols.start + w_[i])
                    part = block[rows_in, s_[i] - yb.start, cols] if axis == "xz" else block[rows_in, cols, s_[i] - xb.start]
                    out[i, a0 - y_[i] : a1 - y_[i], : w_[i]] = part
    return out


def cut_from_staged(zyx: str | None, xzy: str | None, rows: dict[str, np.ndarray], patch_size: int) -> np.ndarray:
    """Cut the patches described by ``rows`` (columns ``axis``, ``slice``, ``y``, ``x``, ``h``,
    ``w``; one source) from its staged uint8 copies (see :class:`curation.pipeline.StagingArea`):
    the (z, y, x) copy ``zyx`` and the x-first (x, z, y) copy ``xzy``, either may be None. No
    read of the source itself. Each patch is taken from the copy in which its rows are
    contiguous, as the units cut it (a yz patch from the (z, y, x) copy would touch a page per
    pixel): uint8 (n, P, P), zero-padded like the shards."""
    volume = np.load(zyx, mmap_mode="r") if zyx else None
    volume_t = np.load(xzy, mmap_mode="r") if xzy else None
    out = np.zeros((len(rows["axis"]), patch_size, patch_size), dtype=np.uint8)
    columns = (np.asarray(rows["axis"]).astype(str).tolist(),
               *(np.asarray(rows[c], dtype=np.int64).tolist() for c in ("slice", "y", "x", "h", "w")))
    for i, (axis, s, y, x, h, w) in enumerate(zip(*columns)):
        ys, xs = slice(y, y + h), slice(x, x + w)
        if axis == "xy":  # patch[a, b] = V[s, y + a, x + b]
            out[i, :h, :w] = volume[s, ys, xs] if volume is not None else volume_t[xs, s, ys].T
        elif axis == "xz":  # V[y + a, s, x + b]
            out[i, :h, :w] = volume[ys, s, xs] if volume is not None else volume_t[xs, ys, s].T
        else:  # yz: V[y + a, x + b, s]
            out[i, :h, :w] = volume_t[s, ys, xs] if volume_t is not None else volume[ys, xs, s]
    return out


class RecutError(RuntimeError):
    """Patches cannot be re-cut from their source (it changed, or it is unreadable now)."""


def recut_source_rows(source: dict[str, Any], rows: dict[str, np.ndarray], patch_size: int,
                      memory_mb: int = 256) -> np.ndarray:
    """:func:`recut_rows` for a ``sources`` row of the index, checked: the source must be
    unchanged since it was cut (its fingerprint) and every re-cut patch must have the hash
    recorded when it was first cut. Raises :class:`RecutError` with one clear sentence."""
    path = source["path"]
    try:
        spec = json.loads(source["reader"])
        # fingerprinted as when it was cut: with its key (a remote store digests the metadata below it)
        if source.get("fingerprint") and source_fingerprint(path, spec.get("key")) != source["fingerprint"]:
            raise RecutError(f"{path}: the source changed since its patches were cut; run `cemnet curate` "
                             "on it again to cut it anew")
        patches = recut_rows(spec, json.loads(source["uint8_rule"]), rows, patch_size, memory_mb)
    except RecutError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable now: one sentence naming the source
        raise RecutError(f"{path}: cannot re-cut patches ({err})") from err
    check_recorded_hashes(path, rows, patches, patch_size)
    return patches


def check_recorded_hashes(path: str, rows: dict[str, np.ndarray], patches: np.ndarray, patch_size: int) -> None:
    """Raise :class:`RecutError` unless every re-cut patch has the hash recorded when it was first cut."""
    sizes = np.stack([rows["h"], rows["w"]], 1).astype(np.int64).reshape(-1, 2)
    got = dhash_batch(patches, sizes, patch_size)
    bad = np.flatnonzero(got != hash_from_db(np.asarray(rows["hash"], dtype=np.int64)))
    if len(bad):
        raise RecutError(f"{path}: {len(bad)} re-cut patch(es) differ from the ones cut before (e.g. #"
                         f"{int(rows['id'][bad[0]])}); run `cemnet curate` on the source again to cut it anew")


# ----------------------------------------------------------------------------- rewriting shards
_TABLE = ("id", "source", "shard", "offset", "axis", "slice", "y", "x", "h", "w", "hash")
PIXEL_ROW_COLUMNS = _TABLE  # the patch columns store_settled_pixels needs


def sync_pixels(index: CorpusIndex, selection: PixelSelection, memory_mb: int = 256, progress: bool = True,
                recut_batch: int = 2048,
                cut: Callable[[dict[str, Any], dict[str, np.ndarray]], np.ndarray] | None = None) -> dict[str, int]:
    """Make the shards hold pixels exactly for the patches of ``selection``
    (:class:`curation.corpus.PixelSelection`).

    Only shards whose set of patches with pixels changes are read and rewritten (SQLite finds
    them; the rest of the corpus costs one scan in C); pixels that are kept are copied from the
    old shard, missing ones re-cut (:func:`recut_source_rows`, or ``cut(source row, rows)``
    when given: it must raise :class:`RecutError` on failure). A source that cannot be re-cut
    is reported (skipped table, stderr) and its patches stay without pixels. Returns counts:
    ``recut``, ``dropped``, ``shards``, ``failed``.
    """
    from tqdm import tqdm

    columns = (*_TABLE, "group_id", "status")
    stats = {"recut": 0, "dropped": 0, "shards": 0, "failed": 0}
    # Rows of the shards to rewrite that have or get pixels: the others (most of them) keep
    # offset -1 and follow their unit's shard name in one UPDATE per unit.
    table, wanted = index.pixel_changes(columns, selection)
    if len(table["id"]) == 0:
        return stats
    have = table["offset"].astype(np.int64) >= 0
    change = wanted != have
    units = np.array([unit_shard(s)[0] for s in table["shard"].tolist()], dtype=object)
    touched = sorted(set(units[change].tolist()))
    rows_of: dict[str, list[int]] = {u: [] for u in touched}
    for i, u in zip(np.flatnonzero(np.isin(units, touched)).tolist(), units[np.isin(units, touched)].tolist()):
        rows_of[u].append(i)
    sources = index.sources_by_name()
    p = index.patch_size
    bar = tqdm(total=len(touched), desc="pixels", unit="shard", disable=not progress)
    failed_sources: dict[str, str] = {}
    superseded: list[str] = []
    # Missing pixels are re-cut for several units of a source at once (one pass over its data),
    # at most ``recut_batch`` patches at a time (bounded memory).
    chunks: list[list[str]] = []
    for unit in touched:
        rows = rows_of[unit]
        n_missing = int((wanted[rows] & ~have[rows]).sum())
        last = chunks[-1] if chunks else None
        same_source = last and table["source"][rows_of[last[0]][0]] == table["source"][rows[0]]
        if same_source and sum(int((wanted[rows_of[u]] & ~have[rows_of[u]]).sum()) for u in last) + n_missing <= recut_batch:
            last.append(unit)
        else:
            chunks.append([unit])
    for chunk in chunks:
        name = str(table["source"][rows_of[chunk[0]][0]])
        if name in failed_sources:
            bar.update(len(chunk))
            continue
        all_rows = np.concatenate([np.array(rows_of[u], dtype=np.int64) for u in chunk])
        missing = all_rows[wanted[all_rows] & ~have[all_rows]]
        fresh: dict[int, np.ndarray] = {}  # row -> its pixels, cut now
        if len(missing):
            try:
                rows_missing = {c: table[c][missing] for c in columns}
                patches = (cut(sources[name], rows_missing) if cut else
                           recut_source_rows(sources[name], rows_missing, p, memory_mb))
            except RecutError as err:
                failed_sources[name] = str(err)
                index.add_skipped(f"{sources[name]['path']} (re-cut)", str(err))
                tqdm.write(f"skipped re-cutting {sources[name]['path']}: {err}", file=sys.stderr)
                bar.update(len(chunk))
                continue
            fresh = dict(zip(missing.tolist(), patches))
            stats["recut"] += len(missing)
        for unit in chunk:  # all units of a chunk belong to source ``name``
            bar.update(1)
            rows = np.array(rows_of[unit], dtype=np.int64)  # in id order, as the table is
            keep = rows[wanted[rows]]
            new = np.zeros((len(keep), p, p), dtype=np.uint8)
            old_shards = sorted(set(table["shard"][rows].tolist()))
            from_old = keep[have[keep]]
            if len(from_old):
                old = np.load(index.root / old_shards[0], mmap_mode="r")  # a unit's rows share one shard
                new[np.searchsorted(keep, from_old)] = old[table["offset"][from_old].astype(np.int64)]
                del old
            for k, i in enumerate(keep.tolist()):
                if i in fresh:
                    new[k] = fresh[i]
            stats["dropped"] += int((have[rows] & ~wanted[rows]).sum())
            latest = max(unit_shard(s)[1] for s in old_shards)
            # A unit that held no pixels yet (cut from a staged volume) gets its first file under
            # its current name: no row points into that file, so replacing it is safe.
            target = versioned(unit, latest + 1 if have[rows].any() else latest)
            atomic_save_npy(index.root / target, new)
            offsets = np.full(len(rows), -1, dtype=np.int64)
            offsets[wanted[rows]] = np.arange(len(keep))
            moved = offsets != table["offset"][rows].astype(np.int64)  # most rows keep theirs (-1)
            key = unit[len(f"shards/{name}/") : -len(".npy")]
            index.repoint_unit(name, key, old_shards, target, table["id"][rows][moved],
                               offsets[moved], shard_checksum(new))
            superseded += [s for s in old_shards if s != target]
            stats["shards"] += 1
    bar.close()
    # Old versions go only once the index points at the new ones (one commit, not one per shard:
    # each commit costs several fsyncs); a crash before leaves the old ones in use.
    index.flush()
    for s in superseded:
        (index.root / s).unlink(missing_ok=True)
    stats["failed"] = len(failed_sources)
    return stats


def store_settled_pixels(index: CorpusIndex, source: str, table: dict[str, np.ndarray], exemplar: np.ndarray,
                         zyx: str | None, xzy: str | None, memory_mb: int = 256, check: int = 32) -> dict[str, int]:
    """Make the shards of ``source`` hold pixels for exactly its patches ``exemplar`` (bool per
    row of ``table``: its patch rows in id order, columns as :data:`_TABLE`), cut from its
    staged uint8 copies ``zyx`` / ``xzy`` (:func:`cut_from_staged`): no read of the source, and
    each unit's shard written once with the exemplars of its settled dedup group instead of
    provisional ones rewritten later. The staged copy holds the very bytes the units hashed, so
    a sample of ``check`` patches per unit is checked against the recorded hashes (a guard
    against a wrong copy; a full check costs as much as the cut). A source that fails it is
    reported as :func:`sync_pixels` reports one, its patches left without pixels (re-cut from
    the source before the filter). Counts as :func:`sync_pixels`."""
    p = index.patch_size
    stats = {"recut": 0, "dropped": 0, "shards": 0, "failed": 0}

    def cut(source_row: dict[str, Any], rows: dict[str, np.ndarray]) -> np.ndarray:
        try:
            patches = cut_from_staged(zyx, xzy, rows, p)
        except Exception as err:  # noqa: BLE001 - e.g. a staged copy on a disk that failed
            raise RecutError(f"{source_row['path']}: cannot cut patches from its staged copy ({err})") from err
        sample = np.unique(np.linspace(0, len(patches) - 1, min(check, len(patches))).astype(np.int64))
        check_recorded_hashes(source_row["path"], {c: v[sample] for c, v in rows.items()}, patches[sample], p)
        return patches

    if (table["offset"].astype(np.int64) >= 0).any():  # some units hold pixels (an earlier run's): the general way
        with index.settled_exemplars(table["id"][exemplar]):
            return sync_pixels(index, PixelSelection.settled(source), memory_mb, progress=False, cut=cut)
    # No unit holds pixels yet (the usual case): write each unit's exemplars as its first shard
    # file, without sync_pixels' scans of the patch table for shards to rewrite.
    source_row = index.source(source)
    picks = np.flatnonzero(exemplar)
    shards = table["shard"][picks]
    for shard in sorted(set(shards.tolist())):
        pick = picks[shards == shard]  # in id order: the shard's order
        try:
            patches = cut(source_row, {c: table[c][pick] for c in _TABLE})
        except RecutError as err:
            index.add_skipped(f"{source_row['path']} (re-cut)", str(err))
            print(f"skipped cutting exemplars of {source_row['path']}: {err}", file=sys.stderr)
            stats["failed"] = 1
            break
        atomic_save_npy(index.root / shard, patches)
        key = shard[len(f"shards/{source}/") : -len(".npy")]
        # the unit's rows and its checksum name the file, in one change
        index.repoint_unit(source, key, (), shard, table["id"][pick], np.arange(len(pick)), shard_checksum(patches))
        stats["shards"] += 1
    return stats


def sweep_unreferenced_shards(index: CorpusIndex) -> int:
    """Remove shard files of this corpus that no patch row points at (left by a crash between a
    rewrite's commit and the removal of the old version). Returns how many were removed."""
    used = index.shards_in_use()
    units_used = {unit_shard(s)[0] for s in used}
    # A unit that cut no patch at all keeps its empty shard under its own name.
    empty = index.task_units() - units_used
    removed = 0
    for path in (index.root / "shards").glob("*/*.npy"):
        rel = path.relative_to(index.root).as_posix()
        if rel not in used and rel not in empty:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


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

    root = Path(root)
    if not (root / "corpus.json").is_file():
        raise FileNotFoundError(f"{root}: no corpus.json (not a cemnet corpus)")
    out = Path(out) if out else root / "recut" / status
    out.mkdir(parents=True, exist_ok=True)
    patch_size = int(json.loads((root / "corpus.json").read_text())["settings"]["patch_size"])
    columns = (*_TABLE, "status", "reason", "group_id")
    with ReadOnlyIndex(root) as index:
        rows = index.patches_for_recut(columns, status, datasets)
        sources = index.sources_by_name()
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
            try:
                shard = np.load(root / str(table["shard"][pick[0]]), mmap_mode="r")
                patches[stored] = shard[offsets[stored]]
            except (OSError, ValueError, IndexError):  # rewritten by a curate run since: re-cut them
                stored[:] = False
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


def read_or_recut(corpus: Any, positions: np.ndarray,
                  memory_mb: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Padded uint8 (n, P, P) patches and true sizes (n, 2) of ``corpus`` rows ``positions``
    (a :class:`curation.corpus.Corpus`): stored pixels where it has them, else re-cut from the
    sources. Also returns a bool mask of the patches that could not be re-cut (left 0) and one
    problem per source that failed."""
    positions = np.asarray(positions, dtype=np.int64)
    p = corpus.patch_size
    patches = np.zeros((len(positions), p, p), dtype=np.uint8)
    stored = corpus.has_pixels[positions]
    if stored.any():
        patches[stored] = corpus.get_padded(positions[stored])[0]
    problems, failed = [], np.zeros(len(positions), dtype=bool)
    missing = np.flatnonzero(~stored)
    if len(missing):
        names = np.array([corpus.sources[corpus.source_index[i]] for i in positions[missing]], dtype=object)
        with ReadOnlyIndex(corpus.root) as index:
            sources = index.sources_by_name()
        for name in sorted(set(names.tolist())):
            pick = missing[names == name]
            at = positions[pick]
            rows = {"id": corpus.ids[at], "axis": corpus.axes[at], "slice": corpus.slices[at], "y": corpus.ys[at],
                    "x": corpus.xs[at], "h": corpus.sizes[at, 0], "w": corpus.sizes[at, 1],
                    "hash": corpus.hashes[at].view(np.int64)}
            try:
                patches[pick] = recut_source_rows(sources[name], rows, p, memory_mb)
            except RecutError as err:
                problems.append(str(err))
                failed[pick] = True
    return patches, corpus.sizes[positions], failed, problems
