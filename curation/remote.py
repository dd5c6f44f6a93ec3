"""Remote sources: a URL (``http(s)://``, ``s3://``, ``gs://``) is a source wherever a path is.

Which library reads what, and why (see ``docs/readers.md``):

* zarr v2/v3 and OME-Zarr: zarr-python 3 over an fsspec filesystem (aiohttp for HTTP, s3fs,
  gcsfs). zarr fetches only the chunks a region needs, concurrently, and fsspec is the layer
  the rest of the ecosystem uses for object stores. Every store is wrapped in
  :class:`ObservedStore`, which retries transient errors with exponential backoff (fsspec's
  HTTP filesystem does not retry at all) and records the chunk keys that are *missing* (zarr
  reads them as the fill value, legitimately for sparse volumes; we count and report them).
* N5 and Neuroglancer precomputed: tensorstore, whose drivers implement both formats fully
  (N5 compressors, precomputed sharding and scales) over the same URLs, with a shared chunk
  cache and its own HTTP/S3 retry policy (:func:`tensorstore_context`).

Settings come from the environment so that worker processes and Dask workers see the same:
``CEMNET_REMOTE_TIMEOUT`` (seconds per request, default 60), ``CEMNET_REMOTE_RETRIES``
(default 5) and ``CEMNET_REMOTE_BACKOFF`` (first delay, seconds, default 0.5; doubled each try).
S3 is anonymous unless credentials are configured the usual way (``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, ``~/.aws/credentials``); ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` point
it at another S3-compatible server. ``CEMNET_S3_ANON=1`` forces anonymous access. ``gs://`` without
``GOOGLE_APPLICATION_CREDENTIALS`` is read over the bucket's public HTTPS address
(:func:`public_gcs_url`), so it needs no GCS client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from curation.manifest import ReaderError, is_url

__all__ = [
    "is_url", "RemoteSettings", "RemoteReadError", "ObservedStore", "open_zarr_store", "storage_options",
    "url_join", "remote_format", "remote_fingerprint", "tensorstore_kvstore", "tensorstore_context",
    "chunk_coords", "public_gcs_url", "mark_unreadable", "is_unreadable", "forget_unreadable",
]

_ZARR_DOCS = ("zarr.json", ".zgroup", ".zarray", ".zattrs")


@dataclass(frozen=True)
class RemoteSettings:
    """Timeout per request, retries after the first try, first backoff delay (doubled each try)."""

    timeout_s: float = 60.0
    retries: int = 5
    backoff_s: float = 0.5

    @classmethod
    def from_env(cls) -> "RemoteSettings":
        def number(name: str, default: float) -> float:
            text = os.environ.get(name, "").strip()
            try:
                return float(text) if text else default
            except ValueError:
                raise ValueError(f"environment variable {name} must be a number, got {text!r}") from None

        return cls(number("CEMNET_REMOTE_TIMEOUT", cls.timeout_s), int(number("CEMNET_REMOTE_RETRIES", cls.retries)),
                   number("CEMNET_REMOTE_BACKOFF", cls.backoff_s))


class RemoteReadError(OSError):
    """A request that still failed after every retry (the range it served is lost, not zeroed)."""


def url_join(base: str, *parts: str) -> str:
    """``base/part/...`` without doubled slashes (URLs are not paths: no normalisation)."""
    tail = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return base.rstrip("/") + ("/" + tail if tail else "")


def _scheme(url: str) -> str:
    return urllib.parse.urlsplit(url).scheme.lower()


def _s3_has_credentials() -> bool:
    if os.environ.get("CEMNET_S3_ANON", "").strip() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE")):
        return True
    return Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser().is_file()


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options(url: str, settings: RemoteSettings | None = None) -> dict[str, Any]:
    """fsspec options for ``url``: timeouts, S3 anonymity / endpoint / botocore retries."""
    s = settings or RemoteSettings.from_env()
    scheme = _scheme(url)
    if scheme in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=s.timeout_s, sock_connect=s.timeout_s, sock_read=s.timeout_s)
        return {"client_kwargs": {"timeout": timeout}}
    if scheme in ("s3", "s3a"):
        opts: dict[str, Any] = {
            "anon": not _s3_has_credentials(),
            "config_kwargs": {"connect_timeout": s.timeout_s, "read_timeout": s.timeout_s,
                              "retries": {"max_attempts": s.retries + 1, "mode": "standard"}},
        }
        if _s3_endpoint():
            opts["endpoint_url"] = _s3_endpoint()
        return opts
    if scheme in ("gs", "gcs"):
        return {} if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") else {"token": "anon"}
    return {}


def public_gcs_url(url: str) -> str:
    """``gs://bucket/path`` without Google credentials -> the bucket's public HTTPS address
    (``CEMNET_GCS_ENDPOINT``, default ``https://storage.googleapis.com``): public buckets (the
    usual case for EM archives) are read anonymously over plain HTTP, with no GCS client
    installed. Any other URL is returned as it is."""
    if _scheme(url) not in ("gs", "gcs") or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return url
    endpoint = os.environ.get("CEMNET_GCS_ENDPOINT", "https://storage.googleapis.com").rstrip("/")
    return endpoint + "/" + url.split("://", 1)[1].lstrip("/")


def _filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL."""
    import fsspec

    url = public_gcs_url(url)
    try:
        return fsspec.core.url_to_fs(url, **storage_options(url))
    except ImportError as e:  # gs:// without gcsfs, say
        raise ReaderError(url, f"no fsspec filesystem for {_scheme(url)}:// ({e}); install its package") from e


