"""Unbiased multi-bandwidth MMD^2: known cases, a naive O(n^2) reference, blockwise == full."""

from __future__ import annotations

import numpy as np
import pytest

from cemnet.transferability.mmd import (
    DEFAULT_SCALES,
    bandwidths,
    median_bandwidth,
    mmd2,
    mmd2_test,
    pairwise_mmd2,
    rbf_kernel,
)


def naive_mmd2(x: np.ndarray, y: np.ndarray, sigmas: tuple[float, ...]) -> float:
    """Textbook U-statistic with explicit loops (Gretton et al. 2012, eq. 3)."""

    def k(a: np.ndarray, b: np.ndarray) -> float:
        d = float(((a - b) ** 2).sum())
        return sum(np.exp(-d / (2 * s * s)) for s in sigmas) / len(sigmas)

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def gauss(n: int, shift: float, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    x[:, 0] += shift
    return x


def test_matches_naive_reference():
    x, y = gauss(23, 0.0, d=5, seed=1), gauss(17, 0.7, d=5, seed=2)
    sig = bandwidths(median_bandwidth(np.concatenate([x, y])))
    assert mmd2(x, y, sigmas=sig) == pytest.approx(naive_mmd2(x, y, sig), abs=1e-10)


@pytest.mark.parametrize("block", [1, 3, 7, 16, 1000])
def test_blockwise_equals_full(block):
    x, y = gauss(31, 0.0, seed=3), gauss(26, 0.5, seed=4)
    sig = bandwidths(1.7)
    full = mmd2_test(x, y, sigmas=sig, permutations=20, block=10_000, seed=5)
    tiled = mmd2_test(x, y, sigmas=sig, permutations=20, block=block, seed=5)
    assert tiled.mmd2 == pytest.approx(full.mmd2, abs=1e-12)
    assert tiled.p_value == full.p_value  # same permutations, same statistics


def test_permuted_statistics_match_naive():
    """The all-permutations-in-one-pass trick must equal recomputing each permutation."""
    x, y = gauss(12, 0.0, d=3, seed=6), gauss(9, 1.0, d=3, seed=7)
    sig = bandwidths(1.3)
    z = np.concatenate([x, y])
    rng = np.random.default_rng(0)
    for _ in range(3):
        perm = rng.permutation(len(z))
        xp, yp = z[perm[:12]], z[perm[12:]]
        assert mmd2(xp, yp, sigmas=sig, block=4) == pytest.approx(naive_mmd2(xp, yp, sig), abs=1e-10)


def test_identical_samples_near_zero():
    x = gauss(200, 0.0, seed=8)
    y = gauss(200, 0.0, seed=9)  # same distribution, different draws
    value = mmd2(x, y)
    assert abs(value) < 0.01
    same = mmd2(x, x.copy())  # literally identical samples: the U-statistic is slightly negative
    assert -0.02 < same <= 1e-12


def test_grows_monotonically_with_mean_shift():
    x = gauss(150, 0.0, seed=10)
    sig = bandwidths(median_bandwidth(np.concatenate([x, gauss(150, 0.0, seed=11)])))
    values = [mmd2(x, gauss(150, s, seed=11), sigmas=sig) for s in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[-1] <= 2.0  # the mean-of-RBFs kernel bounds MMD^2 by 2


def test_permutation_p_values():
    x = gauss(80, 0.0, seed=12)
    shifted = mmd2_test(x, gauss(80, 1.0, seed=13), permutations=200, seed=0)
    assert shifted.p_value == pytest.approx(1 / 201)  # nothing in the null beats a real shift
    assert shifted.mmd2 > shifted.null_q95
    # same distribution: p is ~uniform, so check calibration over draws rather than one draw
    ps = np.array([mmd2_test(gauss(30, 0.0, d=4, seed=100 + i), gauss(30, 0.0, d=4, seed=200 + i),
                             permutations=100, seed=i).p_value for i in range(40)])
    assert (ps < 0.05).mean() <= 0.15 and np.median(ps) > 0.25
    assert mmd2_test(x, x.copy(), permutations=50).p_value > 0.5


def test_median_bandwidth_and_kernel():
    z = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])  # distances 5, 5, 10
    assert median_bandwidth(z) == pytest.approx(5.0)
    assert median_bandwidth(np.ones((5, 3))) == 1.0  # degenerate data keeps a defined kernel
    assert bandwidths(2.0) == tuple(2.0 * s for s in DEFAULT_SCALES)
    k = rbf_kernel(z, z, bandwidths(5.0))
    assert np.allclose(np.diag(k), 1.0) and np.allclose(k, k.T) and (k <= 1).all()


def test_pairwise_and_errors():
    a, b, c = gauss(20, 0, seed=1), gauss(20, 1, seed=2), gauss(20, 3, seed=3)
    sig = bandwidths(2.0)
    mat = pairwise_mmd2([a, b, c], sigmas=sig)
    assert np.allclose(mat, mat.T) and np.allclose(np.diag(mat), 0)
    assert mat[0, 2] > mat[0, 1] and mat[0, 1] == pytest.approx(mmd2(a, b, sigmas=sig))
    with pytest.raises(ValueError, match="at least 2"):
        mmd2(a[:1], b)
    with pytest.raises(ValueError, match="same d"):
        mmd2(a, b[:, :3])
