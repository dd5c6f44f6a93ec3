"""``cemnet export RUN_OR_CKPT --out encoder.safetensors``."""

from __future__ import annotations

import argparse
import sys

from cemnet.cli_help import HelpFormatter
from cemnet.weights.meta import FORMATS

# The work (torch, timm, curation) is imported inside the functions, after argument parsing,
# so that `--help` and argument errors answer at once.


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
    from cemnet.weights.decoder import decoder_path, export_decoder
    from cemnet.weights.download import sha256_file
    from cemnet.weights.export import export_encoder

    try:
        weights = export_encoder(args.source, args.out, arch=args.arch)
        decoder = export_decoder(args.source, decoder_path(args.out))
    except (OSError, ValueError) as err:
        print(f"cemnet export: {err}", file=sys.stderr)
        return 1
    print(f"read {weights.source} as {weights.describe()}")
    print(f"wrote {args.out} (sha256 {sha256_file(args.out)})")
    if decoder is not None:  # MGMR: the pixel decoder, for UNet(..., decoder=...)
        print(f"wrote {decoder} (MGMR pixel decoder; sha256 {sha256_file(decoder)})")
    elif decoder_path(args.out).is_file():  # left by an earlier export to this name: it would pair wrongly
        decoder_path(args.out).unlink()
        print(f"removed the stale {decoder_path(args.out)} (this checkpoint has no MGMR decoder)")
    return 0
