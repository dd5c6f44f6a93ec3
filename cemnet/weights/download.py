"""Verified, resumable, cached downloads of registered weights.

Cache folder (first that applies): ``cache_dir=``/``--cache-dir``; ``$CEMNET_CACHE``;
``$TORCH_HOME/hub/checkpoints/cemnet``; ``$XDG_CACHE_HOME/torch/hub/checkpoints/cemnet``;
``~/.cache/torch/hub/checkpoints/cemnet`` (torch hub's own layout, computed here without
importing torch so the CLI stays fast; ``torch.hub.set_dir`` is not consulted).

A transfer goes to ``<file>.part`` next to the target, resumes it with an HTTP ``Range``
request (restarting when the server ignores ``Range``), retries transient failures (connection
errors, truncated bodies, HTTP 408/429/5xx) a bounded number of times with exponential backoff,
and is renamed into place only after its sha256 matches, so a bad file never lands in the cache.
A cached file that verifies is used without touching the network.

Checksum policy: the expected sha256 comes from (first that is set) ``sha256=``/``--sha256``,
``$CEMNET_SHA256_<NAME>`` (name upper-cased, non-alphanumerics as ``_``), the registry entry, or a
hash recorded earlier by a trusted-on-first-use download (``<file>.sha256`` in the cache). With
none of these, downloading needs ``trust_unverified=True`` (``--trust-unverified``): the computed
hash is then printed and recorded so every later use is verified against it.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cemnet import __version__
from cemnet.weights.registry import WeightsEntry, get_entry

CACHE_ENV = "CEMNET_CACHE"
SHA256_ENV_PREFIX = "CEMNET_SHA256_"
RETRY_STATUS = frozenset({408, 425, 429})
_log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A download failed; the message names the URL and the problem."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected sha256 (nothing was cached)."""


class UnverifiedError(DownloadError):
    """No sha256 is known for the file and unverified downloads were not allowed."""


class NotWeightsError(DownloadError):
    """The downloaded file is not a checkpoint of a format cemnet reads (nothing was cached)."""


class _Transient(Exception):
    """Worth retrying: the connection dropped, the server was busy, the body was cut short."""


class _Permanent(Exception):
    """Retrying cannot help (404, 403, ...)."""


def default_cache_dir() -> Path:
    """Where downloaded weights are kept (see the module docstring for the order)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints" / "cemnet"


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def sha256_env_var(name: str) -> str:
    """Environment variable that pins the sha256 of registry entry ``name``."""
    return SHA256_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _user_agent() -> str:
    return f"cemnet/{__version__}"


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes 100-199/200`` or ``bytes */200``."""
    match = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", header or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


