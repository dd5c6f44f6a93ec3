"""Fine-tune a U-Net on a pretrained (or random) encoder and evaluate it: the benchmark loop.

CEM500K protocol defaults (Conrad & Narayan 2021): AdamW (weight decay 0.1), OneCycle schedule
with max lr 0.003, batch 16, random crops of 224 px (256 for 3D-sliced data), flips, rot90 and
brightness/contrast jitter, BCE for one class / class-weighted cross-entropy for several, the
encoder fine-tuned end to end. Everything is configurable in :class:`FinetuneConfig`; tests and
CPU runs shrink iterations, batch and crop.

Training is on 2D slices (3D benchmarks are cut into xy slices, plus xz/yz with
``orthoplane=True``); 3D test volumes are predicted slice by slice, optionally along all three
planes with the probabilities averaged (CEM500K's orthoplane inference). The loop
runs on the shared fine-tuning engine (:mod:`cemnet.finetune.engine`) with a bare Trainer (no
logger, checkpoints or progress bar), so the per-run overhead stays small for sweeps of dozens.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cemnet.benchmarks.datasets import IGNORE, BenchmarkData, Sample
from cemnet.benchmarks.metrics import iou_2d, iou_3d, isbi_scores, precision_recall_f1
from cemnet.finetune.engine import FinetuneModule, PeriodicEvaluation, StepHook, fit

__all__ = ["FinetuneConfig", "FinetuneResult", "build_model", "finetune", "predict", "evaluate", "set_trainable",
           "encoder_levers", "encoder_norm"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tuning and evaluation settings (defaults: CEM500K protocol)."""

    iterations: int = 2500
    batch_size: int = 16
    crop_size: int = 224
    max_lr: float = 3e-3
    weight_decay: float = 0.1
    freeze: str = "none"  # "none" | "encoder" | a stage name ("layer3"): frozen below it
    # levers for a pretrained encoder (cemnet.finetune.engine): 1 / 1 / 0 = off
    encoder_lr_scale: float = 1.0  # encoder peak lr = max_lr x this
    layer_decay: float = 1.0  # x this per encoder stage below the deepest
    freeze_encoder_iterations: int = 0  # encoder frozen for the first N iterations
    arch: str | None = "resnet50"  # encoder architecture for random init
    base_width: int = 256
    seed: int = 0
    eval_at: tuple[int, ...] = ()  # extra iterations to evaluate at (iteration efficiency)
    orthoplane: bool = False  # 3D: train on xy+xz+yz slices and average three-plane predictions
    class_weights: str = "inverse"  # multi-class CE: "inverse" (frequency) or "none"
    augment: bool = True
    eval_batch: int = 8
    device: str = "cpu"


@dataclasses.dataclass
class FinetuneResult:
    """The trained model and one metrics dict per evaluated iteration."""

    model: nn.Module
    history: list[dict[str, Any]]
    norm: tuple[float, float]

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1]


# --------------------------------------------------------------------------- model


def build_model(encoder: str, out_channels: int, cfg: FinetuneConfig) -> tuple[nn.Module, tuple[float, float] | None]:
    """A :class:`cemnet.models.unet.UNet` and the encoder's (mean, std) if its weights record one.

    ``encoder``: ``random`` (``cfg.arch``, random init), ``random:ARCH``, or anything
    :func:`cemnet.load_encoder` accepts (export file, run folder, checkpoint, registry name).
    """
    import timm

    from cemnet.models.unet import UNet
    from cemnet.weights.load import load_unet

    if encoder == "random" or encoder.startswith("random:"):
        arch = encoder.partition(":")[2] or cfg.arch or "resnet50"
        module = timm.create_model(arch, pretrained=False, features_only=True, in_chans=1)
        return UNet(module, out_channels, base_width=cfg.base_width), None
    model = load_unet(encoder, out_channels, in_chans=1, base_width=cfg.base_width)
    return model, encoder_norm(model.encoder)


def encoder_norm(encoder: nn.Module) -> tuple[float, float] | None:
    """The (mean, std) input normalisation a pretrained encoder recorded (its ``cemnet_meta``, the
    pretraining corpus's statistics on the [0, 1] scale), or ``None`` (random init, or weights
    that record none). Fine-tuning must feed the encoder inputs scaled as in pretraining."""
    meta = getattr(encoder, "cemnet_meta", None)
    if meta is None or not meta.mean or not meta.std:
        return None
    return float(np.mean(meta.mean)), float(np.mean(meta.std))