def _transient(err: BaseException) -> bool:
    """Worth another try: timeouts, dropped connections, 5xx / 429 answers. Not: missing keys,
    refused permissions, malformed requests."""
    import aiohttp

    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, aiohttp.ClientResponseError):
        return err.status >= 500 or err.status in (408, 429)
    return isinstance(err, (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError, ConnectionError, OSError))


def _backoff(err: Exception, attempt: int, what: str, settings: RemoteSettings) -> float:
    """Seconds to wait before try ``attempt + 2`` after ``err``; raises ``err`` when it is not
    transient and RemoteReadError when the tries are used up."""
    if not _transient(err):
        raise err
    if attempt >= settings.retries:
        raise RemoteReadError(f"{what}: still failing after {attempt + 1} tries "
                              f"({type(err).__name__}: {err or 'timed out'})") from err
    return settings.backoff_s * 2**attempt


async def _with_retries(call: Any, what: str, settings: RemoteSettings) -> Any:
    for attempt in range(settings.retries + 1):
        try:
            return await call()
        except Exception as err:  # noqa: BLE001 - _backoff re-raises what is not worth a retry
            await asyncio.sleep(_backoff(err, attempt, what, settings))
    raise AssertionError("unreachable")


class _ChunkCache:
    """Per-process LRU of remote chunk bytes (``CEMNET_REMOTE_CACHE_MB``, default 64): the uint8
    fit samples slices that share z-chunks, and every unit opens the source afresh, so without it
    the same chunk would cross the network several times."""

    def __init__(self) -> None:
        from collections import OrderedDict

        self.entries: OrderedDict[str, Any] = OrderedDict()
        self.nbytes = 0

    def limit(self) -> int:
        text = os.environ.get("CEMNET_REMOTE_CACHE_MB", "").strip()
        return int(float(text) * 2**20) if text else 64 * 2**20

    def get(self, key: str) -> Any:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        size = len(value)
        if size > self.limit() // 4 or key in self.entries:
            return
        self.entries[key] = value
        self.nbytes += size
        while self.nbytes > self.limit() and self.entries:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= len(old)


_chunk_cache = _ChunkCache()

# Chunks (URLs, or reader-specific ids) that failed every retry: later reads in this process fail
# at once instead of waiting through the timeouts again (the uint8 fit samples up to 16 slices, and
# neighbouring units share chunks). Forgotten when a run starts (forget_unreadable) and after
# DEAD_FOR_S seconds (long-lived Dask workers), so a re-run asks again.
DEAD_FOR_S = 600.0
_dead: dict[Any, float] = {}


def mark_unreadable(chunk: Any) -> None:
    import time

    _dead[chunk] = time.monotonic()


def is_unreadable(chunk: Any) -> bool:
    import time

    since = _dead.get(chunk)
    if since is not None and time.monotonic() - since > DEAD_FOR_S:
        del _dead[chunk]
        return False
    return since is not None


def forget_unreadable() -> None:
    """Ask again for every chunk that failed before (a new run starts).

    The tensorstore contexts go too: a read that timed out on our side may still be pending in
    a context's cache, and a new read of that chunk would join it instead of asking again."""
    _dead.clear()
    _contexts.clear()


