"""``cemnet benchmark study``: curate -> pretrain -> export -> fine-tune pretrained vs random, on any target.

Examples::

    cemnet benchmark study --images imgs/ --masks masks/ --split test:img18,img19 --out runs/study_mine
    cemnet benchmark study --benchmark cdeep3m_mito --data-dir ../shared/data --out runs/study_cdeep3m \\
        --manifest experiments/study_sources_no_targets.yaml --pretrain-dir runs/study_pretrain
    cemnet benchmark study --benchmark vnc_mito --data-dir ../shared/data --out runs/study_vnc \\
        --manifest experiments/study_sources_no_targets.yaml --pretrain-dir runs/study_pretrain  # same pretraining

The target's images are never curated: every source of the manifest that overlaps them is left
out (and named). It prints an estimate of the time it will take on this machine first, shows
progress, and resumes: run the same command again after an interruption. Library:
:mod:`cemnet.benchmarks.study`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from cemnet.benchmarks.cli import _HelpFormatter, add_mask_options
    from cemnet.benchmarks.study import DEFAULT_MANIFEST, DEFAULT_RECIPE, StudyConfig

    d = StudyConfig(out=Path("."))
    p = argparse.ArgumentParser(prog="cemnet benchmark study", formatter_class=_HelpFormatter,
                                description="Does pretraining pay on this target? Pretrain without it, then fine-tune "
                                            "pretrained vs random at few labelled slices over paired seeds.",
                                epilog=__doc__.split("Examples::")[1])
    t = p.add_argument_group("target (custom images + masks, or a registered benchmark)")
    t.add_argument("--images", help="folder of 2D images")
    t.add_argument("--masks", help="folder of masks matched to --images by name")
    t.add_argument("--split", default=None, help="split rule (test:a,b, z:F); default z:0.8, or the benchmark's own")
    t.add_argument("--benchmark", help="a registered benchmark name (with --data-dir) instead of --images/--masks")
    t.add_argument("--data-dir", help="local copy of --benchmark (or a folder holding several, like ../shared/data)")
    add_mask_options(t)
    s = p.add_argument_group("pretraining")
    s.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="curation manifest of the pretraining sources")
    s.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="cemnet pretrain config")
    s.add_argument("--pretrain-dir", default=None,
                   help="folder of the sources/corpus/run/export stages (default OUT/pretrain); share it between studies")
    s.add_argument("--pretrain-steps", type=int, default=None, help="override the recipe's number of steps")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--slices", type=int, nargs="+", default=list(d.slices), help="labelled slices")
    f.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="paired seeds (slices and crops)")
    f.add_argument("--iterations", type=int, default=d.iterations, help="fine-tuning iterations per run")
    f.add_argument("--eval-at", type=int, nargs="*", default=list(d.eval_at), help="also evaluate at these iterations")
    f.add_argument("--batch-size", type=int, default=d.batch_size)
    f.add_argument("--crop-size", type=int, default=d.crop_size)
    f.add_argument("--base-width", type=int, default=d.base_width,
                   help="U-Net decoder width (= the recipe's decoder_width for the decoder to transfer)")
    f.add_argument("--lr", type=float, default=d.max_lr, help="OneCycle max learning rate")
    f.add_argument("--variants", nargs="+", default=list(d.variants), choices=list(d.variants),
                   help="what to fine-tune: random init, the pretrained encoder, encoder + MGMR decoder; 'random' "
                        "alone needs no pretraining (run the baseline while another process pretrains)")
    f.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--report-only", action="store_true",
                   help="write results.csv/.md/.png from the runs finished so far and stop (runs nothing)")
    p.add_argument("--no-estimate", action="store_true", help="skip the up-front time estimate (a few timed steps)")
    return p


def load_target(args: argparse.Namespace):
    """The :class:`~cemnet.benchmarks.study.StudyTarget` of parsed arguments."""
    from cemnet.benchmarks.cli import mask_semantics
    from cemnet.benchmarks.datasets import load_benchmark, load_custom_2d
    from cemnet.benchmarks.registry import get_benchmark
    from cemnet.benchmarks.study import StudyTarget

    if args.images and args.masks:
        data = load_custom_2d(args.images, args.masks, args.split or "z:0.8", name=Path(args.images).name,
                              semantics=mask_semantics(args))
        return StudyTarget(data, [Path(args.images), Path(args.masks)])
    if args.benchmark and args.data_dir:
        data = load_benchmark(args.benchmark, args.data_dir, args.split)
        return StudyTarget(data, [get_benchmark(args.benchmark).data_dir(args.data_dir)])
    raise ValueError("pass --images and --masks, or --benchmark and --data-dir")


def main(argv: list[str] | None = None) -> int:
    """Entry point; 2 with one message for bad input or a failed stage."""
    from cemnet.benchmarks.masks import MaskError
    from cemnet.benchmarks.study import StudyConfig, StudyError, report_existing, run_study, shipped

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("cemnet.benchmarks").setLevel(logging.WARNING)
    try:
        target = load_target(args)
        # a shipped config may be named (--recipe study_mgmr_resnet18_cpu)
        manifest, recipe = (Path(x) if Path(x).is_file() else shipped(x if x.endswith(".yaml") else x + ".yaml")
                            for x in (args.manifest, args.recipe))
        for what, path in (("manifest", manifest), ("recipe", recipe)):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: {what} not found")
        cfg = StudyConfig(out=Path(args.out), manifest=manifest, recipe=recipe,
                          pretrain_dir=Path(args.pretrain_dir) if args.pretrain_dir else None,
                          pretrain_steps=args.pretrain_steps, slices=tuple(args.slices), seeds=tuple(args.seeds),
                          iterations=args.iterations, eval_at=tuple(args.eval_at), batch_size=args.batch_size,
                          crop_size=args.crop_size, base_width=args.base_width, max_lr=args.lr, device=args.device,
                          variants=tuple(args.variants))
        print(target.data.summary(), flush=True)
        say = lambda m: print(m, flush=True)  # noqa: E731
        if args.report_only:
            results = report_existing(cfg, target.data, say)
        else:
            results = run_study(cfg, target, progress=say, estimate_first=not args.no_estimate)
    except (FileNotFoundError, NotADirectoryError, MaskError, ValueError, KeyError, StudyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"cemnet benchmark study: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cemnet benchmark study: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print((results.parent / "results.md").read_text(encoding="utf-8"))
    return 0
