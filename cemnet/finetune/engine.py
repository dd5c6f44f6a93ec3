"""The one fine-tuning engine: a LightningModule, a small data module and a ``fit`` helper.

``cemnet finetune``, ``cemnet benchmark`` (semantic sweeps and the affinity path) and
``cemnet transfer select`` heads are all trained here; what differs between them is only

* the **batch source**: any object with ``batch() -> (x, *targets)`` and a numpy generator
  ``rng`` (random augmented crops; slice crops for semantic models, affinity targets + loss mask
  for instance models), streamed by :class:`BatchStream`;
* the **loss**: ``loss_fn(logits, *targets) -> scalar``;
* the **evaluation**: ``evaluate(model) -> metrics`` run at chosen steps by :class:`PeriodicEvaluation`.

CEM500K's optimisation is fixed here once: AdamW + OneCycle (stepped every iteration), frozen
encoder parts kept in eval mode (their BatchNorm statistics are pretrained). Three levers protect a
pretrained encoder from the large early updates a random decoder sends into it (ULMFiT / BEiT
practice), all off by default: a lower encoder learning rate (``encoder_lr_scale``), layer-wise
decay over the encoder's stages (``layer_decay``) and a frozen-encoder warm-up
(``freeze_encoder_iterations``); see :func:`encoder_param_groups` and :class:`FinetuneModule`.

A sweep of dozens of
short CPU runs uses a bare Trainer (no logger, checkpoint, progress bar or model summary);
``cemnet finetune`` adds those through ``logger`` / ``callbacks`` / ``progress``. The data
position is part of a checkpoint (the generator state after the last *consumed* batch, not the
one Lightning prefetched), so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from cemnet.methods.checkpointing import AtomicCheckpointIO

__all__ = ["BatchSource", "BatchStream", "StreamDataModule", "FinetuneModule", "PeriodicEvaluation", "StepHook", "fit",
           "accelerator", "encoder_param_groups"]

# Lightning's advice for map-style datasets does not apply to an in-memory batch stream
for _pattern in (".*does not have many workers.*", ".*log_every_n_steps.*", ".*IterableDataset.*__len__.*",
                 ".*that ended before the epoch ended.*", ".*reproducible.*", ".*module\\(s\\) in eval mode.*",
                 ".*LeafSpec.*"):
    warnings.filterwarnings("ignore", _pattern)


class BatchSource(Protocol):
    """Makes training batches; its ``rng`` is the whole data position."""

    rng: np.random.Generator

    def batch(self) -> tuple[torch.Tensor, ...]: ...


class BatchStream(IterableDataset):
    """Endless stream of ``(index, batch)`` from a :class:`BatchSource`.

    Records the generator state after each batch, so :class:`FinetuneModule` can checkpoint the
    position of the last batch actually trained on (Lightning fetches one batch ahead)."""

    def __init__(self, source: BatchSource) -> None:
        self.source = source
        self.produced = 0
        self.states: dict[int, dict[str, Any]] = {}

    def __iter__(self) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
        while True:
            batch = self.source.batch()
            self.produced += 1
            self.states[self.produced] = self.source.rng.bit_generator.state
            for old in [k for k in self.states if k < self.produced - 4]:
                del self.states[old]
            yield self.produced, batch

    def restore(self, state: dict[str, Any]) -> None:
        self.source.rng.bit_generator.state = state
        self.states.clear()
        self.produced = 0


class StreamDataModule(pl.LightningDataModule):
    """The training data of a fine-tuning run: one :class:`BatchStream` (no validation loader:
    validation scores whole images/volumes, see :class:`PeriodicEvaluation`)."""

    def __init__(self, source: BatchSource) -> None:
        super().__init__()
        self.stream = BatchStream(source)

    def train_dataloader(self) -> DataLoader:
        # batches are built whole by the source; batch_size=None passes them through untouched
        return DataLoader(self.stream, batch_size=None, num_workers=0)


def encoder_param_groups(model: nn.Module, max_lr: float, encoder: nn.Module | None = None, *,
                         encoder_lr_scale: float = 1.0, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW parameter groups with per-group peak learning rates (trainable parameters only).

    Everything outside ``encoder`` (the decoder, heads) trains at ``max_lr``. The encoder's direct
    children (its stages in forward order: ``conv1, bn1, ..., layer4`` for a timm ResNet) train at
    ``max_lr * encoder_lr_scale * layer_decay ** d``, ``d`` = stages between the child and the
    deepest one (BEiT's layer-wise decay: the stem changes least). Each group carries its ``name``
    (``decoder`` / ``encoder.<child>``) and ``lr``. Groups without trainable parameters are left out.
    """
    if encoder_lr_scale < 0 or not 0 < layer_decay <= 1:
        raise ValueError(f"encoder_lr_scale must be >= 0 and 0 < layer_decay <= 1 (got {encoder_lr_scale}, {layer_decay})")
    stages: list[tuple[str, nn.Module]] = list(encoder.named_children()) if encoder is not None else []
    if encoder is not None and not stages:
        stages = [("", encoder)]
    in_encoder: set[int] = set()
    groups: list[dict[str, Any]] = []
    for depth, (name, stage) in enumerate(reversed(stages)):
        params = [p for p in stage.parameters() if p.requires_grad and id(p) not in in_encoder]
        in_encoder.update(id(p) for p in stage.parameters())
        if params:
            lr = max_lr * encoder_lr_scale * layer_decay ** depth
            groups.append({"params": params, "lr": lr, "name": f"encoder.{name}" if name else "encoder"})
    if encoder is not None:  # parameters owned by the encoder module itself, outside its children
        in_encoder.update(id(p) for p in encoder.parameters())
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_encoder]
    groups.reverse()  # stem first, as the network runs
    if rest:
        groups.append({"params": rest, "lr": max_lr, "name": "decoder"})
    return groups