def _is_metadata(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in _ZARR_DOCS


def _make_wrapper_class() -> type:
    from zarr.storage import WrapperStore

    class ObservedStore(WrapperStore):
        """A zarr store that retries transient errors with backoff and records missing chunks.

        ``missing``: the chunk keys the last reads found absent (zarr's fill value); the owner
        clears it before a read and inspects it after.
        """

        def __init__(self, store: Any, settings: RemoteSettings | None = None, url: str = "") -> None:
            super().__init__(store)
            self.settings = settings or RemoteSettings.from_env()
            self.url = url
            self.missing: set[str] = set()

        def _with_store(self, store: Any) -> "ObservedStore":
            return type(self)(store, self.settings, self.url)

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            where = url_join(self.url, key)
            cache_key = where if is_url(self.url) and byte_range is None else None
            if cache_key is not None and (hit := _chunk_cache.get(cache_key)) is not None:
                return hit
            if is_unreadable(where):
                raise RemoteReadError(f"{where}: unreadable earlier in this run (not asked again)")
            try:
                value = await _with_retries(lambda: self._store.get(key, prototype, byte_range), where, self.settings)
            except RemoteReadError:
                mark_unreadable(where)
                raise
            if value is None and not _is_metadata(key):
                self.missing.add(key)
            elif value is not None and cache_key is not None and not _is_metadata(key):
                _chunk_cache.put(cache_key, value)
            return value

        async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]) -> list:
            key_ranges = list(key_ranges)
            values = await _with_retries(lambda: self._store.get_partial_values(prototype, key_ranges),
                                         url_join(self.url, key_ranges[0][0] if key_ranges else ""), self.settings)
            self.missing.update(k for (k, _), v in zip(key_ranges, values) if v is None and not _is_metadata(k))
            return values

    return ObservedStore


_observed_store_class: type | None = None


def ObservedStore(store: Any, settings: RemoteSettings | None = None, url: str = "") -> Any:  # noqa: N802
    """Wrap a zarr store (see the class docstring above); the class is built on first use so that
    importing this module does not import zarr."""
    global _observed_store_class
    if _observed_store_class is None:
        _observed_store_class = _make_wrapper_class()
    return _observed_store_class(store, settings, url)


def open_zarr_store(path: str) -> Any:
    """A read-only :class:`ObservedStore` over a local zarr folder or a zarr URL."""
    from zarr.storage import FsspecStore, LocalStore

    if is_url(path):
        url = public_gcs_url(path)
        try:
            base = FsspecStore.from_url(url, storage_options=storage_options(url), read_only=True)
        except ImportError as e:  # gs:// with credentials but without gcsfs, say
            raise ReaderError(path, f"no fsspec filesystem for {_scheme(url)}:// ({e}); install its package") from e
    else:
        base = LocalStore(path, read_only=True)
    return ObservedStore(base, url=path)


_CHUNK_KEY = re.compile(r"^(?:c[./])?(\d+(?:[./]\d+)*)$")


def chunk_coords(key: str, array_path: str) -> tuple[int, ...] | None:
    """Chunk grid coordinates of a store key of the array at ``array_path`` (v3 ``c/1/2/3`` or
    ``c.1.2.3``, v2 ``1.2.3`` or ``1/2/3``); None for keys of other arrays."""
    prefix = array_path.strip("/")
    if prefix:
        if not key.startswith(prefix + "/"):
            return None
        key = key[len(prefix) + 1:]
    m = _CHUNK_KEY.match(key)
    return tuple(int(n) for n in re.split(r"[./]", m.group(1))) if m else None


def _cat(fs: Any, path: str) -> bytes | None:
    """The bytes at ``path``, or None when absent; transient errors retried, others raised."""
    import time

    settings = RemoteSettings.from_env()
    for attempt in range(settings.retries + 1):
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - _backoff re-raises what is not worth a retry
            time.sleep(_backoff(err, attempt, path, settings))
    raise AssertionError("unreachable")


def remote_format(url: str) -> str:
    """``"zarr"``, ``"n5"`` or ``"precomputed"`` from the URL's name or its metadata documents."""
    lowered = url.lower().rstrip("/")
    if lowered.startswith("precomputed://"):
        return "precomputed"
    if re.search(r"\.n5(/|$)", lowered):
        return "n5"
    if re.search(r"\.zarr(/|$)", lowered):
        return "zarr"
    fs, root = _filesystem(url)
    try:
        for doc, fmt in (("zarr.json", "zarr"), (".zgroup", "zarr"), (".zarray", "zarr"),
                         ("attributes.json", "n5"), ("info", "precomputed")):
            if _cat(fs, url_join(root, doc)) is not None:
                return fmt
    except (OSError, RemoteReadError) as e:
        raise ReaderError(url, f"cannot reach the source ({type(e).__name__}: {e})") from e
    raise ReaderError(url, "no zarr (zarr.json, .zgroup, .zarray), N5 (attributes.json) or Neuroglancer "
                           "precomputed (info) metadata found at this URL")


def strip_precomputed(url: str) -> str:
    return url[len("precomputed://"):] if url.lower().startswith("precomputed://") else url


