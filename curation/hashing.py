"""64-bit difference hashes of patches, bit-identical to CEM500K's.

CEM500K (``dataset/raw/crop_patches.py``) hashes every patch as::

    imagehash.dhash(Image.fromarray(patch).resize((224, 224), resample=BILINEAR), hash_size=8)

i.e. the patch is resized to the full patch size (so truncated edge patches are not more likely to
look unique), then imagehash shrinks it to 9x8 with Pillow's LANCZOS filter and compares
neighbouring columns. :func:`dhash_reference` is exactly that call. :func:`dhash_batch` computes the
same bits for a whole batch at once: Pillow's 8-bit resampler is a separable convolution with
fixed-point coefficients (22 fractional bits, rounding, clipping after each pass), which we
reproduce with two matrix products: the big horizontal one in float32, where the few results
within float32's proven error bound of a rounding boundary are recomputed exactly, and the small
vertical one in float64, which is exact (every product and sum is an integer below 2**53).
Equality with the reference is tested on real patches and on random ones.

Hashes are packed as uint64, first bit (top-left difference) most significant, which is the order
of ``str(imagehash)``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

HASH_SIZE = 8
_PRECISION_BITS = 32 - 8 - 2  # Pillow's ImagingResample for 8-bit images


def dhash_reference(patch: np.ndarray, patch_size: int = 224) -> np.uint64:
    """CEM500K's hash of one uint8 patch (slow, the definition we must match)."""
    import imagehash

    image = Image.fromarray(np.ascontiguousarray(patch)).resize(
        (patch_size, patch_size), resample=Image.Resampling.BILINEAR
    )
    bits = imagehash.dhash(image, hash_size=HASH_SIZE).hash
    return pack_bits(bits.reshape(1, -1))[0]


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(N, 64) bool -> (N,) uint64, first bit most significant."""
    return np.packbits(bits.astype(bool), axis=1).view(">u8").astype(np.uint64).ravel()


def unpack_bits(hashes: np.ndarray) -> np.ndarray:
    """(N,) uint64 -> (N, 64) bool, inverse of :func:`pack_bits`."""
    as_bytes = np.asarray(hashes, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(as_bytes, axis=1).astype(bool)


def _lanczos(x: np.ndarray) -> np.ndarray:
    # Pillow: sinc(x) * sinc(x / 3) on [-3, 3), 0 elsewhere, with sinc(0) = 1.
    def sinc(v: np.ndarray) -> np.ndarray:
        out = np.ones_like(v)
        nz = v != 0.0
        pv = v[nz] * math.pi
        out[nz] = np.sin(pv) / pv
        return out

    return np.where((x >= -3.0) & (x < 3.0), sinc(x) * sinc(x / 3.0), 0.0)


@lru_cache(maxsize=32)
def _lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point LANCZOS coefficients (``precompute_coeffs`` + ``normalize_coeffs_8bpc``)
    as an (in_size, out_size) integer-valued float64 matrix."""
    fn, support_base = _lanczos, 3.0
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support_base * filterscale
    matrix = np.zeros((in_size, out_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax, dtype=np.float64)
        weights = fn((taps - center + 0.5) / filterscale)
        total = weights.sum()
        if total != 0.0:
            weights = weights / total
        scaled = weights * (1 << _PRECISION_BITS)
        # C's (int) truncation after +-0.5: round half away from zero.
        fixed = np.where(weights < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
        matrix[xmin:xmax, xx] = fixed
    return matrix


def _clip8(acc: np.ndarray) -> np.ndarray:
    acc = acc + float(1 << (_PRECISION_BITS - 1))
    return np.clip(np.floor(acc / (1 << _PRECISION_BITS)), 0, 255)


def _resize_to_full(patch: np.ndarray, patch_size: int) -> np.ndarray:
    # Pillow itself for this step: BILINEAR has two taps, so its sparse loop beats a dense
    # matrix product, and only truncated edge patches need it.
    image = Image.fromarray(np.ascontiguousarray(patch)).resize(
        (patch_size, patch_size), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(image)


def dhash_batch(
    patches: np.ndarray, sizes: np.ndarray | None = None, patch_size: int | None = None
) -> np.ndarray:
    """Hashes of a batch of uint8 patches, bit-identical to :func:`dhash_reference`.

    Args:
        patches: uint8 (N, P, P); truncated patches zero-padded, their true size in ``sizes``.
        sizes: int (N, 2) true (h, w) of each patch; ``None`` means all are full size.
        patch_size: side the patch is resized to before hashing (CEM500K: the crop size).

    Returns:
        uint64 (N,) hashes.
    """
    patches = np.asarray(patches)
    if patches.ndim != 3 or patches.dtype != np.uint8:
        raise ValueError(f"expected uint8 patches of shape (N, P, P), got {patches.dtype} {patches.shape}")
    # One BLAS thread: these products are tiny, and a threaded BLAS competing with our worker
    # processes for the cores was measured 15x slower.
    with threadpool_limits(limits=1, user_api="blas"):
        return _dhash_chunks(patches, sizes, patch_size or patches.shape[1])


def _dhash_chunks(patches: np.ndarray, sizes: np.ndarray | None, patch_size: int) -> np.ndarray:
    n, ph, pw = patches.shape
    out = np.zeros(n, dtype=np.uint64)
    horizontal = _HorizontalPass(patch_size, HASH_SIZE + 1)
    vertical_matrix = _lanczos_matrix(patch_size, HASH_SIZE)  # (P, 8)
    true_sizes = np.tile([ph, pw], (n, 1)) if sizes is None else np.asarray(sizes).reshape(n, 2)
    full_size = (true_sizes == patch_size).all(1) & (ph == patch_size) & (pw == patch_size)
    # Small chunks keep the working set in cache: 3-5x faster than one big product.
    chunk = 16
    buffer = np.empty((chunk, patch_size, patch_size), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = buffer[: stop - start]
        if (ph, pw) == (patch_size, patch_size):
            block[:] = patches[start:stop]
        # Truncated edge patches are first resized to P x P, as CEM500K does.
        for i in start + np.nonzero(~full_size[start:stop])[0]:
            h, w = true_sizes[i]
            block[i - start] = _resize_to_full(patches[i, :h, :w], patch_size)
        # Pillow resamples horizontally first (to 9 columns) and rounds to uint8, then vertically.
        rows = horizontal(block.reshape(-1, patch_size))  # (m * P, 9), integers 0..255
        columns = rows.reshape(-1, patch_size, HASH_SIZE + 1).transpose(0, 2, 1).reshape(-1, patch_size)
        small = _clip8(columns.astype(np.float64) @ vertical_matrix)  # exact in float64
        small = small.reshape(-1, HASH_SIZE + 1, HASH_SIZE).transpose(0, 2, 1)  # (m, 8 rows, 9 cols)
        bits = small[:, :, 1:] > small[:, :, :-1]
        out[start:stop] = pack_bits(bits.reshape(stop - start, -1))
    return out


class _HorizontalPass:
    """Exact ``_clip8(rows @ matrix)`` for integer rows 0..255, computed in float32 (2x faster
    than float64), with the few entries whose float32 value lies within the rounding-error bound
    of a rounding boundary recomputed exactly in float64.

    The bound is rigorous for any summation order (Higham, Accuracy and Stability, eq. 3.5):
    ``|fl(x . w) - x . w| <= gamma_n * sum|x_i w_i|`` with ``gamma_n = n u / (1 - n u)``,
    ``u = 2**-24``, ``n = P + 1`` (P products and sums), and ``|x_i| <= 255``; plus half an ulp
    of the final ``+ 0.5``. On real patches about 1% of the entries need the exact path.
    """

    def __init__(self, in_size: int, out_size: int) -> None:
        self.matrix = _lanczos_matrix(in_size, out_size)  # (P, out) integer-valued float64
        self.matrix32 = self.matrix.astype(np.float32)  # exact: |coefficients| < 2**24
        self.matrix_t = np.ascontiguousarray(self.matrix.T)
        unit = 2.0**-24
        gamma = (in_size + 1) * unit / (1 - (in_size + 1) * unit)
        bound = gamma * 255.0 * np.abs(self.matrix).sum(0) / (1 << _PRECISION_BITS)
        self.margin = (bound + 256.0 * unit).astype(np.float32)  # per output column, grey levels
        self._sure_below = np.float32(0.5) - self.margin.max()  # one scalar: cheaper than per column

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        value = rows @ self.matrix32
        value *= np.float32(1.0 / (1 << _PRECISION_BITS))  # exact: a power of two
        value += np.float32(0.5)
        result = np.floor(value)
        value -= result  # fractional part
        value -= np.float32(0.5)
        np.abs(value, out=value)
        unsure = np.flatnonzero(value > self._sure_below)
        if len(unsure):
            r, c = np.divmod(unsure, value.shape[1])
            exact = np.einsum("ij,ij->i", rows[r].astype(np.float64), self.matrix_t[c])
            result.flat[unsure] = _clip8(exact)
        np.clip(result, 0, 255, out=result)
        return result


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bitwise Hamming distance between uint64 hashes (broadcasting)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    as_bytes = np.atleast_1d(x).astype(">u8").view(np.uint8).reshape(*np.atleast_1d(x).shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(-1).reshape(x.shape)
