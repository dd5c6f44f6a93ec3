"""MRC / CCP4 (mrcfile)."""

from __future__ import annotations

from typing import Any

import numpy as np

from curation.readers.base import ArrayVolume

MRC_EXTS = (".mrc", ".map", ".rec", ".st", ".ali", ".mrcs")


class MrcVolume(ArrayVolume):
    """MRC / CCP4 (.mrc .map .rec .st .ali .mrcs, optionally .gz/.bz2) via mrcfile; memory-mapped
    when uncompressed. Axes follow the header's MAPC/MAPR/MAPS; voxel size from the header (Å)."""

    reader = "mrc"

    def _open(self) -> None:
        import warnings

        import mrcfile

        compressed = self.path.lower().endswith((".gz", ".bz2"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mrc = (mrcfile.open if compressed else mrcfile.mmap)(self.path, mode="r", permissive=True)
        self._closers.append(mrc)
        if mrc.data is None:
            detail = "; ".join(str(w.message) for w in caught) or "no data block"
            raise self._fail(f"corrupt or truncated MRC file ({detail})")
        h, data = mrc.header, mrc.data
        if data.dtype == np.int8 and _imod_unsigned_bytes(h):
            data = data.view(np.uint8)  # IMOD writes unsigned bytes in mode 0 unless flagged signed
        order = (int(h.maps), int(h.mapr), int(h.mapc))  # which of x/y/z each stored axis is
        valid = data.ndim == 3 and sorted(order) == [1, 2, 3]
        self._setup_array(data, "".join("xyz"[m - 1] for m in order) if valid else None)
        try:  # Å per voxel along x, y, z; 0 when the header leaves the cell empty
            angstrom = [float(getattr(mrc.voxel_size, a)) for a in "zyx"]
        except Exception:  # e.g. a zero sampling (mx/my/mz) in a sloppy header
            angstrom = [0.0]
        self._set_voxel_size([v / 10 for v in angstrom] if min(angstrom) > 0 else None)


def _imod_unsigned_bytes(header: Any) -> bool:
    """IMOD stamp present and its 'signed bytes' flag clear (bytes 152-159 of the header)."""
    order = header.mode.dtype.byteorder  # the header's byte order applies to the IMOD fields too
    stamp, flags = np.frombuffer(header.extra2.tobytes()[40:48], np.dtype("i4").newbyteorder(order))
    return int(stamp) == 1146047817 and not int(flags) & 1
