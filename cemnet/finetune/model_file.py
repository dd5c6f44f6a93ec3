"""The fine-tuned model file: ONE self-describing ``.safetensors`` (weights + JSON metadata).

Layout: the network's ``state_dict`` as tensors, and under the safetensors metadata key
``cemnet_model`` a JSON :class:`ModelSpec` that says everything needed to rebuild the network
(without downloading anything) and to apply it correctly: task, classes and their label values,
architecture, input normalisation, 2D / 2.5D / 3D, the tile size and halo it wants, voxel size of
the training data, instance post-processing, encoder provenance, training data fingerprint and
validation scores.

``save_model`` writes atomically (temp file + rename): a file at the final path is complete.
``load_model(path)`` returns a plain ``torch.nn.Module`` in eval mode with the spec attached as
``module.cemnet_spec``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cemnet.models.encoder3d import build_encoder3d
from cemnet.models.unet import UNet
from cemnet.weights.checkpoint_io import give_usual_permissions, nonfinite_tensors

__all__ = ["ModelSpec", "ModelFileError", "save_model", "load_model", "read_spec", "build_network"]

FORMAT = "cemnet-model"
FORMAT_VERSION = 1
METADATA_KEY = "cemnet_model"

TASKS = ("semantic", "instance")
DIMS = ("2d", "2.5d", "3d")


class ModelFileError(ValueError):
    """A model file that cannot be read (not safetensors, no cemnet metadata, wrong tensors)."""


@dataclasses.dataclass
class ModelSpec:
    """Everything a saved model says about itself.

    Attributes:
        task: ``semantic`` (per-voxel classes) or ``instance`` (affinities + foreground ->
            watershed -> agglomeration).
        dims: ``2d`` (per slice), ``2.5d`` (``in_chans`` neighbouring slices as channels, centre
            slice predicted; the instance 2D mode uses 2: slices z-1 and z) or ``3d``.
        classes: semantic: one ``{"name": str, "value": int}`` per output class, in output order;
            ``value`` is the label value in the user's masks (background first). Binary models have
            two classes and ONE output channel (sigmoid = foreground probability). Instance models:
            ``[]``.
        arch: how to rebuild the network: ``{"kind": "unet", "encoder": timm or 3D encoder name,
            "encoder_kwargs": {...}, "spatial_dims": 2|3, "in_chans": int, "out_channels": int,
            "base_width": int, "min_width": int}``.
        output: ``sigmoid`` (binary or affinities), ``softmax`` (multi-class).
        norm: (mean, std) applied to the input after scaling uint8 to [0, 1]
            (``x = (img / 255 - mean) / std``).
        tile: input tile size the model wants, per spatial axis (2 axes for 2d/2.5d, 3 for 3d).
        halo: context cropped from each side of a tile's output when tiling, per spatial axis.
        voxel_size: (z, y, x) in nm of the training data, when known.
        postprocess: instance settings (``thresholds``, ``fg_threshold``, ``agglomeration``...) or
            semantic ones (``threshold`` for binary).
        encoder: provenance of the initial encoder: ``{"source": str, "sha256": str|None,
            "method": str|None, "arch": str, "frozen": str, ...}``.
        training: ``{"data_fingerprint": str, "iterations": int, "config": {...}, ...}``.
        scores: validation scores of the saved weights (``{"iou": ..., "step": ...}``).
        extra: anything else worth keeping (free form, JSON-serialisable).
    """

    task: str
    dims: str
    arch: dict[str, Any]
    output: str
    norm: tuple[float, float]
    tile: tuple[int, ...]
    halo: tuple[int, ...]
    classes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    voxel_size: tuple[float, float, float] | None = None
    postprocess: dict[str, Any] = dataclasses.field(default_factory=dict)
    encoder: dict[str, Any] = dataclasses.field(default_factory=dict)
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    scores: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"ModelSpec.task={self.task!r}: expected one of {TASKS}")
        if self.dims not in DIMS:
            raise ValueError(f"ModelSpec.dims={self.dims!r}: expected one of {DIMS}")
        if self.output not in ("sigmoid", "softmax"):
            raise ValueError(f"ModelSpec.output={self.output!r}: expected 'sigmoid' or 'softmax'")
        self.norm = (float(self.norm[0]), float(self.norm[1]))
        self.tile = tuple(int(v) for v in self.tile)
        self.halo = tuple(int(v) for v in self.halo)
        if self.voxel_size is not None:
            self.voxel_size = tuple(float(v) for v in self.voxel_size)  # type: ignore[assignment]
        spatial = 3 if self.dims == "3d" else 2
        if len(self.tile) != spatial or len(self.halo) != spatial:
            raise ValueError(f"ModelSpec: dims={self.dims} needs {spatial} tile/halo values, got {self.tile} / {self.halo}")

    @property
    def in_chans(self) -> int:
        return int(self.arch.get("in_chans", 1))

    @property
    def out_channels(self) -> int:
        return int(self.arch["out_channels"])

    @property
    def binary(self) -> bool:
        return self.task == "semantic" and self.output == "sigmoid"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def build_network(spec: ModelSpec) -> nn.Module:
    """The network described by ``spec.arch``, randomly initialised (no download)."""
    arch = dict(spec.arch)
    kind = arch.get("kind", "unet")
    if kind != "unet":
        raise ModelFileError(f"unknown network kind {kind!r} (this cemnet knows 'unet')")
    kwargs = dict(arch.get("encoder_kwargs") or {})
    in_chans = int(arch.get("in_chans", 1))
    if int(arch.get("spatial_dims", 2)) == 3:
        encoder = build_encoder3d(arch["encoder"], in_chans, features_only=True, **kwargs)
    else:
        import timm

        encoder = timm.create_model(arch["encoder"], pretrained=False, features_only=True, in_chans=in_chans, **kwargs)
    return UNet(encoder, int(arch["out_channels"]), base_width=int(arch.get("base_width", 256)),
                min_width=int(arch.get("min_width", 16)))


def save_model(model: nn.Module, spec: ModelSpec, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights and ``spec`` to ``path`` (atomically; parents created)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ModelFileError(f"{path}: refusing to save non-finite tensors ({', '.join(bad[:5])})")
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), METADATA_KEY: spec.to_json()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        give_usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_spec(path: str | os.PathLike) -> ModelSpec:
    """The :class:`ModelSpec` of a model file (reads the header only)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise ModelFileError(f"{path}: not a readable cemnet model file ({err})") from None
    if METADATA_KEY not in metadata:
        raise ModelFileError(
            f"{path}: a safetensors file without cemnet model metadata (an exported encoder? "
            "fine-tune one with 'cemnet finetune' first)"
        )
    try:
        return ModelSpec.from_dict(json.loads(metadata[METADATA_KEY]))
    except (ValueError, TypeError, KeyError) as err:
        raise ModelFileError(f"{path}: damaged model metadata ({err})") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The saved network as a plain torch module (eval mode), ``module.cemnet_spec`` = its spec."""
    from safetensors.torch import load_file

    spec = read_spec(path)
    model = build_network(spec)
    try:
        state = load_file(str(path), device=str(device))
    except Exception as err:
        raise ModelFileError(f"{path}: cannot read the weights ({err})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelFileError(f"{path}: weights do not match the recorded architecture ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    model.cemnet_spec = spec
    return model


def spatial_axes(spec: ModelSpec) -> Sequence[int]:
    """Number of spatial axes of one model input (2 for 2d/2.5d, 3 for 3d)."""
    return (0, 1, 2) if spec.dims == "3d" else (0, 1)
