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

import errno
import hashlib
import json
import math
import os
import shutil
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from curation.convert import Uint8Converter, sample_image, sample_volume
from curation.corpus import (CorpusIndex, atomic_save_npy, hash_from_db, hash_to_db, release_in_child, shard_checksum,
                             verify_shards, write_index_cache)
from curation.dedup import greedy_groups
from curation.exemplars import OnlineExemplars, visit_keys
from curation.hashing import dhash_batch
from curation.patching import AXIS_DIM, extract_patches, grid_starts, patch_count, plan_planes, slice_indices
from curation.missing_chunks import label_missing_chunk_patches, record_missing_chunks
from curation.pixels import (PIXEL_ROW_COLUMNS, discard_staged_units, save_staged, store_settled_pixels,
                             store_unit_pixels, sweep_unreferenced_shards, sync_pixels)
from curation.readers import ReaderError, source_fingerprint
from curation.remote import forget_unreadable
from curation.remote_sampling import expand_sampled


@dataclass
class CurateSettings:
    """Everything that decides which patches a corpus holds (stored in ``corpus.json``)."""

    patch_size: int = 224
    max_anisotropy: float = 0.25
    axes: str = "auto"
    slice_stride: int = 1
    uint8_rule: str = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)
    dedup_distance: int = 12
    dedup_scope: str = "dataset"  # "dataset" (CEM500K), "global", or "none"
    seed: int = 0
    filter: str = "stats"
    memory_mb: int = 256
    patches_per_unit: int = 1024
    keep_all_pixels: bool = False  # store pixels of duplicates and filtered patches too (before 2026-12)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d


# ----------------------------------------------------------------------------- work units
@dataclass
class Unit:
    """One piece of extraction work; runs in a worker process (picklable, no open handles)."""

    source: str
    key: str
    kind: str  # "xy", "stage" (xy re-staging without patches), "xz", "yz", "band" (rows of a 2D image)
    spec: dict[str, Any]
    converter: Uint8Converter
    start: int
    stop: int
    shape: tuple[int, int, int]
    root: str
    settings: dict[str, Any]
    staging: str | None = None  # the uint8 volume as read, (z, y, x): xz planes are cut from it
    staging_t: str | None = None  # an x-first copy, (x, z, y): each yz plane is one contiguous block
    bad_z: list[tuple[int, int]] = field(default_factory=list)  # z-ranges never staged (unreadable)

    @property
    def shard(self) -> str:
        return f"shards/{self.source}/{self.key}.npy"


@dataclass
class UnitResult:
    source: str
    key: str
    shard: str
    rows: list[tuple] = field(default_factory=list)
    seconds: float = 0.0
    checksum: str | None = None  # of the shard's patches (see curation.corpus.shard_checksum)
    missing: list[tuple[int, ...]] = field(default_factory=list)  # boxes read as fill value (absent chunks)
    staged: str | None = None  # the unit's patches, all of them, waiting for the exemplar decision
    deferred: bool = False  # no pixels stored yet: its source's exemplars are cut from the staged volume


_scratch_buffers = threading.local()


