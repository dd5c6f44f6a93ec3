"""EM augmentations for single-channel patches, batched, one code path for CPU workers and GPUs.

The default is CEM500K's MoCoV2 recipe (``pretraining/mocov2/train_mocov2.py`` of
volume-em/cem-dataset), which in torchvision/PIL reads::

    Grayscale(3), RandomApply([RandomRotation(180)], p=.5), RandomResizedCrop(224, scale=(.2, 1)),
    ColorJitter(.4, .4, .4, .1), RandomApply([GaussianBlur([.1, 2.])], p=.5), Grayscale(1),
    RandomHorizontalFlip(), RandomVerticalFlip(), ToTensor(), GaussNoise(var 1e-5..1e-4, p=.5),
    Normalize(corpus mean, corpus std)

Here the same distribution is produced by tensor ops on a ``(B, 1, H, W)`` batch:

* rotation, random-resized crop and both flips are folded into ONE affine map per sample and applied
  with a single bilinear ``grid_sample`` (zero fill outside the rotated patch, like RandomRotation's
  ``fill=0``). Flips commute exactly with the later point-wise jitter and the symmetric blur, so
  moving them into the warp changes nothing but saves two passes and one interpolation.
* saturation and hue jitter are no-ops on a grey image (CEM500K converts to RGB and back), so only
  brightness and contrast are applied, in a random order as ``ColorJitter`` does.
* the blur is an exact separable Gaussian (truncated at 3 sigma_max, replicate padding) instead of
  PIL's box-filter approximation.

Because :class:`EMAugment` is device-agnostic, the loader workers (``cemnet.data.datamodule``, the
CPU path) and ``on_after_batch_transfer`` (the on-device path) run the same code: the two paths
cannot drift apart. Parameters are drawn on the CPU with torch's global generator (seeded per worker
by the DataLoader, per process by ``seed_everything``) and moved with the batch.

Truncated edge patches (true size < P, zero-padded to P x P by the corpus) are handled per sample:
crop boxes and the rotation centre use the true ``(h, w)``.

Not reproduced: torchvision's PIL ``RandomResizedCrop`` antialiases when it *down*-scales; with
crop_size == patch size (CEM500K: 224 from 224) the crop is only ever up-scaled, so this matters
only for corpora with P much larger than ``crop_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AugmentConfig", "EMAugment", "sample_params", "apply_params"]


@dataclass
class AugmentConfig:
    """Augmentation settings; the defaults are CEM500K's MoCoV2 set.

    Args:
        crop_size: output side (RandomResizedCrop size).
        crop_scale: range of the crop's area as a fraction of the (true) patch area.
        crop_ratio: range of the crop's aspect ratio (w/h), sampled log-uniformly.
        rotation_degrees: rotation angle is uniform in [-deg, deg].
        rotation_p: probability of rotating.
        brightness: brightness factor uniform in [1-b, 1+b].
        contrast: contrast factor uniform in [1-c, 1+c].
        blur_sigma: Gaussian blur sigma range (uniform).
        blur_p: probability of blurring.
        hflip_p: probability of a horizontal flip.
        vflip_p: probability of a vertical flip.
        noise_var: Gaussian noise variance range (log-uniform), on [0, 1] intensities.
        noise_p: probability of adding noise.
    """

    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    rotation_degrees: float = 180.0
    rotation_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 0.5
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    noise_var: tuple[float, float] = (1e-5, 1e-4)
    noise_p: float = 0.5

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # type: ignore[assignment]
        self.crop_ratio = tuple(float(v) for v in self.crop_ratio)  # type: ignore[assignment]
        self.blur_sigma = tuple(float(v) for v in self.blur_sigma)  # type: ignore[assignment]
        self.noise_var = tuple(float(v) for v in self.noise_var)  # type: ignore[assignment]


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) * (hi - lo) + lo


def _bernoulli(n: int, p: float, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator) < p


def _crop_boxes(
    sizes: Tensor, cfg: AugmentConfig, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision ``RandomResizedCrop.get_params`` for a batch of (h, w): 10 tries, then centre."""
    n = sizes.shape[0]
    h = sizes[:, 0].double()
    w = sizes[:, 1].double()
    area = (h * w)[:, None]
    tries = 10
    scale = torch.rand(n, tries, generator=generator, dtype=torch.float64)
    target = area * (cfg.crop_scale[0] + scale * (cfg.crop_scale[1] - cfg.crop_scale[0]))
    lo, hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    ratio = torch.exp(lo + torch.rand(n, tries, generator=generator, dtype=torch.float64) * (hi - lo))
    cw = torch.round(torch.sqrt(target * ratio))
    ch = torch.round(torch.sqrt(target / ratio))
    ok = (cw > 0) & (cw <= w[:, None]) & (ch > 0) & (ch <= h[:, None])
    first = ok.int().argmax(dim=1, keepdim=True)
    cw = cw.gather(1, first)[:, 0]
    ch = ch.gather(1, first)[:, 0]
    # fallback: whole patch, clamped to the ratio range (torchvision's central crop)
    found = ok.any(dim=1)
    in_ratio = w / h
    fb_w = torch.where(in_ratio < cfg.crop_ratio[0], w, torch.where(in_ratio > cfg.crop_ratio[1], torch.round(h * cfg.crop_ratio[1]), w))
    fb_h = torch.where(in_ratio < cfg.crop_ratio[0], torch.round(w / cfg.crop_ratio[0]), h)
    cw = torch.where(found, cw, fb_w)
    ch = torch.where(found, ch, fb_h)
    u_top = torch.rand(n, generator=generator, dtype=torch.float64)
    u_left = torch.rand(n, generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(u_top * (h - ch + 1)), torch.round((h - ch) / 2))
    left = torch.where(found, torch.floor(u_left * (w - cw + 1)), torch.round((w - cw) / 2))
    return top, left, ch, cw


