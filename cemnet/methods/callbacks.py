"""Callbacks of ``cemnet pretrain``: stop on divergence, log throughput, log sample pictures."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from cemnet.methods.base import batch_size, logs_this_step
from cemnet.weights.checkpoint_io import nonfinite_tensors

__all__ = ["DivergenceError", "DivergenceGuard", "ImagesPerSecond", "PairSampleLogger"]


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
        self._n += batch_size(batch) * trainer.world_size
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
