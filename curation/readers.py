"""Readers: every EM source a lab has -> uniform, chunked, greyscale (z, y, x) access.

``open_volume(spec)`` picks a reader by extension / folder content and returns a :class:`Volume`:
``shape`` (z, y, x), ``dtype`` after grey conversion, ``voxel_size`` in nm and ``read(z, y, x)``
that decodes only what a sub-range needs (memory maps, HDF5/zarr chunks, TIFF pages, slice files,
video frames). Array formats share :class:`_ArrayVolume`, which maps the stored axis order
(``tczyxs``) to (z, y, x), picks a channel, drops singleton t/c axes and turns RGB(A) into grey.
``discover`` expands folders into sources; ``describe`` summarises a volume for reports.
A source may be a URL (``http(s)://``, ``s3://``, ``gs://``; see :mod:`curation.remote`) for zarr,
OME-Zarr, N5 and Neuroglancer precomputed; a manifest ``roi`` narrows any volume to a box.
Bad input raises :class:`ReaderError` (``"{path}: {problem}"``). See ``docs/readers.md``.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from curation.manifest import (
    ReaderError,
    SourceSpec,
    assign_names,
    check_axes,
    default_name,
    is_url,
    load_manifest,
    natural_sorted,
)

__all__ = [
    "ReaderError", "SourceSpec", "Volume", "open_volume", "discover", "describe", "load_manifest",
    "reader_for", "IMAGE_EXTS", "VOXEL_NM_RANGE", "is_url",
]

# A header voxel size outside this range (nm) is a placeholder or a wrong unit (NIfTI "1 mm",
# TIFF "1 pixel per cm"), not an EM voxel: it is ignored and noted rather than trusted.
VOXEL_NM_RANGE = (0.01, 1e5)
_UNIT_NM = {
    "m": 1e9, "meter": 1e9, "metre": 1e9, "cm": 1e7, "centimeter": 1e7, "mm": 1e6,
    "millimeter": 1e6, "millimetre": 1e6, "um": 1e3, "µm": 1e3, "μm": 1e3, "micron": 1e3,
    "microns": 1e3, "micrometer": 1e3, "micrometre": 1e3, "nm": 1.0, "nanometer": 1.0,
    "nanometre": 1.0, "a": 0.1, "å": 0.1, "angstrom": 0.1, "ångström": 0.1, "pm": 1e-3,
    "picometer": 1e-3,
}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")  # 2D image files (tif may also be 3D)
_MRC_EXTS = (".mrc", ".map", ".rec", ".st", ".ali", ".mrcs")
_VIDEO_EXTS = (".avi", ".mp4", ".mov", ".mkv")
_PREFERRED_KEYS = ("stack", "raw", "data", "volume")


def _unit_nm(unit: Any) -> float | None:
    """Size of one ``unit`` in nm (None if unknown/absent)."""
    if not isinstance(unit, str):
        return None
    return _UNIT_NM.get(unit.strip().lower().replace("\\u00b5", "µ"))


# --------------------------------------------------------------------------- base class


class Volume(abc.ABC):
    """An opened source: greyscale (z, y, x) access. Use as a context manager or call close()."""

    reader: ClassVar[str] = "?"
    options: ClassVar[frozenset[str]] = frozenset()  # which SourceSpec options the reader uses
    # True when reading a region decodes only that region (memory map, chunks, tiles), so a large
    # 2D image can be cut in bands by several workers; False when opening decodes everything.
    partial_reads: ClassVar[bool] = False

    spec: SourceSpec
    path: str
    name: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size: tuple[float, float, float] | None
    voxel_size_from: str
    is_volume: bool
    chunk_zyx: tuple[int, int, int]

    def __init__(self, spec: SourceSpec) -> None:
        self.spec, self.path = spec, spec.path
        self.name = spec.name or assign_names([spec])[0].name
        self.notes: list[str] = []  # non-fatal remarks for reports (ignored metadata etc.)
        self._closers: list[Any] = []
        self._offset = (0, 0, 0)  # where the region of interest starts in the stored volume
        # Boxes (z0, z1, y0, y1, x0, x1) of the ROI that reads found missing in the store (zarr
        # chunks absent: read as the fill value); see take_missing().
        self._missing: list[tuple[int, int, int, int, int, int]] = []
        self._level_voxel_target = False  # True when spec.voxel_size picked a level (not an override)
        # While True, missing chunks are only recorded even with ``missing_chunks: error`` (sampling
        # for the uint8 fit reads regions the cut may never use).
        self.tolerate_missing = False
        try:
            self._open()
            self._apply_roi()
        except BaseException:
            self.close()  # a failed open must not leak file handles
            raise
        for opt, default in (("axes", None), ("key", None), ("scale_level", 0), ("channel", None)):
            if getattr(spec, opt) != default and opt not in self.options:
                self.notes.append(f"option {opt!r} does not apply to {self.reader} sources; ignored")

    @abc.abstractmethod
    def _open(self) -> None:
        """Open the source; set shape, dtype, is_volume, chunk_zyx; call _set_voxel_size."""

    @abc.abstractmethod
    def _read(self, z: slice, y: slice, x: slice) -> np.ndarray:
        """(z, y, x) block for normalised, non-empty slices (positive step)."""

    def _fail(self, problem: str) -> ReaderError:
        return ReaderError(self.path, problem)

    def _set_voxel_size(self, from_file: Sequence[float | None] | None, what: str = "header") -> None:
        """Manifest override, else a complete and plausible (z, y, x) nm from the file, else None."""
        if from_file is not None and any(v is None for v in from_file):
            known = ", ".join(f"{a}={v:g} nm" for a, v in zip("zyx", from_file) if v is not None)
            self.notes.append(f"{what} gives only part of the voxel size ({known}); set voxel_size")
            from_file = None
        if from_file is not None:
            lo, hi = VOXEL_NM_RANGE
            # 6 significant digits: float32 headers and unit products (0.032 * 1000) are not exact
            vs = tuple(float(f"{float(v):.6g}") for v in from_file)  # type: ignore[arg-type]
            if not all(math.isfinite(v) and lo <= v <= hi for v in vs):
                self.notes.append(f"ignored implausible voxel size {vs} nm from the {what}")
                from_file = None
        if self.spec.voxel_size is not None and not self._level_voxel_target:
            self.voxel_size, self.voxel_size_from = self.spec.voxel_size, "manifest"
        elif from_file is not None:
            self.voxel_size, self.voxel_size_from = vs, "file"
        else:
            self.voxel_size, self.voxel_size_from = None, "none"

    def _pick_level(self, level_nm: Sequence[Sequence[float] | None]) -> int:
        """The scale level to open: ``scale_level``, or with a manifest ``voxel_size`` on a source
        whose levels all carry voxel sizes, the level nearest to it (log scale, reported)."""
        wanted, level = self.spec.voxel_size, self.spec.scale_level
        if level >= len(level_nm):
            raise self._fail(f"scale_level {level} out of range: levels 0..{len(level_nm) - 1}")
        if wanted is None or level != 0 or len(level_nm) < 2 or any(v is None for v in level_nm):
            return level
        cost = [sum(math.log(a / b) ** 2 for a, b in zip(v, wanted)) for v in level_nm]  # type: ignore[arg-type]
        level = int(np.argmin(cost))
        self._level_voxel_target = True
        listing = ", ".join(f"{k}: {'x'.join(f'{a:g}' for a in v)}" for k, v in enumerate(level_nm))  # type: ignore[union-attr]
        self.notes.append(f"voxel_size {'x'.join(f'{a:g}' for a in wanted)} nm asked: scale level {level} "
                          f"chosen, the nearest of ({listing}) nm")
        return level

    def _apply_roi(self) -> None:
        """Narrow the volume to the manifest's region of interest (voxels or nm)."""
        roi = self.spec.roi
        if roi is None:
            return
        if self.spec.roi_unit == "nm":
            if self.voxel_size is None:
                raise self._fail("roi in nm needs a voxel size (none in the file): give voxel_size or roi in voxels")
            box = [int(math.floor(roi[2 * i] / v)) for i, v in enumerate(self.voxel_size)]
            ends = [int(math.ceil(roi[2 * i + 1] / v)) for i, v in enumerate(self.voxel_size)]
        else:
            box, ends = [int(roi[2 * i]) for i in range(3)], [int(math.ceil(roi[2 * i + 1])) for i in range(3)]
        start = tuple(min(b, n) for b, n in zip(box, self.shape))
        stop = tuple(min(e, n) for e, n in zip(ends, self.shape))
        if any(a >= b for a, b in zip(start, stop)):
            raise self._fail(f"roi {list(roi)} ({self.spec.roi_unit}) lies outside the volume of shape {self.shape}")
        if stop != tuple(ends):
            self.notes.append(f"roi clipped to the volume: stops {list(ends)} -> {list(stop)} (shape {self.shape})")
        self._offset = start  # type: ignore[assignment]
        self.shape = tuple(b - a for a, b in zip(start, stop))  # type: ignore[assignment]
        self.chunk_zyx = tuple(min(c, n) for c, n in zip(self.chunk_zyx, self.shape))  # type: ignore[assignment]
        self.notes.append(f"roi z {start[0]}-{stop[0]}, y {start[1]}-{stop[1]}, x {start[2]}-{stop[2]} (voxels)")

    @property
    def offset(self) -> tuple[int, int, int]:
        """Where this volume's (0, 0, 0) lies in the stored volume (the ROI start)."""
        return self._offset

    def _note_missing(self, boxes: Sequence[Sequence[int]]) -> None:
        """Record stored-volume boxes that a read found missing (clipped to the ROI)."""
        for box in boxes:
            rel = []
            for i in range(3):
                a = max(box[2 * i] - self._offset[i], 0)
                b = min(box[2 * i + 1] - self._offset[i], self.shape[i])
                rel += [a, b]
            if all(rel[2 * i] < rel[2 * i + 1] for i in range(3)) and tuple(rel) not in self._missing:
                self._missing.append(tuple(rel))  # type: ignore[arg-type]

    def _found_missing(self, boxes: Sequence[Sequence[int]]) -> None:
        """Stored-volume boxes a read found absent: an error under ``missing_chunks: error``
        (unless sampling), else recorded for :meth:`take_missing`."""
        if not boxes:
            return
        if self.spec.missing_chunks == "error" and not self.tolerate_missing:
            shown = "; ".join(_box_text(b) for b in boxes[:3]) + (" ..." if len(boxes) > 3 else "")
            raise self._fail(f"{len(boxes)} chunk(s) missing from the store ({shown}); the manifest "
                             "says missing_chunks: error")
        self._note_missing(boxes)

    def take_missing(self) -> list[tuple[int, int, int, int, int, int]]:
        """Boxes (z0, z1, y0, y1, x0, x1; ROI coordinates) missing from the store in the reads since
        the last call; they were read as the fill value."""
        boxes, self._missing = self._missing, []
        return boxes

    def read(
        self, z: slice = slice(None), y: slice = slice(None), x: slice = slice(None)
    ) -> np.ndarray:
        """Read a (z, y, x) block: grey, the source's numeric dtype, C-contiguous, native order."""
        norm = []
        for s, n, axis in zip((z, y, x), self.shape, "zyx"):
            if not isinstance(s, slice):
                raise TypeError(f"{axis} must be a slice, got {type(s).__name__}")
            start, stop, step = s.indices(n)
            if step < 1:
                raise ValueError(f"{axis} slice step must be positive, got {step}")
            norm.append(slice(start, max(start, stop), step))
        out_shape = tuple(len(range(s.start, s.stop, s.step)) for s in norm)
        if 0 in out_shape:
            return np.empty(out_shape, self.dtype)
        if any(self._offset):
            norm = [slice(s.start + o, s.stop + o, s.step) for s, o in zip(norm, self._offset)]
        try:
            out = self._read(*norm)
        except ReaderError:
            raise
        except Exception as e:  # decoder errors (truncated chunk, corrupt page ...) name the file
            from curation.remote import RemoteReadError

            remote = isinstance(e, RemoteReadError) or is_url(self.path)
            cause = "a chunk stayed unreadable" if remote else "file truncated or corrupt?"
            problem = f"read failed, {cause} ({type(e).__name__}: {e})"
            raise self._fail(problem.replace("\n", " ")) from e
        out = np.ascontiguousarray(out, dtype=self.dtype)
        if out.shape != out_shape:
            raise self._fail(f"read returned shape {out.shape}, expected {out_shape}")
        return out

    def close(self) -> None:
        """Release file handles (safe to call twice)."""
        while self._closers:
            with contextlib.suppress(Exception):
                self._closers.pop().close()

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} shape={self.shape} dtype={self.dtype}>"


