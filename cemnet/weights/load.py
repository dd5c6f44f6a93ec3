"""``cemnet.load_encoder``: any supported weights -> a timm model; :func:`load_unet`: -> a U-Net on it.

``name_or_path`` is a file or run folder (any format in :data:`cemnet.weights.convert.FORMATS`,
auto-converted) or the name of a registry entry (downloaded once, sha256-verified, cached; see
:mod:`cemnet.weights.download`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cemnet.models.unet import UNet
from cemnet.weights.build import adapted, check_state_dict, create_encoder
from cemnet.weights.convert import EncoderWeights, read_weights
from cemnet.weights.decoder import decoder_path, load_decoder
from cemnet.weights.download import fetch
from cemnet.weights.meta import EncoderMeta, as_channel_list
from cemnet.weights.registry import WeightsEntry, load_registry

log = logging.getLogger(__name__)

PathOrName = str | Path
Registries = Sequence[str | Path] | str | Path | None


def _with_entry_defaults(weights: EncoderWeights, entry: WeightsEntry) -> EncoderWeights:
    # The file is authoritative; the registry only fills what the file does not record.
    meta = weights.meta
    fill = {
        "mean": meta.mean or as_channel_list(entry.mean, meta.in_chans),
        "std": meta.std or as_channel_list(entry.std, meta.in_chans),
        "method": meta.method or entry.method,
        "license": meta.license or entry.license,
        "citation": meta.citation or entry.citation,
    }
    weights.meta = EncoderMeta.from_dict({**meta.to_dict(), **fill})
    return weights


def resolve_weights(
    name_or_path: PathOrName,
    *,
    arch: str | None = None,
    registry: Registries = None,
    cache_dir: str | Path | None = None,
    trust_unverified: bool = False,
    sha256: str | None = None,
    progress: bool = True,
) -> EncoderWeights:
    """Converted, checked :class:`EncoderWeights` for a path or a registry name."""
    path = Path(name_or_path)
    if path.exists():
        return read_weights(path, arch=arch)
    entries = load_registry(registry)
    name = str(name_or_path)
    if name not in entries:
        raise FileNotFoundError(
            f"{name!r} is neither an existing file/run folder nor a registered weights name "
            f"(registered: {', '.join(sorted(entries)) or 'none'})"
        )
    entry = entries[name]
    local = fetch(entry, cache_dir=cache_dir, trust_unverified=trust_unverified, sha256=sha256, progress=progress)
    return _with_entry_defaults(read_weights(local, arch=arch or entry.arch), entry)


def load_encoder(
    name_or_path: PathOrName,
    features_only: bool = False,
    in_chans: int | None = None,
    out_indices: Sequence[int] | None = None,
    *,
    arch: str | None = None,
    registry: Registries = None,
    cache_dir: str | Path | None = None,
    trust_unverified: bool = False,
    sha256: str | None = None,
    progress: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model holding pretrained encoder weights from anywhere cemnet can read.

    Args:
        name_or_path: a ``cemnet export`` .safetensors, a run folder or ``.ckpt``, a foreign
            checkpoint (CEM500K MoCoV2, CEM1.5M SwAV, torchvision/timm state dict; converted on
            the fly), or a registry name (``cemnet weights list``).
        features_only: return timm's ``features_only`` wrapper (multi-scale feature maps).
        in_chans: input channels wanted; the first convolution is adapted like timm does
            (summed to 1 channel; repeated and scaled ``base/in_chans`` otherwise), and mean/std
            follow. ``None`` keeps the channels the weights were trained with.
        out_indices: feature levels for ``features_only``.
        arch: timm name for checkpoints that do not record it (non-ResNet state dicts).
        registry: extra registry files (merged over the built-in one and ``$CEMNET_REGISTRY``).
        cache_dir, trust_unverified, sha256, progress: download options, see
            :func:`cemnet.weights.download.fetch`.
        **timm_kwargs: passed to ``timm.create_model`` (``num_classes``, ``drop_path_rate``...).

    The model's ``pretrained_cfg`` carries the weights' mean/std (so
    ``timm.data.resolve_data_config(model=model)`` normalises correctly) and ``model.cemnet_meta``
    the full :class:`~cemnet.weights.meta.EncoderMeta`.
    """
    weights = resolve_weights(
        name_or_path,
        arch=arch,
        registry=registry,
        cache_dir=cache_dir,
        trust_unverified=trust_unverified,
        sha256=sha256,
        progress=progress,
    )
    return create_encoder(
        weights.meta, weights.state_dict, in_chans=in_chans, features_only=features_only, out_indices=out_indices, **timm_kwargs
    )


def encoder_state_dict(name_or_path: PathOrName, in_chans: int | None = None, **resolve_kwargs: Any) -> dict[str, torch.Tensor]:
    """timm-named encoder tensors (first conv adapted to ``in_chans``) for other libraries.

    segmentation_models_pytorch's ResNet encoders use the same names as timm/torchvision ResNets
    minus ``fc``, so ``smp_model.encoder.load_state_dict(encoder_state_dict(path, in_chans=1))``
    loads strictly. ``resolve_kwargs`` are those of :func:`resolve_weights`.
    """
    weights = resolve_weights(name_or_path, **resolve_kwargs)
    check_state_dict(weights.state_dict, weights.meta)
    return adapted(weights.meta, weights.state_dict, in_chans)[1]


def load_unet(
    name_or_path: PathOrName,
    num_classes: int = 1,
    *,
    in_chans: int | None = None,
    out_indices: Sequence[int] | None = None,
    base_width: int = 256,
    min_width: int = 16,
    decoder: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> UNet:
    """A :class:`cemnet.models.unet.UNet` on pretrained encoder weights (and, if asked, decoder weights).

    Args:
        name_or_path, in_chans, out_indices, **load_kwargs: the encoder, as for
            :func:`load_encoder` (loaded with ``features_only=True``).
        num_classes, base_width, min_width: as for :class:`~cemnet.models.unet.UNet`.
        decoder: pretrained decoder weights (an MGMR decoder file written by ``cemnet export``,
            see :mod:`cemnet.weights.decoder`), or ``"auto"``: the companion file of a
            ``name_or_path`` export when there is one. Tensors are copied where name and shape
            match; the U-Net's ``decoder_report`` says which (``None`` when nothing was loaded).
    """
    encoder = load_encoder(name_or_path, features_only=True, in_chans=in_chans, out_indices=out_indices, **load_kwargs)
    unet = UNet(encoder, num_classes, base_width=base_width, min_width=min_width)
    if decoder is None:
        return unet
    if str(decoder) == "auto":
        decoder = decoder_path(name_or_path)
        if not decoder.is_file():  # a MoCoV2 export or a registry name: no companion decoder
            return unet
    unet.decoder_report = load_decoder(unet.decoder, decoder)
    log.info("%s", unet.decoder_report.describe())
    return unet
