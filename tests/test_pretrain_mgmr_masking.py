"""MGMR masks: ratio, block alignment, one scale per sample, noise statistics (real EM crops)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cemnet.methods.masking import (
    mgmr_scales_2d,
    mgmr_scales_3d,
    replace_with_noise,
    sample_block_masks,
)


def _blocks(mask: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """View a (spatial) mask as (n_blocks, voxels per block); only valid when block divides it."""
    dims = mask.shape
    shape: list[int] = []
    for s, b in zip(dims, block):
        shape += [s // b, b]
    m = mask.reshape(shape)
    n = len(dims)
    m = m.permute(*range(0, 2 * n, 2), *range(1, 2 * n, 2))
    return m.reshape(math.prod(s // b for s, b in zip(dims, block)), -1)


def _only_scale(mask: torch.Tensor, scales: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Scales at which ``mask`` is block-constant."""
    out = []
    for sc in scales:
        blk = _blocks(mask, sc)
        if bool((blk.all(1) | ~blk.any(1)).all()):
            out.append(sc)
    return out


def test_2d_masks_ratio_alignment_scale() -> None:
    g = torch.Generator().manual_seed(0)
    scales = mgmr_scales_2d()
    mb = sample_block_masks(96, (128, 128), scales, (0.5, 0.7), generator=g)
    assert mb.mask.shape == (96, 1, 128, 128) and mb.mask.dtype == torch.bool
    assert set(mb.scale_index.tolist()) == {0, 1, 2}  # every scale is used over a batch
    assert float(mb.ratio.min()) >= 0.5 and float(mb.ratio.max()) < 0.7
    for m, k, r in zip(mb.mask[:, 0], mb.scale_index.tolist(), mb.ratio.tolist()):
        sc = scales[k]
        n_blocks = (128 // sc[0]) ** 2
        blk = _blocks(m, sc)
        # block-aligned at the drawn scale: every block fully masked or fully kept
        assert bool((blk.all(1) | ~blk.any(1)).all())
        # exactly floor(ratio * n_blocks) blocks, i.e. within one block of the drawn ratio
        assert int(blk.all(1).sum()) == math.floor(r * n_blocks)
        assert abs(float(m.float().mean()) - r) <= 1.0 / n_blocks + 1e-6
        # one scale per sample: the mask is not constant on any coarser block (it would be
        # ambiguous); with >= 64 blocks a random mask is never aligned to a 2x coarser grid
        coarser = [s for s in scales if s[0] > sc[0]]
        assert not _only_scale(m, coarser)


def test_3d_masks_z_and_xy_scales_drawn_independently() -> None:
    g = torch.Generator().manual_seed(1)
    scales = mgmr_scales_3d()
    assert len(scales) == 9 and (5, 16, 16) in scales and (2, 4, 4) in scales
    mb = sample_block_masks(64, (20, 64, 64), scales, (0.5, 0.7), generator=g)
    used = {scales[k] for k in mb.scale_index.tolist()}
    assert {s[0] for s in used} == {2, 4, 5} and {s[1] for s in used} == {4, 8, 16}
    for m, k, r in zip(mb.mask[:, 0], mb.scale_index.tolist(), mb.ratio.tolist()):
        sc = scales[k]
        blk = _blocks(m, sc)
        assert bool((blk.all(1) | ~blk.any(1)).all())
        n_blocks = blk.shape[0]
        assert int(blk.all(1).sum()) == math.floor(r * n_blocks)
        assert 0.5 - 1.0 / n_blocks <= float(m.float().mean()) < 0.7


def test_non_divisible_crop_uses_partial_edge_blocks() -> None:
    mb = sample_block_masks(8, (10, 50, 37), [(4, 16, 16)], (0.6, 0.6), generator=torch.Generator().manual_seed(2))
    assert mb.mask.shape == (8, 1, 10, 50, 37)
    frac = mb.mask.float().mean(dim=(1, 2, 3, 4))
    assert bool(((frac > 0.4) & (frac < 0.8)).all())


def test_masked_voxels_carry_noise_with_the_crops_own_statistics(shared_data: Path) -> None:
    # two real crops of very different statistics: ISBI ssTEM and the darker SEM micrograph
    isbi = np.asarray(Image.open(shared_data / "isbi2012" / "train" / "images" / "0.png").convert("L"))
    sem = np.asarray(Image.open(shared_data / "axondeepseg_sem_demo" / "image.png").convert("L"))
    crops = np.stack([isbi[:256, :256], sem[400:656, 600:856]])
    x = torch.from_numpy(crops).float()[:, None] / 255.0
    g = torch.Generator().manual_seed(3)
    mb = sample_block_masks(2, (256, 256), [(8, 8)], (0.5, 0.7), generator=g)
    out = replace_with_noise(x, mb.mask, generator=g)
    for i in range(2):
        m = mb.mask[i, 0]
        kept = out[i, 0][~m]
        noise = out[i, 0][m]
        assert torch.equal(kept, x[i, 0][~m])  # unmasked voxels untouched
        mean, std = float(x[i].mean()), float(x[i].std(correction=0))
        assert abs(float(noise.mean()) - mean) < 0.01  # ~40k samples: mean error ~ std / 200
        assert abs(float(noise.std()) / std - 1.0) < 0.03
        # noise, not image: masked voxels are uncorrelated with the original ones
        r = np.corrcoef(noise.numpy(), x[i, 0][m].numpy())[0, 1]
        assert abs(r) < 0.03
    assert abs(float(x[0].mean()) - float(x[1].mean())) > 0.1  # the two crops really differ
