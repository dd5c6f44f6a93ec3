"""weights: pretrained encoders out of runs and into downstream models.

Export clean encoder weights (:func:`export_encoder`), convert published checkpoints
(:func:`read_weights`), load them anywhere as timm models (:func:`load_encoder`,
:func:`encoder_state_dict`) or U-Nets (:func:`load_unet`), and download/publish them through a sha256-verified registry
(:func:`fetch`, :func:`publish`). See docs/weights.md.

Names are resolved lazily so that ``import cemnet.weights`` (and the ``cemnet weights`` CLI)
does not import torch.
"""

from __future__ import annotations

from cemnet._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "EncoderMeta": "cemnet.weights.meta",
    "EncoderWeights": "cemnet.weights.convert",
    "FORMATS": "cemnet.weights.meta",
    "read_weights": "cemnet.weights.convert",
    "convert_checkpoint": "cemnet.weights.convert",
    "detect_format": "cemnet.weights.convert",
    "export_encoder": "cemnet.weights.export",
    "save_encoder": "cemnet.weights.export",
    "load_encoder": "cemnet.weights.load",
    "encoder_state_dict": "cemnet.weights.load",
    "resolve_weights": "cemnet.weights.load",
    "load_unet": "cemnet.weights.load",
    "create_encoder": "cemnet.weights.build",
    "adapt_first_conv": "cemnet.weights.build",
    "IncompatibleWeightsError": "cemnet.weights.build",
    "WeightsEntry": "cemnet.weights.registry",
    "load_registry": "cemnet.weights.registry",
    "fetch": "cemnet.weights.download",
    "download_url": "cemnet.weights.download",
    "default_cache_dir": "cemnet.weights.download",
    "DownloadError": "cemnet.weights.download",
    "ChecksumError": "cemnet.weights.download",
    "UnverifiedError": "cemnet.weights.download",
    "publish": "cemnet.weights.publish",
}

__getattr__, __all__ = lazy_exports("cemnet.weights", _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
