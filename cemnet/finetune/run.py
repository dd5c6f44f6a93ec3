"""A ``cemnet finetune`` run: train on the shared engine, keep the best and the last model, log.

Run folder layout (``RUN``):

* ``model.safetensors`` - the best weights by validation score (IoU for semantic models, VI for
  instance models), one self-describing file (:mod:`cemnet.finetune.model_file`);
* ``last.safetensors`` - the weights at the end of training (same metadata, its own scores);
* ``metrics.csv`` - ``train/loss`` every step and ``val/*`` at every evaluation (Lightning's
  CSV logger); with ``wandb`` also an offline W&B run under ``RUN/wandb``;
* ``validation.csv`` - one row per evaluation; ``run.json`` - settings, data record, history;
* ``checkpoints/last.ckpt`` - resume state (weights, optimizer, schedule, step, data position),
  written atomically after each evaluation;
* ``overlays.png`` - validation images (chosen, or the most varied) with truth and prediction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from torch import nn

from cemnet.benchmarks.datasets import BenchmarkData
from cemnet.finetune.model_file import ModelSpec, save_model
from cemnet.weights.download import sha256_file

__all__ = ["FinetuneSettings", "RunError", "run_finetune", "validation_scores"]

log = logging.getLogger("cemnet.finetune")

# settings that change what a resumed run computes: a resume with other values is refused
_RESUME_KEYS = ("task", "dims", "encoder", "arch", "freeze", "iterations", "batch_size", "crop_size", "lr",
                "weight_decay", "base_width", "seed", "orthoplane")


class RunError(ValueError):
    """A run folder that cannot be used as asked (exists, or resumed with other settings)."""


@dataclasses.dataclass
class FinetuneSettings:
    """What ``cemnet finetune`` trains (the CLI's options)."""

    task: str = "semantic"  # semantic | instance
    dims: str = "2d"  # semantic: 2d (per slice); instance: 3d or 2.5d (slice pairs)
    encoder: str = "random"
    arch: str | None = None  # random encoders (default resnet50; instance: resnet18 / cemnet3d_res_tiny)
    freeze: str = "none"
    encoder_lr_scale: float = 1.0  # encoder levers (cemnet.finetune.engine.FinetuneModule); 1 / 1 / 0 = off
    layer_decay: float = 1.0
    freeze_encoder_iterations: int = 0
    iterations: int = 500
    batch_size: int = 8
    crop_size: int = 224  # semantic crop side; instance crops are (crop_z, crop_size, crop_size)
    crop_z: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    base_width: int = 256
    seed: int = 0
    orthoplane: bool = False
    val_every: int = 0  # 0: four evaluations over the run
    thresholds: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3)
    device: str = "cpu"
    voxel_size: tuple[float, float, float] | None = None
    overlay_images: tuple[str, ...] = ()
    overlays: int = 3
    wandb: bool = False
    progress: bool = True

    def eval_steps(self) -> list[int]:
        every = self.val_every or max(1, math.ceil(self.iterations / 4))
        return sorted({*range(every, self.iterations, every), self.iterations})


def _encoder_record(settings: FinetuneSettings, encoder: nn.Module, random_arch: str) -> tuple[dict[str, Any], str, dict]:
    """(provenance, architecture name, architecture kwargs) of the network's encoder."""
    meta = getattr(encoder, "cemnet_meta", None)
    if settings.encoder.startswith("random") or meta is None:
        arch = settings.encoder.partition(":")[2] or random_arch
        return {"source": "random", "arch": arch, "sha256": None, "method": None, "frozen": settings.freeze}, arch, {}
    sha = sha256_file(settings.encoder) if Path(settings.encoder).is_file() else None
    if sha is None:  # a registry name: the pinned checksum of the downloaded file
        try:
            from cemnet.weights.registry import get_entry

            sha = get_entry(settings.encoder).sha256
        except Exception:  # a run folder or an unknown name: no single file to hash
            sha = None
    record = {"source": settings.encoder, "sha256": sha, "method": meta.method, "arch": meta.arch,
              "corpus_fingerprint": meta.corpus_fingerprint, "frozen": settings.freeze,
              "license": meta.license, "citation": meta.citation}
    return record, meta.arch, dict(meta.arch_kwargs or {})


