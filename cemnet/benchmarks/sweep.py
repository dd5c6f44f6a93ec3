"""Label- and iteration-efficiency sweeps: every encoder x labelled fraction x seed.

One fine-tuning run per (encoder, fraction, seed) on :func:`~cemnet.benchmarks.datasets.label_fraction`
of the training pixels, evaluated on the full test set at the ``eval_at`` iterations and at the
end. Outputs in ``out_dir``:

* ``results.csv`` - one row per (encoder, fraction, seed, iteration) with every metric (written
  after each run, so a long sweep can be inspected while it runs);
* ``results.md`` - mean ± sample std (ddof=1) over seeds, with n, at the final iteration,
  encoders x fractions; runs with a (partly) frozen encoder are marked ``[frozen: ...]`` (and the
  CSV has a ``freeze`` column);
* ``label_efficiency.png`` - IoU vs labelled fraction (error bars: std over seeds);
* ``iteration_efficiency.png`` - IoU vs iteration (when more than one iteration was evaluated);
* ``overlays.png`` - test predictions of each encoder at the largest fraction (seed = first), on
  the test images the user names or else the most varied ones (greedy k-center on thumbnails),
  not the first neighbours.

``random`` encoders default to the architecture of the pretrained encoders of the same sweep
(like is compared with like); :func:`resolve_random_arch` warns when they differ.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cemnet.benchmarks.datasets import BenchmarkData, Sample, label_fraction
from cemnet.benchmarks.plots import plot_iteration_efficiency, plot_label_efficiency, plot_overlays
from cemnet.benchmarks.train import FinetuneConfig, finetune, predict, to_labels

__all__ = ["SweepOutputs", "run_sweep", "markdown_table", "write_csv", "read_csv", "mean_std", "resolve_random_arch",
           "choose_overlay_samples"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SweepOutputs:
    """Paths of what a sweep wrote, and its rows."""

    rows: list[dict[str, Any]]
    csv: Path
    table: Path
    label_plot: Path
    iteration_plot: Path | None
    overlays: Path | None


def _encoder_label(encoder: str) -> str:
    return Path(encoder).stem if os.sep in encoder or encoder.endswith((".safetensors", ".ckpt", ".pth", ".tar")) else encoder


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Rows -> CSV (columns: the union of keys, in first-seen order)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """CSV -> rows with numbers parsed."""
    def conv(v: str) -> Any:
        try:
            return float(v) if any(c in v for c in ".en") else int(v)
        except ValueError:
            return v
    with open(path, encoding="utf-8") as fh:
        return [{k: conv(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def _is_random(source: str) -> bool:
    return source == "random" or source.startswith("random:")


def encoder_arch(source: str) -> str | None:
    """The architecture of an encoder source (``random:ARCH`` -> ARCH, plain ``random`` -> None;
    pretrained: read from its weights)."""
    if _is_random(source):
        return source.partition(":")[2] or None
    from cemnet.weights.load import resolve_weights

    return resolve_weights(source, progress=False).meta.arch


def resolve_random_arch(encoders: Sequence[str], arch: str | None, fallback: str = "resnet50") -> str:
    """Architecture of plain ``random`` encoders: ``arch`` when given, else that of the pretrained
    encoders of the same run (compare like with like), else ``fallback``. Warns when a random
    encoder's architecture differs from a pretrained one's."""
    pretrained = [a for a in (encoder_arch(e) for e in encoders if not _is_random(e)) if a]
    chosen = arch or (pretrained[0] if pretrained else fallback)
    randoms = {e.partition(":")[2] or chosen for e in encoders if _is_random(e)}
    if randoms and pretrained and randoms != set(pretrained):
        log.warning("warning: random encoders (%s) and pretrained encoders (%s) differ in architecture: the "
                    "comparison mixes architecture and pretraining", ", ".join(sorted(randoms)),
                    ", ".join(sorted(set(pretrained))))
    return chosen


def final_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last evaluated iteration of every (encoder, freeze, fraction, seed) run."""
    last: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["encoder"], r.get("freeze", "none"), float(r["fraction"]), int(r["seed"]))
        if key not in last or int(r["iteration"]) >= int(last[key]["iteration"]):
            last[key] = r
    return list(last.values())


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (NaN for one value), n) over the finite values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def _run_label(row: dict[str, Any]) -> str:
    freeze = str(row.get("freeze", "none") or "none")
    return row["encoder"] if freeze == "none" else f"{row['encoder']} [frozen: {freeze}]"


