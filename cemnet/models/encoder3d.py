"""Compact 3D residual encoders for anisotropic vEM sub-volumes, ready for a 3D U-Net.

``build_encoder3d(arch, in_chans=1, **arch_kwargs)`` rebuilds an encoder from the ``arch`` and
``arch_kwargs`` stored in a checkpoint's ``checkpoint["cemnet"]``; the export code calls exactly
that, so every constructor argument must be JSON-serialisable (ints, strings, lists).

The encoder is a stem at full resolution plus ``len(widths) - 1`` downsampling stages of residual
blocks. vEM is usually anisotropic and pretraining crops are thin in z (SegNeuron: 20 x 128 x 128),
so the default strides downsample only yx in the first stages and z later (like SegNeuron's MNet,
which skips z pooling below 8 slices). ``forward_features(x)`` returns one feature map per stage
(stem included), described by ``feature_info`` (``num_chs``, ``reduction`` as a (z, y, x) tuple,
``module``), which is what a U-Net decoder needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = ["ARCHS", "Encoder3D", "ResBlock3d", "build_encoder3d", "list_encoders3d"]

Triple = tuple[int, int, int]


def _norm(kind: str, channels: int) -> nn.Module:
    # Instance norm is SegNeuron's choice and keeps small-batch 3D fine-tuning stable.
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}; expected 'instance', 'batch' or 'group'")


def _triple(v: int | Sequence[int]) -> Triple:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


class ResBlock3d(nn.Module):
    """Pre-activation-free basic residual block: conv-norm-act-conv-norm + shortcut, act."""

    def __init__(self, cin: int, cout: int, stride: Triple = (1, 1, 1), norm: str = "instance") -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, cout)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if cin != cout or stride != (1, 1, 1):
            self.shortcut = nn.Sequential(
                nn.Conv3d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class Encoder3D(nn.Module):
    """3D residual encoder with a multi-scale feature list.

    Args:
        in_chans: input channels (1 for EM).
        widths: channels of the stem and of every stage after it.
        depths: residual blocks per entry of ``widths`` (the stem's count is its extra blocks
            after the stem convolution).
        strides: (z, y, x) downsampling of each entry of ``widths``; the first (the stem) is
            normally ``(1, 1, 1)`` so the finest feature is at full resolution.
        norm: ``"instance"`` (default), ``"batch"`` or ``"group"``.
        features_only: ``forward`` returns the feature list (timm's ``features_only``), for
            segmentation decoders; does not change the weights.
        out_indices: which features ``forward`` returns when ``features_only`` (default: all);
            ``feature_info`` lists only those.

    Attributes:
        feature_info: one dict per returned feature (``num_chs``, ``reduction`` (z, y, x),
            ``module``), timm-style.
        num_features: channels of the deepest feature.
    """

    def __init__(
        self,
        in_chans: int = 1,
        widths: Sequence[int] = (32, 64, 96, 128, 256),
        depths: Sequence[int] = (1, 1, 2, 2, 2),
        strides: Sequence[int | Sequence[int]] = ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
        norm: str = "instance",
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not (len(widths) == len(depths) == len(strides)):
            raise ValueError("widths, depths and strides need one entry per stage")
        self.in_chans = in_chans
        self.stem = nn.Sequential(
            nn.Conv3d(in_chans, widths[0], 3, stride=_triple(strides[0]), padding=1, bias=False),
            _norm(norm, widths[0]),
            nn.LeakyReLU(0.01, inplace=True),
        )
        stages: list[nn.Module] = []
        reduction = _triple(strides[0])
        self.feature_info: list[dict[str, Any]] = []
        cin = widths[0]
        for i, (w, d, s) in enumerate(zip(widths, depths, strides)):
            stride = (1, 1, 1) if i == 0 else _triple(s)  # the stem already applied strides[0]
            blocks = [ResBlock3d(cin, w, stride, norm)] if i > 0 else []
            blocks += [ResBlock3d(w, w, (1, 1, 1), norm) for _ in range(d - (1 if i > 0 else 0))]
            stages.append(nn.Sequential(*blocks))
            if i > 0:
                reduction = tuple(r * t for r, t in zip(reduction, stride))  # type: ignore[assignment]
            self.feature_info.append({"num_chs": w, "reduction": reduction, "module": f"stages.{i}"})
            cin = w
        self.stages = nn.ModuleList(stages)
        self.num_features = widths[-1]
        self.features_only = features_only
        self.out_indices = None
        if out_indices is not None:
            n = len(widths)
            self.out_indices = sorted({i % n for i in out_indices})  # negative indices as in timm
            self.feature_info = [self.feature_info[i] for i in self.out_indices]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps finest first, one per ``feature_info`` entry (every stage by default)."""
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        if self.out_indices is not None:
            feats = [feats[i] for i in self.out_indices]
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Deepest feature map, or the feature list when built with ``features_only``."""
        feats = self.forward_features(x)
        return feats if self.features_only else feats[-1]


# name -> default kwargs; every value is JSON-serialisable so checkpoints can store it.
ARCHS: dict[str, dict[str, Any]] = {
    # CPU tests and smoke runs
    "cemnet3d_res_tiny": {
        "widths": [8, 16, 32, 64],
        "depths": [1, 1, 1, 1],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    },
    # SegNeuron's channel widths (32, 64, 96, 128, 256), one residual stream
    "cemnet3d_res_small": {
        "widths": [32, 64, 96, 128, 256],
        "depths": [1, 1, 2, 2, 2],
        "strides": [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    },
    "cemnet3d_res_base": {
        "widths": [32, 64, 128, 256, 320],
        "depths": [1, 2, 2, 3, 2],
        "strides": [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    },
}


def list_encoders3d() -> list[str]:
    """Names accepted by :func:`build_encoder3d`."""
    return sorted(ARCHS)


_ARCH_FIELDS = {"widths", "depths", "strides", "norm"}
_VIEW_FIELDS = {"features_only", "out_indices"}  # change the outputs, not the weights


def resolve_arch_kwargs(arch: str, **arch_kwargs: Any) -> dict[str, Any]:
    """Preset defaults of ``arch`` overridden by ``arch_kwargs`` (what a checkpoint stores)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown 3D encoder {arch!r}; available: {', '.join(list_encoders3d())}")
    unknown = set(arch_kwargs) - _ARCH_FIELDS
    if unknown:
        raise TypeError(f"unknown arch_kwargs for {arch}: {sorted(unknown)}")
    merged = {**ARCHS[arch], "norm": "instance", **arch_kwargs}
    # lists, not tuples: survives a JSON round trip unchanged
    return {k: ([list(v) if isinstance(v, (list, tuple)) else v for v in val] if k == "strides"
                else list(val) if isinstance(val, (list, tuple)) else val) for k, val in merged.items()}


def build_encoder3d(arch: str, in_chans: int = 1, **arch_kwargs: Any) -> Encoder3D:
    """Build the 3D encoder named ``arch`` (``cemnet3d_*``), overriding preset fields.

    ``build_encoder3d(meta["arch"], meta["in_chans"], **meta["arch_kwargs"])`` rebuilds the
    exact encoder of a checkpoint, so its ``backbone.*`` weights load with ``strict=True``.
    ``features_only`` and ``out_indices`` are accepted as in ``timm.create_model``.
    """
    view = {k: arch_kwargs.pop(k) for k in list(arch_kwargs) if k in _VIEW_FIELDS}
    return Encoder3D(in_chans=in_chans, **resolve_arch_kwargs(arch, **arch_kwargs), **view)
