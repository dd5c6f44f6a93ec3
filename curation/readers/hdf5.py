"""HDF5 (h5py)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np

from curation.readers.base import ArrayVolume, pick_array


class HdfVolume(ArrayVolume):
    """HDF5 via h5py, sliced lazily. Dataset from `key`, else the single (or largest, preferring
    stack/raw/data/volume) >= 2-D numeric dataset. Axes from ilastik 'axistags'; voxel size from
    'element_size_um' (µm) or CREMI-style 'resolution' (nm)."""

    reader = "hdf5"
    partial_reads = True
    options = frozenset({"axes", "channel", "key"})

    def _open(self) -> None:
        import h5py

        f = h5py.File(self.path, "r")
        self._closers.append(f)
        found: dict[str, Any] = {}

        def collect(name: str, obj: Any) -> None:  # visititems stops at the first non-None return
            if isinstance(obj, h5py.Dataset):
                found[name] = obj

        f.visititems(collect)
        listing = {k: (d.shape, d.dtype) for k, d in found.items()}
        ds = found[pick_array(self, self.spec.key, listing, "dataset")]
        axes = None
        with contextlib.suppress(Exception):
            tags = json.loads(ds.attrs["axistags"])["axes"]
            axes = "".join(t["key"] for t in tags).lower()
        self._setup_array(ds, axes, chunks=ds.chunks)
        spatial = [a for a in self._axes if a in "zyx"]
        for attr, factor in (("element_size_um", 1e3), ("resolution", 1.0)):
            values = ds.attrs.get(attr)
            if values is not None and np.size(values) == len(spatial):
                nm = {a: float(v) * factor for a, v in zip(spatial, np.ravel(values))}
                self._voxel_from_axes(nm, f"'{attr}' attribute")
                return
        self._set_voxel_size(None)
