"""What stands for a source's content (its files' names, sizes, mtimes) and its digest."""

from __future__ import annotations

import hashlib
import os
from glob import escape as glob_escape
from pathlib import Path

from curation.manifest import is_url, natural_sorted
from curation.readers.base import IMAGE_EXTS
from curation.readers.dispatch import is_store_dir, is_zarr_dir
from curation.remote import remote_fingerprint

_ZARR_METADATA = (".zarray", ".zattrs", ".zgroup", "zarr.json")


def _zarr_metadata_files(root: Path) -> list[Path]:
    """Metadata files of a zarr store, groups descended, arrays not listed (an array folder may
    hold millions of chunk files)."""
    found, todo = [], [root]
    while todo:
        folder = todo.pop()
        found += [folder / m for m in _ZARR_METADATA if (folder / m).is_file()]
        is_array = (folder / ".zarray").is_file() or (
            (folder / "zarr.json").is_file() and '"array"' in (folder / "zarr.json").read_text(errors="replace"))
        if not is_array:
            todo += sorted(folder / n for n in os.listdir(folder) if (folder / n).is_dir())
    return found


def source_files(path: str | os.PathLike, key: str | None = None) -> list[Path]:
    """The files whose sizes and modification times stand for a source's content (no decoding).

    A file (with, for a detached NRRD header, its data files: same stem, same folder); a folder
    of slices: its image files; a zarr store: its metadata files only, since listing every chunk
    of a large store would cost minutes (so a chunk rewritten in place goes unnoticed); an N5 or
    precomputed folder: its ``info`` / ``attributes.json`` and those below ``key`` and its levels.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".nhdr":
            stem = p.name[: -len(".nhdr")]
            return [p] + sorted(q for q in p.parent.glob(glob_escape(stem) + ".*") if q != p and q.is_file())
        return [p]
    if is_zarr_dir(p):
        return _zarr_metadata_files(p)
    if is_store_dir(p):  # N5 / precomputed: the root's, the key's and the levels' metadata documents
        node = p / key.strip("/") if key else p
        found = [p / "info", p / "attributes.json", node / "attributes.json", *sorted(node.glob("*/attributes.json"))]
        return list(dict.fromkeys(f for f in found if f.is_file()))
    if p.is_dir():
        return [p / n for n in natural_sorted(os.listdir(p))
                if not n.startswith(".") and n.lower().endswith(IMAGE_EXTS) and (p / n).is_file()]
    return []


def source_fingerprint(path: str | os.PathLike, key: str | None = None) -> str:
    """A short digest of :func:`source_files`' names, sizes and mtimes: changes when the data does.
    A URL: a digest of its metadata documents and their ETags (ReaderError when unreachable)."""
    if is_url(os.fspath(path)):
        return remote_fingerprint(os.fspath(path), key)
    root = Path(path)
    digest = hashlib.sha1()
    for f in source_files(root, key):
        st = f.stat()
        rel = f.relative_to(root) if f != root and root in f.parents else f.name
        digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
