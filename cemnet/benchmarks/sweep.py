"""Label- and iteration-efficiency sweeps: every encoder x labelled fraction x seed.

One fine-tuning run per (encoder, fraction, seed) on :func:`~cemnet.benchmarks.datasets.label_fraction`
of the training pixels, evaluated on the full test set at the ``eval_at`` iterations and at the
end. Outputs in ``out_dir``:

* ``results.csv`` - one row per (encoder, fraction, seed, iteration) with every metric (written
  after each run, so a long sweep can be inspected while it runs);
* ``results.md`` - mean ± std over seeds at the final iteration, encoders x fractions;
* ``label_efficiency.png`` - IoU vs labelled fraction (error bars: std over seeds);
* ``iteration_efficiency.png`` - IoU vs iteration (when more than one iteration was evaluated);
* ``overlays.png`` - test predictions of each encoder at the largest fraction (seed = first).
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

from cemnet.benchmarks.datasets import BenchmarkData, label_fraction
from cemnet.benchmarks.plots import plot_iteration_efficiency, plot_label_efficiency, plot_overlays
from cemnet.benchmarks.train import FinetuneConfig, finetune, predict, to_labels

__all__ = ["SweepOutputs", "run_sweep", "markdown_table", "write_csv", "read_csv"]

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


def final_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last evaluated iteration of every (encoder, fraction, seed) run."""
    last: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["encoder"], float(r["fraction"]), int(r["seed"]))
        if key not in last or int(r["iteration"]) >= int(last[key]["iteration"]):
            last[key] = r
    return list(last.values())


def markdown_table(rows: Sequence[dict[str, Any]], metric: str = "iou", title: str = "") -> str:
    """Encoders (rows) x labelled fractions (columns): ``mean ± std (n seeds)`` of ``metric`` at
    the final iteration."""
    fin = final_rows(rows)
    encs = list(dict.fromkeys(r["encoder"] for r in fin))
    fracs = sorted({float(r["fraction"]) for r in fin})
    lines = [f"### {title}" if title else "", f"{metric} at the final iteration, mean ± std over seeds", "",
             "| encoder | " + " | ".join(f"{f * 100:g}% labels" for f in fracs) + " |",
             "|---|" + "---|" * len(fracs)]
    for e in encs:
        cells = []
        for f in fracs:
            v = np.array([float(r[metric]) for r in fin if r["encoder"] == e and float(r["fraction"]) == f])
            cells.append(f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f} (n={len(v)})" if len(v) else "-")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def run_sweep(data: BenchmarkData, encoders: Sequence[str], fractions: Sequence[float], seeds: Sequence[int],
              cfg: FinetuneConfig, out_dir: str | os.PathLike, overlay_count: int = 2) -> SweepOutputs:
    """Run the sweep and write its CSV, Markdown table and figures (see the module docstring)."""
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
                    rows.append({"benchmark": data.name, "encoder": label, "fraction": frac, "seed": seed,
                                 "labelled_pixels": labelled, **h})
                write_csv(rows, out / "results.csv")
                if frac == top and label not in overlay_models:
                    overlay_models[label] = (result.model, result.norm)
    table = out / "results.md"
    table.write_text(markdown_table(rows, title=f"{data.name}: label efficiency"), encoding="utf-8")
    label_plot = plot_label_efficiency(final_rows(rows), out / "label_efficiency.png", title=f"{data.name}: label efficiency")
    iteration_plot = None
    if len({int(r["iteration"]) for r in rows}) > 1:
        iteration_plot = plot_iteration_efficiency(rows, out / "iteration_efficiency.png", title=f"{data.name}: iteration efficiency")
    overlays = _overlays(data, overlay_models, out / "overlays.png", overlay_count) if overlay_count else None
    return SweepOutputs(rows, out / "results.csv", table, label_plot, iteration_plot, overlays)


def _overlays(data: BenchmarkData, models: dict[str, tuple[Any, tuple[float, float]]], path: Path, count: int) -> Path | None:
    images, truths, preds, titles = [], [], [], []
    nc = len(data.classes)
    for label, (model, norm) in models.items():
        for s in data.test[:count]:
            img = s.image if s.image.ndim == 2 else s.image[s.image.shape[0] // 2]
            msk = s.mask if s.mask.ndim == 2 else s.mask[s.mask.shape[0] // 2]
            pred = to_labels(predict(model, img, norm), nc, 2)
            images.append(img), truths.append(msk > 0), preds.append(pred > 0), titles.append(f"{label} {s.name}")
    return plot_overlays(images, truths, preds, path, titles) if images else None
