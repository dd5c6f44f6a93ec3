"""Serve a folder over HTTP on 127.0.0.1, optionally misbehaving, for tests and benchmarks of
remote sources (``python -m curation.remote_serve DIR`` serves a folder until Ctrl-C).

:class:`FolderServer` is the standard library's threaded HTTP server with a fault plan: per
request path (e.g. ``/vol.zarr/s0/c/0/0/0``) a list of faults answered before the real content:
``"503"`` (Service Unavailable), ``"drop"`` (close the connection without an answer), and
``"hang"`` and ``"404"``, which are never used up: that path never gets an answer, or is
never found (a folder URL: a server without directory listings). It counts the GET requests
per path (``requests``), so a test can see what was read.
"""

from __future__ import annotations

import functools
import http.server
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.requests[path] += 1
            plan = self.server.faults.get(path, [])
            fault = plan[0] if plan else None
            if fault not in (None, "hang", "404"):
                plan.pop(0)
        if fault == "503":
            self.send_error(503, "Service Unavailable (injected)")
            return
        if fault == "404":
            self.send_error(404, "Not Found (injected)")
            return
        if fault == "drop":
            self.close_connection = True
            return
        if fault == "hang":
            while not self.server.stopping.wait(0.05):
                pass
            self.close_connection = True
            return
        super().do_GET()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.lock = threading.Lock()
        self.faults: dict[str, list[str]] = {}
        self.requests: Counter[str] = Counter()
        self.stopping = threading.Event()


class FolderServer:
    """``with FolderServer(folder) as server: server.url`` -> ``http://127.0.0.1:PORT``."""

    def __init__(self, root: str | Path) -> None:
        self._server = _Server(Path(root))
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def faults(self) -> dict[str, list[str]]:
        """Path -> faults to answer first (``"503"``, ``"drop"``; ``"hang"``, ``"404"`` for good)."""
        return self._server.faults

    @property
    def requests(self) -> Counter:
        """GET requests per path so far."""
        return self._server.requests

    def __enter__(self) -> "FolderServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()


if __name__ == "__main__":
    with FolderServer(sys.argv[1]) as server:
        print(f"serving {sys.argv[1]} at {server.url} (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
