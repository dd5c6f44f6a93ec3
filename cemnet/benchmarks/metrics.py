"""Segmentation metrics with explicit conventions.

Semantic (CEM500K definitions):

* :func:`iou_2d` - IoU per image and class, then averaged over images (an image where a class is
  absent from both prediction and truth has an undefined IoU and is skipped for that class);
* :func:`iou_3d` - IoU per class over the whole volume (all test volumes pooled);
* :func:`precision_recall_f1` - pooled pixel counts per class.

Pixels whose truth is :data:`~cemnet.benchmarks.datasets.IGNORE` (-1) are never counted.

Instance / membrane (contingency-table based, ``gt`` rows x ``pred`` columns):

* :func:`adapted_rand` - adapted Rand error, precision and recall;
* :func:`variation_of_information` - VI split ``H(pred|gt)`` and merge ``H(gt|pred)`` in bits;
* :func:`isbi_scores` - ISBI 2012's foreground-restricted Rand and information scores of a
  membrane probability map.

**Ignore-label semantics**: voxels where the *ground truth* has a label in ``ignore_labels``
(default ``(0,)``: background / unlabelled) are dropped before the table is built; the
*prediction*'s label 0 is an ordinary segment (a predicted background voxel inside a true neuron
counts as a split). This is ``skimage.metrics.adapted_rand_error``'s and CREMI's convention, and
the tests check equality with scikit-image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "iou_2d", "iou_3d", "confusion_counts", "precision_recall_f1", "contingency", "adapted_rand",
    "variation_of_information", "membrane_segments", "isbi_scores", "border_mask",
]

IGNORE = -1


def confusion_counts(pred: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, fp, fn) per foreground class 1..num_classes (index 0 = class 1); IGNORE pixels skipped."""
    valid = target != IGNORE
    p, t = pred[valid].astype(np.int64), target[valid].astype(np.int64)
    k = num_classes + 1
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)  # rows truth, cols prediction
    tp = np.diag(cm)[1:].astype(np.float64)
    fp = cm[:, 1:].sum(axis=0) - tp
    fn = cm[1:, :].sum(axis=1) - tp
    return tp, fp, fn


