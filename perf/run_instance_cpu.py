#!/usr/bin/env python
"""Trained-model neuron instance score on real data, short CPU run (issue 5).

NeuroProof 250^3 FIB-SEM (10 nm isotropic, dense neuron ids), the registry's ``z:0.8`` split:
train on z 0-199, evaluate on the held-out z 200-249 (optionally a centred xy window of it, to
keep the CPU post-processing short). For each affinity mode (``2d``: 2D encoder on (z-1, z)
slice pairs; ``3d``: 3D encoder) a random-init model is trained for ``--iterations`` steps,
its affinities go through the package's watershed + mean-affinity agglomeration, and VI
split/merge and adapted Rand are reported at every threshold and at the best one (lowest VI).
The same post-processing on ground-truth ("perfect") affinities and foreground gives the upper
bound of the pipeline on this volume.

A few minutes of CPU training is far from convergence: the trained scores show the path runs
end to end on real data, not what the model can reach. Example (the figures in
docs/benchmarks.md)::

    OMP_NUM_THREADS=2 python perf/run_instance_cpu.py --data-dir ../shared/data \\
        --modes 2d 3d --iterations 300 --out runs/instance_cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from cemnet.benchmarks.datasets import load_benchmark
from cemnet.benchmarks.instance import (
    InstanceConfig, affinities_from_labels, evaluate_affinities, predict_affinities, train_affinities,
)

THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)


def _centre_xy(vol: np.ndarray, size: int | None) -> np.ndarray:
    """Centred ``size`` x ``size`` xy window (all z), or the volume itself."""
    if not size or size >= min(vol.shape[1:]):
        return vol
    y0, x0 = (vol.shape[1] - size) // 2, (vol.shape[2] - size) // 2
    return vol[:, y0: y0 + size, x0: x0 + size]


def _best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["voi"])


def _fmt(name: str, rows: list[dict], extra: str = "") -> str:
    """Table row: the lowest-VI threshold, plus the lowest ARAND (often at another threshold)."""
    row, ar = _best(rows), min(rows, key=lambda r: r["arand"])
    return (f"| {name} | {row['threshold']:.2f} | {row['voi_split']:.3f} | {row['voi_merge']:.3f} | {row['voi']:.3f} "
            f"| {row['arand']:.3f} | {row['segments']} | {ar['arand']:.3f} @ {ar['threshold']:.2f} | {extra} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--modes", nargs="+", default=["2d", "3d"], choices=["2d", "3d"])
    p.add_argument("--encoder", default="random", help="'random' (per-mode default arch), 'random:ARCH' or a pretrained source")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, nargs=3, default=[16, 96, 96], help="z y x (the 2d mode uses 2 slices)")
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--test-xy", type=int, default=0, help="evaluate on a centred xy window of this size (0 = all 250)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/instance_cpu")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_benchmark("neuroproof", args.data_dir, "z:0.8")
    test = data.test[0]
    img, gt = _centre_xy(test.image, args.test_xy), _centre_xy(test.mask, args.test_xy)
    print(f"train {[s.image.shape for s in data.train]}, test {img.shape} ({len(np.unique(gt)) - 1} bodies), "
          f"torch threads {torch.get_num_threads()}")
    score_kw = {"voxel_size_nm": tuple(data.voxel_size_nm or (1.0, 1.0, 1.0))}
    results: dict[str, dict] = {"command": "python perf/run_instance_cpu.py " + " ".join(argv or __import__("sys").argv[1:]),
                                "test_shape": list(img.shape), "runs": {}}

    t0 = time.perf_counter()
    rows = evaluate_affinities(affinities_from_labels(gt), (gt > 0).astype(np.float32), gt, args.thresholds, **score_kw)
    results["runs"]["gt_affinities"] = {"rows": rows, "best": _best(rows), "eval_s": time.perf_counter() - t0}

    for mode in args.modes:
        cfg = InstanceConfig(encoder=args.encoder, mode=mode, iterations=args.iterations, batch_size=args.batch_size,
                             crop=tuple(args.crop), base_width=args.base_width, seed=args.seed)
        t0 = time.perf_counter()
        model, norm = train_affinities(data.train, cfg)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        affs, fg = predict_affinities(model, img, norm)
        rows = evaluate_affinities(affs, fg, gt, args.thresholds, **score_kw)
        results["runs"][f"trained_{mode}"] = {"rows": rows, "best": _best(rows), "train_s": train_s,
                                              "eval_s": time.perf_counter() - t0,
                                              "params": sum(q.numel() for q in model.parameters()),
                                              "config": {k: v for k, v in vars(cfg).items()}}

    lines = ["| affinities | best-VI threshold | VI split | VI merge | VI | ARAND | segments | best ARAND @ t | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        note = (f"train {r['train_s']:.0f} s, {r['params'] / 1e6:.1f} M params" if "train_s" in r else "upper bound")
        lines.append(_fmt(name, r["rows"], note))
    table = "\n".join(lines)
    print(table)
    (out / "instance_cpu.md").write_text(table + "\n", encoding="utf-8")
    (out / "instance_cpu.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(f"wrote {out / 'instance_cpu.json'}, {out / 'instance_cpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