def remote_fingerprint(url: str, key: str | None = None) -> str:
    """A digest of a remote source's metadata documents (and their ETags where the server gives
    them): the root's and those below ``key``, and each multiscale level's (OME-Zarr datasets, N5
    ``s0..sN``). Chunks are not listed (millions of objects), so a chunk rewritten in place goes
    unnoticed, as for local stores."""
    url = strip_precomputed(url)
    fs, root = _filesystem(url)
    digest = hashlib.sha1()
    seen: set[str] = set()

    def add(rel: str) -> bytes | None:
        path = url_join(root, rel)
        if path in seen:
            return None
        seen.add(path)
        data = _cat(fs, path)
        if data is None:
            return None
        etag = ""
        try:
            info = fs.info(path)
            etag = str(info.get("ETag") or info.get("etag") or "")
        except Exception:  # noqa: BLE001 - an ETag is a bonus, not a requirement
            pass
        digest.update(f"{rel}\t{hashlib.sha1(data).hexdigest()}\t{etag}\n".encode())
        return data

    def add_node(prefix: str) -> None:
        for doc in ("zarr.json", ".zgroup", ".zarray", ".zattrs", "attributes.json", "info"):
            data = add(url_join(prefix, doc).lstrip("/"))
            if data is None:
                continue
            try:
                attrs = json.loads(data)
            except ValueError:
                continue
            attrs = attrs.get("attributes", attrs) if isinstance(attrs, dict) else {}
            ms = (attrs.get("ome", {}) or {}).get("multiscales") or attrs.get("multiscales") or []
            for dataset in (ms[0].get("datasets", []) if ms and isinstance(ms[0], dict) else []):
                for level_doc in ("zarr.json", ".zarray", "attributes.json"):
                    add(url_join(prefix, dataset.get("path", ""), level_doc).lstrip("/"))

    try:
        add_node("")
        if key:
            add_node(key.strip("/"))
        if remote_format(url) == "n5":  # N5 scale levels s0..sN (groups need no attributes.json)
            for n in range(64):
                if add(url_join(key or "", f"s{n}", "attributes.json").lstrip("/")) is None:
                    break
    except (OSError, RemoteReadError) as e:
        raise ReaderError(url, f"cannot reach the source ({type(e).__name__}: {e})") from e
    if not seen or digest.digest() == hashlib.sha1().digest():
        raise ReaderError(url, "no metadata document found at this URL (zarr.json, .zgroup, .zarray, "
                               "attributes.json or info)")
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- tensorstore


def tensorstore_kvstore(url_or_path: str) -> dict[str, Any]:
    """A tensorstore kvstore spec for a local folder or an http(s) / s3 / gs URL."""
    url = public_gcs_url(strip_precomputed(url_or_path))
    if not is_url(url):
        return {"driver": "file", "path": os.path.abspath(url)}
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return {"driver": "http", "base_url": url.rstrip("/") + "/"}
    path = parts.path.strip("/") + "/"
    if scheme in ("s3", "s3a"):
        spec: dict[str, Any] = {"driver": "s3", "bucket": parts.netloc, "path": path}
        if _s3_endpoint():
            spec["endpoint"] = _s3_endpoint()
            spec["aws_region"] = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        if not _s3_has_credentials():
            spec["aws_credentials"] = {"type": "anonymous"}
        return spec
    if scheme in ("gs", "gcs"):
        return {"driver": "gcs", "bucket": parts.netloc, "path": path}
    raise ReaderError(url, f"unsupported URL scheme {scheme}://")


_contexts: dict[tuple, Any] = {}


def tensorstore_context(settings: RemoteSettings | None = None) -> Any:
    """The tensorstore context of this process for these settings: our retry policy and one chunk
    cache (``CEMNET_REMOTE_CACHE_MB``) shared by every volume opened here, since each unit opens
    its source afresh and the uint8 fit samples slices that share chunks."""
    import tensorstore as ts

    s = settings or RemoteSettings.from_env()
    # Per-request timeouts of tensorstore's HTTP client (curl), read when it first starts in this
    # process: a request that stalls is aborted after the timeout and retried like any failure.
    per_try = str(max(1, math.ceil(s.timeout_s)))
    for name, value in (("CONNECT_TIMEOUT_SECONDS", per_try), ("LOW_SPEED_TIME_SECONDS", per_try),
                        ("LOW_SPEED_LIMIT_BYTES", "1")):
        os.environ.setdefault(f"TENSORSTORE_CURL_{name}", value)
    limit = _chunk_cache.limit()
    key = (os.getpid(), s, limit)
    if key not in _contexts:
        retries = {"max_retries": s.retries + 1, "initial_delay": f"{s.backoff_s}s",
                   "max_delay": f"{max(s.backoff_s * 2 ** s.retries, s.backoff_s)}s"}
        _contexts[key] = ts.Context({"cache_pool": {"total_bytes_limit": limit},
                                     "http_request_retries": retries, "s3_request_retries": retries})
    return _contexts[key]