def markdown_table(rows: Sequence[dict[str, Any]], metric: str = "iou", title: str = "") -> str:
    """Encoders (rows) x labelled fractions (columns): ``mean ± std (n=seeds)`` of ``metric`` at
    the final iteration (sample std, ddof=1; one seed shows no std). Frozen runs are marked."""
    fin = final_rows(rows)
    encs = list(dict.fromkeys(_run_label(r) for r in fin))
    fracs = sorted({float(r["fraction"]) for r in fin})
    lines = [f"### {title}" if title else "", f"{metric} at the final iteration, mean ± sample std (ddof=1) over seeds", "",
             "| encoder | " + " | ".join(f"{f * 100:g}% labels" for f in fracs) + " |",
             "|---|" + "---|" * len(fracs)]
    for e in encs:
        cells = []
        for f in fracs:
            mean, std, n = mean_std([float(r[metric]) for r in fin if _run_label(r) == e and float(r["fraction"]) == f])
            if n == 0:
                cells.append("-")
            else:
                cells.append(f"{mean:.3f} ± {std:.3f} (n={n})" if n > 1 else f"{mean:.3f} (n=1)")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def run_sweep(data: BenchmarkData, encoders: Sequence[str], fractions: Sequence[float], seeds: Sequence[int],
              cfg: FinetuneConfig, out_dir: str | os.PathLike, overlay_count: int = 2,
              overlay_images: Sequence[str] | None = None) -> SweepOutputs:
    """Run the sweep and write its CSV, Markdown table and figures (see the module docstring)."""
    cfg = dataclasses.replace(cfg, arch=resolve_random_arch(encoders, cfg.arch))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    overlay_models: dict[str, tuple[Any, tuple[float, float]]] = {}
    top = max(fractions)
    for enc in encoders:
        label = _encoder_label(enc)
        for frac in fractions:
            for seed in seeds:
                train = label_fraction(data.train, frac, seed, min_side=min(cfg.crop_size, 64))
                run_cfg = dataclasses.replace(cfg, seed=seed)
                log.info("%s: encoder %s, fraction %g, seed %d (%d training images)", data.name, label, frac, seed, len(train))
                result = finetune(data, enc, run_cfg, train=train)
                labelled = int(sum(s.mask.size for s in train))
                for h in result.history:
                    rows.append({"benchmark": data.name, "encoder": label, "freeze": cfg.freeze, "fraction": frac,
                                 "seed": seed, "labelled_pixels": labelled, **h})
                write_csv(rows, out / "results.csv")
                if frac == top and label not in overlay_models:
                    overlay_models[label] = (result.model, result.norm)
    table = out / "results.md"
    table.write_text(markdown_table(rows, title=f"{data.name}: label efficiency"), encoding="utf-8")
    label_plot = plot_label_efficiency(final_rows(rows), out / "label_efficiency.png", title=f"{data.name}: label efficiency")
    iteration_plot = None
    if len({int(r["iteration"]) for r in rows}) > 1:
        iteration_plot = plot_iteration_efficiency(rows, out / "iteration_efficiency.png", title=f"{data.name}: iteration efficiency")
    overlays = None
    if overlay_count or overlay_images:
        chosen = choose_overlay_samples(data.test, overlay_count, overlay_images)
        overlays = _overlays(data, overlay_models, chosen, out / "overlays.png")
    return SweepOutputs(rows, out / "results.csv", table, label_plot, iteration_plot, overlays)


def _middle(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """A 2D image and mask to show for a sample (the middle xy slice of a volume)."""
    if sample.image.ndim == 2:
        return sample.image, sample.mask
    z = sample.image.shape[0] // 2
    return sample.image[z], sample.mask[z]


def choose_overlay_samples(samples: Sequence[Sample], count: int, names: Sequence[str] | None = None) -> list[Sample]:
    """The samples to show: those named (names or indices) when given, else the ``count`` most
    varied ones - greedy k-center on 16x16 thumbnails plus the labelled fraction - instead of the
    first ones (often neighbouring, near-identical slices)."""
    if names:
        by_name = {s.name: s for s in samples}
        out = []
        for n in names:
            if n in by_name:
                out.append(by_name[n])
            elif n.isdigit() and int(n) < len(samples):
                out.append(samples[int(n)])
            else:
                raise ValueError(f"overlay image {n!r}: no test image of that name or index (have "
                                 f"{', '.join(s.name for s in samples[:8])}{', ...' if len(samples) > 8 else ''})")
        return out
    if count <= 0 or not samples:
        return []
    if count >= len(samples):
        return list(samples)
    from cemnet.transferability.active import select_kcenter

    feats = []
    for s in samples:
        img, msk = _middle(s)
        ys = np.linspace(0, img.shape[0] - 1, 16).astype(int)
        xs = np.linspace(0, img.shape[1] - 1, 16).astype(int)
        thumb = img[np.ix_(ys, xs)].astype(np.float64) / 255.0
        feats.append(np.concatenate([thumb.ravel(), [4.0 * float((msk > 0).mean())]]))
    return [samples[int(i)] for i in select_kcenter(np.stack(feats), count)]


def _overlays(data: BenchmarkData, models: dict[str, tuple[Any, tuple[float, float]]], chosen: Sequence[Sample],
              path: Path) -> Path | None:
    images, truths, preds, titles = [], [], [], []
    nc = len(data.classes)
    for label, (model, norm) in models.items():
        for s in chosen:
            img, msk = _middle(s)
            pred = to_labels(predict(model, img, norm), nc, 2)
            images.append(img), truths.append(msk > 0), preds.append(pred > 0), titles.append(f"{label} {s.name}")
    return plot_overlays(images, truths, preds, path, titles) if images else None
