"""What the run-checkpoint safeguards cost: atomic write (temp file + fsync + rename) and the
divergence guard's NaN/inf scan of every parameter and buffer, per checkpoint.

    python perf/bench_checkpoint_io.py --arch resnet50 --rounds 3

Builds a real MoCoV2 module (both encoders, heads, queue) plus SGD momentum buffers, i.e. what a
``last.ckpt`` of the CEM500K recipe holds, and times Lightning's plain ``TorchCheckpointIO`` against
cemnet's ``AtomicCheckpointIO``, and ``nonfinite_tensors`` over the state dict. Medians of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning_fabric.plugins import TorchCheckpointIO

from cemnet.methods.checkpointing import AtomicCheckpointIO
from cemnet.methods.mocov2 import MoCoV2
from cemnet.weights.checkpoint_io import nonfinite_tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50", help="timm architecture of the MoCoV2 encoders")
    ap.add_argument("--queue", type=int, default=65536, help="MoCo queue size")
    ap.add_argument("--rounds", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--dir", default=None, help="folder to write into (default: a temporary one)")
    args = ap.parse_args()

    model = MoCoV2(arch=args.arch, queue_size=args.queue)
    state = model.state_dict()
    momentum = {k: torch.zeros_like(v) for k, v in state.items() if v.is_floating_point() and not k.startswith("memory_bank")}
    checkpoint = {"state_dict": state, "optimizer_states": [{"state": momentum}], "global_step": 1}
    size_mb = sum(v.numel() * v.element_size() for v in [*state.values(), *momentum.values()]) / 2**20

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        times: dict[str, list[float]] = {"plain TorchCheckpointIO": [], "AtomicCheckpointIO (tmp + fsync + rename)": [],
                                          "NaN/inf scan of the state dict": []}
        for r in range(args.rounds):
            for name, io in (("plain TorchCheckpointIO", TorchCheckpointIO()),
                             ("AtomicCheckpointIO (tmp + fsync + rename)", AtomicCheckpointIO())):
                t0 = time.perf_counter()
                io.save_checkpoint(checkpoint, Path(tmp) / f"{r}-{len(name)}.ckpt")
                times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert not nonfinite_tensors(state)
            times["NaN/inf scan of the state dict"].append(time.perf_counter() - t0)
    print(f"{args.arch} MoCoV2 checkpoint, {size_mb:.0f} MiB of tensors, median of {args.rounds}:")
    for name, ts in times.items():
        print(f"  {name:<45} {statistics.median(ts):7.3f} s")


if __name__ == "__main__":
    main()
