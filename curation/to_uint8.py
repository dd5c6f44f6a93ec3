"""Conversion of any numeric EM data to uint8, consistently across the chunks of one volume.

Rules (``--uint8``):

* ``dtype`` -- CEM500K's rule (``dataset/raw/cross_section3d.py``): divide by the dtype's maximum
  and multiply by 255, truncating (``(im / max * 255).astype(uint8)``); float data is taken to be
  in [0, 1] as CEM500K assumes, and clipped. Deliberate differences: CEM500K's 3D script refuses
  negative values and its 2D script breaks on 16-bit images (``bits = int(dtype[-2])`` gives 1 for
  uint16); we map signed integers with negative values over their full range
  ``[dtype.min, dtype.max]`` and handle every integer width.
* ``percentile`` -- robust linear stretch between two percentiles (default 0.5 and 99.5) of a
  sample of the whole volume, rounded. Right for float data and low-dynamic-range integers.
* ``minmax`` -- linear stretch between the sampled minimum and maximum.
* ``auto`` (default) -- uint8 unchanged, other integers by ``dtype``, floats by ``percentile``;
  but integers whose sampled values would fill fewer than :data:`MIN_DTYPE_LEVELS` grey levels
  under ``dtype`` (values 0-65535 stored as uint32 map to 0 only; 12-bit data in uint16 to 0-15)
  are stretched by ``percentile`` instead, and the source's notes say so. ``--uint8 dtype``
  forces CEM500K's rule regardless (the notes then give the grey levels it leaves).

Non-finite values (NaN, +-inf) are excluded from the statistics and written as 0; their fraction
is reported. A constant image maps to 0 under the stretch rules (there is no contrast to stretch),
and is left to the filter to remove. The statistics are fitted once per source on a sample of
slices (:meth:`Uint8Converter.fit`) so every chunk of a volume gets the same mapping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

RULES = ("auto", "dtype", "percentile", "minmax")
#: ``auto`` gives up the dtype-range rule for the percentile stretch when the sampled data would
#: span fewer grey levels than this (1/8 of uint8's range): every patch would look flat.
MIN_DTYPE_LEVELS = 32


class ConversionError(ValueError):
    """The data cannot be converted (e.g. no finite value at all)."""


@dataclass
class Uint8Converter:
    """A fitted uint8 mapping for one source. Pure and picklable: workers apply it per chunk."""

    rule: str
    dtype: str
    low: float = 0.0
    high: float = 255.0
    truncate: bool = False  # CEM500K truncates, the stretch rules round
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        sample: np.ndarray,
        dtype: np.dtype | str,
        rule: str = "auto",
        percentiles: tuple[float, float] = (0.5, 99.5),
    ) -> Uint8Converter:
        """Choose the mapping for data of ``dtype`` from a representative ``sample`` of it."""
        dtype = np.dtype(dtype)
        if rule not in RULES:
            raise ValueError(f"unknown uint8 rule {rule!r}; choose from {', '.join(RULES)}")
        if dtype.kind not in "uifb":
            raise ConversionError(f"cannot convert data of dtype {dtype} to uint8")
        sample = np.asarray(sample)
        finite = sample[np.isfinite(sample)] if dtype.kind == "f" else sample.ravel()
        stats = {
            "sample_voxels": int(sample.size),
            "nonfinite_fraction": float(1.0 - finite.size / max(sample.size, 1)),
        }
        if finite.size == 0:
            raise ConversionError("the data has no finite values (all NaN or inf)")
        stats.update(min=float(finite.min()), max=float(finite.max()))
        chosen, rule = rule, ("dtype" if dtype.kind in "uib" else "percentile") if rule == "auto" else rule
        if dtype == np.uint8 and rule == "dtype":
            return cls("identity", dtype.str, 0.0, 255.0, stats=stats)
        if rule == "dtype":
            if dtype.kind == "f":
                low, high = 0.0, 1.0
            elif dtype.kind == "b":
                low, high = 0.0, 1.0
            else:
                info = np.iinfo(dtype)
                low = 0.0 if (info.min == 0 or stats["min"] >= 0) else float(info.min)
                high = float(info.max)
            levels = int((stats["max"] - low) / (high - low) * 255) - int((stats["min"] - low) / (high - low) * 255) + 1
            span = f"{dtype} data spanning {stats['min']:g}-{stats['max']:g}"
            if dtype.kind in "iu" and levels < MIN_DTYPE_LEVELS and chosen == "auto" and stats["max"] > stats["min"]:
                fallback = cls.fit(sample, dtype, "percentile", percentiles)
                fallback.stats["note"] = (
                    f"{span} would fill {levels} of 256 grey levels by its dtype range (CEM500K's rule): "
                    f"stretched between its {percentiles[0]:g}-{percentiles[1]:g} percentiles instead "
                    "(--uint8 dtype forces the dtype range)")
                return fallback
            if dtype.kind in "iu" and levels < MIN_DTYPE_LEVELS:
                stats["note"] = (f"{span} fills only {levels} of 256 grey levels by its dtype range "
                                 "(--uint8 auto or percentile would stretch it)")
            return cls("dtype", dtype.str, low, high, truncate=True, stats=stats)
        if rule == "percentile":
            low, high = (float(v) for v in np.percentile(finite, percentiles))
            stats["percentiles"] = list(percentiles)
        else:
            low, high = stats["min"], stats["max"]
        return cls(rule, dtype.str, low, high, stats=stats)

    def __call__(self, data: np.ndarray) -> np.ndarray:
        """Map ``data`` (any shape) to uint8."""
        if self.rule == "identity":
            return np.ascontiguousarray(data, dtype=np.uint8)
        out = np.asarray(data, dtype=np.float32)
        span = self.high - self.low
        if span <= 0:
            return np.zeros(out.shape, dtype=np.uint8)
        nonfinite = ~np.isfinite(out) if np.dtype(self.dtype).kind == "f" else None
        out = (out - np.float32(self.low)) * np.float32(255.0 / span)
        if not self.truncate:
            out = np.rint(out, out=out)
        np.clip(out, 0, 255, out=out)
        if nonfinite is not None and nonfinite.any():
            out[nonfinite] = 0
        return out.astype(np.uint8)

    def describe(self) -> dict[str, Any]:
        """Everything needed to reproduce the mapping, for the corpus provenance."""
        return asdict(self)


def sample_volume(volume: Any, max_slices: int = 16, max_side: int = 2048) -> np.ndarray:
    """Read a bounded, evenly spread sample of a volume for :meth:`Uint8Converter.fit`.

    Up to ``max_slices`` xy slices spread over z, each cropped to a centred window of at most
    ``max_side`` pixels a side, so fitting costs the same for a 1 GB and a 5 TB volume. Unreadable
    slices are left out (the units covering them report them); none readable raises.
    """
    nz, ny, nx = volume.shape
    zs = np.unique(np.linspace(0, nz - 1, num=min(max_slices, nz)).round().astype(int))
    y0, x0 = max(0, (ny - max_side) // 2), max(0, (nx - max_side) // 2)
    ys, xs = slice(y0, min(ny, y0 + max_side)), slice(x0, min(nx, x0 + max_side))
    parts, first_error = [], None
    for z in zs:
        try:
            parts.append(volume.read(slice(z, z + 1), ys, xs).ravel())
        except Exception as err:  # noqa: BLE001 - a bad slice is the unit's problem, not the sample's
            first_error = first_error or err
    if not parts:
        raise first_error  # nothing readable at all: the source is unusable
    return np.concatenate(parts)


def sample_image(volume: Any, grid: int = 16, window: int = 128) -> np.ndarray:
    """A bounded sample of a large 2D image (z = 1) for :meth:`Uint8Converter.fit`: a ``grid`` x
    ``grid`` lattice of ``window``-pixel squares spread over the whole image (4M pixels at most),
    so that an image cut in bands is fitted without reading it whole."""
    _, ny, nx = volume.shape
    ys = np.unique(np.linspace(0, max(0, ny - window), num=grid).round().astype(int))
    xs = np.unique(np.linspace(0, max(0, nx - window), num=grid).round().astype(int))
    return np.concatenate([volume.read(slice(0, 1), slice(y, y + window), slice(x, x + window)).ravel()
                           for y in ys for x in xs])
