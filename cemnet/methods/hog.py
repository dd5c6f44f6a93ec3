"""HOG reconstruction targets for MGMR, computed batched in torch.

Two targets, both per 2D (yx) slice, for inputs shaped ``(..., H, W)`` with intensities in [0, 1]:

* :func:`segneuron_hog` -- what SegNeuron (MICCAI 2024) regresses: the *visualisation image* of
  ``skimage.feature.hog(slice, orientations=9, pixels_per_cell=(4, 4), cells_per_block=(1, 1),
  visualize=True)`` (SegNeuron ``Pretrain/pretrain_provider.py``), same shape as the slice. It is
  re-implemented here so it runs on the accelerator instead of in 20 scikit-image calls per sample,
  and matches scikit-image to float tolerance (tests/test_pretrain_mgmr_hog.py).
* :func:`maskfeat_hog` -- a MaskFeat-style descriptor: Sobel gradients, unsigned orientation
  bins, magnitude-weighted histograms over ``cell x cell`` cells, L2-normalised per cell; shape
  ``(..., bins, H // cell, W // cell)``.

Both run in fp32 (or fp64 for the angle, see below) with autocast disabled, so they are identical
under bf16 mixed precision.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

HogKind = Literal["segneuron", "maskfeat"]

__all__ = ["HogKind", "segneuron_hog", "maskfeat_hog", "hog_target", "hog_channels"]


def _flatten_slices(img: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    if img.ndim < 2:
        raise ValueError(f"expected (..., H, W), got shape {tuple(img.shape)}")
    lead = tuple(img.shape[:-2])
    return img.reshape(-1, 1, *img.shape[-2:]), lead


def _cell_histograms(weight: torch.Tensor, bins: torch.Tensor, cell: int, n_bins: int) -> torch.Tensor:
    """``(n, n_bins, H // cell, W // cell)`` sums of ``weight`` per (cell, bin), for (n, H, W) inputs.

    Pixels beyond the last whole cell are ignored. A single ``scatter_add_`` instead of a one-hot
    tensor keeps memory at one value per pixel (3D batches have millions of pixels).
    """
    n, h, w = weight.shape
    nr, nc = h // cell, w // cell
    weight = weight[:, : nr * cell, : nc * cell]
    bins = bins[:, : nr * cell, : nc * cell]
    rows = torch.arange(nr * cell, device=weight.device) // cell
    cols = torch.arange(nc * cell, device=weight.device) // cell
    flat = ((rows[:, None] * nc + cols[None, :]) * n_bins).unsqueeze(0) + bins
    hist = torch.zeros(n, nr * nc * n_bins, device=weight.device, dtype=weight.dtype)
    hist.scatter_add_(1, flat.reshape(n, -1), weight.reshape(n, -1))
    return hist.view(n, nr, nc, n_bins).permute(0, 3, 1, 2)


@lru_cache(maxsize=8)
def _segneuron_stencils(orientations: int, cell: int) -> torch.Tensor:
    """(orientations, 1, cell, cell) 0/1 stencils of the lines scikit-image draws in one cell.

    scikit-image draws, for every cell and bin, ``draw.line`` through the cell centre with radius
    ``cell // 2 - 1``; the line's pixel offsets relative to the cell origin are the same in every
    cell (centre >= radius + 1 > 0, so ``int()`` truncation equals floor), so the whole
    visualisation is a stride-``cell`` transposed convolution of the histograms with these
    stencils. Built with ``skimage.draw.line`` itself so the pixel choice is identical.
    """
    from skimage.draw import line

    radius = cell // 2 - 1
    mids = math.pi * (torch.arange(orientations, dtype=torch.float64) + 0.5) / orientations
    centre = cell // 2
    k = torch.zeros(orientations, 1, cell, cell, dtype=torch.float32)
    for o in range(orientations):
        dr = radius * math.sin(float(mids[o]))
        dc = radius * math.cos(float(mids[o]))
        rr, cc = line(int(centre - dc), int(centre + dr), int(centre + dc), int(centre - dr))
        k[o, 0, rr, cc] = 1.0
    return k


def segneuron_hog(img: torch.Tensor, orientations: int = 9, cell: int = 4) -> torch.Tensor:
    """SegNeuron's HOG target: scikit-image's HOG visualisation image, per 2D slice.

    Args:
        img: ``(..., H, W)`` intensities in [0, 1] (SegNeuron feeds ``uint8 / 255`` as float32).
        orientations: number of orientation bins over [0, 180) degrees.
        cell: square cell size in pixels (``pixels_per_cell=(cell, cell)``).

    Returns:
        ``(..., H, W)`` float32; pixels outside the last whole cell are 0, as in scikit-image.
    """
    with torch.autocast(device_type=img.device.type, enabled=False):
        x, lead = _flatten_slices(img.float())
        n, _, h, w = x.shape
        # scikit-image: central differences in the image dtype (float32), zero on the border rows/cols
        g_row = torch.zeros_like(x)
        g_col = torch.zeros_like(x)
        g_row[..., 1:-1, :] = x[..., 2:, :] - x[..., :-2, :]
        g_col[..., :, 1:-1] = x[..., :, 2:] - x[..., :, :-2]
        # its Cython histogram takes magnitude and angle in float64; doing the same keeps the bin of
        # every pixel identical (an fp32 atan2 can flip pixels sitting on a bin edge). MPS has no fp64.
        acc = torch.float32 if x.device.type == "mps" else torch.float64
        g_row, g_col = g_row.to(acc), g_col.to(acc)
        mag = torch.hypot(g_col, g_row)
        ang = torch.remainder(torch.atan2(g_row, g_col) * (180 / math.pi), 180)
        # bin i holds 180/n*i <= angle < 180/n*(i+1), edges rounded to C float as in scikit-image;
        # an angle that rounds up to the top edge falls in no bin there, so it is dropped here too
        upper = torch.tensor(
            [180.0 / orientations * (i + 1) for i in range(orientations)], dtype=torch.float32
        ).to(device=x.device, dtype=acc)
        bins = torch.bucketize(ang, upper, right=True)  # == orientations: in no bin
        nr, nc = h // cell, w // cell
        # one scatter-add of every pixel's magnitude into (cell, bin); a spare bin takes the dropped
        hist = _cell_histograms(mag[:, 0], bins[:, 0], cell, orientations + 1)[:, :orientations]
        hist = (hist / (cell * cell)).float()  # (n, orientations, nr, nc)
        stencil = _segneuron_stencils(orientations, cell).to(x.device)
        # conv_transpose weight is (in=orientations, out=1, cell, cell): each bin paints its line
        vis = F.conv_transpose2d(hist, stencil, stride=cell)
        out = F.pad(vis, (0, w - nc * cell, 0, h - nr * cell))
        return out.reshape(*lead, h, w)


def maskfeat_hog(
    img: torch.Tensor, bins: int = 9, cell: int = 8, eps: float = 1e-12
) -> torch.Tensor:
    """MaskFeat-style HOG descriptor per 2D slice, batched, in fp32 even under autocast.

    Sobel gradients on a reflect-padded slice (``gx`` along W, ``gy`` along H), unsigned
    orientation ``atan2(gy, gx) mod pi`` split into ``bins`` equal bins, magnitude-weighted votes
    summed over ``cell x cell`` cells (trailing pixels that do not fill a cell are ignored), each
    cell's histogram L2-normalised (``v / max(||v||, eps)``). Gradient components below 1e-5 of
    the slice's largest absolute intensity are zeroed first, so fp32 rounding cannot move the
    vote of an exactly horizontal edge between the first and the last bin. MaskFeat's optional
    Gaussian spatial window is not used.

    Args:
        img: ``(..., H, W)`` intensities (any affine scale; the L2 norm removes it).

    Returns:
        ``(..., bins, H // cell, W // cell)`` float32.
    """
    with torch.autocast(device_type=img.device.type, enabled=False):
        x, lead = _flatten_slices(img.float())
        n, _, h, w = x.shape
        sobel_x = torch.tensor(
            [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device
        )
        weight = torch.stack([sobel_x, sobel_x.t()]).unsqueeze(1)  # (2, 1, 3, 3): gx, gy
        grad = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight)
        # A gradient that is exactly 0 (flat rows, the reflect-padded border) comes out of fp32
        # as +-1 ulp; a sign flip of gy there moves the vote between the first and the last bin.
        # Values below 1e-5 of the slice's largest |intensity| are rounding noise: set them to 0.
        floor = 1e-5 * x.abs().amax(dim=(-2, -1), keepdim=True)
        grad = torch.where(grad.abs() <= floor, torch.zeros_like(grad), grad)
        gx, gy = grad[:, 0], grad[:, 1]
        mag = torch.sqrt(gx * gx + gy * gy)
        theta = torch.remainder(torch.atan2(gy, gx), math.pi)
        idx = torch.floor(theta * (bins / math.pi)).long().clamp_(0, bins - 1)
        hist = _cell_histograms(mag, idx, cell, bins)
        nr, nc = hist.shape[-2:]
        hist = F.normalize(hist, p=2, dim=1, eps=eps)
        return hist.reshape(*lead, bins, nr, nc)


def hog_channels(kind: HogKind, bins: int = 9) -> int:
    """Channels the HOG decoder must predict for a target kind."""
    return 1 if kind == "segneuron" else bins


def hog_target(img: torch.Tensor, kind: HogKind, spatial_dims: int) -> torch.Tensor:
    """HOG target for a batch ``(B, 1, H, W)`` (2D) or ``(B, 1, D, H, W)`` (3D), per yx slice.

    Returns ``(B, 1, [D,] H, W)`` for ``"segneuron"`` and ``(B, 9, [D,] H // 8, W // 8)`` for
    ``"maskfeat"`` (bins moved to the channel axis so it lines up with a decoder's output).
    """
    if kind == "segneuron":
        return segneuron_hog(img)
    if kind == "maskfeat":
        t = maskfeat_hog(img[:, 0])  # 2D: (B, 9, h, w); 3D: (B, D, 9, h, w)
        return t if spatial_dims == 2 else t.transpose(1, 2)
    raise ValueError(f"unknown HOG target {kind!r}; expected 'segneuron' or 'maskfeat'")
