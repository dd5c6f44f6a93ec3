"""The corpus on disk: sharded uint8 patch arrays plus a SQLite provenance index.

See ``docs/corpus_format.md``. :class:`CorpusIndex` is the writer side (used by the pipeline in
the main process only); :class:`Corpus` is the fast reader (memory-mapped shards, no per-patch
file opens) used by data loaders; :class:`TiffFolderCorpus` reads a CEM500K-style folder of
8-bit TIFFs with the same API, and :func:`export_tiff_folder` writes one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import hashlib
import json
import os
import re
import socket
import sqlite3
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

FORMAT_NAME = "cemnet-corpus"
FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, path TEXT NOT NULL, dataset TEXT, reader TEXT,
    shape_zyx TEXT, dtype TEXT, voxel_size_zyx TEXT, voxel_size_from TEXT, axes TEXT,
    uint8_rule TEXT, status TEXT NOT NULL DEFAULT 'pending', error TEXT,
    n_patches INTEGER DEFAULT 0, seconds REAL DEFAULT 0, notes TEXT, fingerprint TEXT, cut_settings TEXT,
    missing_chunks TEXT
);
CREATE TABLE IF NOT EXISTS tasks (
    source TEXT NOT NULL, key TEXT NOT NULL, status TEXT NOT NULL, n_patches INTEGER,
    seconds REAL, checksum TEXT, PRIMARY KEY (source, key)
);
CREATE TABLE IF NOT EXISTS patches (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, shard TEXT NOT NULL, offset INTEGER NOT NULL,
    axis TEXT NOT NULL, slice INTEGER NOT NULL, y INTEGER NOT NULL, x INTEGER NOT NULL,
    h INTEGER NOT NULL, w INTEGER NOT NULL, hash INTEGER NOT NULL,
    group_id INTEGER, status TEXT NOT NULL DEFAULT 'new', reason TEXT DEFAULT '', score REAL,
    filter_sig TEXT, filter_reason TEXT
);
CREATE INDEX IF NOT EXISTS patches_source ON patches(source);
CREATE TABLE IF NOT EXISTS skipped (path TEXT NOT NULL, problem TEXT NOT NULL, at REAL);
CREATE TABLE IF NOT EXISTS stages (name TEXT PRIMARY KEY, seconds REAL, info TEXT);
"""

PATCH_COLUMNS = ("source", "shard", "offset", "axis", "slice", "y", "x", "h", "w", "hash")


def hash_to_db(hashes: np.ndarray) -> np.ndarray:
    """uint64 -> int64 bit pattern (SQLite integers are signed 64-bit)."""
    return np.asarray(hashes, dtype=np.uint64).view(np.int64)