def _scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 work buffer reused by the units a worker runs (one set per thread: Dask workers
    run units in threads). A fresh 100 MB array costs a page fault and a kernel zero-fill per
    4 KB every time: ~20 us per patch, as much as a third of the hash."""
    pool = _scratch_buffers.__dict__
    size = int(np.prod(shape))
    if name not in pool or pool[name].size < size:
        pool[name] = np.empty(size, dtype=np.uint8)
    return pool[name][:size].reshape(shape)


def _cut(unit: Unit, planes: list[tuple[int, np.ndarray]], axis: str, y_offset: int = 0,
         skip_rows: Sequence[tuple[int, int]] = ()) -> UnitResult:
    """Patch and hash a list of (slice index, uint8 plane); save the shard; return index rows.
    ``y_offset``: where the planes start in the source (a band of a large 2D image);
    ``skip_rows``: plane-row ranges whose data is missing; patches touching them are left out."""
    t0 = time.perf_counter()
    p = unit.settings["patch_size"]
    per_plane = patch_count(planes[0][1].shape, p) if planes else 0  # a unit's planes share a shape
    patches = _scratch("patches", (per_plane * len(planes), p, p))
    rows = []
    for k, (index, plane) in enumerate(planes):
        _, boxes = extract_patches(plane, p, out=patches[k * per_plane : (k + 1) * per_plane])
        rows.extend((axis, int(index), y + y_offset, x, h, w) for y, x, h, w in boxes.tolist())
    if skip_rows:
        keep = np.array([not any(r[2] < b and r[2] + r[4] > a for a, b in skip_rows) for r in rows], dtype=bool)
        patches, rows = patches[keep], [r for r, k in zip(rows, keep) if k]
    hashes = hash_to_db(dhash_batch(patches, np.array([r[4:6] for r in rows]).reshape(-1, 2), p))
    staged, checksum = None, None
    # Exemplars only, of a volume staged for its xz / yz planes: the staged copy holds every
    # patch's pixels, so nothing is written now; ExemplarStore.settle cuts the source's exemplars
    # from it when the source is done.
    deferred = bool(unit.settings.get("stage_dirs") and (unit.staging or unit.staging_t))
    if unit.settings.get("stage_dirs"):  # exemplars only: the main process picks what to store
        staged = None if deferred else save_staged(unit.settings["stage_dirs"], unit.source, unit.key, patches)
    else:
        atomic_save_npy(Path(unit.root) / unit.shard, patches)
        checksum = shard_checksum(patches)
    out = [(unit.source, unit.shard, -1 if deferred else i, *r, int(h)) for i, (r, h) in enumerate(zip(rows, hashes))]
    return UnitResult(unit.source, unit.key, unit.shard, out, time.perf_counter() - t0, checksum=checksum,
                      staged=staged, deferred=deferred)


def run_unit(unit: Unit) -> UnitResult:
    """Execute one unit (in a worker). Raises on bad data; the caller records the failure."""
    from curation.readers import SourceSpec, open_volume

    t0 = time.perf_counter()
    dim = AXIS_DIM.get(unit.kind, 0)  # "stage" units are xy ranges; "band" units do not use it
    wanted = [i for i in slice_indices(unit.shape[dim], unit.settings["slice_stride"]) if unit.start <= i < unit.stop]
    if unit.kind == "band":  # rows start..stop of a large 2D image
        with open_volume(SourceSpec.from_json(unit.spec)) as volume:
            band = unit.converter(volume.read(slice(0, 1), slice(unit.start, unit.stop)))[0]
            missing = volume.take_missing()
        result = _cut(unit, [(0, band)], "xy", y_offset=unit.start)
        result.missing = missing
    elif unit.kind in ("xy", "stage"):
        with open_volume(SourceSpec.from_json(unit.spec)) as volume:
            if unit.staging or unit.staging_t:
                block = unit.converter(volume.read(slice(unit.start, unit.stop)))
                if unit.staging:
                    staged = np.load(unit.staging, mmap_mode="r+")
                    staged[unit.start : unit.stop] = block  # shared mapping: visible to the plane units
                    del staged
                if unit.staging_t:
                    staged_t = np.load(unit.staging_t, mmap_mode="r+")
                    for z in range(unit.start, unit.stop):
                        staged_t[:, z, :] = block[z - unit.start].T  # numpy blocks this 2D transpose
                    del staged_t
                planes = [(z, block[z - unit.start]) for z in wanted]
            elif volume.chunk_zyx[0] > 1 and unit.settings["slice_stride"] == 1:
                # z-chunked store (zarr, N5, precomputed; remote ones above all): one read per unit,
                # since a read per slice would fetch and decode the same chunks chunk_z times.
                # plan_units bounds a unit's planes by memory_mb, so the block fits.
                block = unit.converter(volume.read(slice(unit.start, unit.stop)))
                planes = [(z, block[z - unit.start]) for z in wanted]
            else:
                planes = [(z, unit.converter(volume.read(slice(z, z + 1)))[0]) for z in wanted]
            missing = volume.take_missing()
        if unit.kind == "stage":
            return UnitResult(unit.source, unit.key, unit.shard, [], time.perf_counter() - t0, missing=missing)
        result = _cut(unit, planes, "xy")
        result.missing = missing
    elif unit.kind == "xz":  # patch rows are contiguous x-runs: cut straight from the memmap
        staged = np.load(unit.staging, mmap_mode="r")
        result = _cut(unit, [(i, staged[:, i, :]) for i in wanted], unit.kind, skip_rows=unit.bad_z)
        del staged
    else:
        # From the x-first copy: a yz plane is one contiguous block. Read sideways from the
        # (z, y, x) copy instead, every yz unit would touch every page of it: fine while it
        # sits in RAM, hundreds of passes over the disk for a volume larger than RAM.
        staged = np.load(unit.staging_t, mmap_mode="r")
        result = _cut(unit, [(i, staged[i]) for i in wanted], unit.kind, skip_rows=unit.bad_z)
        del staged
    result.seconds = time.perf_counter() - t0
    return result


@dataclass
class Inspection:
    """What the main process needs to plan a source's units."""

    source: str
    info: dict[str, Any]
    converter: Uint8Converter
    planes: list[str]
    result: UnitResult | None = None  # a (not too large) 2D image is patched during inspection
    notes: list[str] = field(default_factory=list)