def set_trainable(model: nn.Module, freeze: str) -> list[nn.Module]:
    """Freeze encoder parameters: ``none``, ``encoder`` (all), or every child module of the
    encoder before the named stage (``layer3`` trains layer3, layer4 and the decoder). Returns
    the frozen modules, which must stay in eval mode (their BatchNorm statistics are pretrained)."""
    enc = model.encoder  # type: ignore[attr-defined]
    if freeze in ("none", "", None):
        return []
    children = list(enc.named_children())
    if freeze == "encoder":
        frozen = [m for _, m in children] or [enc]
    else:
        names = [n for n, _ in children]
        if freeze not in names:
            raise ValueError(f"freeze={freeze!r}: encoder stages are {names}")
        frozen = [m for n, m in children[: names.index(freeze)]]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    return frozen


def encoder_levers(cfg: Any) -> dict[str, Any]:
    """The :class:`~cemnet.finetune.engine.FinetuneModule` keyword arguments of the encoder levers
    in a config (:class:`FinetuneConfig`, ``InstanceConfig``: the same three fields)."""
    return {"encoder_lr_scale": cfg.encoder_lr_scale, "layer_decay": cfg.layer_decay,
            "freeze_encoder_iterations": cfg.freeze_encoder_iterations}


# --------------------------------------------------------------------------- data


def training_slices(samples: Sequence[Sample], orthoplane: bool = False) -> list[Sample]:
    """2D training images: 2D samples as they are; 3D volumes cut into xy (and xz, yz) slices."""
    out: list[Sample] = []
    for s in samples:
        if s.image.ndim == 2:
            out.append(s)
            continue
        axes = (0, 1, 2) if orthoplane else (0,)
        for ax in axes:
            img, msk = np.moveaxis(s.image, ax, 0), np.moveaxis(s.mask, ax, 0)
            out.extend(Sample(img[i], msk[i], f"{s.name}/{'zyx'[ax]}{i}") for i in range(img.shape[0]))
    return out


class CropSampler:
    """Random augmented crops from a list of 2D samples (numpy, seeded)."""

    def __init__(self, samples: Sequence[Sample], crop: int, norm: tuple[float, float], augment: bool, seed: int,
                 batch_size: int = 16) -> None:
        if not samples:
            raise ValueError("no training samples")
        self.samples = list(samples)
        self.batch_size = int(batch_size)
        self.crop, self.norm, self.augment = crop, norm, augment
        areas = np.array([s.mask.size for s in self.samples], float)
        self.p = areas / areas.sum()  # big images are sampled proportionally more often
        self.rng = np.random.default_rng(seed)

    def _one(self) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[int(self.rng.choice(len(self.samples), p=self.p))]
        img, msk = s.image.astype(np.float32), s.mask
        c = self.crop
        ph, pw = max(0, c - img.shape[0]), max(0, c - img.shape[1])
        if ph or pw:  # small labelled boxes: reflect the image, ignore the padded labels
            img = np.pad(img, ((0, ph), (0, pw)), mode="reflect" if min(img.shape) > max(ph, pw) else "edge")
            msk = np.pad(msk, ((0, ph), (0, pw)), constant_values=IGNORE)
        y = int(self.rng.integers(0, img.shape[0] - c + 1))
        x = int(self.rng.integers(0, img.shape[1] - c + 1))
        img, msk = img[y:y + c, x:x + c], msk[y:y + c, x:x + c]
        if self.augment:
            k = int(self.rng.integers(4))
            img, msk = np.rot90(img, k), np.rot90(msk, k)
            if self.rng.random() < 0.5:
                img, msk = img[:, ::-1], msk[:, ::-1]
            if self.rng.random() < 0.5:
                img, msk = img[::-1], msk[::-1]
            # brightness/contrast jitter on the [0, 255] scale, before normalisation
            contrast, brightness = self.rng.uniform(0.8, 1.2), self.rng.uniform(-25, 25)
            img = np.clip((img - 127.5) * contrast + 127.5 + brightness, 0, 255)
        img = (img / 255.0 - self.norm[0]) / self.norm[1]
        return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(msk, dtype=np.int64)

    def batch(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._one() for _ in range(n or self.batch_size)]
        return torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None], torch.from_numpy(np.stack([p[1] for p in pairs]))


