"""Metadata that travels with exported encoder weights.

Safetensors metadata is a flat ``str -> str`` mapping, so every field is stored JSON-encoded under
its own key (``"arch": "\\"resnet50\\""``, ``"in_chans": "1"``): any tool that lists the header
shows the fields, and types survive the round trip. ``"format": "pt"`` is the plain-string
convention timm and Hugging Face use to mark PyTorch tensors; it is not JSON.

Nothing here imports torch, so the ``cemnet weights`` CLI stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Bumped when the meaning of a field changes; readers accept unknown extra keys.
META_VERSION = "1"
# Marker key: a safetensors file carrying it was written by cemnet.
MARKER_KEY = "cemnet_meta_version"

# Checkpoint layouts cemnet.weights.convert reads, by the name it reports (EncoderMeta.source_format).
FORMATS: dict[str, str] = {
    "cemnet-safetensors": "cemnet export: .safetensors with cemnet metadata (cemnet export / weights publish)",
    "cemnet-lightning": "cemnet pretraining checkpoint (Lightning; encoder under 'backbone.', checkpoint['cemnet'] block)",
    "lightning-backbone": "Lightning checkpoint with the encoder under 'backbone.' but no cemnet block",
    "mocov2": "MoCo v1/v2 checkpoint (facebookresearch/moco layout: encoder_q/encoder_k/queue), e.g. CEM500K MoCoV2",
    "swav": "SwAV checkpoint (facebookresearch/swav layout: projection_head/prototypes), e.g. CEM1.5M SwAV",
    "state-dict": "plain torchvision/timm state dict, bare or under 'state_dict'/'model' (classifier dropped)",
}


def as_channel_list(value: float | Sequence[float] | None, in_chans: int) -> list[float] | None:
    """Per-channel list of ``in_chans`` floats from a scalar, a 1-list or a full list.

    Checkpoints store normalisation as a bare float (CEM500K ``norms``), a one-element list, or
    one value per channel; consumers want one value per channel.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)] * in_chans
    values = [float(v) for v in value]
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    raise ValueError(f"expected 1 or {in_chans} normalisation values, got {len(values)}: {values}")


@dataclass
class EncoderMeta:
    """What a consumer needs to rebuild and feed an encoder.

    ``mean``/``std`` are on the [0, 1] intensity scale (image / 255), one value per input
    channel, or ``None`` when the source did not record them.
    """

    arch: str
    in_chans: int = 1
    mean: list[float] | None = None
    std: list[float] | None = None
    method: str | None = None
    corpus_fingerprint: str | None = None
    epochs: int | None = None
    global_step: int | None = None
    spatial_dims: int = 2
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    source_format: str | None = None
    license: str | None = None
    citation: str | None = None

    def __post_init__(self) -> None:
        self.in_chans = int(self.in_chans)
        self.mean = as_channel_list(self.mean, self.in_chans)
        self.std = as_channel_list(self.std, self.in_chans)
        self.arch_kwargs = dict(self.arch_kwargs or {})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderMeta:
        """Build from a mapping, ignoring keys this version does not know (forward compatible)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_safetensors(self) -> dict[str, str]:
        """Flat ``str -> str`` header for :func:`safetensors.torch.save_file`."""
        header = {key: json.dumps(value) for key, value in self.to_dict().items()}
        header[MARKER_KEY] = META_VERSION
        header["format"] = "pt"
        return header

    @classmethod
    def from_safetensors(cls, header: Mapping[str, str] | None) -> EncoderMeta | None:
        """Inverse of :meth:`to_safetensors`; ``None`` for a file cemnet did not write."""
        if not header or MARKER_KEY not in header:
            return None
        known = {f.name for f in fields(cls)}
        return cls.from_dict({k: json.loads(v) for k, v in header.items() if k in known})
