"""Work units of extraction: what one unit is, what it returns, and how a source is split
into units (bounded memory per unit; see :mod:`curation.pipeline`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from curation.to_uint8 import Uint8Converter
from curation.patching import grid_starts
from curation.settings import CurateSettings


class UnitKind(StrEnum):
    """What a unit does."""

    XY = "xy"  # cut a z-range of xy planes (and stage it when xz / yz planes follow)
    STAGE = "stage"  # stage a z-range whose xy patches an earlier run cut (no patches)
    XZ = "xz"  # cut a y-range of xz planes from the staged volume
    YZ = "yz"  # cut an x-range of yz planes from the staged x-first copy
    BAND = "band"  # cut rows of patches of a large 2D image


@dataclass
class Unit:
    """One piece of extraction work; runs in a worker process (picklable, no open handles)."""

    source: str
    key: str
    kind: UnitKind
    spec: dict[str, Any]
    converter: Uint8Converter
    start: int
    stop: int
    shape: tuple[int, int, int]
    root: str
    settings: CurateSettings
    stage_dirs: tuple[str, ...] = ()  # where its patches wait for the exemplar decision (none: it writes its shard)
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


@dataclass
class Inspection:
    """What the main process needs to plan a source's units."""

    source: str
    info: dict[str, Any]
    converter: Uint8Converter
    planes: list[str]
    result: UnitResult | None = None  # a (not too large) 2D image is patched during inspection
    notes: list[str] = field(default_factory=list)


def _chunk_aligned(step: int, chunk: int) -> int:
    """A unit depth whose units never straddle a stored z-chunk (each chunk is fetched by one unit,
    or split evenly between a few): a multiple of ``chunk``, or a divisor of it when smaller."""
    if chunk <= 1 or step <= 0:
        return step
    if step >= chunk:
        return step // chunk * chunk
    return max(d for d in range(1, step + 1) if chunk % d == 0)


def plan_units(source: str, spec: dict, insp: Inspection, root: str, settings: CurateSettings,
               stage_dirs: tuple[str, ...] = ()) -> dict[str, list[Unit]]:
    """Split a volume into bounded units per plane: {"xy": [...], "xz": [...], "yz": [...]}."""
    nz, ny, nx = insp.info["shape"]
    p, budget = settings.patch_size, settings.memory_mb * 2**20
    itemsize = max(np.dtype(insp.info["dtype"]).itemsize, 4)  # float32 during conversion
    plane_dims = {"xy": ((ny, nx), nz), "xz": ((nz, nx), ny), "yz": ((nz, ny), nx)}
    units: dict[str, list[Unit]] = {}
    if not insp.info["is_volume"] and nz == 1:  # a large 2D image: bands of whole patch rows
        starts = grid_starts(ny, p)
        by_memory = budget // max(1, p * nx * itemsize)
        by_patches = settings.patches_per_unit // max(1, len(grid_starts(nx, p)))
        rows = max(1, min(by_memory, by_patches))  # patch rows per band
        return {"xy": [
            Unit(source, f"band-{starts[i]:06d}", UnitKind.BAND, spec, insp.converter, starts[i],
                 starts[i + rows] if i + rows < len(starts) else ny, (nz, ny, nx), root, settings, stage_dirs)
            for i in range(0, len(starts), rows)
        ]}
    for axis in insp.planes:
        (h, w), depth = plane_dims[axis]
        per_plane = max(1, len(grid_starts(h, p)) * len(grid_starts(w, p)))
        by_memory = budget // max(1, h * w * (itemsize if axis == "xy" else 1))
        if axis == "xy":
            step = min(settings.patches_per_unit // per_plane * settings.slice_stride, by_memory)
            step = _chunk_aligned(step, int(insp.info.get("chunk_zyx", [1])[0]))
        else:
            # Planes are cut in place from the staged copies; a unit holds their patches, so
            # few thick units (bounded by memory, at least 4 per plane for parallelism).
            step = min(by_memory, math.ceil(depth / 4))
        step = max(1, step)
        units[axis] = [
            Unit(source, f"{axis}-{start:05d}", UnitKind(axis), spec, insp.converter, start, min(start + step, depth),
                 (nz, ny, nx), root, settings, stage_dirs)
            for start in range(0, depth, step)
        ]
    return units