def validation_scores(model: nn.Module, data: BenchmarkData, norm: tuple[float, float], settings: FinetuneSettings,
                      voxel_size: Sequence[float] | None = None) -> dict[str, Any]:
    """The validation metrics the run records (and a loaded model reproduces): semantic - the
    benchmark metrics (``iou``, per-class IoU/precision/recall/F1); instance - VI / adapted Rand
    at the best agglomeration threshold (mean over validation volumes)."""
    if settings.task == "semantic":
        from cemnet.benchmarks.train import FinetuneConfig, evaluate

        cfg = FinetuneConfig(orthoplane=settings.orthoplane, device=settings.device, eval_batch=4)
        return evaluate(model, data, norm, cfg)
    from cemnet.benchmarks.instance import evaluate_affinities, predict_affinities

    per_threshold: dict[float, list[dict[str, float]]] = {}
    for s in data.test:
        affs, fg = predict_affinities(model, s.image, norm, settings.device)
        for r in evaluate_affinities(affs, fg, s.mask, settings.thresholds,
                                     voxel_size_nm=tuple(voxel_size) if voxel_size else (1.0, 1.0, 1.0)):
            per_threshold.setdefault(r["threshold"], []).append(r)
    means = {t: {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "threshold"}
             for t, rows in per_threshold.items()}
    best = min(means, key=lambda t: means[t]["voi"])
    return {"threshold": best, **means[best]}


def _better(task: str, new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    if old is None:
        return True
    key = "iou" if task == "semantic" else "voi"
    a, b = float(new[key]), float(old[key])
    if math.isnan(a):
        return False
    return math.isnan(b) or (a > b if task == "semantic" else a < b)


class _Progress(pl.Callback):
    """A progress bar over the whole run (steps done / total, loss, last validation score)."""

    def __init__(self, total: int, key: str) -> None:
        self.total, self.key, self.bar = total, key, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=trainer.global_step, desc="finetune", unit="it", file=sys.stderr)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.bar is None:
            return
        self.bar.update(trainer.global_step - self.bar.n)
        post = {"loss": f"{pl_module.running_loss:.4f}"}
        if pl_module.history:
            post[f"val {self.key}"] = f"{pl_module.history[-1].get(self.key, float('nan')):.4f}"
        self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()


