"""Cheap image statistics of patches (:func:`patch_features`), the input of the stats and
logistic filters."""

from __future__ import annotations

import numpy as np

from curation.filters.base import check_batch, size_groups

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
    "uniform_fraction",  # area in flat blocks (see UNIFORM_BLOCK below)
    "gradient_mean",  # mean |gradient| of the 2x2-binned image (grey levels per 2 px)
    "gradient_rel",  # gradient_mean / (std + 1): structure per unit contrast (blur)
    "fine_detail_fraction",  # share of the variance removed by 2x2 binning (finest scale)
    "flat_pair_fraction",  # adjacent pixel pairs with identical values: label maps/masks ~1
)

#: Grey-level half-width of the "dominant level" window.
DOMINANT_TOL = 2
#: Flat-block detection: blocks of ``UNIFORM_BLOCK`` x ``UNIFORM_BLOCK`` pixels of the
#: 2x2-binned image (i.e. 8x8 original pixels). Binning first halves pixel noise, so mildly noisy
#: flat areas still read as flat, while membranes/organelles (a few pixels wide, tens of grey
#: levels of contrast) survive it. Strongly noisy or textured empty substrate does not read as
#: flat (docs/filters.md, MUVIS): that needs a trained filter.
UNIFORM_BLOCK = 4
#: Default local-std tolerance (grey levels, binned image) below which a block counts as flat.
DEFAULT_UNIFORM_STD = 2.0

_LEVELS = np.arange(256, dtype=np.float64)


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
    bh, bw = min(UNIFORM_BLOCK, s.shape[1]), min(UNIFORM_BLOCK, s.shape[2])
    k = bh * bw
    bs, bq = _block_sum(s, UNIFORM_BLOCK), _block_sum(q, UNIFORM_BLOCK)
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
    if s.shape[1] % UNIFORM_BLOCK == 0 and s.shape[2] % UNIFORM_BLOCK == 0:
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
    patches, sizes = check_batch(patches, sizes)
    out = np.zeros((len(patches), len(FEATURE_NAMES)), dtype=np.float32)
    i_uniform = FEATURE_NAMES.index("uniform_fraction")
    for h, w, idx in size_groups(sizes):
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
