"""Segmentation of whole volumes with a saved model (``cemnet segment``).

``segment_volume(model, input, out)`` applies a :mod:`cemnet.finetune.model_file` model block by
block (``run``), tile by tile with blending (``predictor``, ``tiling``), writes OME-Zarr / TIFF /
HDF5 (``output``), and stitches instance labellings into one (``instance``).
"""

from cemnet._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "segment_volume": "cemnet.segment.run",
        "SegmentSettings": "cemnet.segment.run",
        "SegmentError": "cemnet.segment.run",
        "Predictor": "cemnet.segment.predictor",
    },
)


def __dir__() -> list[str]:
    return list(__all__)
