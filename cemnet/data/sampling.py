"""Epoch samplers that are DDP-aware by construction (shared seed, per-rank slicing) and resumable.

``EpochSampler`` draws one global order per epoch from ``(seed, epoch)`` — the same on every rank,
no communication needed — and each rank takes the slice ``order[rank::world_size]``. Two modes:

* uniform (``gamma=None``): a random permutation, every patch once per epoch (CEM500K's default).
* dataset-balanced (``gamma`` given, CEM1.5M): patches are drawn *with replacement*, patch ``i`` of
  source ``s`` with weight ``(1 / count_s) ** gamma``, i.e. source ``s`` gets probability
  ``count_s ** (1 - gamma) / sum_t count_t ** (1 - gamma)`` (gamma 0: proportional to size, 1: every
  source equally often, 0.5: the square-root compromise). Sampled in two stages (source, then a
  uniform patch of it), which is exactly WeightedRandomSampler's distribution without an O(N)
  multinomial over millions of weights.

It subclasses :class:`~torch.utils.data.DistributedSampler` only so that Lightning recognises it as
already distributed and does not wrap it (Lightning still calls :meth:`set_epoch`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import DistributedSampler

__all__ = ["EpochSampler", "source_probabilities"]


def source_probabilities(counts: Sequence[int] | np.ndarray, gamma: float) -> np.ndarray:
    """Per-source sampling probability for weights ``(1/count)^gamma`` per patch."""
    counts = np.asarray(counts, dtype=np.float64)
    mass = np.where(counts > 0, counts ** (1.0 - gamma), 0.0)
    return mass / mass.sum()


class EpochSampler(DistributedSampler):
    """Random epoch order shared by all ranks (via the seed), sliced per rank; optionally balanced.

    Args:
        num_items: size of the corpus.
        source_index: per-patch source id (needed when ``gamma`` is given).
        gamma: ``None`` for a uniform permutation; else dataset balancing exponent (0.5 CEM1.5M).
        num_samples: samples per epoch over all ranks (default ``num_items``).
        num_replicas, rank: DDP world size and this process's rank.
        seed: shared seed (all ranks must pass the same).
        batch_size: per-rank batch size; per-rank length is rounded down to whole batches so every
            rank runs the same number of steps (DDP collectives must stay in lock-step).
    """

    def __init__(
        self,
        num_items: int,
        source_index: np.ndarray | None = None,
        gamma: float | None = None,
        num_samples: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        batch_size: int = 1,
    ) -> None:
        # deliberately not calling DistributedSampler.__init__ (it wants a Dataset and a process group)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        if gamma is not None and source_index is None:
            raise ValueError("balanced sampling (gamma given) needs source_index")
        self.num_items = int(num_items)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.epoch = 0
        self.shuffle = True
        self.drop_last = True
        self.gamma = gamma
        self.batch_size = int(batch_size)
        total = int(num_samples or num_items)
        per_rank = total // self.num_replicas
        per_rank -= per_rank % self.batch_size
        if per_rank <= 0:
            raise ValueError(
                f"{total} samples per epoch is too few for {self.num_replicas} ranks x batch {self.batch_size}"
            )
        self.num_samples = per_rank  # DistributedSampler's name for the per-rank length
        self.total_size = per_rank * self.num_replicas
        self._skip = 0  # samples to skip at the start of the next iteration (mid-epoch resume)
        if gamma is not None:
            src = np.asarray(source_index, dtype=np.int64)
            self._order = np.argsort(src, kind="stable")  # patch ids grouped by source
            counts = np.bincount(src)
            self._counts = counts
            self._offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self._probs = source_probabilities(counts, gamma)

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's order over all ranks (identical on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        if self.gamma is None:
            reps = -(-self.total_size // self.num_items)  # > 1 only when num_samples > num_items
            order = np.concatenate([rng.permutation(self.num_items) for _ in range(reps)])
            return order[: self.total_size]
        src = rng.choice(len(self._probs), size=self.total_size, p=self._probs)
        within = np.floor(rng.random(self.total_size) * self._counts[src]).astype(np.int64)
        return self._order[self._offsets[src] + within]

    def __iter__(self) -> Iterator[int]:
        mine = self.global_order()[self.rank : self.total_size : self.num_replicas]
        skip, self._skip = self._skip, 0
        return iter(mine[skip:].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, num_samples: int) -> None:
        """Resume support: the next ``__iter__`` starts ``num_samples`` into this rank's slice."""
        self._skip = int(num_samples)