def inspect_source(source: str, spec_json: dict[str, Any], root: str, settings: dict[str, Any]) -> Inspection:
    """Open a source, fit its uint8 mapping and plan its planes (in a worker)."""
    from curation.readers import SourceSpec, describe, open_volume

    t0 = time.perf_counter()
    p = settings["patch_size"]
    with open_volume(SourceSpec.from_json(spec_json)) as volume:
        info = describe(volume)
        nz, ny, nx = volume.shape
        half = math.ceil(p / 2)
        if min(ny, nx) < half and (not volume.is_volume or min(nz, ny, nx) < half):
            raise ValueError(
                f"image is {ny}x{nx} pixels, smaller than half a patch ({half} px): no patch can be cut"
            )
        notes = []
        if volume.is_volume and volume.voxel_size is None:
            notes.append("no voxel size in the file: assumed isotropic (CEM500K's default spacing 1,1,1)")
        image_2d = not volume.is_volume and nz == 1
        # A 2D image too large for one unit's memory budget is cut in bands by several units.
        in_bands = image_2d and volume.partial_reads and ny * nx * max(np.dtype(volume.dtype).itemsize, 4) > \
            settings["memory_mb"] * 2**20
        volume.tolerate_missing = True  # the uint8 fit may sample absent chunks; the cut decides
        if not image_2d:
            sample = sample_volume(volume)
        elif in_bands:
            sample = sample_image(volume)
            notes.append("large 2D image: cut in row bands in parallel; uint8 mapping fitted on a 16 x 16 "
                         "grid of 128 px windows")
        else:
            volume.tolerate_missing = False  # this read is the cut itself
            image = volume.read()
            sample = image
        volume.tolerate_missing = False
        converter = Uint8Converter.fit(sample, volume.dtype, settings["uint8_rule"], tuple(settings["percentiles"]))
        if converter.stats.get("note"):  # e.g. wide integers stretched instead of the dtype-range rule
            notes.append(converter.stats["note"])
        if converter.stats.get("nonfinite_fraction", 0) > 0:
            notes.append(f"{converter.stats['nonfinite_fraction']:.2%} non-finite values (NaN/inf) written as 0")
        planes = plan_planes(
            volume.shape, volume.voxel_size, is_volume=volume.is_volume, patch_size=p,
            max_anisotropy=settings["max_anisotropy"], axes=settings["axes"],
        )
        inspection = Inspection(source, info, converter, planes, notes=notes)
        if image_2d and not in_bands:
            unit = Unit(source, "xy-00000", "xy", spec_json, converter, 0, 1, volume.shape, root, settings)
            inspection.result = _cut(unit, [(0, converter(image)[0])], "xy")
            inspection.result.seconds = time.perf_counter() - t0
            inspection.result.missing = volume.take_missing()
    return inspection


