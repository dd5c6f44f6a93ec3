"""What every pretraining method shares: :class:`PretrainMethod`, a thin LightningModule base.

A method subclasses it, builds ``self.backbone`` (the encoder that is exported) and writes
``training_step`` and ``configure_optimizers``; the base owns the rest, once:

* the ``arch, arch_kwargs, compile, mean, std, corpus_fingerprint`` tail of every method's
  arguments, filled from the datamodule's :class:`~cemnet.data.stats.DataStats` at ``setup``;
* ``checkpoint["cemnet"]`` (the contract with ``cemnet export``), with ``_orig_mod.`` kept out of
  saved keys;
* the per-step learning-rate schedule (:meth:`PretrainMethod.lr_schedule`) and the global batch
  size the linear scaling rule needs;
* momentum (EMA) copies of online modules, declared by ``momentum_pairs`` (MoCo, BYOL, DINO);
* :func:`batch_images` / :func:`batch_size` (the image tensor of any batch format the datamodules
  produce) and :func:`logs_this_step` (whether the loggers write this step's metrics).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import Tensor, nn

from cemnet.data.stats import DataStats, ProvidesDataStats
from cemnet.methods.schedules import lr_factor
from cemnet.weights.keys import clean_key, clean_keys

__all__ = ["PretrainMethod", "batch_images", "batch_size", "completed_epochs", "logs_this_step"]


def batch_images(batch: Any) -> Tensor:
    """The image tensor of a batch: a tensor, the first item of a tuple/list, ``batch["views"][0]``
    (an augmented view, normalised) or ``batch["image"]`` (raw uint8 patches or crops)."""
    if isinstance(batch, Mapping):
        if "views" in batch:
            batch = batch["views"][0]
        elif "image" in batch:
            batch = batch["image"]
        else:
            raise TypeError(f"a batch dict needs 'views' or 'image', got keys {sorted(batch)}")
    elif isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(f"expected a tensor batch, got {type(batch).__name__}")
    return batch


def batch_size(batch: Any) -> int:
    """Samples in ``batch`` (0 for a format :func:`batch_images` does not know: callbacks never fail on it)."""
    try:
        return int(batch_images(batch).shape[0])
    except TypeError:
        return 0


def logs_this_step(trainer: pl.Trainer | None) -> bool:
    """Whether the loggers write the metrics of the training batch now running (Lightning's own rule:
    every ``log_every_n_steps``-th optimizer step, counted from 1). A value logged on any other
    batch is dropped, so per-step extras are computed and logged only when this is true."""
    if trainer is None:
        return True
    return bool(trainer._logger_connector.should_update_logs)


def completed_epochs(module: pl.LightningModule, checkpoint: dict[str, Any]) -> int:
    """Whole epochs of data trained on when ``checkpoint`` is written (a 10-epoch run records 10).

    Lightning's ``checkpoint["epoch"]`` is the index of the epoch in progress (9 at the end of
    the 10th); batches processed over the whole run (progress survives resume) divided by the
    batches of one epoch is what a reader of the exported metadata means by "epochs"."""
    epoch = int(checkpoint.get("epoch", module.current_epoch))
    trainer = module._trainer
    per_epoch = trainer.num_training_batches if trainer is not None else None
    if not per_epoch or math.isinf(per_epoch):
        return epoch
    processed = trainer.fit_loop.epoch_loop.batch_progress.total.processed
    return int(processed // int(per_epoch))


class PretrainMethod(pl.LightningModule):
    """Base of the pretraining methods (MoCoV2, MGMR2D/3D): what they share, nothing more.

    Args:
        arch: encoder name (timm, or ``cemnet3d_*``); recorded in the checkpoint.
        arch_kwargs: extra encoder arguments; recorded in the checkpoint so the export rebuilds
            the same model.
        compile: ``nn.Module.compile()`` :meth:`modules_to_compile` at fit time (keys stay clean).
        mean, std, corpus_fingerprint: recorded in the checkpoint; ``None`` = from the
            datamodule's :class:`~cemnet.data.stats.DataStats` at ``setup``.

    Subclasses set ``method_name`` and ``spatial_dims``, build ``self.backbone`` (its
    ``state_dict`` keys ``backbone.*`` load strictly into a fresh encoder), call
    ``self.save_hyperparameters()`` in their own ``__init__`` (so the hparams are their
    arguments, as before this base existed) and list ``(online, momentum)`` attribute pairs in
    ``momentum_pairs`` if they keep EMA copies.
    """

    method_name: str = "unknown"
    spatial_dims: int = 2
    in_chans: int = 1
    momentum_pairs: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        arch: str,
        arch_kwargs: dict[str, Any] | None = None,
        compile: bool = False,
        mean: float | None = None,
        std: float | None = None,
        corpus_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.arch, self.arch_kwargs = arch, dict(arch_kwargs or {})
        self.compile_on_fit = compile
        self.mean, self.std, self.corpus_fingerprint = mean, std, corpus_fingerprint
        self.backbone: nn.Module
        self._momentum_step = -1  # global_step of the last EMA update

    # -- data ----------------------------------------------------------------------------------
    def datamodule_stats(self) -> DataStats | None:
        """The attached datamodule's :class:`DataStats`; ``None`` without one (plain dataloaders)."""
        trainer = self._trainer
        dm = trainer.datamodule if trainer is not None else None
        return dm.data_stats() if isinstance(dm, ProvidesDataStats) else None

    def capture_data_stats(self) -> DataStats | None:
        """Fill ``mean``/``std``/``corpus_fingerprint`` from the datamodule where not given; returns its stats."""
        stats = self.datamodule_stats()
        if stats is not None:
            self.mean = float(stats.mean) if self.mean is None else self.mean
            self.std = float(stats.std) if self.std is None else self.std
            if self.corpus_fingerprint is None:
                self.corpus_fingerprint = stats.corpus_fingerprint
        return stats

    def setup(self, stage: str) -> None:
        """Take the data's statistics, then compile (at fit time) if asked."""
        self.capture_data_stats()
        if self.compile_on_fit and stage == "fit":
            for module in self.modules_to_compile():
                module.compile()  # nn.Module.compile: compiles __call__, state-dict keys stay clean

    def modules_to_compile(self) -> list[nn.Module]:
        """What ``compile: true`` compiles: the whole forward pass unless a method says otherwise."""
        return [self]

    # -- momentum (EMA) copies -------------------------------------------------------------------
    def build_momentum_copies(self) -> None:
        """Create each ``momentum`` attribute of ``momentum_pairs`` as a frozen copy of its online module."""
        for online, momentum in self.momentum_pairs:
            setattr(self, momentum, copy.deepcopy(getattr(self, online)))
            deactivate_requires_grad(getattr(self, momentum))

    @torch.no_grad()
    def update_momentum_copies(self, m: float) -> None:
        """``ema = m * ema + (1 - m) * online`` for every pair, once per optimizer step.

        ``global_step`` counts optimizer steps only, so the copies move once per real step, at the
        first micro-batch after it (gradient accumulation), exactly where MoCo's per-iteration
        update falls; later micro-batches of the same step are no-ops.
        """
        if self.global_step == self._momentum_step:
            return
        self._momentum_step = self.global_step
        for online, momentum in self.momentum_pairs:
            update_momentum(getattr(self, online), getattr(self, momentum), m)

    # -- optimisation ----------------------------------------------------------------------------
    def global_batch_size(self) -> int | None:
        """Samples per optimizer step over all ranks (per-device batch x devices x nodes x
        accumulation); ``None`` when the per-device batch size is unknown."""
        t = self.trainer
        stats = self.datamodule_stats()
        per_device = stats.batch_size if stats is not None else None
        if per_device is None and t.train_dataloader is not None:
            per_device = getattr(t.train_dataloader, "batch_size", None)
        if per_device is None:
            return None
        return int(per_device) * t.world_size * t.accumulate_grad_batches

    def lr_schedule(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: str,
        milestones: Sequence[float] = (),
        gamma: float = 0.1,
        warmup_epochs: float = 0.0,
    ) -> dict[str, Any]:
        """``configure_optimizers``'s return value: ``optimizer`` with a per-step
        :func:`~cemnet.methods.schedules.lr_factor` schedule over the run's (fractional) epochs."""
        trainer = self.trainer
        total = max(int(trainer.estimated_stepping_batches), 1)
        trainer.fit_loop.setup_data()  # idempotent; sets num_training_batches even under max_steps
        batches = trainer.num_training_batches
        per_epoch = max(math.ceil(batches / trainer.accumulate_grad_batches), 1) if math.isfinite(batches) else total
        epochs = total / per_epoch

        def factor(step: int) -> float:
            return lr_factor(step / per_epoch, schedule, epochs, milestones, gamma, warmup_epochs)

        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def log_lr(self, batch_size: int) -> None:
        """Log ``train/lr`` on the steps the loggers write."""
        if self._trainer is not None and logs_this_step(self._trainer):
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False,
                     batch_size=batch_size)

    # -- checkpoints -----------------------------------------------------------------------------
    def cemnet_metadata(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The ``checkpoint["cemnet"]`` dict (contract with ``cemnet export``)."""
        return {
            "arch": self.arch,
            "in_chans": int(self.in_chans),
            "mean": None if self.mean is None else float(self.mean),
            "std": None if self.std is None else float(self.std),
            "method": self.method_name,
            "corpus_fingerprint": self.corpus_fingerprint,
            "epochs": completed_epochs(self, checkpoint),
            "global_step": int(checkpoint.get("global_step", self.global_step)),
            "spatial_dims": int(self.spatial_dims),
            "arch_kwargs": dict(self.arch_kwargs),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A module wrapped with torch.compile(...) contributes `_orig_mod.` segments; never save them
        # (cemnet methods compile with nn.Module.compile(), which keeps keys clean to begin with).
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = clean_keys(checkpoint["state_dict"])
        checkpoint["cemnet"] = self.cemnet_metadata(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("cemnet") or {}
        for key in ("mean", "std", "corpus_fingerprint"):
            if meta.get(key) is not None:
                setattr(self, key, meta[key])
        # restore-compatible: if this live module *is* wrapped, map clean keys back onto its names
        own = list(self.state_dict().keys())
        if any("_orig_mod" in k for k in own) and "state_dict" in checkpoint:
            to_own = {clean_key(k): k for k in own}
            checkpoint["state_dict"] = {to_own.get(k, k): v for k, v in checkpoint["state_dict"].items()}
