"""A saved model applied to one in-memory block: tiles, flips, planes, blending -> probabilities.

:class:`Predictor` turns a uint8 (z, y, x) array into per-voxel probabilities (C, z, y, x), the
way the model's :class:`~cemnet.finetune.model_file.ModelSpec` says it must be fed:

* ``2d``: every xy slice on its own; ``--orthoplane`` also runs the xz and yz slices and averages
  the three (for near-isotropic volumes);
* ``2.5d``: ``in_chans`` neighbouring slices as channels, offsets ``range(-(k // 2), k - k // 2)``
  (the instance 2-channel mode is (z-1, z)), clamped at the array's ends;
* ``3d``: 3D tiles.

Tiles of ``spec.tile`` voxels overlap by ``2 * spec.halo`` and are blended (:mod:`tiling`). Flip
test-time augmentation (``tta``) averages the 2^d flips of each tile; for affinity outputs the
flipped affinities are shifted back by one voxel (an affinity links a voxel to its predecessor,
which a flip turns into its successor).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cemnet.finetune.model_file import ModelSpec
from cemnet.segment.tiling import AxisGrid, blend_window, grid_tiles

__all__ = ["Predictor", "slice_offsets", "axis_grids"]


def slice_offsets(spec: ModelSpec) -> list[int]:
    """z offsets of a model's input channels (``[0]`` unless 2.5D)."""
    k = spec.in_chans if spec.dims == "2.5d" else 1
    return list(range(-(k // 2), k - k // 2))


def axis_grids(spec: ModelSpec, shape: Sequence[int], orthoplane: bool = False,
               tile: Sequence[int] | None = None) -> list[AxisGrid]:
    """The (z, y, x) tile grids of a volume of ``shape`` for this model (see :mod:`tiling`)."""
    tile = tuple(int(t) for t in (tile or spec.tile))
    if spec.dims == "3d":
        return [AxisGrid(n, t, h) for n, t, h in zip(shape, tile, spec.halo)]
    (ty, tx), (hy, hx) = tile, spec.halo
    if orthoplane:
        if ty != tx or hy != hx:
            raise ValueError(f"--orthoplane needs a square tile and halo (got {ty}x{tx}, {hy}x{hx})")
        return [AxisGrid(n, ty, hy) for n in shape]
    offsets = slice_offsets(spec)
    return [AxisGrid(shape[0], 1, 0, context=max(-min(offsets), max(offsets))),
            AxisGrid(shape[1], ty, hy), AxisGrid(shape[2], tx, hx)]


class Predictor:
    """Probabilities of one block (see the module doc).

    Args:
        model: the network (eval mode), e.g. from :func:`cemnet.load_model`.
        spec: its :class:`ModelSpec`.
        orthoplane: average xy, xz and yz predictions (2D models only).
        tta: average the flips of every tile.
        blend: ``gaussian`` or ``linear`` tile weights.
        batch_size: tiles per forward pass.
        tile: override ``spec.tile`` (same number of axes).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, *, orthoplane: bool = False, tta: bool = False,
                 blend: str = "gaussian", batch_size: int = 4, device: str | torch.device = "cpu",
                 tile: Sequence[int] | None = None) -> None:
        from cemnet.models.unet import feature_spec

        if orthoplane and spec.dims != "2d":
            raise ValueError(f"--orthoplane needs a 2D model; this one is {spec.dims}")
        if orthoplane and spec.task == "instance":
            raise ValueError("--orthoplane does not apply to affinity (instance) models: their channels have a direction")
        self.model, self.spec = model.eval(), spec
        self.orthoplane, self.tta, self.blend = orthoplane, tta, blend
        self.batch_size, self.device = max(1, int(batch_size)), torch.device(device)
        self.tile = tuple(int(t) for t in (tile or spec.tile))
        self.halo = spec.halo
        _, reductions, _ = feature_spec(model.encoder)  # type: ignore[arg-type]
        n_sp = len(self.tile)
        self.multiple = tuple(max(max(r[i] for r in reductions), 1) for i in range(n_sp))
        self.offsets = slice_offsets(spec)
        self.forward_seconds = 0.0  # time inside the network (for the benchmark's overhead figure)
        self._windows: dict[tuple, np.ndarray] = {}

    @property
    def channels(self) -> int:
        """Output channels (probabilities): 1 for binary, classes for multi-class, 4 for instances."""
        return self.spec.out_channels

    def grids(self, shape: Sequence[int]) -> list[AxisGrid]:
        """The (z, y, x) tile grids of a volume of ``shape`` (:func:`axis_grids`)."""
        return axis_grids(self.spec, shape, self.orthoplane, self.tile)

    # ------------------------------------------------------------------ the network, batched

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, 1) if self.spec.output == "softmax" else torch.sigmoid(logits)

    def _affinity_channel(self, axis: int) -> int | None:
        """Affinity channel whose direction is tile axis ``axis`` (None for semantic models)."""
        if self.spec.task != "instance":
            return None
        return axis if self.spec.dims == "3d" else axis + 1

    @torch.no_grad()
    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *tile) normalised input -> (B, C_out, *tile) probabilities (flips averaged)."""
        import time

        n_sp = x.ndim - 2
        size = x.shape[2:]
        pads = [(-n) % m for n, m in zip(size, self.multiple)]
        if any(pads):  # a tile smaller than the model's stride multiple (small volumes): replicate
            pad_arg = [v for p in reversed(pads) for v in (0, p)]
            x = F.pad(x, pad_arg, mode="replicate")
        flips = [()] if not self.tta else [c for r in range(n_sp + 1) for c in itertools.combinations(range(n_sp), r)]
        total = None
        for flip in flips:
            dims = [2 + a for a in flip]
            xin = torch.flip(x, dims) if flip else x
            start = time.perf_counter()
            p = self._activate(self.model(xin.to(self.device))).float().cpu()
            self.forward_seconds += time.perf_counter() - start
            if flip:
                p = torch.flip(p, dims)
                for a in flip:  # flipped affinities link a voxel to its successor: shift back by one
                    c = self._affinity_channel(a)
                    if c is not None:
                        shifted = p[:, c].roll(1, dims=a + 1)
                        idx = [slice(None)] * (n_sp + 1)
                        idx[a + 1] = 0
                        shifted[tuple(idx)] = p[:, c][tuple(idx)]
                        p[:, c] = shifted
            total = p if total is None else total + p
        out = total / len(flips)
        return out[(slice(None), slice(None), *(slice(0, n) for n in size))]

    # ------------------------------------------------------------------ tiled prediction

    def _normalise(self, block: np.ndarray) -> np.ndarray:
        mean, std = self.spec.norm
        out = block.astype(np.float32)  # in place from here: one float copy of the block, no temporaries
        out *= np.float32(1.0 / (255.0 * std))
        out -= np.float32(mean / std)
        return out

    def _predict_slices(self, vol: np.ndarray, origin: Sequence[int], grids: Sequence[AxisGrid]) -> np.ndarray:
        """2D / 2.5D: every slice along axis 0 of ``vol`` (normalised), tiled in its plane by the
        volume's grids of the two plane axes (``origin``: where ``vol`` starts in the volume)."""
        n = vol.shape[0]
        acc = np.zeros((self.channels, *vol.shape), np.float32)
        wsum = np.zeros(vol.shape, np.float32)
        tiles = list(grid_tiles(origin[1:], vol.shape[1:], grids[1:]))
        jobs = [(z, t) for z in range(n) for t in tiles]
        idx = np.clip(np.arange(n)[:, None] + np.asarray(self.offsets)[None], 0, n - 1)  # (n, k) slices
        for b0 in range(0, len(jobs), self.batch_size):
            batch = jobs[b0: b0 + self.batch_size]
            x = torch.from_numpy(np.stack([vol[(idx[z], *t[0])] for z, t in batch]))
            p = self._probabilities(x).numpy()
            for (z, (sl, lo, hi)), pz in zip(batch, p):
                w = self._window(sl, lo, hi, grids[1:])
                acc[(slice(None), z, *sl)] += pz * w
                wsum[(z, *sl)] += w
        np.maximum(wsum, np.float32(1e-12), out=wsum)
        acc /= wsum  # in place: no second C-channel array
        return acc

    def _predict_3d(self, vol: np.ndarray, origin: Sequence[int], grids: Sequence[AxisGrid]) -> np.ndarray:
        acc = np.zeros((self.channels, *vol.shape), np.float32)
        wsum = np.zeros(vol.shape, np.float32)
        tiles = list(grid_tiles(origin, vol.shape, grids))
        for b0 in range(0, len(tiles), self.batch_size):
            batch = tiles[b0: b0 + self.batch_size]
            x = torch.from_numpy(np.stack([vol[t[0]][None] for t in batch]))
            p = self._probabilities(x).numpy()
            for (sl, lo, hi), pt in zip(batch, p):
                w = self._window(sl, lo, hi, grids)
                acc[(slice(None), *sl)] += pt * w
                wsum[sl] += w
        np.maximum(wsum, np.float32(1e-12), out=wsum)
        acc /= wsum  # in place: no second C-channel array
        return acc

    def _window(self, tile: Sequence[slice], low: Sequence[bool], high: Sequence[bool],
                grids: Sequence[AxisGrid]) -> np.ndarray:
        key = (tuple(t.stop - t.start for t in tile), tuple(low), tuple(high))
        if key not in self._windows:
            self._windows[key] = blend_window(key[0], [g.halo for g in grids], low, high, self.blend)
        return self._windows[key]

    def __call__(self, block: np.ndarray, origin: Sequence[int] = (0, 0, 0),
                 volume_shape: Sequence[int] | None = None) -> np.ndarray:
        """(C, z, y, x) float32 probabilities of a uint8 (z, y, x) ``block`` that starts at
        ``origin`` in a volume of ``volume_shape`` (default: the block is the volume). Voxels that
        no tile of the volume's grid covers inside the block (a block's context fringe) are 0."""
        vol = self._normalise(block)
        grids = self.grids(volume_shape or block.shape)
        if self.spec.dims == "3d":
            return self._predict_3d(vol, origin, grids)
        out = self._predict_slices(vol, origin, grids)
        if self.orthoplane:  # xz planes (slices along y), yz planes (slices along x)
            oz, oy, ox = origin
            gz, gy, gx = grids
            out += self._predict_slices(np.ascontiguousarray(vol.transpose(1, 0, 2)), (oy, oz, ox),
                                        (gy, gz, gx)).transpose(0, 2, 1, 3)
            out += self._predict_slices(np.ascontiguousarray(vol.transpose(2, 0, 1)), (ox, oz, oy),
                                        (gx, gz, gy)).transpose(0, 2, 3, 1)
            out /= 3.0
        return out
