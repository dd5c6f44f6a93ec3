"""``cemnet benchmark download NAME --data-dir DIR [--registry FILE]``: fetch a benchmark, verified.

Examples::

    cemnet benchmark download cdeep3m_mito --data-dir data/cdeep3m_mito
    cemnet benchmark download lucchi_pp --data-dir data/lucchi_pp --registry mirror.yaml
    cemnet benchmark cdeep3m_mito --data-dir data/cdeep3m_mito --encoders random    # then benchmark it

A registry file holds entries merged over the built-in ones, key by key, e.g. a mirror::

    lucchi_pp:
      download:
        - {url: "https://mirror.example.org/lucchi_pp.zip", member: lucchi_pp}

See :mod:`cemnet.benchmarks.download` for resume, the lock file, extraction and the layout check.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cemnet benchmark download", description="Fetch a registered benchmark, verified.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples::")[1])
    p.add_argument("name", help="registered benchmark name (cemnet benchmark list)")
    p.add_argument("--data-dir", required=True, help="where the benchmark goes (and its lock file)")
    p.add_argument("--registry", help="YAML file merged over the built-in registry (mirrors, extra benchmarks)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; 0 when the benchmark is in place and verified, 1 on a download/verification
    problem, 2 on a bad name or registry file."""
    args = build_parser().parse_args(argv)
    # messages of this call go to this call's stderr (a handler bound once would outlive it)
    log = logging.getLogger("cemnet.benchmarks.download")
    handler = logging.StreamHandler(sys.stderr)
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.propagate = False
    try:
        return _run(args)
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _run(args: argparse.Namespace) -> int:
    from cemnet.benchmarks.download import DownloadError, download_benchmark
    from cemnet.benchmarks.registry import load_with_overrides

    try:
        entries = load_with_overrides(args.registry)
    except (OSError, ValueError, KeyError) as err:
        print(f"cemnet benchmark download: {err}", file=sys.stderr)
        return 2
    if args.name not in entries:
        print(f"cemnet benchmark download: unknown benchmark {args.name!r}; known: {', '.join(sorted(entries))}", file=sys.stderr)
        return 2
    try:
        result = download_benchmark(entries[args.name], args.data_dir, progress=not args.quiet)
    except (DownloadError, OSError) as err:
        print(f"cemnet benchmark download: {args.name}: {err}", file=sys.stderr)
        return 1
    for name, rec in result.files.items():
        print(f"{name}: {rec['size']} bytes, sha256 {rec['sha256']}")
    print(f"verified against {result.lock}; layout OK: {result.summary}")
    return 0
