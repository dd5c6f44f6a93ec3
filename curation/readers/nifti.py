"""NIfTI-1/2 (nibabel)."""

from __future__ import annotations

from typing import Any

import numpy as np

from curation.readers.base import ArrayVolume


class NiftiVolume(ArrayVolume):
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
