"""What every patch filter shares: :class:`FilterResult`, the :class:`PatchFilter` protocol and
the (patches, sizes) batch convention."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

# Not a filter's verdict: the reason given to patches made mostly of the fill value of chunks
# absent from a zarr store (curation.missing_chunks), which are not data whatever they look like.
MISSING_CHUNKS_REASON = "missing-chunks"


@dataclass(eq=False)  # array fields: element-wise == would make dataclass equality ambiguous
class FilterResult:
    """Per-patch decision of a filter.

    Attributes:
        keep: bool (N,), True for informative patches.
        reason: object array of str (N,), ``""`` when kept, else a short code naming the failed
            criterion (``"uniform>=0.80"``, ``"low-contrast"``, ``"classifier p=0.12"``...).
        score: float (N,), higher = more informative (a probability or a margin).
    """

    keep: np.ndarray
    reason: np.ndarray
    score: np.ndarray

    def __post_init__(self) -> None:
        self.keep = np.asarray(self.keep, dtype=bool)
        self.reason = np.asarray(self.reason, dtype=object)
        self.score = np.asarray(self.score, dtype=np.float64)
        n = self.keep.shape[0] if self.keep.ndim == 1 else -1
        if n < 0 or self.reason.shape != (n,) or self.score.shape != (n,):
            raise ValueError(
                f"FilterResult arrays must all have shape (N,), got keep {self.keep.shape}, "
                f"reason {self.reason.shape}, score {self.score.shape}"
            )

    def __len__(self) -> int:
        return int(self.keep.shape[0])


@runtime_checkable
class PatchFilter(Protocol):
    """What the curation pipeline calls: ``filter(patches, sizes) -> FilterResult``."""

    name: str

    def __call__(self, patches: np.ndarray, sizes: np.ndarray) -> FilterResult:
        """Decide keep/remove for a batch of (zero-padded) patches with their true sizes."""
        ...

    def describe(self) -> dict:
        """Name and every parameter/threshold, recorded in the corpus provenance."""
        ...


def check_batch(patches: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate the (patches, sizes) convention and return them as arrays."""
    patches = np.asarray(patches)
    sizes = np.asarray(sizes)
    if patches.ndim != 3 or patches.shape[1] != patches.shape[2]:
        raise ValueError(f"patches must have shape (N, P, P), got {patches.shape}")
    if patches.dtype != np.uint8:
        raise ValueError(f"patches must be uint8, got {patches.dtype}")
    n, p, _ = patches.shape
    if sizes.shape != (n, 2):
        raise ValueError(f"sizes must have shape ({n}, 2) for {n} patches, got {sizes.shape}")
    if not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"sizes must be integers, got {sizes.dtype}")
    if n and (sizes.min() < 0 or sizes.max() > p):
        raise ValueError(f"sizes must lie in [0, {p}] (the patch size), got {sizes.min()}..{sizes.max()}")
    return patches, sizes.astype(np.int64, copy=False)


def size_groups(sizes: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (h, w, indices) for each distinct true size.

    Grouping by size lets every group be processed as a dense (n, h, w) array without masks;
    in a real corpus nearly all patches share the full size and edge patches a handful of sizes.
    """
    if len(sizes) == 0:
        return
    uniq, inverse = np.unique(sizes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    for g, (h, w) in enumerate(uniq):
        yield int(h), int(w), order[bounds[g] : bounds[g + 1]]


def empty_mask(sizes: np.ndarray) -> np.ndarray:
    return (sizes[:, 0] == 0) | (sizes[:, 1] == 0)


def classifier_reason(p: float) -> str:
    return f"classifier p={p:.2f}"
