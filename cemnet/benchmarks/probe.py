"""Frozen-feature representation probe: how much a 2D encoder's features already know about EM.

The probe never trains the encoder. It cuts a labelled 2D benchmark (registered, or any
``benchmark custom`` images + masks) into square tiles, runs the frozen encoder once over them and
scores two things:

* **dense linear probe IoU** -- the encoder's feature maps up to ``max_stride`` are resized to
  stride ``grid_stride`` and concatenated; a class-balanced logistic regression (one 1x1
  convolution) is fitted on the training tiles' pixels (full batch, L-BFGS, seconds) and its
  logits, bilinearly upsampled to full resolution, are thresholded on held-out tiles. Upsampling
  logits equals upsampling the features first (the probe is linear), at a fraction of the memory.
* **kNN patch retrieval accuracy** -- every tile is described by its globally pooled features
  (cosine); a held-out tile takes the majority label of its ``k`` nearest training tiles, the
  label being "foreground fraction above the training median" (balanced: chance is ~0.5).

Both are comparable across encoders of one architecture family and across steps of one run; the
absolute value depends on the probe set. Used by ``cemnet benchmark probe`` (many encoders,
seeds) and by :class:`cemnet.methods.probe_callback.RepresentationProbe` (during pretraining).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cemnet.benchmarks.datasets import IGNORE, BenchmarkData, Sample
from cemnet.benchmarks.train import dataset_norm, training_slices
from cemnet.segment.tiling import tile_starts

__all__ = ["ProbeSet", "ProbeConfig", "make_probe_set", "probe_encoder", "probe_features", "encoder_features",
           "summarize_scores", "plot_probe_history"]


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Probe settings; the defaults fit a resnet18 probe in a few CPU seconds."""

    tile: int = 128  # tile side (px)
    train_tiles: int = 48
    test_tiles: int = 48
    min_stride: int = 4  # use encoder feature maps from this stride (finer ones are near-raw intensities) ...
    max_stride: int = 16  # ... up to this one (coarser ones are too coarse for a pixel probe)
    grid_stride: int = 4  # the probe's pixel grid (features resized to it)
    foreground: int = 1  # mask value probed (1 = the first class)
    l2: float = 1e-3  # weight decay of the logistic regression
    lbfgs_steps: int = 60
    knn_k: int = 5
    batch: int = 16


@dataclasses.dataclass
class ProbeSet:
    """Tiles (N, T, T) uint8 and binary masks (N, T, T) int8 (1 foreground, 0 background,
    -1 not scored) for fitting (``train``) and scoring (``test``), plus the data's (mean, std)."""

    name: str
    train_images: np.ndarray
    train_masks: np.ndarray
    test_images: np.ndarray
    test_masks: np.ndarray
    norm: tuple[float, float]

    def summary(self) -> str:
        fg = float((self.test_masks == 1).mean())
        return (f"probe set {self.name}: {len(self.train_images)} train / {len(self.test_images)} test tiles of "
                f"{self.train_images.shape[-1]} px, test foreground {fg:.1%}")


