"""Output stores: an OME-Zarr 0.5 image (zarr v3) with a multiscale pyramid, and TIFF / HDF5 copies.

Layout of ``OUT.ome.zarr`` (names documented in ``docs/segment.md``):

* the root group is an OME image: the **first** requested output (``probabilities`` if asked
  for, else ``labels``), level 0 at ``0``, coarser levels ``1``, ``2``...;
* with both outputs, the labels are an NGFF label image at ``labels/segmentation`` (with
  ``image-label`` metadata pointing back to the root image).

Probabilities are uint8 (``round(255 * p)``); a binary model has one channel (foreground) and no
``c`` axis, so level 0 has exactly the input's (z, y, x) shape; multi-class and instance outputs
have a leading ``c`` axis. The pyramid halves y and x (and z when the voxels are near-isotropic)
per level, averaging probabilities and subsampling labels, one chunk at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["create_image", "write_multiscales", "build_pyramid", "array_chunks", "copy_to_tiff", "copy_to_hdf5"]

MIN_PYRAMID_SIDE = 256  # stop halving once y or x would drop below this


def create_image(root: Any, prefix: str, shape: Sequence[int], chunks: Sequence[int], dtype: Any) -> Any:
    """Level 0 array ``{prefix}/0`` of a new image in the open zarr group ``root`` (fill 0)."""
    name = f"{prefix}/0" if prefix else "0"
    return root.create_array(name, shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=0,
                             overwrite=True)


def _axes(channels: bool, voxel_size: Sequence[float] | None) -> list[dict[str, Any]]:
    axes: list[dict[str, Any]] = [{"name": "c", "type": "channel"}] if channels else []
    for name in "zyx":
        axis: dict[str, Any] = {"name": name, "type": "space"}
        if voxel_size is not None:
            axis["unit"] = "nanometer"
        axes.append(axis)
    return axes


def pyramid_factors(shape_zyx: Sequence[int], voxel_size: Sequence[float] | None) -> list[tuple[int, int, int]]:
    """Cumulative (z, y, x) downsampling factor of every level (level 0 = (1, 1, 1))."""
    iso_z = voxel_size is not None and voxel_size[0] <= 1.25 * voxel_size[2] and shape_zyx[0] > 1
    factors = [(1, 1, 1)]
    while True:
        fz, fy, fx = factors[-1]
        if min(math.ceil(shape_zyx[1] / (2 * fy)), math.ceil(shape_zyx[2] / (2 * fx))) < MIN_PYRAMID_SIDE:
            return factors
        factors.append((fz * 2 if iso_z and shape_zyx[0] // (2 * fz) >= 1 else fz, fy * 2, fx * 2))


def write_multiscales(group: Any, name: str, channels: bool, voxel_size: Sequence[float] | None,
                      factors: Sequence[tuple[int, int, int]], label_source: str | None = None) -> None:
    """OME 0.5 ``multiscales`` (and ``image-label``) attributes of an image group."""
    base = list(voxel_size) if voxel_size is not None else [1.0, 1.0, 1.0]
    datasets = []
    for level, f in enumerate(factors):
        scale = [b * k for b, k in zip(base, f)]
        datasets.append({"path": str(level),
                         "coordinateTransformations": [{"type": "scale", "scale": ([1.0] if channels else []) + scale}]})
    ome: dict[str, Any] = {"version": "0.5", "multiscales": [{"name": name, "axes": _axes(channels, voxel_size),
                                                              "datasets": datasets}]}
    if label_source is not None:
        ome["image-label"] = {"source": {"image": label_source}}
    group.attrs.update({"ome": ome})


def array_chunks(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """Every chunk-aligned region of an array."""
    import itertools

    ranges = [range(0, n, c) for n, c in zip(shape, chunks)]
    for starts in itertools.product(*ranges):
        yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunks, shape))


def _downsample(block: np.ndarray, factor: Sequence[int], average: bool) -> np.ndarray:
    """Downsample the last three axes by ``factor`` (mean, or the first voxel of each cell)."""
    lead = block.ndim - 3
    if not average:
        return block[(slice(None),) * lead + tuple(slice(None, None, f) for f in factor)]
    pad = [(0, 0)] * lead + [(0, (-n) % f) for n, f in zip(block.shape[lead:], factor)]
    block = np.pad(block.astype(np.float32), pad, mode="edge")
    shape = list(block.shape[:lead])
    for n, f in zip(block.shape[lead:], factor):
        shape += [n // f, f]
    out = block.reshape(shape).mean(axis=tuple(lead + 2 * i + 1 for i in range(3)))
    return np.rint(out).astype(np.uint8)


def build_pyramid(group: Any, prefix: str, factors: Sequence[tuple[int, int, int]], average: bool) -> None:
    """Levels 1.. of an image from level 0, chunk by chunk (memory: one chunk of each level)."""
    src = group[f"{prefix}/0" if prefix else "0"]
    for level in range(1, len(factors)):
        step = tuple(a // b for a, b in zip(factors[level], factors[level - 1]))
        lead = src.ndim - 3
        shape = src.shape[:lead] + tuple(math.ceil(n / f) for n, f in zip(src.shape[lead:], step))
        chunks = src.chunks[:lead] + tuple(max(1, c // f) for c, f in zip(src.chunks[lead:], step))
        name = f"{prefix}/{level}" if prefix else str(level)
        dst = group.create_array(name, shape=shape, chunks=chunks, dtype=src.dtype, fill_value=0, overwrite=True)
        for region in array_chunks(shape, chunks):
            lead_sl, sp = region[:lead], region[lead:]
            src_sl = lead_sl + tuple(slice(s.start * f, min(s.stop * f, n)) for s, f, n in zip(sp, step, src.shape[lead:]))
            dst[region] = _downsample(np.asarray(src[src_sl]), step, average)
        src = dst


def _zslices(arr: Any, chunk_z: int) -> Iterator[np.ndarray]:
    lead = arr.ndim - 3
    for z0 in range(0, arr.shape[lead], chunk_z):
        block = np.asarray(arr[(slice(None),) * lead + (slice(z0, z0 + chunk_z),)])
        for k in range(block.shape[lead]):
            yield block[(slice(None),) * lead + (k,)]


def copy_to_tiff(arr: Any, path: Path, voxel_size: Sequence[float] | None) -> None:
    """Write a zarr array (z, y, x) or (c, z, y, x) to a BigTIFF, one z slab of chunks at a time."""
    import tifffile

    lead = arr.ndim - 3
    chunk_z = arr.chunks[lead]
    if lead:  # tifffile writes pages in order: channel-major ("CZYX" as C*Z pages)
        def pages() -> Iterator[np.ndarray]:
            for c in range(arr.shape[0]):
                for z0 in range(0, arr.shape[1], chunk_z):
                    yield from np.asarray(arr[c, z0: z0 + chunk_z])
        data, axes = pages(), "CZYX"
    else:
        data, axes = _zslices(arr, chunk_z), "ZYX"
    metadata: dict[str, Any] = {"axes": axes}
    if voxel_size is not None:
        metadata.update(PhysicalSizeZ=voxel_size[0], PhysicalSizeY=voxel_size[1], PhysicalSizeX=voxel_size[2],
                        PhysicalSizeZUnit="nm", PhysicalSizeYUnit="nm", PhysicalSizeXUnit="nm")
    tifffile.imwrite(path, data=data, shape=arr.shape, dtype=arr.dtype, bigtiff=True, ome=True, metadata=metadata)


def copy_to_hdf5(arrays: dict[str, Any], path: Path, voxel_size: Sequence[float] | None) -> None:
    """Write zarr arrays as HDF5 datasets (same names), chunk by chunk; ``element_size_um`` attributes."""
    import h5py

    with h5py.File(path, "w") as h5:
        for name, arr in arrays.items():
            chunks = tuple(min(c, n) for c, n in zip(arr.chunks, arr.shape))
            ds = h5.create_dataset(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks, compression="gzip")
            for region in array_chunks(arr.shape, arr.chunks):
                ds[region] = np.asarray(arr[region])
            if voxel_size is not None:
                ds.attrs["element_size_um"] = [v / 1000.0 for v in voxel_size]
