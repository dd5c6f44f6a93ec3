"""TIFF / BigTIFF / OME-TIFF / ImageJ TIFF (tifffile)."""

from __future__ import annotations

import contextlib
import logging
import os
import xml.etree.ElementTree as ET
from typing import Any, Iterator, Sequence

import numpy as np

from curation.readers.base import ArrayVolume, luma, unit_nm

EXTENSIONS = (".tif", ".tiff")


class TiffVolume(ArrayVolume):
    """TIFF / BigTIFF / OME-TIFF / ImageJ: memory-mapped when uncompressed and contiguous, else
    read through tifffile's zarr store so a sub-range decodes only its pages / strips / tiles."""

    reader = "tiff"
    partial_reads = True

    def _open(self) -> None:
        import tifffile

        with _tifffile_errors() as errors:
            tif = tifffile.TiffFile(self.path)
            self._closers.append(tif)
            series = tif.series[0]  # level 0; later series are thumbnails / other images
            # A contiguous series is one memmap whose end we check below; walking its IFDs too
            # costs ~0.15 ms per page in every worker that opens the file.
            pages = [p for p in series.pages if p is not None] if series.dataoffset is None else []
        if errors:  # tifffile logs, rather than raises, broken IFD chains and truncated series
            raise self._fail(f"corrupt or truncated TIFF ({errors[0]})")
        size = os.path.getsize(self.path)
        end = max((o + n for p in pages for o, n in zip(p.dataoffsets, p.databytecounts)), default=0)
        if series.dataoffset is not None:
            end = max(end, series.dataoffset + series.size * series.dtype.itemsize)
        if end > size:
            raise self._fail(f"truncated TIFF: image data ends at byte {end} but the file has {size}")
        page = series.keyframe
        lut = None
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
            colours = (np.asarray(page.colormap).T >> 8).astype(np.uint8)  # 16-bit -> 8-bit RGB
            lut = luma(colours)  # palette -> 'L', as PIL does for PNG palettes
        if series.dataoffset is not None:
            dtype = series.dtype.newbyteorder(tif.byteorder)  # tifffile reports native order
            arr, chunks = np.memmap(self.path, dtype, "r", series.dataoffset, series.shape), None
        else:
            import zarr  # only here: its import costs ~0.3 s in every worker process

            arr = zarr.open_array(series.aszarr(), mode="r")
            chunks = arr.chunks
        self._setup_array(arr, _tiff_axes(series.axes, series.shape), chunks=chunks, lut=lut)
        self._set_tiff_voxel_size(tif, page)

    def _set_tiff_voxel_size(self, tif: Any, page: Any) -> None:
        # Only microscopy metadata counts; bare TIFF resolution tags are print DPI, not pixel size.
        nm: dict[str, float | None] = {}
        if tif.is_ome and tif.ome_metadata:
            xml = ET.fromstring(tif.ome_metadata)
            pixels = next((e for e in xml.iter() if e.tag.endswith("Pixels")), None)
            for a in "zyx" if pixels is not None else "":
                value = pixels.get(f"PhysicalSize{a.upper()}")
                unit = unit_nm(pixels.get(f"PhysicalSize{a.upper()}Unit", "µm"))
                nm[a] = float(value) * unit if value and unit else None
            what = "OME-XML"
        elif tif.is_imagej and tif.imagej_metadata:
            unit = unit_nm(tif.imagej_metadata.get("unit"))
            for a, tag in (("y", "YResolution"), ("x", "XResolution")):
                num, den = page.tags[tag].value if tag in page.tags else (0, 1)
                nm[a] = den / num * unit if unit and num else None
            spacing = tif.imagej_metadata.get("spacing")
            nm["z"] = float(spacing) * unit if unit and spacing else None
            what = "ImageJ metadata"
        else:
            what = ""
        self._voxel_from_axes(nm, what)


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    """Collect ERROR records tifffile logs while parsing (its way of reporting broken files)."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, log = _Collect(logging.ERROR), logging.getLogger("tifffile")
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)


def _tiff_axes(axes: str, shape: Sequence[int]) -> str | None:
    """tifffile axis codes -> ours; page index ('I', 'Q') is z. None when ambiguous."""
    table = {"Z": "z", "I": "z", "Q": "z", "T": "t", "C": "c", "S": "s", "Y": "y", "X": "x"}
    out = ""
    for code, n in zip(axes, shape):
        letter = table.get(code)
        if letter is None or letter in out:  # unknown or repeated axis: fine only if singleton
            letter = next((a for a in "tc" if a not in out), None) if n == 1 else None
        if letter is None:
            return None
        out += letter
    return out
