"""Pretraining data: corpus datamodule, EM augmentations, DDP-aware samplers.

Exports resolve lazily, so importing one submodule (e.g. ``cemnet.data.subvolumes``) does not pull
in the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AugmentConfig": "cemnet.data.augment",
    "EMAugment": "cemnet.data.augment",
    "ArrayCorpus": "cemnet.data.datamodule",
    "EMPatchDataModule": "cemnet.data.datamodule",
    "PatchViewsDataset": "cemnet.data.datamodule",
    "load_corpus": "cemnet.data.datamodule",
    "EpochSampler": "cemnet.data.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cemnet.data' has no attribute {name!r}")
