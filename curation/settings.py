"""What decides a corpus's patches: :class:`CurateSettings` (stored in ``corpus.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class CurateSettings:
    """Everything that decides which patches a corpus holds (stored in ``corpus.json``)."""

    patch_size: int = 224
    max_anisotropy: float = 0.25
    axes: str = "auto"
    slice_stride: int = 1
    uint8_rule: str = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)
    dedup_distance: int = 12
    dedup_scope: str = "dataset"  # "dataset" (CEM500K), "global", or "none"
    seed: int = 0
    filter: str = "stats"
    memory_mb: int = 256
    patches_per_unit: int = 1024
    keep_all_pixels: bool = False  # store pixels of duplicates and filtered patches too (before 2026-12)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d


# What decides a source's patches (a change re-cuts it), and what decides how its work is split
# into units (a change re-cuts it only if unfinished: old and new units would overlap).
PATCH_SETTINGS = ("patch_size", "max_anisotropy", "axes", "slice_stride", "uint8_rule", "percentiles")
PLAN_SETTINGS = ("memory_mb", "patches_per_unit")