def dataset_norm(samples: Sequence[Sample]) -> tuple[float, float]:
    """(mean, std) of the training images on the [0, 1] scale (used for random encoders and
    weights that record no normalisation)."""
    vals = np.concatenate([s.image.ravel()[:: max(1, s.image.size // 200_000)] for s in samples]).astype(np.float64) / 255.0
    return float(vals.mean()), float(max(vals.std(), 1e-3))


# --------------------------------------------------------------------------- loss


def make_loss(num_classes: int, train: Sequence[Sample], mode: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """BCE on one logit for one class; (inverse-frequency weighted) CE otherwise. IGNORE pixels
    carry no loss."""
    if num_classes == 1:
        def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            valid = target != IGNORE
            if not valid.any():
                return logits.sum() * 0
            return F.binary_cross_entropy_with_logits(logits[:, 0][valid], (target[valid] > 0).float())
        return bce
    weight = None
    if mode == "inverse":
        counts = np.zeros(num_classes + 1)
        for s in train:
            m = s.mask[s.mask != IGNORE]
            counts += np.bincount(m.ravel(), minlength=num_classes + 1)[: num_classes + 1]
        freq = counts / max(counts.sum(), 1)
        w = np.where(freq > 0, 1.0 / np.maximum(freq, 1e-6), 0.0)
        weight = torch.tensor(w / w[w > 0].mean(), dtype=torch.float32)

    def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=None if weight is None else weight.to(logits.device), ignore_index=IGNORE)
    return ce


# --------------------------------------------------------------------------- inference


@torch.no_grad()
def _predict_slices(model: nn.Module, slices: np.ndarray, norm: tuple[float, float], batch: int, device: str) -> np.ndarray:
    """Foreground probabilities (1 class: (N, H, W)) or class probabilities ((N, C+1, H, W))."""
    outs = []
    for i in range(0, len(slices), batch):
        x = torch.from_numpy((slices[i:i + batch].astype(np.float32) / 255.0 - norm[0]) / norm[1])[:, None].to(device)
        h, w = x.shape[-2:]
        # the encoder downsamples by up to 32: reflect-pad to a multiple, crop the logits back
        ph, pw = (-h) % 32, (-w) % 32
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        logits = model(x)[..., :h, :w]
        probs = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, 1)
        outs.append(probs.cpu().numpy())
    return np.concatenate(outs)


def predict(model: nn.Module, image: np.ndarray, norm: tuple[float, float], *, orthoplane: bool = False, batch: int = 8,
            device: str = "cpu") -> np.ndarray:
    """Probabilities for a 2D image or a 3D volume (slice-wise; ``orthoplane`` averages the xy,
    xz and yz passes). One class: foreground probability map; else (C+1, ...) class maps."""
    model.eval()
    if image.ndim == 2:
        return _predict_slices(model, image[None], norm, batch, device)[0]
    axes = (0, 1, 2) if orthoplane else (0,)
    total = None
    for ax in axes:
        p = _predict_slices(model, np.moveaxis(image, ax, 0), norm, batch, device)
        # p is (n, a, b) or (n, C, a, b): put the class axis first, the slice axis back at ax
        if p.ndim == 4:
            p = np.moveaxis(p, 1, 0)
        p = np.moveaxis(p, p.ndim - 3, p.ndim - 3 + ax)
        total = p if total is None else total + p
    return total / len(axes)


def to_labels(prob: np.ndarray, num_classes: int, spatial_ndim: int) -> np.ndarray:
    """Class map from :func:`predict` output (threshold 0.5 for one class, argmax otherwise)."""
    if num_classes == 1 and prob.ndim == spatial_ndim:
        return (prob >= 0.5).astype(np.int64)
    return prob.argmax(axis=0).astype(np.int64)


def evaluate(model: nn.Module, data: BenchmarkData, norm: tuple[float, float], cfg: FinetuneConfig,
             isbi: bool | None = None) -> dict[str, Any]:
    """Metrics on ``data.test``: ``iou`` (mean over classes; 2D per-image definition for 2D
    samples, whole-volume for 3D), per-class IoU/precision/recall/F1 and, for membrane
    benchmarks (``isbi``; default: the only class is ``membrane``), ISBI ``v_rand``/``v_info``."""
    nc = len(data.classes)
    preds, probs = [], []
    for s in data.test:
        prob = predict(model, s.image, norm, orthoplane=cfg.orthoplane and s.image.ndim == 3, batch=cfg.eval_batch, device=cfg.device)
        probs.append(prob)
        preds.append(to_labels(prob, nc, s.image.ndim))
    targets = [s.mask for s in data.test]
    per_class = (iou_3d if data.test[0].image.ndim == 3 else iou_2d)(preds, targets, nc)
    prf = precision_recall_f1(preds, targets, nc)
    out: dict[str, Any] = {"iou": float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")}
    for k, name in enumerate(data.classes):
        out[f"iou_{name}"] = float(per_class[k])
        for m in ("precision", "recall", "f1"):
            out[f"{m}_{name}"] = float(prf[m][k])
    if isbi is None:
        isbi = data.classes == ("membrane",)
    if isbi and nc == 1:
        scores = [isbi_scores(p, t > 0) for p, t in zip(probs, targets)]
        out["v_rand"] = float(np.mean([s["v_rand"] for s in scores]))
        out["v_info"] = float(np.mean([s["v_info"] for s in scores]))
    return out


# --------------------------------------------------------------------------- loop


def finetune(data: BenchmarkData, encoder: str, cfg: FinetuneConfig, train: Sequence[Sample] | None = None,
             callback: Callable[[int, float], None] | None = None, *, callbacks: Sequence[Any] = (),
             logger: Any = False, progress: bool = False, ckpt_path: str | None = None,
             on_result: Callable[..., None] | None = None, root_dir: str | None = None,
             setup: Callable[[nn.Module, tuple[float, float]], None] | None = None) -> FinetuneResult:
    """Fine-tune on ``train`` (default ``data.train``) and evaluate on ``data.test`` at
    ``cfg.eval_at`` iterations and at the end. Deterministic for a given seed on CPU.

    Runs on the shared engine (:mod:`cemnet.finetune.engine`); ``callbacks``, ``logger``,
    ``progress``, ``ckpt_path`` (resume), ``on_result`` (called after each evaluation with the
    row, the Lightning module and the trainer) and ``setup`` (called with the model and the input
    normalisation before training) are how ``cemnet finetune`` adds logs, checkpoints and model
    files; a benchmark sweep leaves them out and gets a bare, fast Trainer.
    """
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    nc = len(data.classes)
    train_samples = list(train if train is not None else data.train)
    model, norm = build_model(encoder, 1 if nc == 1 else nc + 1, cfg)
    norm = norm or dataset_norm(train_samples)
    if setup is not None:
        setup(model, norm)
    frozen = set_trainable(model, cfg.freeze)
    slices = training_slices(train_samples, cfg.orthoplane)
    sampler = CropSampler(slices, cfg.crop_size, norm, cfg.augment, cfg.seed, batch_size=cfg.batch_size)
    loss_fn = make_loss(nc, slices, cfg.class_weights)
    module = FinetuneModule(model, loss_fn, cfg.iterations, max_lr=cfg.max_lr, weight_decay=cfg.weight_decay, frozen=frozen,
                            **encoder_levers(cfg))
    steps = sorted({i for i in cfg.eval_at if 0 < i < cfg.iterations} | {cfg.iterations})
    t0 = time.perf_counter()

    def scored(m: nn.Module) -> dict[str, Any]:
        out = evaluate(m, data, norm, cfg)
        log.info("evaluation: iou %.4f (%.0f s)", out["iou"], time.perf_counter() - t0)
        return {"seconds": round(time.perf_counter() - t0, 2), **out}

    evaluation = PeriodicEvaluation(scored, steps, on_result)
    extra: list[Any] = [evaluation, *callbacks]
    if callback is not None:
        extra.append(StepHook(callback))
    if 0 in cfg.eval_at and ckpt_path is None:
        model.to(cfg.device)
        module.history.append({"iteration": 0, "loss": float("nan"), **scored(model)})
    fit(module, sampler, cfg.iterations, device=cfg.device, callbacks=extra, logger=logger, progress=progress,
        ckpt_path=ckpt_path, root_dir=root_dir)
    model.to(cfg.device).eval()
    return FinetuneResult(model, module.history, norm)
