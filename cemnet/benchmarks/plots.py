"""Figures: label efficiency, iteration efficiency and prediction overlays (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_label_efficiency", "plot_iteration_efficiency", "plot_overlays"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: benchmarks run on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def _group(rows: Sequence[dict], x: str, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """encoder -> (x values, mean over seeds, sample std over seeds)."""
    out = {}
    for enc in dict.fromkeys(r["encoder"] for r in rows):
        xs = sorted({float(r[x]) for r in rows if r["encoder"] == enc})
        vals = [[float(r[metric]) for r in rows if r["encoder"] == enc and float(r[x]) == v] for v in xs]
        # sample std (ddof=1), as in results.md; one seed draws no error bar
        stds = [float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else 0.0 for v in map(np.asarray, vals)]
        out[enc] = (np.array(xs), np.array([np.nanmean(v) for v in vals]), np.array(stds))
    return out


def plot_label_efficiency(rows: Sequence[dict], out: str | os.PathLike, metric: str = "iou", title: str = "") -> Path:
    """IoU vs labelled fraction, one line per encoder, error bars = std over seeds (final iteration rows)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for enc, (xs, mean, std) in _group(rows, "fraction", metric).items():
        ax.errorbar(xs * 100, mean, yerr=std, marker="o", capsize=3, label=enc)
    ax.set_xscale("log")
    return _save_curves(plt, fig, ax, "labelled training pixels (%)", metric, title or "label efficiency", out, 8)


def plot_iteration_efficiency(rows: Sequence[dict], out: str | os.PathLike, metric: str = "iou", title: str = "") -> Path:
    """IoU vs fine-tuning iteration, one line per (encoder, fraction), error bars over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for frac in sorted({float(r["fraction"]) for r in rows}):
        sub = [r for r in rows if float(r["fraction"]) == frac]
        for enc, (xs, mean, std) in _group(sub, "iteration", metric).items():
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=f"{enc}, {frac:g}")
    return _save_curves(plt, fig, ax, "fine-tuning iteration", metric, title or "iteration efficiency", out, 7)


def _save_curves(plt: Any, fig: Any, ax: Any, xlabel: str, metric: str, title: str, out: str | os.PathLike,
                 legend_size: int) -> Path:
    """Label, grid and legend a curves plot, write it as a PNG and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric.upper() if metric == "iou" else metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def plot_overlays(images: Sequence[np.ndarray], truths: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                  out: str | os.PathLike, titles: Sequence[str] | None = None) -> Path:
    """One row per image: the EM image, truth overlay (green) and prediction overlay (magenta)."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for i, (img, gt, pr) in enumerate(zip(images, truths, preds)):
        for j, (over, colour, name) in enumerate(((None, None, "image"), (gt, (0, 1, 0), "truth"), (pr, (1, 0, 1), "prediction"))):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray")
            if over is not None:
                rgba = np.zeros((*over.shape, 4))
                rgba[..., :3] = colour
                rgba[..., 3] = 0.45 * (over > 0)
                ax.imshow(rgba)
            ax.set_title(f"{titles[i]}: {name}" if titles else name, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
