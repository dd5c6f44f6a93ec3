"""NRRD (pynrrd)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from curation.readers.base import ArrayVolume, unit_nm


class NrrdVolume(ArrayVolume):
    """NRRD via pynrrd: raw attached data is memory-mapped, other encodings are read whole.
    Spacing from 'space directions' (vector lengths) or 'spacings'; units from 'space units' /
    'units' (none given: assumed nm, and noted)."""

    reader = "nrrd"

    def _open(self) -> None:
        import nrrd

        with open(self.path, "rb") as fh:
            header = nrrd.read_header(fh)
            offset = fh.tell()  # attached data starts right after the header's blank line
        sizes = tuple(int(n) for n in header["sizes"])[::-1]  # NRRD lists the fastest axis first
        detached = {"data file", "datafile", "line skip", "byte skip"} & set(header)
        datatype = getattr(nrrd.reader, "_determine_datatype", None)  # pynrrd's own type parser
        if header.get("encoding") == "raw" and not detached and datatype is not None:
            arr: Any = np.memmap(self.path, datatype(header), "r", offset, sizes)
        else:
            arr, _ = nrrd.read(self.path, index_order="C")
        kinds = [str(k).lower() for k in header.get("kinds", [])][::-1]
        spatial = sum(k in ("domain", "space") for k in kinds)
        axes = None
        if len(kinds) == len(sizes) and 2 <= spatial <= 3 and spatial < len(kinds):  # e.g. RGB kind
            letters = iter("zyx"[3 - spatial:])
            axes = "".join(next(letters) if k in ("domain", "space") else "t" if k == "time"
                           else "s" if "color" in k else "c" for k in kinds)
        self._setup_array(arr, axes)
        self._voxel_from_axes(self._spacing_nm(header), "NRRD header")

    def _spacing_nm(self, header: dict) -> dict[str, float | None]:
        """nm per spatial axis; non-spatial axes have 'none' directions / NaN spacings."""
        if header.get("space directions") is not None:
            rows = [np.asarray(r, dtype=float) for r in header["space directions"]]
            spacing = [float(np.linalg.norm(r)) for r in rows if not np.isnan(r).all()]
            units = list(header.get("space units") or [])
        elif header.get("spacings") is not None:
            keep = [not math.isnan(float(v)) for v in header["spacings"]]
            spacing = [float(v) for v, k in zip(header["spacings"], keep) if k]
            units = [u for u, k in zip(header.get("units") or [], keep) if k]
        else:
            return {}
        factors = [unit_nm(u) for u in units]
        if len(factors) != len(spacing) or None in factors:
            self.notes.append("NRRD spacing has no (known) unit; assumed nm")
            factors = [1.0] * len(spacing)
        nm = [v * f for v, f in zip(spacing, factors)][::-1]  # slowest axis first, like the array
        letters = [a for a in self._axes if a in "zyx"]
        return dict(zip(letters, nm)) if len(nm) == len(letters) else {}