def _chunk_aligned(step: int, chunk: int) -> int:
    """A unit depth whose units never straddle a stored z-chunk (each chunk is fetched by one unit,
    or split evenly between a few): a multiple of ``chunk``, or a divisor of it when smaller."""
    if chunk <= 1 or step <= 0:
        return step
    if step >= chunk:
        return step // chunk * chunk
    return max(d for d in range(1, step + 1) if chunk % d == 0)


def plan_units(source: str, spec: dict, insp: Inspection, root: str, settings: dict[str, Any]) -> dict[str, list[Unit]]:
    """Split a volume into bounded units per plane: {"xy": [...], "xz": [...], "yz": [...]}."""
    nz, ny, nx = insp.info["shape"]
    p, budget = settings["patch_size"], settings["memory_mb"] * 2**20
    itemsize = max(np.dtype(insp.info["dtype"]).itemsize, 4)  # float32 during conversion
    plane_dims = {"xy": ((ny, nx), nz), "xz": ((nz, nx), ny), "yz": ((nz, ny), nx)}
    units: dict[str, list[Unit]] = {}
    if not insp.info["is_volume"] and nz == 1:  # a large 2D image: bands of whole patch rows
        starts = grid_starts(ny, p)
        by_memory = budget // max(1, p * nx * itemsize)
        by_patches = settings["patches_per_unit"] // max(1, len(grid_starts(nx, p)))
        rows = max(1, min(by_memory, by_patches))  # patch rows per band
        return {"xy": [
            Unit(source, f"band-{starts[i]:06d}", "band", spec, insp.converter, starts[i],
                 starts[i + rows] if i + rows < len(starts) else ny, (nz, ny, nx), root, settings)
            for i in range(0, len(starts), rows)
        ]}
    for axis in insp.planes:
        (h, w), depth = plane_dims[axis]
        per_plane = max(1, len(grid_starts(h, p)) * len(grid_starts(w, p)))
        by_memory = budget // max(1, h * w * (itemsize if axis == "xy" else 1))
        if axis == "xy":
            step = min(settings["patches_per_unit"] // per_plane * settings["slice_stride"], by_memory)
            step = _chunk_aligned(step, int(insp.info.get("chunk_zyx", [1])[0]))
        else:
            # Planes are cut in place from the staged copies; a unit holds their patches, so
            # few thick units (bounded by memory, at least 4 per plane for parallelism).
            step = min(by_memory, math.ceil(depth / 4))
        step = max(1, step)
        units[axis] = [
            Unit(source, f"{axis}-{start:05d}", axis, spec, insp.converter, start, min(start + step, depth),
                 (nz, ny, nx), root, settings)
            for start in range(0, depth, step)
        ]
    return units


# ----------------------------------------------------------------------------- staging
def _reserve(path: Path, nbytes: int) -> None:
    """Allocate the blocks of a sparse staging file now: a memory-mapped write into a full disk
    kills the writing process (SIGBUS) instead of raising, which would take the run down."""
    free = shutil.disk_usage(path.parent).free
    try:
        if nbytes > free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    except (AttributeError, OSError) as err:
        if getattr(err, "errno", None) != errno.ENOSPC:
            return  # file systems without fallocate (some network mounts): the free-space check must do
        path.unlink(missing_ok=True)
        raise OSError(f"not enough free space in {path.parent} to stage the volume's uint8 copy: "
                      f"needs {nbytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free") from err


_janitor_fds: set[int] = set()  # write ends of janitor pipes: forked workers must not keep them


def _drop_janitor_pipes() -> None:
    """In a forked child: let go of the janitors' pipes (else a janitor would wait for the
    workers too); /dev/null over the descriptor, as for the corpus lock."""
    release_in_child(_janitor_fds)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_janitor_pipes)