def _tiles(samples: Sequence[Sample], tile: int, count: int, foreground: int, rng: np.random.Generator,
           name: str) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct grid tiles (drawn by ``rng``) of the 2D slices of ``samples``."""
    slices = training_slices(samples)
    where = [(i, y, x) for i, s in enumerate(slices)
             for y in tile_starts(s.image.shape[0], tile, edge="drop") for x in tile_starts(s.image.shape[1], tile, edge="drop")]
    if not where:
        raise ValueError(f"{name}: no {tile} px tile fits in its images ({sorted({s.image.shape for s in slices})}); "
                         "use a smaller --tile")
    pick = rng.choice(len(where), size=min(count, len(where)), replace=False)
    images, masks = [], []
    for j in sorted(pick):
        i, y, x = where[j]
        img = slices[i].image[y:y + tile, x:x + tile]
        msk = slices[i].mask[y:y + tile, x:x + tile]
        if img.dtype != np.uint8:  # benchmark images are on the 0..255 scale (see datasets.py)
            img = np.clip(img, 0, 255).astype(np.uint8)
        masks.append(np.where(msk == IGNORE, -1, msk == foreground).astype(np.int8))
        images.append(img)
    return np.stack(images), np.stack(masks)


def make_probe_set(data: BenchmarkData, cfg: ProbeConfig = ProbeConfig(), seed: int = 0) -> ProbeSet:
    """Tiles of ``data``'s train and test splits (3D volumes as xy slices), drawn with ``seed``.

    Raises ``ValueError`` naming the data when a split has no foreground or no background pixel
    (an IoU on it means nothing).
    """
    if data.task == "instance3d":
        raise ValueError(f"{data.name}: the probe needs semantic masks, not instance ids")
    rng = np.random.default_rng(seed)
    tr_i, tr_m = _tiles(data.train, cfg.tile, cfg.train_tiles, cfg.foreground, rng, data.name)
    te_i, te_m = _tiles(data.test, cfg.tile, cfg.test_tiles, cfg.foreground, rng, data.name)
    for part, m in (("train", tr_m), ("test", te_m)):
        if not (m == 1).any() or not (m == 0).any():
            raise ValueError(f"{data.name}: the {part} tiles hold no {'foreground' if not (m == 1).any() else 'background'} "
                             f"pixel of class value {cfg.foreground}; choose another class or split")
    return ProbeSet(data.name, tr_i, tr_m, te_i, te_m, dataset_norm(training_slices(data.train)))


# --------------------------------------------------------------------------- features


def _feature_list(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Multi-scale feature maps (finest first) of a ``features_only`` timm model, a timm model
    with ``forward_intermediates``, or a cemnet module with ``encode``."""
    if hasattr(encoder, "feature_info") and not hasattr(encoder, "forward_intermediates"):
        return list(encoder(x))
    if hasattr(encoder, "forward_intermediates"):
        return list(encoder.forward_intermediates(x, intermediates_only=True))
    return list(encoder(x))


