"""What runs in a worker process: inspect a source, run a unit (read, convert to uint8,
stage, cut patches, hash them, write or stage their shard)."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from curation.to_uint8 import Uint8Converter, sample_image, sample_volume
from curation.corpus import atomic_save_npy, hash_to_db, shard_checksum
from curation.hashing import dhash_batch
from curation.patching import AXIS_DIM, extract_patches, patch_count, plan_planes, slice_indices
from curation.pixels import save_staged
from curation.settings import CurateSettings
from curation.units import Inspection, Unit, UnitKind, UnitResult


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
    p = unit.settings.patch_size
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
    deferred = bool(unit.stage_dirs and (unit.staging or unit.staging_t))
    if unit.stage_dirs:  # exemplars only: the main process picks what to store
        staged = None if deferred else save_staged(list(unit.stage_dirs), unit.source, unit.key, patches)
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
    dim = AXIS_DIM.get(unit.kind.value, 0)  # "stage" units are xy ranges; "band" units do not use it
    wanted = [i for i in slice_indices(unit.shape[dim], unit.settings.slice_stride) if unit.start <= i < unit.stop]
    if unit.kind == UnitKind.BAND:  # rows start..stop of a large 2D image
        with open_volume(SourceSpec.from_json(unit.spec)) as volume:
            band = unit.converter(volume.read(slice(0, 1), slice(unit.start, unit.stop)))[0]
            missing = volume.take_missing()
        result = _cut(unit, [(0, band)], "xy", y_offset=unit.start)
        result.missing = missing
    elif unit.kind in (UnitKind.XY, UnitKind.STAGE):
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
            elif volume.chunk_zyx[0] > 1 and unit.settings.slice_stride == 1:
                # z-chunked store (zarr, N5, precomputed; remote ones above all): one read per unit,
                # since a read per slice would fetch and decode the same chunks chunk_z times.
                # plan_units bounds a unit's planes by memory_mb, so the block fits.
                block = unit.converter(volume.read(slice(unit.start, unit.stop)))
                planes = [(z, block[z - unit.start]) for z in wanted]
            else:
                planes = [(z, unit.converter(volume.read(slice(z, z + 1)))[0]) for z in wanted]
            missing = volume.take_missing()
        if unit.kind == UnitKind.STAGE:
            return UnitResult(unit.source, unit.key, unit.shard, [], time.perf_counter() - t0, missing=missing)
        result = _cut(unit, planes, "xy")
        result.missing = missing
    elif unit.kind == UnitKind.XZ:  # patch rows are contiguous x-runs: cut straight from the memmap
        staged = np.load(unit.staging, mmap_mode="r")
        result = _cut(unit, [(i, staged[:, i, :]) for i in wanted], "xz", skip_rows=unit.bad_z)
        del staged
    else:
        # From the x-first copy: a yz plane is one contiguous block. Read sideways from the
        # (z, y, x) copy instead, every yz unit would touch every page of it: fine while it
        # sits in RAM, hundreds of passes over the disk for a volume larger than RAM.
        staged = np.load(unit.staging_t, mmap_mode="r")
        result = _cut(unit, [(i, staged[i]) for i in wanted], "yz", skip_rows=unit.bad_z)
        del staged
    result.seconds = time.perf_counter() - t0
    return result


def inspect_source(source: str, spec_json: dict[str, Any], root: str, settings: CurateSettings,
                   stage_dirs: tuple[str, ...] = ()) -> Inspection:
    """Open a source, fit its uint8 mapping and plan its planes (in a worker)."""
    from curation.readers import SourceSpec, describe, open_volume

    t0 = time.perf_counter()
    p = settings.patch_size
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
            settings.memory_mb * 2**20
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
        converter = Uint8Converter.fit(sample, volume.dtype, settings.uint8_rule, tuple(settings.percentiles))
        if converter.stats.get("note"):  # e.g. wide integers stretched instead of the dtype-range rule
            notes.append(converter.stats["note"])
        if converter.stats.get("nonfinite_fraction", 0) > 0:
            notes.append(f"{converter.stats['nonfinite_fraction']:.2%} non-finite values (NaN/inf) written as 0")
        planes = plan_planes(
            volume.shape, volume.voxel_size, is_volume=volume.is_volume, patch_size=p,
            max_anisotropy=settings.max_anisotropy, axes=settings.axes,
        )
        inspection = Inspection(source, info, converter, planes, notes=notes)
        if image_2d and not in_bands:
            unit = Unit(source, "xy-00000", UnitKind.XY, spec_json, converter, 0, 1, volume.shape, root, settings,
                        stage_dirs)
            inspection.result = _cut(unit, [(0, converter(image)[0])], "xy")
            inspection.result.seconds = time.perf_counter() - t0
            inspection.result.missing = volume.take_missing()
    return inspection


def release_scratch_buffers() -> None:
    """Free this thread's work buffers (an in-process run calls it when done)."""
    _scratch_buffers.__dict__.clear()
