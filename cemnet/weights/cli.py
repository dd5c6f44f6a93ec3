"""``cemnet weights list | info NAME | download NAME | publish FILE``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cemnet.cli_help import HelpFormatter
from cemnet.weights.download import CACHE_ENV, default_cache_dir, sha256_env_var
from cemnet.weights.registry import REGISTRY_ENV, RegistryError, get_entry, load_registry

# The work (torch, timm, curation) is imported inside the functions, after argument parsing,
# so that `--help` and argument errors answer at once.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cemnet weights", description="List, inspect, download and publish pretrained encoder weights.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    registry_help = f"extra registry file (YAML/JSON), repeatable; also ${REGISTRY_ENV}"
    cache_help = f"cache folder (default: ${CACHE_ENV}, else torch hub's checkpoints/cemnet; now {default_cache_dir()})"

    p = sub.add_parser("list", help="registered weights", formatter_class=HelpFormatter)
    p.add_argument("--registry", action="append", default=[], help=registry_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("info", help="one entry in full, and whether it is cached", formatter_class=HelpFormatter)
    p.add_argument("name", help="registered weights name (see 'cemnet weights list')")
    p.add_argument("--registry", action="append", default=[], help=registry_help)
    p.add_argument("--cache-dir", help=cache_help)

    p = sub.add_parser("download", help="download into the cache (sha256-verified, resumable)", formatter_class=HelpFormatter)
    p.add_argument("name", help="registered weights name (see 'cemnet weights list')")
    p.add_argument("--registry", action="append", default=[], help=registry_help)
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument("--sha256", help="expected sha256 (overrides the registry; or set CEMNET_SHA256_<NAME>)")
    p.add_argument(
        "--trust-unverified",
        action="store_true",
        help="allow a download without a known sha256; the computed hash is printed and recorded",
    )
    p.add_argument("--retries", type=int, default=3, help="retries of transient failures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("publish", help="rename an export to NAME-<sha256[:8]>.safetensors and register it", formatter_class=HelpFormatter)
    p.add_argument("export", metavar="FILE", help="a .safetensors written by 'cemnet export'")
    p.add_argument("--name", required=True, help="weights name (letters, digits, '.', '_', '-')")
    p.add_argument("--url-base", required=True, help="URL of the folder the file will be served from")
    p.add_argument("--registry", help="registry file to create/update (default: print the entry)")
    p.add_argument("--out-dir", help="where to put the published file (default: next to FILE)")
    p.add_argument("--move", action="store_true", help="rename instead of copying")
    p.add_argument("--license", help="licence of the weights (e.g. CC-BY-4.0)")
    p.add_argument("--citation", help="how to cite the weights")
    p.add_argument("--description", help="one line about the weights")
    return parser


def _list(args: argparse.Namespace) -> int:
    entries = load_registry(args.registry)
    if args.json:
        print(json.dumps({name: e.to_record() for name, e in entries.items()}, indent=2))
        return 0
    rows = [("NAME", "ARCH", "IN", "METHOD", "SHA256", "REGISTRY")]
    for name, e in sorted(entries.items()):
        rows.append((name, e.arch or "?", str(e.in_chans or "?"), e.method or "-", e.sha256[:12] if e.sha256 else "unverified", e.registry or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _info(args: argparse.Namespace) -> int:
    entry = get_entry(args.name, args.registry)
    cached = (Path(args.cache_dir) if args.cache_dir else default_cache_dir()) / entry.file_name
    print(f"name: {entry.name}")
    for key, value in entry.to_record().items():
        print(f"{key}: {value if value is not None else '-'}")
    print(f"registry: {entry.registry}")
    print(f"cached: {cached if cached.exists() else 'no'} ({cached})")
    if entry.sha256 is None:
        print(f"note: no published sha256; download needs --trust-unverified, --sha256 or {sha256_env_var(entry.name)}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from cemnet.weights.download import fetch

    path = fetch(
        args.name,
        registry=args.registry,
        cache_dir=args.cache_dir,
        sha256=args.sha256,
        trust_unverified=args.trust_unverified,
        progress=not args.no_progress,
        retries=args.retries,
    )
    print(path)
    return 0


def _publish(args: argparse.Namespace) -> int:
    import yaml

    from cemnet.weights.publish import publish

    entry, target = publish(
        args.export,
        args.name,
        args.url_base,
        registry=args.registry,
        out_dir=args.out_dir,
        license=args.license,
        citation=args.citation,
        description=args.description,
        move=args.move,
    )
    print(f"published {target}")
    if args.registry:
        print(f"registered {entry.name!r} in {args.registry}")
    else:
        print(yaml.safe_dump({"weights": {entry.name: entry.to_record()}}, sort_keys=False), end="")
    return 0


_COMMANDS = {"list": _list, "info": _info, "download": _download, "publish": _publish}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (RegistryError, RuntimeError, OSError, ValueError) as err:
        print(f"cemnet weights {args.command}: {err}", file=sys.stderr)
        return 1
