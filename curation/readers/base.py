"""The reader base classes: :class:`Volume` (an opened source, (z, y, x) access, ROI, voxel
size rules, missing-chunk bookkeeping) and :class:`ArrayVolume` (formats that expose an N-D
array: axis order, channel, RGB -> grey), and what every format module shares."""

from __future__ import annotations

import abc
import contextlib
import math
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from curation.manifest import ReaderError, SourceSpec, assign_names, check_axes, is_url
from curation.remote import RemoteReadError

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
_PREFERRED_KEYS = ("stack", "raw", "data", "volume")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")  # 2D image files (tif may also be 3D)


def unit_nm(unit: Any) -> float | None:
    """Size of one ``unit`` in nm (None if unknown/absent)."""
    if not isinstance(unit, str):
        return None
    return _UNIT_NM.get(unit.strip().lower().replace("\\u00b5", "µ"))


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


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of the last axis (RGB or RGBA), bit-exact with PIL's ``convert('L')``."""
    r, g, b = (rgb[..., i] for i in range(3))
    if rgb.dtype.kind in "biu" and rgb.dtype.itemsize <= 4:
        # PIL: L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; equal channels give that channel.
        out = (r.astype(np.int64) * 19595 + g.astype(np.int64) * 38470 + b.astype(np.int64) * 7471
               + 0x8000) >> 16
    else:
        out = r * 0.299 + g * 0.587 + b * 0.114
    return out.astype(rgb.dtype)




class ArrayVolume(Volume):
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
            data = luma(data)
        if "z" not in kept:
            data = data[None]
        return self._lut[data] if self._lut is not None else data


def pick_array(vol: Volume, key: str | None, found: dict[str, tuple], what: str) -> str:
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


def _box_text(box: Sequence[int]) -> str:
    return f"z {box[0]}-{box[1]}, y {box[2]}-{box[3]}, x {box[4]}-{box[5]}"


def check_file(spec: SourceSpec) -> None:
    """ReaderError unless ``spec.path`` exists and, if a file, is not empty."""
    p = Path(spec.path)
    if not p.exists():
        raise ReaderError(spec.path, "does not exist")
    if p.is_file() and p.stat().st_size == 0:
        raise ReaderError(spec.path, "empty file (0 bytes)")


def open_with(cls: type[Volume], spec: SourceSpec, remote: bool = False) -> Volume:
    """``cls(spec)``, a library's error turned into one ReaderError sentence naming the source."""
    try:
        return cls(spec)
    except ReaderError:
        raise
    except Exception as e:  # library (and, remote, network) errors -> one sentence naming the source
        problem = (f"unreadable remote {cls.reader} source ({type(e).__name__}: {e})" if remote else
                   f"unreadable {cls.reader} source, truncated or corrupt? ({type(e).__name__}: {e})")
        raise ReaderError(spec.path, problem.replace("\n", " ")) from e
