"""U-Net for fine-tuning pretrained encoders: a ``features_only`` encoder + a skip decoder.

The encoder is a timm ``features_only`` model (2D) or a cemnet 3D encoder built with
``features_only=True``; both describe their outputs in ``feature_info`` (channels and stride of
each map). The decoder is :class:`cemnet.models.decoders.ReconDecoder` with skip connections on:
one upsample-concatenate-convolve stage per shallower feature, extra x2 stages until the input
resolution, then a 1x1 convolution to ``num_classes`` logits. The same class therefore serves
2D and 3D, and any input size (features are resized to their skip's size, not assumed x2).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cemnet.models.decoders import ReconDecoder

log = logging.getLogger(__name__)

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
    """Segmentation U-Net on a pretrained encoder.

    Args:
        encoder: a ``features_only`` module, or anything :func:`cemnet.load_encoder` accepts (a
            ``cemnet export`` file, a checkpoint, a registry name), loaded with
            ``features_only=True``.
        num_classes: output channels (logits; no activation).
        in_chans, out_indices, **load_kwargs: passed to :func:`cemnet.load_encoder` when
            ``encoder`` is not a module.
        base_width, min_width: decoder widths (coarsest stage; halves each stage, floored).
        decoder: pretrained decoder weights (an MGMR decoder file written by ``cemnet export``,
            see :mod:`cemnet.weights.decoder`), or ``"auto"``: the companion file of an
            ``encoder`` export when there is one. Tensors are copied where name and shape
            match; ``self.decoder_report`` says which (``None`` when nothing was asked).

    ``forward(x)`` returns ``(B, num_classes, *x.shape[2:])``.
    """

    def __init__(
        self,
        encoder: nn.Module | str | Path,
        num_classes: int = 1,
        *,
        in_chans: int | None = None,
        out_indices: Sequence[int] | None = None,
        base_width: int = 256,
        min_width: int = 16,
        decoder: str | Path | None = None,
        **load_kwargs: Any,
    ) -> None:
        super().__init__()
        encoder_file = None if isinstance(encoder, nn.Module) else Path(encoder)
        if not isinstance(encoder, nn.Module):
            from cemnet.weights.load import load_encoder

            encoder = load_encoder(encoder, features_only=True, in_chans=in_chans, out_indices=out_indices, **load_kwargs)
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
        self.decoder_report = None
        if decoder is not None:
            self.decoder_report = self._load_decoder(decoder, encoder_file)

    def _load_decoder(self, decoder: str | Path, encoder_file: Path | None) -> Any:
        from cemnet.weights.decoder import decoder_path, load_decoder

        if str(decoder) == "auto":
            if encoder_file is None or not decoder_path(encoder_file).is_file():
                return None
            decoder = decoder_path(encoder_file)
        report = load_decoder(self.decoder, decoder)
        log.info("%s", report.describe())
        return report

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        return self.decoder(list(features), tuple(x.shape[2:]))
