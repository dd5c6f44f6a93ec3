#!/usr/bin/env python
"""Issue 15 items 3 and 5, the mechanical part: split ``cemnet.transfer`` and rename colliding names.

* ``cemnet/transfer/`` -> ``cemnet/weights/`` (meta, keys, checkpoint I/O, converters, build, export,
  load, registry, download, publish, decoder, the ``export`` and ``weights`` commands) and
  ``cemnet/transferability/`` (embed, MMD, active selection, the ``transfer`` command); the
  ``--help`` formatter the three commands share -> ``cemnet/cli_help.py``.
* top-level ``benchmarks/`` (speed / memory scripts) -> ``perf/`` (``cemnet/benchmarks/`` is the
  vEM benchmarks); ``curation/convert.py`` (to uint8) -> ``curation/to_uint8.py`` (the checkpoint
  converters are ``cemnet/weights/convert.py``); ``tests/test_transfer_*.py`` -> ``test_weights_*.py``;
  ``docs/transfer.md`` -> ``docs/weights.md``.

Then every reference in the tracked text files (code, tests, docs, notebooks, configs,
pyproject's package-data) is rewritten to the new names. Files are moved with ``git mv`` so that
history follows them.

Re-runnable and idempotent: a move whose source is gone is skipped, a rewrite that finds nothing
to change changes nothing, so it can be run again on a tree that other branches were merged into.
It refuses to run (before changing anything) when ``cemnet/transfer/`` holds a file this script
does not know where to put: add it to ``MOVES`` first.

    python scripts/dev/split_transfer.py [--dry-run]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WEIGHTS_MODULES = ("meta", "keys", "checkpoint_io", "convert", "build", "export", "load", "registry",
                   "download", "publish", "decoder", "cli_export")
TRANSFERABILITY_MODULES = ("embed", "mmd", "active")
# old module (under cemnet.transfer) -> new dotted module
MODULE_MAP: dict[str, str] = {
    **{m: f"cemnet.weights.{m}" for m in WEIGHTS_MODULES},
    **{m: f"cemnet.transferability.{m}" for m in TRANSFERABILITY_MODULES},
    "cli_weights": "cemnet.weights.cli",
    "cli_transfer": "cemnet.transferability.cli",
    "cli_help": "cemnet.cli_help",
}
# names cemnet.transfer re-exported that belong to transferability (all others are weights)
TRANSFERABILITY_NAMES = ("mmd2", "mmd2_test", "pairwise_mmd2", "select", "save_head", "load_head")

MOVES: dict[str, str] = {
    **{f"cemnet/transfer/{old}.py": new.replace(".", "/") + ".py" for old, new in MODULE_MAP.items()},
    "cemnet/transfer/__init__.py": "cemnet/weights/__init__.py",
    "cemnet/transfer/registry.yaml": "cemnet/weights/registry.yaml",
    "curation/convert.py": "curation/to_uint8.py",
    "tests/test_transfer_convert.py": "tests/test_weights_convert.py",
    "tests/test_transfer_download.py": "tests/test_weights_download.py",
    "tests/test_transfer_export.py": "tests/test_weights_export.py",
    "tests/test_transfer_load.py": "tests/test_weights_load.py",
    "tests/test_transfer_helpers.py": "tests/test_weights_helpers.py",
    "tests/test_decoder_transfer.py": "tests/test_weights_decoder.py",
    "docs/transfer.md": "docs/weights.md",
}
DIR_MOVES: dict[str, str] = {"benchmarks": "perf"}

TRANSFERABILITY_INIT = '''"""transferability: which data (or encoder) transfers to a target, and which patches to label.

Rank candidate sources or encoders by MMD^2 to the target in an encoder's feature space
(:func:`mmd2`, :func:`mmd2_test`, :func:`pairwise_mmd2`; features from :mod:`.embed`) and choose
the target patches to annotate first (:func:`select`). The ``cemnet transfer`` command
(:mod:`.cli`). See docs/transferability.md. Encoders are loaded through :mod:`cemnet.weights`.

