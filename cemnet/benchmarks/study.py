"""``cemnet benchmark study``: does pretraining pay on this target? One command, measured.

Stages (each skipped when its output is complete, so an interrupted study resumes):

1. **sources**: the curation manifest (default ``experiments/shared_data_sources.yaml``) minus every
   source that overlaps the target's images (same file, a folder holding them or held by them, or
   a file with identical bytes) -> ``OUT/pretrain/sources.yaml``; the target is never curated.
2. **curate** that manifest -> ``OUT/pretrain/corpus`` (``curation.pipeline.curate``).
3. **pretrain** the recipe (a ``cemnet pretrain`` config; default
   ``experiments/study_mgmr_resnet18_cpu.yaml``) on that corpus -> ``OUT/pretrain/run`` (resumes
   from its last checkpoint).
4. **export** the encoder and, for MGMR, its decoder companion -> ``OUT/pretrain/encoder.safetensors``.
5. **fine-tune** at each number of labelled slices x seed: ``random``, ``pretrained`` (encoder)
   and ``pretrained+decoder`` (MGMR encoder and decoder). Runs of one (slices, seed) share the
   labelled slices and the crop sequence (paired). One CSV per run in ``OUT/runs/``.
6. **report**: ``OUT/results.csv`` (encoder, labelled_slices, seed, iteration, iou, ... one row per
   evaluated iteration), ``OUT/results.md`` (mean ± sample std at the final iteration, paired
   differences to random, iterations to reach random's final IoU) and ``OUT/iteration_efficiency.png``.

``--pretrain-dir`` shares stages 1-4 between studies (one pretraining for several targets); the
overlap check runs against every target, and a pretraining whose sources overlap is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cemnet.benchmarks.datasets import BenchmarkData, Sample
from cemnet.benchmarks.sweep import mean_std, read_csv, write_csv
from cemnet.benchmarks.train import FinetuneConfig, finetune
from cemnet.weights.download import sha256_file

__all__ = ["StudyConfig", "StudyTarget", "select_sources", "labelled_slices", "run_study", "summarise",
           "iterations_to_reach", "report_existing", "DEFAULT_MANIFEST", "DEFAULT_RECIPE", "StudyError"]

log = logging.getLogger(__name__)


def shipped(name: str) -> Path:
    """A file of ``experiments/`` (the checkout's, else the copy installed with the wheel)."""
    from cemnet.methods.config_paths import CHECKOUT_EXPERIMENTS, find_config

    return find_config(name) or CHECKOUT_EXPERIMENTS / name


DEFAULT_MANIFEST = shipped("shared_data_sources.yaml")
DEFAULT_RECIPE = shipped("study_mgmr_resnet18_cpu.yaml")
RANDOM, PRETRAINED, WITH_DECODER = "random", "pretrained", "pretrained+decoder"


class StudyError(RuntimeError):
    """A study cannot go on (bad target, every source overlapping, a failed stage): one message."""


@dataclasses.dataclass
class StudyTarget:
    """The labelled target: its loaded data and the paths of its images (for the overlap check)."""

    data: BenchmarkData
    paths: list[Path]


@dataclasses.dataclass
class StudyConfig:
    """Settings of a study; fine-tuning defaults are the small-scale recipe (CPU minutes per run)."""

    out: Path
    manifest: Path = DEFAULT_MANIFEST
    recipe: Path = DEFAULT_RECIPE
    pretrain_dir: Path | None = None  # default OUT/pretrain; share it between studies
    pretrain_steps: int | None = None  # override the recipe's length (trainer.max_steps)
    slices: tuple[int, ...] = (1, 3)
    seeds: tuple[int, ...] = (0, 1, 2)
    iterations: int = 300
    eval_at: tuple[int, ...] = (50, 100, 150, 200)
    batch_size: int = 4
    crop_size: int = 160
    base_width: int = 64  # = the recipe's decoder_width, so the MGMR decoder transfers
    max_lr: float = 3e-3
    weight_decay: float = 0.1
    device: str = "cpu"
    curate_workers: int = 1
    variants: tuple[str, ...] = (RANDOM, PRETRAINED, WITH_DECODER)  # random alone needs no pretraining

    @property
    def pretrain_root(self) -> Path:
        return Path(self.pretrain_dir) if self.pretrain_dir else Path(self.out) / "pretrain"


# --------------------------------------------------------------------------- sources


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file()]
    return []


