"""``cemnet benchmark``: fine-tune encoders on a registered or custom benchmark and report.

Examples::

    cemnet benchmark list
    cemnet benchmark info isbi2012
    cemnet benchmark isbi2012 --data-dir ../shared/data --encoders enc.safetensors random \\
        --train-fraction 0.05 0.1 0.2 0.5 1.0 --seeds 0 1 2 --out runs/bench_isbi
    cemnet benchmark custom --images imgs/ --masks masks/ --split z:0.8 --encoders random
    cemnet benchmark custom --image raw.h5 --labels seg.h5 --split z:0.75 --encoders random
    cemnet benchmark gala --data-dir ../shared/data --iterations 200      # instance (affinities)
    cemnet benchmark neuroproof --data-dir ../shared/data --encoders random --affinity-mode 2d
    cemnet benchmark probe random enc.safetensors --benchmark cdeep3m_mito --data-dir ../shared/data
    cemnet benchmark download lucchi_pp --data-dir data/lucchi_pp
    cemnet benchmark study --benchmark cdeep3m_mito --data-dir ../shared/data --out runs/study_cdeep3m
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any
from pathlib import Path


__all__ = ["main", "build_parser"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option with its default; descriptions and epilogs kept as written."""


def add_encoder_lever_options(g: argparse._ArgumentGroup) -> None:
    """The pretrained-encoder fine-tuning levers (``cemnet finetune`` and ``cemnet benchmark``
    share them; :class:`cemnet.finetune.engine.FinetuneModule` implements them). All off by default."""
    g.add_argument("--encoder-lr-scale", type=float, default=1.0,
                   help="encoder peak learning rate as a fraction of --lr (e.g. 0.1; the decoder keeps --lr)")
    g.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise decay: each encoder stage below the deepest trains at this x the next one's lr")
    g.add_argument("--freeze-encoder-iterations", type=int, default=0, metavar="N",
                   help="warm-up: the encoder (weights and BatchNorm statistics) is frozen for the first N iterations")


