"""Turn the encoder checkpoints users have on disk into clean timm-keyed weights.

:func:`read_weights` auto-detects the layout (see :data:`~cemnet.weights.meta.FORMATS`), keeps
the encoder, drops the documented extras (momentum encoders, projection/prediction heads,
prototypes, queues, classifiers) and checks that every remaining tensor lands in the timm
architecture: nothing missing, nothing unexpected, every shape equal. The result says which format it saw and what it
dropped, so a surprising checkpoint is visible instead of silently half-loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cemnet.weights.build import check_state_dict, classifier_keys, first_conv_key, is_known_arch, reference_shapes
from cemnet.weights.checkpoint_io import CheckpointError, find_checkpoint, load_checkpoint, weights_file_kind
from cemnet.weights.keys import clean_keys, drop_prefixes, split_prefix, summarize
from cemnet.weights.meta import FORMATS, EncoderMeta

__all__ = ["FORMATS", "EncoderWeights", "convert_checkpoint", "detect_format", "read_safetensors", "read_weights"]

# (block type, blocks per stage, width of layer1.0.conv1) -> timm name; timm's resnets use the
# torchvision parameter names, so a torchvision state dict loads unchanged.
_RESNETS: dict[tuple[str, tuple[int, ...], int], str] = {
    ("basic", (2, 2, 2, 2), 64): "resnet18",
    ("basic", (3, 4, 6, 3), 64): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 64): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 64): "resnet101",
    ("bottleneck", (3, 8, 36, 3), 64): "resnet152",
    ("bottleneck", (3, 4, 6, 3), 128): "wide_resnet50_2",
    ("bottleneck", (3, 4, 23, 3), 128): "wide_resnet101_2",
}


@dataclass
class EncoderWeights:
    """Encoder tensors with timm key names plus what is known about them."""

    state_dict: dict[str, torch.Tensor]
    meta: EncoderMeta
    source_format: str
    dropped: dict[str, int] = field(default_factory=dict)  # drop rule / prefix -> tensors dropped
    source: Path | None = None

    def describe(self) -> str:
        """One line for logs and the CLI: format, arch, what was kept and dropped."""
        dropped = ", ".join(f"{k} ({n})" for k, n in self.dropped.items()) or "nothing"
        return (
            f"{self.source_format}: {self.meta.arch}, in_chans={self.meta.in_chans}, "
            f"{len(self.state_dict)} tensors kept; dropped {dropped}"
        )


class UnknownArchitectureError(ValueError):
    """The checkpoint does not say its architecture and it cannot be inferred."""


def infer_resnet_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """timm name of a torchvision-layout ResNet state dict, or ``None`` if it is not one."""
    if "conv1.weight" not in state_dict or "layer1.0.conv1.weight" not in state_dict:
        return None
    block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    depths = []
    for stage in range(1, 5):
        found = {int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        depths.append(max(found) + 1 if found else 0)
    width = int(state_dict["layer1.0.conv1.weight"].shape[0])
    return _RESNETS.get((block, tuple(depths), width))


def _inner_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint dict (``state_dict``, ``model`` or the dict itself)."""
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise CheckpointError(f"no state dict found (top-level keys: {sorted(obj)[:12]})")


