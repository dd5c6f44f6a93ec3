"""Patch-quality filters: remove uninformative patches from the curated corpus.

CEM500K (Conrad & Narayan, eLife 2021) removed patches that were >= 80 % uniform (empty resin,
padding, saturated areas), low-contrast, artefacts or non-cellular content. This module offers
three interchangeable filters that all follow :class:`PatchFilter`:

* :class:`StatsFilter` (default): thresholds on cheap image statistics, chosen on real EM data
  (``benchmarks/filter_thresholds.py``, figures in ``docs/filters.md``).
* :class:`LogisticFilter`: logistic regression on :func:`patch_features`, trained from the user's
  own labels with :func:`train_logistic_filter` (labels read by :func:`read_label_csv`).
* :class:`Cem500kClassifierFilter`: the published CEM500K ResNet34 patch-quality classifier.

Input convention (shared by every filter): ``patches`` is a uint8 array (N, P, P); a truncated
edge patch is stored zero-padded, its true content being ``patches[i, :h, :w]`` with
``(h, w) = sizes[i]``. Only the true region is ever looked at: padding is not content.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: only the logistic fit and the CEM500K model need it
    import torch

__all__ = [
    "FEATURE_NAMES",
    "MISSING_CHUNKS_REASON",
    "Cem500kClassifierFilter",
    "FilterResult",
    "LogisticFilter",
    "PatchFilter",
    "StatsFilter",
    "build_filter",
    "cem500k_preprocess",
    "patch_features",
    "read_label_csv",
    "train_logistic_filter",
]


# Not a filter's verdict: the reason given to patches made mostly of the fill value of chunks
# absent from a zarr store (curation.missing_chunks), which are not data whatever they look like.
MISSING_CHUNKS_REASON = "missing-chunks"


# --------------------------------------------------------------------------------------------
# Result type and protocol
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)  # array fields: element-wise == would make dataclass equality ambiguous
class FilterResult:
    """Per-patch decision of a filter.

    Attributes:
        keep: bool (N,), True for informative patches.
        reason: object array of str (N,), ``""`` when kept, else a short code naming the failed
            criterion (``"uniform>=0.80"``, ``"low-contrast"``, ``"classifier p=0.12"``...).
        score: float (N,), higher = more informative (a probability or a margin).
    """

    keep: np.ndarray
    reason: np.ndarray
    score: np.ndarray

    def __post_init__(self) -> None:
        self.keep = np.asarray(self.keep, dtype=bool)
        self.reason = np.asarray(self.reason, dtype=object)
        self.score = np.asarray(self.score, dtype=np.float64)
        n = self.keep.shape[0] if self.keep.ndim == 1 else -1
        if n < 0 or self.reason.shape != (n,) or self.score.shape != (n,):
            raise ValueError(
                f"FilterResult arrays must all have shape (N,), got keep {self.keep.shape}, "
                f"reason {self.reason.shape}, score {self.score.shape}"
            )

    def __len__(self) -> int:
        return int(self.keep.shape[0])


@runtime_checkable
class PatchFilter(Protocol):
    """What the curation pipeline calls: ``filter(patches, sizes) -> FilterResult``."""

    name: str

    def __call__(self, patches: np.ndarray, sizes: np.ndarray) -> FilterResult:
        """Decide keep/remove for a batch of (zero-padded) patches with their true sizes."""
        ...

    def describe(self) -> dict:
        """Name and every parameter/threshold, recorded in the corpus provenance."""
        ...


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

#: Names of the columns returned by :func:`patch_features`, in order.
FEATURE_NAMES: tuple[str, ...] = (
    "mean",  # mean grey level
    "std",  # global contrast
    "p1",  # 1st percentile grey level
    "p99",  # 99th percentile grey level
    "range_p1_p99",  # robust contrast (p99 - p1)
    "saturated_fraction",  # pixels at exactly 0 or 255
    "entropy_bits",  # grey-level histogram entropy; masks/labels have very few levels
    "dominant_fraction",  # pixels within +-DOMINANT_TOL of the most common grey level
    "uniform_fraction",  # area in flat blocks (see _UNIFORM_* below)
    "gradient_mean",  # mean |gradient| of the 2x2-binned image (grey levels per 2 px)
    "gradient_rel",  # gradient_mean / (std + 1): structure per unit contrast (blur)
    "fine_detail_fraction",  # share of the variance removed by 2x2 binning (finest scale)
    "flat_pair_fraction",  # adjacent pixel pairs with identical values: label maps/masks ~1
)

#: Grey-level half-width of the "dominant level" window.
DOMINANT_TOL = 2
#: Flat-block detection: blocks of ``_UNIFORM_BLOCK`` x ``_UNIFORM_BLOCK`` pixels of the
#: 2x2-binned image (i.e. 8x8 original pixels). Binning first halves pixel noise, so mildly noisy
#: flat areas still read as flat, while membranes/organelles (a few pixels wide, tens of grey
#: levels of contrast) survive it. Strongly noisy or textured empty substrate does not read as
#: flat (docs/filters.md, MUVIS): that needs a trained filter.
_UNIFORM_BLOCK = 4
#: Default local-std tolerance (grey levels, binned image) below which a block counts as flat.
DEFAULT_UNIFORM_STD = 2.0

_LEVELS = np.arange(256, dtype=np.float64)


def _check_batch(patches: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate the (patches, sizes) convention and return them as arrays."""
    patches = np.asarray(patches)
    sizes = np.asarray(sizes)
    if patches.ndim != 3 or patches.shape[1] != patches.shape[2]:
        raise ValueError(f"patches must have shape (N, P, P), got {patches.shape}")
    if patches.dtype != np.uint8:
        raise ValueError(f"patches must be uint8, got {patches.dtype}")
    n, p, _ = patches.shape
    if sizes.shape != (n, 2):
        raise ValueError(f"sizes must have shape ({n}, 2) for {n} patches, got {sizes.shape}")
    if not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"sizes must be integers, got {sizes.dtype}")
    if n and (sizes.min() < 0 or sizes.max() > p):
        raise ValueError(f"sizes must lie in [0, {p}] (the patch size), got {sizes.min()}..{sizes.max()}")
    return patches, sizes.astype(np.int64, copy=False)


