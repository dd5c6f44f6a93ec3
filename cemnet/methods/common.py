"""Training plumbing shared by the pretraining methods (MoCoV2, MGMR2D/3D).

* backbones: :func:`build_backbone` (timm, ``in_chans=1``, ``num_classes=0``).
* momentum encoders: :func:`deactivate_requires_grad`, :func:`update_momentum`.
* distributed helpers: :func:`concat_all_gather`, :func:`batch_shuffle` / :func:`batch_unshuffle`
  (MoCo's shuffle-BN) and :class:`SplitBatchNorm2d` (shuffle-BN's single-device stand-in).
* schedules: :func:`lr_factor` (CEM500K's step schedule, cosine, linear warm-up).
* checkpoints: :class:`CemnetCheckpointMixin` writes ``checkpoint["cemnet"]`` (the contract with
  ``cemnet export``) and keeps ``_orig_mod.`` out of saved keys.
* callbacks: :class:`DivergenceGuard`, :class:`ImagesPerSecond`, :class:`PairSampleLogger`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cemnet.transfer.checkpoint_io import nonfinite_tensors

__all__ = [
    "build_backbone",
    "deactivate_requires_grad",
    "update_momentum",
    "is_distributed",
    "concat_all_gather",
    "batch_shuffle",
    "batch_unshuffle",
    "SplitBatchNorm2d",
    "convert_split_batchnorm",
    "lr_factor",
    "clean_state_dict_keys",
    "CemnetCheckpointMixin",
    "DivergenceError",
    "DivergenceGuard",
    "ImagesPerSecond",
    "logs_this_step",
    "PairSampleLogger",
]


# -- backbones ---------------------------------------------------------------------------------
def build_backbone(arch: str, in_chans: int = 1, **arch_kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, in_chans=in_chans, num_classes=0, **arch_kwargs)``: pooled features.

    Any timm CNN or ViT works; a ViT needs ``img_size`` equal to the crop size (or
    ``dynamic_img_size=True``). ``model.num_features`` is the feature width.
    """
    import timm

    return timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=0, **arch_kwargs)


# -- momentum encoders -------------------------------------------------------------------------
def deactivate_requires_grad(module: nn.Module) -> None:
    """Freeze a momentum (key) encoder: it is updated by EMA only, never by the optimizer."""
    for p in module.parameters():
        p.requires_grad = False


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    """``ema = ema * m + model * (1 - m)`` over parameters (MoCo's ``_momentum_update_key_encoder``).

    Buffers (BN running stats) are not averaged: as in MoCo, the key encoder's come from its own
    forward passes. Uses fused foreach kernels (one launch per group, not per tensor).
    """
    ema = [p.data for p in model_ema.parameters()]
    cur = [p.data for p in model.parameters()]
    torch._foreach_mul_(ema, m)
    torch._foreach_add_(ema, cur, alpha=1.0 - m)


