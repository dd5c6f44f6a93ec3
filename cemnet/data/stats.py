"""What a pretraining method needs to know about its data, in one typed record.

Both datamodules (:class:`cemnet.data.datamodule.EMPatchDataModule` for 2D patches,
:class:`cemnet.data.subvolumes.SubvolumeDataModule` for 3D crops) return a :class:`DataStats`
from ``data_stats()``; the methods read it instead of probing the datamodule's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["DataStats", "ProvidesDataStats"]


@dataclass(frozen=True)
class DataStats:
    """Facts about the training data that a method records or scales by.

    Attributes:
        mean, std: the intensity normalisation on the [0, 1] scale (what the views were
            normalised with; recorded in the checkpoint for export and fine-tuning).
        corpus_fingerprint: identifies the corpus (or the set of volumes) trained on.
        n_patches: patches in the corpus; ``None`` when training on volumes without a corpus.
        batch_size: samples per device and step (the linear learning-rate scaling uses it).
    """

    mean: float
    std: float
    corpus_fingerprint: str | None
    n_patches: int | None
    batch_size: int


@runtime_checkable
class ProvidesDataStats(Protocol):
    """A datamodule that can say what it feeds (both cemnet datamodules do)."""

    def data_stats(self) -> DataStats: ...
