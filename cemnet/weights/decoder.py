"""MGMR decoder transfer: export a pretraining decoder and load it into the segmentation U-Net.

SegNeuron fine-tunes the whole pretrained network, decoder included. ``cemnet export`` keeps the
encoder file exactly timm's tensors, so the decoder goes to a **companion file** next to it:
``encoder.safetensors`` -> ``encoder.decoder.safetensors``, holding the ``pixel_decoder.*``
tensors of the checkpoint without the prefix (the key names of
:class:`cemnet.models.decoders.ReconDecoder`) and, in its header, the decoder's settings
(``base_width``, ``use_skips``, ``activation``, ``source``).

:func:`load_decoder` copies every tensor whose name and shape match into a U-Net's decoder and
reports the rest. The U-Net decoder has skip connections; all its tensors match only when the
pretraining decoder had them too (``decoder_skips: true``) with the same ``decoder_width`` =
U-Net ``base_width``, and, for the 1x1 head, one output class.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from cemnet.weights.checkpoint_io import find_checkpoint, load_checkpoint
from cemnet.weights.keys import split_prefix

__all__ = ["DecoderLoadReport", "decoder_path", "export_decoder", "load_decoder", "read_decoder"]

DECODER_PREFIX = "pixel_decoder"
_HPARAMS = {"decoder_width": "base_width", "decoder_skips": "use_skips", "head_activation": "activation"}


def decoder_path(encoder_file: str | os.PathLike) -> Path:
    """The companion decoder file of an encoder export (``x.safetensors`` -> ``x.decoder.safetensors``)."""
    p = Path(encoder_file)
    return p.with_name(p.name.removesuffix(".safetensors") + ".decoder.safetensors")


def export_decoder(run_or_ckpt: str | os.PathLike, out: str | os.PathLike) -> Path | None:
    """Write the MGMR pixel decoder of a run folder or checkpoint to ``out`` (atomically).

    Returns ``out``, or ``None`` when the checkpoint holds no ``pixel_decoder`` (MoCoV2,
    foreign checkpoints): nothing is written then.
    """
    from safetensors.torch import save_file

    path = find_checkpoint(run_or_ckpt)
    if path.suffix == ".safetensors":
        return None
    obj = load_checkpoint(path)
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        return None
    tensors, _ = split_prefix(state, DECODER_PREFIX)
    if not tensors:
        return None
    hparams = obj.get("hyper_parameters") or {}
    meta = {new: json.dumps(hparams[old]) for old, new in _HPARAMS.items() if old in hparams}
    meta["source"] = json.dumps(str(path))
    meta["decoder"] = json.dumps(DECODER_PREFIX)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out


def read_decoder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(tensors, settings) of a decoder file written by :func:`export_decoder`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: decoder file not found (cemnet export writes it next to the encoder "
                                "for MGMR checkpoints)")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    return load_file(str(path)), {k: json.loads(v) for k, v in header.items()}


@dataclasses.dataclass
class DecoderLoadReport:
    """What :func:`load_decoder` copied (``loaded``) and left at its initialisation (``skipped``:
    name -> reason)."""

    source: Path
    loaded: list[str]
    skipped: dict[str, str]

    def describe(self) -> str:
        first = "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:3])
        return (f"decoder {self.source}: {len(self.loaded)} tensors loaded, {len(self.skipped)} kept at "
                f"initialisation{' (' + first + (', ...' if len(self.skipped) > 3 else '') + ')' if self.skipped else ''}")


@torch.no_grad()
def load_decoder(decoder: nn.Module, path: str | os.PathLike) -> DecoderLoadReport:
    """Copy the tensors of decoder file ``path`` into ``decoder`` where name and shape match."""
    tensors, _ = read_decoder(path)
    own = decoder.state_dict()
    loaded, skipped = [], {}
    for name, target in own.items():
        src = tensors.get(name)
        if src is None:
            skipped[name] = "not in the file"
        elif tuple(src.shape) != tuple(target.shape):
            skipped[name] = f"shape {tuple(src.shape)} != {tuple(target.shape)}"
        else:
            target.copy_(src.to(dtype=target.dtype))
            loaded.append(name)
    for name in tensors.keys() - own.keys():
        skipped[name] = "not in this decoder"
    return DecoderLoadReport(Path(path), loaded, skipped)
