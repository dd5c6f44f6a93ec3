"""Registry of downloadable pretrained encoders: name -> url, file, sha256, arch, stats, licence.

Registries are YAML (or JSON) files ``{"version": 1, "weights": {NAME: {...}}}``. The built-in
one ships inside the package (``registry.yaml`` next to this module); users add their own with
``--registry FILE`` / ``registry=[...]`` or the environment variable ``CEMNET_REGISTRY`` (paths
separated by ``os.pathsep``). Later sources override earlier ones entry by entry:
built-in < ``CEMNET_REGISTRY`` < explicit files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

BUILTIN_REGISTRY = Path(__file__).with_name("registry.yaml")
REGISTRY_ENV = "CEMNET_REGISTRY"
SCHEMA_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RegistryError(ValueError):
    """A registry file is malformed or a name is not registered."""


@dataclass
class WeightsEntry:
    """One downloadable encoder. ``None`` values are read from the file itself when loading."""

    name: str
    url: str
    file_name: str = ""
    sha256: str | None = None
    arch: str | None = None
    in_chans: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    method: str | None = None
    license: str | None = None
    citation: str | None = None
    description: str | None = None
    registry: str | None = field(default=None, compare=False)  # file it came from; not written

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise RegistryError(f"invalid weights name {self.name!r} (letters, digits, '.', '_', '-')")
        if not self.file_name:
            self.file_name = Path(urlparse(self.url).path).name
        if not self.file_name or "/" in self.file_name or self.file_name.startswith("."):
            raise RegistryError(f"{self.name}: invalid file name {self.file_name!r}")
        if self.sha256 is not None:
            self.sha256 = str(self.sha256).lower()
            if not _SHA256.match(self.sha256):
                raise RegistryError(f"{self.name}: sha256 must be 64 hex digits or null, got {self.sha256!r}")

    def to_record(self) -> dict[str, Any]:
        """Mapping written under ``weights: NAME:`` (without the name and origin)."""
        record = asdict(self)
        record.pop("name")
        record.pop("registry")
        return record


def read_registry_file(path: str | Path) -> dict[str, WeightsEntry]:
    """Entries of one registry file (YAML or JSON)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise RegistryError(f"cannot read registry {path}: {err}") from err
    if not isinstance(data, Mapping) or not isinstance(data.get("weights", {}), Mapping):
        raise RegistryError(f"{path}: expected a mapping with a 'weights' mapping")
    if int(data.get("version", SCHEMA_VERSION)) > SCHEMA_VERSION:
        raise RegistryError(f"{path}: registry schema version {data['version']} is newer than this cemnet")
    known = {f.name for f in fields(WeightsEntry)} - {"name", "registry"}
    entries: dict[str, WeightsEntry] = {}
    for name, record in (data.get("weights") or {}).items():
        if not isinstance(record, Mapping) or "url" not in record:
            raise RegistryError(f"{path}: entry {name!r} needs at least a 'url'")
        unknown = set(record) - known
        if unknown:
            raise RegistryError(f"{path}: entry {name!r} has unknown fields {sorted(unknown)}")
        entries[str(name)] = WeightsEntry(name=str(name), registry=str(path), **record)
    return entries


def registry_files(extra: Iterable[str | Path] | None = None) -> list[Path]:
    """Registry files in override order: built-in, then ``$CEMNET_REGISTRY``, then ``extra``."""
    env = [p for p in os.environ.get(REGISTRY_ENV, "").split(os.pathsep) if p]
    return [BUILTIN_REGISTRY, *map(Path, env), *map(Path, extra or [])]


def load_registry(extra: Iterable[str | Path] | str | Path | None = None) -> dict[str, WeightsEntry]:
    """All entries, later files overriding earlier ones by name."""
    if isinstance(extra, (str, Path)):
        extra = [extra]
    merged: dict[str, WeightsEntry] = {}
    for path in registry_files(extra):
        merged.update(read_registry_file(path))
    return merged


def get_entry(name: str, registry: Iterable[str | Path] | str | Path | None = None) -> WeightsEntry:
    """The entry called ``name``; :class:`RegistryError` listing the known names otherwise."""
    entries = load_registry(registry)
    if name not in entries:
        raise RegistryError(f"no weights named {name!r}; registered: {', '.join(sorted(entries)) or 'none'}")
    return entries[name]


def write_entry(path: str | Path, entry: WeightsEntry) -> Path:
    """Add or replace ``entry`` in the registry file ``path`` (created if missing).

    ``.json`` files are written as JSON, anything else as YAML. Other entries are kept as they
    are; the file is replaced atomically.
    """
    path = Path(path)
    data: dict[str, Any] = {"version": SCHEMA_VERSION, "weights": {}}
    if path.exists():
        existing = read_registry_file(path)  # validates before we touch it
        data["weights"] = {name: e.to_record() for name, e in existing.items()}
    data["weights"][entry.name] = entry.to_record()
    text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
