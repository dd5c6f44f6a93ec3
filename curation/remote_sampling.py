"""Sampling budgets: a bounded, reproducible sample of a huge (remote) volume, drawn as whole
chunk-aligned blocks so that every read stays chunk-aligned.

A manifest entry with ``max_patches: N`` (or ``sample_fraction: F``) is replaced, before the run,
by sub-sources: blocks of the entry's volume (within its ``roi``), each a whole number of stored
chunks and at least a patch wide (and, when xz / yz planes are cut, a patch deep), drawn in a
seeded random order until their patches add up to about ``N`` (or ``F`` of the blocks). Each
block is a source of its own (``NAME_zZ0yY0xX0``, ``roi`` in voxels) in the entry's dedup
dataset, so units, resume and the report work unchanged; the same seed and manifest give the
same blocks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from typing import Any, Sequence

import numpy as np

from curation.manifest import ReaderError, SourceSpec, safe_name
from curation.patching import patch_count, plan_planes
from curation.readers import open_volume

__all__ = ["chunk_blocks", "block_patches", "expand_sampled"]


def _block_edges(size: int, chunk: int, minimum: int) -> list[int]:
    """Block boundaries along one axis: multiples of ``chunk`` spanning >= ``minimum`` (the last
    block takes the remainder; a remainder thinner than ``minimum`` joins the block before)."""
    step = max(1, chunk) * max(1, math.ceil(min(minimum, size) / max(1, chunk)))
    edges = list(range(0, size, step)) + [size]
    if len(edges) > 2 and edges[-1] - edges[-2] < min(minimum, size):
        edges.pop(-2)
    return edges


def chunk_blocks(shape: Sequence[int], chunks: Sequence[int], minimum: Sequence[int]) -> list[tuple[int, ...]]:
    """Chunk-aligned blocks (z0, z1, y0, y1, x0, x1) tiling ``shape``, each >= ``minimum`` a side
    (where the volume allows)."""
    edges = [_block_edges(int(n), int(c), int(m)) for n, c, m in zip(shape, chunks, minimum)]
    return [(z0, z1, y0, y1, x0, x1)
            for z0, z1 in zip(edges[0], edges[0][1:])
            for y0, y1 in zip(edges[1], edges[1][1:])
            for x0, x1 in zip(edges[2], edges[2][1:])]


def block_patches(block: Sequence[int], planes: Sequence[str], patch_size: int) -> int:
    """How many patches the planes of a block give (stride 1)."""
    nz, ny, nx = block[1] - block[0], block[3] - block[2], block[5] - block[4]
    cuts = {"xy": (nz, (ny, nx)), "xz": (ny, (nz, nx)), "yz": (nx, (nz, ny))}
    return sum(cuts[p][0] * patch_count(cuts[p][1], patch_size) for p in planes)


def _seed(spec: SourceSpec, seed: int) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}\t{spec.path}\t{spec.key}".encode()).digest()[:8], "little")


def expand_sampled(specs: Sequence[SourceSpec], settings: Any, log: Any = None) -> list[SourceSpec]:
    """Replace every spec with a sampling budget by its drawn blocks (see the module docstring).

    ``settings``: :class:`curation.settings.CurateSettings` (patch size, planes, seed). A spec that
    cannot be opened is kept as it is: the run reports its problem like any other source's."""
    out: list[SourceSpec] = []
    for spec in specs:
        if spec.max_patches is None and spec.sample_fraction is None:
            out.append(spec)
            continue
        try:
            with open_volume(spec) as v:
                shape, chunks, offset = v.shape, v.chunk_zyx, v.offset
                planes = plan_planes(v.shape, v.voxel_size, is_volume=v.is_volume, patch_size=settings.patch_size,
                                     max_anisotropy=settings.max_anisotropy, axes=settings.axes)
        except ReaderError:
            out.append(dataclasses.replace(spec, max_patches=None, sample_fraction=None))
            continue
        p = settings.patch_size
        depth = p if {"xz", "yz"} & set(planes) else 1
        blocks = chunk_blocks(shape, chunks, (depth, p, p))
        order = np.random.default_rng(_seed(spec, settings.seed)).permutation(len(blocks))
        chosen, total = [], 0
        if spec.sample_fraction is not None:
            chosen = [blocks[i] for i in order[: max(1, math.ceil(spec.sample_fraction * len(blocks)))]]
            total = sum(block_patches(b, planes, p) for b in chosen)
        else:
            for i in order:
                if total >= spec.max_patches:  # type: ignore[operator]
                    break
                chosen.append(blocks[i])
                total += block_patches(blocks[i], planes, p)
        name = spec.name or "source"
        for b in sorted(chosen):
            z0, y0, x0 = (b[0] + offset[0], b[2] + offset[1], b[4] + offset[2])
            roi = (z0, z0 + b[1] - b[0], y0, y0 + b[3] - b[2], x0, x0 + b[5] - b[4])
            out.append(dataclasses.replace(
                spec, name=safe_name(f"{name}_z{z0}y{y0}x{x0}"), roi=roi, roi_unit="voxel",
                max_patches=None, sample_fraction=None, dataset=spec.dataset or name))
        budget = f"max_patches {spec.max_patches}" if spec.max_patches else f"sample_fraction {spec.sample_fraction:g}"
        print(f"{spec.path}: {budget}: {len(chosen)} of {len(blocks)} chunk-aligned blocks drawn "
              f"(about {total} patches, seed {settings.seed})", file=log or sys.stderr)
    return out
