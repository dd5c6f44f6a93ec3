"""Random 3D sub-volumes from the corpus's source volumes (the data of MGMR 3D).

A 2D patch corpus records how to reopen every source (``Corpus.source_specs()``, for
``curation.readers.open_volume``) and the uint8 mapping fitted to it during curation (the
``uint8_rule`` column of ``index.sqlite``, a :class:`curation.to_uint8.Uint8Converter`). The
dataset samples ``(D, H, W)`` crops (SegNeuron: 20 x 128 x 128) uniformly over all valid crop
positions of all volumes (volumes weighted by their number of positions), converts them to uint8
with that same mapping, and applies SegNeuron's augmentation (``SimpleAugment``: with probability
1/2, a random combination of z, y, x flips and a yx transpose). Volumes smaller than the crop
are skipped with a warning.

Workers receive only specs and fitted converters (small, picklable); each worker opens its
volumes lazily on first read. Randomness comes from torch's generator, which the DataLoader
seeds per worker and ``seed_everything`` seeds in the main process.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from cemnet.data.stats import DataStats
from curation.to_uint8 import Uint8Converter, sample_volume
from curation.corpus import ReadOnlyIndex

__all__ = ["ArrayVolume", "SubvolumeDataset", "SubvolumeDataModule", "VolumeLike"]


class VolumeLike(Protocol):
    """What the dataset needs of a volume (``curation.readers`` volumes satisfy it)."""

    shape: tuple[int, int, int]
    dtype: Any

    def read(self, z: slice, y: slice, x: slice) -> np.ndarray: ...


class ArrayVolume:
    """An in-memory (z, y, x) array with the reader API (tests, notebooks, small volumes)."""

    def __init__(self, array: np.ndarray, name: str = "array") -> None:
        if array.ndim != 3:
            raise ValueError(f"expected a (z, y, x) array, got shape {array.shape}")
        self.array = array
        self.name = name
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = array.dtype

    def read(self, z: slice = slice(None), y: slice = slice(None), x: slice = slice(None)) -> np.ndarray:
        return np.asarray(self.array[z, y, x])


def _is_spec(spec: Any) -> bool:
    """A reopenable description (SourceSpec JSON dict or path) rather than an opened volume."""
    return isinstance(spec, (Mapping, str, os.PathLike))


def _open_spec(spec: Mapping[str, Any] | str | os.PathLike) -> VolumeLike:
    from curation.readers import SourceSpec, open_volume  # lazy: only the 3D path needs readers

    if isinstance(spec, Mapping):
        return open_volume(SourceSpec.from_json(dict(spec)))
    return open_volume(os.fspath(spec))


def _close(volume: Any) -> None:
    close = getattr(volume, "close", None)
    if callable(close):
        close()


def _fit_converter(volume: VolumeLike, rule: str | Mapping[str, Any] | None) -> Uint8Converter:
    """The corpus's fitted mapping when recorded, else a fresh fit with the corpus's rule."""
    if isinstance(rule, str) and rule.lstrip().startswith("{"):
        rule = json.loads(rule)
    if isinstance(rule, Mapping):
        return Uint8Converter(**rule)
    if np.dtype(volume.dtype) == np.uint8 and rule in (None, "auto", "dtype"):
        return Uint8Converter("identity", np.dtype(np.uint8).str)
    return Uint8Converter.fit(sample_volume(volume), volume.dtype, rule or "auto")


def corpus_uint8_rules(corpus_root: str | os.PathLike) -> dict[str, Any]:
    """``{source name: fitted Uint8Converter fields}`` recorded in a corpus's ``index.sqlite``."""
    db_path = Path(corpus_root) / "index.sqlite"
    if not db_path.is_file():
        return {}
    with ReadOnlyIndex(corpus_root) as index:
        return index.uint8_rules()