class FinetuneModule(pl.LightningModule):
    """Trains ``model`` with ``loss_fn`` (AdamW + OneCycle over ``total_steps``).

    Args:
        model: the network (its ``forward`` gives logits).
        loss_fn: ``loss_fn(logits, *targets)``; the batch is ``(x, *targets)``.
        total_steps: length of the OneCycle schedule (the run's iterations).
        max_lr, weight_decay: AdamW / OneCycle settings (CEM500K: 3e-3, 0.1).
        frozen: modules whose parameters are frozen; kept in eval mode while training.
        schedule: ``onecycle`` (CEM500K) or ``constant`` (``max_lr`` throughout: the short
            source-model runs of the transferability validation).
        encoder: the pretrained part the levers below act on (default: ``model.encoder`` if any).
        encoder_lr_scale: the encoder's peak learning rate as a fraction of ``max_lr`` (1: same).
        layer_decay: per-stage factor of the encoder's learning rate, from the deepest stage down
            (1: none; see :func:`encoder_param_groups`).
        freeze_encoder_iterations: the encoder (its trainable part) is frozen, weights and
            BatchNorm statistics, for the first N optimizer steps, so the decoder first learns
            from pretrained features; then it joins the schedule where the schedule stands.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], total_steps: int, *,
                 max_lr: float = 3e-3, weight_decay: float = 0.1, frozen: Sequence[nn.Module] = (),
                 schedule: str = "onecycle", encoder: nn.Module | None = None, encoder_lr_scale: float = 1.0,
                 layer_decay: float = 1.0, freeze_encoder_iterations: int = 0) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.total_steps = int(total_steps)
        self.max_lr, self.weight_decay = float(max_lr), float(weight_decay)
        self.frozen = list(frozen)
        if schedule not in ("onecycle", "constant"):
            raise ValueError(f"schedule {schedule!r}: expected 'onecycle' or 'constant'")
        self.schedule = schedule
        # a plain reference, not a submodule: the weights stay under `model.` in state dicts
        self._encoder_ref = (encoder if encoder is not None else getattr(model, "encoder", None),)
        self.encoder_lr_scale, self.layer_decay = float(encoder_lr_scale), float(layer_decay)
        if freeze_encoder_iterations < 0:
            raise ValueError(f"freeze_encoder_iterations must be >= 0, got {freeze_encoder_iterations}")
        if freeze_encoder_iterations and self.encoder is None:
            raise ValueError("freeze_encoder_iterations needs a model with an `encoder` (or pass encoder=)")
        self.freeze_encoder_iterations = int(freeze_encoder_iterations)
        # the encoder parameters the warm-up freezes and then releases (not those frozen for good)
        self._warmup_params = [p for p in self.encoder.parameters() if p.requires_grad] if self.freeze_encoder_iterations else []
        self._encoder_warming = False
        self.running_loss = math.nan
        self.history: list[dict[str, Any]] = []  # evaluations so far (kept in checkpoints)
        self.stream: BatchStream | None = None
        self._consumed = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[int, tuple[torch.Tensor, ...]], batch_idx: int) -> torch.Tensor:
        index, (x, *targets) = batch
        self._consumed = int(index)
        self._set_encoder_warmup(self.global_step < self.freeze_encoder_iterations)
        for m in self.frozen:  # frozen BatchNorms keep their pretrained statistics
            m.eval()
        if self._encoder_warming:
            self.encoder.eval()
        loss = self.loss_fn(self.model(x), *targets)
        value = float(loss.detach())
        self.running_loss = value if math.isnan(self.running_loss) else 0.9 * self.running_loss + 0.1 * value
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=x.shape[0], prog_bar=True)
        return loss

    @property
    def encoder(self) -> nn.Module | None:
        """The part of ``model`` the encoder levers act on."""
        return self._encoder_ref[0]

    def _set_encoder_warmup(self, warming: bool) -> None:
        """Freeze (``True``) or release the warm-up's encoder parameters; a no-op without a warm-up.
        Decided from ``global_step`` at every step, so a run resumed mid-warm-up is in the right state."""
        if not self._warmup_params or warming == self._encoder_warming:
            return
        for p in self._warmup_params:
            p.requires_grad_(not warming)  # no gradient: AdamW skips the parameter (no decay either)
        if not warming:
            self.encoder.train()
        self._encoder_warming = warming

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (see :func:`encoder_param_groups`), built from what is
        trainable at all: a parameter frozen only for the warm-up is included."""
        self._set_encoder_warmup(False)
        return encoder_param_groups(self.model, self.max_lr, self.encoder, encoder_lr_scale=self.encoder_lr_scale,
                                    layer_decay=self.layer_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.param_groups()
        opt = torch.optim.AdamW(groups, lr=self.max_lr, weight_decay=self.weight_decay)
        if self.schedule == "constant":
            return {"optimizer": opt}
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=max(self.total_steps, 2))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cemnet_history"] = list(self.history)
        checkpoint["cemnet_running_loss"] = self.running_loss
        if self.stream is not None and self._consumed in self.stream.states:
            checkpoint["cemnet_data_position"] = self.stream.states[self._consumed]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("cemnet_history", []))
        self.running_loss = float(checkpoint.get("cemnet_running_loss", math.nan))
        if self.stream is not None and "cemnet_data_position" in checkpoint:
            self.stream.restore(checkpoint["cemnet_data_position"])


