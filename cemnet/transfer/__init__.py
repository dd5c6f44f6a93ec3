"""transfer: pretrained encoders out of runs and into downstream models.

Export clean encoder weights (:func:`export_encoder`), convert published checkpoints
(:func:`read_weights`), load them anywhere as timm models (:func:`load_encoder`,
:func:`encoder_state_dict`), and download/publish them through a sha256-verified registry
(:func:`fetch`, :func:`publish`). See docs/transfer.md.

Names are resolved lazily so that ``import cemnet.transfer`` (and the ``cemnet weights`` CLI)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cemnet.transfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