def _native(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("=")


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of the last axis (RGB or RGBA), bit-exact with PIL's ``convert('L')``."""
    r, g, b = (rgb[..., i] for i in range(3))
    if rgb.dtype.kind in "biu" and rgb.dtype.itemsize <= 4:
        # PIL: L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; equal channels give that channel.
        out = (r.astype(np.int64) * 19595 + g.astype(np.int64) * 38470 + b.astype(np.int64) * 7471
               + 0x8000) >> 16
    else:
        out = r * 0.299 + g * 0.587 + b * 0.114
    return out.astype(rgb.dtype)


# --------------------------------------------------------------------------- array formats


class _ArrayVolume(Volume):
    """Base for formats exposing a lazily indexable N-D array with a known/guessed axis order."""

    options = frozenset({"axes", "channel"})

    def _setup_array(
        self,
        arr: Any,
        axes: str | None,
        *,
        chunks: Sequence[int] | None = None,
        lut: np.ndarray | None = None,
    ) -> None:
        """``arr``: has shape/dtype/__getitem__; ``axes``: stored order from metadata (or None)."""
        shape = tuple(int(n) for n in arr.shape)
        if len(shape) < 2:
            raise self._fail(f"{len(shape)}-D array (shape {shape}) is not an image")
        if np.dtype(arr.dtype).kind not in "biuf":
            raise self._fail(f"unsupported data type {arr.dtype} (not a real number)")
        if axes and not self.spec.axes:
            try:
                check_axes(axes)
            except ValueError:
                self.notes.append(f"ignored unusable axis names {axes!r} in the file")
                axes = None
        axes = self.spec.axes or axes or self._guess_axes(shape)
        if len(axes) != len(shape):
            raise self._fail(f"axes {axes!r} has {len(axes)} letters but the array is "
                             f"{len(shape)}-D (shape {shape})")
        if 0 in shape:
            raise self._fail(f"empty volume: array shape {shape} has a zero-size axis")
        channel, index = self.spec.channel, []
        for a, n in zip(axes, shape):
            if a == "t":
                if n != 1:
                    raise self._fail(f"has {n} time points (shape {shape}); only one is supported")
                index.append(0)
            elif a == "c" or (a == "s" and channel is not None and "c" not in axes):
                if channel is None and n > 1:
                    raise self._fail(f"has {n} channels (axes {axes!r}, shape {shape}); "
                                     "set `channel` to pick one")
                if (channel or 0) >= n:
                    raise self._fail(f"channel {channel} out of range: the data has {n} channel(s)")
                index.append(channel or 0)
            elif a == "s" and n in (1, 2):  # grey or grey + alpha
                index.append(0)
            elif a == "s" and n not in (3, 4):
                raise self._fail(f"has {n} colour samples per pixel; expected grey, RGB or RGBA")
            else:
                index.append(None)  # z, y, x (sliced) or RGB(A) samples (-> luma)
        self._arr, self._axes, self._index, self._lut = arr, axes, index, lut
        size = dict(zip(axes, shape))
        self.shape = (size.get("z", 1), size["y"], size["x"])
        dtype = lut.dtype if lut is not None else np.dtype(arr.dtype)
        self.dtype = _native(dtype)
        self.is_volume = "z" in axes
        by_axis = dict(zip(axes, chunks)) if chunks else {"y": self.shape[1], "x": self.shape[2]}
        self.chunk_zyx = tuple(
            int(min(max(by_axis.get(a, 1), 1), n)) for a, n in zip("zyx", self.shape)
        )  # type: ignore[assignment]

    def _guess_axes(self, shape: tuple[int, ...]) -> str:
        """Axis order when the file says nothing: yx, zyx; 4-D needs a channel choice."""
        if len(shape) in (2, 3):
            return "zyx"[3 - len(shape):]
        if len(shape) == 4:
            if self.spec.channel is None:
                raise self._fail(
                    f"4-D array (shape {shape}) needs a channel choice: set `channel` "
                    "(and `axes`, e.g. 'zyxc', when channels are not the first axis)"
                )
            guess = "zyxc" if shape[3] <= 4 < shape[0] else "czyx"
            self.notes.append(f"assumed axes {guess!r} for 4-D shape {shape}")
            return guess
        if len(shape) == 5:
            return "tczyx"
        raise self._fail(f"{len(shape)}-D array (shape {shape}) is ambiguous; set `axes`")

    def _zyx_box(self, spans: Sequence[tuple[int, int]]) -> tuple[int, ...]:
        """(z0, z1, y0, y1, x0, x1) of a box given as (start, stop) per stored axis."""
        span = dict(zip(self._axes, spans))
        return tuple(v for a in "zyx" for v in span.get(a, (0, 1)))

    def _voxel_from_axes(self, nm_by_axis: dict[str, float | None], what: str) -> None:
        """Voxel size from per-stored-axis nm values (keys are axis letters)."""
        if not any(v is not None for v in nm_by_axis.values()):
            self._set_voxel_size(None)
        elif "z" not in self._axes:  # 2D: no section thickness, so no complete (z, y, x)
            self._set_voxel_size((None, nm_by_axis.get("y"), nm_by_axis.get("x")), what)
        else:
            self._set_voxel_size(tuple(nm_by_axis.get(a) for a in "zyx"), what)

    def _read(self, z: slice, y: slice, x: slice) -> np.ndarray:
        want = {"z": z, "y": y, "x": x, "s": slice(None)}
        key = tuple(want[a] if i is None else i for a, i in zip(self._axes, self._index))
        data = np.asarray(self._arr[key])
        kept = [a for a, i in zip(self._axes, self._index) if i is None]
        data = data.transpose([kept.index(a) for a in "zyxs" if a in kept])
        if "s" in kept:
            data = _luma(data)
        if "z" not in kept:
            data = data[None]
        return self._lut[data] if self._lut is not None else data


class _TiffVolume(_ArrayVolume):
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
            lut = _luma(colours)  # palette -> 'L', as PIL does for PNG palettes
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
                unit = _unit_nm(pixels.get(f"PhysicalSize{a.upper()}Unit", "µm"))
                nm[a] = float(value) * unit if value and unit else None
            what = "OME-XML"
        elif tif.is_imagej and tif.imagej_metadata:
            unit = _unit_nm(tif.imagej_metadata.get("unit"))
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


class _PilImage(_ArrayVolume):
    """PNG / JPEG (2D) via PIL, converted to grey like PIL's 'L'; decoded once at open (so a
    truncated file fails early) and kept until close()."""

    reader = "image"
    options = frozenset({"axes"})

    def _open(self) -> None:
        from PIL import Image

        try:
            with Image.open(self.path) as im:
                im.load()
                arr = _pil_grey(im)
        except Image.DecompressionBombError as e:
            raise self._fail(f"image too large for PIL ({e}); convert it to a tiled TIFF") from e
        self._setup_array(arr, "yx")
        self._set_voxel_size(None)  # PNG/JPEG resolution is print DPI, not pixel size


def _pil_grey(im: Any) -> np.ndarray:
    """Numeric greyscale array of a PIL image: 16-bit/int/float kept, everything else -> 'L'."""
    if im.mode in ("L", "I", "F") or im.mode.startswith("I;16"):
        return np.asarray(im)
    try:
        return np.asarray(im.convert("L"))  # RGB(A) -> 601 luma, palette -> its grey, '1' -> 0/255
    except ValueError:  # modes PIL cannot take straight to 'L' (e.g. 'PA')
        return np.asarray(im.convert("RGBA").convert("L"))


def _pil_probe(path: str) -> tuple[tuple[int, int], np.dtype]:
    """(y, x) shape and grey dtype from a PNG/JPEG header, without decoding."""
    from PIL import Image

    with Image.open(path) as im:
        mode, (w, h) = im.mode, im.size
    if mode.startswith("I;16"):
        return (h, w), np.dtype(np.uint16)
    return (h, w), np.dtype({"I": np.int32, "F": np.float32}.get(mode, np.uint8))


class _MrcVolume(_ArrayVolume):
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


class _NrrdVolume(_ArrayVolume):
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
        factors = [_unit_nm(u) for u in units]
        if len(factors) != len(spacing) or None in factors:
            self.notes.append("NRRD spacing has no (known) unit; assumed nm")
            factors = [1.0] * len(spacing)
        nm = [v * f for v, f in zip(spacing, factors)][::-1]  # slowest axis first, like the array
        letters = [a for a in self._axes if a in "zyx"]
        return dict(zip(letters, nm)) if len(nm) == len(letters) else {}


class _NiftiVolume(_ArrayVolume):
    """NIfTI-1/2 (.nii, .nii.gz) via nibabel's lazy array proxy; stored x, y, z(, t, c) ->
    (z, y, x). Voxel size from the zooms with the header's xyzt_units (unknown units -> none)."""

    reader = "nifti"

    def _open(self) -> None:
        import nibabel

        img = nibabel.load(self.path)
        proxy = img.dataobj
        ndim = len(proxy.shape)
        axes = "xyztc"[:ndim] if ndim <= 5 else None
        self._setup_array(_ScaledProxy(proxy), axes)
        space_unit = img.header.get_xyzt_units()[0]
        factor = {"meter": 1e9, "mm": 1e6, "micron": 1e3}.get(space_unit)
        zooms = img.header.get_zooms()
        if factor is None:
            if ndim >= 3:
                zyx = tuple(float(v) for v in zooms[:3])
                self.notes.append(f"NIfTI zooms {zyx} (x, y, z) have unknown units; ignored")
            self._set_voxel_size(None)
        else:
            self._voxel_from_axes({a: float(v) * factor for a, v in zip("xyz", zooms)}, "NIfTI header")


class _ScaledProxy:
    """nibabel's proxy with the dtype its reads really have (scl_slope/inter may make it float)."""

    def __init__(self, proxy: Any) -> None:
        self.proxy, self.shape = proxy, tuple(proxy.shape)
        one_voxel = (slice(0, 1),) * len(self.shape)
        self.dtype = proxy.dtype if 0 in self.shape else np.asarray(proxy[one_voxel]).dtype

    def __getitem__(self, key: tuple) -> np.ndarray:
        return self.proxy[key]


class _HdfVolume(_ArrayVolume):
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
        ds = found[_pick_array(self, self.spec.key, listing, "dataset")]
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


def _pick_array(vol: Volume, key: str | None, found: dict[str, tuple], what: str) -> str:
    """The array named ``key`` (error listing the available ones), else autodetect."""
    listing = ", ".join(f"'{k}' {tuple(s)}" for k, (s, _) in sorted(found.items())) or "none"
    if key is not None:
        if key.strip("/") not in found:
            raise vol._fail(f"no {what} '{key}'; available {what}s: {listing}")
        return key.strip("/")
    images = {k: s for k, (s, d) in found.items() if len(s) >= 2 and np.dtype(d).kind in "biuf"}
    if not images:
        raise vol._fail(f"no >=2-D numeric {what} found (available: {listing})")
    images = {k: s for k, s in images.items() if 0 not in s} or images  # an empty one only if alone
    preferred = {k: s for k, s in images.items() if k.rsplit("/", 1)[-1].lower() in _PREFERRED_KEYS}
    pool = preferred or images
    best = max(sorted(pool), key=lambda k: int(np.prod(pool[k], dtype=np.int64)))
    if len(images) > 1:
        vol.notes.append(f"picked {what} '{best}' of {len(images)} candidates ({listing}); "
                         "set `key` to choose")
    return best


class _ZarrVolume(_ArrayVolume):
    """Zarr v2/v3 and OME-Zarr 0.4/0.5 (multiscales: `scale_level`, axes, scale -> nm)."""

    reader = "zarr"
    partial_reads = True
    options = frozenset({"axes", "channel", "key", "scale_level"})

    def _open(self) -> None:
        import zarr

        from curation.remote import open_zarr_store

        self._store = open_zarr_store(self.path)
        node = zarr.open(store=self._store, mode="r")
        key = (self.spec.key or "").strip("/")
        if key and isinstance(node, zarr.Group):
            try:  # by name first: listing members needs a store that can list (not plain HTTP)
                node = node[key]
            except KeyError:
                members = self._members(node)
                node = members[_pick_array(self, key, _zarr_arrays(members), "array")]
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
            node = members[_pick_array(self, None, _zarr_arrays(members), "array")]
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
        units = [_unit_nm(a.get("unit")) if isinstance(a, dict) else None for a in ms.get("axes", [])]

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
        from curation.remote import chunk_coords

        arr, grid = self._zarr_array, _zarr_chunks(self._zarr_array)
        boxes = []
        for key in keys:
            coords = chunk_coords(key, arr.path)
            if coords is None or len(coords) != arr.ndim:
                continue
            boxes.append(self._zyx_box([(c * g, min((c + 1) * g, n)) for c, g, n in zip(coords, grid, arr.shape)]))
        return boxes


def _box_text(box: Sequence[int]) -> str:
    return f"z {box[0]}-{box[1]}, y {box[2]}-{box[3]}, x {box[4]}-{box[5]}"


def _zarr_arrays(members: dict) -> dict[str, tuple]:
    import zarr

    return {k: (a.shape, a.dtype) for k, a in members.items() if isinstance(a, zarr.Array)}


def _zarr_chunks(arr: Any) -> tuple[int, ...]:
    """Preferred read block: the shard (one stored object) if sharded, else the chunk."""
    return getattr(arr, "shards", None) or arr.chunks


class _TensorstoreArray:
    """A tensorstore array as the lazily indexable array ``_setup_array`` expects; a region read
    waits at most three times the timeout of all tries of a request.

    Reads go through a handle that fails on absent chunks (``fill_missing_data_reads: false``);
    when one is absent, the chunks of the region are checked one by one (``missing``: their
    (start, stop) per stored axis) and the region is read with the fill value for them."""

    def __init__(self, strict: Any, lenient: Any, name: str) -> None:
        from curation.remote import RemoteSettings

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
        from curation.remote import RemoteReadError

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
        from curation.remote import RemoteReadError, is_unreadable, mark_unreadable

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


def _read_json(base: str, rel: str) -> dict | None:
    """A JSON document below a local folder or a URL; None when absent or not a JSON object."""
    if is_url(base):
        from curation.remote import _cat, _filesystem, url_join

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


class _TensorstoreVolume(_ArrayVolume):
    """Base of the formats read through tensorstore (local folders or URLs)."""

    partial_reads = True
    options = frozenset({"key", "scale_level", "channel"})

    def _open_tensorstore(self, spec: dict) -> Any:
        import tensorstore as ts

        from curation.remote import tensorstore_context

        # Chunks do not change during a run: no revalidation requests for cached ones. Two handles
        # on one context (one cache): one that fails on absent chunks, one that fills them.
        spec = {**spec, "recheck_cached_data": False}
        handles = [ts.open({**spec, "fill_missing_data_reads": fill}, read=True, context=tensorstore_context()).result()
                   for fill in (False, True)]
        # precomputed volumes may start at a voxel offset
        return _TensorstoreArray(*(h[ts.d[:].translate_to[0]] for h in handles), name=json.dumps(spec, sort_keys=True))

    def _read(self, z: slice, y: slice, x: slice) -> np.ndarray:
        self._arr.missing.clear()
        data = super()._read(z, y, x)
        if self._arr.missing:
            boxes = [self._zyx_box(cell) for cell in self._arr.missing]
            self._arr.missing.clear()
            self._found_missing(boxes)
        return data


class _N5Volume(_TensorstoreVolume):
    """N5 (e.g. OpenOrganelle's ``<dataset>.n5/em/fibsem-uint8/s0..sN``) via tensorstore. ``key``
    names the multiscale group or array below the container; ``scale_level`` picks ``sN``. Voxel
    size from ``pixelResolution`` / ``resolution`` (x, y, z) or COSEM ``transform`` attributes."""

    reader = "n5"

    def _open(self) -> None:
        from curation.remote import tensorstore_kvstore, url_join

        base = url_join(self.path, self.spec.key or "") if is_url(self.path) else os.path.join(self.path, self.spec.key or "")
        attrs = _read_json(base, "attributes.json") or {}  # optional for N5 groups
        if "dimensions" in attrs:  # an array, one level
            levels, level_attrs = [""], [attrs]
        else:
            ms = attrs.get("multiscales") or []
            paths = [d.get("path", "") for d in ms[0].get("datasets", [])] if ms and isinstance(ms[0], dict) else []
            levels, level_attrs = [], []
            for k, rel in enumerate(paths or (f"s{n}" for n in range(64))):
                found = _read_json(base, f"{rel}/attributes.json")
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
        unit = _unit_nm(res.get("unit", "nm"))
        x, y, z = (float(v) for v in res["dimensions"])
        return (z * unit, y * unit, x * unit) if unit else None
    if isinstance(attrs.get("resolution"), list) and len(attrs["resolution"]) == 3:
        x, y, z = (float(v) for v in attrs["resolution"])  # nm by convention (BigDataViewer, CREMI)
        return (z, y, x)
    transform = attrs.get("transform")
    if isinstance(transform, dict) and len(transform.get("axes", [])) == 3:
        units = [_unit_nm(u) for u in transform.get("units", ["nm"] * 3)]
        by_axis = {a: float(s) * u for a, s, u in zip(transform["axes"], transform.get("scale", []), units) if u}
        if set(by_axis) == set("zyx"):
            return (by_axis["z"], by_axis["y"], by_axis["x"])
    return None


class _PrecomputedVolume(_TensorstoreVolume):
    """Neuroglancer precomputed (``info`` + scales, raw / jpeg / compressed segmentation, sharded or
    not) via tensorstore; ``scale_level`` picks a scale; voxel size from its ``resolution``."""

    reader = "precomputed"

    def _open(self) -> None:
        from curation.remote import strip_precomputed, tensorstore_kvstore

        base = strip_precomputed(self.path)
        info = _read_json(base, "info")
        if info is None or not info.get("scales"):
            raise self._fail("no Neuroglancer precomputed `info` with scales")
        sizes = [tuple(float(v) for v in sc.get("resolution", [])[::-1]) or None for sc in info["scales"]]
        level = self._pick_level([v if v and len(v) == 3 else None for v in sizes])
        arr = self._open_tensorstore({"driver": "neuroglancer_precomputed", "kvstore": tensorstore_kvstore(base),
                                      "scale_index": level})
        self._setup_array(arr, "xyzc", chunks=arr.chunks)
        self._set_voxel_size(sizes[level] if sizes[level] and len(sizes[level]) == 3 else None, "precomputed info")


# --------------------------------------------------------------------------- page/slice formats


class _FolderStack(Volume):
    """A folder of same-shape 2D images (natural sort: iso.2.png before iso.10.png) as one volume;
    headers are checked at open, a z-range decodes only its files."""

    reader = "folder"
    options = frozenset({"channel", "stack"})

    def _open(self) -> None:
        if not os.path.isdir(self.path):
            raise self._fail("stack=True needs a folder of 2D images, but this is not a folder")
        names = [n for n in natural_sorted(os.listdir(self.path)) if not n.startswith(".")
                 and os.path.isfile(os.path.join(self.path, n))]
        self.files = [os.path.join(self.path, n) for n in names if n.lower().endswith(IMAGE_EXTS)]
        if not self.files:
            raise self._fail("folder contains no 2D image files (png, jpg, jpeg, tif, tiff)")
        if len(self.files) < len(names):
            self.notes.append(f"ignored {len(names) - len(self.files)} non-image file(s)")
        first = None
        for f in self.files:
            shape, dtype = _probe_2d(f)
            if first is None:
                first = (shape, dtype, f)
            elif (shape, dtype) != first[:2]:
                name, first_name = os.path.basename(f), os.path.basename(first[2])
                raise self._fail(f"slice '{name}' is {shape} {dtype} but '{first_name}' is {first[0]} "
                                 f"{first[1]}; all slices of a stack must share shape and dtype")
        assert first is not None
        self.shape, self.dtype = (len(self.files), *first[0]), first[1]  # type: ignore[assignment]
        self.is_volume, self.chunk_zyx = True, (1, *first[0])  # type: ignore[assignment]
        self._set_voxel_size(None)

    def _read(self, z: slice, y: slice, x: slice) -> np.ndarray:
        planes = []
        for k in range(z.start, z.stop, z.step):
            with open_volume(SourceSpec(self.files[k], channel=self.spec.channel)) as v:
                planes.append(v.read(slice(None), y, x)[0])
        return np.stack(planes)


def _probe_2d(path: str) -> tuple[tuple[int, int], np.dtype]:
    """(y, x) and grey dtype of a 2D image file from its header; ReaderError if unreadable / 3D."""
    try:
        if path.lower().endswith((".tif", ".tiff")):
            with open_volume(path) as v:
                if v.is_volume:
                    raise ReaderError(path, f"is a {v.shape[0]}-slice volume, not a 2D image")
                return v.shape[1:], v.dtype  # type: ignore[return-value]
        return _pil_probe(path)
    except ReaderError:
        raise
    except Exception as e:
        raise ReaderError(path, f"unreadable image header ({type(e).__name__}: {e})") from e


class _VideoVolume(Volume):
    """AVI / MP4 / MOV / MKV via PyAV: frames are z, converted to grey (RGB pixel formats with the
    exact 601 luma). Frames are counted by demuxing packets, since headers often omit or misstate
    the count; reads decode forward from the last position and restart only to go back."""

    reader = "video"
    _container: Any = None

    def _open(self) -> None:
        import av

        with av.open(self.path) as container:
            if not container.streams.video:
                raise self._fail("has no video stream")
            stream = container.streams.video[0]
            pix = stream.codec_context.pix_fmt or ""
            n = sum(1 for packet in container.demux(stream) if packet.size)
        if n == 0:
            raise self._fail("empty volume: the video has no frames")
        self._format = ("gray16le" if pix.startswith("gray") and pix not in ("gray", "gray8") else
                        "rgb24" if pix.startswith(("rgb", "bgr", "argb", "abgr", "gbr")) else "gray")
        self._restart()
        first = self._frame(0)
        self.shape, self.chunk_zyx = (n, *first.shape), (1, *first.shape)  # type: ignore[assignment]
        self.dtype, self.is_volume = first.dtype, True
        self._set_voxel_size(None)

    def _restart(self) -> None:
        import av

        self.close()
        self._container = av.open(self.path)
        self._closers.append(self._container)
        self._decoder = self._container.decode(self._container.streams.video[0])
        self._next, self._last = 0, None

    def _frame(self, i: int) -> np.ndarray:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        if i < self._next:
            self._restart()
        while self._next <= i:
            frame = next(self._decoder, None)
            if frame is None:
                raise self._fail(f"video ended after {self._next} decodable frames; frame {i} was asked for")
            self._next += 1
        grey = frame.to_ndarray(format=self._format)
        grey = _luma(grey) if self._format == "rgb24" else grey
        self._last = (i, grey)
        return grey

    def _read(self, z: slice, y: slice, x: slice) -> np.ndarray:
        return np.stack([self._frame(i)[y, x] for i in range(z.start, z.stop, z.step)])


# --------------------------------------------------------------------------- dispatch


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and (
        path.name.lower().endswith(".zarr")
        or any((path / m).is_file() for m in ("zarr.json", ".zgroup", ".zarray"))
    )


def is_store_dir(path: str | os.PathLike) -> bool:
    """A folder that is one chunked store (zarr, N5, precomputed): one source, never walked."""
    p = Path(path)
    return p.is_dir() and (_is_zarr_dir(p) or _local_store_reader(p) is not None)


_ZARR_METADATA = (".zarray", ".zattrs", ".zgroup", "zarr.json")


def _zarr_metadata_files(root: Path) -> list[Path]:
    """Metadata files of a zarr store, groups descended, arrays not listed (an array folder may
    hold millions of chunk files)."""
    found, todo = [], [root]
    while todo:
        folder = todo.pop()
        found += [folder / m for m in _ZARR_METADATA if (folder / m).is_file()]
        is_array = (folder / ".zarray").is_file() or (
            (folder / "zarr.json").is_file() and '"array"' in (folder / "zarr.json").read_text(errors="replace"))
        if not is_array:
            todo += sorted(folder / n for n in os.listdir(folder) if (folder / n).is_dir())
    return found


def source_files(path: str | os.PathLike, key: str | None = None) -> list[Path]:
    """The files whose sizes and modification times stand for a source's content (no decoding).

    A file (with, for a detached NRRD header, its data files: same stem, same folder); a folder
    of slices: its image files; a zarr store: its metadata files only, since listing every chunk
    of a large store would cost minutes (so a chunk rewritten in place goes unnoticed); an N5 or
    precomputed folder: its ``info`` / ``attributes.json`` and those below ``key`` and its levels.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".nhdr":
            stem = p.name[: -len(".nhdr")]
            return [p] + sorted(q for q in p.parent.glob(glob_escape(stem) + ".*") if q != p and q.is_file())
        return [p]
    if _is_zarr_dir(p):
        return _zarr_metadata_files(p)
    if is_store_dir(p):  # N5 / precomputed: the root's, the key's and the levels' metadata documents
        node = p / key.strip("/") if key else p
        found = [p / "info", p / "attributes.json", node / "attributes.json", *sorted(node.glob("*/attributes.json"))]
        return list(dict.fromkeys(f for f in found if f.is_file()))
    if p.is_dir():
        return [p / n for n in natural_sorted(os.listdir(p))
                if not n.startswith(".") and n.lower().endswith(IMAGE_EXTS) and (p / n).is_file()]
    return []


def source_fingerprint(path: str | os.PathLike, key: str | None = None) -> str:
    """A short digest of :func:`source_files`' names, sizes and mtimes: changes when the data does.
    A URL: a digest of its metadata documents and their ETags (ReaderError when unreachable)."""
    if is_url(os.fspath(path)):
        from curation.remote import remote_fingerprint

        return remote_fingerprint(os.fspath(path), key)
    root = Path(path)
    digest = hashlib.sha1()
    for f in source_files(root, key):
        st = f.stat()
        rel = f.relative_to(root) if f != root and root in f.parents else f.name
        digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _local_store_reader(p: Path) -> type[Volume] | None:
    """N5 or precomputed folders (zarr is recognised by _is_zarr_dir)."""
    if p.name.lower().endswith(".n5") or (p / "attributes.json").is_file():
        return _N5Volume
    if (p / "info").is_file() and _read_json(str(p), "info") is not None:
        return _PrecomputedVolume
    return None


def reader_for(path: str | os.PathLike) -> type[Volume] | str:
    """The reader class for ``path`` (a URL: from its name or metadata), or a one-sentence reason
    why there is none."""
    if is_url(os.fspath(path)):
        from curation.remote import remote_format

        try:
            fmt = remote_format(os.fspath(path))
        except ReaderError as e:
            return e.problem
        return {"zarr": _ZarrVolume, "n5": _N5Volume, "precomputed": _PrecomputedVolume}[fmt]
    p = Path(path)
    if p.is_dir():
        return _ZarrVolume if _is_zarr_dir(p) else (_local_store_reader(p) or _FolderStack)
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _NiftiVolume
    base, outer = os.path.splitext(name)
    compressed = outer in (".gz", ".bz2", ".xz", ".zip")
    inner = os.path.splitext(base)[1] if compressed else outer
    if inner in _MRC_EXTS and outer not in (".xz", ".zip"):  # mrcfile reads .gz / .bz2 itself
        return _MrcVolume
    if compressed:
        return f"compressed file ('{outer}'): decompress it first" + (f" (a '{inner}' inside)" if inner else "")
    table = {".png": _PilImage, ".jpg": _PilImage, ".jpeg": _PilImage, ".tif": _TiffVolume,
             ".tiff": _TiffVolume, ".nrrd": _NrrdVolume, ".nhdr": _NrrdVolume, ".h5": _HdfVolume,
             ".hdf5": _HdfVolume, ".hdf": _HdfVolume, **{e: _VideoVolume for e in _VIDEO_EXTS}}
    if outer in table:
        return table[outer]
    return f"unknown file type '{outer}'" if outer else "file has no extension; type unknown"


def open_volume(spec: SourceSpec | str | os.PathLike) -> Volume:
    """Open one source (a SourceSpec or a path) with the reader its extension / content calls for.

    A folder is a zarr store if it looks like one, else a stack of 2D slices. Raises ReaderError.
    """
    if not isinstance(spec, SourceSpec):
        spec = SourceSpec(os.fspath(spec))
    if is_url(spec.path):
        return _open_url(spec)
    p = Path(spec.path)
    if not p.exists():
        raise ReaderError(spec.path, "does not exist")
    if p.is_file() and p.stat().st_size == 0:
        raise ReaderError(spec.path, "empty file (0 bytes)")
    cls = reader_for(p)
    if isinstance(cls, str):
        raise ReaderError(spec.path, cls)
    if spec.stack and cls is not _FolderStack:
        raise ReaderError(spec.path, "stack=True needs a folder of 2D images")
    try:
        return cls(spec)
    except ReaderError:
        raise
    except Exception as e:  # library errors -> one sentence naming the file and the problem
        raise ReaderError(spec.path, f"unreadable {cls.reader} source, truncated or corrupt? "
                                     f"({type(e).__name__}: {e})".replace("\n", " ")) from e


def _open_url(spec: SourceSpec) -> Volume:
    cls = reader_for(spec.path)
    if isinstance(cls, str):
        raise ReaderError(spec.path, cls)
    if spec.stack:
        raise ReaderError(spec.path, "stack=True needs a folder of 2D images, not a URL")
    try:
        return cls(spec)
    except ReaderError:
        raise
    except Exception as e:  # network and library errors -> one sentence naming the URL
        raise ReaderError(spec.path, f"unreadable remote {cls.reader} source ({type(e).__name__}: {e})"
                          .replace("\n", " ")) from e


def describe(volume: Volume) -> dict:
    """JSON-able summary of an opened volume for reports."""
    return {
        "name": volume.name,
        "path": volume.path,
        "reader": volume.reader,
        "shape": list(volume.shape),
        "dtype": str(volume.dtype),
        "voxel_size": list(volume.voxel_size) if volume.voxel_size else None,
        "voxel_size_from": volume.voxel_size_from,
        "is_volume": volume.is_volume,
        "chunk_zyx": list(volume.chunk_zyx),
        "offset_zyx": list(volume.offset),
        "notes": list(volume.notes),
    }


def discover(
    paths: Sequence[str | os.PathLike], *, stack_folders: bool = False
) -> tuple[list[SourceSpec], list[tuple[str, str]]]:
    """Expand files and folders (recursively) into sources, in a deterministic (natural) order.

    Each readable file is one source; a zarr folder is one source (not descended into); with
    ``stack_folders`` a folder whose readable files are >= 2 same-shape 2D images becomes one
    stacked volume. Returns ``(specs, skipped)`` with ``skipped = [(path, problem)]`` for
    missing paths, empty files and unknown / compressed file types. Files are not decoded.
    """
    specs: list[SourceSpec] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()  # sources added (real paths): overlapping inputs give each once
    walked: set[str] = set()  # folders visited: guards against symlink loops

    dataset: str | None = None  # the folder argument being walked: its sources form one dataset

    def add(path: Path, stack: bool = False) -> None:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            specs.append(SourceSpec(str(path), stack=stack, dataset=dataset))

    def visit_file(path: Path) -> bool:
        problem = reader_for(path)
        if not isinstance(problem, str) and path.stat().st_size == 0:
            problem = "empty file (0 bytes)"
        if isinstance(problem, str):
            skipped.append((str(path), problem))
            return False
        return True

    def walk(folder: Path) -> None:
        if os.path.realpath(folder) in walked:
            return  # symlink loop or folder given twice
        walked.add(os.path.realpath(folder))
        entries = [folder / n for n in natural_sorted(os.listdir(folder)) if not n.startswith(".")]
        files = [e for e in entries if e.is_file() and visit_file(e)]
        if stack_folders and _stackable(files):
            add(folder, stack=True)
        else:
            for f in files:
                add(f)
        for d in (e for e in entries if e.is_dir()):
            if is_store_dir(d):
                add(d)
            else:
                walk(d)

    for raw in paths:
        if is_url(os.fspath(raw)):  # a URL is one source, checked when it is opened
            if os.fspath(raw) not in seen:
                seen.add(os.fspath(raw))
                specs.append(SourceSpec(os.fspath(raw)))
            continue
        p = Path(raw)
        if not p.exists():
            skipped.append((str(p), "does not exist"))
        elif is_store_dir(p):
            add(p)
        elif p.is_dir():
            dataset = default_name(p)
            walk(p)
            dataset = None
        elif visit_file(p):
            add(p)
    return assign_names(specs), skipped


def _stackable(files: list[Path]) -> bool:
    """>= 2 files, all 2D images with one shape and dtype (headers only)."""
    if len(files) < 2 or not all(f.name.lower().endswith(IMAGE_EXTS) for f in files):
        return False
    try:
        return len({_probe_2d(str(f)) for f in files}) == 1
    except ReaderError:
        return False