def _iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def iou_2d(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-class IoU, computed per 2D image and averaged over images (CEM500K 2D benchmarks).

    3D arrays are taken as stacks of 2D images. Returns ``(num_classes,)``; NaN for a class
    that occurs in no image.
    """
    per_image = []
    for p, t in zip(preds, targets, strict=True):
        p2, t2 = (p, t) if p.ndim == 3 else (p[None], t[None])
        for a, b in zip(p2, t2):
            per_image.append(_iou(*confusion_counts(a, b, num_classes)))
    arr = np.array(per_image)
    with np.errstate(invalid="ignore"):
        return np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in arr.T])


def iou_3d(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-class IoU over all voxels of all volumes together (CEM500K 3D benchmarks)."""
    tp = fp = fn = np.zeros(num_classes)
    for p, t in zip(preds, targets, strict=True):
        a, b, c = confusion_counts(p, t, num_classes)
        tp, fp, fn = tp + a, fp + b, fn + c
    return _iou(tp, fp, fn)


def precision_recall_f1(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Pooled per-class precision, recall and F1 (NaN where undefined)."""
    tp = fp = fn = np.zeros(num_classes)
    for p, t in zip(preds, targets, strict=True):
        a, b, c = confusion_counts(p, t, num_classes)
        tp, fp, fn = tp + a, fp + b, fn + c
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return {"precision": precision, "recall": recall, "f1": f1}


# --------------------------------------------------------------------------- contingency metrics


def contingency(gt: np.ndarray, pred: np.ndarray, ignore_labels: Iterable[int] = (0,), mask: np.ndarray | None = None) -> np.ndarray:
    """Counts ``n_ij`` of voxels with truth segment i and predicted segment j (non-zero entries
    only, as a flat array; the row/column sums are what the scores need). Ground-truth voxels
    with a label in ``ignore_labels`` and voxels where ``mask`` is False are dropped."""
    g, p = np.asarray(gt).ravel(), np.asarray(pred).ravel()
    if g.shape != p.shape:
        raise ValueError(f"shapes differ: {gt.shape} vs {pred.shape}")
    keep = ~np.isin(g, list(ignore_labels))
    if mask is not None:
        keep &= np.asarray(mask, bool).ravel()
    g, p = g[keep], p[keep]
    _, gi = np.unique(g, return_inverse=True)
    _, pj = np.unique(p, return_inverse=True)
    pairs = gi.astype(np.int64) * (int(pj.max(initial=0)) + 1) + pj
    _, n_ij = np.unique(pairs, return_counts=True)
    rows = np.bincount(gi).astype(np.float64)
    cols = np.bincount(pj).astype(np.float64)
    return n_ij.astype(np.float64), rows, cols  # type: ignore[return-value]


def adapted_rand(gt: np.ndarray, pred: np.ndarray, ignore_labels: Iterable[int] = (0,), *, count_self_pairs: bool = False,
                 mask: np.ndarray | None = None) -> tuple[float, float, float]:
    """Adapted Rand ``(error, precision, recall)``.

    ``precision = sum n_ij^2 / sum b_j^2`` (how often two voxels in one predicted segment share
    a true segment; lowered by merges), ``recall = sum n_ij^2 / sum a_i^2`` (lowered by splits),
    error = 1 - their harmonic mean. With ``count_self_pairs=False`` each square counts pairs of
    distinct voxels (``x^2 - x``), which is scikit-image's ``adapted_rand_error`` (there the
    names precision/recall are swapped: skimage's ``prec`` is our ``recall``); ``True`` is the
    ISBI 2012 / Arganda-Carreras et al. 2015 formula.
    """
    n_ij, a, b = contingency(gt, pred, ignore_labels, mask)
    sq = (lambda x: float(x @ x)) if count_self_pairs else (lambda x: float(x @ x - x.sum()))
    s_ij, s_a, s_b = sq(n_ij), sq(a), sq(b)
    if s_a == 0 or s_b == 0:
        return (0.0, 1.0, 1.0) if s_ij == s_a == s_b else (1.0, 0.0, 0.0)
    precision, recall = s_ij / s_b, s_ij / s_a
    return 1.0 - 2 * s_ij / (s_a + s_b), precision, recall


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def variation_of_information(gt: np.ndarray, pred: np.ndarray, ignore_labels: Iterable[int] = (0,),
                             mask: np.ndarray | None = None) -> tuple[float, float]:
    """``(split, merge)`` = ``(H(pred|gt), H(gt|pred))`` in bits (log2, as CREMI); VI = split + merge.

    Same numbers and order as ``skimage.metrics.variation_of_information(gt, pred,
    ignore_labels=...)`` (checked in the tests)."""
    n_ij, a, b = contingency(gt, pred, ignore_labels, mask)
    n = n_ij.sum()
    if n == 0:
        return 0.0, 0.0
    h_joint, h_gt, h_pred = _entropy(n_ij / n), _entropy(a / n), _entropy(b / n)
    return h_joint - h_gt, h_joint - h_pred


def membrane_segments(membrane: np.ndarray, threshold: float = 0.5, fill: bool = True) -> np.ndarray:
    """2D segments from a membrane map: 4-connected components of ``membrane < threshold``.

    ``fill`` grows the segments over the membrane pixels (nearest segment), so every pixel has a
    segment - how a thin boundary map is turned into a partition before Rand/VI scoring.
    """
    from skimage.measure import label
    from skimage.segmentation import expand_labels

    seg = label(membrane < threshold, connectivity=1)
    if fill and seg.max() > 0:
        seg = expand_labels(seg, distance=max(membrane.shape))
    return seg


def isbi_scores(membrane_prob: np.ndarray, gt_membrane: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """ISBI 2012 foreground-restricted scores of one 2D membrane probability map (or a stack).

    Ground-truth segments are the 4-connected cells of ``gt_membrane == 0``; only pixels inside a
    true cell (foreground) are scored. Predicted segments are :func:`membrane_segments` of the
    thresholded map (filled, so predicted membrane pixels join the nearest cell). Returns
    ``v_rand`` (Rand F-score, ISBI formula with self-pairs) and ``v_info`` (information F-score:
    harmonic mean of ``I/H(gt)`` and ``I/H(pred)``), both higher = better, averaged over slices.
    """
    from skimage.measure import label

    probs = membrane_prob[None] if membrane_prob.ndim == 2 else membrane_prob
    gts = gt_membrane[None] if gt_membrane.ndim == 2 else gt_membrane
    v_rand, v_info = [], []
    for prob, gtm in zip(probs, gts, strict=True):
        gt_seg = label(gtm == 0, connectivity=1)
        pred_seg = membrane_segments(prob, threshold)
        err, _, _ = adapted_rand(gt_seg, pred_seg, (0,), count_self_pairs=True)
        v_rand.append(1.0 - err)
        n_ij, a, b = contingency(gt_seg, pred_seg, (0,))
        n = n_ij.sum()
        h_gt, h_pred = _entropy(a / n), _entropy(b / n)
        mi = h_gt + h_pred - _entropy(n_ij / n)
        # a single segment has zero entropy: define its normalised information as perfect
        split_score = mi / h_pred if h_pred > 0 else 1.0
        merge_score = mi / h_gt if h_gt > 0 else 1.0
        v_info.append(2 * split_score * merge_score / (split_score + merge_score) if split_score + merge_score > 0 else 0.0)
    return {"v_rand": float(np.mean(v_rand)), "v_info": float(np.mean(v_info))}


def border_mask(gt: np.ndarray, max_dist_nm: float = 25.0, voxel_size_nm: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """CREMI-style evaluation mask: False within ``max_dist_nm`` (in xy, per slice) of a boundary
    between two ground-truth labels or a label and background, True elsewhere.

    CREMI excludes these voxels because boundary placement in the annotation is uncertain by
    about that much; pass the result as ``mask=`` to the scores.
    """
    from scipy.ndimage import distance_transform_edt

    vol = gt[None] if gt.ndim == 2 else gt
    sampling = tuple(voxel_size_nm[-2:])
    out = np.ones(vol.shape, bool)
    for z, sl in enumerate(vol):
        boundary = np.zeros(sl.shape, bool)
        dy = sl[1:, :] != sl[:-1, :]
        dx = sl[:, 1:] != sl[:, :-1]
        boundary[1:, :] |= dy
        boundary[:-1, :] |= dy
        boundary[:, 1:] |= dx
        boundary[:, :-1] |= dx
        if boundary.any():
            # distance from each pixel to the nearest boundary pixel; boundary pixels themselves are 0
            out[z] = distance_transform_edt(~boundary, sampling=sampling) > max_dist_nm
    return out[0] if gt.ndim == 2 else out
