"""transfer: pretrained encoders out of runs and into downstream models.

Export clean encoder weights (:func:`export_encoder`), convert published checkpoints
(:func:`read_weights`), load them anywhere as timm models (:func:`load_encoder`,
:func:`encoder_state_dict`), and download/publish them through a sha256-verified registry
(:func:`fetch`, :func:`publish`). See docs/transfer.md.

Names are resolved lazily so that ``import cemnet.transfer`` (and the ``cemnet weights`` CLI)
does not import torch.
"""

from __future__ import annotations

from cemnet._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "EncoderMeta": "cemnet.transfer.meta",
    "EncoderWeights": "cemnet.transfer.convert",
    "FORMATS": "cemnet.transfer.meta",
    "read_weights": "cemnet.transfer.convert",
    "convert_checkpoint": "cemnet.transfer.convert",
    "detect_format": "cemnet.transfer.convert",
    "export_encoder": "cemnet.transfer.export",
    "save_encoder": "cemnet.transfer.export",
    "load_encoder": "cemnet.transfer.load",
    "encoder_state_dict": "cemnet.transfer.load",
    "resolve_weights": "cemnet.transfer.load",
    "create_encoder": "cemnet.transfer.build",
    "adapt_first_conv": "cemnet.transfer.build",
    "IncompatibleWeightsError": "cemnet.transfer.build",
    "WeightsEntry": "cemnet.transfer.registry",
    "load_registry": "cemnet.transfer.registry",
    "fetch": "cemnet.transfer.download",
    "download_url": "cemnet.transfer.download",
    "default_cache_dir": "cemnet.transfer.download",
    "DownloadError": "cemnet.transfer.download",
    "ChecksumError": "cemnet.transfer.download",
    "UnverifiedError": "cemnet.transfer.download",
    "publish": "cemnet.transfer.publish",
    "mmd2": "cemnet.transfer.mmd",
    "mmd2_test": "cemnet.transfer.mmd",
    "pairwise_mmd2": "cemnet.transfer.mmd",
    "select": "cemnet.transfer.active",
    "save_head": "cemnet.transfer.active",
    "load_head": "cemnet.transfer.active",
}

__getattr__, __all__ = lazy_exports("cemnet.transfer", _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