# -- distributed -------------------------------------------------------------------------------
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0 in rank order (no gradient); ``x`` if not distributed."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def batch_shuffle(x: Tensor, shuffle: bool = True) -> tuple[Tensor, Tensor | None]:
    """MoCo's ``_batch_shuffle_ddp``: redistribute the key batch across ranks before the key encoder.

    Under DDP, BatchNorm statistics are per GPU; without the shuffle a query and its key see the
    *same* sub-batch statistics, which leaks the positive's identity (the "BN cheating" of MoCo
    sec. 3.3). Gather all ranks' images, permute with rank 0's permutation (broadcast), give each
    rank one slice. On a single process the permutation is within the device and changes nothing
    for BN statistics (they are permutation-invariant); use ``bn_splits`` (SplitBatchNorm) there.

    Returns:
        this rank's shuffled images and the index that undoes the shuffle (``None`` if not shuffled).
    """
    if not shuffle:
        return x, None
    if not is_distributed():
        perm = torch.randperm(x.shape[0], device=x.device)
        return x[perm], torch.argsort(perm)
    x_all = concat_all_gather(x)
    n_all = x_all.shape[0]
    perm = torch.randperm(n_all, device=x.device)
    dist.broadcast(perm, src=0)
    rank, world = dist.get_rank(), dist.get_world_size()
    return x_all[perm.view(world, -1)[rank]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: Tensor, idx_unshuffle: Tensor | None) -> Tensor:
    """MoCo's ``_batch_unshuffle_ddp``: gather the shuffled keys and take back this rank's own."""
    if idx_unshuffle is None:
        return x
    if not is_distributed():
        return x[idx_unshuffle]
    x_all = concat_all_gather(x)
    rank, world = dist.get_rank(), dist.get_world_size()
    return x_all[idx_unshuffle.view(world, -1)[rank]]


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over ``num_splits`` sub-batches (MoCo's single-GPU CIFAR demo).

    Sub-batch ``j`` is samples ``j, j + s, j + 2s, ...`` (a free reshape of the batch into
    ``s * C`` channels); any fixed partition plays the role of the per-GPU sub-batches.

    Simulates per-GPU BN statistics on one device; with the key batch shuffled before the split this
    is shuffle-BN without DDP. Same parameters and buffers (and state-dict keys) as BatchNorm2d, so
    exported weights load into a plain timm model; in eval mode it is a plain BatchNorm2d.
    """

    num_splits: int = 1

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        s = self.num_splits
        if not self.training or s <= 1 or n % s:
            return super().forward(x)
        rm = self.running_mean.repeat(s)
        rv = self.running_var.repeat(s)
        out = F.batch_norm(
            x.view(n // s, c * s, h, w), rm, rv, self.weight.repeat(s), self.bias.repeat(s),
            True, self.momentum if self.momentum is not None else 0.1, self.eps,
        ).view(n, c, h, w)
        self.running_mean.copy_(rm.view(s, c).mean(0))
        self.running_var.copy_(rv.view(s, c).mean(0))
        return out


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Turn every ``nn.BatchNorm2d`` in ``module`` into a :class:`SplitBatchNorm2d` in place."""
    if num_splits <= 1:
        return module
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SplitBatchNorm2d
            m.num_splits = num_splits
    return module


# -- schedules ---------------------------------------------------------------------------------
def lr_factor(
    epoch: float,
    schedule: str,
    max_epochs: float,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at (fractional) ``epoch``.

    ``"step"``: ``gamma`` per milestone passed (CEM500K: x0.1 at 120 and 160 of 200, evaluated at
    whole epochs as their ``adjust_learning_rate``); ``"cosine"``: half cosine to 0 at ``max_epochs``
    (per step); ``"constant"``. A linear warm-up over ``warmup_epochs`` multiplies any of them.
    """
    if schedule == "step":
        f = gamma ** sum(math.floor(epoch) >= m for m in milestones)
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * min(epoch / max(max_epochs, 1e-12), 1.0)))
    elif schedule == "constant":
        f = 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r} (step, cosine, constant)")
    if warmup_epochs > 0 and epoch < warmup_epochs:
        f *= (epoch + 1e-12) / warmup_epochs
    return f


# -- checkpoints -------------------------------------------------------------------------------
def clean_state_dict_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop ``_orig_mod`` segments (``torch.compile`` wrappers) from every key."""
    return {".".join(p for p in k.split(".") if p != "_orig_mod"): v for k, v in state_dict.items()}


class CemnetCheckpointMixin:
    """Writes ``checkpoint["cemnet"]`` and keeps saved keys clean. Mix in before LightningModule.

    The host module provides ``method_name`` and ``spatial_dims`` (class attributes) and
    ``arch``, ``arch_kwargs``, ``mean``, ``std``, ``corpus_fingerprint`` (instance attributes;
    ``None`` mean/std/fingerprint are taken from the datamodule by :meth:`capture_data_stats`).
    The encoder lives in ``self.backbone`` (timm, ``in_chans=1``, ``num_classes=0``), so
    ``state_dict`` keys ``backbone.*`` load strictly into a fresh timm model.
    """

    method_name: str = "unknown"
    spatial_dims: int = 2
    in_chans: int = 1

    def capture_data_stats(self) -> None:
        """Fill ``mean``/``std``/``corpus_fingerprint`` from the trainer's datamodule when unset."""
        trainer = getattr(self, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None:
            return
        if getattr(self, "mean", None) is None and getattr(dm, "mean", None) is not None:
            self.mean = float(dm.mean)
        if getattr(self, "std", None) is None and getattr(dm, "std", None) is not None:
            self.std = float(dm.std)
        if getattr(self, "corpus_fingerprint", None) is None:
            self.corpus_fingerprint = getattr(dm, "corpus_fingerprint", None)

    def cemnet_metadata(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The ``checkpoint["cemnet"]`` dict (contract with ``cemnet export``)."""
        mean, std = getattr(self, "mean", None), getattr(self, "std", None)
        return {
            "arch": self.arch,
            "in_chans": int(self.in_chans),
            "mean": None if mean is None else float(mean),
            "std": None if std is None else float(std),
            "method": self.method_name,
            "corpus_fingerprint": getattr(self, "corpus_fingerprint", None),
            "epochs": completed_epochs(self, checkpoint),
            "global_step": int(checkpoint.get("global_step", getattr(self, "global_step", 0))),
            "spatial_dims": int(self.spatial_dims),
            "arch_kwargs": dict(getattr(self, "arch_kwargs", {}) or {}),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A module wrapped with torch.compile(...) contributes `_orig_mod.` segments; never save them
        # (cemnet methods compile with nn.Module.compile(), which keeps keys clean to begin with).
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = clean_state_dict_keys(checkpoint["state_dict"])
        checkpoint["cemnet"] = self.cemnet_metadata(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("cemnet") or {}
        for key in ("mean", "std", "corpus_fingerprint"):
            if meta.get(key) is not None:
                setattr(self, key, meta[key])
        # restore-compatible: if this live module *is* wrapped, map clean keys back onto its names
        own = list(self.state_dict().keys())  # type: ignore[attr-defined]
        if any("_orig_mod" in k for k in own) and "state_dict" in checkpoint:
            to_own = {".".join(p for p in k.split(".") if p != "_orig_mod"): k for k in own}
            checkpoint["state_dict"] = {to_own.get(k, k): v for k, v in checkpoint["state_dict"].items()}


# -- callbacks ---------------------------------------------------------------------------------
class DivergenceError(RuntimeError):
    """Training produced a NaN/inf loss and was stopped before it could corrupt weights or checkpoints."""


class DivergenceGuard(pl.Callback):
    """Stop on a non-finite loss *before* its backward pass, so no optimizer step and no checkpoint
    ever contain the diverged state: ``last.ckpt`` stays the last good one.

    Checked on every micro-batch (``on_before_backward``); under DDP the verdict is all-reduced so
    every rank stops together (a lone rank raising would leave the others hung in a collective).
    Costs one host sync per step.
    """

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        raise DivergenceError(
            f"non-finite loss ({float(loss.detach().float().mean())}) at global step {trainer.global_step}, "
            f"epoch {trainer.current_epoch}: training stopped before the optimizer step. {_last_good(trainer)}"
        )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A finite loss does not prove finite weights: a huge step can leave BatchNorm's running_var
        # at inf while the loss of the batch still looks fine. Checked before the file is written.
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "") if bad else "on another rank"
        raise DivergenceError(
            f"non-finite parameters or buffers ({names}) at global step {trainer.global_step}, epoch "
            f"{trainer.current_epoch}: training stopped and this checkpoint was not written. {_last_good(trainer)}"
        )


def _last_good(trainer: pl.Trainer) -> str:
    path = getattr(trainer.checkpoint_callback, "last_model_path", "")
    where = f"The last good checkpoint is {path}." if path and Path(path).is_file() else "No checkpoint was saved yet."
    return f"{where} Lower the learning rate, check the data (mean/std, blank patches) or use fp32, then resume."


def _batch_images(batch: Any) -> Tensor | None:
    if isinstance(batch, dict):
        if "views" in batch:
            return batch["views"][0]
        return batch.get("image")
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    return batch if isinstance(batch, Tensor) else None


def logs_this_step(trainer: pl.Trainer | None) -> bool:
    """Whether the loggers write the metrics of the training batch now running (Lightning's own rule:
    every ``log_every_n_steps``-th optimizer step, counted from 1). A value logged on any other
    batch is dropped, so per-step extras are computed and logged only when this is true."""
    if trainer is None:
        return True
    return bool(trainer._logger_connector.should_update_logs)


class ImagesPerSecond(pl.Callback):
    """Logs ``train/images_per_s`` (all ranks together) on every step the loggers write, averaged
    over the batches since the previous write (the first batch of an epoch only starts the clock,
    so loader start-up is not counted)."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._n = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0, self._n = None, 0  # do not count the loader start-up

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._n = now, 0
            return
        x = _batch_images(batch)
        self._n += (x.shape[0] if x is not None else 0) * trainer.world_size
        if logs_this_step(trainer) and now > self._t0 and self._n:
            pl_module.log("train/images_per_s", self._n / (now - self._t0), on_step=True, on_epoch=False)
            self._t0, self._n = now, 0


class PairSampleLogger(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, logs a grid of augmented view pairs as an image
    (or the panels a module returns from ``sample_panels(batch, num) -> (name, [tensors])``).

    Goes to W&B / TensorBoard when such a logger is attached, else PNGs into
    ``<dirpath or trainer.default_root_dir>/samples/``. Rank 0 only. Each row is one patch, each
    column one view, de-normalised with the module's (corpus) mean/std.
    """

    def __init__(self, every_n_steps: int = 1000, num_pairs: int = 8, dirpath: str | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.num_pairs = num_pairs
        self.dirpath = dirpath
        self._last_step = -1

    @staticmethod
    def make_grid(views: Sequence[Tensor], mean: float, std: float, num: int, pad: int = 2) -> np.ndarray:
        """uint8 (rows*S + pads, cols*S + pads) grid: row i = views[0][i], views[1][i], ..."""
        rows = []
        for i in range(min(num, views[0].shape[0])):
            tiles = []
            for v in views:
                img = (v[i, 0].detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte().numpy()
                tiles.append(np.pad(img, pad, constant_values=255))
            rows.append(np.concatenate(tiles, axis=1))
        return np.concatenate(rows, axis=0)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step or (step - 1) % self.every_n_steps:
            return
        name = "view_pairs"
        if hasattr(pl_module, "sample_panels"):
            # A method with its own pictures (e.g. MGMR: input, masked input, reconstruction, HOG).
            name, panels = pl_module.sample_panels(batch, self.num_pairs)
            grid = self.make_grid(panels, 0.0, 1.0, self.num_pairs)
        elif isinstance(batch, dict) and "views" in batch:
            mean = float(getattr(pl_module, "mean", None) or 0.0)
            std = float(getattr(pl_module, "std", None) or 1.0)
            grid = self.make_grid(batch["views"], mean, std, self.num_pairs)
        else:
            return
        self._last_step = step
        logged = False
        for logger in trainer.loggers:
            kind = type(logger).__name__
            if kind == "WandbLogger":
                logger.log_image(key=f"train/{name}", images=[grid], step=step)
                logged = True
            elif kind == "TensorBoardLogger":
                logger.experiment.add_image(f"train/{name}", grid[None], step, dataformats="CHW")
                logged = True
        if not logged:
            from PIL import Image

            out = Path(self.dirpath or trainer.default_root_dir) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(out / f"{name}_step{step:08d}.png")



def completed_epochs(module: Any, checkpoint: dict[str, Any]) -> int:
    """Whole epochs of data trained on when ``checkpoint`` is written (a 10-epoch run records 10).

    Lightning's ``checkpoint["epoch"]`` is the index of the epoch in progress (9 at the end of
    the 10th); batches processed over the whole run (progress survives resume) divided by the
    batches of one epoch is what a reader of the exported metadata means by "epochs"."""
    epoch = int(checkpoint.get("epoch", getattr(module, "current_epoch", 0)))
    trainer = getattr(module, "_trainer", None)
    per_epoch = getattr(trainer, "num_training_batches", None) if trainer is not None else None
    if not per_epoch or math.isinf(per_epoch):
        return epoch
    processed = trainer.fit_loop.epoch_loop.batch_progress.total.processed
    return int(processed // int(per_epoch))
