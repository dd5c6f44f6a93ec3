"""``cemnet benchmark download``: fetch a registered benchmark from its publisher, verified.

Each entry of a benchmark's ``download`` list in ``benchmarks.yaml`` names one file::

    download:
      - url: https://github.com/CRBS/cdeep3m/archive/<commit>.zip
        sha256: null            # the publisher's checksum when one is known, else null (never guessed)
        archive: zip            # zip | tar (also .tar.gz/.tgz/.tar.bz2/.tar.xz) | none; default: from the name
        member: cdeep3m-<commit>/mito_testsample   # folder of the archive to extract (default: all of it)
        rename: {train/image: train/images}        # archive folder -> local folder (optional)

What happens, in order, for ``cemnet benchmark download NAME --data-dir DIR``:

1. **fetch** with pooch, through a downloader that resumes: bytes arrive in
   ``DIR/.downloads/FILE.part`` and an interrupted or truncated transfer continues from there with
   an HTTP Range request on the next run (a server that ignores Range restarts it). A progress
   bar shows bytes. A registry sha256 is checked by pooch; a wrong file is deleted.
2. **lock**: size and sha256 of every fetched file are recorded on first download in
   ``DIR/cemnet-download.lock.json`` and every later run verifies the kept files against it (a
   publisher that silently changes a file, or a corrupted copy, is an error naming both values).
3. **extract** zip/tar archives into ``DIR`` (only ``member``, renamed by ``rename``); every entry
   is checked first and an archive with an absolute path, a ``..`` component or a link is refused
   before anything is written.
4. **layout check**: the benchmark's own loader (:func:`~cemnet.benchmarks.datasets.load_benchmark`)
   reads ``DIR``; its error, if any, is reported as the layout problem.

A second run is cheap: files whose lock entry matches are neither fetched nor extracted again.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from cemnet.benchmarks.registry import BenchmarkEntry

__all__ = ["DownloadError", "LOCK_NAME", "download_benchmark", "safe_extract", "sha256_of"]

log = logging.getLogger(__name__)

LOCK_NAME = "cemnet-download.lock.json"
DOWNLOADS = ".downloads"
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class DownloadError(RuntimeError):
    """A fetch, verification, extraction or layout problem; the message names the file."""


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- fetch


@dataclasses.dataclass
class ResumingDownloader:
    """A pooch downloader that keeps partial bytes in ``part`` and resumes with HTTP Range."""

    part: Path
    progress: bool = True
    timeout: float = 60.0

    def __call__(self, url: str, output_file: Any, pooch: Any = None, check_only: bool = False) -> Any:
        import requests
        from tqdm.auto import tqdm

        if check_only:
            return requests.head(url, timeout=self.timeout, allow_redirects=True).ok
        have = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as r:
                if have and r.status_code == 416:  # the part file is already complete
                    total = have
                else:
                    if r.status_code >= 400:
                        raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}")
                    if r.status_code != 206:  # Range ignored: start over
                        have = 0
                    total = have + int(r.headers.get("Content-Length", 0) or 0)
                    with open(self.part, "ab" if have else "wb") as fh, tqdm(
                            total=total or None, initial=have, unit="B", unit_scale=True, desc=self.part.name[:-5],
                            disable=not self.progress, leave=False) as bar:
                        for block in r.iter_content(1 << 16):
                            fh.write(block)
                            bar.update(len(block))
        except requests.RequestException as err:
            got = self.part.stat().st_size if self.part.exists() else 0
            raise DownloadError(f"{url}: transfer interrupted after {got} bytes ({type(err).__name__}); they are kept "
                                f"in {self.part}: run the same command again to resume") from None
        got = self.part.stat().st_size
        if total and got != total:
            raise DownloadError(f"{url}: truncated: {got} of {total} bytes; run the same command again to resume")
        shutil.copyfile(self.part, output_file)  # pooch hashes this copy, then moves it into place
        self.part.unlink()
        return None


def _file_name(item: dict[str, Any]) -> str:
    name = item.get("file") or PurePosixPath(urlparse(item["url"]).path).name
    if not name or "/" in name or name in (".", ".."):
        raise DownloadError(f"{item['url']}: cannot name the downloaded file; give it a 'file' field")
    return name


def _archive_kind(item: dict[str, Any], name: str) -> str:
    kind = item.get("archive")
    if kind:
        kind = {"tar.gz": "tar", "tgz": "tar", "tar.bz2": "tar", "tar.xz": "tar"}.get(kind, kind)
        if kind not in ("zip", "tar", "none"):
            raise DownloadError(f"{item['url']}: unknown archive format {item['archive']!r} (zip, tar, tar.gz, none)")
        return kind
    low = name.lower()
    return "zip" if low.endswith(".zip") else "tar" if low.endswith(_TAR_SUFFIXES) else "none"


def _fetch(item: dict[str, Any], folder: Path, name: str, progress: bool) -> Path:
    import pooch

    folder.mkdir(parents=True, exist_ok=True)
    sha = item.get("sha256")
    downloader = ResumingDownloader(folder / (name + ".part"), progress=progress)
    # pooch's own logger (bound to the stderr of import time) would repeat what we report ourselves
    plog = pooch.get_logger()
    level = plog.level
    plog.setLevel(logging.ERROR)
    try:
        return Path(pooch.retrieve(item["url"], known_hash=f"sha256:{sha}" if sha else None, fname=name,
                                   path=folder, downloader=downloader, progressbar=False))
    except ValueError as err:  # pooch: hash mismatch (the file is removed)
        raise DownloadError(f"{item['url']}: {err}") from None
    finally:
        plog.setLevel(level)


# --------------------------------------------------------------------------- lock


def _read_lock(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"files": {}}
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DownloadError(f"{path}: unreadable lock file ({err}); fix or delete it") from None
    lock.setdefault("files", {})
    return lock


def _write_lock(path: Path, lock: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _verify_or_record(lock: dict[str, Any], lock_path: Path, name: str, path: Path, url: str) -> dict[str, Any]:
    size, sha = path.stat().st_size, sha256_of(path)
    rec = lock["files"].get(name)
    if rec is None:
        rec = {"url": url, "size": size, "sha256": sha, "first_fetched": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        lock["files"][name] = rec
        _write_lock(lock_path, lock)
        log.info("%s: %d bytes, sha256 %s (recorded in %s)", name, size, sha, lock_path)
    elif (rec["size"], rec["sha256"]) != (size, sha):
        raise DownloadError(f"{path}: differs from the first download recorded in {lock_path} (size {size} vs {rec['size']}, "
                            f"sha256 {sha} vs {rec['sha256']}): the publisher changed the file or this copy is corrupt; "
                            f"delete it and its lock entry to accept a new version")
    return rec


# --------------------------------------------------------------------------- extract


def _target(rel: str, member: str, rename: dict[str, str]) -> str | None:
    """Local path (posix, relative) of archive entry ``rel``, or None when outside ``member``."""
    rel = rel.replace("\\", "/").rstrip("/")
    if member:
        m = member.strip("/")
        if rel != m and not rel.startswith(m + "/"):
            return None
        rel = rel[len(m):].lstrip("/")
    for src in sorted(rename, key=len, reverse=True):
        s = src.strip("/")
        if rel == s or rel.startswith(s + "/"):
            rel = rename[src].strip("/") + rel[len(s):]
            break
    return rel


def _check_entry(archive: Path, name: str, is_link: bool) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise DownloadError(f"{archive}: entry {name!r} points outside the target folder; refusing to extract anything")
    if is_link:
        raise DownloadError(f"{archive}: entry {name!r} is a link; refusing to extract anything")


def safe_extract(archive: Path, dest: Path, kind: str, member: str = "", rename: dict[str, str] | None = None) -> int:
    """Extract ``member`` of a zip/tar ``archive`` into ``dest``; returns the number of files.

    Every entry is checked before anything is written: absolute paths, ``..`` and links are
    refused (:class:`DownloadError`), as is a file that is not an archive of ``kind``.
    """
    rename = dict(rename or {})
    dest.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        if not zipfile.is_zipfile(archive):
            raise DownloadError(f"{archive}: not a zip archive (wrong file served?)")
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_entry(archive, info.filename, stat.S_ISLNK(info.external_attr >> 16))
            count = 0
            for info in infos:
                rel = _target(info.filename, member, rename)
                if rel is None or info.is_dir() or not rel:
                    continue
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
    elif kind == "tar":
        try:
            tf = tarfile.open(archive)
        except tarfile.TarError:
            raise DownloadError(f"{archive}: not a tar archive (wrong file served?)") from None
        with tf:
            members = tf.getmembers()
            for m in members:
                _check_entry(archive, m.name, m.issym() or m.islnk() or not (m.isfile() or m.isdir()))
            count = 0
            for m in members:
                rel = _target(m.name, member, rename)
                if rel is None or not m.isfile() or not rel:
                    continue
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                assert src is not None  # regular file
                with src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
    else:
        raise DownloadError(f"{archive}: unknown archive kind {kind!r}")
    if member and count == 0:
        raise DownloadError(f"{archive}: no files under {member!r} (wrong archive?)")
    return count


# --------------------------------------------------------------------------- the command


@dataclasses.dataclass
class DownloadResult:
    """What ``download_benchmark`` did: files with their size/sha256 and the loaded data summary."""

    data_dir: Path
    files: dict[str, dict[str, Any]]
    summary: str
    lock: Path


def _layout_check(entry: BenchmarkEntry, data_dir: Path) -> str:
    from cemnet.benchmarks.datasets import load_benchmark

    try:
        return load_benchmark(entry, data_dir).summary()
    except (OSError, ValueError, KeyError) as err:
        raise DownloadError(f"{data_dir}: layout check failed for {entry.name} ({entry.layout}): {err}") from None


def download_benchmark(entry: BenchmarkEntry, data_dir: str | os.PathLike, progress: bool = True) -> DownloadResult:
    """Fetch, verify, extract and check one benchmark into ``data_dir`` (see the module docstring)."""
    if not entry.download:
        pages = ", ".join(u["url"] for u in entry.urls) or "none"
        raise DownloadError(f"{entry.name}: no downloadable files are registered (publisher pages: {pages}); fetch it by "
                            "hand, or give a registry file with a 'download' list (--registry)")
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / LOCK_NAME
    lock = _read_lock(lock_path)
    lock["benchmark"] = entry.name
    for i, item in enumerate(entry.download, 1):
        name = _file_name(item)
        kind = _archive_kind(item, name)
        log.info("[%d/%d] %s", i, len(entry.download), item["url"])
        path = _fetch(item, root / DOWNLOADS if kind != "none" else root, name, progress)
        rec = _verify_or_record(lock, lock_path, name, path, item["url"])
        if kind != "none" and not rec.get("extracted"):
            rec["extracted"] = safe_extract(path, root, kind, item.get("member") or "", item.get("rename"))
            _write_lock(lock_path, lock)
            log.info("extracted %d files from %s", rec["extracted"], name)
    try:
        summary = _layout_check(entry, root)
    except DownloadError:
        # files may have been removed since they were extracted: extract once more, then judge
        for item in entry.download:
            name = _file_name(item)
            kind = _archive_kind(item, name)
            if kind != "none":
                safe_extract(root / DOWNLOADS / name, root, kind, item.get("member") or "", item.get("rename"))
        summary = _layout_check(entry, root)
    return DownloadResult(root, dict(lock["files"]), summary, lock_path)
