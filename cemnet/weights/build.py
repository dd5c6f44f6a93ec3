"""Build encoders from :class:`~cemnet.weights.meta.EncoderMeta` and check weights against them.

2D encoders are timm models; 3D ones (``cemnet3d_*``) come from
``cemnet.models.encoder3d.build_encoder3d``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cemnet.models.encoder3d import build_encoder3d
from cemnet.weights.meta import EncoderMeta

ARCH3D_PREFIX = "cemnet3d_"
_SHOW = 8  # keys listed per category in error messages; the count is always given


class IncompatibleWeightsError(ValueError):
    """The tensors do not fit the architecture (missing, unexpected or mis-shaped keys)."""


def is_3d(meta: EncoderMeta) -> bool:
    return meta.spatial_dims == 3 or meta.arch.startswith(ARCH3D_PREFIX)


def is_known_arch(name: str) -> bool:
    """A timm model name, or a cemnet 3D architecture name."""
    import timm

    return name.startswith(ARCH3D_PREFIX) or timm.is_model(name)


def build_bare(meta: EncoderMeta, in_chans: int | None = None, **kwargs: Any) -> nn.Module:
    """Randomly initialised encoder of ``meta.arch`` without classifier (``num_classes=0``)."""
    in_chans = in_chans or meta.in_chans
    if is_3d(meta):
        return build_encoder3d(meta.arch, in_chans=in_chans, **{**meta.arch_kwargs, **kwargs})
    import timm

    return timm.create_model(meta.arch, pretrained=False, in_chans=in_chans, **{"num_classes": 0, **meta.arch_kwargs, **kwargs})


def _on_meta_device(meta: EncoderMeta, **kwargs: Any) -> nn.Module:
    # Shapes only: the meta device allocates nothing, so checking a ResNet50 costs milliseconds.
    try:
        with torch.device("meta"):
            return build_bare(meta, **kwargs)
    except Exception:  # some constructors compute buffers eagerly; fall back to real memory
        return build_bare(meta, **kwargs)


def reference_shapes(meta: EncoderMeta) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict ``meta.arch`` expects (no classifier)."""
    return {k: tuple(v.shape) for k, v in _on_meta_device(meta).state_dict().items()}


def classifier_keys(meta: EncoderMeta) -> set[str]:
    """Keys a classification head adds to ``meta.arch`` (e.g. ``fc.weight``, ``head.fc.bias``).

    Found as the difference between the model with its default head and with ``num_classes=0``,
    so it needs no per-architecture table. Empty for 3D encoders (they have no classifier).
    """
    if is_3d(meta):
        return set()
    with_head = _on_meta_device(meta, num_classes=1000).state_dict()
    return set(with_head) - set(reference_shapes(meta))


