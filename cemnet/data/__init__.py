"""Pretraining data: corpus datamodule, EM augmentations, DDP-aware samplers.

Exports resolve lazily, so importing one submodule (e.g. ``cemnet.data.subvolumes``) does not pull
in the others.
"""

from __future__ import annotations

from cemnet._lazy import lazy_exports

_EXPORTS = {
    "AugmentConfig": "cemnet.data.augment",
    "EMAugment": "cemnet.data.augment",
    "ArrayCorpus": "cemnet.data.datamodule",
    "EMPatchDataModule": "cemnet.data.datamodule",
    "PatchViewsDataset": "cemnet.data.datamodule",
    "load_corpus": "cemnet.data.datamodule",
    "EpochSampler": "cemnet.data.sampling",
    "DataStats": "cemnet.data.stats",
}

__getattr__, __all__ = lazy_exports("cemnet.data", _EXPORTS)
