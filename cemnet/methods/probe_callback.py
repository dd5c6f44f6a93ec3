"""Online representation probe: is the encoder learning something EM-specific during pretraining?

Every ``every_n_steps`` optimizer steps (and once before the first, so the random initialisation is
the baseline) the current encoder is frozen and scored by :mod:`cemnet.benchmarks.probe` on a small
labelled 2D probe set: a dense linear probe's IoU on held-out tiles and a kNN tile retrieval
accuracy. The scores go to every logger at the current step (so they land in
``RUN_DIR/csv/metrics.csv`` as ``probe_iou``, ``probe_knn_acc``, ``probe_train_iou``), and
``RUN_DIR/probe.png`` is redrawn. Off unless configured, e.g. in an experiment YAML::

    trainer:
      callbacks:
        - class_path: cemnet.methods.probe_callback.RepresentationProbe
          init_args: {every_n_steps: 200, benchmark: cdeep3m_mito, data_dir: ../shared/data}

Works with any 2D method whose LightningModule holds its encoder in ``backbone`` (MoCoV2, MGMR2D).
It runs on global rank 0 only; the other ranks wait at the next collective as for a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from cemnet.benchmarks.probe import ProbeConfig, ProbeSet, make_probe_set, plot_probe_history, probe_encoder

__all__ = ["RepresentationProbe"]

log = logging.getLogger(__name__)


class RepresentationProbe(pl.Callback):
    """Score the frozen encoder on a labelled probe set every ``every_n_steps`` steps.

    Args:
        every_n_steps: probe period in optimizer steps (0: never).
        benchmark, data_dir: a registered benchmark and its local copy (default: CDeep3M
            mitochondria in the shared data), or
        images, masks: folders of 2D images and masks (``benchmark custom`` layout).
        split: split rule of the probe data (default: the benchmark's, ``z:0.8`` for custom).
        class_value: mask value probed (1 = the first class).
        tile, train_tiles, test_tiles, max_stride: see :class:`~cemnet.benchmarks.probe.ProbeConfig`.
        seed: draws the tiles (fixed for the whole run, so scores are comparable across steps).
        at_start: also probe before the first step (the initialisation's baseline).
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        benchmark: str | None = "cdeep3m_mito",
        data_dir: str | None = "../shared/data",
        images: str | None = None,
        masks: str | None = None,
        split: str | None = None,
        class_value: int = 1,
        tile: int = 128,
        train_tiles: int = 48,
        test_tiles: int = 48,
        max_stride: int = 16,
        seed: int = 0,
        at_start: bool = True,
    ) -> None:
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.source = {"benchmark": benchmark, "data_dir": data_dir, "images": images, "masks": masks, "split": split}
        self.cfg = dataclasses.replace(ProbeConfig(), tile=tile, train_tiles=train_tiles, test_tiles=test_tiles,
                                       max_stride=max_stride, foreground=class_value)
        self.seed = seed
        self.at_start = at_start
        self.history: list[dict[str, float]] = []
        self._probe_set: ProbeSet | None = None

    # -- checkpointed state: a resumed run keeps its probe curve ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.every_n_steps == 0 or stage != "fit" or not trainer.is_global_zero:
            return
        if getattr(pl_module, "spatial_dims", 2) != 2 or not hasattr(pl_module, "backbone"):
            raise ValueError(f"RepresentationProbe: {type(pl_module).__name__} is not a 2D method with a `backbone`; "
                             "the probe scores 2D encoders only")
        from cemnet.benchmarks.cli_probe import load_probe_data

        s = self.source
        try:
            data = load_probe_data(s["benchmark"], s["data_dir"], s["images"], s["masks"], s["split"])
            self._probe_set = make_probe_set(data, self.cfg, self.seed)
        except (OSError, ValueError, KeyError) as err:
            # a misconfigured instrument must not cost the pretraining run: say so once, train on
            warnings.warn(f"RepresentationProbe disabled, cannot build the probe set: {err}", stacklevel=1)
            self._probe_set = None
            return
        log.info("RepresentationProbe: %s, every %d steps", self._probe_set.summary(), self.every_n_steps)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        if self._probe_set is None or any(int(h["step"]) == step for h in self.history):
            return
        t0 = time.perf_counter()
        mean, std = getattr(pl_module, "mean", None), getattr(pl_module, "std", None)
        norm = (float(mean), float(std)) if mean is not None and std is not None else None
        scores = probe_encoder(pl_module.backbone, self._probe_set, self.cfg, norm=norm, device=pl_module.device)
        for logger in trainer.loggers:
            logger.log_metrics(scores, step=step)
        self.history.append({"step": step, **scores})
        run_dir = Path(trainer.default_root_dir)
        plot_probe_history(self.history, run_dir / "probe.png", title=f"probe on {self._probe_set.name}")
        log.info("step %d: probe IoU %.3f, kNN %.3f (%.1f s)", step, scores["probe_iou"], scores["probe_knn_acc"],
                 time.perf_counter() - t0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_start and trainer.is_global_zero:
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps and trainer.is_global_zero:  # the final encoder, whatever the period
            self._run(trainer, pl_module)
