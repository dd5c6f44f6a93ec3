"""Source specifications and manifests for ``cemnet curate``.

A :class:`SourceSpec` says where one source is and how to read it (voxel size override, axis order,
HDF5/zarr key, OME-Zarr scale level, channel, folder-as-stack). A manifest is a YAML or CSV list of
them (:func:`read_manifest`). This module has no format dependencies, so the CLI, the corpus index
and the readers import it at their top; the readers (:mod:`curation.readers`) import it, never
the reverse: expanding a manifest's folder entries into sources is
:func:`curation.readers.load_manifest`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

AXIS_LETTERS = "tczyxs"  # time, channel, z, y, x, colour samples (RGB(A) -> grey)
_SPEC_FIELDS = ("name", "path", "voxel_size", "axes", "key", "scale_level", "channel", "stack", "dataset",
                "roi", "roi_unit", "max_patches", "sample_fraction", "missing_chunks")
_ALIASES = {"scale": "scale_level"}  # manifest spellings accepted for a field
ROI_UNITS = ("voxel", "nm")
MISSING_CHUNKS = ("fill", "error")
_URL = re.compile(r"^(https?|s3a?|gs|gcs|precomputed)://", re.IGNORECASE)
_TRUE, _FALSE = {"true", "yes", "y", "1", "on"}, {"false", "no", "n", "0", "off", ""}
# Suffixes stripped as a whole when deriving a name ("a.ome.zarr" -> "a", "b.nii.gz" -> "b").
_COMPOUND = re.compile(r"(\.ome)?(\.[A-Za-z0-9]{1,5})?(\.(gz|bz2))?$")


class ReaderError(Exception):
    """Bad input. ``str(err) == f"{path}: {problem}"``; attributes ``.path`` and ``.problem``."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable across worker processes despite the 2-argument __init__
        return (type(self), (self.path, self.problem))


def is_url(path: Any) -> bool:
    """True for a source given as a URL (``http(s)://``, ``s3://``, ``gs://``, ``precomputed://``):
    never a path, so never resolved, normalised or stat-ed as one."""
    return isinstance(path, str) and bool(_URL.match(path.strip()))


def url_parts(url: str) -> tuple[str, ...]:
    """Host and path components of a URL (the ``parts`` of a path, for naming)."""
    import urllib.parse

    split = urllib.parse.urlsplit(url.split("://", 1)[1] if url.lower().startswith("precomputed://") else url)
    return (split.netloc, *[p for p in split.path.split("/") if p])


