"""Which patches need pixels: the visiting order of dedup, and exemplars tracked while cutting.

CEM500K's dedup visits the patches of a dataset in a random order and keeps the first of every
near-duplicate group (:mod:`curation.dedup`). The corpus fixes that random order *per patch*: each
patch gets a 64-bit key, a seeded hash of its provenance (source, plane, slice, y, x), and patches
are visited by increasing key. It is a uniformly random order like CEM500K's, reproducible, and
adding patches (a new unit, a new source) never reorders the others, which is what lets
extraction tell, as each unit finishes, which of its patches are exemplars of everything cut so
far (:class:`OnlineExemplars`) and store pixels for those only.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Sequence

import numpy as np

from curation.dedup import greedy_groups

_AXIS_CODE = {"xy": 1, "xz": 2, "yz": 3}


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _name_code(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def visit_keys(seed: int, sources: Sequence[str] | np.ndarray, axes: Sequence[str] | np.ndarray,
               slices: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """uint64 visiting key of each patch: a seeded hash of its provenance (see the module doc)."""
    sources, axes = np.asarray(sources, dtype=object), np.asarray(axes, dtype=object)
    names, name_no = np.unique(sources.astype(str), return_inverse=True) if len(sources) else ([], np.zeros(0, int))
    codes = np.array([_name_code(n) for n in names], dtype=np.uint64)
    key = _mix(np.full(len(sources), np.uint64(seed % 2**64), dtype=np.uint64))
    key = _mix(key ^ codes[np.asarray(name_no, dtype=np.int64).reshape(-1)])
    key = _mix(key ^ np.array([_AXIS_CODE.get(a, 0) for a in axes], dtype=np.uint64))
    for column in (slices, ys, xs):
        key = _mix(key ^ np.asarray(column, dtype=np.int64).astype(np.uint64))
    return key


def visit_order(keys: np.ndarray) -> np.ndarray:
    """Indices that visit ``keys`` in increasing order (ties, never seen in practice, by position)."""
    return np.argsort(np.asarray(keys, dtype=np.uint64), kind="stable")


@contextlib.contextmanager
def _one_faiss_thread(small: bool = True) -> Iterator[None]:
    """Searches of one unit's patches are small: faiss's OpenMP threads cost 100x more than they
    save there (measured: 78 ms vs 0.7 ms for 1000 x 1000 codes on a busy 2-core machine), and
    the main process must not take cores from the workers cutting patches."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1 if small else before)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class _Group:
    """Provisional exemplars of one dedup group (a dataset, or the whole corpus)."""

    def __init__(self) -> None:
        import faiss

        self.index = faiss.IndexBinaryFlat(64)  # every patch ever admitted as exemplar, in order
        self.keys = np.zeros(0, dtype=np.uint64)
        self.alive = np.zeros(0, dtype=bool)  # False once an earlier-visited patch claimed it

    def add(self, codes: np.ndarray, keys: np.ndarray) -> None:
        if len(keys):
            self.index.add(codes)
            self.keys = np.concatenate([self.keys, keys])
            self.alive = np.concatenate([self.alive, np.ones(len(keys), bool)])


def _codes(hashes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64)).view(np.uint8).reshape(-1, 8)


