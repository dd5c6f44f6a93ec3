"""CPU label-efficiency benchmark: ISBI 2012 + CDeep3M, pretrained vs random encoders.

Full setting (hours on CPU)::

    python perf/run_label_efficiency.py --encoders runs/mocov2/encoder.safetensors random \\
        --fractions 0.05 0.1 0.2 1.0 --seeds 0 1 2 --iterations 1000 --out docs/figures/label_efficiency

Reduced setting (minutes)::

    python perf/run_label_efficiency.py --reduced --encoders ENC random

Each benchmark gets a sub-folder with results.csv, results.md, label_efficiency.png,
iteration_efficiency.png and overlays.png (see ``cemnet.benchmarks.sweep``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from cemnet.benchmarks.datasets import load_benchmark
from cemnet.benchmarks.sweep import run_sweep
from cemnet.benchmarks.train import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("CEMNET_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--benchmarks", nargs="+", default=["isbi2012", "cdeep3m_mito"])
    p.add_argument("--encoders", nargs="+", required=True, help="pretrained encoder(s) and 'random'")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--eval-at", type=int, nargs="*", default=[100, 250, 500])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--arch", default="resnet50", help="architecture of 'random'")
    p.add_argument("--reduced", action="store_true", help="CPU smoke setting: 150 iterations, batch 4, crop 128, 2 test images")
    p.add_argument("--out", default=str(ROOT / "docs" / "figures" / "label_efficiency"))
    args = p.parse_args(argv)
    cfg = FinetuneConfig(iterations=args.iterations, batch_size=args.batch_size, crop_size=args.crop_size, arch=args.arch,
                         eval_at=tuple(args.eval_at))
    if args.reduced:
        cfg = dataclasses.replace(cfg, iterations=150, batch_size=4, crop_size=128, base_width=64, eval_at=(50, 100))
    for name in args.benchmarks:
        data = load_benchmark(name, args.data_dir)
        if args.reduced:
            data.test = data.test[:2]
        print(data.summary(), flush=True)
        res = run_sweep(data, args.encoders, args.fractions, args.seeds, cfg, Path(args.out) / name)
        print(res.table.read_text(encoding="utf-8"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
