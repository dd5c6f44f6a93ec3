"""Zarr v2 / v3 and OME-Zarr 0.4 / 0.5 (zarr-python), local or remote."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from curation.manifest import is_url
from curation.readers.base import ArrayVolume, pick_array, unit_nm
from curation.remote import chunk_coords, open_zarr_store


class ZarrVolume(ArrayVolume):
    """Zarr v2/v3 and OME-Zarr 0.4/0.5 (multiscales: `scale_level`, axes, scale -> nm)."""

    reader = "zarr"
    partial_reads = True
    options = frozenset({"axes", "channel", "key", "scale_level"})

    def _open(self) -> None:
        import zarr

        self._store = open_zarr_store(self.path)
        node = zarr.open(store=self._store, mode="r")
        key = (self.spec.key or "").strip("/")
        if key and isinstance(node, zarr.Group):
            try:  # by name first: listing members needs a store that can list (not plain HTTP)
                node = node[key]
            except KeyError:
                members = self._members(node)
                node = members[pick_array(self, key, _zarr_arrays(members), "array")]
        attrs = dict(node.attrs) if isinstance(node, zarr.Group) else {}
        multiscales = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")
        if multiscales:
            self._open_ome(node, multiscales[0])
            return
        if self.spec.scale_level:
            raise self._fail(f"scale_level {self.spec.scale_level} requested but there is no "
                             "OME multiscales metadata")
        if isinstance(node, zarr.Group):
            members = self._members(node)
            node = members[pick_array(self, None, _zarr_arrays(members), "array")]
        self._set_array(node, None)
        self._set_voxel_size(None)

    def _members(self, group: Any) -> dict:
        """Every array and group below ``group``; a store that cannot list (most HTTP servers)
        gets a message saying to name the array."""
        if not is_url(self.path):
            return dict(group.members(max_depth=None))
        hint = "set `key` to the array to read (e.g. 's0' or 'raw')"
        try:
            members = dict(group.members(max_depth=None))
        except Exception as e:  # noqa: BLE001 - listing is what failed, whatever the library says
            raise self._fail(f"cannot list this zarr group over {self.path.split(':', 1)[0]} "
                             f"({type(e).__name__}); {hint}") from e
        if not members:  # a server without directory listings answers an empty one
            raise self._fail(f"cannot list this zarr group over {self.path.split(':', 1)[0]} (the server lists "
                             f"nothing in it); {hint}")
        return members

    def _set_array(self, arr: Any, axes: str | None) -> None:
        self._zarr_array = arr
        self._setup_array(arr, axes, chunks=_zarr_chunks(arr))

    def _open_ome(self, group: Any, ms: dict) -> None:
        datasets = ms["datasets"]
        named = [a if isinstance(a, str) else a.get("name", "") for a in ms.get("axes", [])]
        axes = "".join(n.lower() for n in named) if named and all(len(n) == 1 for n in named) else None
        units = [unit_nm(a.get("unit")) if isinstance(a, dict) else None for a in ms.get("axes", [])]

        def level_nm(level: int) -> dict[str, float] | None:
            """nm per z/y/x axis of one level (scale of the level times the global scale)."""
            scale = np.ones(len(units))
            transforms = datasets[level].get("coordinateTransformations", [])
            for transform in transforms + ms.get("coordinateTransformations", []):  # level, then global
                if transform.get("type") == "scale" and len(transform.get("scale", [])) == len(units):
                    scale = scale * np.asarray(transform["scale"], dtype=float)
            if not axes or len(axes) != len(units) or any(u is None for a, u in zip(axes, units) if a in "zyx"):
                return None
            return {a: s * u for a, s, u in zip(axes, scale, units) if a in "zyx"}

        sizes = [level_nm(k) for k in range(len(datasets))]
        level = self._pick_level([tuple(v[a] for a in "zyx") if v and len(v) == 3 else None for v in sizes])
        arr = group[datasets[level]["path"]]
        self._set_array(arr, axes if axes and len(axes) == arr.ndim else None)
        if len(units) != arr.ndim or any(u is None for a, u in zip(self._axes, units) if a in "zyx"):
            self.notes.append("OME-Zarr axes give no (known) space units; voxel size unknown")
            self._set_voxel_size(None)
            return
        self._voxel_from_axes(level_nm(level) or {}, "OME-Zarr metadata")

    def _read(self, z: slice, y: slice, x: slice) -> np.ndarray:
        self._store.missing.clear()
        data = super()._read(z, y, x)
        if self._store.missing:
            boxes = self._missing_boxes(sorted(self._store.missing))
            self._store.missing.clear()
            self._found_missing(boxes)
        return data

    def _missing_boxes(self, keys: Sequence[str]) -> list[tuple[int, ...]]:
        """Stored-volume (z0, z1, y0, y1, x0, x1) boxes of missing chunk keys of our array."""
        arr, grid = self._zarr_array, _zarr_chunks(self._zarr_array)
        boxes = []
        for key in keys:
            coords = chunk_coords(key, arr.path)
            if coords is None or len(coords) != arr.ndim:
                continue
            boxes.append(self._zyx_box([(c * g, min((c + 1) * g, n)) for c, g, n in zip(coords, grid, arr.shape)]))
        return boxes


def _zarr_arrays(members: dict) -> dict[str, tuple]:
    import zarr

    return {k: (a.shape, a.dtype) for k, a in members.items() if isinstance(a, zarr.Array)}


def _zarr_chunks(arr: Any) -> tuple[int, ...]:
    """Preferred read block: the shard (one stored object) if sharded, else the chunk."""
    return getattr(arr, "shards", None) or arr.chunks