def _transfer(url: str, part: Path, *, progress: bool, timeout: float, chunk_size: int) -> None:
    """One HTTP request that appends to (or restarts) ``part``; raises _Transient/_Permanent."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            # Range past the end: the partial may already be complete (crash before the rename).
            if _content_range(err.headers.get("Content-Range"))[1] == offset:
                return
            part.unlink(missing_ok=True)
            raise _Transient("HTTP 416: the partial download does not fit the remote file; restarting") from err
        if err.code in RETRY_STATUS or 500 <= err.code < 600:
            raise _Transient(f"HTTP {err.code} {err.reason}") from err
        raise _Permanent(f"HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _Transient(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from err

    from tqdm.auto import tqdm

    with response:
        mode = "wb"
        if offset and response.status == 206:
            start, _ = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Transient(f"server resumed at byte {start}, not {offset}; restarting")
            mode = "ab"
        else:
            offset = 0  # 200 to a Range request: the server ignores Range and sends everything
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        received = 0
        bar = tqdm(
            total=None if length is None else offset + length,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name[: -len(".part")],
            disable=not progress,
            file=sys.stderr,
        )
        with bar, open(part, mode) as out:
            while True:
                try:
                    block = response.read(chunk_size)
                except http.client.IncompleteRead as err:  # keep what arrived, resume from there
                    out.write(err.partial)
                    received += len(err.partial)
                    bar.update(len(err.partial))
                    break
                except (OSError, http.client.HTTPException) as err:
                    raise _Transient(f"connection lost after {offset + received} bytes ({err})") from err
                if not block:
                    break
                out.write(block)
                received += len(block)
                bar.update(len(block))
    if length is not None and received < length:
        raise _Transient(f"connection closed after {offset + received} of {offset + length} bytes")


def _transfer_with_retries(
    url: str, part: Path, *, retries: int, backoff: float, progress: bool, timeout: float, chunk_size: int
) -> None:
    attempt = 0
    while True:
        try:
            _transfer(url, part, progress=progress, timeout=timeout, chunk_size=chunk_size)
            return
        except _Permanent as err:
            raise DownloadError(f"download of {url} failed: {err}") from err
        except _Transient as err:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"download of {url} failed after {attempt} attempts: {err}") from err
            delay = min(backoff * 2 ** (attempt - 1), 60.0)
            _log.warning("download of %s: %s; retry %d/%d in %.1f s", url, err, attempt, retries, delay)
            time.sleep(delay)


def download_url(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    validate: Callable[[Path], str | None] | None = None,
) -> str:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); return the file's sha256.

    With ``sha256`` the file is renamed into place only if it matches; otherwise the partial
    is deleted and :class:`ChecksumError` raised. A mismatch after resuming a partial left by an
    earlier run (perhaps of another file version) triggers one clean restart first. ``validate``
    (the file -> a complaint or ``None``) must also pass, else :class:`NotWeightsError` and nothing
    is kept: a server answering 200 with an error page must not end up in the cache.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    expected = sha256.lower() if sha256 else None
    for _ in range(2):
        had_partial = part.exists() and part.stat().st_size > 0
        _transfer_with_retries(url, part, retries=retries, backoff=backoff, progress=progress, timeout=timeout, chunk_size=chunk_size)
        digest = sha256_file(part)
        if expected is None or digest == expected:
            problem = validate(part) if validate is not None else None
            if problem is not None:
                part.unlink()
                raise NotWeightsError(f"download of {url}: {problem.replace(str(part), 'the file')}; nothing was cached")
            os.replace(part, dest)
            return digest
        part.unlink()
        if not had_partial:
            break
        _log.warning("download of %s: resumed file has the wrong sha256; restarting from scratch", url)
    raise ChecksumError(f"download of {url}: sha256 mismatch (expected {expected}, got {digest}); nothing was cached")


def _recorded_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _read_recorded(dest: Path) -> str | None:
    try:
        return _recorded_path(dest).read_text().split()[0].lower()
    except (OSError, IndexError):
        return None


def _record(dest: Path, digest: str, entry: WeightsEntry) -> None:
    _recorded_path(dest).write_text(f"{digest}  {dest.name}\n")
    print(
        f"cemnet: {entry.name}: sha256 {digest} was NOT verified against a published checksum; "
        f"recorded in {_recorded_path(dest)}. Pin it with --sha256 {digest} or "
        f"{sha256_env_var(entry.name)}={digest}.",
        file=sys.stderr,
    )


def fetch(
    name_or_entry: str | WeightsEntry,
    *,
    registry: list[str | Path] | str | Path | None = None,
    cache_dir: str | Path | None = None,
    sha256: str | None = None,
    trust_unverified: bool = False,
    progress: bool = True,
    **download_kwargs: float | int,
) -> Path:
    """Path of the verified cached file for a registry entry, downloading it if needed.

    ``download_kwargs`` go to :func:`download_url` (``retries``, ``backoff``, ``timeout``,
    ``chunk_size``).
    """
    from cemnet.weights.checkpoint_io import weights_file_problem  # imports torch: only when fetching

    entry = name_or_entry if isinstance(name_or_entry, WeightsEntry) else get_entry(name_or_entry, registry)
    dest = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    dest = dest / entry.file_name
    pinned = sha256 or os.environ.get(sha256_env_var(entry.name)) or entry.sha256
    expected = pinned.lower() if pinned else _read_recorded(dest)
    problem = weights_file_problem(dest) if dest.exists() and not pinned else None
    if problem is not None:  # cached, and its hash recorded, by an older cemnet that did not look inside
        _log.warning("cached %s is not a weights file (%s); discarding it and its recorded sha256", dest, problem)
        dest.unlink()
        _recorded_path(dest).unlink(missing_ok=True)
        expected = None
    if dest.exists():
        if expected and sha256_file(dest) == expected:
            return dest
        if expected is None and trust_unverified:
            _record(dest, sha256_file(dest), entry)
            return dest
        if expected:
            _log.warning("cached %s does not match sha256 %s; downloading again", dest, expected)
            dest.unlink()
    if expected is None and not trust_unverified:
        raise UnverifiedError(
            f"{entry.name}: no sha256 is known for {entry.url}, so its integrity cannot be checked. "
            f"Pin the hash (--sha256 HEX, {sha256_env_var(entry.name)}=HEX, or a registry entry), "
            "or accept it on first use with --trust-unverified (trust_unverified=True)."
        )
    digest = download_url(
        entry.url, dest, sha256=expected, progress=progress, validate=weights_file_problem, **download_kwargs  # type: ignore[arg-type]
    )
    if expected is None:
        _record(dest, digest, entry)
    return dest
