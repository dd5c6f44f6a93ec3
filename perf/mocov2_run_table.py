"""Compare short MoCoV2 runs side by side from their ``csv/metrics.csv`` (issue 14).

Each run is a ``cemnet pretrain`` run folder; the table gives, at the steps asked for (the
nearest logged step at or before each), InfoNCE, top-1, the mean positive / negative cosine,
``queue_key_cos`` and ``queue_key_rank`` (when logged), plus the probe scores logged by
:class:`cemnet.methods.probe_callback.RepresentationProbe`. Markdown on stdout, for BENCHMARKS.md::

    python perf/mocov2_run_table.py runs/m_base runs/m_lrmoco --steps 14 29 59
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

COLUMNS = [("train/loss", "InfoNCE"), ("train/acc_top1", "top-1"), ("train/logit_pos", "cos(q,k+)"),
           ("train/logit_neg", "cos(q,queue)"), ("train/queue_key_cos", "key_cos"), ("train/queue_key_rank", "key_rank")]


def read_metrics(run: Path) -> tuple[dict[int, dict[str, float]], list[dict[str, float]]]:
    """(training metrics by step, probe rows) of one run folder."""
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"{run}: no csv/metrics.csv (not a cemnet pretrain run, or nothing logged yet)")
    train: dict[int, dict[str, float]] = {}
    probes: list[dict[str, float]] = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            vals = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "epoch"}
            if "step" not in vals:
                continue
            if "probe_iou" in vals:
                probes.append(vals)
            if "train/loss" in vals and "train/queue_key_cos" in vals:
                train.setdefault(int(vals["step"]), {}).update(vals)
    return train, probes


def at_or_before(train: dict[int, dict[str, float]], step: int) -> tuple[int, dict[str, float]] | None:
    done = [s for s in train if s <= step]
    return (max(done), train[max(done)]) if done else None


def table(runs: list[Path], steps: list[int]) -> str:
    lines = ["| run | step | " + " | ".join(name for _, name in COLUMNS) + " | probe_iou (step) |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for run in runs:
        train, probes = read_metrics(run)
        shown: set[int] = set()
        for step in steps:
            hit = at_or_before(train, step)
            if hit is None or hit[0] in shown:
                continue
            s, vals = hit
            shown.add(s)
            cells = [f"{vals[k]:.3f}" if k in vals and math.isfinite(vals[k]) else "-" for k, _ in COLUMNS]
            probe = [p for p in probes if p["step"] <= s]
            pcell = f"{probe[-1]['probe_iou']:.3f} ({int(probe[-1]['step'])})" if probe else "-"
            lines.append(f"| {run.name} | {s} | " + " | ".join(cells) + f" | {pcell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="cemnet pretrain run folders")
    p.add_argument("--steps", type=int, nargs="+", default=[30, 60, 100, 200, 300], help="steps to tabulate")
    args = p.parse_args(argv)
    print(table(args.runs, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