def _overlap(source: Path, target: Path, target_digests: dict[int, dict[str, Path]]) -> str | None:
    """Why ``source`` overlaps ``target`` (a path inside the other, or a file with the same bytes), else None."""
    s, t = source.resolve(), target.resolve()
    if s == t or t in s.parents or s in t.parents:
        return f"{s} overlaps the target {t}"
    for f in _files_under(s):
        size = f.stat().st_size
        same = target_digests.get(size)
        if same:
            digest = sha256_file(f)
            if digest in same:
                return f"{f} has the same bytes as the target file {same[digest]}"
    return None


def target_digests(targets: Sequence[Path]) -> dict[int, dict[str, Path]]:
    """size -> {sha256: file} of every file under the target paths (for the same-bytes check)."""
    digests: dict[int, dict[str, Path]] = {}
    for t in targets:
        for f in _files_under(Path(t)):
            digests.setdefault(f.stat().st_size, {})[sha256_file(f)] = f
    return digests


def select_sources(manifest: str | os.PathLike, targets: Sequence[str | os.PathLike]) -> tuple[dict, list[tuple[str, str]]]:
    """The manifest without the sources that overlap any target path.

    Returns (manifest dict with absolute paths, [(excluded source name, reason)]). URLs are kept
    (a remote source is not a local target file).
    """
    from curation.manifest import is_url

    manifest = Path(manifest)
    try:
        doc = yaml.safe_load(manifest.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise StudyError(f"{manifest}: cannot read the manifest ({err})") from None
    sources = doc.get("sources") if isinstance(doc, dict) else None
    if not isinstance(sources, list) or not sources:
        raise StudyError(f"{manifest}: no 'sources:' list")
    target_paths = [Path(t) for t in targets]
    digests = target_digests(target_paths)
    kept, excluded = [], []
    for entry in sources:
        entry = dict(entry) if isinstance(entry, dict) else {"path": entry}
        raw = str(entry.get("path", ""))
        name = str(entry.get("name") or raw)
        if is_url(raw):
            kept.append(entry)
            continue
        path = Path(raw) if Path(raw).is_absolute() else (manifest.parent / raw)
        entry["path"] = str(path.resolve())
        reason = next((r for t in target_paths if (r := _overlap(path, t, digests))), None)
        if reason:
            excluded.append((name, reason))
        else:
            kept.append(entry)
    if not kept:
        raise StudyError(f"{manifest}: every source overlaps the target; nothing left to pretrain on")
    return {**doc, "sources": kept}, excluded


# --------------------------------------------------------------------------- labelled slices


def _as_slices(samples: Sequence[Sample]) -> list[Sample]:
    out: list[Sample] = []
    for s in samples:
        if s.image.ndim == 3:
            out.extend(Sample(s.image[z], s.mask[z], f"{s.name}/z{z}") for z in range(s.image.shape[0]))
        else:
            out.append(s)
    return out


def labelled_slices(samples: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """``count`` whole labelled 2D slices in a seeded order (3D samples are cut into xy slices);
    slices whose mask has no foreground are passed over while others remain, so one slice is
    never an empty one. The same (count, seed) gives the same slices for every encoder."""
    slices = _as_slices(samples)
    if not 0 < count <= len(slices):
        raise StudyError(f"--slices {count}: the training split has {len(slices)} slices")
    order = [slices[int(i)] for i in np.random.default_rng(seed).permutation(len(slices))]
    with_fg = [s for s in order if (s.mask > 0).any()]
    rest = [s for s in order if not (s.mask > 0).any()]
    return (with_fg + rest)[:count]


# --------------------------------------------------------------------------- stages


def _done(path: Path) -> bool:
    return path.is_file()


def _mark(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def recipe_steps(recipe: str | os.PathLike, override: int | None = None) -> int:
    """Optimizer steps a recipe runs: ``trainer.max_steps``, else max_epochs x steps per epoch."""
    if override:
        return int(override)
    cfg = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) or {}
    trainer = cfg.get("trainer") or {}
    if int(trainer.get("max_steps", -1) or -1) > 0:
        return int(trainer["max_steps"])
    data = ((cfg.get("data") or {}).get("init_args") or {})
    per_epoch = int(data.get("samples_per_epoch") or 0)
    batch = int(data.get("batch_size") or 1)
    if not per_epoch:
        raise StudyError(f"{recipe}: set trainer.max_steps or data.init_args.samples_per_epoch so the study knows its length")
    return int(trainer.get("max_epochs", 1)) * math.ceil(per_epoch / batch)


def _pretrain_argv(cfg: StudyConfig, corpus: Path, run_dir: Path, steps: int | None, extra: Sequence[str] = ()) -> list[str]:
    argv = ["fit", "--config", str(Path(cfg.recipe).resolve()), "--run_dir", str(run_dir),
            "--data.init_args.corpus", str(corpus), "--samples_every_n_steps", "0"]
    if steps:
        argv += ["--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1"]
    return argv + list(extra)


def _call(fn: Callable[[list[str]], int], argv: list[str], what: str) -> None:
    try:
        rc = fn(argv)
    except SystemExit as err:  # jsonargparse reports a bad config by exiting
        rc = err.code if isinstance(err.code, int) else 2
    if rc:
        raise StudyError(f"{what} failed (exit status {rc}); see the messages above")


def prepare_pretraining(cfg: StudyConfig, target: StudyTarget, progress: Callable[[str], None] = print,
                        until: str = "export") -> Path:
    """Stages 1-4 (``until="curate"``: 1-2 only); returns the exported encoder file (its decoder
    companion next to it for MGMR)."""
    from cemnet.weights.decoder import decoder_path, export_decoder
    from cemnet.weights.export import export_encoder

    root = cfg.pretrain_root
    root.mkdir(parents=True, exist_ok=True)
    sources_file, corpus, run_dir = root / "sources.yaml", root / "corpus", root / "run"
    encoder = root / "encoder.safetensors"
    # 1. sources: always re-checked against this target (a shared pretraining may serve another)
    doc, excluded = select_sources(cfg.manifest, target.paths)
    for name, why in excluded:
        progress(f"study: source {name} left out of pretraining: {why}")
    if sources_file.is_file():
        used = yaml.safe_load(sources_file.read_text(encoding="utf-8")) or {}
        from curation.manifest import is_url

        digests = target_digests(target.paths)
        for s in used.get("sources", []):
            p = str(s.get("path", "")) if isinstance(s, dict) else str(s)
            reason = None if is_url(p) else next((r for t in target.paths if (r := _overlap(Path(p), t, digests))), None)
            if reason:
                raise StudyError(f"{root}: its pretraining corpus was curated from a source that overlaps this "
                                 f"target ({reason}); use another --pretrain-dir")
        progress(f"study: sources: {sources_file} (kept from an earlier run)")
    else:
        tmp = sources_file.with_name("sources.yaml.tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        os.replace(tmp, sources_file)
        progress(f"study: {len(doc['sources'])} sources -> {sources_file}")
    # 2. curate
    if not _done(root / "curate.done"):
        from curation.cli import main as curate_main

        progress(f"study: curating -> {corpus}")
        argv = ["--manifest", str(sources_file), "--out", str(corpus), "--workers", str(cfg.curate_workers)]
        try:
            rc = curate_main(argv)
        except SystemExit as err:
            rc = err.code if isinstance(err.code, int) else 2
        if rc != 0 or not (corpus / "index.sqlite").is_file():
            raise StudyError(f"curating {sources_file} failed (exit status {rc}); see the messages above")
        _mark(root / "curate.done", {"corpus": str(corpus)})
    if until == "curate":
        return encoder
    # 3. pretrain (resumes from the newest intact checkpoint)
    planned = {"recipe": str(Path(cfg.recipe).resolve()), "steps": recipe_steps(cfg.recipe, cfg.pretrain_steps)}
    if _done(root / "pretrain.done"):
        done = json.loads((root / "pretrain.done").read_text(encoding="utf-8"))
        if any(k in done and done[k] != v for k, v in planned.items()):
            raise StudyError(f"{root}: pretrained with {done.get('recipe')} for {done.get('steps')} steps, not "
                             f"{planned['recipe']} for {planned['steps']}; use another --pretrain-dir")
    else:
        from cemnet.methods.cli import main as pretrain_main

        progress(f"study: pretraining {Path(cfg.recipe).name} for {recipe_steps(cfg.recipe, cfg.pretrain_steps)} steps -> {run_dir}")
        _call(pretrain_main, _pretrain_argv(cfg, corpus, run_dir, cfg.pretrain_steps, ["--resume"]), "pretraining")
        _mark(root / "pretrain.done", {"run_dir": str(run_dir), **planned})
    # 4. export
    if not _done(root / "export.done"):
        export_encoder(run_dir, encoder)
        dec = export_decoder(run_dir, decoder_path(encoder))
        progress(f"study: exported {encoder}" + (f" and {dec}" if dec else " (no decoder: not an MGMR run)"))
        _mark(root / "export.done", {"encoder": str(encoder), "decoder": str(dec) if dec else None})
    return encoder


def _run_file(cfg: StudyConfig, encoder: str, slices: int, seed: int) -> Path:
    return Path(cfg.out) / "runs" / f"{encoder.replace('+', '_')}-slices{slices}-seed{seed}.csv"


def finetune_run(cfg: StudyConfig, data: BenchmarkData, encoder_file: Path | None, variant: str, slices: int,
                 seed: int, arch: str | None) -> list[dict[str, Any]]:
    """One fine-tuning run of a study (``variant`` random / pretrained / pretrained+decoder); its
    rows are kept in ``OUT/runs/`` so a resumed study skips it."""
    path = _run_file(cfg, variant, slices, seed)
    if path.is_file():
        return read_csv(path)
    train = labelled_slices(data.train, slices, seed)
    ft = FinetuneConfig(iterations=cfg.iterations, batch_size=cfg.batch_size, crop_size=cfg.crop_size,
                        max_lr=cfg.max_lr, weight_decay=cfg.weight_decay, arch=arch, base_width=cfg.base_width,
                        seed=seed, eval_at=tuple(i for i in cfg.eval_at if 0 < i < cfg.iterations), device=cfg.device)
    setup: Callable[[Any, tuple[float, float]], None] | None = None
    if variant == WITH_DECODER:
        from cemnet.weights.decoder import decoder_path, load_decoder

        def load_pretrained_decoder(model: Any, norm: tuple[float, float]) -> None:
            report = load_decoder(model.decoder, decoder_path(encoder_file))
            if not report.loaded:
                raise StudyError(report.describe() + f"; the recipe's decoder_width must equal --base-width {cfg.base_width}")
            if report.skipped:
                log.info("study: %s", report.describe())
        setup = load_pretrained_decoder
    source = f"random:{arch}" if variant == RANDOM else str(encoder_file)
    result = finetune(data, source, ft, train=train, setup=setup)
    rows = [{"encoder": variant, "labelled_slices": slices, "seed": seed,
             "train_slices": ";".join(s.name for s in train), **h} for h in result.history]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_csv(rows, tmp)
    os.replace(tmp, path)
    return rows


# --------------------------------------------------------------------------- estimate


def _time_finetune_step(cfg: StudyConfig, data: BenchmarkData, encoder: str, steps: int = 5) -> float:
    """Seconds per fine-tuning iteration, from a few timed steps (the first and the last, which
    evaluates, are not counted; the evaluation is on one test image only)."""
    stamps: list[float] = []
    ft = FinetuneConfig(iterations=steps, batch_size=cfg.batch_size, crop_size=cfg.crop_size, arch=None,
                        base_width=cfg.base_width, seed=0, device=cfg.device)
    one_test = dataclasses.replace(data, test=data.test[:1])
    finetune(one_test, encoder, ft, train=labelled_slices(data.train, 1, 0),
             callback=lambda i, loss: stamps.append(time.perf_counter()))
    return (stamps[-2] - stamps[0]) / max(1, len(stamps) - 2)


def _time_evaluation(cfg: StudyConfig, data: BenchmarkData) -> float:
    """Seconds of one test-set evaluation (random U-Net)."""
    from cemnet.benchmarks.train import build_model, dataset_norm, evaluate

    ft = FinetuneConfig(arch="resnet18", base_width=cfg.base_width, device=cfg.device)
    model, _ = build_model("random:resnet18", 1 if len(data.classes) == 1 else len(data.classes) + 1, ft)
    t0 = time.perf_counter()
    evaluate(model.to(cfg.device), data, dataset_norm(data.train), ft)
    return time.perf_counter() - t0


def _time_pretrain_step(cfg: StudyConfig, corpus: Path) -> float:
    """Seconds per pretraining step of the recipe, from a short run in a scratch folder (its
    images/s; loader start-up is not counted)."""
    from cemnet.methods.cli import main as pretrain_main

    with tempfile.TemporaryDirectory(prefix="cemnet-study-timing-") as tmp:
        argv = _pretrain_argv(cfg, corpus, Path(tmp) / "run", 5, ["--trainer.log_every_n_steps", "1",
                              "--checkpoint_every_n_steps", "1000", "--trainer.enable_progress_bar", "false"])
        _call(pretrain_main, argv, "timing the pretraining")
        rows = read_csv(Path(tmp) / "run" / "csv" / "metrics.csv")
    rates = [float(r["train/images_per_s"]) for r in rows if str(r.get("train/images_per_s", "")) not in ("", "nan")]
    cfg_doc = yaml.safe_load(Path(cfg.recipe).read_text(encoding="utf-8")) or {}
    batch = int((((cfg_doc.get("data") or {}).get("init_args") or {}).get("batch_size")) or 1)
    if not rates:
        raise StudyError("timing the pretraining: no images/s logged")
    return batch / float(np.median(rates))


def estimate(cfg: StudyConfig, data: BenchmarkData, corpus: Path | None, encoder: Path | None, arch: str) -> dict[str, float]:
    """Seconds each remaining stage will take on this machine, from a few timed steps."""
    out: dict[str, float] = {}
    root = cfg.pretrain_root
    if corpus is not None and not _done(root / "pretrain.done"):
        out["pretraining"] = _time_pretrain_step(cfg, corpus) * recipe_steps(cfg.recipe, cfg.pretrain_steps)
    todo = [(v, k, s) for v, k, s in _plan(cfg, encoder) if not _run_file(cfg, v, k, s).is_file()]
    if todo:
        step = _time_finetune_step(cfg, data, f"random:{arch}")
        evals = len({i for i in cfg.eval_at if 0 < i < cfg.iterations}) + 1
        out["fine-tuning"] = len(todo) * (cfg.iterations * step + evals * _time_evaluation(cfg, data))
    return out


def _plan(cfg: StudyConfig, encoder: Path | None) -> list[tuple[str, int, int]]:
    from cemnet.weights.decoder import decoder_path

    variants = [v for v in cfg.variants if v != WITH_DECODER]
    if WITH_DECODER in cfg.variants and (encoder is None or decoder_path(encoder).is_file()):
        variants.append(WITH_DECODER)  # unknown until exported: counted, skipped later if no decoder
    return [(v, k, s) for k in cfg.slices for s in cfg.seeds for v in variants]


# --------------------------------------------------------------------------- report


def iterations_to_reach(curve: Sequence[tuple[int, float]], level: float) -> int | None:
    """First evaluated iteration whose IoU is >= ``level``, or None."""
    return next((int(i) for i, v in sorted(curve) if np.isfinite(v) and v >= level), None)


def summarise(rows: Sequence[dict[str, Any]]) -> str:
    """results.md: per labelled-slice count, mean ± sample std (ddof=1) of the final IoU, the
    paired difference to ``random`` (same slices and seed) and the iterations to reach random's
    final IoU of the same pair."""
    lines = ["# Study results", "",
             "IoU at the final fine-tuning iteration, mean ± sample std (ddof=1) over seeds; paired difference = "
             "encoder - random on the same labelled slices and seed; 'reaches random's final IoU at' = first "
             "evaluated iteration with IoU >= that of random at its last iteration (per seed).", ""]
    final: dict[tuple[str, int, int], dict[str, Any]] = {}
    curves: dict[tuple[str, int, int], list[tuple[int, float]]] = {}
    for r in rows:
        key = (str(r["encoder"]), int(r["labelled_slices"]), int(r["seed"]))
        curves.setdefault(key, []).append((int(r["iteration"]), float(r["iou"])))
        if key not in final or int(r["iteration"]) >= int(final[key]["iteration"]):
            final[key] = r
    encoders = list(dict.fromkeys(k[0] for k in final))
    for k in sorted({k[1] for k in final}):
        last_it = max(int(r["iteration"]) for key, r in final.items() if key[1] == k)
        lines += [f"## {k} labelled slice{'s' if k > 1 else ''} ({last_it} iterations)", "",
                  "| encoder | IoU | paired difference to random | wins | reaches random's final IoU at |",
                  "|---|---|---|---|---|"]
        for e in encoders:
            seeds = sorted(s for (ee, kk, s) in final if ee == e and kk == k)
            if not seeds:
                continue
            ious = [float(final[(e, k, s)]["iou"]) for s in seeds]
            m, sd, n = mean_std(ious)
            cell = f"{m:.3f} ± {sd:.3f} (n={n})" if n > 1 else f"{m:.3f} (n={n})"
            paired = [(s, float(final[(e, k, s)]["iou"]) - float(final[(RANDOM, k, s)]["iou"]))
                      for s in seeds if (RANDOM, k, s) in final]
            if e == RANDOM or not paired:
                lines.append(f"| {e} | {cell} | - | - | - |")
                continue
            dm, dsd, dn = mean_std([d for _, d in paired])
            diff = f"{dm:+.3f} ± {dsd:.3f} (n={dn})" if dn > 1 else f"{dm:+.3f} (n={dn})"
            wins = f"{sum(d > 0 for _, d in paired)}/{len(paired)}"
            reach = []
            for s, _ in paired:
                it = iterations_to_reach(curves[(e, k, s)], float(final[(RANDOM, k, s)]["iou"]))
                reach.append("never" if it is None else str(it))
            lines.append(f"| {e} | {cell} | {diff} | {wins} | {', '.join(reach)} (seeds {', '.join(map(str, [s for s, _ in paired]))}) |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(rows: Sequence[dict[str, Any]], out: str | os.PathLike, title: str = "") -> Path:
    """IoU vs fine-tuning iteration, one panel per labelled-slice count, mean ± std over seeds."""
    from cemnet.benchmarks.plots import _group, _plt

    plt = _plt()
    counts = sorted({int(r["labelled_slices"]) for r in rows})
    fig, axes = plt.subplots(1, len(counts), figsize=(4.6 * len(counts), 3.6), squeeze=False)
    for ax, k in zip(axes[0], counts):
        for enc, (xs, mean, std) in _group([r for r in rows if int(r["labelled_slices"]) == k], "iteration", "iou").items():
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=enc)
        ax.set_title(f"{title} {k} labelled slice{'s' if k > 1 else ''}".strip())
        ax.set_xlabel("fine-tuning iteration")
        ax.set_ylabel("IoU")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


# --------------------------------------------------------------------------- the study


def _fmt(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def report_existing(cfg: StudyConfig, data: BenchmarkData, progress: Callable[[str], None] = print) -> Path:
    """Write the report from the runs finished so far (``OUT/runs/*.csv``), running nothing: for a
    look at a study while it runs, or to join studies run in several processes."""
    rows = [r for p in sorted((Path(cfg.out) / "runs").glob("*.csv")) for r in read_csv(p)]
    if not rows:
        raise StudyError(f"{Path(cfg.out) / 'runs'}: no finished fine-tuning run yet")
    return _write_report(cfg, data, rows, progress)


def run_study(cfg: StudyConfig, target: StudyTarget, progress: Callable[[str], None] = print,
              estimate_first: bool = True) -> Path:
    """Run (or resume) a study; returns ``OUT/results.csv``."""
    from cemnet.benchmarks.sweep import encoder_arch

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = target.data
    if len(data.classes) != 1:
        raise StudyError(f"{data.name}: the study scores one foreground class; the masks give {list(data.classes)}")
    root = cfg.pretrain_root
    corpus_ready = _done(root / "curate.done")
    unknown = set(cfg.variants) - {RANDOM, PRETRAINED, WITH_DECODER}
    if unknown:
        raise StudyError(f"unknown variants {sorted(unknown)}: use {RANDOM}, {PRETRAINED}, {WITH_DECODER}")
    if set(cfg.variants) == {RANDOM}:  # the baseline alone (e.g. while another process pretrains)
        return _finetune_and_report(cfg, data, None, _recipe_arch(cfg.recipe), [RANDOM], progress)
    if estimate_first:
        # pretraining is timed on the corpus, so curate first (seconds to minutes) when needed
        encoder = root / "encoder.safetensors" if _done(root / "export.done") else None
        if not corpus_ready and not _done(root / "export.done"):
            progress("study: curating first, to time the pretraining on its corpus")
            prepare_pretraining(cfg, target, progress, until="curate")
        arch = encoder_arch(str(encoder)) if encoder else _recipe_arch(cfg.recipe)
        est = estimate(cfg, data, root / "corpus" if not encoder else None, encoder, arch)
        total = sum(est.values())
        parts = ", ".join(f"{k} {_fmt(v)}" for k, v in est.items()) or "nothing left to run"
        progress(f"study: estimated time on this machine: {_fmt(total)} ({parts}; from a few timed steps)")
    encoder = prepare_pretraining(cfg, target, progress)
    arch = encoder_arch(str(encoder)) or _recipe_arch(cfg.recipe)
    from cemnet.weights.decoder import decoder_path

    variants = [v for v in cfg.variants if v != WITH_DECODER or decoder_path(encoder).is_file()]
    return _finetune_and_report(cfg, data, encoder, arch, variants, progress)


def _finetune_and_report(cfg: StudyConfig, data: BenchmarkData, encoder: Path | None, arch: str, variants: Sequence[str],
                         progress: Callable[[str], None]) -> Path:
    plan = [(v, k, s) for k in cfg.slices for s in cfg.seeds for v in variants]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for n, (variant, k, seed) in enumerate(plan, 1):
        cached = _run_file(cfg, variant, k, seed).is_file()
        run_rows = finetune_run(cfg, data, encoder, variant, k, seed, arch)
        rows += run_rows
        last = run_rows[-1]
        elapsed = time.perf_counter() - t0
        progress(f"study: [{n}/{len(plan)}] {variant}, {k} slice(s), seed {seed}: IoU {float(last['iou']):.3f}"
                 + (" (done before)" if cached else f" ({_fmt(elapsed)} so far)"))
    return _write_report(cfg, data, rows, progress)


def _write_report(cfg: StudyConfig, data: BenchmarkData, rows: list[dict[str, Any]], progress: Callable[[str], None]) -> Path:
    out = Path(cfg.out)
    results = out / "results.csv"
    write_csv([{"benchmark": data.name, **r} for r in rows], results)
    (out / "results.md").write_text(summarise(rows), encoding="utf-8")
    plot_curves(rows, out / "iteration_efficiency.png", title=data.name)
    progress(f"study: wrote {results}, {out / 'results.md'}, {out / 'iteration_efficiency.png'}")
    return results


def _recipe_arch(recipe: str | os.PathLike) -> str:
    cfg = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) or {}
    return str((((cfg.get("model") or {}).get("init_args") or {}).get("arch")) or "resnet18")
