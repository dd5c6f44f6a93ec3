"""Checkpoints of ``cemnet pretrain`` runs: written atomically, always current, found again on resume.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the same folder,
  syncs it and renames it over the target, so a crash or a full disk never leaves a half
  ``last.ckpt`` behind (the previous one stays intact).
* :class:`RunCheckpoint` is Lightning's ``ModelCheckpoint`` with three guarantees on top:
  ``last.ckpt`` is always the newest state (never a ``last-v1.ckpt`` next to a stale one, whatever
  ``--checkpoint_every_n_steps`` a resumed run uses); ``last.ckpt`` is written at the end of every
  run, however it ends (``max_steps``, ``max_epochs``, ``max_time``, Ctrl-C, SIGTERM); and that
  final save happens right after the run's last training batch, the same moment a periodic
  checkpoint is taken, so a resume continues with exactly the batch an uninterrupted run would
  have trained on next. The first Ctrl-C / SIGTERM finishes the running step, saves and stops;
  a second one aborts at once.
* :func:`newest_loadable_checkpoint` picks what ``--resume`` continues from: the newest checkpoint
  of the run whose file is intact, skipping (and naming) broken ones.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, Timer

from cemnet.weights.checkpoint_io import torch_archive_problem

__all__ = ["AtomicCheckpointIO", "RunCheckpoint", "newest_loadable_checkpoint"]

_SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``PATH.tmp-PID``, fsyncs it, then renames it to ``PATH``.

    The file gets the usual permissions (umask), like any file the user writes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        if "://" in str(path):  # remote file systems: no rename there, leave it to fsspec
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def newest_loadable_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint of a run, and the newer ones skipped as broken (with why).

    Candidates: ``checkpoints/*.ckpt`` (``last.ckpt`` and the periodic ``stepNNNNNNNN.ckpt``) and
    ``hpc_ckpt_*.ckpt`` (Lightning's SLURM preemption saves), newest modification time first;
    ``last.ckpt`` wins a tie because it is written after the periodic checkpoint of the same step.
    """
    run_dir = Path(run_dir)
    found = [p for p in [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    found.sort(key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt", p.name), reverse=True)
    skipped: list[tuple[Path, str]] = []
    for path in found:
        problem = torch_archive_problem(path)  # CRCs of every member: truncated or zeroed files fail
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state and is saved however a run ends.

    After every training batch it asks whether the run ends with this batch (``max_steps`` reached,
    the last batch of the last epoch, ``trainer.should_stop`` set by ``max_time`` or early stopping,
    or a signal) and, if so, saves ``last.ckpt`` there, where the data position is exact. Signals:
    while training, the first SIGINT/SIGTERM only asks for that stop; :attr:`stopped_by` tells the
    caller which signal ended the run (``None`` otherwise), :attr:`end_reason` how it ended.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_last", True)
        # the version counter is what made `last-v1.ckpt` appear next to a stale `last.ckpt`
        kwargs["enable_version_counter"] = False
        super().__init__(**kwargs)
        self.stopped_by: int | None = None
        self.end_reason: str | None = None
        self._signal_seen: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    @property
    def state_key(self) -> str:
        # One key whatever the interval: a resumed run with another --checkpoint_every_n_steps
        # still restores this callback's state (last_model_path, kept checkpoints).
        return "cemnet.RunCheckpoint"

    # -- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal_seen is not None:  # second signal: stop now, the way the signal normally does
            self._restore_handlers()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self._signal_seen = signum
        print(
            f"\ncemnet pretrain: {_SIGNAL_NAMES.get(signum, signum)} received: finishing this step, saving "
            "last.ckpt, then stopping (send it again to abort at once)",
            file=sys.stderr, flush=True,
        )

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stopped_by, self.end_reason, self._signal_seen = None, None, None
        # on every rank: a rank that got no signal learns of the stop through the all-reduce in
        # on_train_batch_end, so all ranks save and stop after the same batch
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread: keep Lightning's own handling
            self._restore_handlers()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
        if self.end_reason is None:
            self.end_reason = self._why_run_ends(trainer) or "stopped"
        if self.save_last and self._last_global_step_saved != trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            # a way of ending not foreseen after the last batch: still keep the trained steps
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    # -- the end of the run --------------------------------------------------------------------
    def _why_run_ends(self, trainer: pl.Trainer) -> str | None:
        if self._signal_seen is not None:
            return f"stopped by {_SIGNAL_NAMES.get(self._signal_seen, self._signal_seen)}"
        if trainer.received_sigterm:
            return "stopped by SIGTERM"
        if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
            return f"max_steps={trainer.max_steps} reached"
        epoch_loop = trainer.fit_loop.epoch_loop
        max_epochs = trainer.max_epochs
        if max_epochs not in (None, -1) and epoch_loop.batch_progress.is_last_batch and trainer.current_epoch + 1 >= max_epochs:
            return f"max_epochs={max_epochs} reached"
        if trainer.should_stop:
            timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
            if timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
                return f"max_time reached (ran {timer.time_elapsed():.0f} s)"
            return "trainer.should_stop was set (early stopping)"
        return None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Last resort for a stop set at an epoch's end by something we could not foresee: keep the
        # trained steps (Lightning resumes such an end-of-epoch save one batch off; the stoppers we
        # know of are covered by the save at the epoch's last batch, see on_train_batch_end).
        if self._signal_seen is None and trainer.should_stop and not self._should_skip_saving_checkpoint(trainer):
            self.end_reason = self._why_run_ends(trainer)
            if self.save_last:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def _may_stop_at_epoch_end(trainer: pl.Trainer) -> bool:
        """Whether a callback may end the run at this epoch's end (max_time's Timer, early stopping)."""
        return any(isinstance(c, (Timer, EarlyStopping)) for c in trainer.callbacks)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        signalled = self._signal_seen is not None or trainer.received_sigterm  # (Lightning's handler, off the main thread)
        if trainer.world_size > 1:  # every rank must stop (and save) together
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if signalled and self._signal_seen is None:  # told by another rank, or by Lightning's handler
            self._signal_seen = signal.SIGTERM
        if signalled:
            trainer.should_stop = True
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid-accumulation: the step is not finished, nothing to save yet
        reason = self._why_run_ends(trainer)
        if reason is None:
            # a Timer / EarlyStopping may stop at this epoch's end: save now, where the position is exact
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and self._may_stop_at_epoch_end(trainer):
                if self.save_last and not self._should_skip_saving_checkpoint(trainer):
                    self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        self.end_reason = reason
        if signalled:
            self.stopped_by = self._signal_seen
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
