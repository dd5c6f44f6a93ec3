"""Unbiased MMD^2 with a multi-bandwidth RBF kernel, computed in bounded-memory blocks.

``mmd2(x, y)`` estimates the squared Maximum Mean Discrepancy between two samples of feature
vectors (Gretton et al. 2012, eq. 3, the unbiased U-statistic)::

    MMD^2_u = 1/(m(m-1)) sum_{i!=j} k(x_i,x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i,y_j) - 2/(mn) sum_{i,j} k(x_i,y_j)

with ``k(a, b) = mean_s exp(-|a-b|^2 / (2 s^2))`` over bandwidths ``s = median * (0.25, 0.5, 1, 2,
4)``; ``median`` is the median pairwise distance of the pooled sample (the median heuristic). A
mixture of bandwidths is used because no single one is right for every pair of domains: one
that is too small sees every pair as different, one too large sees none. The kernel is the *mean*
(not the sum) over bandwidths so that ``k(a, a) = 1`` and MMD^2 lies in [-1, 2] whatever the
number of bandwidths. The unbiased estimate is ~0 for samples of one distribution and may be
slightly negative.

Memory: the pooled sample ``z`` (N = m + n rows) is never turned into an N x N kernel matrix.
Everything the statistic needs - for the observed split and for every permutation of the
permutation test at once - follows from two quantities accumulated block by block:

* ``r = K 1`` (kernel row sums), and
* ``q_p = a_p^T K a_p`` for each split ``p`` (``a_p`` is the 0/1 indicator of "belongs to x"),

because ``a^T K b = a.r - q`` and ``b^T K b = 1.r - 2 a.r + q`` with ``b = 1 - a``. So the
permutation test costs one pass over the kernel blocks, not one pass per permutation, and peak
memory is ``block^2`` kernel values plus ``N x permutations`` indicators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_SCALES",
    "MMDResult",
    "median_bandwidth",
    "bandwidths",
    "rbf_kernel",
    "mmd2",
    "mmd2_test",
    "pairwise_mmd2",
]

DEFAULT_SCALES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass
class MMDResult:
    """An MMD^2 estimate with its permutation test.

    ``p_value`` is ``(1 + #{permuted >= observed}) / (1 + permutations)`` (never 0: the observed
    split counts as one permutation); ``None`` when no permutations were run. ``null_q95`` is the
    95th percentile of the permutation null, a scale for "how big is big" at this sample size.
    """

    mmd2: float
    p_value: float | None
    permutations: int
    n_x: int
    n_y: int
    bandwidths: tuple[float, ...]
    null_q95: float | None = None


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows, clipped at 0 (cancellation can go below)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def median_bandwidth(z: np.ndarray, max_points: int = 1000, seed: int = 0) -> float:
    """Median pairwise Euclidean distance of ``z`` (a random subset of ``max_points`` if larger).

    The subset bounds the cost (``max_points^2`` distances) for large corpora; the median of a
    1000-point subsample is stable to a few percent. Falls back to 1.0 for degenerate data (all
    points equal), so the kernel stays defined.
    """
    z = np.asarray(z, dtype=np.float64)
    if len(z) > max_points:
        z = z[np.random.default_rng(seed).choice(len(z), max_points, replace=False)]
    if len(z) < 2:
        return 1.0
    d = _sq_dists(z, z)[np.triu_indices(len(z), k=1)]
    med = float(np.sqrt(np.median(d)))
    return med if med > 0 and np.isfinite(med) else 1.0


def bandwidths(median: float, scales: Sequence[float] = DEFAULT_SCALES) -> tuple[float, ...]:
    """``median * scales``: the RBF bandwidths (sigma) of the multi-bandwidth kernel."""
    return tuple(float(median) * float(s) for s in scales)


def rbf_kernel(a: np.ndarray, b: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """Multi-bandwidth RBF kernel block ``mean_s exp(-|a_i - b_j|^2 / (2 s^2))`` (float64)."""
    d = _sq_dists(np.asarray(a, np.float64), np.asarray(b, np.float64))
    out = np.zeros_like(d)
    for s in sigmas:
        out += np.exp(-d / (2.0 * s * s))
    return out / len(sigmas)


def _accumulate(z: np.ndarray, a: np.ndarray, sigmas: Sequence[float], block: int) -> tuple[np.ndarray, np.ndarray]:
    """Row sums ``r = K 1`` and ``q_p = a_p^T K a_p`` for every column ``p`` of ``a``, blockwise.

    Only one ``block x block`` kernel tile exists at a time. ``K`` is symmetric, so only tiles
    with ``j >= i`` are computed; an off-diagonal tile counts twice in ``q`` and feeds the row
    sums of both its row and its column range.
    """
    n = len(z)
    r = np.zeros(n)
    q = np.zeros(a.shape[1])
    for i in range(0, n, block):
        zi, ai = z[i : i + block], a[i : i + block]
        for j in range(i, n, block):
            k = rbf_kernel(zi, z[j : j + block], sigmas)
            r[i : i + block] += k.sum(1)
            if j == i:
                q += ((ai.T @ k) * ai.T).sum(1)
            else:
                r[j : j + block] += k.sum(0)
                q += 2.0 * ((ai.T @ k) * a[j : j + block].T).sum(1)
    return r, q


def _statistic(r: np.ndarray, q: np.ndarray, a: np.ndarray, m: int, n: int) -> np.ndarray:
    """Unbiased MMD^2 for each split column of ``a`` from the accumulated ``r`` and ``q``."""
    ar = a.T @ r  # a^T K 1
    total = r.sum()  # 1^T K 1
    kxx = q - m  # remove the diagonal: k(z, z) = 1 for the mean-of-RBFs kernel
    kxy = ar - q
    kyy = total - 2.0 * ar + q - n
    return kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2.0 * kxy / (m * n)


def mmd2_test(
    x: np.ndarray,
    y: np.ndarray,
    *,
    sigmas: Sequence[float] | None = None,
    permutations: int = 200,
    block: int = 512,
    seed: int = 0,
) -> MMDResult:
    """Unbiased MMD^2 between samples ``x`` (m, d) and ``y`` (n, d) with a permutation p-value.

    Args:
        sigmas: RBF bandwidths; default ``median_bandwidth(x + y) * DEFAULT_SCALES``. Pass the
            same ``sigmas`` to compare several MMDs with each other (one kernel for all).
        permutations: random relabellings of the pooled sample for the null distribution
            (0 = no test). All are evaluated in the same pass over the kernel blocks.
        block: tile side; peak memory ~ ``block^2 + (m + n) * (permutations + 1)`` floats.
        seed: for the permutations and the bandwidth subsample.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be (m, d) and (n, d) with the same d, got {x.shape} and {y.shape}")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD^2 needs at least 2 samples on each side, got {m} and {n}")
    z = np.concatenate([x, y])
    if sigmas is None:
        sigmas = bandwidths(median_bandwidth(z, seed=seed))
    rng = np.random.default_rng(seed)
    labels = np.zeros((m + n, permutations + 1))
    labels[:m, 0] = 1.0  # column 0: the observed split
    for p in range(1, permutations + 1):
        labels[rng.permutation(m + n)[:m], p] = 1.0
    r, q = _accumulate(z, labels, sigmas, block)
    stats = _statistic(r, q, labels, m, n)
    observed = float(stats[0])
    p_value = null_q95 = None
    if permutations:
        null = stats[1:]
        # a tolerance so that numerically equal statistics (identical samples) count as ">="
        p_value = float((1 + np.sum(null >= observed - 1e-12)) / (1 + permutations))
        null_q95 = float(np.quantile(null, 0.95))
    return MMDResult(observed, p_value, permutations, m, n, tuple(float(s) for s in sigmas), null_q95)


def mmd2(x: np.ndarray, y: np.ndarray, *, sigmas: Sequence[float] | None = None, block: int = 512) -> float:
    """Unbiased MMD^2 (no test); see :func:`mmd2_test`."""
    return mmd2_test(x, y, sigmas=sigmas, permutations=0, block=block).mmd2


def pairwise_mmd2(
    samples: Sequence[np.ndarray], *, sigmas: Sequence[float], block: int = 512
) -> np.ndarray:
    """Symmetric matrix of MMD^2 between every pair of ``samples`` (diagonal 0), one kernel."""
    k = len(samples)
    out = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = mmd2(samples[i], samples[j], sigmas=sigmas, block=block)
    return out
