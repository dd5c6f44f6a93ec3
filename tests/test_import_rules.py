"""The import rules of docs/architecture.md, checked on the source (every import, function-local
ones included, since those are where a cycle hides). Pure logic: no data folder needed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imports_of(package: str) -> dict[str, set[str]]:
    """{module file (repo-relative): project modules it imports} for every file of ``package``."""
    out: dict[str, set[str]] = {}
    for path in sorted((REPO / package.replace(".", "/")).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        out[str(path.relative_to(REPO))] = {n for n in names if n.split(".")[0] in ("cemnet", "curation")}
    return out


def outside(imported: str, allowed: tuple[str, ...]) -> bool:
    return not any(imported == a or imported.startswith(a + ".") for a in allowed)


# package -> the project modules it may import (itself included)
ALLOWED: dict[str, tuple[str, ...]] = {
    "curation": ("curation",),
    "cemnet.models": ("cemnet.models",),
    # weights: loading and building encoders (models), the encoder's model card (share.model_card)
    "cemnet.weights": ("cemnet.weights", "cemnet.models", "cemnet.share.model_card", "cemnet._lazy",
                       "cemnet.cli_help", "cemnet"),
    # transferability: encoders through weights, patches through curation, saved heads
    "cemnet.transferability": ("cemnet.transferability", "cemnet.weights", "cemnet.models", "curation",
                               "cemnet.finetune.model_file", "cemnet._lazy", "cemnet.cli_help"),
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_architecture_allows(package: str) -> None:
    found = imports_of(package)
    assert found, f"no modules found under {package}"
    bad = {f"{path}: {name}" for path, names in found.items() for name in names if outside(name, ALLOWED[package])}
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(sorted(bad))


# spelled in two pieces so that a search of the tree for the old name finds only real leftovers
OLD_PACKAGE = "cemnet" + ".transfer"


def test_the_old_transfer_package_is_gone_everywhere() -> None:
    stale = {
        f"{path}: {name}"
        for package in ("cemnet", "curation")
        for path, names in imports_of(package).items()
        for name in names
        if name == OLD_PACKAGE or name.startswith(OLD_PACKAGE + ".")
    }
    assert not stale and not (REPO / "cemnet" / "transfer").exists()


def test_the_checker_sees_function_local_imports(tmp_path: Path) -> None:
    # guard against a checker that can never fail: a local import must be reported
    tree = ast.parse("def f():\n    from cemnet.weights.load import load_encoder\n")
    local = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert local == {"cemnet.weights.load"} and outside("cemnet.weights.load", ALLOWED["cemnet.models"])


SQL_CALLS = {"execute", "executemany", "executescript", "connect"}


def sql_calls(source: str) -> set[str]:
    """``x.execute(...)``-style calls (and ``sqlite3.connect``) in Python source."""
    return {f"{n.func.attr}@{n.lineno}" for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in SQL_CALLS
            and not (n.func.attr == "connect" and getattr(n.func.value, "id", "") != "sqlite3")}


def test_only_the_corpus_module_writes_sql() -> None:
    """The corpus's SQLite schema is known to curation/corpus.py only (docs/architecture.md)."""
    found = {f"{path.relative_to(REPO)}: {call}"
             for package in ("cemnet", "curation") for path in sorted((REPO / package).rglob("*.py"))
             if path != REPO / "curation" / "corpus.py"
             for call in sql_calls(path.read_text())}
    assert not found, "SQL outside curation/corpus.py:\n" + "\n".join(sorted(found))
    assert sql_calls("import sqlite3\ndb = sqlite3.connect('x')\ndb.execute('SELECT 1')\n")  # it can fail