def detect_format(obj: Any) -> str:
    """Name (a key of :data:`FORMATS`) of the layout of a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a checkpoint dict, got {type(obj).__name__}")
    if isinstance(obj.get("cemnet"), Mapping) and "state_dict" in obj:
        return "cemnet-lightning"
    tops = set(summarize(clean_keys(_inner_state_dict(obj))))
    if "encoder_q" in tops:
        return "mocov2"
    if "backbone" in tops:  # before swav: Lightning SSL modules have projection heads too
        return "lightning-backbone"
    if tops & {"prototypes", "projection_head"}:
        return "swav"
    return "state-dict"


def _floats(value: Any) -> float | list[float]:
    # numpy scalars and 0-d tensors become plain floats (JSON-serialisable metadata)
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


def _norms(obj: Mapping[str, Any]) -> tuple[Any, Any]:
    # CEM500K/CEM1.5M releases store norms = [mean, std] (floats or per-channel lists), the
    # statistics of their training corpus on the [0, 1] scale.
    norms = obj.get("norms")
    if isinstance(norms, (list, tuple)) and len(norms) == 2:
        return _floats(norms[0]), _floats(norms[1])
    return None, None


def _finish(
    fmt: str,
    state_dict: dict[str, torch.Tensor],
    dropped: dict[str, int],
    info: Mapping[str, Any],
    arch: str | None,
) -> EncoderWeights:
    """Common tail of every converter: name the arch, drop a classifier, check every tensor lands."""
    recorded = info.get("arch")
    # A recorded name timm does not know (e.g. a custom class name) is no better than none.
    arch = arch or (recorded if recorded and is_known_arch(recorded) else None) or infer_resnet_arch(state_dict)
    if not arch:
        raise UnknownArchitectureError(
            f"{fmt} checkpoint does not name its architecture and it is not a torchvision-layout "
            "ResNet; pass arch=<timm model name> (CLI: --arch)"
        )
    probe = EncoderMeta.from_dict({"spatial_dims": 2, **info, "arch": arch})
    in_chans = int(state_dict[first_conv_key(probe, state_dict)].shape[1])
    meta = EncoderMeta.from_dict({**probe.to_dict(), "in_chans": info.get("in_chans", in_chans), "source_format": fmt})
    for prefix in sorted({k.rsplit(".", 1)[0] for k in classifier_keys(meta)}):
        state_dict, head = drop_prefixes(state_dict, [prefix])
        if head:
            dropped = {**dropped, f"{prefix} (classifier)": len(head)}
    # Checkpoints written before PyTorch 0.4.1 lack BatchNorm's step counter; it is unused in
    # eval and by momentum-based BN, so a zero is the faithful value.
    for key, shape in _missing_counters(state_dict, meta).items():
        state_dict[key] = torch.zeros(shape, dtype=torch.long)
    check_state_dict(state_dict, meta)
    return EncoderWeights(state_dict=state_dict, meta=meta, source_format=fmt, dropped=dropped)


def _missing_counters(state_dict: Mapping[str, torch.Tensor], meta: EncoderMeta) -> dict[str, tuple[int, ...]]:
    if any(k.endswith("num_batches_tracked") for k in state_dict):
        return {}
    return {k: s for k, s in reference_shapes(meta).items() if k.endswith("num_batches_tracked") and k not in state_dict}


def _from_cemnet_lightning(obj: Mapping[str, Any], arch: str | None) -> EncoderWeights:
    info = dict(obj["cemnet"])
    info.setdefault("epochs", obj.get("epoch"))
    info.setdefault("global_step", obj.get("global_step"))
    backbone, rest = split_prefix(obj["state_dict"], "backbone")
    return _finish("cemnet-lightning", backbone, summarize(rest), info, arch)


def _from_lightning_backbone(obj: Mapping[str, Any], arch: str | None) -> EncoderWeights:
    backbone, rest = split_prefix(_inner_state_dict(obj), "backbone")
    info = {"epochs": obj.get("epoch"), "global_step": obj.get("global_step")}
    return _finish("lightning-backbone", backbone, summarize(rest), info, arch)


def _from_mocov2(obj: Mapping[str, Any], arch: str | None) -> EncoderWeights:
    encoder, rest = split_prefix(_inner_state_dict(obj), "encoder_q")
    encoder, mlp = drop_prefixes(encoder, ["fc"])  # fc is MoCo v2's projection MLP, not the backbone
    mean, std = _norms(obj)
    info = {"arch": obj.get("arch"), "mean": mean, "std": std, "method": "mocov2", "epochs": obj.get("epoch")}
    dropped = {**({"encoder_q.fc (projection MLP)": len(mlp)} if mlp else {}), **summarize(rest)}
    return _finish("mocov2", encoder, dropped, info, arch)


def _from_swav(obj: Mapping[str, Any], arch: str | None) -> EncoderWeights:
    encoder, heads = drop_prefixes(clean_keys(_inner_state_dict(obj)), ["projection_head", "prototypes"])
    mean, std = _norms(obj)
    info = {"arch": obj.get("arch"), "mean": mean, "std": std, "method": "swav", "epochs": obj.get("epoch")}
    return _finish("swav", encoder, summarize(heads), info, arch)


def _from_state_dict(obj: Mapping[str, Any], arch: str | None) -> EncoderWeights:
    mean, std = _norms(obj)
    info = {"arch": obj.get("arch") if isinstance(obj.get("arch"), str) else None, "mean": mean, "std": std}
    return _finish("state-dict", clean_keys(_inner_state_dict(obj)), {}, info, arch)


_CONVERTERS: dict[str, Callable[[Mapping[str, Any], str | None], EncoderWeights]] = {
    "cemnet-lightning": _from_cemnet_lightning,
    "lightning-backbone": _from_lightning_backbone,
    "mocov2": _from_mocov2,
    "swav": _from_swav,
    "state-dict": _from_state_dict,
}


def convert_checkpoint(obj: Any, arch: str | None = None) -> EncoderWeights:
    """Convert an already loaded checkpoint object (auto-detected layout)."""
    fmt = detect_format(obj)
    return _CONVERTERS[fmt](obj, arch)


def read_safetensors(path: str | Path, arch: str | None = None) -> EncoderWeights:
    """A cemnet export, or a bare timm/HF ``model.safetensors`` (then treated as a state dict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if weights_file_kind(path) != "safetensors":
        raise CheckpointError(f"{path}: a torch.save checkpoint, not .safetensors (convert it with 'cemnet export')")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    state_dict = load_file(str(path))
    meta = EncoderMeta.from_safetensors(header)
    if meta is None:
        return _from_state_dict(state_dict, arch)
    if arch and arch != meta.arch:
        raise ValueError(f"{path} holds {meta.arch!r} weights, not {arch!r}")
    check_state_dict(state_dict, meta)
    return EncoderWeights(state_dict=state_dict, meta=meta, source_format="cemnet-safetensors")


def read_weights(path: str | Path, arch: str | None = None) -> EncoderWeights:
    """Encoder weights from any supported file or run folder (see :data:`FORMATS`).

    ``arch`` names the timm architecture for checkpoints that do not record it (non-ResNet state
    dicts); ResNets are recognised from their block structure.
    """
    path = find_checkpoint(path)
    if path.suffix == ".safetensors":
        weights = read_safetensors(path, arch)
    else:
        weights = convert_checkpoint(load_checkpoint(path), arch)
    weights.source = path
    return weights