def _size_groups(sizes: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (h, w, indices) for each distinct true size.

    Grouping by size lets every group be processed as a dense (n, h, w) array without masks;
    in a real corpus nearly all patches share the full size and edge patches a handful of sizes.
    """
    if len(sizes) == 0:
        return
    uniq, inverse = np.unique(sizes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    for g, (h, w) in enumerate(uniq):
        yield int(h), int(w), order[bounds[g] : bounds[g + 1]]


def _histogram_features(x: np.ndarray) -> np.ndarray:
    """Histogram-derived features for a dense uint8 group (n, h, w): columns 0..7."""
    n = x.shape[0]
    count = float(x.shape[1] * x.shape[2])
    # One numpy bincount per patch (~15k patches/s single-threaded). A single offset bincount over
    # the batch is slower (int64 copy); torch.bincount is faster alone but multi-threaded, and it
    # collapses when the cores are shared with other jobs.
    hist = np.empty((n, 256), dtype=np.float64)
    for i in range(n):
        hist[i] = np.bincount(x[i].reshape(-1), minlength=256)
    prob = hist / count
    mean = prob @ _LEVELS
    var = np.maximum(prob @ (_LEVELS**2) - mean**2, 0.0)
    cdf = np.cumsum(prob, axis=1)
    # "lower" percentile: first grey level whose CDF reaches q (robust to a few outliers).
    p1 = np.argmax(cdf >= 0.01 - 1e-12, axis=1).astype(np.float64)
    p99 = np.argmax(cdf >= 0.99 - 1e-12, axis=1).astype(np.float64)
    saturated = prob[:, 0] + prob[:, 255]
    with np.errstate(divide="ignore", invalid="ignore"):
        # "+ 0.0" turns the -0.0 of a single-level histogram into 0.0.
        entropy = -np.sum(np.where(prob > 0, prob * np.log2(prob), 0.0), axis=1) + 0.0
    csum = np.concatenate([np.zeros((n, 1)), np.cumsum(prob, axis=1)], axis=1)
    lo = np.clip(np.arange(256) - DOMINANT_TOL, 0, 256)
    hi = np.clip(np.arange(256) + DOMINANT_TOL + 1, 0, 256)
    dominant = (csum[:, hi] - csum[:, lo]).max(axis=1)
    return np.stack(
        [mean, np.sqrt(var), p1, p99, p99 - p1, saturated, entropy, dominant], axis=1
    )


def _bin2_sum(x: np.ndarray) -> np.ndarray:
    """2x2 binning of a dense uint8 group (n, h, w) as uint16 SUMS (4 x the mean), (n, h//2, w//2).

    Integer sums keep every later block statistic exact; strided uint8 adds into uint16 are ~4x
    faster than a reshape-sum. A dimension below 2 cannot be binned: the group is returned as is,
    scaled by 4 so that units stay the same.
    """
    if x.shape[1] < 2 or x.shape[2] < 2:
        return x.astype(np.uint16) * np.uint16(4)
    h2, w2 = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    x = x[:, :h2, :w2]
    s = np.add(x[:, 0::2, 0::2], x[:, 1::2, 0::2], dtype=np.uint16)
    s += x[:, 0::2, 1::2]
    s += x[:, 1::2, 1::2]
    return s


def _block_starts(length: int, block: int) -> np.ndarray:
    """Start indices of blocks tiling ``length``; a ragged end gets one overlapping last block."""
    b = min(block, length)
    starts = list(range(0, length - b + 1, b))
    if starts[-1] + b < length:
        starts.append(length - b)
    return np.asarray(starts, dtype=np.int64)


def _block_sum(a: np.ndarray, block: int) -> np.ndarray:
    """Sum of ``block`` x ``block`` tiles of an integer group (n, h, w) -> integers (n, by, bx).

    Exact tilings use strided adds (fast); ragged sizes (edge patches, rare) use overlapping
    last tiles so that every pixel is covered.
    """
    n, h, w = a.shape
    if h % block == 0 and w % block == 0:
        # int32 is exact here: at most 16 values of <= 1020^2 per tile.
        r = a[:, 0::block].astype(np.int32)
        for k in range(1, block):
            r += a[:, k::block]
        c = r[:, :, 0::block].copy()
        for k in range(1, block):
            c += r[:, :, k::block]
        return c
    rs, cs = _block_starts(h, block), _block_starts(w, block)
    bh, bw = min(block, h), min(block, w)
    rows = (rs[:, None] + np.arange(bh)).reshape(-1)
    cols = (cs[:, None] + np.arange(bw)).reshape(-1)
    t = a[:, rows][:, :, cols].astype(np.int64).reshape(n, len(rs), bh, len(cs), bw)
    return t.sum(axis=(2, 4))


def _spatial_features(x: np.ndarray, var_full: np.ndarray, uniform_std: float) -> np.ndarray:
    """Block/gradient/neighbour features for a dense uint8 group (n, h, w): columns 8..12."""
    n = x.shape[0]
    s = _bin2_sum(x)  # 4 x binned mean, uint16 <= 1020
    q = s.astype(np.uint32)
    q *= q  # <= 1020^2, exact in uint32
    bh, bw = min(_UNIFORM_BLOCK, s.shape[1]), min(_UNIFORM_BLOCK, s.shape[2])
    k = bh * bw
    bs, bq = _block_sum(s, _UNIFORM_BLOCK), _block_sum(q, _UNIFORM_BLOCK)
    # Exact integer variance of the block (in units of (4 grey)^2), then back to grey levels.
    bs, bq = bs.astype(np.int64), bq.astype(np.int64)
    bvar = (k * bq - bs * bs) / (16.0 * k * k)
    uniform = (bvar < uniform_std**2).reshape(n, -1).mean(axis=1)

    si = s.view(np.int16)  # values <= 1020 fit int16: a free view, signed for the differences
    gsum = np.zeros(n, dtype=np.float64)
    gcnt = 0
    if s.shape[2] > 1:
        dx = si[:, :, 1:] - si[:, :, :-1]
        gsum += np.abs(dx, out=dx).reshape(n, -1).sum(axis=1, dtype=np.int64)
        gcnt += s.shape[1] * (s.shape[2] - 1)
    if s.shape[1] > 1:
        dy = si[:, 1:] - si[:, :-1]
        gsum += np.abs(dy, out=dy).reshape(n, -1).sum(axis=1, dtype=np.int64)
        gcnt += (s.shape[1] - 1) * s.shape[2]
    grad = gsum / (4.0 * max(gcnt, 1))
    m = s.shape[1] * s.shape[2]
    if s.shape[1] % _UNIFORM_BLOCK == 0 and s.shape[2] % _UNIFORM_BLOCK == 0:
        # Exact tiling (every full-size patch): the block sums already hold the totals.
        tot = bs.reshape(n, -1).sum(axis=1).astype(np.float64)
        totq = bq.reshape(n, -1).sum(axis=1).astype(np.float64)
    else:
        tot = s.reshape(n, -1).sum(axis=1, dtype=np.int64).astype(np.float64)
        totq = q.reshape(n, -1).sum(axis=1, dtype=np.int64).astype(np.float64)
    var_binned = np.maximum(totq / m - (tot / m) ** 2, 0.0) / 16.0
    with np.errstate(divide="ignore", invalid="ignore"):
        fine = np.where(var_full > 1e-9, 1.0 - var_binned / var_full, 0.0)
    flat = _flat_pair_fraction(x)
    return np.stack(
        [uniform, grad, grad / (np.sqrt(var_full) + 1.0), np.clip(fine, 0.0, 1.0), flat], axis=1
    )


def _flat_pair_fraction(x: np.ndarray) -> np.ndarray:
    """Fraction of horizontally adjacent pixel pairs with identical grey values, per patch.

    Real EM carries noise, so neighbours are rarely equal (1-41 % on the shared data);
    label maps, masks and synthetic fills are piecewise constant (typically > 85 %). Every other row is
    enough for a stable estimate and halves the cost. Uses vertical pairs for a 1-px-wide patch;
    a single pixel gives 0 (undecidable; the contrast criteria handle it).
    """
    n, h, w = x.shape
    if w >= 2:
        a = x[:, ::2]
        eq = a[:, :, 1:] == a[:, :, :-1]
    elif h >= 2:
        eq = x[:, 1:, :] == x[:, :-1, :]
    else:
        return np.zeros(n)
    eq = eq.reshape(n, -1)
    return np.count_nonzero(eq, axis=1) / eq.shape[1]


def patch_features(
    patches: np.ndarray,
    sizes: np.ndarray,
    *,
    uniform_std: float = DEFAULT_UNIFORM_STD,
    chunk: int = 512,
) -> tuple[np.ndarray, list[str]]:
    """Image statistics of the true region of each patch (padding excluded).

    Args:
        patches: uint8 (N, P, P), truncated patches zero-padded at the bottom/right.
        sizes: int (N, 2), true (h, w) of each patch.
        uniform_std: local-std tolerance (grey levels) of a flat block for ``uniform_fraction``.
        chunk: patches processed at once (bounds the temporaries to a few tens of MB).

    Returns:
        ``(features, names)``: float32 (N, F) and the F column names (:data:`FEATURE_NAMES`).
        A patch with an empty true region gets zeros and ``uniform_fraction = 1``.
    """
    patches, sizes = _check_batch(patches, sizes)
    out = np.zeros((len(patches), len(FEATURE_NAMES)), dtype=np.float32)
    i_uniform = FEATURE_NAMES.index("uniform_fraction")
    for h, w, idx in _size_groups(sizes):
        if h == 0 or w == 0:
            out[idx, i_uniform] = 1.0
            continue
        for s in range(0, len(idx), chunk):
            sub = idx[s : s + chunk]
            if h == patches.shape[1] and w == patches.shape[2] and np.all(np.diff(sub) == 1):
                x = patches[sub[0] : sub[-1] + 1]  # contiguous full-size run: no copy
            else:
                x = patches[sub, :h, :w]
            hist_f = _histogram_features(x)
            spat_f = _spatial_features(x, hist_f[:, 1] ** 2, uniform_std)
            out[sub, :8] = hist_f
            out[sub, 8:] = spat_f
    return out, list(FEATURE_NAMES)


def _empty_mask(sizes: np.ndarray) -> np.ndarray:
    return (sizes[:, 0] == 0) | (sizes[:, 1] == 0)


# --------------------------------------------------------------------------------------------
# StatsFilter
# --------------------------------------------------------------------------------------------


@dataclass
class StatsFilter:
    """Threshold filter on :func:`patch_features` (the default filter).

    A patch is removed when any criterion fails; ``reason`` names the first failed one, in the
    order listed. Defaults were chosen on real EM data (``benchmarks/filter_thresholds.py``;
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
        patches, sizes = _check_batch(patches, sizes)
        feats, _ = patch_features(patches, sizes, uniform_std=self.uniform_std)
        return self.decide(feats, _empty_mask(sizes))

    def describe(self) -> dict:
        """Name, thresholds and the fixed feature settings they refer to."""
        return {
            "name": self.name,
            **dataclasses.asdict(self),
            "uniform_block_px": 2 * _UNIFORM_BLOCK,
            "uniform_binning": 2,
        }


# --------------------------------------------------------------------------------------------
# LogisticFilter
# --------------------------------------------------------------------------------------------

_LOGISTIC_FORMAT = "cemnet-logistic-patch-filter"
_LOGISTIC_VERSION = 1


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Split by sign so that exp never overflows.
    out = np.empty_like(z, dtype=np.float64)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


@dataclass(eq=False)  # array fields: element-wise == would make dataclass equality ambiguous
class LogisticFilter:
    """Logistic regression on standardised :func:`patch_features`.

    ``p(informative) = sigmoid(weights . (features - mean) / std + bias)``; kept when
    ``p >= threshold``. Build one with :func:`train_logistic_filter`; persist with
    :meth:`save` / :meth:`load` (JSON, exact round trip).
    """

    name: ClassVar[str] = "logistic"

    feature_names: list[str]
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float
    threshold: float = 0.5
    uniform_std: float = DEFAULT_UNIFORM_STD
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.feature_names = list(self.feature_names)
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.asarray(self.std, dtype=np.float64)
        self.weights = np.asarray(self.weights, dtype=np.float64)
        self.bias = float(self.bias)
        self.threshold = float(self.threshold)
        self.uniform_std = float(self.uniform_std)
        f = len(self.feature_names)
        if not (self.mean.shape == self.std.shape == self.weights.shape == (f,)):
            raise ValueError(
                f"LogisticFilter: mean/std/weights must each have {f} entries (one per feature), "
                f"got {self.mean.shape}, {self.std.shape}, {self.weights.shape}"
            )
        if list(self.feature_names) != list(FEATURE_NAMES):
            raise ValueError(
                f"LogisticFilter was built on features {self.feature_names}, but this version of "
                f"patch_features computes {list(FEATURE_NAMES)}; retrain it"
            )
        if np.any(self.std <= 0) or not np.all(np.isfinite(self.std)):
            raise ValueError("LogisticFilter: feature std must be finite and > 0")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"LogisticFilter.threshold must be in [0, 1], got {self.threshold}")

    def predict_proba_features(self, feats: np.ndarray) -> np.ndarray:
        """P(informative) from precomputed features (N, F)."""
        z = ((np.asarray(feats, dtype=np.float64) - self.mean) / self.std) @ self.weights + self.bias
        return _sigmoid(z)

    def predict_proba(self, patches: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """P(informative) for each patch."""
        feats, _ = patch_features(patches, sizes, uniform_std=self.uniform_std)
        return self.predict_proba_features(feats)

    def __call__(self, patches: np.ndarray, sizes: np.ndarray) -> FilterResult:
        """Keep patches with ``p >= threshold``; score = p."""
        patches, sizes = _check_batch(patches, sizes)
        p = self.predict_proba(patches, sizes)
        empty = _empty_mask(sizes)
        p[empty] = 0.0
        keep = (p >= self.threshold) & ~empty
        reason = np.array([_classifier_reason(v) for v in p], dtype=object)
        reason[keep] = ""
        reason[empty] = "empty"
        return FilterResult(keep=keep, reason=reason, score=p)

    def describe(self) -> dict:
        """Everything needed to reproduce the decisions (the model itself, not just a path)."""
        return {"name": self.name, **self._to_json()}

    def _to_json(self) -> dict:
        return {
            "format": _LOGISTIC_FORMAT,
            "version": _LOGISTIC_VERSION,
            "feature_names": list(self.feature_names),
            "uniform_std": self.uniform_std,
            # Python floats serialise via repr, which round-trips float64 exactly.
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "weights": [float(v) for v in self.weights],
            "bias": self.bias,
            "threshold": self.threshold,
            "training": self.training,
        }

    def save(self, path: str | Path) -> None:
        """Write the model as JSON (exact float64 round trip)."""
        Path(path).write_text(json.dumps(self._to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> LogisticFilter:
        """Read a model written by :meth:`save`; ValueError naming the file if it is not one."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"logistic filter file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a cemnet logistic filter (invalid JSON: {e})") from None
        if not isinstance(d, dict) or d.get("format") != _LOGISTIC_FORMAT:
            raise ValueError(f"{path}: not a cemnet logistic filter (format != {_LOGISTIC_FORMAT!r})")
        if d.get("version") != _LOGISTIC_VERSION:
            raise ValueError(f"{path}: unsupported logistic filter version {d.get('version')!r}")
        try:
            return cls(
                feature_names=d["feature_names"], mean=d["mean"], std=d["std"],
                weights=d["weights"], bias=d["bias"], threshold=d.get("threshold", 0.5),
                uniform_std=d.get("uniform_std", DEFAULT_UNIFORM_STD), training=d.get("training", {}),
            )
        except KeyError as e:
            raise ValueError(f"{path}: logistic filter is missing field {e.args[0]!r}") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


def _classifier_reason(p: float) -> str:
    return f"classifier p={p:.2f}"


def _fit_logistic(
    x: np.ndarray, y: np.ndarray, sample_w: np.ndarray, l2: float
) -> tuple[np.ndarray, float]:
    """Weighted, L2-penalised logistic regression by full-batch LBFGS (float64, deterministic).

    Loss = sum_i w_i * BCE_i / sum_i w_i + l2/2 * |w|^2 (the bias is not penalised).
    """
    import torch

    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    wt = torch.as_tensor(sample_w / sample_w.sum(), dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = xt @ w + b
        loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="none")).sum()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy().copy(), float(b.detach()[0])


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula; tied scores get average ranks."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _standardise_fit(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = feats.mean(axis=0)
    std = feats.std(axis=0)
    std[~(std > 1e-12)] = 1.0  # constant feature: leave it unscaled (its weight stays ~0)
    return mean, std


def _train_on(feats: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    mean, std = _standardise_fit(feats)
    # Class-balanced: each class carries half of the total weight, whatever its size.
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    sw = np.where(y, 0.5 / n_pos, 0.5 / n_neg)
    w, b = _fit_logistic((feats - mean) / std, y.astype(np.float64), sw, l2)
    return mean, std, w, b


def train_logistic_filter(
    patches: np.ndarray,
    sizes: np.ndarray,
    labels: np.ndarray,
    *,
    l2: float = 1e-3,
    seed: int = 0,
    folds: int = 5,
    threshold: float = 0.5,
) -> tuple[LogisticFilter, dict]:
    """Train a :class:`LogisticFilter` from labelled patches, with a cross-validated report.

    Args:
        patches, sizes: the batch convention of :func:`patch_features`.
        labels: bool (N,), True = informative.
        l2: L2 penalty on the standardised weights.
        seed: seeds the stratified fold assignment (training itself is deterministic).
        folds: cross-validation folds (reduced to the smaller class size if needed).
        threshold: decision threshold stored in the filter.

    Returns:
        ``(filter, report)``; the filter is fitted on all patches; ``report`` holds
        ``n, n_informative, n_uninformative, folds, cv_accuracy, cv_balanced_accuracy, cv_auc,
        train_accuracy, l2, seed`` (cv_* are None when a class has fewer than 2 examples).
    """
    patches, sizes = _check_batch(patches, sizes)
    y = np.asarray(labels)
    if y.shape != (len(patches),):
        raise ValueError(f"labels must have shape ({len(patches)},), got {y.shape}")
    if y.dtype != bool:
        if not np.isin(y, [0, 1]).all():
            raise ValueError("labels must be boolean (True = informative)")
        y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"need both informative and uninformative examples, got {n_pos} informative and {n_neg} uninformative"
        )
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    feats, names = patch_features(patches, sizes)
    feats = feats.astype(np.float64)

    k = min(folds, n_pos, n_neg)
    report: dict[str, Any] = {
        "n": int(len(y)), "n_informative": n_pos, "n_uninformative": n_neg, "folds": int(k) if k >= 2 else 0,
        "cv_accuracy": None, "cv_balanced_accuracy": None, "cv_auc": None, "l2": float(l2), "seed": int(seed),
    }
    if k >= 2:
        # Stratified folds: shuffle each class with the seed and deal it round-robin.
        rng = np.random.default_rng(seed)
        fold = np.empty(len(y), dtype=np.int64)
        for cls in (True, False):
            idx = np.flatnonzero(y == cls)
            fold[rng.permutation(idx)] = np.arange(len(idx)) % k
        p_cv = np.empty(len(y))
        for f in range(k):
            tr, te = fold != f, fold == f
            mean, std, w, b = _train_on(feats[tr], y[tr], l2)
            p_cv[te] = _sigmoid(((feats[te] - mean) / std) @ w + b)
        pred = p_cv >= threshold
        report["cv_accuracy"] = float((pred == y).mean())
        report["cv_balanced_accuracy"] = float(0.5 * (pred[y].mean() + (~pred[~y]).mean()))
        report["cv_auc"] = _auc(y, p_cv)

    mean, std, w, b = _train_on(feats, y, l2)
    filt = LogisticFilter(
        feature_names=names, mean=mean, std=std, weights=w, bias=b, threshold=threshold,
        training={k_: v for k_, v in report.items()},
    )
    report["train_accuracy"] = float(((filt.predict_proba_features(feats) >= threshold) == y).mean())
    filt.training["train_accuracy"] = report["train_accuracy"]
    return filt, report


# --------------------------------------------------------------------------------------------
# Label CSV
# --------------------------------------------------------------------------------------------

_TRUE_WORDS = frozenset({"yes", "true", "1", "good", "y", "t"})
_FALSE_WORDS = frozenset({"no", "false", "0", "bad", "n", "f"})


def read_label_csv(path: str | Path) -> dict[int, bool]:
    """Read user labels from a CSV with header ``patch_id,informative``.

    ``informative`` accepts yes/no, true/false, 1/0, good/bad (any case). Blank lines and lines
    starting with ``#`` are skipped; extra columns are ignored.

    Raises:
        ValueError: naming the file and line for a missing header column, a non-integer or
            duplicate patch id, or an unrecognised label.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = [(i, r) for i, r in enumerate(csv.reader(fh), start=1)
                if r and any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not rows:
        raise ValueError(f"{path}: empty label file (expected a header 'patch_id,informative')")
    hline, header = rows[0]
    cols = [c.strip().lower() for c in header]
    if "patch_id" not in cols or "informative" not in cols:
        raise ValueError(f"{path}:{hline}: header must contain 'patch_id' and 'informative', got {header}")
    ci, cl = cols.index("patch_id"), cols.index("informative")
    out: dict[int, bool] = {}
    for line, row in rows[1:]:
        if len(row) <= max(ci, cl):
            raise ValueError(f"{path}:{line}: expected columns {header}, got {row}")
        raw_id, raw_lab = row[ci].strip(), row[cl].strip().lower()
        try:
            pid = int(raw_id)
        except ValueError:
            raise ValueError(f"{path}:{line}: patch_id {raw_id!r} is not an integer") from None
        if raw_lab in _TRUE_WORDS:
            lab = True
        elif raw_lab in _FALSE_WORDS:
            lab = False
        else:
            raise ValueError(
                f"{path}:{line}: informative value {row[cl].strip()!r} is not one of "
                "yes/no, true/false, 1/0, good/bad"
            )
        if pid in out:
            raise ValueError(f"{path}:{line}: patch_id {pid} is labelled twice")
        out[pid] = lab
    return out


# --------------------------------------------------------------------------------------------
# CEM500K classifier
# --------------------------------------------------------------------------------------------

#: albumentations ``Normalize()`` defaults (ImageNet), max_pixel_value 255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cem500k_preprocess(patches: np.ndarray, sizes: np.ndarray, size: int = 224) -> torch.Tensor:
    """CEM500K classifier input: crop to true size, GRAY2RGB, Resize(size, size), Normalize().

    Resize is bilinear with half-pixel centres and no antialiasing (cv2.INTER_LINEAR, the
    albumentations default); its result is rounded back to uint8 because cv2 resizes uint8 images
    to uint8 before ``Normalize`` (cv2's fixed-point arithmetic can differ by 1 grey level).
    Patches already at ``size`` x ``size`` pass through unchanged. Returns float32 (N, 3, size, size).
    """
    import torch

    patches, sizes = _check_batch(patches, sizes)
    x = torch.empty((len(patches), 1, size, size), dtype=torch.float32)
    for h, w, idx in _size_groups(sizes):
        if h == 0 or w == 0:
            x[idx] = 0.0
            continue
        g = torch.from_numpy(np.ascontiguousarray(patches[idx, :h, :w])).float().unsqueeze(1)
        if (h, w) != (size, size):
            g = torch.nn.functional.interpolate(g, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
            g = g.round().clamp_(0, 255)
        x[torch.from_numpy(idx)] = g
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std  # broadcasting the single grey channel = GRAY2RGB


def _build_resnet34_one_logit() -> torch.nn.Module:
    import torch
    from torchvision.models import resnet34

    model = resnet34(weights=None)
    model.fc = torch.nn.Linear(512, 1)
    return model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Cem500kClassifierFilter:
    """The published CEM500K patch-quality classifier (``patch_quality_classifier_nn.pth``).

    That file is ``torch.save(model.state_dict())`` of torchvision's ``resnet34`` with
    ``model.fc = nn.Linear(512, 1)`` (CEM500K ``dataset/filtered/classify_nn.py``); a patch is
    "good" (kept) when ``sigmoid(logit) > threshold`` (0.5 there).

    Accepted files: a bare state_dict, a ``module.``-prefixed one (DataParallel), or
    ``{'state_dict': ...}``. Loaded with ``weights_only=True`` (no code execution).
    """

    name: str = "cem500k"

    def __init__(
        self, path: str | Path, *, threshold: float = 0.5, device: str = "cpu", batch_size: int = 64
    ) -> None:
        import torch

        self.path = Path(path)
        self.threshold = float(threshold)
        self.device = str(device)
        self.batch_size = int(batch_size)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"cem500k threshold must be in [0, 1], got {threshold}")
        if self.batch_size < 1:
            raise ValueError(f"cem500k batch_size must be >= 1, got {batch_size}")
        if not self.path.is_file():
            raise FileNotFoundError(f"CEM500K classifier weights not found: {self.path}")
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors come in many types
            raise ValueError(f"{self.path}: cannot be read as a PyTorch weights file ({e})") from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError(f"{self.path}: expected a state_dict (mapping of parameter names to tensors)")
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        model = _build_resnet34_one_logit()
        expected = model.state_dict()
        state = dict(state)
        for k in expected:
            # BatchNorm's num_batches_tracked counters (absent from pre-2018 files) are unused in
            # eval mode: take them from the fresh model rather than rejecting the file.
            if k.endswith("num_batches_tracked") and k not in state:
                state[k] = expected[k]
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        bad_shape = sorted(
            f"{k}: file {tuple(getattr(state[k], 'shape', ()))} vs expected {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and (not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape))
        )
        if missing or unexpected or bad_shape:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
            if bad_shape:
                parts.append(f"shape mismatches: {bad_shape[:3]}")
            raise ValueError(
                f"{self.path}: not a CEM500K patch-quality classifier (torchvision resnet34 with "
                f"fc = Linear(512, 1)): " + "; ".join(parts)
            )
        model.load_state_dict(state, strict=True)
        self.model = model.to(self.device).eval()
        self.sha256 = _sha256(self.path)

    def predict_proba(self, patches: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """sigmoid(logit) = P(good) per patch, batched, without gradients."""
        import torch

        patches, sizes = _check_batch(patches, sizes)
        out = np.empty(len(patches), dtype=np.float64)
        with torch.no_grad():
            for s in range(0, len(patches), self.batch_size):
                x = cem500k_preprocess(patches[s : s + self.batch_size], sizes[s : s + self.batch_size])
                logit = self.model(x.to(self.device))[:, 0]
                out[s : s + len(x)] = torch.sigmoid(logit.double()).cpu().numpy()
        return out

    def __call__(self, patches: np.ndarray, sizes: np.ndarray) -> FilterResult:
        """Keep patches with ``p > threshold`` (CEM500K's rule); score = p."""
        patches, sizes = _check_batch(patches, sizes)
        p = self.predict_proba(patches, sizes)
        empty = _empty_mask(sizes)
        keep = (p > self.threshold) & ~empty
        reason = np.array(["" if k else _classifier_reason(v) for k, v in zip(keep, p)], dtype=object)
        reason[empty] = "empty"
        return FilterResult(keep=keep, reason=reason, score=p)

    def describe(self) -> dict:
        """Name, weights file (path and sha256), threshold and the preprocessing used."""
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "threshold": self.threshold,
            "device": self.device,
            "batch_size": self.batch_size,
            "preprocess": "crop to true size; GRAY2RGB; bilinear Resize(224,224); ImageNet Normalize",
        }


# --------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------

_SPEC_HELP = (
    "expected 'none', 'stats', 'stats:KEY=VALUE,...', 'logistic:PATH.json[,threshold=T]' or "
    "'cem500k:PATH.pth[,threshold=T,device=D,batch_size=B]'"
)


def _parse_options(text: str, allowed: dict[str, type], spec: str) -> dict[str, Any]:
    """Parse ``k=v,k=v`` with typed values; ValueError naming the spec on anything else."""
    opts: dict[str, Any] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"filter spec {spec!r}: empty option; {_SPEC_HELP}")
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key or not val:
            raise ValueError(f"filter spec {spec!r}: option {part!r} is not KEY=VALUE")
        if key not in allowed:
            raise ValueError(
                f"filter spec {spec!r}: unknown option {key!r}; valid options: {', '.join(sorted(allowed))}"
            )
        if key in opts:
            raise ValueError(f"filter spec {spec!r}: option {key!r} given twice")
        try:
            opts[key] = allowed[key](val)
        except ValueError:
            raise ValueError(
                f"filter spec {spec!r}: option {key}={val!r} is not a valid {allowed[key].__name__}"
            ) from None
    return opts


def _path_and_options(rest: str, allowed: dict[str, type], spec: str) -> tuple[str, dict[str, Any]]:
    path, _, opts = rest.partition(",")
    path = path.strip()
    if not path:
        raise ValueError(f"filter spec {spec!r}: missing file path; {_SPEC_HELP}")
    return path, (_parse_options(opts, allowed, spec) if opts.strip() else {})


def build_filter(spec: str) -> PatchFilter | None:
    """Build a filter from a command-line spec.

    ``"none"`` -> None; ``"stats"``; ``"stats:uniform_fraction=0.85,min_std=6"``;
    ``"logistic:PATH.json"`` (optionally ``,threshold=0.6``);
    ``"cem500k:PATH.pth[,threshold=0.5,device=cpu,batch_size=64]"``.

    Raises:
        ValueError: for an unknown kind or option, a malformed value or a missing path.
    """
    if not isinstance(spec, str):
        raise ValueError(f"filter spec must be a string, got {type(spec).__name__}")
    s = spec.strip()
    kind, sep, rest = s.partition(":")
    kind = kind.strip().lower()
    if kind == "none" and not sep:
        return None
    if kind == "stats":
        if not sep:
            return StatsFilter()
        if not rest.strip():
            raise ValueError(f"filter spec {spec!r}: nothing after 'stats:'; {_SPEC_HELP}")
        allowed = {f.name: float for f in dataclasses.fields(StatsFilter)}
        return StatsFilter(**_parse_options(rest, allowed, spec))
    if kind == "logistic" and sep:
        path, opts = _path_and_options(rest, {"threshold": float}, spec)
        filt = LogisticFilter.load(path)
        if "threshold" in opts:
            filt = dataclasses.replace(filt, threshold=opts["threshold"])
        return filt
    if kind == "cem500k" and sep:
        path, opts = _path_and_options(rest, {"threshold": float, "device": str, "batch_size": int}, spec)
        return Cem500kClassifierFilter(path, **opts)
    if kind in ("logistic", "cem500k"):
        raise ValueError(f"filter spec {spec!r}: '{kind}' needs a file path; {_SPEC_HELP}")
    raise ValueError(f"unknown filter spec {spec!r}; {_SPEC_HELP}")