def encoder_lever_values(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed :func:`add_encoder_lever_options` as config fields (one error message for bad values)."""
    if args.encoder_lr_scale < 0:
        raise ValueError(f"--encoder-lr-scale must be >= 0, got {args.encoder_lr_scale}")
    if not 0 < args.layer_decay <= 1:
        raise ValueError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.freeze_encoder_iterations < 0:
        raise ValueError(f"--freeze-encoder-iterations must be >= 0, got {args.freeze_encoder_iterations}")
    return {"encoder_lr_scale": args.encoder_lr_scale, "layer_decay": args.layer_decay,
            "freeze_encoder_iterations": args.freeze_encoder_iterations}


def add_mask_options(g: argparse._ArgumentGroup) -> None:
    """Mask semantics options (shared by ``benchmark custom`` and ``cemnet finetune``)."""
    g.add_argument("--mask-mode", default="auto", choices=["auto", "binary", "labels"],
                   help="how mask values become classes: binary (value > --threshold is foreground), labels (values "
                        "are class ids, or --class-map), auto (two values -> binary, small ids -> labels, a few "
                        "other values -> one class each, anything else refused)")
    g.add_argument("--threshold", type=float, default=None,
                   help="binary masks: foreground = value > THRESHOLD (default: half the largest mask value)")
    g.add_argument("--class-map", nargs="+", metavar="VALUE=NAME", default=None,
                   help="label masks: the values that are classes, in output order (e.g. 128=myelin 255=axon); "
                        "0 or the value named 'background' is background; any other value is an error")
    g.add_argument("--ignore-value", type=int, default=None,
                   help="mask value of unlabelled pixels (sparse labels): no loss, not scored")
    g.add_argument("--max-classes", type=int, default=32, help="refuse label masks with more classes than this")
    g.add_argument("--classes", nargs="+", default=None, help="class names of mask values 1..K (or of the foreground)")


def mask_semantics(args: argparse.Namespace):
    """The :class:`~cemnet.benchmarks.masks.MaskSemantics` of parsed mask options."""
    from cemnet.benchmarks.masks import MaskSemantics, parse_class_map

    return MaskSemantics(mode=args.mask_mode, threshold=args.threshold, class_map=parse_class_map(args.class_map),
                         ignore_value=args.ignore_value, max_classes=args.max_classes, classes=args.classes)


def _add_training(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model and training (CEM500K defaults)")
    m.add_argument("--encoders", nargs="+", default=["random"],
                   help="encoders: export files, run folders, registry names, 'random' or 'random:ARCH'")
    m.add_argument("--arch", default=None,
                   help="architecture of 'random' encoders (default: that of the pretrained encoders of the same "
                        "run, else resnet50; instance 2d/3d modes: resnet18 / cemnet3d_res_tiny)")
    m.add_argument("--freeze", default="none", help="none | encoder | a stage name (layer3): freeze below it")
    add_encoder_lever_options(m)
    m.add_argument("--train-fraction", type=float, nargs="+", default=[1.0], help="labelled fractions to sweep")
    m.add_argument("--seeds", type=int, nargs="+", default=[0], help="random seeds (one run per seed)")
    m.add_argument("--iterations", type=int, default=2500, help="fine-tuning iterations per run")
    m.add_argument("--eval-at", type=int, nargs="*", default=[], help="also evaluate at these iterations")
    m.add_argument("--batch-size", type=int, default=16, help="crops per iteration")
    m.add_argument("--crop-size", type=int, default=224, help="training crop side (px)")
    m.add_argument("--lr", type=float, default=3e-3, help="OneCycle max learning rate")
    m.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    m.add_argument("--base-width", type=int, default=256, help="decoder width")
    m.add_argument("--orthoplane", action="store_true", help="3D: train on xy+xz+yz, average 3-plane predictions")
    m.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    m.add_argument("--overlays", type=int, default=2,
                   help="test images in overlays.png (the most varied ones; 0: no figure)")
    m.add_argument("--overlay-images", nargs="+", default=None, metavar="NAME",
                   help="test images (names or indices) to show in overlays.png instead of the most varied ones")
    i = p.add_argument_group("instance segmentation")
    i.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3], help="agglomeration thresholds")
    i.add_argument("--border-nm", type=float, default=None, help="CREMI border mask width (nm), e.g. 25")
    i.add_argument("--agglomeration", default="mean", choices=["mean", "waterz"],
                   help="mean-affinity agglomeration: our union-find ('mean') or waterz's C++ ('waterz')")
    i.add_argument("--mix", default="none", choices=["none", "amplitude", "cutmix", "both"], help="domain mixing with the test volume")
    i.add_argument("--affinity-mode", default="3d", choices=["3d", "2d"],
                   help="3d: 3D encoder; 2d: 2D encoder per slice on (z-1, z) pairs (random = resnet18)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="benchmark_out", help="output folder")
    o.add_argument("-q", "--quiet", action="store_true", help="log warnings only")


def build_parser() -> argparse.ArgumentParser:
    """``cemnet benchmark`` with one subcommand each: ``list``, ``info``, ``custom`` and every
    registered benchmark (each ``--help`` shows only its own options)."""
    from cemnet.benchmarks.registry import load_benchmarks

    p = argparse.ArgumentParser(prog="cemnet benchmark", description="Fine-tune and evaluate encoders on vEM benchmarks.",
                                formatter_class=_HelpFormatter, epilog=__doc__.split("Examples::")[1])
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True,
                           help="list | info | custom | probe | study | download | a registered benchmark name")
    # probe and download have parsers of their own (see main); listed here so --help shows them
    sub.add_parser("probe", help="frozen-feature probe of encoders (cemnet benchmark probe --help)", add_help=False)
    sub.add_parser("download", help="fetch a registered benchmark, verified (cemnet benchmark download --help)",
                   add_help=False)
    sub.add_parser("study", help="curate -> pretrain -> fine-tune pretrained vs random on a target (cemnet benchmark "
                   "study --help)", add_help=False)
    sub.add_parser("list", help="registered benchmarks", description="List the registered benchmarks.",
                   formatter_class=_HelpFormatter)
    info = sub.add_parser("info", help="URL, sha256, licence, citation and layout of one benchmark",
                          formatter_class=_HelpFormatter)
    info.add_argument("name", help="a registered benchmark name")
    c = sub.add_parser("custom", help="your own images + masks (2D) or volume + labels (3D)",
                       description="Fine-tune and evaluate on your own labelled data.", formatter_class=_HelpFormatter)
    g = c.add_argument_group("custom data")
    g.add_argument("--images", help="folder of 2D images (custom 2D)")
    g.add_argument("--masks", help="folder of masks matched to --images by name (custom 2D)")
    g.add_argument("--image", help="3D image volume, any format curation.readers supports (custom 3D)")
    g.add_argument("--labels", help="3D label volume (custom 3D)")
    g.add_argument("--key", help="HDF5/zarr key of --image")
    g.add_argument("--label-key", help="HDF5/zarr key of --labels")
    g.add_argument("--instance", action="store_true", help="custom 3D labels are instance ids (affinity pipeline)")
    g.add_argument("--split", default="z:0.8", help="split rule: z:F (first fraction for training), test:a,b")
    add_mask_options(g)
    _add_training(c)
    for name, entry in load_benchmarks().items():
        b = sub.add_parser(name, help=f"{entry.task}: {', '.join(entry.classes)}", formatter_class=_HelpFormatter,
                           description=f"Benchmark {name} ({entry.task}; classes {', '.join(entry.classes)}).")
        d = b.add_argument_group("data")
        d.add_argument("--data-dir", required=True,
                       help="local copy of the benchmark (or a folder holding several, like ../shared/data)")
        d.add_argument("--split", default=None,
                       help="split rule: z:0.8, test:a,b, volumes:a,b, or a published part (test, validation); "
                            "default: the benchmark's own")
        _add_training(b)
    return p


def _list() -> int:
    from cemnet.benchmarks.registry import load_benchmarks

    for name, e in load_benchmarks().items():
        tested = "tested" if e.tested_on_real_data else "untested on real data"
        print(f"{name:<16} {e.task:<11} {','.join(e.classes):<30} {tested}")
    return 0


def _info(name: str) -> int:
    from cemnet.benchmarks.registry import get_benchmark

    e = get_benchmark(name)
    print(json.dumps({k: v for k, v in e.__dict__.items()}, indent=2, default=list))
    return 0


def _load(args: argparse.Namespace):
    from cemnet.benchmarks.datasets import load_benchmark, load_custom_2d, load_custom_3d

    if args.benchmark == "custom":
        if args.images and args.masks:
            return load_custom_2d(args.images, args.masks, args.split, semantics=mask_semantics(args))
        if args.image and args.labels:
            return load_custom_3d(args.image, args.labels, args.split, key=args.key, label_key=args.label_key,
                                  instance=args.instance, semantics=mask_semantics(args))
        raise ValueError("pass --images/--masks (2D) or --image/--labels (3D)")
    return load_benchmark(args.benchmark, args.data_dir, args.split)


def _run_instance(data, args: argparse.Namespace, out: Path) -> int:
    from cemnet.benchmarks.instance import InstanceConfig, evaluate_affinities, predict_affinities
    from cemnet.benchmarks.instance import DEFAULT_ARCH
    from cemnet.benchmarks.sweep import resolve_random_arch, write_csv

    # plain "random": the pretrained encoders' architecture, else the mode's default
    random_arch = resolve_random_arch(args.encoders, args.arch, DEFAULT_ARCH[args.affinity_mode])
    rows = []
    for enc in args.encoders:
        for seed in args.seeds:
            cfg = InstanceConfig(encoder=f"random:{random_arch}" if enc == "random" else enc, mode=args.affinity_mode, iterations=args.iterations,
                                 batch_size=max(1, args.batch_size), max_lr=args.lr, weight_decay=args.weight_decay,
                                 **encoder_lever_values(args), seed=seed, mix=args.mix, device=args.device)
            target = data.test[0].image if args.mix != "none" else None
            from cemnet.benchmarks.instance import train_affinities

            model, norm = train_affinities(data.train, cfg, target=target)
            for s in data.test:
                affs, fg = predict_affinities(model, s.image, norm, args.device)
                for r in evaluate_affinities(affs, fg, s.mask, args.thresholds, backend=args.agglomeration,
                                             border_nm=args.border_nm,
                                             voxel_size_nm=data.voxel_size_nm or (1.0, 1.0, 1.0)):
                    rows.append({"benchmark": data.name, "encoder": enc, "mode": args.affinity_mode, "seed": seed,
                                 "volume": s.name, **r})
    write_csv(rows, out / "instance_results.csv")
    best = min(rows, key=lambda r: r["voi"])
    print(f"best: threshold {best['threshold']} VI {best['voi']:.3f} (split {best['voi_split']:.3f}, merge "
          f"{best['voi_merge']:.3f}) ARAND {best['arand']:.3f}; wrote {out / 'instance_results.csv'}")
    return 0


# `cemnet benchmark NAME ...` runs a benchmark; these names are commands with their own options
_SUBCOMMANDS = {"probe": "cemnet.benchmarks.cli_probe", "download": "cemnet.benchmarks.cli_download",
                "study": "cemnet.benchmarks.cli_study"}


def _run_subcommand(name: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(_SUBCOMMANDS[name]).main(argv))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cemnet benchmark``; returns the exit status (2 with one message for bad data)."""
    from cemnet.benchmarks.masks import MaskError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _SUBCOMMANDS:  # commands with parsers of their own
        return _run_subcommand(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("cemnet.benchmarks").setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    if args.benchmark == "list":
        return _list()
    try:
        if args.benchmark == "info":
            return _info(args.name)
        encoder_lever_values(args)  # bad values: one message before any data is read
        data = _load(args)
    except (FileNotFoundError, NotADirectoryError, MaskError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError quotes its text
        print(f"cemnet benchmark {args.benchmark}: {message}", file=sys.stderr)
        return 2
    print(data.summary())
    if data.mask_report is not None:
        print(data.mask_report.summary())
        for w in data.mask_report.warnings:
            print(f"warning: {w}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if data.task == "instance3d":
        return _run_instance(data, args, out)
    from cemnet.benchmarks.sweep import run_sweep
    from cemnet.benchmarks.train import FinetuneConfig

    cfg = FinetuneConfig(iterations=args.iterations, batch_size=args.batch_size, crop_size=args.crop_size, max_lr=args.lr,
                         weight_decay=args.weight_decay, freeze=args.freeze, **encoder_lever_values(args), arch=args.arch,
                         base_width=args.base_width, eval_at=tuple(args.eval_at), orthoplane=args.orthoplane, device=args.device)
    res = run_sweep(data, args.encoders, args.train_fraction, args.seeds, cfg, out, overlay_count=args.overlays,
                    overlay_images=args.overlay_images)
    print(res.table.read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in (res.csv, res.table, res.label_plot, res.iteration_plot, res.overlays) if p))
    return 0
