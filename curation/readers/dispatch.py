"""Which reader a path or URL calls for, and opening a source with it."""

from __future__ import annotations

import os
from pathlib import Path

from curation.manifest import ReaderError, SourceSpec, is_url
from curation.readers import images, tiff
from curation.readers.base import Volume, check_file, open_with
from curation.readers.hdf5 import HdfVolume
from curation.readers.images import PilImage
from curation.readers.mrc import MRC_EXTS, MrcVolume
from curation.readers.n5 import N5Volume
from curation.readers.nifti import NiftiVolume
from curation.readers.nrrd import NrrdVolume
from curation.readers.precomputed import PrecomputedVolume
from curation.readers.stack import FolderStack
from curation.readers.tensorstore import read_json
from curation.readers.tiff import TiffVolume
from curation.readers.video import VIDEO_EXTS, VideoVolume
from curation.readers.zarr import ZarrVolume
from curation.remote import remote_format


def is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and (
        path.name.lower().endswith(".zarr")
        or any((path / m).is_file() for m in ("zarr.json", ".zgroup", ".zarray"))
    )


def is_store_dir(path: str | os.PathLike) -> bool:
    """A folder that is one chunked store (zarr, N5, precomputed): one source, never walked."""
    p = Path(path)
    return p.is_dir() and (is_zarr_dir(p) or local_store_reader(p) is not None)


def local_store_reader(p: Path) -> type[Volume] | None:
    """N5 or precomputed folders (zarr is recognised by is_zarr_dir)."""
    if p.name.lower().endswith(".n5") or (p / "attributes.json").is_file():
        return N5Volume
    if (p / "info").is_file() and read_json(str(p), "info") is not None:
        return PrecomputedVolume
    return None


def reader_for(path: str | os.PathLike) -> type[Volume] | str:
    """The reader class for ``path`` (a URL: from its name or metadata), or a one-sentence reason
    why there is none."""
    if is_url(os.fspath(path)):
        try:
            fmt = remote_format(os.fspath(path))
        except ReaderError as e:
            return e.problem
        return {"zarr": ZarrVolume, "n5": N5Volume, "precomputed": PrecomputedVolume}[fmt]
    p = Path(path)
    if p.is_dir():
        return ZarrVolume if is_zarr_dir(p) else (local_store_reader(p) or FolderStack)
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return NiftiVolume
    base, outer = os.path.splitext(name)
    compressed = outer in (".gz", ".bz2", ".xz", ".zip")
    inner = os.path.splitext(base)[1] if compressed else outer
    if inner in MRC_EXTS and outer not in (".xz", ".zip"):  # mrcfile reads .gz / .bz2 itself
        return MrcVolume
    if compressed:
        return f"compressed file ('{outer}'): decompress it first" + (f" (a '{inner}' inside)" if inner else "")
    table = {**dict.fromkeys(images.EXTENSIONS, PilImage), **dict.fromkeys(tiff.EXTENSIONS, TiffVolume),
             ".nrrd": NrrdVolume, ".nhdr": NrrdVolume, ".h5": HdfVolume,
             ".hdf5": HdfVolume, ".hdf": HdfVolume, **{e: VideoVolume for e in VIDEO_EXTS}}
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
    check_file(spec)
    cls = reader_for(spec.path)
    if isinstance(cls, str):
        raise ReaderError(spec.path, cls)
    if spec.stack and cls is not FolderStack:
        raise ReaderError(spec.path, "stack=True needs a folder of 2D images")
    return open_with(cls, spec)


def _open_url(spec: SourceSpec) -> Volume:
    cls = reader_for(spec.path)
    if isinstance(cls, str):
        raise ReaderError(spec.path, cls)
    if spec.stack:
        raise ReaderError(spec.path, "stack=True needs a folder of 2D images, not a URL")
    return open_with(cls, spec, remote=True)


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
