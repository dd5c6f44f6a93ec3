"""Multi-scale block masks with Gaussian-noise replacement (SegNeuron's MGMR corruption).

Per sample: one block scale drawn uniformly from ``scales`` (2D: 4, 8 or 16 px; 3D: z in
{2, 4, 5} times yx in {4, 8, 16}, drawn independently as in SegNeuron), one ratio
``r ~ U[low, high)``, and exactly ``floor(r * n_blocks)`` blocks chosen without replacement. The
masked voxels are *replaced* by Gaussian noise with the mean and standard deviation of that
sample's own (unmasked) crop, which SegNeuron computes over the whole crop.

Runs batched on the accelerator; samples sharing a scale are drawn together.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "MaskBatch",
    "mgmr_scales_2d",
    "mgmr_scales_3d",
    "sample_block_masks",
    "replace_with_noise",
]


def mgmr_scales_2d(xy: Sequence[int] = (4, 8, 16)) -> list[tuple[int, int]]:
    """SegNeuron-style 2D scales: square blocks of side 4, 8 or 16 px."""
    return [(s, s) for s in xy]


def mgmr_scales_3d(
    z: Sequence[int] = (2, 4, 5), xy: Sequence[int] = (4, 8, 16)
) -> list[tuple[int, int, int]]:
    """SegNeuron's 3D scales: every (z, xy, xy) pair, so z and xy are drawn independently."""
    return [(sz, s, s) for sz, s in itertools.product(z, xy)]


@dataclass
class MaskBatch:
    """Masks of one batch.

    Attributes:
        mask: ``(B, 1, *spatial)`` bool, True where the voxel is masked (replaced by noise).
        scale_index: ``(B,)`` index into the ``scales`` list of the scale each sample used.
        ratio: ``(B,)`` drawn ratio; the realised fraction is ``floor(ratio * n_blocks) / n_blocks``
            of the block grid (exactly the voxel fraction when the block divides the crop).
    """

    mask: torch.Tensor
    scale_index: torch.Tensor
    ratio: torch.Tensor


def sample_block_masks(
    batch: int,
    spatial: Sequence[int],
    scales: Sequence[Sequence[int]],
    ratio: tuple[float, float] = (0.5, 0.7),
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> MaskBatch:
    """Draw one block-aligned random mask per sample.

    Args:
        batch: number of samples.
        spatial: crop size, ``(H, W)`` or ``(D, H, W)``.
        scales: candidate block sizes, each of ``len(spatial)`` ints; one is drawn per sample.
        ratio: ``[low, high)`` of the uniform mask ratio.
        device: where the masks live.
        generator: RNG on ``device`` (default: the global torch RNG, seeded by Lightning).

    A crop not divisible by the block uses a ceil-sized block grid cropped to the crop, so its
    edge blocks are partial.
    """
    spatial = tuple(int(s) for s in spatial)
    scales = [tuple(int(v) for v in s) for s in scales]
    if any(len(s) != len(spatial) for s in scales):
        raise ValueError(f"every scale needs {len(spatial)} entries, got {scales}")
    low, high = ratio
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"mask ratio range must satisfy 0 <= low <= high <= 1, got {ratio}")
    kw = {"device": device, "generator": generator}
    scale_index = torch.randint(len(scales), (batch,), **kw)
    ratios = low + (high - low) * torch.rand(batch, **kw)
    mask = torch.zeros(batch, 1, *spatial, dtype=torch.bool, device=device)
    for k, block in enumerate(scales):
        rows = torch.nonzero(scale_index == k).flatten()
        if rows.numel() == 0:
            continue
        grid = [math.ceil(s / b) for s, b in zip(spatial, block)]
        n_blocks = math.prod(grid)
        n_masked = torch.floor(ratios[rows] * n_blocks).long()
        # rank of each block in a random permutation; the first n_masked ranks are masked
        rank = torch.rand(rows.numel(), n_blocks, **kw).argsort(dim=1).argsort(dim=1)
        coarse = (rank < n_masked[:, None]).reshape(-1, *grid)
        for dim, b in enumerate(block):
            coarse = coarse.repeat_interleave(b, dim=dim + 1)
        crop = (slice(None),) + tuple(slice(0, s) for s in spatial)
        mask[rows, 0] = coarse[crop]
    return MaskBatch(mask=mask, scale_index=scale_index, ratio=ratios)


def replace_with_noise(
    x: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace masked voxels by Gaussian noise with each sample's own crop mean and std.

    Args:
        x: ``(B, C, *spatial)`` float crops (SegNeuron: ``uint8 / 255``).
        mask: bool, broadcastable to ``x``; True = replace.

    Returns:
        A new tensor; noise is not clipped (SegNeuron does not clip it either).
    """
    dims = tuple(range(1, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, correction=0)  # np.std, as SegNeuron
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return torch.where(mask, mean + std * noise, x)
