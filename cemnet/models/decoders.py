"""Light 2D/3D U-Net-style decoders for reconstruction pretraining (MGMR's pixel and HOG heads)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvBlock", "ReconDecoder"]


def _as_tuple(r: int | Sequence[int], n: int) -> tuple[int, ...]:
    return (int(r),) * n if isinstance(r, int) else tuple(int(v) for v in r)


class ConvBlock(nn.Sequential):
    """Two (conv 3 - norm - LeakyReLU) layers, 2D or 3D."""

    def __init__(self, cin: int, cout: int, spatial_dims: int) -> None:
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        # 3D batches are tiny (a few crops), so batch statistics are noisy there
        norm = (lambda c: nn.BatchNorm2d(c)) if spatial_dims == 2 else (
            lambda c: nn.InstanceNorm3d(c, affine=True))
        super().__init__(
            conv(cin, cout, 3, padding=1, bias=False), norm(cout), nn.LeakyReLU(0.01, inplace=True),
            conv(cout, cout, 3, padding=1, bias=False), norm(cout), nn.LeakyReLU(0.01, inplace=True),
        )


class ReconDecoder(nn.Module):
    """Upsample an encoder's deepest feature back to input resolution, stage by stage.

    One stage per shallower encoder feature (upsample to its size, optionally concatenate it as a
    skip) plus extra x2 stages until full resolution, so a stride-16 ViT and a stride-1 3D encoder
    both end at the input size. Then a 1x1 convolution to ``out_chans`` and the activation.

    SegNeuron's pretraining decoders zero their skip connections (``Up.forward`` in
    ``Mnet_pretrain.py``), so reconstruction must pass through the bottleneck; ``use_skips=False``
    (default) does the same.

    Args:
        feature_channels: channels of the encoder features, finest first.
        feature_reductions: their strides (int or per-axis tuple), finest first.
        out_chans: predicted channels.
        spatial_dims: 2 or 3.
        base_width: width of the first (coarsest) stage; halves every stage down to ``min_width``.
        use_skips: concatenate encoder features (a regular U-Net).
        activation: ``"sigmoid"`` (SegNeuron, targets in [0, 1]) or ``"none"``.
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        feature_reductions: Sequence[int | Sequence[int]],
        out_chans: int,
        spatial_dims: int,
        base_width: int = 256,
        min_width: int = 16,
        use_skips: bool = False,
        activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if activation not in ("sigmoid", "none"):
            raise ValueError(f"activation must be 'sigmoid' or 'none', got {activation!r}")
        self.spatial_dims = spatial_dims
        self.use_skips = use_skips
        self.activation = activation
        reds = [_as_tuple(r, spatial_dims) for r in feature_reductions]
        # plan: (reduction, index of the encoder feature at that level or None)
        plan: list[tuple[tuple[int, ...], int | None]] = [
            (reds[i], i) for i in range(len(reds) - 2, -1, -1)
        ]
        r = plan[-1][0] if plan else reds[-1]
        while any(v > 1 for v in r):
            r = tuple(max(v // 2, 1) for v in r)
            plan.append((r, None))
        self.plan = plan
        cin = feature_channels[-1]
        blocks = []
        for k, (_, skip) in enumerate(plan):
            width = max(base_width // 2**k, min_width)
            extra = feature_channels[skip] if (use_skips and skip is not None) else 0
            blocks.append(ConvBlock(cin + extra, width, spatial_dims))
            cin = width
        self.blocks = nn.ModuleList(blocks)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.head = conv(cin, out_chans, 1)

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        """Decode ``features`` (finest first) to ``(B, out_chans, *out_size)``."""
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        x = features[-1]
        for (red, skip), block in zip(self.plan, self.blocks):
            if skip is not None:
                size = tuple(features[skip].shape[2:])
            else:
                size = tuple(math.ceil(s / r) for s, r in zip(out_size, red))
            if tuple(x.shape[2:]) != size:
                x = F.interpolate(x, size=size, mode=mode, align_corners=False)
            if self.use_skips and skip is not None:
                x = torch.cat([x, features[skip]], dim=1)
            x = block(x)
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode=mode, align_corners=False)
        x = self.head(x)
        return torch.sigmoid(x) if self.activation == "sigmoid" else x
