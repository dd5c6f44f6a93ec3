"""Neuroglancer precomputed (tensorstore), local or remote."""

from __future__ import annotations

from curation.readers.tensorstore import TensorstoreVolume, read_json
from curation.remote import strip_precomputed, tensorstore_kvstore


class PrecomputedVolume(TensorstoreVolume):
    """Neuroglancer precomputed (``info`` + scales, raw / jpeg / compressed segmentation, sharded or
    not) via tensorstore; ``scale_level`` picks a scale; voxel size from its ``resolution``."""

    reader = "precomputed"

    def _open(self) -> None:
        base = strip_precomputed(self.path)
        info = read_json(base, "info")
        if info is None or not info.get("scales"):
            raise self._fail("no Neuroglancer precomputed `info` with scales")
        sizes = [tuple(float(v) for v in sc.get("resolution", [])[::-1]) or None for sc in info["scales"]]
        level = self._pick_level([v if v and len(v) == 3 else None for v in sizes])
        arr = self._open_tensorstore({"driver": "neuroglancer_precomputed", "kvstore": tensorstore_kvstore(base),
                                      "scale_index": level})
        self._setup_array(arr, "xyzc", chunks=arr.chunks)
        self._set_voxel_size(sizes[level] if sizes[level] and len(sizes[level]) == 3 else None, "precomputed info")
