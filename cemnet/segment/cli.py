"""``cemnet segment MODEL INPUT --out OUTPUT``: apply a saved model to a volume of any size."""

from __future__ import annotations

import argparse
import sys

from cemnet.segment.tiling import BLENDS

EPILOG = """\
outputs (docs/segment.md): OME-Zarr by default (OUT.ome.zarr: the root image holds uint8 class
probabilities, 255 = 1.0; binary models: the foreground probability, (z, y, x); the labels are at
labels/segmentation); .tif/.tiff or .h5 outputs write TIFF / HDF5 instead. A killed run leaves
OUT.partial; the same command continues it.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cemnet segment", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a saved model (.safetensors written by cemnet finetune)")
    p.add_argument("input", help="a volume or image any curation reader opens (tif, mrc, h5, zarr, OME-Zarr, folder...)")
    p.add_argument("--out", required=True, help="output: *.ome.zarr / *.zarr (default format), *.tif, *.h5")
    p.add_argument("--outputs", default="probabilities,labels",
                   help="comma-separated: probabilities, labels (default both)")
    p.add_argument("--memory-mb", type=float, default=1024.0,
                   help="bound on the block buffers (input, accumulators, output) in MB (default 1024)")
    p.add_argument("--blend", choices=BLENDS, default="gaussian", help="tile blending weights (default gaussian)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (2^d flips per tile)")
    p.add_argument("--orthoplane", action="store_true", help="2D models: average xy, xz and yz predictions")
    p.add_argument("--tile", type=int, nargs="+", help="tile size per spatial axis (default: the model's)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--format", choices=("ome-zarr", "tiff", "hdf5"), help="output format (default: from --out)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--scale-level", type=int, help="OME-Zarr level to read (default: closest to the training voxel size)")
    p.add_argument("--key", help="HDF5 dataset / zarr array of the input")
    p.add_argument("--channel", type=int, help="channel of a multi-channel input")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), help="input voxel size in nm")
    p.add_argument("--threshold", type=float, help="binary models: foreground threshold for the labels")
    p.add_argument("--agglomeration-threshold", type=float, help="instance models: merge while mean affinity >= this")
    p.add_argument("--scheduler", help="Dask scheduler address: run the blocks on that cluster")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cemnet.segment.run import SegmentError, SegmentSettings, segment_volume

    settings = SegmentSettings(
        outputs=tuple(o.strip() for o in args.outputs.split(",") if o.strip()), memory_mb=args.memory_mb,
        blend=args.blend, tta=args.tta, orthoplane=args.orthoplane, batch_size=args.batch_size,
        tile=tuple(args.tile) if args.tile else None, device=args.device, format=args.format,
        overwrite=args.overwrite, scale_level=args.scale_level, key=args.key, channel=args.channel,
        voxel_size=tuple(args.voxel_size) if args.voxel_size else None, threshold=args.threshold,
        agglomeration_threshold=args.agglomeration_threshold, scheduler=args.scheduler,
        progress=not args.no_progress)
    try:
        result = segment_volume(args.model, args.input, args.out, settings)
    except SegmentError as err:
        print(f"cemnet segment: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cemnet segment: interrupted; run the same command to continue ({args.out}.partial)", file=sys.stderr)
        return 130
    rate = result.shape[0] * result.shape[1] * result.shape[2] / max(result.seconds, 1e-9)
    print(f"{result.out}: {'x'.join(map(str, result.shape))} voxels in {result.blocks} blocks of "
          f"{'x'.join(map(str, result.block_shape))} ({result.blocks_skipped} resumed), {result.seconds:.1f} s, "
          f"{rate:,.0f} voxels/s" + (f", {result.instances} instances" if result.instances is not None else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
