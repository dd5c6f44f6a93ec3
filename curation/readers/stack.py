"""A folder of same-shape 2D images (PNG / JPEG / TIFF) as one volume."""

from __future__ import annotations

import os

import numpy as np

from curation.manifest import ReaderError, SourceSpec, natural_sorted
from curation.readers import images, tiff
from curation.readers.base import IMAGE_EXTS, Volume, check_file, open_with
from curation.readers.images import PilImage, pil_probe
from curation.readers.tiff import TiffVolume

# The reader of each slice file, by extension (a stack may mix PNG and TIFF slices).
_SLICE_READERS: dict[str, type[Volume]] = {**dict.fromkeys(tiff.EXTENSIONS, TiffVolume),
                                           **dict.fromkeys(images.EXTENSIONS, PilImage)}


def open_slice(spec: SourceSpec) -> Volume:
    """Open one 2D image file of a stack (ReaderError naming it if it cannot be read)."""
    check_file(spec)
    return open_with(_SLICE_READERS[os.path.splitext(spec.path)[1].lower()], spec)


class FolderStack(Volume):
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
            shape, dtype = probe_2d(f)
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
            with open_slice(SourceSpec(self.files[k], channel=self.spec.channel)) as v:
                planes.append(v.read(slice(None), y, x)[0])
        return np.stack(planes)


def probe_2d(path: str) -> tuple[tuple[int, int], np.dtype]:
    """(y, x) and grey dtype of a 2D image file from its header; ReaderError if unreadable / 3D."""
    try:
        if path.lower().endswith((".tif", ".tiff")):
            with open_slice(SourceSpec(path)) as v:
                if v.is_volume:
                    raise ReaderError(path, f"is a {v.shape[0]}-slice volume, not a 2D image")
                return v.shape[1:], v.dtype  # type: ignore[return-value]
        return pil_probe(path)
    except ReaderError:
        raise
    except Exception as e:
        raise ReaderError(path, f"unreadable image header ({type(e).__name__}: {e})") from e
