"""``cemnet export RUN_OR_CKPT --out encoder.safetensors``."""

from __future__ import annotations

import argparse
import sys

from cemnet.transfer.cli_help import HelpFormatter
from cemnet.transfer.meta import FORMATS


def build_parser() -> argparse.ArgumentParser:
    formats = "\n".join(f"  {name:<19} {text}" for name, text in FORMATS.items())
    parser = argparse.ArgumentParser(
        prog="cemnet export",
        description="Export backbone-only encoder weights (clean timm key names + metadata) as safetensors.",
        epilog=f"input formats (auto-detected):\n{formats}",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", metavar="RUN_OR_CKPT", help="run folder (checkpoints/last.ckpt, else newest *.ckpt) or checkpoint file")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--arch", help="timm architecture, for checkpoints that do not record it (non-ResNet state dicts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cemnet.transfer.download import sha256_file
    from cemnet.transfer.export import export_encoder

    try:
        weights = export_encoder(args.source, args.out, arch=args.arch)
    except (OSError, ValueError) as err:
        print(f"cemnet export: {err}", file=sys.stderr)
        return 1
    print(f"read {weights.source} as {weights.describe()}")
    print(f"wrote {args.out} (sha256 {sha256_file(args.out)})")
    return 0