class StagingArea:
    """Where a volume's uint8 copies live while its xz / yz planes are cut: the volume as read,
    (z, y, x), for the xz planes, and an x-first copy, (x, z, y), for the yz planes.

    In RAM (``/dev/shm``) when the machine can spare it: the copy is scratch, and on disk its
    writes compete with the shards for the disk's bandwidth (measured here: ~375 MB/s sustained,
    so a 400 MB staging file costs ~1 s of a 4 s run). Otherwise, and always with a Dask cluster
    (whose workers do not share this machine's RAM), ``CORPUS/work``. RAM staging is bounded by
    ``ram_fraction`` of the available memory over all volumes staged at once; files are removed
    when their source is done or fails and when the run stops (error, Ctrl-C); what a killed run
    left behind is removed by :meth:`discard_leftovers` when the next run on the corpus starts.
    """

    def __init__(self, root: Path, use_ram: bool = True, ram_fraction: float = 0.25) -> None:
        self.root = Path(root)
        self.use_ram = use_ram and Path("/dev/shm").is_dir()
        self.ram_fraction = ram_fraction
        self.live: dict[str, list[Path]] = {}
        self._ram_bytes: dict[str, int] = {}
        tag = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        self._ram_prefix = f"cemnet-{os.getuid() if hasattr(os, 'getuid') else 0}-{tag}-"
        self._janitor: tuple[int, int] | None = None  # (pid, write end of its pipe)
        self._told = False

    def _paths(self, source: str, layout: str = "zyx") -> tuple[Path, Path]:
        name = f"{source}.u8.npy" if layout == "zyx" else f"{source}.{layout}.u8.npy"
        return Path("/dev/shm") / f"{self._ram_prefix}{name}", self.root / "work" / name

    def _ram_to_spare(self) -> int:
        try:
            with open("/proc/meminfo") as fh:
                available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
            shm = os.statvfs("/dev/shm")
        except (OSError, StopIteration):
            return 0
        budget = min(available * self.ram_fraction, shm.f_bavail * shm.f_frsize * 0.5)
        return int(budget) - sum(self._ram_bytes.values())

    def create(self, source: str, shape: tuple[int, int, int], layout: str = "zyx") -> str:
        """A fresh, empty uint8 memmap of ``source``'s (z, y, x) ``shape`` stored in ``layout``
        order ("zyx", or "xzy": x first); any earlier file of it is discarded (units do not
        fsync it, so one left by a crash may hold zeros)."""
        ram, disk = self._paths(source, layout)
        for old in (ram, disk):
            old.unlink(missing_ok=True)
        nbytes = int(np.prod(shape))
        path = ram if self.use_ram and nbytes <= self._ram_to_spare() else disk
        if not self._told:  # where the scratch lives, should nothing be able to remove it
            self._told = True
            tqdm.write(f"staging volumes in {path.parent} ({self._ram_prefix if path == ram else ''}*.u8.npy): removed "
                       "as each source ends; if the run is killed, by a clean-up process or the next run on the "
                       "corpus, else remove them by hand", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = tuple(shape["zyx".index(a)] for a in layout)
        self.live.setdefault(source, []).append(path)  # before it exists: a Ctrl-C in between still removes it
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=stored).flush()
        if path == disk:
            _reserve(path, nbytes)
        if path == ram:
            self._ram_bytes[source] = self._ram_bytes.get(source, 0) + nbytes
        return str(path)

    def start_janitor(self) -> None:
        """Fork a small process that removes this corpus's staging files if this run dies
        without doing so itself (SIGKILL, OOM killer). It waits on a pipe whose only writer is
        this process: the pipe closes when this process ends, however it ends, or when
        :meth:`close` is called. It then removes what is left, but only after taking the corpus
        lock (never while a new run on the corpus uses it), and exits. It runs in its own
        session so that Ctrl-C or a closed terminal does not stop it first."""
        if self._janitor is not None or not hasattr(os, "fork"):
            return
        import fcntl

        lock_path = str(self.root / ".lock")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the janitor: no imports, no output (another thread may hold their locks)
            try:
                os.close(write_end)
                quiet = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):  # hold no pipe of the caller's (`cemnet curate ... | tee log` ends with us)
                    os.dup2(quiet, fd)
                os.setsid()
                os.read(read_end, 1)  # returns when every writer is gone
                if self._leftovers():
                    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
                    # The dead run's lock may be released a moment after its pipe closes; a new
                    # run that holds it longer removes the files itself, so give up after a while.
                    for _ in range(100):
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except OSError:
                            time.sleep(0.05)
                    else:
                        os._exit(0)
                    for path in self._leftovers():  # listed again under the lock
                        path.unlink(missing_ok=True)
                    try:
                        os.rmdir(f"/dev/shm/{self._ram_prefix}units")
                    except OSError:
                        pass
            finally:
                os._exit(0)
        os.close(read_end)
        _janitor_fds.add(write_end)
        self._janitor = (pid, write_end)

    def close(self) -> None:
        """Remove every staging file of this run and send its janitor away."""
        self.release_all()
        if self._janitor is not None:
            pid, write_end = self._janitor
            _janitor_fds.discard(write_end)
            os.close(write_end)
            os.waitpid(pid, 0)  # it finds nothing left and exits at once
            self._janitor = None

    def unit_dirs(self) -> list[Path]:
        """Folders of the unit staging files (exemplars-only storage, see :class:`ExemplarStore`):
        RAM first when this run may use it, then ``CORPUS/work/units``."""
        ram = Path("/dev/shm") / f"{self._ram_prefix}units"
        return ([ram] if self.use_ram else []) + [self.root / "work" / "units"]

    def _leftovers(self) -> list[Path]:
        shm = Path("/dev/shm").is_dir()
        stale = sorted(Path("/dev/shm").glob(f"{self._ram_prefix}*.u8.npy")) if shm else []
        stale += sorted((self.root / "work").glob("*.u8.npy"))
        for units in (Path("/dev/shm") / f"{self._ram_prefix}units", self.root / "work" / "units"):
            stale += sorted(units.glob("*.npy*")) if units.is_dir() else []  # staged units' patches
        return stale

    def discard_leftovers(self) -> list[Path]:
        """Remove staging files that a killed run (SIGKILL, OOM, power loss) left for this corpus,
        in RAM and in ``CORPUS/work``. Only call it while holding the corpus lock (as
        :func:`extract` does): then no other run can be using them. Returns what was removed."""
        stale = self._leftovers()
        live = {p for paths in self.live.values() for p in paths}
        for path in stale:
            if path not in live:
                path.unlink(missing_ok=True)
        return stale

    def release(self, source: str) -> None:
        self._ram_bytes.pop(source, None)
        for path in self.live.pop(source, []):
            path.unlink(missing_ok=True)

    def release_all(self) -> None:
        for source in list(self.live):
            self.release(source)