def _as_int(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return number


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in _TRUE:
        return True
    if str(value).strip().lower() in _FALSE:
        return False
    raise ValueError(f"{what} must be true or false, got {value!r}")


def parse_voxel_size(value: Any) -> tuple[float, float, float] | None:
    """``"z,y,x"`` / ``"ZxYxX"`` / ``[z, y, x]`` in nm, or one number (isotropic) -> tuple; None if empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,;x\s]+", value.strip().strip("[]()")) if p]
    else:
        parts = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        numbers = ()
    numbers = numbers * 3 if len(numbers) == 1 else numbers
    if len(numbers) != 3 or not all(math.isfinite(n) and n > 0 for n in numbers):
        raise ValueError(f"voxel_size must be 3 positive numbers (z,y,x in nm), got {value!r}")
    return numbers  # type: ignore[return-value]


def check_axes(axes: str) -> str:
    """Validate an axis-order string such as ``"zyx"``, ``"xyz"``, ``"tczyx"`` (lower-cased)."""
    letters = axes.strip().lower()
    if (
        not letters
        or set(letters) - set(AXIS_LETTERS)
        or len(set(letters)) != len(letters)
        or not {"y", "x"} <= set(letters)
    ):
        raise ValueError(
            f"axes must use each of the letters {', '.join(AXIS_LETTERS)} at most once and "
            f"contain y and x, got {axes!r}"
        )
    return letters


@dataclass
class SourceSpec:
    """One entry of a manifest / one CLI path. Values are validated and normalised on creation."""

    path: str
    name: str | None = None  # default: derived from the file/folder name (see assign_names)
    voxel_size: tuple[float, float, float] | None = None  # (z, y, x) nm override
    axes: str | None = None  # axis order of the stored array, e.g. "zyx", "xyz", "tczyx"
    key: str | None = None  # hdf5 dataset / zarr array path
    scale_level: int = 0  # OME-Zarr multiscale level
    channel: int | None = None
    stack: bool = False  # path is a folder of 2D slices -> one volume
    # Near-duplicates are removed within a dataset (CEM500K): default the source itself; sources
    # found under one folder argument / manifest folder entry share that folder's dataset.
    dataset: str | None = None
    # A region of interest [z0, z1, y0, y1, x0, x1] (half-open) in ``roi_unit`` ("voxel" or "nm",
    # nm taken at the chosen level's voxel size): only this box of the volume is read.
    roi: tuple[float, float, float, float, float, float] | None = None
    roi_unit: str = "voxel"
    # A sampling budget: whole chunk-aligned blocks drawn (seeded) until about ``max_patches``
    # patches, or ``sample_fraction`` of the blocks (see curation.remote_sampling).
    max_patches: int | None = None
    sample_fraction: float | None = None
    missing_chunks: str = "fill"  # zarr chunks absent from the store: "fill" (reported) or "error"

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path).strip():
            raise ValueError(f"path must be a non-empty string, got {self.path!r}")
        self.path = os.fspath(self.path)
        if self.name is not None:
            self.name = str(self.name).strip() or None
            if self.name is not None and safe_name(self.name) != self.name:
                raise ValueError(
                    f"name must use only letters, digits, '.', '_' and '-' (got {self.name!r})"
                )
        self.voxel_size = parse_voxel_size(self.voxel_size)
        self.axes = check_axes(self.axes) if self.axes not in (None, "") else None
        if self.key is not None:
            self.key = str(self.key).strip() or None
        self.scale_level = _as_int(self.scale_level if self.scale_level != "" else 0, "scale_level")
        self.channel = None if self.channel in (None, "") else _as_int(self.channel, "channel")
        self.stack = _as_bool(self.stack, "stack")
        self.dataset = None if self.dataset in (None, "") else safe_name(str(self.dataset))
        self.roi = _parse_roi(self.roi)
        self.roi_unit = str(self.roi_unit or "voxel").strip().lower()
        if self.roi_unit in ("voxels", "px", "vx"):
            self.roi_unit = "voxel"
        if self.roi_unit not in ROI_UNITS:
            raise ValueError(f"roi_unit must be one of {', '.join(ROI_UNITS)}, got {self.roi_unit!r}")
        self.max_patches = None if self.max_patches in (None, "") else _as_int(self.max_patches, "max_patches", 1)
        if self.sample_fraction not in (None, ""):
            try:
                fraction = float(self.sample_fraction)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                fraction = float("nan")
            if not 0 < fraction <= 1:
                raise ValueError(f"sample_fraction must be a number in (0, 1], got {self.sample_fraction!r}")
            self.sample_fraction = fraction
        else:
            self.sample_fraction = None
        if self.max_patches is not None and self.sample_fraction is not None:
            raise ValueError("give max_patches or sample_fraction, not both")
        self.missing_chunks = str(self.missing_chunks or "fill").strip().lower()
        if self.missing_chunks not in MISSING_CHUNKS:
            raise ValueError(f"missing_chunks must be one of {', '.join(MISSING_CHUNKS)}, got {self.missing_chunks!r}")

    def to_json(self) -> dict:
        """Plain JSON-able dict (voxel_size as a list); inverse of :meth:`from_json`."""
        d = dataclasses.asdict(self)
        d["voxel_size"] = list(self.voxel_size) if self.voxel_size else None
        d["roi"] = list(self.roi) if self.roi else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SourceSpec":
        """Build from a dict with the field names above; unknown keys are an error (typos)."""
        if not isinstance(d, dict):
            raise ValueError(f"a source must be a mapping or a path string, got {type(d).__name__}")
        d = {_ALIASES.get(k, k): v for k, v in d.items()}
        unknown = sorted(set(d) - set(_SPEC_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; allowed: {', '.join(_SPEC_FIELDS)}")
        if "path" not in d:
            raise ValueError("missing 'path'")
        return cls(**{k: v for k, v in d.items()})


def _parse_roi(value: Any) -> tuple[float, ...] | None:
    """``[z0, z1, y0, y1, x0, x1]`` (list or "z0,z1,...") -> tuple of 6 numbers with z0 < z1 etc."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = [p for p in re.split(r"[,;\s]+", value.strip().strip("[]()")) if p] if isinstance(value, str) else value
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 6 or not all(math.isfinite(n) and n >= 0 for n in numbers) or not all(
        numbers[i] < numbers[i + 1] for i in (0, 2, 4)
    ):
        raise ValueError(f"roi must be [z0, z1, y0, y1, x0, x1] with 0 <= start < stop on each axis, got {value!r}")
    return tuple(int(n) if n.is_integer() else n for n in numbers)  # type: ignore[return-value]


def safe_name(text: str) -> str:
    """Filesystem-safe version of ``text``: runs of other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "source"


def default_name(path: str | os.PathLike) -> str:
    """Name derived from the file/folder name, without (compound) extension."""
    if is_url(os.fspath(path)):
        base = (url_parts(os.fspath(path)) or ("source",))[-1]
        stem = re.sub(r"\.precomputed$", "", base, flags=re.IGNORECASE)
        return safe_name(_COMPOUND.sub("", stem) or stem)
    base = os.path.basename(os.path.normpath(os.fspath(path)))
    stem = _COMPOUND.sub("", base) if not os.path.isdir(path) or base.lower().endswith(".zarr") else base
    return safe_name(stem or base)


def assign_names(specs: Iterable[SourceSpec]) -> list[SourceSpec]:
    """Give every spec without a name a unique one; explicit names must be unique already.

    Colliding derived names take parent folder names until they differ
    (``mito/binary/fib1.nii.gz`` -> ``binary_fib1``), then a ``-2``, ``-3`` suffix.
    """
    specs = list(specs)
    explicit = [s.name for s in specs if s.name]
    dupes = sorted({n for n in explicit if explicit.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate source name(s) {dupes}")
    todo = [i for i, s in enumerate(specs) if not s.name]
    # a URL's host and folders play the part of a path's folders (the first entry, like a path's
    # root, is never prepended)
    parts = {i: ("url",) + url_parts(specs[i].path)[:-1] if is_url(specs[i].path)
             else Path(os.path.normpath(os.path.abspath(specs[i].path))).parts[:-1] for i in todo}
    depth = {i: 0 for i in todo}
    names = {i: default_name(specs[i].path) for i in todo}
    while True:
        clash = []
        for name in set(names.values()):
            members = [i for i in todo if names[i] == name]
            # parents can only separate files in different folders (or from an explicit name)
            if len({parts[i] for i in members}) > 1 or (name in explicit and members):
                clash += [i for i in members if depth[i] < len(parts[i]) - 1]
        if not clash:
            break
        for i in clash:  # prepend one more parent folder to every colliding derived name
            depth[i] += 1
            names[i] = safe_name(parts[i][-depth[i]]) + "_" + names[i]
    used = set(explicit)
    for i in todo:
        name, k = names[i], 2
        while name in used:
            name, k = f"{names[i]}-{k}", k + 1
        used.add(name)
        specs[i] = dataclasses.replace(specs[i], name=name)
    return specs


def _yaml_entries(text: str) -> tuple[list, list[int]]:
    """Parse YAML; return the list of entries and the 1-based line of each (for error messages)."""
    data = yaml.safe_load(text)
    node = yaml.compose(text)
    if isinstance(data, dict) and set(data) == {"sources"}:
        data = data["sources"]
        node = next(v for k, v in node.value if k.value == "sources")
    if not isinstance(data, list):
        raise ValueError("expected a list of sources, or a mapping with a 'sources' list")
    return data, [item.start_mark.line + 1 for item in node.value]


def _csv_entries(text: str) -> tuple[list, list[int]]:
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or []]
    if "path" not in header or set(header) - set(_SPEC_FIELDS) - set(_ALIASES):
        raise ValueError(f"CSV header must name 'path' and only {', '.join(_SPEC_FIELDS)}; got {header}")
    entries, lines = [], []
    for row in reader:
        if None in row:
            raise ValueError(f"line {reader.line_num}: more values than header columns")
        entries.append({k.strip(): (v or "").strip() for k, v in row.items() if (v or "").strip()})
        lines.append(reader.line_num)
    return entries, lines


def read_manifest(path: str | os.PathLike) -> list[SourceSpec]:
    """The entries of a YAML (list of mappings, or ``{sources: [...]}``) or CSV manifest, as written.

    CSV header: ``name,path,voxel_size,axes,key,scale_level,channel,stack`` (``path`` required,
    other columns optional, ``voxel_size`` as ``"z,y,x"``). A YAML entry may also be a bare path.
    Relative paths are resolved against the manifest's folder; URLs are taken as written. Raises
    ReaderError naming the file and the entry/line of a bad entry. Folders are not expanded and
    names not derived: :func:`curation.readers.load_manifest` does both.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ReaderError(path, f"cannot read manifest ({e})") from e
    try:
        entries, lines = _csv_entries(text) if path.suffix.lower() == ".csv" else _yaml_entries(text)
    except (ValueError, yaml.YAMLError, csv.Error) as e:
        raise ReaderError(path, f"invalid manifest: {e}".replace("\n", " ")) from e
    specs = []
    for number, (entry, line) in enumerate(zip(entries, lines), start=1):
        try:
            spec = SourceSpec(entry) if isinstance(entry, str) else SourceSpec.from_json(entry)
        except (ValueError, TypeError) as e:
            raise ReaderError(path, f"entry {number} (line {line}): {e}") from e
        if not is_url(spec.path):  # a URL is taken as written
            full = os.path.expanduser(spec.path)
            full = os.path.normpath(full if os.path.isabs(full) else os.path.join(path.resolve().parent, full))
            spec = dataclasses.replace(spec, path=full)
        specs.append(spec)
    return specs


def natural_key(text: str) -> tuple:
    """Sort key putting ``iso.2.png`` before ``iso.10.png`` (ties broken by the raw string)."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)) + (text,)


def natural_sorted(items: Sequence[str]) -> list[str]:
    return sorted(items, key=natural_key)