Names are resolved lazily so that ``import cemnet.transferability`` does not import torch.
"""

from __future__ import annotations

from cemnet._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "mmd2": "cemnet.transferability.mmd",
    "mmd2_test": "cemnet.transferability.mmd",
    "pairwise_mmd2": "cemnet.transferability.mmd",
    "select": "cemnet.transferability.active",
    "save_head": "cemnet.transferability.active",
    "load_head": "cemnet.transferability.active",
}

__getattr__, __all__ = lazy_exports("cemnet.transferability", _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
'''

TEXT_SUFFIXES = {".py", ".md", ".toml", ".ipynb", ".yaml", ".yml", ".sh", ".cfg", ".txt", ".ini", ".json"}
TEXT_NAMES = {"run"}  # .ci/run


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout


def check_known_files() -> None:
    """Stop before changing anything if cemnet/transfer/ has a file with no destination."""
    old = ROOT / "cemnet" / "transfer"
    if not old.is_dir():
        return
    unknown = sorted(
        str(p.relative_to(ROOT)) for p in old.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and str(p.relative_to(ROOT)) not in MOVES
    )
    if unknown:
        sys.exit("split_transfer: no destination for " + ", ".join(unknown) + " (add it to MOVES)")


def move(src: str, dst: str, dry_run: bool) -> bool:
    s, d = ROOT / src, ROOT / dst
    if not s.exists():
        return False
    if d.exists() and not d.is_dir():
        sys.exit(f"split_transfer: both {src} and {dst} exist; merge them by hand, then run again")
    print(f"git mv {src} {dst}")
    if not dry_run:
        d.parent.mkdir(parents=True, exist_ok=True)
        git("mv", src, dst)
    return True


def move_dir(src: str, dst: str, dry_run: bool) -> None:
    """git mv every tracked file of src/ to dst/ (works when dst/ already exists after a merge)."""
    for f in git("ls-files", "-z", "--", src).split("\0"):
        if f:
            move(f, dst + f[len(src):], dry_run)


def remove_empty_dirs(path: Path, dry_run: bool) -> None:
    if not path.is_dir() or dry_run:
        return
    for p in sorted(path.rglob("__pycache__"), reverse=True):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    for p in sorted((q for q in path.rglob("*") if q.is_dir()), reverse=True):
        if not any(p.iterdir()):
            p.rmdir()
    if not any(path.iterdir()):
        path.rmdir()


# -- reference rewrites ----------------------------------------------------------------------
def new_home(name: str) -> str:
    """Where ``cemnet.transfer.<name>`` is now: a module, or a re-exported name of a package."""
    if name in MODULE_MAP:
        return MODULE_MAP[name]
    package = "cemnet.transferability" if name in TRANSFERABILITY_NAMES else "cemnet.weights"
    return f"{package}.{name}"


def rewrite_from_import(m: re.Match[str], names_text: str | None = None) -> str:
    """``from cemnet.transfer import a, b`` -> one import per new package (modules by their new name)."""
    text = m.group(2) if names_text is None else names_text
    indent, names = m.group(1), [n.strip() for n in text.split(",") if n.strip()]
    groups: dict[str, list[str]] = {}
    for entry in names:
        name, _, alias = entry.partition(" as ")
        home = new_home(name.strip())
        package, _, leaf = home.rpartition(".")
        alias = alias.strip() or (name.strip() if leaf != name.strip() else "")
        groups.setdefault(package, []).append(f"{leaf} as {alias}" if alias and alias != leaf else leaf)
    return "\n".join(f"{indent}from {pkg} import {', '.join(items)}" for pkg, items in groups.items())


TOP_BENCH = "|".join(
    sorted({Path(f).stem for f in (list((ROOT / "benchmarks").glob("*")) + list((ROOT / "perf").glob("*")))
            if Path(f).suffix in (".py", ".sh")}, key=len, reverse=True)
) or "NO_FILES"

RULES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    # `from cemnet.transfer import a, b` (one line, or in parentheses) -> split by new package
    (re.compile(r"^([ \t]*)from cemnet\.transfer import \(([^)]*)\)", re.M),
     lambda m: rewrite_from_import(m, m.group(2).replace("\n", " "))),
    (re.compile(r"^([ \t]*)from cemnet\.transfer import (?!\()([^\n#]+?)[ \t]*$", re.M), rewrite_from_import),
    # dotted names: cemnet.transfer.<module or re-exported name>
    (re.compile(r"\bcemnet\.transfer\.(\w+)"), lambda m: new_home(m.group(1))),
    # the bare package (lazy_exports name, package-data key, prose) -> weights
    (re.compile(r"\bcemnet\.transfer\b(?!ability)"), "cemnet.weights"),
    # aligned columns (docs/architecture.md's data flow): keep the column after a renamed path
    (re.compile(r"\bcuration/convert\.py\)   "), "curation/to_uint8.py)"),
    (re.compile(r"\bcemnet/transfer/export\.py, load\.py\) "), "cemnet/weights/export.py, load.py)  "),
    # file paths
    (re.compile(r"\bcemnet/transfer/(\w+)\.py\b"), lambda m: new_home(m.group(1)).replace(".", "/") + ".py"),
    (re.compile(r"\bcemnet/transfer/registry\.yaml\b"), "cemnet/weights/registry.yaml"),
    (re.compile(r"\bcemnet/transfer/"), "cemnet/weights/"),
    # curation's uint8 conversion
    (re.compile(r"\bcuration\.convert\b"), "curation.to_uint8"),
    (re.compile(r"\bcuration/convert\.py\b"), "curation/to_uint8.py"),
    # top-level speed scripts (never cemnet/benchmarks/...)
    (re.compile(r"(?<![\w./-])benchmarks/(?=(" + TOP_BENCH + r")\.(py|sh)\b)"), "perf/"),
    (re.compile(r"""(["'])benchmarks\1(?=\s*/\s*["'](""" + TOP_BENCH + r""")\.(py|sh)["'])"""), r"\1perf\1"),
    # the weights page of the docs
    (re.compile(r"(?<![\w-])(docs/)?transfer\.md\b"), lambda m: (m.group(1) or "") + "weights.md"),
    # renamed test modules
    (re.compile(r"\btest_transfer_(convert|download|export|load|helpers)\b"), r"test_weights_\1"),
    (re.compile(r"\btest_decoder_transfer\b"), "test_weights_decoder"),
]


def rewrite_text(text: str) -> str:
    for pattern, repl in RULES:
        text = pattern.sub(repl, text)
    return text


def drop_transferability_exports(dry_run: bool) -> None:
    """cemnet.weights must not re-export transferability's names (they moved to its own package)."""
    init = ROOT / "cemnet" / "weights" / "__init__.py"
    if not init.exists():
        return
    old = init.read_text(encoding="utf-8")
    new = re.sub(r'^\s*"\w+": "cemnet\.transfer(?:ability)?\.(?:' + "|".join(TRANSFERABILITY_MODULES) + r')",\n', "", old,
                 flags=re.M)
    if new != old:
        print(f"drop transferability names from {init.relative_to(ROOT)}")
        if not dry_run:
            init.write_text(new, encoding="utf-8")


