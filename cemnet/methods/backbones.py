"""Encoders the pretraining methods train: timm models with one input channel and no classifier."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["build_backbone"]


def build_backbone(arch: str, in_chans: int = 1, **arch_kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, in_chans=in_chans, num_classes=0, **arch_kwargs)``: pooled features.

    Any timm CNN or ViT works; a ViT needs ``img_size`` equal to the crop size (or
    ``dynamic_img_size=True``). ``model.num_features`` is the feature width.
    """
    import timm

    return timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=0, **arch_kwargs)