class PeriodicEvaluation(pl.Callback):
    """Scores the model with ``evaluate(model) -> metrics`` after the given steps.

    Each result (``{"iteration", "loss", **metrics}``) is appended to the module's ``history``,
    sent to the trainer's loggers under ``val/`` and passed to ``on_result(row, module, trainer)``
    (``cemnet finetune`` keeps the best model and a resume checkpoint there)."""

    def __init__(self, evaluate: Callable[[nn.Module], dict[str, Any]], at_steps: Sequence[int],
                 on_result: Callable[[dict[str, Any], FinetuneModule, pl.Trainer], None] | None = None) -> None:
        self.evaluate = evaluate
        self.at_steps = set(int(s) for s in at_steps)
        self.on_result = on_result

    def run(self, trainer: pl.Trainer, module: FinetuneModule, step: int) -> dict[str, Any]:
        was_training = module.model.training
        metrics = self.evaluate(module.model)
        module.model.train(was_training)
        row = {"iteration": step, "loss": module.running_loss, **metrics}
        module.history.append(row)
        numeric = {f"val/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for lg in trainer.loggers:
            lg.log_metrics(numeric, step=step)
        if self.on_result is not None:
            self.on_result(row, module, trainer)
        return row

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step in self.at_steps:
            self.run(trainer, pl_module, trainer.global_step)  # type: ignore[arg-type]


class StepHook(pl.Callback):
    """Calls ``fn(step, loss)`` after every training step (progress reporting in scripts)."""

    def __init__(self, fn: Callable[[int, float], None]) -> None:
        self.fn = fn

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.fn(trainer.global_step, float(loss))


def accelerator(device: str) -> tuple[str, Any]:
    """Lightning ``(accelerator, devices)`` for a torch device string (cpu, cuda, cuda:1, mps)."""
    kind, _, index = str(device).partition(":")
    if kind == "cpu":
        return "cpu", 1
    if kind == "cuda":
        return "gpu", [int(index)] if index else 1
    return kind, 1


def fit(module: FinetuneModule, source: BatchSource, iterations: int, *, device: str = "cpu",
        callbacks: Sequence[pl.Callback] = (), logger: Any = False, progress: bool = False,
        ckpt_path: str | None = None, root_dir: str | None = None) -> pl.Trainer:
    """Train ``module`` for ``iterations`` optimizer steps on batches from ``source``.

    ``ckpt_path`` resumes a checkpoint written by ``trainer.save_checkpoint`` (weights, optimizer,
    schedule, step, evaluation history and data position)."""
    # "GPU available: False ..." and the litlogger tip, for every run of a sweep: noise
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    data = StreamDataModule(source)
    module.stream = data.stream
    acc, devices = accelerator(device)
    trainer = pl.Trainer(
        max_steps=int(iterations), max_epochs=-1, accelerator=acc, devices=devices, logger=logger,
        callbacks=list(callbacks), enable_checkpointing=False, enable_progress_bar=progress,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root_dir,
        log_every_n_steps=1, plugins=[AtomicCheckpointIO()],  # resume checkpoints: temp file + fsync + rename
    )
    module.train()  # Lightning keeps the modes it finds; an evaluation before training left eval mode
    for m in module.frozen:
        m.eval()
    if int(iterations) > 0:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer
