"""``cemnet benchmark probe ENCODER...``: compare frozen encoders with the representation probe.

Examples::

    cemnet benchmark probe random runs/mgmr/encoder.safetensors cem500k_mocov2 \\
        --benchmark cdeep3m_mito --data-dir ../shared/data --seeds 0 1 2 --out runs/probe_cdeep3m
    cemnet benchmark probe random:resnet50 enc.safetensors --images imgs/ --masks masks/ --split z:0.7

Every encoder is scored by :mod:`cemnet.benchmarks.probe` (dense linear probe IoU, kNN tile
retrieval accuracy) on tiles drawn with each seed; ``random`` encoders are also initialised with
it. Writes ``OUT/results.csv`` (one row per encoder x seed, written after every row) and
``OUT/results.md`` (mean ± sample std over seeds, n). An encoder that cannot be loaded is
reported and skipped; the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "build_parser", "load_probe_data", "load_frozen_encoder", "markdown_probe_table"]


def build_parser() -> argparse.ArgumentParser:
    from cemnet.benchmarks.probe import ProbeConfig

    d = ProbeConfig()
    p = argparse.ArgumentParser(prog="cemnet benchmark probe", description="Frozen-feature probe of encoders (no fine-tuning).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples::")[1])
    p.add_argument("encoders", nargs="+", metavar="ENCODER",
                   help="export files, checkpoints, run folders, registry names, 'random' or 'random:ARCH'")
    p.add_argument("--benchmark", help="a registered benchmark (with --data-dir)")
    p.add_argument("--data-dir", help="local copy of the benchmark (or a folder holding several, like ../shared/data)")
    p.add_argument("--images", help="folder of 2D images (custom probe set)")
    p.add_argument("--masks", help="folder of masks matched to --images by name")
    p.add_argument("--split", help="split rule (z:0.8, test:a,b, a published part); default: the benchmark's")
    p.add_argument("--class-value", type=int, default=d.foreground, help="mask value probed (default 1: the first class)")
    p.add_argument("--arch", default="resnet18", help="architecture of a plain 'random' encoder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tile", type=int, default=d.tile, help="tile side in pixels")
    p.add_argument("--train-tiles", type=int, default=d.train_tiles)
    p.add_argument("--test-tiles", type=int, default=d.test_tiles)
    p.add_argument("--max-stride", type=int, default=d.max_stride, help="use feature maps up to this stride")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="probe_out", help="output folder")
    return p


def load_probe_data(benchmark: str | None, data_dir: str | None, images: str | None, masks: str | None, split: str | None):
    """The :class:`~cemnet.benchmarks.datasets.BenchmarkData` a probe set is cut from."""
    from cemnet.benchmarks.datasets import load_benchmark, load_custom_2d

    if images and masks:
        return load_custom_2d(images, masks, split or "z:0.8", name=Path(images).name)
    if benchmark:
        return load_benchmark(benchmark, data_dir, split)
    raise ValueError("pass --benchmark NAME --data-dir DIR, or --images DIR --masks DIR")


def load_frozen_encoder(encoder: str, arch: str, seed: int) -> tuple[torch.nn.Module, tuple[float, float] | None]:
    """A ``features_only`` 2D encoder and its recorded (mean, std); ``random[:ARCH]`` is
    initialised from ``seed``. Same resolution as the fine-tuning benchmark (``build_model``)."""
    from cemnet.benchmarks.train import FinetuneConfig, build_model

    torch.manual_seed(seed)
    model, norm = build_model(encoder, 1, FinetuneConfig(arch=arch, base_width=16))
    return model.encoder, norm


def _label(encoder: str) -> str:
    from cemnet.benchmarks.sweep import _encoder_label

    return _encoder_label(encoder)


def markdown_probe_table(rows: list[dict[str, Any]], title: str) -> str:
    """Encoders x probe metrics: ``mean ± sample std (n=seeds)``."""
    from cemnet.benchmarks.probe import summarize_scores

    metrics = ("probe_iou", "probe_knn_acc", "probe_train_iou")
    lines = [f"### {title}", "", "frozen-feature probe, mean ± sample std over seeds", "",
             "| encoder | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for enc in dict.fromkeys(r["encoder"] for r in rows):
        mine = [r for r in rows if r["encoder"] == enc]
        cells = []
        for m in metrics:
            mean, std, n = summarize_scores(mine, m)
            cells.append(f"{mean:.3f} ± {std:.3f} (n={n})" if n > 1 else f"{mean:.3f} (n={n})")
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cemnet benchmark probe``; returns the exit status (1 if any encoder failed)."""
    from cemnet.benchmarks.probe import ProbeConfig, make_probe_set, probe_encoder
    from cemnet.benchmarks.sweep import write_csv

    args = build_parser().parse_args(argv)
    cfg = dataclasses.replace(ProbeConfig(), tile=args.tile, train_tiles=args.train_tiles, test_tiles=args.test_tiles,
                              max_stride=args.max_stride, foreground=args.class_value)
    try:
        data = load_probe_data(args.benchmark, args.data_dir, args.images, args.masks, args.split)
        probe_sets = {seed: make_probe_set(data, cfg, seed) for seed in args.seeds}
    except (OSError, ValueError, KeyError) as err:
        print(f"cemnet benchmark probe: {err}", file=sys.stderr)
        return 2
    print(probe_sets[args.seeds[0]].summary(), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    total = len(args.encoders) * len(args.seeds)
    for enc in args.encoders:
        label = _label(enc)
        pretrained = None
        for seed in args.seeds:
            t0 = time.perf_counter()
            try:
                is_random = enc == "random" or enc.startswith("random:")
                if is_random or pretrained is None:  # a file is loaded once; random is re-drawn per seed
                    pretrained = load_frozen_encoder(enc, args.arch, seed)
                module, norm = pretrained
                scores = probe_encoder(module.to(args.device), probe_sets[seed], cfg, norm=norm, device=args.device)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                print(f"cemnet benchmark probe: {enc}: {err} (skipped)", file=sys.stderr, flush=True)
                failed.append(enc)
                break
            rows.append({"benchmark": data.name, "encoder": label, "seed": seed, **scores,
                         "seconds": round(time.perf_counter() - t0, 2)})
            write_csv(rows, out / "results.csv")
            print(f"[{len(rows)}/{total}] {label} seed {seed}: IoU {scores['probe_iou']:.3f}, "
                  f"kNN {scores['probe_knn_acc']:.3f} ({rows[-1]['seconds']:.1f} s)", flush=True)
    if rows:
        table = markdown_probe_table(rows, f"{data.name}: representation probe")
        (out / "results.md").write_text(table, encoding="utf-8")
        print(table)
        print(f"wrote {out / 'results.csv'}, {out / 'results.md'}")
    if failed:
        print(f"cemnet benchmark probe: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