def _prepare_run_dir(out: Path, settings: FinetuneSettings, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint to resume from (or None); refuses to overwrite a finished or other run."""
    ckpt = out / "checkpoints" / "last.ckpt"
    record = out / "run.json"
    if resume:
        if not ckpt.is_file():
            log.warning("--resume: no checkpoint in %s; starting a new run", out)
            return None
        if record.is_file():
            old = json.loads(record.read_text(encoding="utf-8")).get("settings", {})
            diff = [k for k in _RESUME_KEYS if k in old and old[k] != dataclasses.asdict(settings)[k]]
            if diff:
                raise RunError(f"{out}: the run was started with other settings ({', '.join(f'{k}={old[k]!r}' for k in diff)}); "
                               "resume with the same ones, or start a new --out")
        return str(ckpt)
    if (out / "model.safetensors").exists() or ckpt.exists():
        if not overwrite:
            raise RunError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to start again")
        for p in (out / "model.safetensors", out / "last.safetensors", ckpt, out / "metrics.csv", out / "validation.csv"):
            p.unlink(missing_ok=True)
    return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    from cemnet.benchmarks.sweep import write_csv

    tmp = path.with_name(f".{path.name}.tmp")
    write_csv(rows, tmp)
    os.replace(tmp, path)


def run_finetune(data: BenchmarkData, record: dict[str, Any], settings: FinetuneSettings, out: str | os.PathLike, *,
                 resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train, keep the best / last model and write the run folder (see the module docstring).

    Returns the run record (settings, data record, history, best scores, paths)."""
    loggers: list[Any] = []
    try:
        return _run_finetune(data, record, settings, out, resume=resume, overwrite=overwrite, loggers=loggers)
    finally:
        # finish the W&B run here, not at interpreter exit: its files are complete when we return,
        # and a later run in this process (a notebook, a sweep) gets a run of its own
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
                logger.experiment.finish()


def _run_finetune(data: BenchmarkData, record: dict[str, Any], settings: FinetuneSettings, out: str | os.PathLike, *,
                  resume: bool, overwrite: bool, loggers: list[Any]) -> dict[str, Any]:
    from pytorch_lightning.loggers import CSVLogger

    from cemnet.finetune.data import fingerprint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = _prepare_run_dir(out, settings, resume, overwrite)
    semantic = settings.task == "semantic"
    key = "iou" if semantic else "voi"
    voxel = settings.voxel_size or data.voxel_size_nm
    loggers.append(CSVLogger(save_dir=str(out), name="", version=""))
    if settings.wandb:
        from pytorch_lightning.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(WandbLogger(project="cemnet-finetune", name=out.name, save_dir=str(out), offline=True))
    # the run folder holds other files by design (and metrics.csv is merged on resume, below)
    warnings.filterwarnings("ignore", ".*Experiment logs directory .* exists and is not empty.*")
    state: dict[str, Any] = {}
    steps = settings.eval_steps()
    fp = fingerprint(data.train)

    def spec_for(scores: dict[str, Any], step: int) -> ModelSpec:
        model, norm = state["model"], state["norm"]
        provenance, arch, arch_kwargs = _encoder_record(settings, model.encoder, state["random_arch"])
        spatial = int(getattr(model, "spatial_dims", 2))
        in_chans = 2 if settings.dims == "2.5d" else 1
        if semantic:
            nc = len(data.classes)
            values = {k: v for v, k in (data.mask_report.value_to_class.items() if data.mask_report else [])}
            classes = [{"name": "background", "value": values.get(0, 0)}] + [
                {"name": n, "value": values.get(k, k)} for k, n in enumerate(data.classes, start=1)]
            out_channels, output = (1, "sigmoid") if nc == 1 else (nc + 1, "softmax")
            tile, halo = (2 * settings.crop_size,) * 2, (settings.crop_size // 4,) * 2
            post: dict[str, Any] = {"threshold": 0.5} if nc == 1 else {"argmax": True}
            if data.mask_report and data.mask_report.mode == "binary":
                post["mask_threshold"] = data.mask_report.threshold
        else:
            classes, out_channels, output = [], 4, "sigmoid"
            crop = (settings.crop_z, settings.crop_size, settings.crop_size)
            tile = tuple(2 * c for c in crop) if settings.dims == "3d" else (2 * settings.crop_size,) * 2
            halo = tuple(c // 4 for c in crop) if settings.dims == "3d" else (settings.crop_size // 4,) * 2
            post = {"thresholds": list(settings.thresholds), "threshold": scores.get("threshold"),
                    "fg_threshold": 0.5, "agglomeration": "mean", "watershed": "per-slice seeded (affinity components)"}
        return ModelSpec(
            task=settings.task, dims=settings.dims,
            arch={"kind": "unet", "encoder": arch, "encoder_kwargs": arch_kwargs, "spatial_dims": spatial,
                  "in_chans": in_chans, "out_channels": out_channels, "base_width": settings.base_width, "min_width": 16},
            output=output, norm=norm, tile=tile, halo=halo, classes=classes, voxel_size=voxel, postprocess=post,
            encoder=provenance,
            training={"data_fingerprint": fp, "iterations": settings.iterations, "step": step,
                      "config": dataclasses.asdict(settings), "validation": record.get("validation"),
                      "masks": record.get("masks"), "sources": record.get("sources")},
            scores={**scores, "step": step})

    def setup(model: nn.Module, norm: tuple[float, float]) -> None:
        state["model"], state["norm"] = model, norm

    def on_result(row: dict[str, Any], module: Any, trainer: pl.Trainer) -> None:
        scores = {k: v for k, v in row.items() if k not in ("iteration", "loss", "seconds")}
        step = int(row["iteration"])
        best = state.get("best")
        if best is None:  # resumed: the best so far is in the restored history
            prior = [r for r in module.history[:-1]]
            best = None
            for r in prior:
                if _better(settings.task, r, best):
                    best = r
        if _better(settings.task, row, best):
            save_model(module.model, spec_for(scores, step), out / "model.safetensors")
            state["best"] = row
            log.info("step %d: validation %s %.4f (best so far): saved %s", step, key, row[key], out / "model.safetensors")
        else:
            state["best"] = best
        _write_rows(module.history, out / "validation.csv")
        if step >= settings.iterations:
            save_model(module.model, spec_for(scores, step), out / "last.safetensors")
        trainer.save_checkpoint(out / "checkpoints" / "last.ckpt", weights_only=False)  # atomic: the engine's CheckpointIO

    # Lightning's CSV logger starts metrics.csv afresh: keep the rows of the steps already done
    earlier = _read_rows(out / "metrics.csv") if ckpt_path else []
    callbacks: list[pl.Callback] = [_Progress(settings.iterations, key)] if settings.progress else []
    common = dict(callbacks=callbacks, logger=loggers, progress=False, ckpt_path=ckpt_path, root_dir=str(out))
    if semantic:
        from cemnet.benchmarks.train import FinetuneConfig, finetune

        if settings.dims != "2d":
            raise RunError(f"--dims {settings.dims}: semantic models are 2D (volumes are cut into slices; "
                           "--orthoplane adds xz and yz)")
        state["random_arch"] = settings.arch or "resnet50"
        cfg = FinetuneConfig(iterations=settings.iterations, batch_size=settings.batch_size, crop_size=settings.crop_size,
                             max_lr=settings.lr, weight_decay=settings.weight_decay, freeze=settings.freeze,
                             encoder_lr_scale=settings.encoder_lr_scale, layer_decay=settings.layer_decay,
                             freeze_encoder_iterations=settings.freeze_encoder_iterations,
                             arch=state["random_arch"], base_width=settings.base_width, seed=settings.seed,
                             eval_at=tuple(steps), orthoplane=settings.orthoplane, device=settings.device, eval_batch=4)
        result = finetune(data, settings.encoder, cfg, on_result=on_result, setup=setup, **common)
        history = result.history
    else:
        from cemnet.benchmarks.instance import DEFAULT_ARCH, InstanceConfig, train_affinities

        if settings.dims not in ("3d", "2.5d"):
            raise RunError(f"--dims {settings.dims}: instance models are 3d or 2.5d (slice pairs)")
        mode = "3d" if settings.dims == "3d" else "2d"
        state["random_arch"] = settings.arch or DEFAULT_ARCH[mode]
        encoder = f"random:{state['random_arch']}" if settings.encoder == "random" else settings.encoder
        cfg_i = InstanceConfig(encoder=encoder, mode=mode, iterations=settings.iterations, batch_size=settings.batch_size,
                               crop=(settings.crop_z, settings.crop_size, settings.crop_size), max_lr=settings.lr,
                               weight_decay=settings.weight_decay, encoder_lr_scale=settings.encoder_lr_scale,
                               layer_decay=settings.layer_decay, freeze_encoder_iterations=settings.freeze_encoder_iterations, base_width=settings.base_width, seed=settings.seed,
                               device=settings.device)
        history = []
        train_affinities(data.train, cfg_i, evaluate=lambda m: validation_scores(m, data, state["norm"], settings, voxel),
                         eval_at=steps, on_result=on_result, history=history, setup=setup, **common)
    if earlier:
        resumed_at = min((int(r["step"]) for r in _read_rows(out / "metrics.csv") if str(r.get("step", "")).isdigit()),
                         default=settings.iterations + 1)
        # rows before the resumed step, and the evaluation logged at that step (not repeated)
        kept = [r for r in earlier if str(r.get("step", "")).isdigit() and (
            int(r["step"]) < resumed_at or (int(r["step"]) == resumed_at and not r.get("train/loss")))]
        _write_rows(kept + _read_rows(out / "metrics.csv"), out / "metrics.csv")
    best = state.get("best")
    run = {"settings": dataclasses.asdict(settings), "data": record, "history": history,
           "best": best, "model": str(out / "model.safetensors"), "last": str(out / "last.safetensors")}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str), encoding="utf-8")
    if settings.overlays or settings.overlay_images:
        run["overlays"] = str(write_overlays(out, data, settings))
    return run


def write_overlays(out: Path, data: BenchmarkData, settings: FinetuneSettings) -> Path | None:
    """``RUN/overlays.png``: the best model on the chosen (or most varied) validation images."""
    from cemnet.benchmarks.plots import plot_overlays
    from cemnet.benchmarks.sweep import _middle, choose_overlay_samples
    from cemnet.finetune.model_file import load_model

    model = load_model(out / "model.safetensors", device=settings.device)
    spec = model.cemnet_spec
    chosen = choose_overlay_samples(data.test, settings.overlays, list(settings.overlay_images) or None)
    images, truths, preds, titles = [], [], [], []
    for s in chosen:
        img, msk = _middle(s)
        if spec.task == "semantic":
            from cemnet.benchmarks.train import predict, to_labels

            pred = to_labels(predict(model, img, spec.norm, device=settings.device), len(data.classes), 2) > 0
        else:
            from cemnet.benchmarks.instance import predict_affinities

            z = s.image.shape[0] // 2
            lo = max(0, z - 1)
            _, fg = predict_affinities(model, s.image[lo: z + 1], spec.norm, settings.device)
            pred = fg[z - lo] >= 0.5
        images.append(img), truths.append(msk > 0), preds.append(pred), titles.append(s.name)
    return plot_overlays(images, truths, preds, out / "overlays.png", titles) if images else None
