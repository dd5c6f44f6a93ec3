"""Positive control of the representation probe: does it rank a trained encoder above a random one?

Trains timm's tiny ``test_resnet`` with supervision on the training slices of a benchmark (a U-Net
fine-tuned by the benchmark loop, ImageNet-free), exports its encoder as a timm state dict, and
runs ``cemnet benchmark probe`` on it and on the same architecture at random initialisation over
seeds (held-out tiles of the benchmark's test split). Prints the probe's results.md.

    python perf/probe_positive_control.py --benchmark vnc_mito --iterations 80 --out runs/probe_control
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cemnet.benchmarks.datasets import load_benchmark
from cemnet.benchmarks.train import FinetuneConfig, finetune
from cemnet.cli import main as cemnet_main

ARCH = "test_resnet"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", default="vnc_mito")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    p.add_argument("--iterations", type=int, default=80)
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    p.add_argument("--out", default="runs/probe_control")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_benchmark(args.benchmark, args.data_dir)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = FinetuneConfig(iterations=args.iterations, batch_size=8, crop_size=64, base_width=16, max_lr=0.01, arch=ARCH)
    encoder = finetune(data, f"random:{ARCH}", cfg).model.encoder
    print(f"supervised training: {args.iterations} iterations in {time.perf_counter() - t0:.0f} s")
    path = out / "trained.pth"
    torch.save({"state_dict": encoder.state_dict(), "arch": ARCH}, path)
    return cemnet_main(["benchmark", "probe", f"random:{ARCH}", str(path), "--benchmark", args.benchmark,
                        "--data-dir", args.data_dir, "--seeds", *args.seeds, "--tile", "96", "--train-tiles", "32",
                        "--test-tiles", "64", "--out", str(out)])


if __name__ == "__main__":
    raise SystemExit(main())
