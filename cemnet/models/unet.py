"""U-Net for fine-tuning pretrained encoders: a ``features_only`` encoder + a skip decoder.

The encoder is a timm ``features_only`` model (2D) or a cemnet 3D encoder built with
``features_only=True``; both describe their outputs in ``feature_info`` (channels and stride of
each map). The decoder is :class:`cemnet.models.decoders.ReconDecoder` with skip connections on:
one upsample-concatenate-convolve stage per shallower feature, extra x2 stages until the input
resolution, then a 1x1 convolution to ``num_classes`` logits. The same class therefore serves
2D and 3D, and any input size (features are resized to their skip's size, not assumed x2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cemnet.models.decoders import ReconDecoder

__all__ = ["UNet", "feature_spec"]


def feature_spec(encoder: nn.Module) -> tuple[list[int], list[tuple[int, ...]], int]:
    """(channels, per-axis reductions, spatial dims) of a ``features_only`` encoder's outputs."""
    info = getattr(encoder, "feature_info", None)
    if info is None:
        raise TypeError(f"{type(encoder).__name__} has no feature_info; build it with features_only=True")
    if hasattr(info, "channels"):  # timm FeatureInfo: 2D, scalar reductions
        return list(info.channels()), [(int(r), int(r)) for r in info.reduction()], 2
    channels = [int(f["num_chs"]) for f in info]
    reductions = [tuple(int(v) for v in f["reduction"]) for f in info]
    return channels, reductions, len(reductions[0])


class UNet(nn.Module):
    """Segmentation U-Net on an encoder.

    Args:
        encoder: a built ``features_only`` module (timm, or :func:`cemnet.models.build_encoder3d`).
            For pretrained weights from a file, run or registry name use
            :func:`cemnet.weights.load_unet`, which loads the encoder (and, if asked, a pretrained
            decoder) and builds this class.
        num_classes: output channels (logits; no activation).
        base_width, min_width: decoder widths (coarsest stage; halves each stage, floored).

    ``decoder_report`` says which pretrained decoder tensors were loaded (set by
    :func:`cemnet.weights.load_unet`; ``None`` when none were asked for).
    ``forward(x)`` returns ``(B, num_classes, *x.shape[2:])``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 1, *, base_width: int = 256, min_width: int = 16) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            # models import nothing of the weights package: loading lives there, not here
            raise TypeError(
                f"UNet takes a built encoder module, not {type(encoder).__name__} {encoder!r}; "
                "to build one from weights (file, run folder, registry name) use cemnet.weights.load_unet"
            )
        channels, reductions, spatial_dims = feature_spec(encoder)
        self.encoder = encoder
        self.spatial_dims = spatial_dims
        self.decoder = ReconDecoder(
            channels,
            reductions,
            num_classes,
            spatial_dims,
            base_width=base_width,
            min_width=min_width,
            use_skips=True,
            activation="none",
        )
        self.decoder_report: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        return self.decoder(list(features), tuple(x.shape[2:]))
