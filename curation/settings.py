"""What decides a corpus's patches: :class:`CurateSettings` (stored in ``corpus.json``).

Each field carries its command-line help (``cemnet curate`` builds its options from the
fields) and says whether a change re-cuts a source (``recut``: "patches" for the settings that
decide a source's patches, "plan" for those that decide how its work is split into units).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _setting(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
             metavar: tuple[str, ...] | None = None, recut: str | None = None) -> Any:
    """A settings field with what the CLI needs to offer it (``flag`` default: --field-name)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "metavar": metavar,
                                            "recut": recut})


@dataclass(frozen=True)
class CurateSettings:
    """Everything that decides which patches a corpus holds (stored in ``corpus.json``).

    Frozen: the same object travels to every worker with each unit."""

    patch_size: int = _setting(224, "patch side in pixels", recut="patches")
    max_anisotropy: float = _setting(0.25, "cut xz/yz planes too when |sx - sz| / sx <= this", recut="patches")
    axes: str = _setting("auto", "planes to cut: 'auto' (by --max-anisotropy) or a list such as 'xy,xz,yz'",
                         recut="patches")
    slice_stride: int = _setting(1, "cut every Nth slice of each plane", recut="patches")
    uint8_rule: str = _setting("auto", "grey-level mapping to uint8 (see docs/readers.md)", flag="--uint8",
                               choices=("auto", "dtype", "percentile", "minmax"), recut="patches")
    percentiles: tuple[float, float] = _setting((0.5, 99.5), "percentiles the 'percentile' rule stretches between",
                                                metavar=("LOW", "HIGH"), recut="patches")
    dedup_distance: int = _setting(12, "dHash Hamming distance at or below which patches are near-duplicates")
    dedup_scope: str = _setting("dataset", "deduplicate within each dataset (CEM500K), across all sources, "
                                "or not at all", choices=("dataset", "global", "none"))
    seed: int = _setting(0, "seed of the dedup's random reference order")
    filter: str = _setting("stats", "'stats', 'none', 'logistic:FILE.json', 'cem500k:FILE.pth', or "
                           "'stats:key=value,...'")
    memory_mb: int = _setting(256, "bound on the data one unit holds (MB)", recut="plan")
    patches_per_unit: int = _setting(1024, "patches an xy unit cuts at most (smaller: finer resume and "
                                     "progress, more shards)", recut="plan")
    keep_all_pixels: bool = _setting(False, "store the pixels of duplicates and filtered patches too (else kept "
                                     "patches only; the others keep their provenance and can be re-cut: "
                                     "cemnet curate recut)")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d


# What decides a source's patches (a change re-cuts it), and what decides how its work is split
# into units (a change re-cuts it only if unfinished: old and new units would overlap).
PATCH_SETTINGS = tuple(f.name for f in fields(CurateSettings) if f.metadata["recut"] == "patches")
PLAN_SETTINGS = tuple(f.name for f in fields(CurateSettings) if f.metadata["recut"] == "plan")
