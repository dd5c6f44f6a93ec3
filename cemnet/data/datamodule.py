"""LightningDataModule over a cemnet patch corpus: batched memmap reads, two augmentation paths.

Reading: the dataset implements ``__getitems__`` so the DataLoader hands it a whole batch of
indices; one ``corpus.get_padded(indices)`` gathers them from the memory-mapped shards (no per-patch
file opens, no per-patch Python work). The augmentation is then run once on the whole ``(n, 1, P, P)``
batch, either

* in the loader workers (``augment_on_device=False``, the CPU path): workers return finished views;
* on the accelerator (``augment_on_device=True``): workers return raw uint8 patches (4x less to
  copy than float) and :meth:`EMPatchDataModule.on_after_batch_transfer` augments the batch on the GPU,
  so a many-GPU node is not starved by its CPU cores.

Both run :class:`~cemnet.data.augment.EMAugment`, so they draw from the same distribution.

Batch format handed to ``training_step`` (a dict)::

    views  : list of num_views float tensors (B, 1, S, S), normalised with the corpus mean/std
    (num_views=0, raw mode: ``image`` uint8 (B, 1, P, P) zero-padded patches and ``sizes`` (B, 2))
    index  : (B,) int64 corpus indices
    source : (B,) int64 source ids (index into corpus.sources)

Resume: the datamodule's ``state_dict`` (which Lightning stores in every checkpoint) records the
epoch and the batches consumed in it; resuming from a mid-epoch checkpoint regenerates the same
epoch order (a function of seed and epoch) and skips the batches already trained on. The augmentation
random draws after a resume are not bit-identical (worker seeds are re-derived), which is "within
reason" for SSL.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from cemnet.data.augment import AugmentConfig, EMAugment
from curation.corpus import PatchCorpus, missing_corpus_members, open_corpus
from cemnet.data.sampling import EpochSampler
from cemnet.data.stats import DataStats

__all__ = ["ArrayCorpus", "CorpusTooSmallError", "PatchViewsDataset", "StatefulLoader", "EMPatchDataModule", "load_corpus"]


class CorpusTooSmallError(ValueError):
    """The corpus cannot fill one batch per device (the message names the corpus)."""


class ArrayCorpus:
    """A small in-memory corpus: a :class:`~curation.corpus.PatchCorpus`, like a curated one.

    For tests, notebooks and arrays that never went through ``cemnet curate``. Patches are stored
    zero-padded to ``P x P`` with their true sizes, exactly like a curated corpus.

    Args:
        patches: ``(n, P, P)`` uint8, zero-padded beyond ``sizes``.
        sizes: ``(n, 2)`` true (h, w); default all ``(P, P)``.
        source_index: ``(n,)`` source id per patch; default all 0.
        sources: source names; default ``["arrays"]``.
        mean, std: intensity statistics in [0, 1] units; default computed from the true pixels.
    """

    def __init__(
        self,
        patches: np.ndarray,
        sizes: np.ndarray | None = None,
        source_index: np.ndarray | None = None,
        sources: Sequence[str] | None = None,
        mean: float | None = None,
        std: float | None = None,
    ) -> None:
        patches = np.ascontiguousarray(patches, dtype=np.uint8)
        if patches.ndim != 3 or patches.shape[1] != patches.shape[2]:
            raise ValueError(f"patches must be (n, P, P), got {patches.shape}")
        n, P = patches.shape[0], patches.shape[1]
        self._patches = patches
        self._sizes = np.full((n, 2), P, np.int64) if sizes is None else np.asarray(sizes, np.int64).reshape(n, 2)
        self.source_index = np.zeros(n, np.int64) if source_index is None else np.asarray(source_index, np.int64)
        self.sources = list(sources) if sources is not None else [f"source{i}" for i in range(self.source_index.max() + 1)]
        self.patch_size = P
        if mean is None or std is None:
            vals = np.concatenate([patches[i, : h, : w].ravel() for i, (h, w) in enumerate(self._sizes)]) / 255.0
            mean, std = float(vals.mean()), float(vals.std())
        self.mean, self.std = float(mean), float(std)
        h = hashlib.sha256(patches.tobytes())
        h.update(self._sizes.tobytes())
        self.fingerprint = "arrays-" + h.hexdigest()[:16]

    @classmethod
    def from_images(
        cls, paths: Sequence[str | os.PathLike], patch_size: int, stride: int | None = None, keep_edges: bool = True
    ) -> "ArrayCorpus":
        """Tile 2D greyscale images (any PIL-readable file) into patches; one source per image."""
        from PIL import Image

        stride = stride or patch_size
        patches, sizes, src = [], [], []
        for s, path in enumerate(paths):
            img = np.asarray(Image.open(path).convert("L"))
            H, W = img.shape
            for y in range(0, H, stride):
                for x in range(0, W, stride):
                    tile = img[y : y + patch_size, x : x + patch_size]
                    if tile.shape != (patch_size, patch_size) and not keep_edges:
                        continue
                    pad = np.zeros((patch_size, patch_size), np.uint8)
                    pad[: tile.shape[0], : tile.shape[1]] = tile
                    patches.append(pad)
                    sizes.append(tile.shape)
                    src.append(s)
        return cls(np.stack(patches), np.array(sizes), np.array(src), [Path(p).name for p in paths])

    def __len__(self) -> int:
        return self._patches.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        h, w = self._sizes[i]
        return self._patches[i, :h, :w]

    def get_padded(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        return self._patches[idx], self._sizes[idx]

    def source_specs(self) -> dict[str, dict]:
        return {}


def load_corpus(corpus: str | os.PathLike | PatchCorpus) -> PatchCorpus:
    """A corpus from a path (``curation.corpus.open_corpus``: a cemnet corpus or a CEM500K-style
    TIFF folder), or a :class:`~curation.corpus.PatchCorpus` object passed through."""
    if isinstance(corpus, (str, os.PathLike)):
        return open_corpus(corpus)
    missing = missing_corpus_members(corpus)
    if missing:
        raise TypeError(f"corpus object {type(corpus).__name__} is not a PatchCorpus: it lacks "
                        f"{', '.join(map(repr, missing))} (see curation.corpus.PatchCorpus)")
    return corpus


def _passthrough(batch: Any) -> Any:
    """Collate for a dataset that already returns whole batches (``__getitems__``)."""
    return batch


class PatchViewsDataset(Dataset):
    """Corpus patches -> batches of augmented views (or raw patches for on-device augmentation).

    ``__getitems__`` (called by the DataLoader with a whole batch of indices) does one gathered read
    and one batched augmentation; ``__getitem__`` exists for ad-hoc single access.
    """

    def __init__(self, corpus: PatchCorpus, augment: EMAugment | None, num_views: int = 2) -> None:
        self.corpus = corpus
        self.augment = augment  # None: return raw patches, the GPU augments them
        self.num_views = num_views

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        idx = np.asarray(indices, dtype=np.int64)
        patches, sizes = self.corpus.get_padded(idx)
        x = torch.from_numpy(np.ascontiguousarray(patches))[:, None]  # (n, 1, P, P) uint8
        sizes_t = torch.from_numpy(np.asarray(sizes, dtype=np.int64))
        out: dict[str, Any] = {
            "index": torch.from_numpy(idx),
            "source": torch.from_numpy(np.asarray(self.corpus.source_index, dtype=np.int64)[idx]),
        }
        if self.num_views == 0:  # raw mode (e.g. MGMR corrupts on the device): uint8 patches as they are
            out["image"], out["sizes"] = x, sizes_t
        elif self.augment is None:
            out["patches"], out["sizes"] = x, sizes_t
        else:
            out["views"] = [self.augment(x, sizes_t) for _ in range(self.num_views)]
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        batch = self.__getitems__([i])
        return {k: ([t[0] for t in v] if isinstance(v, list) else v[0]) for k, v in batch.items()}


class StatefulLoader(DataLoader):
    """DataLoader that tells Lightning it is resumable (so it does not warn on mid-epoch resume).

    The position itself is saved and restored by :meth:`EMPatchDataModule.state_dict` /
    :meth:`EMPatchDataModule.load_state_dict`: Lightning restores a datamodule before any loader
    exists, whereas a loader's own ``load_state_dict`` comes too late whenever
    ``configure_optimizers`` asks for ``trainer.estimated_stepping_batches`` (that builds and starts
    the train loader during strategy setup, before the loop states are restored). So this hook is
    informational only and restoring is a no-op here.
    """

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(getattr(self.sampler, "epoch", 0))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass  # see the class docstring: EMPatchDataModule.load_state_dict did it already


class EMPatchDataModule(pl.LightningDataModule):
    """Corpus -> batches of augmented views for contrastive / masked pretraining.

    Args:
        corpus: path of a cemnet corpus or CEM500K-style TIFF folder (opened with
            ``curation.corpus.open_corpus``), or a corpus object (e.g. :class:`ArrayCorpus`).
        batch_size: per-device batch size (Lightning convention; global = this x devices x nodes).
        num_workers: loader processes per device.
        augment: augmentation settings (default: CEM500K's MoCoV2 set).
        num_views: augmented views per patch (2 for MoCo); 0 = raw mode, the batch carries the
            uint8 patches as ``image`` (for methods that corrupt/augment on the device, e.g. MGMR).
        augment_on_device: augment on the accelerator in ``on_after_batch_transfer`` (workers only
            gather uint8 patches) instead of in the CPU workers.
        balance_gamma: ``None`` for uniform epochs; else dataset-balanced sampling with per-patch
            weight ``(1/source_count)^gamma`` (CEM1.5M used 0.5).
        samples_per_epoch: samples per epoch over all ranks (default: corpus size).
        seed: shared sampling seed (same on all ranks).
        mean, std: override the corpus's own normalisation statistics ([0, 1] units).
        pin_memory, persistent_workers, prefetch_factor: DataLoader settings.
    """

    def __init__(
        self,
        corpus: str | os.PathLike | Any,
        batch_size: int = 32,
        num_workers: int = 4,
        augment: AugmentConfig | None = None,
        num_views: int = 2,
        augment_on_device: bool = False,
        balance_gamma: float | None = None,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        mean: float | None = None,
        std: float | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 4,
    ) -> None:
        super().__init__()
        self.corpus_spec = corpus
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment_cfg = augment or AugmentConfig()
        self.num_views = num_views
        self.augment_on_device = augment_on_device
        self.balance_gamma = balance_gamma
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self._mean, self._std = mean, std
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.corpus: PatchCorpus | None = None
        self.augment: EMAugment | None = None
        self._resume_state: dict[str, Any] | None = None

    # -- corpus facts the methods record in their checkpoints ---------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            self.corpus = load_corpus(self.corpus_spec)
            self.augment = EMAugment(self.augment_cfg, self.mean, self.std)

    @property
    def mean(self) -> float:
        return float(self._mean if self._mean is not None else self._corpus().mean)

    @property
    def std(self) -> float:
        return float(self._std if self._std is not None else self._corpus().std)

    @property
    def fingerprint(self) -> str:
        return str(self._corpus().fingerprint)


    def _corpus(self) -> PatchCorpus:
        if self.corpus is None:
            self.setup()
        return self.corpus

    # -- loaders -------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def make_sampler(self, rank: int = 0, world_size: int = 1) -> EpochSampler:
        c = self._corpus()
        per_epoch = int(self.samples_per_epoch or len(c))
        if per_epoch < self.batch_size * world_size:
            name = self.corpus_spec if isinstance(self.corpus_spec, (str, os.PathLike)) else type(c).__name__
            raise CorpusTooSmallError(
                f"{name}: {per_epoch} patch(es) per epoch, too few for one batch of {self.batch_size} on each of "
                f"{world_size} device(s); lower data.batch_size, set data.samples_per_epoch, or curate more data"
            )
        return EpochSampler(
            len(c),
            source_index=np.asarray(c.source_index) if self.balance_gamma is not None else None,
            gamma=self.balance_gamma,
            num_samples=self.samples_per_epoch,
            num_replicas=world_size,
            rank=rank,
            seed=self.seed,
            batch_size=self.batch_size,
        )

    def train_dataloader(self) -> StatefulLoader:
        c = self._corpus()
        rank, world = self._rank_world()
        dataset = PatchViewsDataset(c, None if self.augment_on_device else self.augment, self.num_views)
        sampler = self.make_sampler(rank, world)
        self._apply_resume(sampler, world)
        workers = self.num_workers
        return StatefulLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            collate_fn=_passthrough,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )

    # -- resume: the position in the epoch travels in the checkpoint ------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Epoch and batches consumed in it (saved by Lightning under this class's name)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        loop = trainer.fit_loop
        # the epoch being trained: `current_epoch` already counts the epoch as done once the epoch
        # loop has ended (a save at the very end of a run), while `started` only moves when the
        # next epoch begins; `batches_done` below belongs to the started epoch
        started = int(loop.epoch_progress.current.started)
        return {
            "epoch": started - 1 if started > 0 else int(trainer.current_epoch),
            "batches_done": int(loop.epoch_loop.batch_progress.current.ready),
            "batches_per_epoch": int(trainer.num_training_batches) if math.isfinite(trainer.num_training_batches) else -1,
            "batch_size": int(self.batch_size),
            "world_size": int(trainer.world_size),
            "seed": int(self.seed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Remember the position; the next :meth:`train_dataloader` continues from it."""
        self._resume_state = dict(state) if state else None

    def _apply_resume(self, sampler: EpochSampler, world_size: int) -> None:
        state, self._resume_state = getattr(self, "_resume_state", None), None
        if not state:
            return
        same = state.get("world_size") == world_size and state.get("batch_size") == self.batch_size and state.get("seed") == self.seed
        done, per_epoch = int(state.get("batches_done", 0)), int(state.get("batches_per_epoch", -1))
        if per_epoch > 0 and done >= per_epoch:  # saved at the end of an epoch: the next one starts
            sampler.set_epoch(state["epoch"] + 1)
        elif not same:
            rank_zero_warn(
                "resuming with a different world size, batch size or seed: the interrupted epoch restarts "
                "from its beginning with a new order"
            )
            sampler.set_epoch(state["epoch"])
        else:  # same order (a function of seed and epoch), minus what was already trained on
            sampler.set_epoch(state["epoch"])
            sampler.skip_next(done * self.batch_size)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On-device path: raw uint8 patches -> ``num_views`` augmented views, on the batch's device."""
        if isinstance(batch, dict) and "patches" in batch:
            assert self.augment is not None
            x, sizes = batch.pop("patches"), batch.pop("sizes")
            batch["views"] = [self.augment(x, sizes) for _ in range(self.num_views)]
        return batch

    def data_stats(self) -> DataStats:
        """What the methods record (mean, std, corpus fingerprint) and scale by (batch size)."""
        corpus = self._corpus()
        return DataStats(self.mean, self.std, self.fingerprint, len(corpus), int(self.batch_size))
