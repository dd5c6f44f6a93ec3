"""Formats read through tensorstore (N5, Neuroglancer precomputed): the shared array and volume."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from curation.manifest import is_url
from curation.readers.base import ArrayVolume
from curation.remote import (
    RemoteReadError,
    RemoteSettings,
    _cat,
    _filesystem,
    is_unreadable,
    mark_unreadable,
    tensorstore_context,
    url_join,
)


class TensorstoreArray:
    """A tensorstore array as the lazily indexable array ``_setup_array`` expects; a region read
    waits at most three times the timeout of all tries of a request.

    Reads go through a handle that fails on absent chunks (``fill_missing_data_reads: false``);
    when one is absent, the chunks of the region are checked one by one (``missing``: their
    (start, stop) per stored axis) and the region is read with the fill value for them."""

    def __init__(self, strict: Any, lenient: Any, name: str) -> None:
        self.store, self.lenient, self.name = strict, lenient, name  # name: the array's location
        self.shape = tuple(int(n) for n in strict.shape)
        self.dtype = np.dtype(strict.dtype.numpy_dtype)
        self.chunks = tuple(int(n) for n in strict.chunk_layout.read_chunk.shape)
        self.origin = tuple(int(n) for n in strict.chunk_layout.grid_origin)
        self.missing: list[list[tuple[int, int]]] = []
        # A safety net over a whole region read: tensorstore times out and retries each request
        # itself (curation.remote.tensorstore_context); a region holds many chunks.
        s = RemoteSettings.from_env()
        self._timeout = 3 * max(1.0, math.ceil(s.timeout_s)) * (s.retries + 1) + s.backoff_s * 2 ** (s.retries + 1)

    def _fetch(self, store: Any, key: Any) -> np.ndarray:
        try:
            return np.asarray(store[key].read().result(timeout=self._timeout))
        except TimeoutError as e:
            raise RemoteReadError(f"no answer within {self._timeout:g} s") from e

    def _cells(self, key: tuple) -> list[tuple[tuple[int, int], ...]]:
        """The chunk grid cells a region touches, as (start, stop) per axis."""
        spans = []
        for k, n, c, o in zip(key, self.shape, self.chunks, self.origin):
            start, stop = (k, k + 1) if isinstance(k, (int, np.integer)) else k.indices(n)[:2]
            first, last = (start - o) // c, (stop - 1 - o) // c
            spans.append([(max(o + i * c, 0), min(o + (i + 1) * c, n)) for i in range(first, last + 1)])
        return list(itertools.product(*spans))

    def __getitem__(self, key: tuple) -> np.ndarray:
        dead = [cell for cell in self._cells(key) if is_unreadable((self.name, cell))]
        if dead:
            raise RemoteReadError(f"chunk(s) {dead[:3]} unreadable earlier in this run (not asked again)")
        try:
            return self._fetch(self.store, key)
        except (ValueError, RemoteReadError) as e:
            failure = e
        # A chunk is absent (NOT_FOUND) or unreadable: find which, chunk by chunk (the others are
        # in the cache by now), to fill the absent ones and to remember the unreadable ones.
        unreadable = False
        for cell in self._cells(key):
            try:
                self._fetch(self.store, tuple(slice(a, b) for a, b in cell))
            except (ValueError, RemoteReadError) as e:
                if str(e).startswith("NOT_FOUND"):
                    self.missing.append(list(cell))
                else:
                    mark_unreadable((self.name, cell))
                    unreadable = True
        if unreadable:
            raise failure
        return self._fetch(self.lenient, key)


def read_json(base: str, rel: str) -> dict | None:
    """A JSON document below a local folder or a URL; None when absent or not a JSON object."""
    if is_url(base):
        fs, root = _filesystem(base)
        data = _cat(fs, url_join(root, rel))
    else:
        path = Path(base, rel)
        data = path.read_bytes() if path.is_file() else None
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


class TensorstoreVolume(ArrayVolume):
    """Base of the formats read through tensorstore (local folders or URLs)."""

    partial_reads = True
    options = frozenset({"key", "scale_level", "channel"})

    def _open_tensorstore(self, spec: dict) -> Any:
        import tensorstore as ts

        # Chunks do not change during a run: no revalidation requests for cached ones. Two handles
        # on one context (one cache): one that fails on absent chunks, one that fills them.
        spec = {**spec, "recheck_cached_data": False}
        handles = [ts.open({**spec, "fill_missing_data_reads": fill}, read=True, context=tensorstore_context()).result()
                   for fill in (False, True)]
        # precomputed volumes may start at a voxel offset
        return TensorstoreArray(*(h[ts.d[:].translate_to[0]] for h in handles), name=json.dumps(spec, sort_keys=True))

    def _read(self, z: slice, y: slice, x: slice) -> np.ndarray:
        self._arr.missing.clear()
        data = super()._read(z, y, x)
        if self._arr.missing:
            boxes = [self._zyx_box(cell) for cell in self._arr.missing]
            self._arr.missing.clear()
            self._found_missing(boxes)
        return data
