"""Metrics against hand-computed cases and scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information as sk_vi

from cemnet.benchmarks.metrics import (
    adapted_rand, border_mask, iou_2d, iou_3d, isbi_scores, membrane_segments, precision_recall_f1, variation_of_information,
)


def test_iou_2d_vs_3d_definitions() -> None:
    # image A: tp 1, fp 1 -> IoU 1/2; image B: tp 3, fn 1 -> IoU 3/4
    t1, p1 = np.array([[1, 0], [0, 0]]), np.array([[1, 1], [0, 0]])
    t2, p2 = np.array([[1, 1], [1, 1]]), np.array([[1, 1], [1, 0]])
    assert iou_2d([p1, p2], [t1, t2], 1)[0] == pytest.approx((0.5 + 0.75) / 2)   # per image, averaged
    assert iou_3d([p1, p2], [t1, t2], 1)[0] == pytest.approx(4 / 6)             # pooled voxels
    # a class absent from prediction and truth in an image is skipped, not counted as 0 or 1
    empty = np.zeros((2, 2), int)
    assert iou_2d([p1, empty], [t1, empty], 1)[0] == pytest.approx(0.5)
    # IGNORE (-1) truth pixels are not scored
    t3 = np.array([[1, -1], [0, 0]])
    assert iou_3d([p1], [t3], 1)[0] == 1.0
    # multi-class: per class
    t = np.array([[1, 2], [2, 0]])
    p = np.array([[1, 2], [1, 0]])
    np.testing.assert_allclose(iou_3d([p], [t], 2), [0.5, 0.5])


def test_precision_recall_f1() -> None:
    t = np.array([1, 1, 1, 0, 0])
    p = np.array([1, 1, 0, 1, 0])
    r = precision_recall_f1([p], [t], 1)
    assert (r["precision"][0], r["recall"][0], r["f1"][0]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))


def test_rand_and_vi_hand_cases() -> None:
    gt = np.array([[1, 1, 2, 2]])
    merged = np.array([[5, 5, 5, 5]])
    # ISBI formula (self-pairs): sum n^2 = 8, sum a^2 = 8, sum b^2 = 16 -> F = 16/24
    err, prec, rec = adapted_rand(gt, merged, count_self_pairs=True)
    assert (1 - err, prec, rec) == pytest.approx((2 / 3, 0.5, 1.0))
    assert variation_of_information(gt, merged) == pytest.approx((0.0, 1.0))   # 1 bit merge error
    split = np.array([[1, 2, 3, 4]])
    assert variation_of_information(gt, split) == pytest.approx((1.0, 0.0))    # 1 bit split error
    # ground-truth 0 is ignored; the prediction's 0 is an ordinary segment
    gt0 = np.array([[0, 0, 1, 1]])
    assert variation_of_information(gt0, np.array([[7, 8, 0, 0]])) == (0.0, 0.0)
    assert adapted_rand(gt, gt)[0] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_scikit_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 6, (30, 40))
    pred = rng.integers(0, 9, (30, 40))
    pred[gt == 3] = 4  # some structure
    are, p, r = adapted_rand(gt, pred)
    sk_are, sk_p, sk_r = adapted_rand_error(gt, pred)  # skimage's prec/rec names are swapped
    assert (are, p, r) == pytest.approx((sk_are, sk_r, sk_p))
    np.testing.assert_allclose(variation_of_information(gt, pred), sk_vi(gt, pred, ignore_labels=(0,)))
    np.testing.assert_allclose(variation_of_information(gt, pred, ignore_labels=()), sk_vi(gt, pred))


def test_isbi_scores() -> None:
    gt = np.ones((20, 20), np.uint8)  # 1 = membrane
    gt[2:9, 2:18] = 0
    gt[11:18, 2:18] = 0          # two cells separated by a membrane
    perfect = gt.astype(float)
    s = isbi_scores(perfect, gt)
    assert s["v_rand"] == pytest.approx(1.0) and s["v_info"] == pytest.approx(1.0)
    missing = perfect.copy()
    missing[9:11, 10] = 0.0      # a gap in the predicted membrane merges the two cells
    m = isbi_scores(missing, gt)
    # two equal cells merged: sum n^2 = 2c^2, sum a^2 = 2c^2, sum b^2 = 4c^2 -> F = 2/3
    assert m["v_rand"] == pytest.approx(2 / 3) and m["v_info"] < 1.0
    assert membrane_segments(missing).max() == 1


def test_border_mask() -> None:
    gt = np.zeros((1, 10, 10), int)
    gt[:, :, 5:] = 1
    m = border_mask(gt, max_dist_nm=8.0, voxel_size_nm=(40, 4, 4))  # 2 px each side of the edge
    assert m[0, 0].tolist() == [True, True, False, False, False, False, False, False, True, True]
    split, merge = variation_of_information(gt, np.zeros_like(gt), ignore_labels=(), mask=m)
    assert merge == pytest.approx(1.0)
