"""Near-duplicate groups of patches by Hamming distance of their 64-bit difference hashes.

CEM500K's rule (``dataset/deduplicated/deduplicate.py``), per source dataset: randomly permute the
patches; take the first remaining one as the reference; every remaining patch within Hamming
distance ``<= 12`` of it (the reference included) forms its group; keep the reference as the
group's exemplar, remove the group, repeat until none remain. We keep those semantics exactly
(a test checks them against a straightforward loop, :func:`greedy_groups_reference`) with two
changes: the permutation is seeded, so runs are reproducible, and the search uses a faiss binary
index (exact brute-force Hamming range search, SIMD popcount, multi-threaded) in batches over a
shrinking set, instead of a Python ``np.delete`` per group.

Batching keeps the result identical: a batch of the next ``B`` remaining patches is searched
against everything remaining, then resolved in permutation order; a patch already claimed by an
earlier exemplar of the same batch is skipped, exactly as the sequential loop would have removed
it before reaching it.
"""

from __future__ import annotations

import numpy as np

from curation.hashing import unpack_bits

DEFAULT_MAX_DISTANCE = 12


def _codes(hashes: np.ndarray) -> np.ndarray:
    """uint64 hashes -> (N, 8) uint8 faiss binary codes (bit order is irrelevant to Hamming)."""
    return np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64)).view(np.uint8).reshape(-1, 8)


def greedy_groups(
    hashes: np.ndarray,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    seed: int = 0,
    batch_size: int = 4096,
    progress: object | None = None,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Assign every hash to a near-duplicate group, CEM500K's greedy rule.

    Args:
        hashes: uint64 (N,).
        max_distance: largest Hamming distance that counts as a duplicate (inclusive).
        seed: seed of the random visiting order (``np.random.default_rng(seed).permutation``).
        batch_size: references searched per faiss call; changes speed, never the result.
        progress: optional tqdm-like object; ``update(k)`` is called with patches resolved.
        order: the visiting order (a permutation of ``range(N)``) to use instead of the seeded
            one; the corpus passes an order fixed per patch by its provenance (see
            :mod:`curation.exemplars`), so adding patches never reorders the others.

    Returns:
        int64 (N,): the index of each patch's exemplar (an exemplar points at itself).
    """
    import faiss

    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    group = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return group
    if n == 1:  # a dataset of one patch (a single 2D image): no index to build
        if progress is not None:
            progress.update(1)
        return np.zeros(1, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(n) if order is None else np.asarray(order, dtype=np.int64)
    codes = _codes(hashes)
    remaining = order  # patches not yet in a group, in visiting order
    while len(remaining):
        index = faiss.IndexBinaryFlat(64)
        index.add(codes[remaining])
        batch = remaining[:batch_size]
        # faiss returns distances strictly below the radius.
        lims, _, found = index.range_search(codes[batch], max_distance + 1)
        for i, ref in enumerate(batch):
            if group[ref] >= 0:
                continue  # claimed by an earlier exemplar of this batch
            members = remaining[found[lims[i] : lims[i + 1]]]
            members = members[group[members] < 0]
            group[members] = ref
        resolved = len(remaining)
        remaining = remaining[group[remaining] < 0]
        if progress is not None:
            progress.update(resolved - len(remaining))
    return group


def greedy_groups_reference(
    hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE, seed: int = 0, order: np.ndarray | None = None
) -> np.ndarray:
    """The CEM500K loop written out plainly (slow; for tests and as documentation)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    bits = unpack_bits(hashes)
    indices = np.random.default_rng(seed).permutation(len(hashes)) if order is None else np.asarray(order)
    group = np.full(len(hashes), -1, dtype=np.int64)
    remaining_bits = bits[indices]
    while len(indices) > 0:
        matches = np.where(np.logical_xor(remaining_bits[0], remaining_bits).sum(1) <= max_distance)[0]
        group[indices[matches]] = indices[matches[0]]
        indices = np.delete(indices, matches)
        remaining_bits = np.delete(remaining_bits, matches, axis=0)
    return group


def exemplar_mask(group: np.ndarray) -> np.ndarray:
    """True where a patch is the exemplar of its group."""
    return group == np.arange(len(group))
