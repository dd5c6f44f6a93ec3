"""N5 (tensorstore), local or remote."""

from __future__ import annotations

import os

from curation.manifest import is_url
from curation.readers.base import unit_nm
from curation.readers.tensorstore import TensorstoreVolume, read_json
from curation.remote import tensorstore_kvstore, url_join


class N5Volume(TensorstoreVolume):
    """N5 (e.g. OpenOrganelle's ``<dataset>.n5/em/fibsem-uint8/s0..sN``) via tensorstore. ``key``
    names the multiscale group or array below the container; ``scale_level`` picks ``sN``. Voxel
    size from ``pixelResolution`` / ``resolution`` (x, y, z) or COSEM ``transform`` attributes."""

    reader = "n5"

    def _open(self) -> None:
        base = url_join(self.path, self.spec.key or "") if is_url(self.path) else os.path.join(self.path, self.spec.key or "")
        attrs = read_json(base, "attributes.json") or {}  # optional for N5 groups
        if "dimensions" in attrs:  # an array, one level
            levels, level_attrs = [""], [attrs]
        else:
            ms = attrs.get("multiscales") or []
            paths = [d.get("path", "") for d in ms[0].get("datasets", [])] if ms and isinstance(ms[0], dict) else []
            levels, level_attrs = [], []
            for k, rel in enumerate(paths or (f"s{n}" for n in range(64))):
                found = read_json(base, f"{rel}/attributes.json")
                if found is None or "dimensions" not in found:
                    if paths:
                        raise self._fail(f"N5 multiscale level {rel!r} has no array attributes")
                    break
                levels.append(rel)
                level_attrs.append(found)
            if not levels:
                where = f"key {self.spec.key!r}" if self.spec.key else "the root"
                hint = "" if self.spec.key else " (set `key` to the dataset, e.g. em/fibsem-uint8)"
                raise self._fail(f"no N5 array and no s0..sN scale levels at {where}" + hint)
        level = self._pick_level([_n5_voxel_nm(a) for a in level_attrs])
        kv = tensorstore_kvstore(url_join(base, levels[level]) if is_url(base) else os.path.join(base, levels[level]))
        arr = self._open_tensorstore({"driver": "n5", "kvstore": kv})
        self._setup_array(arr, "xyz"[: len(arr.shape)] if len(arr.shape) <= 3 else None, chunks=arr.chunks)
        nm = _n5_voxel_nm(level_attrs[level])
        self._set_voxel_size(nm, "N5 attributes")


def _n5_voxel_nm(attrs: dict) -> tuple[float, float, float] | None:
    """(z, y, x) nm from N5 array attributes, or None."""
    res = attrs.get("pixelResolution")
    if isinstance(res, dict) and len(res.get("dimensions", [])) == 3:
        unit = unit_nm(res.get("unit", "nm"))
        x, y, z = (float(v) for v in res["dimensions"])
        return (z * unit, y * unit, x * unit) if unit else None
    if isinstance(attrs.get("resolution"), list) and len(attrs["resolution"]) == 3:
        x, y, z = (float(v) for v in attrs["resolution"])  # nm by convention (BigDataViewer, CREMI)
        return (z, y, x)
    transform = attrs.get("transform")
    if isinstance(transform, dict) and len(transform.get("axes", [])) == 3:
        units = [unit_nm(u) for u in transform.get("units", ["nm"] * 3)]
        by_axis = {a: float(s) * u for a, s, u in zip(transform["axes"], transform.get("scale", []), units) if u}
        if set(by_axis) == set("zyx"):
            return (by_axis["z"], by_axis["y"], by_axis["x"])
    return None