def check_state_dict(state_dict: Mapping[str, torch.Tensor], meta: EncoderMeta) -> None:
    """Raise :class:`IncompatibleWeightsError` unless every tensor lands in ``meta.arch`` exactly."""
    ref = reference_shapes(meta)
    missing = sorted(set(ref) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ref))
    mismatched = sorted(
        f"{k}: {tuple(state_dict[k].shape)} vs {ref[k]}"
        for k in set(ref) & set(state_dict)
        if tuple(state_dict[k].shape) != ref[k]
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                more = f", ... (+{len(items) - _SHOW})" if len(items) > _SHOW else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
        raise IncompatibleWeightsError(
            f"weights do not fit {meta.arch!r} (in_chans={meta.in_chans}): " + "; ".join(parts)
        )


def first_conv_key(meta: EncoderMeta, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name of the input convolution's weight in ``state_dict``.

    timm declares it (``pretrained_cfg['first_conv']``); otherwise (3D encoders) it is the first
    conv-shaped weight in the model's registration order (not the state dict's: safetensors
    files come back sorted by name), which is the stem of every feed-forward encoder.
    """
    reference = _on_meta_device(meta)
    if not is_3d(meta):
        declared = reference.pretrained_cfg.get("first_conv")
        for name in [declared] if isinstance(declared, str) else list(declared or []):
            if f"{name}.weight" in state_dict:
                return f"{name}.weight"
    ndim = meta.spatial_dims + 2
    for key, value in reference.state_dict().items():
        if key.endswith("weight") and value.ndim == ndim and key in state_dict:
            return key
    raise IncompatibleWeightsError(f"no {ndim}-D input convolution weight found for {meta.arch!r}")


def adapt_first_conv(weight: torch.Tensor, in_chans: int, base_chans: int | None = None) -> torch.Tensor:
    """Adapt an input-conv weight to ``in_chans`` channels the way timm does.

    2D weights go through :func:`timm.models.adapt_input_conv` (sum for 1 channel; otherwise
    repeat and scale by ``base/in_chans``, so a grey image copied to every channel gives the
    same activations). The same rule is applied to 3D (5-D) weights, which timm does not handle.
    """
    base = int(weight.shape[1] if base_chans is None else base_chans)
    if in_chans == base:
        return weight
    if weight.ndim == 4:
        from timm.models import adapt_input_conv

        return adapt_input_conv(in_chans, weight, base_chans=base)
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        reps = math.ceil(in_chans / base)
        w = w.repeat(1, reps, *([1] * (w.ndim - 2)))[:, :in_chans] * (base / in_chans)
    return w.to(weight.dtype)


def adapt_norm(values: Sequence[float] | None, in_chans: int) -> list[float] | None:
    """Per-channel mean/std for ``in_chans`` inputs, following the first-conv adaptation.

    Repeated cyclically like the conv weights; averaged when collapsing to one channel (exact
    when the source channels share one value, as for grey EM replicated to RGB).
    """
    if values is None or len(values) == in_chans:
        return None if values is None else list(values)
    if in_chans == 1:
        return [sum(values) / len(values)]
    return [values[i % len(values)] for i in range(in_chans)]


def adapted(meta: EncoderMeta, state_dict: Mapping[str, torch.Tensor], in_chans: int | None) -> tuple[EncoderMeta, dict[str, torch.Tensor]]:
    """(meta, state_dict) for ``in_chans`` inputs; unchanged when the channel count matches."""
    sd = dict(state_dict)
    if in_chans is None or in_chans == meta.in_chans:
        return meta, sd
    key = first_conv_key(meta, sd)
    sd[key] = adapt_first_conv(sd[key], in_chans, base_chans=meta.in_chans)
    new = EncoderMeta.from_dict(
        {**meta.to_dict(), "in_chans": in_chans, "mean": adapt_norm(meta.mean, in_chans), "std": adapt_norm(meta.std, in_chans)}
    )
    return new, sd


def _timm_overlay(meta: EncoderMeta, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``pretrained_cfg_overlay`` that makes timm load ``state_dict`` as the model's weights."""
    from timm.models import get_pretrained_cfg

    default = get_pretrained_cfg(meta.arch)
    size = tuple(default.input_size[1:]) if default is not None else (224, 224)
    overlay: dict[str, Any] = {
        "state_dict": state_dict,
        "num_classes": 0,  # equal to the model's: timm then loads strictly
        "input_size": (meta.in_chans, *size),
        # The registry config describes timm's own (ImageNet) weights; none of its provenance
        # applies to ours, and a stale URL/licence would mislead whoever inspects the model.
        **dict.fromkeys(("url", "hf_hub_id", "hf_hub_filename", "tag", "origin_url", "paper_name", "paper_ids", "notes"), None),
        "test_input_size": None,
        "label_names": None,
        "license": meta.license,
        "description": f"cemnet {meta.method or 'pretrained'} encoder ({meta.source_format or 'unknown format'})",
    }
    if meta.mean is not None and meta.std is not None:
        overlay.update(mean=tuple(meta.mean), std=tuple(meta.std))
        return overlay
    warnings.warn(
        f"{meta.arch} weights ({meta.source_format}) record no input mean/std; the model's "
        "pretrained_cfg keeps timm's defaults. Normalise with your own data's statistics.",
        stacklevel=4,
    )
    if default is not None:  # keep timm's values, but one per input channel
        overlay.update(mean=tuple(adapt_norm(default.mean, meta.in_chans)), std=tuple(adapt_norm(default.std, meta.in_chans)))
    return overlay


def create_encoder(
    meta: EncoderMeta,
    state_dict: Mapping[str, torch.Tensor],
    *,
    in_chans: int | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Model of ``meta.arch`` holding ``state_dict`` (checked with :func:`check_state_dict`).

    2D: weights go through timm's own pretrained-loading path (``pretrained_cfg_overlay`` with a
    ``state_dict``), so ``features_only``/``out_indices`` and every other ``timm.create_model``
    option behave as for timm's own weights, and the load is strict. The returned model's
    ``pretrained_cfg`` carries our mean/std (``timm.data.resolve_data_config`` picks them up) and
    ``model.cemnet_meta`` the :class:`EncoderMeta` for the (possibly adapted) input channels.
    3D: ``build_encoder3d`` then a strict ``load_state_dict``.
    """
    check_state_dict(state_dict, meta)
    meta, sd = adapted(meta, state_dict, in_chans)
    feature_kwargs: dict[str, Any] = {}
    if features_only:
        feature_kwargs["features_only"] = True
        if out_indices is not None:
            feature_kwargs["out_indices"] = tuple(out_indices)
    if is_3d(meta):
        model = build_encoder3d(meta.arch, in_chans=meta.in_chans, **{**meta.arch_kwargs, **feature_kwargs, **kwargs})
        model.load_state_dict(sd, strict=True)
    else:
        import timm

        model = timm.create_model(
            meta.arch,
            pretrained=True,
            pretrained_cfg_overlay=_timm_overlay(meta, sd),
            in_chans=meta.in_chans,
            **{"num_classes": 0, **meta.arch_kwargs, **feature_kwargs, **kwargs},
        )
        # The overlay holds a reference to every tensor; keep the config light and printable.
        model.pretrained_cfg.pop("state_dict", None)
    model.cemnet_meta = meta
    return model
