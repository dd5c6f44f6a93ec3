"""The ``cemnet`` command: one entry point, thin over the library.

Each subcommand lives in its own module exposing ``main(argv: list[str]) -> int``; this file
only dispatches, so ``cemnet --help`` stays fast (nothing heavy is imported here).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "curate": ("curation.cli", "raw EM archives -> deduplicated, filtered 8-bit patch corpus"),
    "pretrain": ("cemnet.methods.cli", "self-supervised pretraining (LightningCLI: MoCoV2, MGMR)"),
    "export": ("cemnet.weights.cli_export", "export clean encoder weights from a run or checkpoint"),
    "weights": ("cemnet.weights.cli", "list / inspect / download / publish pretrained weights"),
    "finetune": ("cemnet.finetune.cli", "train a segmentation model on your labels -> RUN/model.safetensors"),
    "benchmark": ("cemnet.benchmarks.cli", "fine-tune and evaluate on vEM benchmarks"),
    "transfer": ("cemnet.transferability.cli", "rank sources by MMD, select patches to label"),
    "segment": ("cemnet.segment.cli", "apply a saved model to a volume of any size, block by block"),
    "package": ("cemnet.share.cli_package", "export a saved model as a BioImage Model Zoo package"),
}


def _usage() -> str:
    lines = ["usage: cemnet COMMAND [ARGS...]", "", "commands:"]
    for name, (_, help_) in SUBCOMMANDS.items():
        lines.append(f"  {name:<10} {help_}")
    lines.append("")
    lines.append("Run 'cemnet COMMAND --help' for the options of one command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from cemnet import __version__

        print(f"cemnet {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"cemnet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            print(f"cemnet: command {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
