"""MGMR HOG targets against scikit-image and an independent numpy reference, on real EM."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.feature import hog

from cemnet.methods.hog import hog_target, maskfeat_hog, segneuron_hog


def _isbi(shared_data: Path, i: int = 0) -> np.ndarray:
    return np.array(Image.open(shared_data / "isbi2012" / "train" / "images" / f"{i}.png").convert("L"))


def _neuroproof(shared_data: Path, n: int, start: int = 0) -> np.ndarray:
    folder = shared_data / "neuroproof_fibsem_medulla" / "training_sample2" / "grayscale_maps"
    files = sorted(folder.glob("*.png"))[start : start + n]
    return np.stack([np.asarray(Image.open(f).convert("L")) for f in files])


def _skimage_segneuron(slice_u8: np.ndarray) -> np.ndarray:
    # exactly SegNeuron's call (Pretrain/pretrain_provider.py): float32 / 255, 4x4 cells, 1x1 blocks
    x = slice_u8.astype(np.float32) / 255.0
    _, vis = hog(x, pixels_per_cell=(4, 4), cells_per_block=(1, 1), visualize=True)
    return vis


@pytest.mark.parametrize("box", [(0, 0, 128, 128), (131, 257, 130, 123), (400, 17, 64, 96)])
def test_segneuron_hog_matches_skimage_on_isbi(shared_data: Path, box: tuple[int, int, int, int]) -> None:
    img = _isbi(shared_data, 3)
    y, x, h, w = box
    patch = img[y : y + h, x : x + w]  # includes sizes not divisible by the 4-px cell
    ours = segneuron_hog(torch.from_numpy(patch.copy()).float() / 255.0).numpy()
    ref = _skimage_segneuron(patch)
    assert ours.shape == ref.shape
    assert ref.max() > 0.05  # real structure, not an empty target
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_segneuron_hog_batched_3d_matches_per_slice_skimage(shared_data: Path) -> None:
    vol = _neuroproof(shared_data, 6, start=100)[:, 40:104, 60:124]  # (6, 64, 64) real FIB-SEM
    x = torch.from_numpy(vol).float()[None, None] / 255.0  # (1, 1, D, H, W) as MGMR 3D sees it
    ours = hog_target(x, "segneuron", spatial_dims=3)[0, 0].numpy()
    ref = np.stack([_skimage_segneuron(s) for s in vol])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def _maskfeat_reference(img: np.ndarray, bins: int = 9, cell: int = 8) -> np.ndarray:
    """Straightforward loops: Sobel on a reflect-padded image, unsigned bins, L2 per cell.

    Fed the uint8 values as integers, so the gradients are exact (a zero is a true zero); the
    per-cell L2 normalisation makes the result independent of the 1/255 scale.
    """
    h, w = img.shape
    p = np.pad(img.astype(np.int64), 1, mode="reflect")
    gx = np.zeros((h, w), dtype=np.int64)
    gy = np.zeros((h, w), dtype=np.int64)
    for r in range(h):
        for c in range(w):
            win = p[r : r + 3, c : c + 3]
            gx[r, c] = (win[0, 2] + 2 * win[1, 2] + win[2, 2]) - (win[0, 0] + 2 * win[1, 0] + win[2, 0])
            gy[r, c] = (win[2, 0] + 2 * win[2, 1] + win[2, 2]) - (win[0, 0] + 2 * win[0, 1] + win[0, 2])
    out = np.zeros((bins, h // cell, w // cell))
    for i in range(h // cell):
        for j in range(w // cell):
            hist = np.zeros(bins)
            for r in range(i * cell, (i + 1) * cell):
                for c in range(j * cell, (j + 1) * cell):
                    theta = math.atan2(int(gy[r, c]), int(gx[r, c])) % math.pi
                    hist[min(int(theta / math.pi * bins), bins - 1)] += math.hypot(gx[r, c], gy[r, c])
            out[:, i, j] = hist / max(np.linalg.norm(hist), 1e-12)
    return out


def test_maskfeat_hog_matches_numpy_reference(shared_data: Path) -> None:
    img = _isbi(shared_data, 7)[200:264, 300:372]  # 64 x 72: 8 x 9 cells
    x = torch.from_numpy(img).float() / 255.0
    ours = maskfeat_hog(x).numpy()
    ref = _maskfeat_reference(img)
    assert ours.shape == ref.shape == (9, 8, 9)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=0), 1.0, atol=1e-5)


def test_hog_targets_are_fp32_and_unchanged_under_bf16_autocast(shared_data: Path) -> None:
    vol = torch.from_numpy(_neuroproof(shared_data, 4, start=10)[:, :64, :64]).float()[None, None] / 255.0
    plain = {k: hog_target(vol, k, spatial_dims=3) for k in ("segneuron", "maskfeat")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = {k: hog_target(vol.bfloat16(), k, spatial_dims=3) for k in ("segneuron", "maskfeat")}
    assert plain["maskfeat"].shape == (1, 9, 4, 8, 8)
    assert plain["segneuron"].shape == (1, 1, 4, 64, 64)
    for k in plain:
        assert mixed[k].dtype == torch.float32
        # the input itself was rounded to bf16, so compare with the target of that rounded input
        expected = hog_target(vol.bfloat16().float(), k, spatial_dims=3)
        torch.testing.assert_close(mixed[k], expected, rtol=0, atol=1e-6)
