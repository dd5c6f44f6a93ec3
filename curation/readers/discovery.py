"""Files, folders and manifests -> sources (:class:`SourceSpec`), in a deterministic order."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

from curation.manifest import (
    ReaderError,
    SourceSpec,
    assign_names,
    default_name,
    is_url,
    natural_sorted,
    read_manifest,
    safe_name,
)
from curation.readers.base import IMAGE_EXTS
from curation.readers.dispatch import is_store_dir, reader_for
from curation.readers.stack import probe_2d


def discover(
    paths: Sequence[str | os.PathLike], *, stack_folders: bool = False
) -> tuple[list[SourceSpec], list[tuple[str, str]]]:
    """Expand files and folders (recursively) into sources, in a deterministic (natural) order.

    Each readable file is one source; a zarr folder is one source (not descended into); with
    ``stack_folders`` a folder whose readable files are >= 2 same-shape 2D images becomes one
    stacked volume. Returns ``(specs, skipped)`` with ``skipped = [(path, problem)]`` for
    missing paths, empty files and unknown / compressed file types. Files are not decoded.
    """
    specs: list[SourceSpec] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()  # sources added (real paths): overlapping inputs give each once
    walked: set[str] = set()  # folders visited: guards against symlink loops

    dataset: str | None = None  # the folder argument being walked: its sources form one dataset

    def add(path: Path, stack: bool = False) -> None:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            specs.append(SourceSpec(str(path), stack=stack, dataset=dataset))

    def visit_file(path: Path) -> bool:
        problem = reader_for(path)
        if not isinstance(problem, str) and path.stat().st_size == 0:
            problem = "empty file (0 bytes)"
        if isinstance(problem, str):
            skipped.append((str(path), problem))
            return False
        return True

    def walk(folder: Path) -> None:
        if os.path.realpath(folder) in walked:
            return  # symlink loop or folder given twice
        walked.add(os.path.realpath(folder))
        entries = [folder / n for n in natural_sorted(os.listdir(folder)) if not n.startswith(".")]
        files = [e for e in entries if e.is_file() and visit_file(e)]
        if stack_folders and _stackable(files):
            add(folder, stack=True)
        else:
            for f in files:
                add(f)
        for d in (e for e in entries if e.is_dir()):
            if is_store_dir(d):
                add(d)
            else:
                walk(d)

    for raw in paths:
        if is_url(os.fspath(raw)):  # a URL is one source, checked when it is opened
            if os.fspath(raw) not in seen:
                seen.add(os.fspath(raw))
                specs.append(SourceSpec(os.fspath(raw)))
            continue
        p = Path(raw)
        if not p.exists():
            skipped.append((str(p), "does not exist"))
        elif is_store_dir(p):
            add(p)
        elif p.is_dir():
            dataset = default_name(p)
            walk(p)
            dataset = None
        elif visit_file(p):
            add(p)
    return assign_names(specs), skipped


def _stackable(files: list[Path]) -> bool:
    """>= 2 files, all 2D images with one shape and dtype (headers only)."""
    if len(files) < 2 or not all(f.name.lower().endswith(IMAGE_EXTS) for f in files):
        return False
    try:
        return len({probe_2d(str(f)) for f in files}) == 1
    except ReaderError:
        return False


def load_manifest(path: str | os.PathLike, skipped: list | None = None) -> list[SourceSpec]:
    """Read a YAML or CSV manifest (:func:`curation.manifest.read_manifest`) into sources.

    An entry naming a plain folder (not ``stack``, not a zarr / N5 / precomputed store) expands
    into every readable source below it (:func:`discover`), sharing the entry's options, named
    ``<entry name>_<file name>``, all in one dedup dataset; files there that cannot be used are
    appended to ``skipped`` as ``(path, problem)``. Missing names are derived (unique). Raises
    ReaderError naming the manifest (and the entry / line of a bad entry).
    """
    specs: list[SourceSpec] = []
    for spec in read_manifest(path):
        if not is_url(spec.path) and os.path.isdir(spec.path) and not spec.stack and not _is_store(spec.path):
            specs.extend(_expand_folder_entry(spec, skipped))
        else:
            specs.append(spec)
    if not specs:
        raise ReaderError(path, "manifest lists no sources")
    try:
        return assign_names(specs)
    except ValueError as e:
        raise ReaderError(path, str(e)) from e


def _expand_folder_entry(spec: SourceSpec, skipped: list | None) -> list[SourceSpec]:
    """A manifest entry naming a plain folder: every readable source below it, sharing the
    entry's options, named ``<entry name>_<file name>``, all in one dedup dataset."""
    found, not_used = discover([spec.path])
    if skipped is not None:
        skipped.extend(not_used)
    prefix = spec.name or default_name(spec.path)
    return [
        dataclasses.replace(
            spec, path=f.path, stack=f.stack, name=safe_name(f"{prefix}_{f.name}"),
            dataset=spec.dataset or prefix,
        )
        for f in found
    ]


def _is_store(path: str) -> bool:
    return path.lower().endswith(".zarr") or is_store_dir(path)