@torch.no_grad()
def encoder_features(encoder: nn.Module, images: np.ndarray, norm: tuple[float, float], cfg: ProbeConfig,
                     device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(dense features (N, C, T/g, T/g) on the probe grid, pooled features (N, C')) of uint8 tiles.

    Only levels with a stride in ``[cfg.min_stride, cfg.max_stride]`` enter the dense features;
    every level enters the pooled descriptor.
    """
    was_training = encoder.training
    encoder.eval()  # frozen features: BatchNorm running statistics, no dropout
    dense, pooled = [], []
    grid = cfg.tile // cfg.grid_stride
    try:
        for i in range(0, len(images), cfg.batch):
            x = torch.from_numpy(images[i:i + cfg.batch]).to(device=device, dtype=torch.float32)[:, None]
            x = (x / 255.0 - norm[0]) / norm[1]
            feats = _feature_list(encoder, x)
            keep = [f for f in feats if cfg.min_stride - 1e-6 <= cfg.tile / f.shape[-1] <= cfg.max_stride + 1e-6]
            if not keep:
                strides = sorted({cfg.tile // f.shape[-1] for f in feats})
                raise ValueError(f"no encoder feature map between stride {cfg.min_stride} and {cfg.max_stride} (has {strides})")
            dense.append(torch.cat([F.interpolate(f.float(), size=(grid, grid), mode="bilinear", align_corners=False)
                                    for f in keep], 1).cpu())
            pooled.append(torch.cat([f.float().mean(dim=(2, 3)) for f in feats], 1).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(dense), torch.cat(pooled)


# --------------------------------------------------------------------------- probes


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, cfg: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced L2 logistic regression, full batch L-BFGS; ``x`` standardised (n, c)."""
    pos = float(y.mean())
    weight = torch.where(y > 0, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=cfg.lbfgs_steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y, weight=weight) + cfg.l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _grid_pixels(dense: torch.Tensor, masks: np.ndarray, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pixels: the feature vector of each grid cell and its centre pixel's label."""
    half = stride // 2
    lab = torch.from_numpy(masks[:, half::stride, half::stride].astype(np.float32))
    x = dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1])
    y = lab.reshape(-1)
    keep = y >= 0
    return x[keep], y[keep]


def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    scored = truth >= 0
    p, t = pred & scored, (truth == 1)
    union = int((p | t).sum())
    return float((p & t).sum() / union) if union else float("nan")


def _knn_accuracy(train: torch.Tensor, test: torch.Tensor, train_masks: np.ndarray, test_masks: np.ndarray, k: int) -> float:
    def frac(m: np.ndarray) -> np.ndarray:
        scored = (m >= 0).sum(axis=(1, 2)).clip(min=1)
        return (m == 1).sum(axis=(1, 2)) / scored

    f_tr, f_te = frac(train_masks), frac(test_masks)
    cut = float(np.median(f_tr))
    y_tr, y_te = f_tr > cut, f_te > cut
    mean = train.mean(0, keepdim=True)  # centre: cosine of raw ReLU features is near 1 for all pairs
    a, b = F.normalize(train - mean, dim=1), F.normalize(test - mean, dim=1)
    nn_idx = (b @ a.T).topk(min(k, len(a)), dim=1).indices.numpy()
    pred = y_tr[nn_idx].mean(axis=1) > 0.5
    return float((pred == y_te).mean())


def probe_features(dense_train: torch.Tensor, pooled_train: torch.Tensor, dense_test: torch.Tensor,
                   pooled_test: torch.Tensor, probe_set: ProbeSet, cfg: ProbeConfig = ProbeConfig()) -> dict[str, float]:
    """Scores of already extracted features: ``probe_iou``, ``probe_knn_acc``, ``probe_train_iou``."""
    x, y = _grid_pixels(dense_train, probe_set.train_masks, cfg.grid_stride)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    with torch.enable_grad():
        w, b = _fit_logistic((x - mean) / std, y, cfg)

    def iou_of(dense: torch.Tensor, masks: np.ndarray) -> float:
        logits = torch.einsum("nchw,c->nhw", (dense - mean[:, None, None]) / std[:, None, None], w) + b
        full = F.interpolate(logits[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return _iou(full.numpy() > 0, masks)

    return {
        "probe_iou": iou_of(dense_test, probe_set.test_masks),
        "probe_train_iou": iou_of(dense_train, probe_set.train_masks),
        "probe_knn_acc": _knn_accuracy(pooled_train, pooled_test, probe_set.train_masks, probe_set.test_masks, cfg.knn_k),
    }


def probe_encoder(encoder: nn.Module, probe_set: ProbeSet, cfg: ProbeConfig = ProbeConfig(),
                  norm: tuple[float, float] | None = None, device: str | torch.device = "cpu") -> dict[str, float]:
    """Score a frozen 2D encoder (``features_only`` timm model, or anything
    :func:`encoder_features` reads) on ``probe_set``; ``norm`` defaults to the probe data's own
    (mean, std). The encoder's train/eval mode is restored afterwards."""
    norm = norm or probe_set.norm
    tr = encoder_features(encoder, probe_set.train_images, norm, cfg, device)
    te = encoder_features(encoder, probe_set.test_images, norm, cfg, device)
    return probe_features(tr[0], tr[1], te[0], te[1], probe_set, cfg)


def summarize_scores(rows: Sequence[dict[str, Any]], metric: str) -> tuple[float, float, int]:
    """(mean, sample std (ddof=1; nan for one value), n) of ``metric`` over ``rows``."""
    v = np.array([float(r[metric]) for r in rows if np.isfinite(float(r[metric]))])
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def plot_probe_history(history: Sequence[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Probe scores (``probe_iou``, ``probe_knn_acc``) against pretraining step, one line each."""
    from cemnet.benchmarks.plots import _plt, _save_curves

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    steps = [int(h["step"]) for h in history]
    for metric in ("probe_iou", "probe_knn_acc"):
        ax.plot(steps, [float(h[metric]) for h in history], marker="o", label=metric)
    return _save_curves(plt, fig, ax, "pretraining step", "probe score", title or "representation probe", out, 8)
