"""Helpers shared by several test files (not a test module; fixtures live in conftest.py).

* :class:`FileServer` / :func:`serving`: a real HTTP server on 127.0.0.1 serving in-memory files,
  with HTTP Range and scripted faults (truncated body, HTTP 500, corrupted bytes, Range off),
  for the download tests (weights, benchmark archives). Nothing in the tests reaches the internet.
* :func:`read_grey`: an image file as PIL's 8-bit grey ("L"), the reference the readers and
  filters are compared with.
* :func:`tiny_encoder_export`: a cemnet encoder export of timm's tiny ``test_resnet`` (seconds to
  fine-tune), the stand-in for a pretrained encoder in the fine-tuning and benchmark tests.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["FileServer", "serving", "read_grey", "tiny_encoder_export"]


def tiny_encoder_export(path: Path, seed: int | None = 0, **meta: Any) -> tuple[Path, dict[str, Any]]:
    """Save a randomly initialised 1-channel ``test_resnet`` as a cemnet encoder export at
    ``path`` (safetensors + :class:`~cemnet.weights.meta.EncoderMeta` with ``meta``: mean, std,
    method...). ``seed``: torch's seed first (None: leave it). Returns the path and the state dict."""
    import timm
    import torch
    from safetensors.torch import save_file

    from cemnet.weights.meta import EncoderMeta

    if seed is not None:
        torch.manual_seed(seed)
    state = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=0).state_dict()
    save_file(state, str(path), metadata=EncoderMeta(arch="test_resnet", in_chans=1, **meta).to_safetensors())
    return path, state


def read_grey(path: Path) -> np.ndarray:
    """``path`` decoded by PIL and converted to 8-bit grey (mode "L")."""
    return np.asarray(Image.open(path).convert("L"))


class FileServer(ThreadingHTTPServer):
    """HTTP server on 127.0.0.1 serving ``files`` (name -> bytes) with scripted faults.

    ``faults`` is consumed one entry per request: ``"truncate"`` (full Content-Length, half the
    body, then the connection closes), ``"500"``; ``None``/empty means a normal answer.
    ``corrupt`` flips one byte of every body; ``range_support`` False ignores ``Range`` (200).
    ``log`` records ``(path, Range header, status)`` of every request.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.faults: list[str | None] = []
        self.corrupt = False
        self.range_support = True
        self.log: list[tuple[str, str | None, int]] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_port}/{name}"


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str], truncate: bool = False) -> None:
        self.server.log.append((self.path, self.headers.get("Range"), status))
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if truncate else body)
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        srv = self.server
        fault = srv.faults.pop(0) if srv.faults else None
        data = srv.files.get(self.path.lstrip("/"))
        if data is None:
            self._reply(404, b"not found", {})
            return
        if fault == "500":
            self._reply(500, b"internal error", {})
            return
        if srv.corrupt:
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and srv.range_support:
            start = int(match.group(1))
            if start >= len(data):
                self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}", "Accept-Ranges": "bytes"}
            self._reply(206, data[start:], headers, truncate=fault == "truncate")
            return
        self._reply(200, data, {}, truncate=fault == "truncate")


@contextmanager
def serving(server: FileServer) -> Iterator[FileServer]:
    """Run ``server`` on a thread for the ``with`` block, then shut it down."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