# ----------------------------------------------------------------------------- executors
class _SerialFuture:
    def __init__(self, fn: Callable, args: tuple) -> None:
        try:
            self._value, self._error = fn(*args), None
        except BaseException as err:  # noqa: BLE001 - re-raised by result()
            self._value, self._error = None, err

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def done(self) -> bool:
        return True


def die_with_parent(parent_pid: int) -> None:
    """Pool-worker initializer: ask Linux to kill this worker when its parent dies.

    A worker orphaned by a killed ``cemnet curate`` would otherwise live on, holding memory
    and maybe memory-mapped staging files. No effect where ``prctl`` is unavailable."""
    try:
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _pool_context() -> Any:
    """fork on Linux (cheap), but spawn once tensorstore (N5 / precomputed sources) is loaded in
    this process: its threads make a forked child abort. (Not forkserver: its server keeps the
    environment of its first start, and remote sources take their settings from the environment.)"""
    import multiprocessing as mp

    linux_fork = sys.platform.startswith("linux") and "tensorstore" not in sys.modules
    return mp.get_context("fork" if linux_fork else "spawn")


class Executor:
    """A process pool, a Dask cluster, or in-process execution, behind submit / wait_any."""

    def __init__(self, workers: int = 2, scheduler: str | None = None) -> None:
        self.kind = "dask" if scheduler else ("serial" if workers <= 1 else "processes")
        self.workers = max(1, workers)
        # Tasks handed to the pool at once: enough to keep every worker busy; the rest wait in
        # extract's backlog (waiting on 100k futures at a time is quadratic).
        self.max_in_flight = 4 * self.workers if workers > 1 else 1
        if scheduler:
            from distributed import Client

            self._client = Client(scheduler)
            self.max_in_flight = max(64, 4 * sum(self._client.nthreads().values()))
        elif workers > 1:
            self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=_pool_context(),
                                   initializer=die_with_parent, initargs=(os.getpid(),))

    def submit(self, fn: Callable, *args: Any) -> Any:
        if self.kind == "dask":
            return self._client.submit(fn, *args, pure=False)
        if self.kind == "processes":
            return self._pool.submit(fn, *args)
        return _SerialFuture(fn, args)

    def wait_any(self, futures: Sequence[Any]) -> list[Any]:
        if self.kind == "dask":
            from distributed import wait

            done, _ = wait(list(futures), return_when="FIRST_COMPLETED")
            return list(done)
        if self.kind == "processes":
            done, _ = futures_wait(list(futures), return_when=FIRST_COMPLETED)
            return list(done)
        return list(futures)

    def restart(self) -> None:
        """A fresh process pool after a worker died (the old pool is broken for good)."""
        if self.kind == "processes":
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()

    def shutdown(self, cancel: bool = False) -> None:
        if self.kind == "dask":
            self._client.close()
        elif self.kind == "processes":
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)


