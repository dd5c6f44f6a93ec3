"""PNG / JPEG 2D images (PIL)."""

from __future__ import annotations

from typing import Any

import numpy as np

from curation.readers.base import ArrayVolume

EXTENSIONS = (".png", ".jpg", ".jpeg")


class PilImage(ArrayVolume):
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


def pil_probe(path: str) -> tuple[tuple[int, int], np.dtype]:
    """(y, x) shape and grey dtype from a PNG/JPEG header, without decoding."""
    from PIL import Image

    with Image.open(path) as im:
        mode, (w, h) = im.mode, im.size
    if mode.startswith("I;16"):
        return (h, w), np.dtype(np.uint16)
    return (h, w), np.dtype({"I": np.int32, "F": np.float32}.get(mode, np.uint8))
