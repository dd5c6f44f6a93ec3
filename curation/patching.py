"""Cutting volumes into 2D planes and planes into patches.

Planes: ``xy`` always; ``xz`` and ``yz`` too when the volume is near-isotropic,
``|sx - sz| / sx <= max_anisotropy`` with voxel size (sz, sy, sx). A file without a voxel size
counts as isotropic, as in CEM500K (SimpleITK's default spacing is 1, 1, 1); the report says so.
Unlike CEM500K (``np.arange(0, n - 1, spacing)``) the last slice is not dropped.

Patches: a non-overlapping grid of ``P x P`` from (0, 0). A leftover strip at the right or bottom
edge at least ``ceil(P / 2)`` wide becomes a truncated edge patch; a narrower one is dropped.
So an image smaller than one patch but at least half a patch in both sides gives one truncated
patch, and an image less than half a patch in either side gives none (it is reported as too
small). CEM500K rounds the patch count (``round(size / P)``, Python's half-to-even) and keeps at
least one patch of any image however tiny; we keep every strip of >= P/2, and drop tiny images.
"""

from __future__ import annotations

import math

import numpy as np

AXES = ("xy", "xz", "yz")
AXIS_DIM = {"xy": 0, "xz": 1, "yz": 2}  # which (z, y, x) dimension a plane is cut along


def anisotropy(voxel_size: tuple[float, float, float] | None) -> float:
    """CEM500K's anisotropy ``|sx - sz| / sx``; 0 when the voxel size is unknown."""
    if voxel_size is None:
        return 0.0
    sz, _, sx = voxel_size
    return abs(sx - sz) / sx if sx else math.inf


def plan_planes(
    shape_zyx: tuple[int, int, int],
    voxel_size: tuple[float, float, float] | None,
    *,
    is_volume: bool,
    patch_size: int,
    max_anisotropy: float = 0.25,
    axes: str = "auto",
) -> list[str]:
    """Which planes to cut: ``xy`` always, ``xz``/``yz`` for near-isotropic volumes.

    ``axes`` may force a comma-separated subset (e.g. ``"xy"``), still limited to planes that can
    hold a patch (a plane needs at least half a patch in both sides).
    """
    if not is_volume or shape_zyx[0] == 1:
        return ["xy"]
    if axes == "auto":
        wanted = list(AXES) if anisotropy(voxel_size) <= max_anisotropy else ["xy"]
    else:
        wanted = [a.strip() for a in axes.split(",") if a.strip()]
        unknown = set(wanted) - set(AXES)
        if unknown:
            raise ValueError(f"unknown plane(s) {sorted(unknown)}; choose from {', '.join(AXES)}")
    half = math.ceil(patch_size / 2)
    nz, ny, nx = shape_zyx
    plane_shape = {"xy": (ny, nx), "xz": (nz, nx), "yz": (nz, ny)}
    return [a for a in wanted if min(plane_shape[a]) >= half]


def grid_starts(size: int, patch_size: int) -> list[int]:
    """Patch start offsets along one side: full patches, plus an edge strip of >= P/2."""
    half = math.ceil(patch_size / 2)
    return [s for s in range(0, size, patch_size) if size - s >= patch_size or size - s >= half]


def extract_patches(
    plane: np.ndarray, patch_size: int, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a 2D uint8 plane into the patch grid.

    Args:
        plane: 2D uint8 array (any strides: a view into a volume is fine).
        patch_size: P.
        out: optional (n, P, P) uint8 array to fill (n = :func:`patch_count` of the plane), so a
            caller cutting many planes writes them into one batch without a second copy.

    Returns:
        patches: uint8 (n, P, P), truncated edge patches zero-padded (``out`` when given).
        boxes: int32 (n, 4) rows of (y, x, h, w), the true extent of each patch in the plane.
    """
    ny, nx = plane.shape
    ys, xs = grid_starts(ny, patch_size), grid_starts(nx, patch_size)
    n = len(ys) * len(xs)
    patches = np.empty((n, patch_size, patch_size), dtype=np.uint8) if out is None else out
    if patches.shape != (n, patch_size, patch_size):
        raise ValueError(f"out has shape {patches.shape}, expected {(n, patch_size, patch_size)}")
    boxes = np.empty((n, 4), dtype=np.int32)
    i = 0
    for y in ys:
        h = min(patch_size, ny - y)
        for x in xs:
            w = min(patch_size, nx - x)
            patches[i, :h, :w] = plane[y : y + h, x : x + w]
            if h < patch_size or w < patch_size:  # zero only the padding of edge patches
                patches[i, h:] = 0
                patches[i, :h, w:] = 0
            boxes[i] = (y, x, h, w)
            i += 1
    return patches, boxes


def patch_count(shape: tuple[int, int], patch_size: int) -> int:
    """How many patches :func:`extract_patches` cuts from a plane of ``shape``."""
    return len(grid_starts(shape[0], patch_size)) * len(grid_starts(shape[1], patch_size))


def plane_view(block: np.ndarray, axis: str, index: int) -> np.ndarray:
    """The 2D plane ``index`` of a (z, y, x) block, cut perpendicular to ``axis``'s normal."""
    if axis == "xy":
        return block[index]
    if axis == "xz":
        return block[:, index, :]
    return block[:, :, index]


def slice_indices(n: int, stride: int = 1) -> np.ndarray:
    """Indices of the planes to cut along an axis of length ``n``: 0, stride, ... (last kept)."""
    if stride < 1:
        raise ValueError(f"slice stride must be >= 1, got {stride}")
    return np.arange(0, n, stride)