# ----------------------------------------------------------------------------- the job
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
        where, params = "WHERE 1", ()
        if group != "*":
            where = "WHERE source IN (SELECT name FROM sources WHERE COALESCE(dataset, name) = ?)"
            params = (group,)
        if self.deferred:  # their patches join the group when they settle
            where += f" AND source NOT IN ({', '.join('?' * len(self.deferred))})"
            params += tuple(self.deferred)
        t = self.index.patch_table(["source", "axis", "slice", "y", "x", "hash"], where, params)
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
        t = self.index.patch_table(PIXEL_ROW_COLUMNS, "WHERE source = ?", (source,))
        if len(t["id"]):
            keys = visit_keys(self.settings.seed, t["source"], t["axis"], t["slice"], t["y"], t["x"])
            keep = self.tracker.settle(group, hash_from_db(t["hash"].astype(np.int64)), keys)
            store_settled_pixels(self.index, source, t, keep, *staged, self.settings.memory_mb)
            self.counts["stored"] += int(keep.sum())
        self.counts["settle_seconds"] += time.perf_counter() - t0

    def close(self) -> None:
        self._deleter.shutdown(wait=True)
        discard_staged_units(self.stage_dirs)  # units in flight when the run stopped


def _unique_name(index: CorpusIndex, wanted: str, path: str) -> str:
    name, k = wanted, 1
    while True:
        row = index.source(name)
        if row is None or row["path"] == path:
            return name
        k += 1
        name = f"{wanted}-{k}"