class SubvolumeDataset(Dataset):
    """Random ``size`` crops of a set of volumes, as uint8 tensors ``(1, D, H, W)``.

    Args:
        volumes: ``{name: spec}``, where a spec is a ``curation.readers.SourceSpec`` JSON dict or a
            path (reopened with ``curation.readers.open_volume`` in each worker), or an opened
            volume object with ``shape``/``dtype``/``read`` (pickled into the workers as is).
        size: crop ``(D, H, W)``.
        length: samples per epoch (crops are random; the index is ignored).
        uint8_rules: per-volume mapping (fitted ``Uint8Converter`` fields or a rule name);
            missing ones are fitted here with the corpus default rule ``"auto"``.
        augment: SegNeuron's ``SimpleAugment``: with probability 1/2, each of z/x/y flip and yx
            transpose independently with probability 1/2.
    """

    def __init__(
        self,
        volumes: Mapping[str, Mapping[str, Any] | VolumeLike],
        size: Sequence[int] = (20, 128, 128),
        length: int = 1000,
        uint8_rules: Mapping[str, Any] | None = None,
        augment: bool = True,
    ) -> None:
        self.size = tuple(int(s) for s in size)
        if len(self.size) != 3:
            raise ValueError(f"size must be (D, H, W), got {size}")
        self.length = int(length)
        self.augment = augment
        self.names: list[str] = []
        self.specs: list[Mapping[str, Any] | VolumeLike] = []
        self.shapes: list[tuple[int, int, int]] = []
        self.converters: list[Any] = []
        self.skipped: dict[str, str] = {}
        rules = dict(uint8_rules or {})
        for name, spec in volumes.items():
            vol = _open_spec(spec) if _is_spec(spec) else spec
            shape = tuple(int(s) for s in vol.shape)
            if len(shape) != 3 or any(s < c for s, c in zip(shape, self.size)):
                self.skipped[name] = f"shape {shape} is smaller than the crop {self.size}"
                continue
            self.names.append(name)
            self.specs.append(spec)
            self.shapes.append(shape)  # type: ignore[arg-type]
            self.converters.append(_fit_converter(vol, rules.get(name)))
            if vol is not spec:
                _close(vol)
        if self.skipped:  # one warning, however many 2D images a corpus holds
            listed = "; ".join(f"{n}: {r}" for n, r in list(self.skipped.items())[:10])
            more = f" (+{len(self.skipped) - 10} more)" if len(self.skipped) > 10 else ""
            warnings.warn(f"sub-volumes: skipped {len(self.skipped)} source(s): {listed}{more}", stacklevel=2)
        if not self.names:
            raise ValueError(f"no volume is at least {self.size} (z, y, x); skipped: {self.skipped}")
        positions = np.array(
            [np.prod([s - c + 1 for s, c in zip(shape, self.size)], dtype=np.float64) for shape in self.shapes]
        )
        self.weights = torch.from_numpy(positions / positions.sum())
        self._open: dict[int, VolumeLike] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}  # file handles are reopened in each worker
        return state

    def __len__(self) -> int:
        return self.length

    def _volume(self, k: int) -> VolumeLike:
        vol = self._open.get(k)
        if vol is None:
            spec = self.specs[k]
            vol = _open_spec(spec) if _is_spec(spec) else spec
            self._open[k] = vol
        return vol

    def sample(self, k: int | None = None) -> tuple[np.ndarray, int, tuple[int, int, int]]:
        """One un-augmented uint8 crop: (crop, volume index, (z, y, x) corner)."""
        if k is None:
            k = int(torch.multinomial(self.weights, 1).item())
        corner = tuple(
            int(torch.randint(s - c + 1, (1,)).item()) for s, c in zip(self.shapes[k], self.size)
        )
        z, y, x = (slice(o, o + c) for o, c in zip(corner, self.size))
        block = self.converters[k](self._volume(k).read(z, y, x))
        return block, k, corner  # type: ignore[return-value]

    def __getitem__(self, index: int) -> torch.Tensor:
        block, _, _ = self.sample()
        if self.augment and torch.rand(()) < 0.5:
            # SegNeuron's SimpleAugment: half the time, one of the 16 flip/transpose combinations
            z_flip, x_flip, y_flip, transpose = (torch.rand(4) < 0.5).tolist()
            if z_flip:
                block = block[::-1]
            if x_flip:
                block = block[:, :, ::-1]
            if y_flip:
                block = block[:, ::-1]
            if transpose and self.size[1] == self.size[2]:
                block = block.transpose(0, 2, 1)
        return torch.from_numpy(np.ascontiguousarray(block, dtype=np.uint8))[None]


