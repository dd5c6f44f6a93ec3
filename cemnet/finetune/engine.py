"""The one fine-tuning engine: a LightningModule, a small data module and a ``fit`` helper.

``cemnet finetune``, ``cemnet benchmark`` (semantic sweeps and the affinity path) and
``cemnet transfer select`` heads are all trained here; what differs between them is only

* the **batch source**: any object with ``batch() -> (x, *targets)`` and a numpy generator
  ``rng`` (random augmented crops; slice crops for semantic models, affinity targets + loss mask
  for instance models), streamed by :class:`BatchStream`;
* the **loss**: ``loss_fn(logits, *targets) -> scalar``;
* the **evaluation**: ``evaluate(model) -> metrics`` run at chosen steps by :class:`PeriodicEvaluation`.

CEM500K's optimisation is fixed here once: AdamW + OneCycle (stepped every iteration), frozen
encoder parts kept in eval mode (their BatchNorm statistics are pretrained). A sweep of dozens of
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

__all__ = ["BatchSource", "BatchStream", "StreamDataModule", "FinetuneModule", "PeriodicEvaluation", "StepHook", "fit", "accelerator"]

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
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], total_steps: int, *,
                 max_lr: float = 3e-3, weight_decay: float = 0.1, frozen: Sequence[nn.Module] = (),
                 schedule: str = "onecycle") -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.total_steps = int(total_steps)
        self.max_lr, self.weight_decay = float(max_lr), float(weight_decay)
        self.frozen = list(frozen)
        if schedule not in ("onecycle", "constant"):
            raise ValueError(f"schedule {schedule!r}: expected 'onecycle' or 'constant'")
        self.schedule = schedule
        self.running_loss = math.nan
        self.history: list[dict[str, Any]] = []  # evaluations so far (kept in checkpoints)
        self.stream: BatchStream | None = None
        self._consumed = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[int, tuple[torch.Tensor, ...]], batch_idx: int) -> torch.Tensor:
        index, (x, *targets) = batch
        self._consumed = int(index)
        for m in self.frozen:  # frozen BatchNorms keep their pretrained statistics
            m.eval()
        loss = self.loss_fn(self.model(x), *targets)
        value = float(loss.detach())
        self.running_loss = value if math.isnan(self.running_loss) else 0.9 * self.running_loss + 0.1 * value
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=x.shape[0], prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.max_lr, weight_decay=self.weight_decay)
        if self.schedule == "constant":
            return {"optimizer": opt}
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.max_lr, total_steps=max(self.total_steps, 2))
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