# What decides a source's patches (a change re-cuts it), and what decides how its work is split
# into units (a change re-cuts it only if unfinished: old and new units would overlap).
PATCH_SETTINGS = ("patch_size", "max_anisotropy", "axes", "slice_stride", "uint8_rule", "percentiles")
PLAN_SETTINGS = ("memory_mb", "patches_per_unit")
READER_OPTIONS = ("voxel_size", "axes", "key", "scale_level", "channel", "stack", "roi", "roi_unit")


def _why_cut_again(row: dict | None, fingerprint: str, cut: dict[str, Any], spec_json: dict[str, Any]) -> str | None:
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


def _problem(err: BaseException) -> str:
    text = str(err)
    return text if text else type(err).__name__


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
        name = _unique_name(index, spec.name or Path(spec.path).stem, str(spec.path))
        spec_json["name"] = name
        row = index.source(name)
        try:
            fingerprint = source_fingerprint(spec.path, spec.key)
        except ReaderError as err:  # a URL that cannot be reached: skip it now, keep what it gave before
            index.add_skipped(str(spec.path), err.problem)
            tqdm.write(f"skipped {err}", file=sys.stderr)
            continue
        why = _why_cut_again(row, fingerprint, cut, spec_json)
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
        exemplars.settle(name)  # before its staged copies go
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
        exemplars.settle(name)  # its units cut so far: their exemplars, from its staged copies
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
                            exemplars.defer(name, zyx, xzy)
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
    with index.write():  # exemplars whose pixels could not be re-cut (reported by sync_pixels)
        index.db.execute("UPDATE patches SET filter_sig = NULL, score = NULL, filter_reason = "
                         "'no pixels: its source could not be re-cut' WHERE group_id = id AND offset < 0")
    todo = index.patch_table(["id", "shard", "offset", "h", "w"],
                             "WHERE group_id = id AND offset >= 0 AND (filter_sig IS NULL OR filter_sig != ?)",
                             (signature,))
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
    with index.write():  # final verdict of every patch from its group and its filter result
        index.db.execute(
            "UPDATE patches SET "
            "status = CASE WHEN group_id != id THEN 'duplicate' WHEN filter_reason = '' THEN 'kept' ELSE 'filtered' END, "
            "reason = CASE WHEN group_id != id THEN 'near-duplicate of #' || group_id ELSE filter_reason END"
        )
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
    if settings.keep_all_pixels:
        want, params = "1", ()
    else:  # has pixels, or an exemplar not already judged out by this very filter
        want = ("offset >= 0 OR (group_id = id AND NOT (COALESCE(filter_sig = ?, 0) "
                "AND COALESCE(filter_reason, '') != ''))")
        params = (filter_signature(settings),)
    counts = sync_pixels(index, want, params, settings.memory_mb, progress)
    index.record_stage("pixels", time.perf_counter() - t0, counts)
    return counts


def drop_unneeded_pixels(index: CorpusIndex, settings: CurateSettings, progress: bool = True) -> dict[str, int]:
    """After the filter: drop the pixels of duplicates and filtered patches (exemplars-only
    storage); with ``keep_all_pixels`` nothing is dropped."""
    if settings.keep_all_pixels:
        return {}
    t0 = time.perf_counter()
    counts = sync_pixels(index, "status = 'kept'", (), settings.memory_mb, progress)
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
) -> Path:
    """Build or extend the corpus at ``out`` from ``specs`` (``curation.readers.SourceSpec``).

    Returns the corpus folder. Sources finished in an earlier run are skipped; units finished
    before an interruption are kept.

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
        executor = Executor(workers, scheduler)
        t0 = time.perf_counter()
        try:
            extract(index, specs, settings, executor, progress)
            index.record_stage("extract", time.perf_counter() - t0, {"workers": workers, "executor": executor.kind})
            deduplicate(index, settings, progress)
            apply_filter(index, settings, progress=progress, executor=executor)
            drop_unneeded_pixels(index, settings, progress)
        finally:
            executor.shutdown()
            _scratch_buffers.__dict__.clear()  # in-process (serial) runs: do not hold the buffers
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
