"""``cemnet finetune``: train a segmentation model on your labels and keep it as one file.

Examples::

    cemnet finetune --images imgs/ --masks masks/ --encoder enc.safetensors --iterations 500 --out runs/mito
    cemnet finetune --image raw.h5 --key raw --labels seg.h5 --label-key labels --mask-mode labels \\
        --class-map 1=mito 2=er --ignore-value 255 --out runs/organelles
    cemnet finetune --manifest volumes.yaml --task instance --dims 3d --out runs/neurons
    cemnet finetune --images imgs/ --masks masks/ --out runs/mito --resume        # continue a stopped run
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from cemnet.benchmarks.cli import _HelpFormatter, add_encoder_lever_options, add_mask_options

    p = argparse.ArgumentParser(prog="cemnet finetune", formatter_class=_HelpFormatter,
                                description="Fine-tune a segmentation model (U-Net on a pretrained or random encoder) "
                                            "on your labels; writes RUN/model.safetensors (best validation score), "
                                            "RUN/last.safetensors, metrics.csv, validation.csv, overlays.png.",
                                epilog=__doc__.split("Examples::")[1])
    d = p.add_argument_group("training data (one of)")
    d.add_argument("--images", help="folder of 2D images")
    d.add_argument("--masks", help="folder of masks matched to --images by name (a _mask/_label suffix is allowed)")
    d.add_argument("--image", help="image volume, any format the curation readers open")
    d.add_argument("--labels", help="label volume of --image (same shape)")
    d.add_argument("--key", help="HDF5/zarr key (or OME-Zarr scale path) of --image")
    d.add_argument("--label-key", help="HDF5/zarr key of --labels")
    d.add_argument("--manifest", help="YAML/CSV list of volumes: image, labels, key, label_key, split (train|validation)")
    v = p.add_argument_group("validation (given, or held out automatically)")
    v.add_argument("--val-images", help="folder of validation images (with --val-masks)")
    v.add_argument("--val-masks", help="folder of validation masks")
    v.add_argument("--val-image", help="validation image volume (with --val-labels; keys as for training)")
    v.add_argument("--val-labels", help="validation label volume")
    v.add_argument("--val-fraction", type=float, default=0.2,
                   help="held out when no validation data is given: every k-th image, or the last part along z")
    v.add_argument("--val-every", type=int, default=0, help="evaluate every N iterations (0: four times per run)")
    v.add_argument("--overlays", type=int, default=3, help="validation images in overlays.png (the most varied ones)")
    v.add_argument("--overlay-images", nargs="+", default=None, metavar="NAME",
                   help="validation images (names or indices) for overlays.png instead of the most varied ones")
    t = p.add_argument_group("task and labels")
    t.add_argument("--task", default="semantic", choices=["semantic", "instance"],
                   help="semantic classes, or neuron instances (affinities + foreground -> watershed -> agglomeration)")
    t.add_argument("--dims", default=None, choices=["2d", "2.5d", "3d"],
                   help="model dimensionality (default: 2d for semantic, 3d for instance; 2.5d = slice pairs)")
    add_mask_options(t)
    t.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3],
                   help="instance: agglomeration thresholds scored on validation (the best is recorded)")
    t.add_argument("--voxel-size", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="voxel size of the training data in nm (recorded in the model; default: from the files)")
    m = p.add_argument_group("model and training (CEM500K defaults, shortened)")
    m.add_argument("--encoder", default="random",
                   help="export file, run folder, checkpoint, registry name, 'random' or 'random:ARCH'")
    m.add_argument("--arch", default=None,
                   help="architecture of a 'random' encoder (default resnet50; instance: resnet18 (2.5d) / cemnet3d_res_tiny (3d))")
    m.add_argument("--freeze", default="none", help="none | encoder | a stage name (layer3): freeze below it")
    add_encoder_lever_options(m)
    m.add_argument("--iterations", type=int, default=500, help="training iterations")
    m.add_argument("--batch-size", type=int, default=8, help="crops per iteration")
    m.add_argument("--crop-size", type=int, default=224, help="crop side in px (instance: y and x)")
    m.add_argument("--crop-z", type=int, default=16, help="instance 3d: crop depth in slices")
    m.add_argument("--lr", type=float, default=3e-3, help="OneCycle max learning rate")
    m.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    m.add_argument("--base-width", type=int, default=256, help="decoder width")
    m.add_argument("--orthoplane", action="store_true", help="semantic volumes: train on xy+xz+yz slices")
    m.add_argument("--seed", type=int, default=0, help="random seed")
    m.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    o = p.add_argument_group("run")
    o.add_argument("--out", required=True, help="run folder")
    o.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    o.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    o.add_argument("--wandb", action="store_true", help="also log to Weights & Biases, offline (RUN/wandb)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cemnet finetune``; returns the exit status (2 with one message for bad input)."""
    from cemnet.benchmarks.cli import encoder_lever_values, mask_semantics
    from cemnet.benchmarks.masks import MaskError
    from cemnet.finetune.data import DataError, load_finetune_data
    from cemnet.finetune.model_file import ModelFileError
    from cemnet.finetune.run import FinetuneSettings, RunError, run_finetune

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")
    for name in ("cemnet.finetune", "cemnet.benchmarks"):
        logging.getLogger(name).setLevel(logging.WARNING if args.quiet else logging.INFO)
    dims = args.dims or ("2d" if args.task == "semantic" else "3d")
    try:
        levers = encoder_lever_values(args)
    except ValueError as err:
        print(f"cemnet finetune: {err}", file=sys.stderr)
        return 2
    settings = FinetuneSettings(**levers,
        task=args.task, dims=dims, encoder=args.encoder, arch=args.arch, freeze=args.freeze, iterations=args.iterations,
        batch_size=args.batch_size, crop_size=args.crop_size, crop_z=args.crop_z, lr=args.lr,
        weight_decay=args.weight_decay, base_width=args.base_width, seed=args.seed, orthoplane=args.orthoplane,
        val_every=args.val_every, thresholds=tuple(args.thresholds), device=args.device,
        voxel_size=tuple(args.voxel_size) if args.voxel_size else None,
        overlay_images=tuple(args.overlay_images or ()), overlays=args.overlays, wandb=args.wandb,
        progress=not args.no_progress)
    try:
        data, record = load_finetune_data(
            images=args.images, masks=args.masks, image=args.image, labels=args.labels, key=args.key,
            label_key=args.label_key, manifest=args.manifest, val_images=args.val_images, val_masks=args.val_masks,
            val_image=args.val_image, val_labels=args.val_labels, val_fraction=args.val_fraction,
            instance=args.task == "instance", semantics=mask_semantics(args))
        print(f"{data.summary().replace('test', 'validation')}; validation: {record['validation']['rule']}")
        if data.mask_report is not None:
            print(data.mask_report.summary())
            for w in data.mask_report.warnings:
                print(f"warning: {w}", file=sys.stderr)
        run = run_finetune(data, record, settings, args.out, resume=args.resume, overwrite=args.overwrite)
    except (DataError, MaskError, RunError, ModelFileError, FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"cemnet finetune: {err}", file=sys.stderr)
        return 2
    best = run["best"] or {}
    key = "iou" if settings.task == "semantic" else "voi"
    print(f"best validation {key} {best.get(key, float('nan')):.4f} at step {best.get('iteration')}; "
          f"wrote {run['model']}, {run['last']}" + (f", {run['overlays']}" if run.get("overlays") else ""))
    return 0
