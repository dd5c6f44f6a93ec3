"""Registry of public vEM segmentation benchmarks (``benchmarks.yaml``).

Each entry records where the data is published (URL(s) and sha256 where the publisher gives one;
``None`` otherwise, never guessed), its licence and citation, voxel size, the task, and which
loader in :mod:`cemnet.benchmarks.datasets` reads its published layout. ``download`` lists the
files ``cemnet benchmark download`` fetches (see :mod:`cemnet.benchmarks.download`); otherwise
``--data-dir`` points at a local copy.
"""

from __future__ import annotations

import dataclasses
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

__all__ = ["BenchmarkEntry", "load_benchmarks", "load_with_overrides", "get_benchmark", "REGISTRY_FILE", "TASKS"]

REGISTRY_FILE = Path(__file__).with_name("benchmarks.yaml")
TASKS = ("semantic2d", "semantic3d", "instance3d")


@dataclasses.dataclass(frozen=True)
class BenchmarkEntry:
    """One benchmark: metadata plus the name of its loader."""

    name: str
    title: str
    task: str
    classes: tuple[str, ...]
    loader: str
    urls: tuple[dict[str, Any], ...]
    license: str
    citation: str
    layout: str
    voxel_size_nm: tuple[float, float, float] | None = None
    loader_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    default_split: str | None = None
    shared_dir: str | None = None
    tested_on_real_data: bool = False
    download: tuple[dict[str, Any], ...] = ()

    @property
    def num_classes(self) -> int:
        """Foreground classes (the model predicts ``num_classes`` logits for one class, else +1)."""
        return len(self.classes)

    def data_dir(self, data_dir: str | os.PathLike | None) -> Path:
        """Where the local copy is: ``data_dir`` itself, or ``data_dir/<shared_dir>`` when a
        shared-data root (holding many benchmarks) is given."""
        if data_dir is None:
            raise ValueError(f"{self.name}: pass --data-dir (a local copy of {self.urls[0]['url']})")
        root = Path(data_dir)
        if self.shared_dir and (root / self.shared_dir).is_dir():
            return root / self.shared_dir
        return root


def _entry(name: str, raw: dict[str, Any]) -> BenchmarkEntry:
    if raw.get("task") not in TASKS:
        raise ValueError(f"benchmark {name!r}: task must be one of {TASKS}, got {raw.get('task')!r}")
    urls = tuple(dict(u) for u in raw.get("urls", []))
    download = tuple(dict(u) for u in raw.get("download") or [])
    for u in urls + download:
        sha = u.get("sha256")
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower())):
            raise ValueError(f"benchmark {name!r}: bad sha256 {sha!r}")
    for d in download:
        if not d.get("url"):
            raise ValueError(f"benchmark {name!r}: a download entry has no url")
    vs = raw.get("voxel_size_nm")
    return BenchmarkEntry(
        name=name,
        title=raw["title"],
        task=raw["task"],
        classes=tuple(raw["classes"]),
        loader=raw["loader"],
        urls=urls,
        license=raw.get("license", ""),
        citation=raw.get("citation", ""),
        layout=raw.get("layout", ""),
        voxel_size_nm=tuple(float(v) for v in vs) if vs else None,  # type: ignore[arg-type]
        loader_kwargs=dict(raw.get("loader_kwargs") or {}),
        default_split=raw.get("default_split"),
        shared_dir=raw.get("shared_dir"),
        tested_on_real_data=bool(raw.get("tested_on_real_data", False)),
        download=download,
    )


def _raw(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ValueError(f"{path}: expected a mapping of benchmark names to entries")
    return raw


@lru_cache(maxsize=8)
def _load(path: str) -> dict[str, BenchmarkEntry]:
    return {name: _entry(name, spec) for name, spec in _raw(path).items()}


def load_with_overrides(path: str | os.PathLike | None) -> dict[str, BenchmarkEntry]:
    """The built-in registry with the entries of YAML file ``path`` merged over it, key by key:
    ``{lucchi_pp: {download: [{url: https://mirror/...}]}}`` points one benchmark at a mirror and
    keeps the rest of its entry; a name not built in must be a complete entry."""
    if path is None:
        return load_benchmarks()
    raw = _raw(REGISTRY_FILE)
    for name, spec in _raw(path).items():
        raw[name] = {**raw.get(name, {}), **spec}
    return {name: _entry(name, spec) for name, spec in raw.items()}


def load_benchmarks(path: str | os.PathLike | None = None) -> dict[str, BenchmarkEntry]:
    """All registered benchmarks (the built-in YAML, or ``path``)."""
    return dict(_load(str(path or REGISTRY_FILE)))


def get_benchmark(name: str, path: str | os.PathLike | None = None) -> BenchmarkEntry:
    """One benchmark by name; a clear error lists the known names."""
    entries = load_benchmarks(path)
    if name not in entries:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(entries))}")
    return entries[name]