def hash_from_db(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).view(np.uint64)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` via a temporary file + rename, so a crash never leaves half a shard.

    No fsync (it cost ~10% of curation time): after a power loss a shard may be missing or short
    although its unit is marked done; :meth:`CorpusIndex.done_tasks` checks shard sizes and so
    the unit is redone.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def npy_nbytes(shape: tuple[int, ...], dtype: np.dtype | str = np.uint8) -> int:
    """Size on disk of an ``np.save`` file of this shape (header included)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return buf.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize


def read_rows(
    shard: Callable[[int], np.ndarray], shard_no: np.ndarray, rows: np.ndarray, patch_size: int
) -> np.ndarray:
    """Patches ``shard(shard_no[i])[rows[i]]`` as one uint8 (n, P, P) array, shard by shard, rows
    in order within each shard (sequential reads on disk)."""
    out = np.empty((len(rows), patch_size, patch_size), dtype=np.uint8)
    for s in np.unique(shard_no):
        pick = np.nonzero(shard_no == s)[0]
        wanted = rows[pick]
        order = np.argsort(wanted)
        out[pick[order]] = shard(int(s))[wanted[order]]
    return out


# Patch ids are made from provenance, so two runs of the same command give every patch the same
# id whatever order parallel units finish in (label CSVs keyed by id carry over to a rebuilt
# corpus), and ``ORDER BY id`` is source, plane, slice, row, column: the shards' own order.
_ID_SOURCE_SHIFT, _ID_AXIS_SHIFT = 40, 38
_ID_AXES = ("xy", "xz", "yz")


def provenance_ids(source_no: int, shape_zyx: Sequence[int], patch_size: int,
                   rows: Sequence[tuple]) -> list[int]:
    """Patch ids for index ``rows`` (laid out as :data:`PATCH_COLUMNS`) of the source whose
    ``sources.id`` is ``source_no`` and whose volume has ``shape_zyx``: the source number, the
    plane, then the patch's position in the grid of its plane (slice, row, column)."""
    nz, ny, nx = (int(v) for v in shape_zyx)
    plane = {"xy": (ny, nx), "xz": (nz, nx), "yz": (nz, ny)}
    if not 0 < source_no < 2 ** (63 - _ID_SOURCE_SHIFT):
        raise ValueError(f"source number {source_no} out of the range patch ids can hold")
    ids = []
    for row in rows:
        axis, index, y, x = row[3], int(row[4]), int(row[5]), int(row[6])
        h, w = plane[axis]
        rows_per_plane, cols = -(-h // patch_size), -(-w // patch_size)
        local = (index * rows_per_plane + y // patch_size) * cols + x // patch_size
        if local >= 2**_ID_AXIS_SHIFT:
            raise ValueError(f"patch {axis} {index} {y} {x}: position out of the range patch ids can hold")
        ids.append((source_no << _ID_SOURCE_SHIFT) | (_ID_AXES.index(axis) << _ID_AXIS_SHIFT) | local)
    return ids


_VERSION = re.compile(r"^(?P<unit>.+?)(?:\.v(?P<n>\d+))?\.npy$")


def unit_shard(shard: str) -> tuple[str, int]:
    """``shards/s/xy-00000.v3.npy`` -> (``shards/s/xy-00000.npy``, 3): the unit's own name and version."""
    head, _, name = shard.rpartition("/")
    m = _VERSION.match(name)
    if not m:
        return shard, 0
    return f"{head}/{m['unit']}.npy" if head else f"{m['unit']}.npy", int(m["n"] or 0)


def versioned(shard: str, n: int) -> str:
    """The name of version ``n`` of ``shard``'s unit (0: the unit's own name)."""
    base, _ = unit_shard(shard)
    return base if n == 0 else base[: -len(".npy")] + f".v{n}.npy"


def shard_intact(root: Path, shard: str, rows: int, patch_size: int) -> bool:
    """Whether ``root/shard`` exists with the size of ``rows`` patches (power-loss check, no read)."""
    path = root / shard
    return path.is_file() and path.stat().st_size == npy_nbytes((rows, patch_size, patch_size))


def shard_checksum(patches: np.ndarray) -> str:
    """Checksum of a shard's patch data (the array's bytes in C order): ``xxh3_128:<hex>``.
    xxh3 runs at ~10 GB/s here (sha256: 0.6 GB/s, as long as hashing the patches)."""
    import xxhash

    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(np.ascontiguousarray(patches).reshape(-1).data)


def check_shard(path: Path, n_patches: int, patch_size: int, checksum: str | None) -> str | None:
    """What is wrong with the shard at ``path`` that should hold ``n_patches`` patches with
    ``checksum`` (None: written before checksums, only its shape is checked); None if intact."""
    if not path.is_file():
        return "missing"
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        return f"unreadable ({err})"
    expected = (int(n_patches), patch_size, patch_size)
    if data.dtype != np.uint8 or data.shape != expected:
        return f"holds {data.dtype} {data.shape}, the index expects uint8 {expected}"
    if checksum is None:
        return None
    if not checksum.startswith("xxh3_128:"):
        return f"unknown checksum kind {checksum.split(':')[0]!r}"
    if shard_checksum(data) != checksum:
        return "checksum mismatch: its patch data changed after it was written"
    return None


def verify_shards(root: str | os.PathLike, sources: Iterable[str] | None = None,
                  progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Check every finished unit's stored shard file of the corpus at ``root`` (or of
    ``sources``) against the index: present, readable, holding as many patches as the unit has
    rows with pixels, and the checksum recorded when that file was written (by the unit, or by
    a rewrite to version ``.vN``); also that the index's offsets fit in it. A unit none of whose
    patches has pixels stored (duplicates and filtered patches of an exemplars-only corpus) has
    nothing to check. Reads every shard once, with a progress bar.

    Returns (problems, counts): one dict per bad shard (``source``, ``key``, ``shard``,
    ``patches``: how many it should hold, ``problem``), and ``{"shards", "patches",
    "unverified", "no_pixels"}`` (unverified: shards from before checksums, whose shape alone was
    checked; no_pixels: finished units with no pixels stored, not counted in ``shards``)."""
    from tqdm import tqdm

    root = Path(root)
    try:
        meta = json.loads((root / "corpus.json").read_text())
        patch_size = int(meta["settings"]["patch_size"])
        with read_only_index(root) as db:
            has_checksum = "checksum" in {r[1] for r in db.execute("PRAGMA table_info(tasks)")}
            tasks = db.execute(
                f"SELECT source, key, {'checksum' if has_checksum else 'NULL'} FROM tasks "
                "WHERE status='done' ORDER BY source, key").fetchall()
            # per stored shard file: rows with pixels in it, their largest offset
            stored: dict[str, list[tuple[str, int, int]]] = {}
            for shard, n, last in db.execute(
                    "SELECT shard, SUM(offset >= 0), MAX(offset) FROM patches GROUP BY shard"):
                stored.setdefault(unit_shard(shard)[0], []).append((shard, int(n or 0), int(last)))
    except (OSError, ValueError, KeyError, sqlite3.DatabaseError) as err:
        raise CorpusError(root, f"cannot read the corpus's index ({err})") from None
    wanted = None if sources is None else set(sources)
    tasks = [t for t in tasks if wanted is None or t[0] in wanted]
    problems, counts = [], {"shards": 0, "patches": 0, "unverified": 0, "no_pixels": 0}
    for source, key, checksum in tqdm(tasks, desc="verify", unit="shard", disable=not progress):
        unit = f"shards/{source}/{key}.npy"
        files = stored.get(unit, [(unit, 0, -1)])
        shard, n, last = max(files, key=lambda f: f[1])
        if n == 0 and len(files) == 1:  # no pixels stored for this unit: nothing to lose
            counts["no_pixels"] += 1
            continue
        if len(files) > 1:  # a rewrite points every row of a unit at its new version at once
            problem = f"the index spreads the unit's rows over {len(files)} shard versions"
        else:
            problem = check_shard(root / shard, n, patch_size, checksum)
        if problem is None and last >= n:
            problem = f"the index lists {n} patches in it, offsets up to {last}"
        counts["shards"] += 1
        counts["patches"] += n
        counts["unverified"] += checksum is None
        if problem:
            problems.append({"source": source, "key": key, "shard": shard, "patches": n, "problem": problem})
    return problems, counts


class CorpusError(ValueError):
    """A damaged or inconsistent corpus: the message names the file and what to do."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def damaged_index(root: Path, err: BaseException) -> CorpusError:
    return CorpusError(Path(root) / "index.sqlite", f"the corpus index is damaged ({err}); restore it from a "
                       "backup, or build the corpus again into a new folder (the shards cannot be used without it)")


def damaged_shard(root: Path, shard: str, problem: str) -> CorpusError:
    return CorpusError(Path(root) / shard, f"{problem}; run `cemnet curate verify {root}` to list every damaged "
                       "shard, then the `cemnet curate` command that built the corpus to cut them again")


LOCK_FILE = ".lock"


class CorpusLockedError(RuntimeError):
    """Another writer (a running ``cemnet curate``, or an open :class:`CorpusIndex`) holds the corpus."""


_held_lock_fds: set[int] = set()  # descriptors of the corpus locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a worker of the process pool): let go of the parent's corpus locks.

    An ``flock`` belongs to the open file, which ``fork`` shares with the child: a worker that
    outlived a killed ``cemnet curate`` kept the lock and every resume was refused. ``dup2`` of
    /dev/null over the inherited descriptor drops the child's share of it (closing the number
    instead could later close an unrelated file that reused it); the parent keeps the lock."""
    release_in_child(_held_lock_fds)


def release_in_child(fds: set[int]) -> None:
    """Point each inherited descriptor of ``fds`` at /dev/null (in a forked child) and forget
    them: the child's share of the open file goes, the number stays taken."""
    if not fds:
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_corpus(root: Path) -> IO[str] | None:
    """Take ``root/.lock`` exclusively; the lock lasts while the returned file stays open.

    It is an ``flock``: the kernel drops it when its holder exits, however it dies (Ctrl-C,
    SIGKILL, OOM), so a crashed run never leaves a stale lock to remove by hand. Processes
    forked while it is held (pool workers) do not keep it (see :func:`_drop_inherited_locks`).
    On a file system without locks (some network mounts) it warns and goes on unlocked; on a
    platform without ``fcntl`` it does nothing.
    """
    try:
        import fcntl
    except ImportError:
        return None
    handle = open(root / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CorpusLockedError(
            f"{root}: the corpus is being written by {holder}; wait for that run to end (or stop it), "
            "then run again: finished work is kept"
        ) from None
    except OSError as err:
        warnings.warn(f"{root}: cannot lock the corpus ({err}); do not run two writers on it at once", stacklevel=3)
        return handle
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    _held_lock_fds.add(handle.fileno())
    return handle


# Montages of removed patches show stored pixels, else xy patches re-cut from their sources:
# one plane region each, cheap; an xz / yz patch would read a column through the volume.
_SHOWABLE = "(offset >= 0 OR axis = 'xy')"


@dataclass(frozen=True)
class PixelSelection:
    """Which patches the shards should hold pixels for (:func:`curation.pixels.sync_pixels`): a
    condition over the ``patches`` table with its parameters. Callers use the named
    constructors, so the SQL stays here, beside the schema it depends on."""

    condition: str
    params: tuple = ()

    @classmethod
    def every_patch(cls) -> "PixelSelection":
        """``--keep-all-pixels``: every patch."""
        return cls("1")

    @classmethod
    def kept(cls) -> "PixelSelection":
        """Exemplars-only storage after the filter: the kept patches."""
        return cls("status = 'kept'")

    @classmethod
    def for_filter(cls, filter_sig: str) -> "PixelSelection":
        """Before the filter: what has pixels, plus every exemplar not already judged out by the
        filter ``filter_sig`` (those it must judge, and those that stay kept)."""
        return cls("offset >= 0 OR (group_id = id AND NOT (COALESCE(filter_sig = ?, 0) "
                   "AND COALESCE(filter_reason, '') != ''))", (filter_sig,))

    @classmethod
    def settled(cls, source: str) -> "PixelSelection":
        """For ``source`` exactly the ids in :meth:`CorpusIndex.settled_exemplars`' temporary
        table; every other source keeps what it has."""
        return cls("CASE WHEN source = ? THEN id IN (SELECT id FROM temp.settled_exemplars) ELSE offset >= 0 END",
                   (source,))


class IndexQueries:
    """Named read queries on ``index.sqlite`` (tables as in ``docs/corpus_format.md``), shared by
    the writer (:class:`CorpusIndex`) and read-only handles (:class:`ReadOnlyIndex`), so no module
    outside this one writes SQL against the corpus schema."""

    db: sqlite3.Connection

    def source(self, name: str) -> dict[str, Any] | None:
        """The ``sources`` row of ``name`` as a dict, or None."""
        cur = self.db.execute("SELECT * FROM sources WHERE name=?", (name,))
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row))

    def sources(self) -> list[dict[str, Any]]:
        """Every ``sources`` row as a dict, in the order sources were added."""
        cur = self.db.execute("SELECT * FROM sources ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def sources_by_name(self) -> dict[str, dict[str, Any]]:
        """``{name: sources row}`` (what re-cutting a source needs: path, reader, uint8 rule)."""
        return {row["name"]: row for row in self.sources()}

    def cut_source_paths(self) -> set[str]:
        """Paths of the sources with patches in the corpus (status ``done`` or ``partial``)."""
        return {r[0] for r in self.db.execute("SELECT path FROM sources WHERE status IN ('done', 'partial')")}

    def uint8_rules(self) -> dict[str, str]:
        """``{source name: uint8 rule JSON}`` of the sources that have one."""
        return {name: rule for name, rule in self.db.execute("SELECT name, uint8_rule FROM sources") if rule}

    def status_counts(self) -> dict[tuple[str, str], int]:
        """``{(source, status): number of patches}`` over every patch ever extracted."""
        return {(s, st): int(n) for s, st, n in
                self.db.execute("SELECT source, status, COUNT(*) FROM patches GROUP BY source, status")}

    def showable_patches(self, status: str) -> dict[str, np.ndarray]:
        """``id``, ``reason`` of the patches of ``status`` a montage can show cheaply: those with
        stored pixels, and xy patches (re-cut from one plane region each)."""
        return self._patch_columns(["id", "reason"], f"WHERE status=? AND {_SHOWABLE}", (status,))

    def largest_groups(self, limit: int) -> list[tuple[int | None, int]]:
        """``(group_id, size)`` of the ``limit`` largest near-duplicate groups (size > 1), largest
        first (group None: patches not deduplicated yet)."""
        return [(g, int(n)) for g, n in self.db.execute(
            "SELECT group_id, COUNT(*) AS n FROM patches GROUP BY group_id HAVING n > 1 ORDER BY n DESC LIMIT ?",
            (limit,))]

    def showable_group_members(self, group_id: int, limit: int) -> list[int]:
        """Ids of up to ``limit`` members of a group a montage can show (see
        :meth:`showable_patches`), its exemplar first, then by id."""
        return [r[0] for r in self.db.execute(
            f"SELECT id FROM patches WHERE group_id=? AND {_SHOWABLE} ORDER BY (id != group_id), id LIMIT ?",
            (group_id, limit))]

    def exemplar_count(self) -> int:
        """How many patches head their dedup group (the exemplars, kept or filtered)."""
        return int(self.db.execute("SELECT COUNT(*) FROM patches WHERE group_id = id").fetchone()[0])

    def exemplar_patches(self, source: str, columns: Iterable[str]) -> dict[str, np.ndarray]:
        """``columns`` of the exemplars (patches that head their dedup group) of ``source``."""
        return self._patch_columns(columns, "WHERE source = ? AND group_id = id", (source,))

    def stored_rows_per_unit(self, source: str) -> dict[str, tuple[str, int]]:
        """Unit shard name (``shards/<source>/<key>.npy``) -> (the shard file its rows name now,
        how many of them have pixels stored: the patches that file must hold)."""
        return {unit_shard(shard)[0]: (shard, int(n or 0)) for shard, n in self.db.execute(
            "SELECT shard, SUM(offset >= 0) FROM patches WHERE source=? GROUP BY shard", (source,))}

    def shards_in_use(self) -> set[str]:
        """Shard files some patch row names."""
        return {r[0] for r in self.db.execute("SELECT DISTINCT shard FROM patches")}

    def task_units(self) -> set[str]:
        """The unit shard names (``shards/<source>/<key>.npy``) of every recorded work unit."""
        return {f"shards/{s}/{k}.npy" for s, k in self.db.execute("SELECT source, key FROM tasks")}

    def patches_for_recut(self, columns: Sequence[str], status: str,
                          datasets: Sequence[str] | None = None) -> list[tuple]:
        """Rows (``columns`` of ``patches``) of the patches of ``status`` (or ``"all"``), of the
        ``datasets`` given (a source's dataset, or its name), ordered by source, shard and id:
        unit by unit, so each unit's shard and source region is read once."""
        where, params = ("WHERE p.status = ?", [status]) if status != "all" else ("WHERE 1", [])
        if datasets:
            where += f" AND COALESCE(s.dataset, s.name) IN ({', '.join('?' * len(datasets))})"
            params += list(datasets)
        return self.db.execute(f"SELECT {', '.join('p.' + c for c in columns)} FROM patches p JOIN sources s "
                               f"ON s.name = p.source {where} ORDER BY p.source, p.shard, p.id", params).fetchall()

    def _patch_columns(self, columns: Iterable[str], where: str = "", params: tuple = ()) -> dict[str, np.ndarray]:
        cols = list(columns)
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM patches {where} ORDER BY id", params).fetchall()
        if not rows:
            return {c: np.array([]) for c in cols}
        return {c: np.array(v) for c, v in zip(cols, zip(*rows))}


class ReadOnlyIndex(IndexQueries):
    """The named queries of :class:`IndexQueries` on a read-only connection to
    ``root/index.sqlite``: takes no lock, so it works while ``cemnet curate`` writes.
    Use as a context manager (the connection closes on leaving it)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.db = sqlite3.connect(f"file:{self.root / 'index.sqlite'}?mode=ro", uri=True)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "ReadOnlyIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CorpusIndex(IndexQueries):
    """Writer-side handle on ``CORPUS/index.sqlite`` and ``corpus.json``."""

    commit_every: float = 2.0  # seconds between commits of batched changes (see write)

    def __init__(self, root: str | os.PathLike, settings: dict[str, Any] | None = None) -> None:
        """Open (``settings=None``) or create / extend the corpus at ``root``.

        Holds the corpus's write lock until :meth:`close`: a second writer, in this process or
        another, gets :class:`CorpusLockedError` instead of interleaving its writes.
        """
        self.root = Path(root)
        meta_path = self.root / "corpus.json"
        if settings is None and not meta_path.exists():
            raise FileNotFoundError(f"{self.root}: no corpus.json (not a cemnet corpus)")
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"{self.root}: exists and is not a folder; a corpus is a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = lock_corpus(self.root)
        try:
            self._open(meta_path, settings)
        except BaseException:
            self._release_lock()
            raise

    def _open(self, meta_path: Path, settings: dict[str, Any] | None) -> None:
        if meta_path.exists():
            self.meta = json.loads(meta_path.read_text())
            if self.meta.get("format") != FORMAT_NAME:
                raise ValueError(f"{meta_path}: not a cemnet corpus")
            old = self.meta.get("settings", {})
            if settings is not None:
                # Patches already written were cut with the old geometry: refuse to mix.
                for key in ("patch_size",):
                    if key in old and old[key] != settings.get(key):
                        raise ValueError(
                            f"{self.root}: corpus was built with {key}={old[key]}, "
                            f"cannot add patches with {key}={settings.get(key)}"
                        )
                self.meta["settings"] = {**old, **settings}
        else:
            self.meta = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "settings": settings,
            }
        # Autocommit mode: transactions are ours (see write / flush), not the sqlite3 module's.
        self.db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
        self._last_commit = time.monotonic()
        try:
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            self.db.close()
            self.db = None
            raise damaged_index(self.root, err) from None
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(sources)")}
        for added in ("fingerprint", "cut_settings", "missing_chunks"):  # a corpus written before these columns existed
            if added not in columns:
                self.db.execute(f"ALTER TABLE sources ADD COLUMN {added} TEXT")
        if "checksum" not in {row[1] for row in self.db.execute("PRAGMA table_info(tasks)")}:
            self.db.execute("ALTER TABLE tasks ADD COLUMN checksum TEXT")
        self.save_meta()

    def _release_lock(self) -> None:
        if self._lock is not None:
            _held_lock_fds.discard(self._lock.fileno())
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def save_meta(self) -> None:
        self.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        tmp = self.root / "corpus.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        os.replace(tmp, self.root / "corpus.json")

    @property
    def patch_size(self) -> int:
        return int(self.meta["settings"]["patch_size"])

    # -- sources and tasks -------------------------------------------------------------------
    def upsert_source(self, name: str, **fields: Any) -> None:
        """Create the source row or update the given fields of it."""
        fields = {k: (json.dumps(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in fields.items()}
        with self.write():
            cur = self.db.execute(
                f"UPDATE sources SET {', '.join(f'{c}=?' for c in fields)} WHERE name=?", (*fields.values(), name)
            )
            if cur.rowcount == 0:
                self.db.execute(
                    f"INSERT INTO sources (name, {', '.join(fields)}) VALUES (?, {', '.join('?' * len(fields))})",
                    (name, *fields.values()),
                )

    def done_tasks(self, source: str) -> set[str]:
        """Keys of the finished units of ``source`` whose shard is intact on disk: it holds as
        many patches as the unit has rows with pixels (a unit without any needs no shard)."""
        expected = self.stored_rows_per_unit(source)
        rows = self.db.execute("SELECT key FROM tasks WHERE source=? AND status='done'", (source,)).fetchall()
        done = set()
        for (key,) in rows:
            shard, n = expected.get(f"shards/{source}/{key}.npy", (f"shards/{source}/{key}.npy", 0))
            if n == 0 or shard_intact(self.root, shard, n, self.patch_size):
                done.add(key)
        return done

    def all_tasks(self, source: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT key FROM tasks WHERE source=?", (source,))}

    def commit_task(self, source: str, key: str, shard: str, rows: Sequence[tuple], seconds: float,
                    checksum: str | None = None) -> None:
        """Record a finished work unit and its patches in one transaction (all or nothing).

        Rows of an earlier, interrupted attempt at the same shard are replaced, never doubled.
        ``checksum``: :func:`shard_checksum` of the shard's patches, checked by :func:`verify_shards`.
        """
        found = self.db.execute("SELECT id, shape_zyx FROM sources WHERE name=?", (source,)).fetchone()
        if found and found[1]:  # ids from provenance (a source without a shape: SQLite's next rowid)
            ids = provenance_ids(found[0], json.loads(found[1]), self.patch_size, rows)
            rows = [(i, *r) for i, r in zip(ids, rows)]
        else:
            rows = [(None, *r) for r in rows]
        with self.write():
            # ... and its rows whose pixels were since moved to a rewritten version (curation.pixels)
            prefix = shard[: -len(".npy")] + ".v"
            self.db.execute("DELETE FROM patches WHERE shard=? OR substr(shard, 1, ?) = ?", (shard, len(prefix), prefix))
            self.db.executemany(
                f"INSERT INTO patches (id, {', '.join(PATCH_COLUMNS)}) VALUES (?, {', '.join('?' * len(PATCH_COLUMNS))})",
                rows,
            )
            self.db.execute(
                "INSERT OR REPLACE INTO tasks VALUES (?, ?, 'done', ?, ?, ?)", (source, key, len(rows), seconds, checksum)
            )

    def drop_task(self, source: str, key: str) -> int:
        """Forget one finished unit (its shard failed verification): its patches (with pixels
        or not), its row and its shard files (every version) go, so nothing serves the damaged
        data and the next run cuts it again. Returns how many patches it had."""
        shard = f"shards/{source}/{key}.npy"
        # Files first: a crash in between leaves a unit that done_tasks redoes.
        for path in [self.root / shard, *(self.root / "shards" / source).glob(f"{key}.v*.npy")]:
            if unit_shard(path.relative_to(self.root).as_posix())[0] == shard:
                path.unlink(missing_ok=True)
        prefix = shard[: -len(".npy")] + ".v"
        with self.write():
            n = self.db.execute("DELETE FROM patches WHERE shard=? OR substr(shard, 1, ?) = ?",
                                (shard, len(prefix), prefix)).rowcount
            self.db.execute("DELETE FROM tasks WHERE source=? AND key=?", (source, key))
            self.db.execute("UPDATE sources SET status='pending' WHERE name=?", (source,))
        return int(n)

    def forget_source(self, name: str) -> int:
        """Drop every patch, work unit and shard of ``name`` (its data changed); returns how many
        patches it had. Shards go first: a crash in between leaves units whose shard is missing,
        which :meth:`done_tasks` already treats as not done."""
        import shutil

        shutil.rmtree(self.root / "shards" / name, ignore_errors=True)
        with self.write():
            n = self.db.execute("SELECT COUNT(*) FROM patches WHERE source=?", (name,)).fetchone()[0]
            self.db.execute("DELETE FROM patches WHERE source=?", (name,))
            self.db.execute("DELETE FROM tasks WHERE source=?", (name,))
            self.db.execute("UPDATE sources SET status='pending', n_patches=0 WHERE name=?", (name,))
        return int(n)

    def add_skipped(self, path: str, problem: str) -> None:
        with self.write():
            self.db.execute("DELETE FROM skipped WHERE path=?", (path,))
            self.db.execute("INSERT INTO skipped VALUES (?, ?, ?)", (path, problem, time.time()))

    def clear_skipped(self, path: str, parts: bool = False) -> None:
        """Forget that ``path`` was skipped; with ``parts``, also its skipped parts (``path (...)``)."""
        with self.write():
            self.db.execute("DELETE FROM skipped WHERE path=?", (path,))
            if parts:
                self.db.execute("DELETE FROM skipped WHERE substr(path, 1, ?) = ?", (len(path) + 2, path + " ("))

    def skipped(self) -> list[tuple[str, str]]:
        return [tuple(r) for r in self.db.execute("SELECT path, problem FROM skipped ORDER BY at")]

    def record_stage(self, name: str, seconds: float, info: dict[str, Any] | None = None) -> None:
        with self.write():
            self.db.execute("INSERT OR REPLACE INTO stages VALUES (?, ?, ?)", (name, seconds, json.dumps(info or {})))

    def stages(self) -> dict[str, tuple[float, dict]]:
        return {r[0]: (r[1], json.loads(r[2])) for r in self.db.execute("SELECT * FROM stages")}

    # -- patch-level decisions ---------------------------------------------------------------
    def patch_table(self, columns: Iterable[str], where: str = "", params: tuple = ()) -> dict[str, np.ndarray]:
        """``columns`` of the patch rows (all, or those a ``WHERE`` clause selects) in id order.
        Outside this module prefer a named query (:class:`IndexQueries`) to a raw ``where``."""
        return self._patch_columns(columns, where, params)

    def set_decisions(self, ids: np.ndarray, column_values: dict[str, np.ndarray]) -> None:
        """Set columns of the patches ``ids`` (one value per patch per column) in one change."""
        cols = list(column_values)
        sets = ", ".join(f"{c}=?" for c in cols)
        # tolist() turns numpy scalars into Python ones in C: 10x faster than item() per value.
        values = [np.asarray(column_values[c]).tolist() for c in cols]
        with self.write():
            self.db.executemany(f"UPDATE patches SET {sets} WHERE id=?",
                                zip(*values, np.asarray(ids, dtype=np.int64).tolist()))

    # -- which patches hold pixels (curation.pixels) -------------------------------------------
    def pixel_changes(self, columns: Sequence[str],
                      selection: PixelSelection) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Rows of the shards whose set of patches with pixels must change so that exactly the
        patches of ``selection`` have pixels: ``columns`` of their rows that have or get pixels
        (the others keep offset -1 and follow their unit's shard name), and a bool per row: it
        should have pixels. SQLite finds those shards in one scan."""
        want = selection.condition
        wanted = f"CASE WHEN {want} THEN 1 ELSE 0 END"
        table = self._patch_columns(
            (*columns, wanted),
            f"WHERE (offset >= 0 OR ({want})) AND shard IN (SELECT DISTINCT shard FROM patches "
            f"WHERE ({wanted}) != (offset >= 0))", tuple(selection.params) * 3)
        return table, table.pop(wanted).astype(bool)

    @contextlib.contextmanager
    def settled_exemplars(self, ids: np.ndarray) -> Iterator[None]:
        """The patch ids for :meth:`PixelSelection.settled`, as a temporary table while the block
        runs (an IN list of 10^5 parameters would exceed SQLite's limit)."""
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS settled_exemplars (id INTEGER PRIMARY KEY)")
        self.db.execute("DELETE FROM temp.settled_exemplars")
        self.db.executemany("INSERT INTO temp.settled_exemplars VALUES (?)",
                            ((i,) for i in np.asarray(ids, dtype=np.int64).tolist()))
        try:
            yield
        finally:
            self.db.execute("DELETE FROM temp.settled_exemplars")

    def source_patch_table(self, columns: Iterable[str], source: str) -> dict[str, np.ndarray]:
        """:meth:`patch_table` of the patches of ``source`` (id order)."""
        return self.patch_table(columns, "WHERE source = ?", (source,))

    def repoint_unit(self, source: str, key: str, old_shards: Iterable[str], target: str,
                     ids: np.ndarray, offsets: np.ndarray, checksum: str) -> None:
        """Point every row of a unit at its rewritten shard ``target`` in one change: rows in
        ``old_shards`` take the new name, rows ``ids`` their new ``offsets`` (-1: no pixels), and
        the unit's checksum becomes the new file's (the one :func:`verify_shards` checks)."""
        with self.write():
            for old_name in old_shards:  # one statement per unit, not one per row
                if old_name != target:  # (each scans the source's rows: skip the no-ops)
                    self.db.execute("UPDATE patches SET shard=? WHERE source=? AND shard=?",
                                    (target, source, old_name))
            self.db.executemany("UPDATE patches SET offset=? WHERE id=?",
                                zip(np.asarray(offsets, dtype=np.int64).tolist(), np.asarray(ids, dtype=np.int64).tolist()))
            self.db.execute("UPDATE tasks SET checksum=? WHERE source=? AND key=?", (checksum, source, key))

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One all-or-nothing change to the index (a savepoint) inside a batched transaction.

        Committing every change made SQLite fsync several times per source: 0.8 ms each on a
        local disk, 10+ ms on a network file system, minutes for 100k small 2D images. Changes
        are committed together at most every :attr:`commit_every` seconds, by :meth:`flush`
        and by :meth:`close` (also on Ctrl-C). A killed process or a power loss therefore loses
        at most the last few seconds of work, whose units are redone on resume; the database
        itself stays consistent (SQLite's journal), and a change is never half applied.
        """
        if not self.db.in_transaction:
            self.db.execute("BEGIN")
        self.db.execute("SAVEPOINT change")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK TO change")
            self.db.execute("RELEASE change")
            raise
        self.db.execute("RELEASE change")
        if time.monotonic() - self._last_commit >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        """Commit the changes batched so far (other connections see only committed data)."""
        if self.db.in_transaction:
            self.db.execute("COMMIT")
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Commit, close the index and release the corpus's write lock (safe to call twice)."""
        if getattr(self, "db", None) is not None:
            self.flush()
            self.db.close()
            self.db = None
        self._release_lock()

    # -- named queries of the extraction scheduler and the dedup / filter stages ------------
    def count_patches(self, source: str) -> int:
        """How many patches of ``source`` the index holds (with pixels or not)."""
        return int(self.db.execute("SELECT COUNT(*) FROM patches WHERE source=?", (source,)).fetchone()[0])

    def forget_plane_units(self, source: str) -> None:
        """Forget that the xz / yz units of ``source`` are done (they were cut around z-ranges
        lost to bad data: a re-run cuts them whole again); their rows stay until then."""
        with self.write():
            self.db.execute("DELETE FROM tasks WHERE source=? AND (key LIKE 'xz-%' OR key LIKE 'yz-%')", (source,))

    def dataset_patch_table(self, columns: Iterable[str], dataset: str,
                            leave_out: Iterable[str] = ()) -> dict[str, np.ndarray]:
        """:meth:`patch_table` of the patches of every source in ``dataset`` ("*": every patch),
        without those of the sources ``leave_out``."""
        where, params = "WHERE 1", ()
        if dataset != "*":
            where = "WHERE source IN (SELECT name FROM sources WHERE COALESCE(dataset, name) = ?)"
            params = (dataset,)
        leave_out = tuple(leave_out)
        if leave_out:
            where += f" AND source NOT IN ({', '.join('?' * len(leave_out))})"
            params += leave_out
        return self.patch_table(columns, where, params)

    def exemplars_to_judge(self, columns: Iterable[str], filter_sig: str) -> dict[str, np.ndarray]:
        """:meth:`patch_table` of the exemplars with pixels not yet judged by the filter ``filter_sig``."""
        return self.patch_table(
            columns, "WHERE group_id = id AND offset >= 0 AND (filter_sig IS NULL OR filter_sig != ?)", (filter_sig,))

    def mark_exemplars_without_pixels(self, reason: str) -> None:
        """Exemplars with no pixels (their source could not be re-cut) are judged out for ``reason``."""
        with self.write():
            self.db.execute("UPDATE patches SET filter_sig = NULL, score = NULL, filter_reason = ? "
                            "WHERE group_id = id AND offset < 0", (reason,))

    def decide_status(self) -> None:
        """Every patch's final status and reason, from its dedup group and its filter result."""
        with self.write():
            self.db.execute(
                "UPDATE patches SET "
                "status = CASE WHEN group_id != id THEN 'duplicate' WHEN filter_reason = '' THEN 'kept' "
                "ELSE 'filtered' END, "
                "reason = CASE WHEN group_id != id THEN 'near-duplicate of #' || group_id ELSE filter_reason END"
            )


_INDEX_COLUMNS = ("id", "source", "shard", "offset", "axis", "slice", "y", "x", "h", "w", "hash", "status")
_TEXT_COLUMNS = ("source", "shard", "axis", "status")
INDEX_CACHE = "index_cache.npz"


def _db_stamp(root: Path) -> np.ndarray:
    st = (root / "index.sqlite").stat()
    return np.array([st.st_size, st.st_mtime_ns], dtype=np.int64)


def read_only_index(root: str | os.PathLike) -> contextlib.closing[sqlite3.Connection]:
    """A read-only connection to ``root/index.sqlite`` that is closed on leaving the ``with``
    (a bare ``with sqlite3.connect(...)`` only commits, leaving the file open)."""
    return contextlib.closing(sqlite3.connect(f"file:{Path(root) / 'index.sqlite'}?mode=ro", uri=True))


def _query_columns(root: Path, status: str | None) -> dict[str, np.ndarray]:
    where, params = ("WHERE status=?", (status,)) if status else ("", ())
    with read_only_index(root) as db:
        rows = db.execute(f"SELECT {', '.join(_INDEX_COLUMNS)} FROM patches {where} ORDER BY id", params).fetchall()
    values = list(zip(*rows)) if rows else [()] * len(_INDEX_COLUMNS)
    return {c: np.array(v, dtype=object if c in _TEXT_COLUMNS else np.int64)
            for c, v in zip(_INDEX_COLUMNS, values)}


def write_index_cache(root: str | os.PathLike) -> Path:
    """Columnar copy of the patch index (``index_cache.npz``) so a loader opens a corpus of
    millions of patches in a second instead of iterating SQLite rows. Valid only while
    ``index.sqlite`` is unchanged (its size and mtime are stored), else readers ignore it."""
    root = Path(root)
    cols = _query_columns(root, None)
    arrays: dict[str, np.ndarray] = {"stamp": _db_stamp(root)}
    for c, v in cols.items():
        if c in _TEXT_COLUMNS:  # categorical: vocabulary + codes, no pickled objects
            vocab, codes = np.unique(v.astype(str), return_inverse=True) if len(v) else (np.array([], str), v)
            arrays[c], arrays[c + "_vocab"] = codes.astype(np.int32), vocab
        else:
            arrays[c] = v
    tmp = root / (INDEX_CACHE + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, root / INDEX_CACHE)
    return root / INDEX_CACHE


def index_columns(root: Path, status: str | None) -> dict[str, np.ndarray]:
    """The patch index as columns (rows with ``status``, or all), from the cache when valid."""
    cache = root / INDEX_CACHE
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if np.array_equal(z["stamp"], _db_stamp(root)):
                cols = {c: (z[c + "_vocab"].astype(object)[z[c]] if c in _TEXT_COLUMNS else z[c])
                        for c in _INDEX_COLUMNS}
                if status:
                    keep = cols["status"] == status
                    cols = {c: v[keep] for c, v in cols.items()}
                return cols
    return _query_columns(root, status)


@runtime_checkable
class PatchCorpus(Protocol):
    """What training and transferability read from a corpus of 2D uint8 patches.

    Implemented by :class:`Corpus` (a cemnet corpus folder), :class:`TiffFolderCorpus` (a
    CEM500K-style folder of TIFFs) and ``cemnet.data.ArrayCorpus`` (arrays in memory);
    ``cemnet.data.load_corpus`` accepts any object that has all of it.
    """

    patch_size: int  #: P: every patch fits in P x P
    mean: float  #: intensity mean of the patches, in [0, 1] units (normalisation)
    std: float  #: intensity standard deviation, in [0, 1] units
    sources: list[str]  #: source names
    source_index: np.ndarray  #: (n,) int: position of each patch's source in ``sources``

    @property
    def fingerprint(self) -> str:
        """Identifies which patches the corpus serves (recorded in checkpoints)."""

    def __len__(self) -> int:
        """Number of patches."""

    def __getitem__(self, i: int) -> np.ndarray:
        """Patch ``i`` as uint8 (h, w) at its true size (h, w <= P)."""

    def get_padded(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, P, P) patches zero-padded beyond their true sizes, and those sizes (n, 2)."""

    def source_specs(self) -> dict[str, dict[str, Any]]:
        """Reader options per source name that can reopen its volume (3D sampling); may be empty."""


PATCH_CORPUS_MEMBERS: tuple[str, ...] = (*PatchCorpus.__annotations__, *(
    name for name, value in vars(PatchCorpus).items()
    if (callable(value) or isinstance(value, property)) and (name in ("__len__", "__getitem__") or name[0] != "_")))


def missing_corpus_members(obj: object) -> list[str]:
    """The members of :class:`PatchCorpus` that ``obj`` lacks (empty: it is a patch corpus)."""
    return [m for m in PATCH_CORPUS_MEMBERS if not hasattr(obj, m)]


class Corpus:
    """Fast read access to the patches of a cemnet corpus.

    ``Corpus(root)`` holds the kept patches (``status="kept"``); ``status=None`` gives all
    patches ever extracted, or pass ``"duplicate"`` / ``"filtered"``. Shards are memory-mapped
    lazily, per process, so the object pickles cheaply into DataLoader workers.
    """

    def __init__(self, root: str | os.PathLike, status: str | None = "kept") -> None:
        self.root = Path(root)
        meta_path = self.root / "corpus.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.root}: no corpus.json (not a cemnet corpus)")
        self.meta = json.loads(meta_path.read_text())
        self.patch_size = int(self.meta["settings"]["patch_size"])
        try:
            cols = index_columns(self.root, status)
            with read_only_index(self.root) as db:
                self._source_rows = db.execute("SELECT name, reader FROM sources ORDER BY id").fetchall()
        except sqlite3.DatabaseError as err:
            raise damaged_index(self.root, err) from None
        self.ids = cols["id"].astype(np.int64)
        self.shards: list[str] = sorted(set(cols["shard"].tolist()))
        shard_pos = {s: i for i, s in enumerate(self.shards)}
        self.shard_index = np.array([shard_pos[s] for s in cols["shard"]], dtype=np.int32)
        self.offsets = cols["offset"].astype(np.int64)
        self.axes = cols["axis"]
        self.slices, self.ys, self.xs = (cols[c].astype(np.int64) for c in ("slice", "y", "x"))
        self.sizes = np.stack([cols["h"], cols["w"]], 1).astype(np.int32).reshape(-1, 2)
        self.hashes = hash_from_db(cols["hash"].astype(np.int64))
        self.sources: list[str] = sorted(set(cols["source"].tolist()))
        source_pos = {s: i for i, s in enumerate(self.sources)}
        self.source_index = np.array([source_pos[s] for s in cols["source"]], dtype=np.int32)
        stats = self.meta.get("stats", {})
        self.mean = float(stats.get("mean", 0.5))
        self.std = float(stats.get("std", 0.25))
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()  # most recently used last
        self._rows_needed = np.zeros(len(self.shards), dtype=np.int64)  # per shard: 1 + its largest offset
        np.maximum.at(self._rows_needed, self.shard_index, self.offsets + 1)  # offset -1 (no pixels): 0
        self.status = status

    @property
    def has_pixels(self) -> np.ndarray:
        """bool per patch: its pixels are stored (by default only kept patches have them)."""
        return self.offsets >= 0

    def _check_pixels(self, indices: np.ndarray) -> None:
        missing = indices[self.offsets[indices] < 0]
        if len(missing):
            what = self.status or "duplicate|filtered"
            raise ValueError(
                f"{self.root}: patch #{int(self.ids[missing[0]])} ({len(missing)} of those asked for) has no pixels "
                f"stored: this corpus stores the pixels of kept patches only; `cemnet curate recut {self.root} "
                f"--status {what}` cuts them again from their sources")

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()  # memmaps reopen in the worker process
        return state

    @property
    def fingerprint(self) -> str:
        """Identifies exactly which patches this corpus serves (for run metadata)."""
        digest = hashlib.sha256(self.ids.tobytes())
        digest.update(self.hashes.tobytes())
        return digest.hexdigest()[:16]

    def source_specs(self) -> dict[str, dict[str, Any]]:
        """Reader options per source, for ``curation.readers.SourceSpec.from_json`` (3D sampling)."""
        return {name: json.loads(reader) for name, reader in self._source_rows if reader}

    #: Shards kept memory-mapped at once. Each map is one kernel mapping, and Linux allows 65,530
    #: per process (vm.max_map_count): a corpus cut from 100k small images has one shard each.
    max_open_shards: int = 1024

    def _shard(self, i: int) -> np.ndarray:
        arr = self._maps.get(i)
        if arr is None:
            arr = self._open_shard(i)
            self._maps[i] = arr
            while len(self._maps) > self.max_open_shards:
                self._maps.popitem(last=False)  # the least recently used map is unmapped
        else:
            self._maps.move_to_end(i)
        return arr

    def _open_shard(self, i: int) -> np.ndarray:
        """Memory-map shard ``i``, or raise :class:`CorpusError` naming it (missing, truncated,
        or not the shape the index says: a bad copy, a full disk, a tampered file)."""
        try:
            arr = np.load(self.root / self.shards[i], mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise damaged_shard(self.root, self.shards[i], "shard missing") from None
        except (OSError, ValueError, EOFError) as err:  # e.g. "mmap length is greater than file size"
            raise damaged_shard(self.root, self.shards[i], f"shard unreadable, truncated? ({err})") from None
        p = self.patch_size
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[1:] != (p, p) or len(arr) < self._rows_needed[i]:
            raise damaged_shard(self.root, self.shards[i], f"shard holds {arr.dtype} {arr.shape}, the index needs "
                                f"uint8 ({self._rows_needed[i]}+, {p}, {p})")
        return arr

    def __getitem__(self, i: int) -> np.ndarray:
        """Patch ``i`` as uint8 (h, w), cropped to its true size."""
        h, w = self.sizes[i]
        if self.offsets[i] < 0:  # one comparison: this is the data loaders' hot path
            self._check_pixels(np.array([i], dtype=np.int64))
        return np.asarray(self._shard(int(self.shard_index[i]))[self.offsets[i], :h, :w])

    def get_padded(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, P, P) zero-padded patches and their true sizes (n, 2), read shard by shard."""
        indices = np.asarray(indices, dtype=np.int64)
        self._check_pixels(indices)
        patches = read_rows(self._shard, self.shard_index[indices], self.offsets[indices], self.patch_size)
        return patches, self.sizes[indices]

    def name_of(self, i: int) -> str:
        """CEM500K-style file stem: ``<source>-LOC-<axis>_<slice>_<y>_<x>``."""
        return f"{self.sources[self.source_index[i]]}-LOC-{self.axes[i]}_{self.slices[i]:04d}_{self.ys[i]}_{self.xs[i]}"


class TiffFolderCorpus:
    """A CEM500K-style folder of 8-bit 2D TIFF patches with the :class:`Corpus` reading API.

    The source of a patch is its file name before ``-LOC-`` (CEM500K's convention), or its
    parent folder's name. Patches larger than ``patch_size`` are centre-cropped when padded.
    """

    def __init__(self, root: str | os.PathLike, patch_size: int = 224) -> None:
        import tifffile

        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in (".tif", ".tiff"))
        if not self.files:
            raise FileNotFoundError(f"{self.root}: no .tif/.tiff patches found")
        self.patch_size = patch_size
        names = [p.name.split("-LOC-")[0] if "-LOC-" in p.name else p.parent.name for p in self.files]
        self.sources = sorted(set(names))
        pos = {s: i for i, s in enumerate(self.sources)}
        self.source_index = np.array([pos[s] for s in names], dtype=np.int32)
        self._tifffile = tifffile
        stats_path = self.root / "corpus_stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        self.mean = float(stats.get("mean", 0.5))
        self.std = float(stats.get("std", 0.25))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_tifffile")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import tifffile

        self.__dict__.update(state)
        self._tifffile = tifffile

    def __len__(self) -> int:
        return len(self.files)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(p.name for p in self.files).encode()).hexdigest()[:16]

    def source_specs(self) -> dict[str, dict[str, Any]]:
        return {}  # a folder of patches has no source volumes to reopen

    def __getitem__(self, i: int) -> np.ndarray:
        image = self._tifffile.imread(self.files[i])
        if image.ndim == 3:
            image = image[..., 0]  # CEM500K keeps the first channel of RGB patches
        if image.dtype != np.uint8:
            raise ValueError(f"{self.files[i]}: expected an 8-bit patch, got {image.dtype}")
        return image

    def get_padded(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.patch_size
        out = np.zeros((len(indices), p, p), dtype=np.uint8)
        sizes = np.zeros((len(indices), 2), dtype=np.int32)
        for j, i in enumerate(indices):
            image = self[int(i)][:p, :p]
            out[j, : image.shape[0], : image.shape[1]] = image
            sizes[j] = image.shape
        return out, sizes


def open_corpus(path: str | os.PathLike, **kwargs: Any) -> Corpus | TiffFolderCorpus:
    """Open a cemnet corpus folder, or a CEM500K-style folder of TIFF patches."""
    path = Path(path)
    if (path / "corpus.json").is_file():
        return Corpus(path, **kwargs)
    if path.is_dir():
        return TiffFolderCorpus(path, **kwargs)
    raise FileNotFoundError(f"{path}: neither a cemnet corpus nor a folder of TIFF patches")


def export_tiff_folder(corpus: Corpus, out: str | os.PathLike, progress: bool = True) -> int:
    """Write every patch of ``corpus`` as ``<source>-LOC-<axis>_<slice>_<y>_<x>.tiff`` (CEM500K names).

    Patches without stored pixels (duplicates and filtered patches of an exemplars-only corpus)
    are left out: ``cemnet curate recut`` writes those. Returns how many were written.
    Truncated edge patches are written at their true size, as CEM500K stores them. Also writes
    ``corpus_stats.json`` (mean/std) so :class:`TiffFolderCorpus` normalises identically.
    """
    import tifffile
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stored = np.flatnonzero(corpus.has_pixels)
    for i in tqdm(stored.tolist(), desc="export tiff", unit="patch", disable=not progress):
        tifffile.imwrite(out / f"{corpus.name_of(i)}.tiff", corpus[i])
    (out / "corpus_stats.json").write_text(json.dumps({"mean": corpus.mean, "std": corpus.std}))
    return len(stored)
