"""The default filter: thresholds on :func:`~curation.filters.features.patch_features`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from curation.filters.base import FilterResult, check_batch, empty_mask
from curation.filters.features import DEFAULT_UNIFORM_STD, FEATURE_NAMES, UNIFORM_BLOCK, patch_features


@dataclass
class StatsFilter:
    """Threshold filter on :func:`patch_features` (the default filter).

    A patch is removed when any criterion fails; ``reason`` names the first failed one, in the
    order listed. Defaults were chosen on real EM data (``perf/filter_thresholds.py``;
    figures and rationale in ``docs/filters.md``).

    Attributes:
        uniform_fraction: remove when this fraction (or more) of the true area lies in flat blocks
            (CEM500K's ">= 80 % uniform" criterion: empty resin, fill/padding, saturated areas).
        uniform_std: a block (8x8 px, measured on the 2x2-binned image) is flat when its local
            std is below this many grey levels.
        max_saturated: remove when this fraction (or more) of pixels is exactly 0 or 255
            (clipped exposure, binary masks stored as 0/255).
        min_std: remove when the global std is below this (grey levels): low contrast.
        min_range: remove when p99 - p1 is below this (grey levels): low contrast.
        min_entropy: remove when the grey-level entropy is below this many bits: label maps,
            masks and posterised images have only a handful of grey levels.
        max_flat_pairs: remove when this fraction (or more) of horizontally adjacent pixel pairs
            have identical values: piecewise-constant images (label/id maps, masks, synthetic
            fills), which real, noisy EM never is.
        min_gradient_rel: remove when ``gradient_rel`` (mean gradient per unit std) is below this:
            blurred / out-of-focus patches. 0 (off) by default, because on the shared data heavy
            blur overlaps with real smooth SEM (see docs/filters.md).
    """

    name: ClassVar[str] = "stats"

    uniform_fraction: float = 0.80
    uniform_std: float = DEFAULT_UNIFORM_STD
    max_saturated: float = 0.80
    min_std: float = 3.0
    min_range: float = 12.0
    min_entropy: float = 2.0
    max_flat_pairs: float = 0.80
    min_gradient_rel: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"StatsFilter.{f.name} must be a finite number, got {v!r}")
            setattr(self, f.name, float(v))
        for frac in ("uniform_fraction", "max_saturated", "max_flat_pairs"):
            if not 0.0 < getattr(self, frac) <= 1.0:
                raise ValueError(f"StatsFilter.{frac} must be in (0, 1], got {getattr(self, frac)}")
        for lvl in ("uniform_std", "min_std", "min_range", "min_entropy", "min_gradient_rel"):
            if getattr(self, lvl) < 0:
                raise ValueError(f"StatsFilter.{lvl} must be >= 0, got {getattr(self, lvl)}")

    def _criteria(self, feats: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(reason, failed, relative margin) per criterion, in reporting order.

        The margin is positive when the criterion passes and is scaled by the threshold so that
        criteria with different units can be combined into one score (their minimum).
        """
        col = {n: feats[:, i].astype(np.float64) for i, n in enumerate(FEATURE_NAMES)}
        eps = 1e-9
        u, s, f = col["uniform_fraction"], col["saturated_fraction"], col["flat_pair_fraction"]
        crit = [
            (f"uniform>={self.uniform_fraction:.2f}", u >= self.uniform_fraction,
             (self.uniform_fraction - u) / max(self.uniform_fraction, eps)),
            (f"saturated>={self.max_saturated:.2f}", s >= self.max_saturated,
             (self.max_saturated - s) / max(self.max_saturated, eps)),
            ("low-contrast", (col["std"] < self.min_std) | (col["range_p1_p99"] < self.min_range),
             np.minimum((col["std"] - self.min_std) / max(self.min_std, eps),
                        (col["range_p1_p99"] - self.min_range) / max(self.min_range, eps))),
            ("few-grey-levels", col["entropy_bits"] < self.min_entropy,
             (col["entropy_bits"] - self.min_entropy) / max(self.min_entropy, eps)),
            ("piecewise-constant", f >= self.max_flat_pairs,
             (self.max_flat_pairs - f) / max(self.max_flat_pairs, eps)),
        ]
        if self.min_gradient_rel > 0:  # off by default: see docs/filters.md
            g = col["gradient_rel"]
            crit.append(("blurred", g < self.min_gradient_rel, (g - self.min_gradient_rel) / self.min_gradient_rel))
        return crit

    def decide(self, feats: np.ndarray, empty: np.ndarray | None = None) -> FilterResult:
        """Apply the thresholds to precomputed :func:`patch_features` (same ``uniform_std``)."""
        n = feats.shape[0]
        keep = np.ones(n, dtype=bool)
        reason = np.full(n, "", dtype=object)
        score = np.full(n, np.inf)
        for code, failed, margin in self._criteria(feats):
            reason[failed & keep] = code
            keep &= ~failed
            score = np.minimum(score, margin)
        if empty is not None and empty.any():
            keep[empty], reason[empty], score[empty] = False, "empty", -1.0
        return FilterResult(keep=keep, reason=reason, score=score)

    def __call__(self, patches: np.ndarray, sizes: np.ndarray) -> FilterResult:
        """Keep/remove each patch from the statistics of its true region."""
        patches, sizes = check_batch(patches, sizes)
        feats, _ = patch_features(patches, sizes, uniform_std=self.uniform_std)
        return self.decide(feats, empty_mask(sizes))

    def describe(self) -> dict:
        """Name, thresholds and the fixed feature settings they refer to."""
        return {
            "name": self.name,
            **dataclasses.asdict(self),
            "uniform_block_px": 2 * UNIFORM_BLOCK,
            "uniform_binning": 2,
        }
