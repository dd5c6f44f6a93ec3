"""``cemnet pretrain``: LightningCLI over the pretraining methods and data modules.

    cemnet pretrain --config experiments/tiny_mocov2_cpu.yaml            # 'fit' is the default
    cemnet pretrain fit --config experiments/cem500k_mocov2_resnet50.yaml --data.corpus /data/cem500k
    cemnet pretrain --config ... --resume                                 # continue runs/<...>/checkpoints/last.ckpt
    cemnet pretrain --config ... --wandb                                  # + W&B (offline unless --wandb_mode online)

Models and data modules are chosen by class path (subclass mode), e.g. ``--model
cemnet.methods.mocov2.MoCoV2`` or ``--model cemnet.methods.mgmr.MGMR2D``; nothing beyond MoCoV2 is
imported up front, so a method's dependencies load only when it is used.

Every run writes into ``--run_dir``: ``checkpoints/`` (every ``--checkpoint_every_n_steps`` optimizer
steps, plus ``last.ckpt``), ``csv/metrics.csv`` and ``csv/config.yaml`` (always), ``wandb/`` (when
asked) and ``samples/`` (augmented view pairs, when no image-capable logger is attached).
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import ActionYesNo
from lightning_fabric.plugins import CheckpointIO
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger

from cemnet.data.datamodule import CorpusTooSmallError
from cemnet.methods.checkpointing import AtomicCheckpointIO, RunCheckpoint, newest_loadable_checkpoint
from cemnet.methods.config_paths import ConfigPathError, expand_config_names, resolve_input_paths
from cemnet.methods.callbacks import DivergenceError, DivergenceGuard, ImagesPerSecond, PairSampleLogger

SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Registered so that short names (--model MoCoV2, --model MGMR2D) resolve; a module that is missing
# or broken only loses its short name, its class path still works or fails with its own error.
_OPTIONAL_MODULES = ("cemnet.methods.mocov2", "cemnet.methods.mgmr", "cemnet.data.datamodule", "cemnet.data.subvolumes")


def _register_known_classes() -> None:
    for name in _OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


class PretrainCLI(LightningCLI):
    """LightningCLI with cemnet's run folder, loggers, checkpointing, divergence guard and resume."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/pretrain", help="run folder (checkpoints, logs, samples)")
        parser.add_argument("--resume", action=ActionYesNo, default=False, help="continue from the newest intact checkpoint in RUN_DIR (last.ckpt; a broken one is skipped)")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=1000, help="checkpoint every N optimizer steps (+ last.ckpt)")
        parser.add_argument("--checkpoint_keep", type=int, default=-1, help="periodic checkpoints kept (-1: all; last.ckpt always)")
        parser.add_argument("--samples_every_n_steps", type=int, default=1000, help="log augmented view pairs every N steps (0: never)")
        parser.add_argument("--wandb", action=ActionYesNo, default=False, help="also log to Weights & Biases")
        parser.add_argument("--wandb_project", type=str, default="cemnet", help="W&B project")
        parser.add_argument("--wandb_mode", type=str, default="offline", help="W&B mode: offline (default, sync later with `wandb sync`) or online")

    def _cfg(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        if self.subcommand == "fit":
            resolve_input_paths(cfg)  # the same files whether or not ../shared (or the checkout) is a symlink
        if cfg.get("resume") and self.subcommand == "fit" and not cfg.get("ckpt_path"):  # explicit --ckpt_path wins
            run_dir = Path(cfg.run_dir)
            # last.ckpt, a periodic stepNNNNNNNN.ckpt or a SLURM preemption save, the newest intact one
            found, broken = newest_loadable_checkpoint(run_dir)
            for path, problem in broken:
                print(f"cemnet pretrain: skipping broken checkpoint {path}: {problem}", file=sys.stderr)
            if found is not None:
                cfg.ckpt_path = str(found)
                print(f"cemnet pretrain: resuming from {cfg.ckpt_path}", file=sys.stderr)
            elif broken:
                raise SystemExit(f"cemnet pretrain: --resume: no intact checkpoint in {run_dir} (all {len(broken)} broken)")
            else:
                print(f"cemnet pretrain: --resume but no checkpoint in {run_dir}; starting a new run", file=sys.stderr)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run_dir = Path(cfg.run_dir)
        trainer_cfg = cfg.get("trainer", {})
        if trainer_cfg.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(run_dir)
        if trainer_cfg.get("logger") in (None, True):
            loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
            if cfg.get("wandb"):
                from pytorch_lightning.loggers import WandbLogger

                loggers.append(
                    WandbLogger(
                        project=cfg.wandb_project, name=run_dir.name, save_dir=str(run_dir),
                        offline=cfg.wandb_mode != "online", resume="allow",
                    )
                )
            kwargs["logger"] = loggers
        ours: list[pl.Callback] = [
            DivergenceGuard(),
            ImagesPerSecond(),
            RunCheckpoint(
                dirpath=str(run_dir / "checkpoints"),
                filename="step{step:08d}",
                auto_insert_metric_name=False,
                every_n_train_steps=cfg.checkpoint_every_n_steps,
                save_top_k=cfg.checkpoint_keep,
                monitor="step",
                mode="max",
            ),
        ]
        if cfg.samples_every_n_steps > 0:
            ours.append(PairSampleLogger(every_n_steps=cfg.samples_every_n_steps, dirpath=str(run_dir)))
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # atomic writes unless the user brings their own
            trainer_config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return self._instantiate_trainer(trainer_config, extra + ours)


class _DropFitStopped(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("`Trainer.fit` stopped:")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cemnet pretrain``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = expand_config_names(argv)  # `--config tiny_mocov2_cpu`: a config shipped with cemnet
    if not argv or argv[0] not in SUBCOMMANDS:
        argv = ["fit", *argv]  # `fit` is the default subcommand, also for --help (its options are the ones used)
    _register_known_classes()
    # we pass argv explicitly (so `cemnet pretrain ...` works) but leave sys.argv intact, because
    # Lightning's DDP launcher re-executes sys.argv for ranks > 0
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # Lightning's "`Trainer.fit` stopped: ..." can name the wrong limit (max_epochs after a max_time
    # stop); RunCheckpoint knows how the run ended and _report_end says it instead
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropFitStopped())
    try:
        cli = PretrainCLI(
            model_class=pl.LightningModule,
            subclass_mode_model=True,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"},
            args=argv,
            parser_kwargs={"prog": "cemnet pretrain"},  # so usage lines and tips name a real command
        )
    except DivergenceError as err:
        print(f"cemnet pretrain: {err}", file=sys.stderr)
        return 3
    except (CorpusTooSmallError, ConfigPathError) as err:
        print(f"cemnet pretrain: {err}", file=sys.stderr)
        return 2
    _finish_wandb(cli)
    return _report_end(cli)


def _finish_wandb(cli: LightningCLI) -> None:
    """Close the W&B run so its files are complete when we return (not only at interpreter exit)."""
    for logger in getattr(getattr(cli, "trainer", None), "loggers", []):
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


def _report_end(cli: LightningCLI) -> int:
    """Say how a fit ended and where its last state is; 128 + signal number when a signal stopped it."""
    trainer = getattr(cli, "trainer", None)
    ckpt = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, RunCheckpoint)), None)
    if ckpt is None or ckpt.end_reason is None or not trainer.is_global_zero:
        return 0
    where = f"; last checkpoint {ckpt.last_model_path}" if ckpt.last_model_path else ""
    print(f"cemnet pretrain: {ckpt.end_reason} at global step {trainer.global_step}{where}", file=sys.stderr)
    if ckpt.stopped_by is not None:
        print("cemnet pretrain: continue with the same command and --resume", file=sys.stderr)
        return 128 + int(ckpt.stopped_by)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