def _volumes_fingerprint(dataset: SubvolumeDataset) -> str:
    """Names and shapes of the volumes used, when no corpus fingerprint exists."""
    text = "\n".join(f"{n}:{s}" for n, s in zip(dataset.names, dataset.shapes))
    return "volumes-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _sample_stats(dataset: SubvolumeDataset, n: int = 16) -> tuple[float, float]:
    """Mean/std ([0, 1] units) of a few random crops, when no corpus provides them."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # fixed, so the statistics do not depend on the run's seed
    try:
        vals = np.concatenate([dataset.sample()[0].ravel() for _ in range(n)]).astype(np.float64) / 255.0
    finally:
        torch.random.set_rng_state(state)
    return float(vals.mean()), float(vals.std())


class SubvolumeDataModule(pl.LightningDataModule):
    """Random 3D sub-volumes for MGMR 3D, from a corpus's sources or explicit volumes.

    Args:
        corpus: a cemnet corpus; its sources are reopened with ``curation.readers`` and its
            mean/std/fingerprint go into the checkpoint.
        volumes: instead of (or besides) a corpus: paths, or ``{name: path, SourceSpec JSON dict
            or opened volume}``.
        size: crop ``(D, H, W)`` (SegNeuron 20 x 128 x 128).
        batch_size: crops per device and step.
        samples_per_epoch: crops per epoch (per device).
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        mean, std: override the normalisation ([0, 1] units); default from the corpus, or
            measured on a few crops.
    """

    def __init__(
        self,
        corpus: str | os.PathLike | Any | None = None,
        volumes: list[str] | dict[str, Any] | None = None,
        size: Sequence[int] = (20, 128, 128),
        batch_size: int = 8,
        samples_per_epoch: int = 8000,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        mean: float | None = None,
        std: float | None = None,
    ) -> None:
        super().__init__()
        if corpus is None and not volumes:
            raise ValueError("give a corpus or volumes")
        self.corpus_spec = corpus
        if isinstance(volumes, (list, tuple)):
            volumes = {os.fspath(v): v for v in volumes}
        self.volumes = dict(volumes or {})
        self.size = tuple(int(s) for s in size)
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self._mean, self._std = mean, std
        self.corpus: Any = None
        self.dataset: SubvolumeDataset | None = None
        self.corpus_fingerprint: str | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        volumes: dict[str, Any] = {}
        rules: dict[str, Any] = {}
        if self.corpus_spec is not None:
            from cemnet.data.datamodule import load_corpus

            self.corpus = load_corpus(self.corpus_spec)
            self.corpus_fingerprint = getattr(self.corpus, "fingerprint", None)
            volumes.update(self.corpus.source_specs())
            root = getattr(self.corpus, "root", None)
            if root is not None:
                rules.update(corpus_uint8_rules(root))
        volumes.update(self.volumes)
        self.dataset = SubvolumeDataset(volumes, self.size, self.samples_per_epoch, rules)
        if self.corpus_fingerprint is None:
            self.corpus_fingerprint = _volumes_fingerprint(self.dataset)
        if self._mean is None or self._std is None:
            if self.corpus is not None:
                mean, std = float(self.corpus.mean), float(self.corpus.std)
            else:
                mean, std = _sample_stats(self.dataset)
            self._mean = mean if self._mean is None else self._mean
            self._std = std if self._std is None else self._std

    @property
    def mean(self) -> float:
        self.setup()
        return float(self._mean)  # type: ignore[arg-type]

    @property
    def std(self) -> float:
        self.setup()
        return float(self._std)  # type: ignore[arg-type]

    def data_stats(self) -> DataStats:
        """What the methods record (mean, std, fingerprint of the corpus or volumes) and scale by."""
        self.setup()
        n_patches = len(self.corpus) if self.corpus is not None else None
        return DataStats(self.mean, self.std, self.corpus_fingerprint, n_patches, int(self.batch_size))

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=True,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.dataset)  # type: ignore[arg-type]
