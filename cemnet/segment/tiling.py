"""Tiles and blocks: where the model looks, and how overlapping outputs are blended.

Two levels of cutting, both regular grids:

* **tiles** (model inputs, ``spec.tile`` voxels a side) overlap by ``2 * halo``; each tile's output
  is weighted by a smooth window (Gaussian or linear) that is zero on the ``halo`` voxels next to a
  side that has more data beyond it, so every output voxel comes from tile interiors with at least
  ``halo`` voxels of context, and seams are blended instead of cut.
* **blocks** (units of work: read, predict, write, record as done) are cut from the volume so that
  one block with its context fits the memory budget; see :func:`plan_blocks`.

The tile grid is the volume's, not the block's: a block reads exactly the tiles that weigh on its
output, whole, so a volume cut into blocks gets bit-for-bit the same result as one block holding
the whole volume (only the memory differs).

This is the project's one tiler: the benchmarks' probe tiles and the filter-threshold study's
patches use :func:`tile_starts` / :func:`cut_tiles` with the ``edge`` rule they need (``flush``:
the last tile moved back to end at the border, as inference needs; ``truncate``: a shorter last
tile, zero-padded by :func:`cut_tiles`; ``drop``: whole tiles only). The curation pipeline's
patch grid (``curation/patching.py``) stays in ``curation``, which imports no ``cemnet`` package:
it is CEM500K's rule (an edge strip counts from half a patch), not a tiling of this kind.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["BLENDS", "EDGES", "tile_starts", "cut_tiles", "blend_window", "AxisGrid", "Block", "plan_blocks", "max_read_voxels", "grid_tiles"]

BLENDS = ("gaussian", "linear")
# Smallest Gaussian weight relative to the centre: a voxel seen by one tile only (a volume border)
# still gets a well-defined value, and float32 sums stay far from underflow.
_MIN_WEIGHT = 1e-3


EDGES = ("flush", "truncate", "drop")


def tile_starts(length: int, tile: int, halo: int = 0, edge: str = "flush") -> list[int]:
    """Start of every tile along one axis, stepping ``tile - 2 * halo`` from 0.

    ``edge`` says what happens where the steps do not end exactly at ``length``: ``flush`` moves
    the last tile back so it ends at ``length`` (an axis shorter than a tile gets one tile at 0);
    ``truncate`` keeps a shorter last tile (the caller clips it at ``length``); ``drop`` keeps
    whole tiles only (none when the axis is shorter than a tile).
    """
    if edge not in EDGES:
        raise ValueError(f"unknown tile edge rule {edge!r}; choose from {', '.join(EDGES)}")
    step = max(1, tile - 2 * halo)
    if edge == "drop":
        return list(range(0, length - tile + 1, step))
    if edge == "truncate":
        return list(range(0, max(length - tile, 0) + step, step))  # until a tile reaches the end
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def cut_tiles(image: np.ndarray, tile: int, edge: str = "truncate") -> tuple[np.ndarray, np.ndarray]:
    """A 2D image cut into the non-overlapping ``tile`` x ``tile`` grid from its top-left corner.

    Returns (tiles ``(n, tile, tile)`` of the image's dtype, sizes ``(n, 2)`` int64 of the true
    (height, width) of each tile); with ``edge="truncate"`` the shorter edge tiles are zero-padded
    and their sizes say so.
    """
    if image.ndim != 2:
        raise ValueError(f"cut_tiles expects a 2D image, got shape {image.shape}")
    ys, xs = (tile_starts(n, tile, 0, edge) for n in image.shape)
    tiles = np.zeros((len(ys) * len(xs), tile, tile), image.dtype)
    sizes = np.empty((len(tiles), 2), np.int64)
    for i, (y, x) in enumerate(itertools.product(ys, xs)):
        part = image[y: y + tile, x: x + tile]
        tiles[i, : part.shape[0], : part.shape[1]] = part
        sizes[i] = part.shape
    return tiles, sizes


def _axis_window(size: int, halo: int, low_border: bool, high_border: bool, kind: str) -> np.ndarray:
    lo = 0 if low_border else min(halo, (size - 1) // 2)
    hi = size if high_border else size - min(halo, (size - 1) // 2)
    i = np.arange(size, dtype=np.float64)
    if kind == "gaussian":
        centre, sigma = (size - 1) / 2.0, max(size / 8.0, 1.0)  # nnU-Net's sigma = tile / 8
        w = np.maximum(np.exp(-0.5 * ((i - centre) / sigma) ** 2), _MIN_WEIGHT)
    elif kind == "linear":
        w = np.minimum(i - lo + 1, hi - i).clip(min=1.0)
    else:
        raise ValueError(f"unknown blending {kind!r}; choose from {', '.join(BLENDS)}")
    w[:lo] = 0.0
    w[hi:] = 0.0
    return w.astype(np.float32)


def blend_window(size: Sequence[int], halo: Sequence[int], low_border: Sequence[bool],
                 high_border: Sequence[bool], kind: str = "gaussian") -> np.ndarray:
    """N-d weights of one tile: the outer product of per-axis windows (see module doc)."""
    out = np.ones((), np.float32)
    for n, h, lo, hi in zip(size, halo, low_border, high_border):
        out = np.multiply.outer(out, _axis_window(int(n), int(h), bool(lo), bool(hi), kind))
    return out.astype(np.float32)


@dataclass(frozen=True)
class AxisGrid:
    """The tile grid of one volume axis: ``tile`` and ``halo`` (``tile=1``: per-slice, untiled),
    plus ``context`` slices read on both sides without tiles (the neighbours of a 2.5D model)."""

    length: int
    tile: int
    halo: int
    context: int = 0

    def tiles(self) -> list[tuple[int, int]]:
        """(start, stop) of every tile along the axis (a tile never exceeds the axis)."""
        t = min(self.tile, self.length)
        return [(s, s + t) for s in tile_starts(self.length, t, self.halo)]

    def weighted(self, start: int, stop: int) -> tuple[int, int]:
        """The part of a tile whose blending weight is non-zero (its halo is cut unless at a border)."""
        h = min(self.halo, (stop - start - 1) // 2)
        return (start if start == 0 else start + h, stop if stop == self.length else stop - h)

    def read_range(self, a: int, b: int) -> tuple[int, int]:
        """Input range for output ``[a, b)``: every tile that weighs on it, whole, plus the context."""
        spans = [(s, e) for s, e in self.tiles() if self.weighted(s, e)[0] < b and self.weighted(s, e)[1] > a]
        lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
        return max(0, lo - self.context), min(self.length, hi + self.context)


@dataclass(frozen=True)
class Block:
    """One unit of work: the output region ``out`` and the (larger) input region ``read`` that
    gives it its context; both are (z, y, x) tuples of (start, stop), clipped to the volume."""

    index: int
    out: tuple[tuple[int, int], ...]
    read: tuple[tuple[int, int], ...]

    @property
    def out_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.out)

    @property
    def read_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.read)

    @property
    def crop(self) -> tuple[slice, ...]:
        """Where ``out`` lies inside ``read``."""
        return tuple(slice(o0 - r0, o1 - r0) for (o0, o1), (r0, _) in zip(self.out, self.read))

    @property
    def origin(self) -> tuple[int, ...]:
        return tuple(a for a, _ in self.read)

    @property
    def voxels(self) -> int:
        return math.prod(b - a for a, b in self.out)


def plan_blocks(block: Sequence[int], grids: Sequence[AxisGrid]) -> list[Block]:
    """The regular grid of ``block``-sized output regions over the volume (z, y, x), each with the
    input region its tiles need (:meth:`AxisGrid.read_range`)."""
    axes = [[(s, min(s + b, g.length)) for s in range(0, g.length, b)] for b, g in zip(block, grids)]
    reads = [{ab: g.read_range(*ab) for ab in spans} for spans, g in zip(axes, grids)]
    return [Block(index, out, tuple(r[ab] for r, ab in zip(reads, out)))
            for index, out in enumerate(itertools.product(*axes))]


def max_read_voxels(block: Sequence[int], grids: Sequence[AxisGrid]) -> int:
    """The largest input region of any block of this shape (what one block costs in memory)."""
    longest = []
    for b, g in zip(block, grids):
        longest.append(max(e - s for s, e in (g.read_range(a, min(a + b, g.length)) for a in range(0, g.length, b))))
    return math.prod(longest)


def grid_tiles(origin: Sequence[int], shape: Sequence[int], grids: Sequence[AxisGrid]) -> Iterator[tuple[tuple[slice, ...], tuple[bool, ...], tuple[bool, ...]]]:
    """Every tile of the volume's grid lying inside the array at ``origin`` of ``shape``, as
    (slices into the array, low-border flags, high-border flags)."""
    per_axis = []
    for o, n, g in zip(origin, shape, grids):
        per_axis.append([(slice(s - o, e - o), s == 0, e == g.length) for s, e in g.tiles() if s >= o and e <= o + n])
    for combo in itertools.product(*per_axis):
        yield tuple(c[0] for c in combo), tuple(c[1] for c in combo), tuple(c[2] for c in combo)
