"""Readers: every EM source a lab has -> uniform, chunked, greyscale (z, y, x) access.

``open_volume(spec)`` picks a reader by extension / folder content and returns a :class:`Volume`:
``shape`` (z, y, x), ``dtype`` after grey conversion, ``voxel_size`` in nm and ``read(z, y, x)``
that decodes only what a sub-range needs (memory maps, HDF5/zarr chunks, TIFF pages, slice files,
video frames). Array formats share :class:`~curation.readers.base.ArrayVolume`, which maps the
stored axis order (``tczyxs``) to (z, y, x), picks a channel, drops singleton t/c axes and turns
RGB(A) into grey. ``discover`` expands folders into sources, ``load_manifest`` reads a manifest;
``describe`` summarises a volume for reports. A source may be a URL (``http(s)://``, ``s3://``,
``gs://``; see :mod:`curation.remote`) for zarr, OME-Zarr, N5 and Neuroglancer precomputed; a
manifest ``roi`` narrows any volume to a box. Bad input raises :class:`ReaderError`
(``"{path}: {problem}"``). See ``docs/readers.md``.

Modules: ``base`` (Volume, ArrayVolume, shared helpers); one per format: ``tiff``, ``images``
(PNG / JPEG), ``mrc``, ``nrrd``, ``nifti``, ``hdf5``, ``zarr``, ``n5`` and ``precomputed`` (both
over ``tensorstore``), ``stack`` (a folder of 2D slices), ``video``; ``dispatch`` (which reader,
``open_volume``), ``discovery`` (folders and manifests -> sources), ``fingerprint`` (has a
source changed).
"""

from curation.manifest import ReaderError, SourceSpec, is_url
from curation.readers.base import IMAGE_EXTS, VOXEL_NM_RANGE, ArrayVolume, Volume
from curation.readers.discovery import discover, load_manifest
from curation.readers.dispatch import describe, is_store_dir, open_volume, reader_for
from curation.readers.fingerprint import source_files, source_fingerprint
from curation.readers.stack import FolderStack

__all__ = [
    "ReaderError", "SourceSpec", "Volume", "ArrayVolume", "FolderStack", "open_volume", "discover", "describe", "load_manifest",
    "reader_for", "is_store_dir", "source_files", "source_fingerprint", "IMAGE_EXTS", "VOXEL_NM_RANGE", "is_url",
]