def text_files() -> list[Path]:
    out = []
    for f in git("ls-files", "-z").split("\0"):
        p = ROOT / f
        if f.startswith("scripts/dev/split_transfer") or not p.is_file():
            continue
        if p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES:
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    args = ap.parse_args(argv)

    check_known_files()
    for src, dst in MOVES.items():
        move(src, dst, args.dry_run)
    for src, dst in DIR_MOVES.items():
        move_dir(src, dst, args.dry_run)
    remove_empty_dirs(ROOT / "cemnet" / "transfer", args.dry_run)
    remove_empty_dirs(ROOT / "benchmarks", args.dry_run)

    init = ROOT / "cemnet" / "transferability" / "__init__.py"
    if not init.exists():
        print(f"create {init.relative_to(ROOT)}")
        if not args.dry_run:
            init.write_text(TRANSFERABILITY_INIT)
            git("add", str(init.relative_to(ROOT)))

    drop_transferability_exports(args.dry_run)
    changed = 0
    for path in text_files():
        old = path.read_text(encoding="utf-8")
        new = rewrite_text(old)
        if new != old:
            changed += 1
            print(f"rewrite {path.relative_to(ROOT)}")
            if not args.dry_run:
                path.write_text(new, encoding="utf-8")
    print(f"split_transfer: {changed} file(s) rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
