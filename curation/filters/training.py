"""Training a :class:`~curation.filters.logistic.LogisticFilter` from labelled patches, and
reading label CSVs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from curation.filters.base import check_batch
from curation.filters.features import patch_features
from curation.filters.logistic import LogisticFilter, sigmoid


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
    patches, sizes = check_batch(patches, sizes)
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
            p_cv[te] = sigmoid(((feats[te] - mean) / std) @ w + b)
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