class OnlineExemplars:
    """Exemplars of the patches seen so far, per dedup group, updated unit by unit.

    A patch is admitted as exemplar when no current exemplar within ``max_distance`` comes
    before it in the visiting order; an admitted patch demotes the current exemplars within
    reach that come after it. Over one fixed set this is exactly the greedy rule; as patches
    arrive it can differ from the final dedup only through chains (A claims B, which had
    claimed C, and C is out of A's reach: C becomes an exemplar again but was stored without
    pixels). Extraction stores pixels of admitted patches; the final dedup decides, and the
    few final exemplars without pixels are re-cut from their sources (:mod:`curation.pixels`).
    """

    def __init__(self, max_distance: int, enabled: bool = True) -> None:
        self.max_distance = max_distance
        self.enabled = enabled  # dedup scope "none": every patch is an exemplar
        self.groups: dict[str, _Group] = {}

    def seed(self, group: str, hashes: np.ndarray, keys: np.ndarray) -> None:
        """Start ``group`` from patches cut in earlier runs: their exact greedy exemplars."""
        g = self.groups.setdefault(group, _Group())
        if not self.enabled or len(hashes) == 0:
            return
        groups = greedy_groups(hashes, self.max_distance, order=visit_order(keys))
        exemplar = groups == np.arange(len(hashes))
        g.add(_codes(hashes[exemplar]), np.asarray(keys, dtype=np.uint64)[exemplar])

    def admit(self, group: str, hashes: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """bool per patch: True for the new exemplars among ``hashes`` (one unit's patches)."""
        import faiss

        n = len(hashes)
        if not self.enabled or n == 0:
            return np.ones(n, dtype=bool)
        g = self.groups.setdefault(group, _Group())
        keys = np.asarray(keys, dtype=np.uint64)
        codes = _codes(hashes)
        radius = self.max_distance + 1  # faiss returns distances strictly below the radius
        with _one_faiss_thread(small=g.index.ntotal < 200_000):  # a large group: threads pay off
            if g.index.ntotal:
                lims, _, found = g.index.range_search(codes, radius)
            else:
                lims, found = np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
            batch = faiss.IndexBinaryFlat(64)
            batch.add(codes)
            blims, _, bfound = batch.range_search(codes, radius)
        # Plain Python over lists: per patch a few list lookups instead of numpy calls on tiny
        # arrays (measured 90 -> a few us per patch; this runs in the main process).
        lims_l, found_l, blims_l, bfound_l = lims.tolist(), found.tolist(), blims.tolist(), bfound.tolist()
        near_key = g.keys[found].tolist()
        near_alive = g.alive[found].tolist()
        keys_l = keys.tolist()
        admitted_l = [False] * n
        claimed: set[int] = set()  # existing exemplars claimed by a patch of this batch
        for i in visit_order(keys).tolist():  # earlier-visited patches of the batch decide first
            k, lo, hi = keys_l[i], lims_l[i], lims_l[i + 1]
            if any(near_alive[t] and near_key[t] < k and found_l[t] not in claimed for t in range(lo, hi)):
                continue  # an exemplar visited earlier is within reach
            if any(admitted_l[j] for j in bfound_l[blims_l[i] : blims_l[i + 1]]):
                continue  # admitted ones of this batch were visited earlier
            admitted_l[i] = True
            claimed.update(found_l[t] for t in range(lo, hi) if near_alive[t])  # all come after it
        if claimed:
            g.alive[np.fromiter(claimed, dtype=np.int64)] = False
        admitted = np.array(admitted_l, dtype=bool)
        g.add(codes[admitted], keys[admitted])
        return admitted

    def settle(self, group: str, hashes: np.ndarray, keys: np.ndarray, batch: int = 4096) -> np.ndarray:
        """bool per patch: the exemplars among ``hashes``, all the patches of a finished source
        (none of them admitted before). When the group holds nothing else yet (a dataset of one
        source, the usual case), this is the greedy rule itself over them
        (:func:`curation.dedup.greedy_groups`), i.e. the final dedup's answer unless other
        sources join the group later; otherwise they are admitted ``batch`` at a time."""
        from curation.dedup import greedy_groups

        n = len(hashes)
        if not self.enabled or n == 0:
            return np.ones(n, dtype=bool)
        g = self.groups.setdefault(group, _Group())
        keys = np.asarray(keys, dtype=np.uint64)
        if g.index.ntotal:
            start = len(g.alive)
            admitted = np.concatenate([self.admit(group, hashes[i : i + batch], keys[i : i + batch])
                                       for i in range(0, n, batch)])
            admitted[np.flatnonzero(admitted)] = g.alive[start:]  # some were claimed by a later batch
            return admitted
        groups = greedy_groups(hashes, self.max_distance, order=visit_order(keys))
        exemplar = groups == np.arange(n)
        g.add(_codes(np.asarray(hashes)[exemplar]), keys[exemplar])
        return exemplar