def sample_params(sizes: Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Draw one set of augmentation parameters per sample (on the CPU).

    Args:
        sizes: ``(n, 2)`` true (h, w) of each patch.
        cfg: the augmentation settings.
        generator: optional torch generator (defaults to torch's global one).

    Returns:
        dict of ``(n,)`` tensors: ``rotate`` (bool), ``angle`` (degrees, 0 where not rotated),
        ``top``/``left``/``crop_h``/``crop_w`` (crop box in the rotated patch, pixels), ``hflip``,
        ``vflip`` (bool), ``brightness``, ``contrast`` (factors), ``brightness_first`` (bool),
        ``blur`` (bool), ``sigma``, ``noise`` (bool), ``noise_std``.
    """
    sizes = torch.as_tensor(sizes).reshape(-1, 2)
    n = sizes.shape[0]
    g = generator
    rotate = _bernoulli(n, cfg.rotation_p, g)
    angle = _uniform(n, -cfg.rotation_degrees, cfg.rotation_degrees, g) * rotate
    top, left, ch, cw = _crop_boxes(sizes, cfg, g)
    b = _uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, g)
    c = _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, g)
    lv0, lv1 = math.log(cfg.noise_var[0]), math.log(cfg.noise_var[1])
    return {
        "rotate": rotate,
        "angle": angle,
        "top": top,
        "left": left,
        "crop_h": ch,
        "crop_w": cw,
        "hflip": _bernoulli(n, cfg.hflip_p, g),
        "vflip": _bernoulli(n, cfg.vflip_p, g),
        "brightness": b,
        "contrast": c,
        "brightness_first": _bernoulli(n, 0.5, g),
        "blur": _bernoulli(n, cfg.blur_p, g),
        "sigma": _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], g),
        "noise": _bernoulli(n, cfg.noise_p, g),
        "noise_std": torch.exp(_uniform(n, lv0, lv1, g)).sqrt(),
    }


def _affine_theta(p: dict[str, Tensor], sizes: Tensor, pad_hw: tuple[int, int]) -> Tensor:
    """(n, 2, 3) ``affine_grid`` matrices: output [-1, 1]^2 -> crop (+flip) -> rotation -> source.

    Pixel-edge coordinates (``align_corners=False``): a crop of width cw starting at ``left`` spans
    [left, left + cw) and is resampled onto the output grid; the rotation is about the centre of the
    true (h, w) region, which sits at the top-left of the zero-padded (H, W) array.
    """
    H, W = pad_hw
    h = sizes[:, 0].double()
    w = sizes[:, 1].double()
    cy, cx = h / 2, w / 2
    sx = torch.where(p["hflip"], -1.0, 1.0).double()
    sy = torch.where(p["vflip"], -1.0, 1.0).double()
    ax, bx = sx * p["crop_w"] / 2, p["left"] + p["crop_w"] / 2
    ay, by = sy * p["crop_h"] / 2, p["top"] + p["crop_h"] / 2
    t = torch.deg2rad(p["angle"])
    cos, sin = torch.cos(t), torch.sin(t)
    theta = torch.empty(sizes.shape[0], 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = 2 / W * cos * ax
    theta[:, 0, 1] = -2 / W * sin * ay
    theta[:, 0, 2] = 2 / W * (cx + cos * (bx - cx) - sin * (by - cy)) - 1
    theta[:, 1, 0] = 2 / H * sin * ax
    theta[:, 1, 1] = 2 / H * cos * ay
    theta[:, 1, 2] = 2 / H * (cy + sin * (bx - cx) + cos * (by - cy)) - 1
    return theta.float()


def _jitter_step(x: Tensor, is_brightness: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """One ColorJitter step per sample: brightness ``clamp(b x)`` or contrast ``clamp(c x + (1-c) mean)``."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    alpha = torch.where(is_brightness, b, c).view(-1, 1, 1, 1)
    beta = torch.where(is_brightness.view(-1, 1, 1, 1), torch.zeros_like(mean), (1 - c).view(-1, 1, 1, 1) * mean)
    return (x * alpha + beta).clamp_(0, 1)


def _gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur with one sigma per sample (grouped conv, replicate padding)."""
    n, _, H, W = x.shape
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    kern = kern / kern.sum(dim=1, keepdim=True)
    y = x.reshape(1, n, H, W)  # each sample is one group
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kern.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kern.view(n, 1, -1, 1), groups=n)
    return y.reshape(n, 1, H, W)


def apply_params(
    x: Tensor,
    sizes: Tensor,
    p: dict[str, Tensor],
    cfg: AugmentConfig,
    mean: float,
    std: float,
) -> Tensor:
    """Apply drawn parameters to a batch.

    Args:
        x: ``(n, 1, H, W)`` uint8 (0..255) or float (0..1) patches, zero-padded beyond ``sizes``.
        sizes: ``(n, 2)`` true (h, w).
        p: output of :func:`sample_params` (CPU tensors; moved here).
        cfg: settings (crop size, blur radius).
        mean, std: normalisation in [0, 1] units (the corpus's own).

    Returns:
        ``(n, 1, crop_size, crop_size)`` float32, normalised.
    """
    dev = x.device
    n = x.shape[0]
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    else:
        x = x.float()
    theta = _affine_theta(p, torch.as_tensor(sizes).reshape(-1, 2).cpu(), (x.shape[-2], x.shape[-1])).to(dev)
    grid = F.affine_grid(theta, [n, 1, cfg.crop_size, cfg.crop_size], align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0, 1)
    b = p["brightness"].to(dev, torch.float32)
    c = p["contrast"].to(dev, torch.float32)
    bfirst = p["brightness_first"].to(dev)
    y = _jitter_step(y, bfirst, b, c)
    y = _jitter_step(y, ~bfirst, b, c)
    blur_idx = torch.nonzero(p["blur"]).flatten()
    if blur_idx.numel():
        radius = int(math.ceil(3 * cfg.blur_sigma[1]))
        bi = blur_idx.to(dev)
        y[bi] = _gaussian_blur(y[bi], p["sigma"][blur_idx].to(dev, torch.float32), radius)
    noise_idx = torch.nonzero(p["noise"]).flatten()
    if noise_idx.numel():
        ni = noise_idx.to(dev)
        s = p["noise_std"][noise_idx].to(dev, torch.float32).view(-1, 1, 1, 1)
        y[ni] = (y[ni] + s * torch.randn_like(y[ni])).clamp_(0, 1)
    return y.sub_(mean).div_(std)


class EMAugment(nn.Module):
    """Batched EM augmentation (see module docstring). Works on CPU tensors and on any device.

    Example:
        >>> aug = EMAugment(AugmentConfig(crop_size=64), mean=0.5, std=0.1)
        >>> views = aug(torch.randint(0, 256, (8, 1, 96, 96), dtype=torch.uint8))
        >>> views.shape
        torch.Size([8, 1, 64, 64])
    """

    def __init__(self, cfg: AugmentConfig | None = None, mean: float = 0.5, std: float = 0.25) -> None:
        super().__init__()
        self.cfg = cfg or AugmentConfig()
        self.mean = float(mean)
        self.std = float(std)

    def forward(
        self,
        x: Tensor,
        sizes: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_params: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Augment ``x`` (``(n, 1, H, W)``, uint8 or [0, 1] float); ``sizes`` default to (H, W)."""
        if x.dim() == 3:
            x = x[:, None]
        if sizes is None:
            sizes = torch.tensor([[x.shape[-2], x.shape[-1]]]).expand(x.shape[0], 2)
        sizes = torch.as_tensor(sizes).reshape(-1, 2).cpu()
        params = sample_params(sizes, self.cfg, generator)
        out = apply_params(x, sizes, params, self.cfg, self.mean, self.std)
        return (out, params) if return_params else out

    def extra_repr(self) -> str:
        return f"{self.cfg}, mean={self.mean:.4f}, std={self.std:.4f}"
