"""Shared helpers for the transfer tests (no tests here).

* :func:`real_patch`: a crop of a real ISBI 2012 ssTEM slice as a normalised tensor.
* :func:`lightning_checkpoint`: a checkpoint in the exact layout the pretraining code writes
  (``backbone.``, ``backbone_momentum.``, heads, ``_orig_mod.``/``module.`` wrappers, the
  ``checkpoint["cemnet"]`` block).
* :class:`WeightsServer` / ``weights_server`` fixture: a local HTTP server on 127.0.0.1 with
  injectable faults (truncated body, HTTP 500, corrupted bytes, Range support on/off).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn


def real_patch(shared_data: Path, size: int = 64, channels: int = 1, mean: float = 0.5, std: float = 0.25) -> torch.Tensor:
    """(1, channels, size, size) crop of ISBI 2012 train slice 0, normalised, grey replicated."""
    image = Image.open(shared_data / "isbi2012" / "train" / "images" / "0.png").convert("L")
    crop = np.asarray(image, dtype=np.float32)[128 : 128 + size, 200 : 200 + size] / 255.0
    x = (torch.from_numpy(crop.copy()) - mean) / std
    return x.expand(1, channels, size, size).contiguous()


def cemnet_block(arch: str, **overrides: Any) -> dict[str, Any]:
    block = {
        "arch": arch,
        "in_chans": 1,
        "mean": [0.5],
        "std": [0.25],
        "method": "mocov2",
        "corpus_fingerprint": "sha256:0123abcd",
        "epochs": 7,
        "global_step": 70,
        "spatial_dims": 2,
        "arch_kwargs": {},
    }
    block.update(overrides)
    return block


def lightning_checkpoint(
    backbone: nn.Module,
    block: dict[str, Any],
    *,
    backbone_prefix: str = "backbone._orig_mod.",
    momentum: nn.Module | None = None,
) -> dict[str, Any]:
    """A Lightning checkpoint dict as cemnet's pretraining writes it (plus wrapper noise)."""
    state: dict[str, torch.Tensor] = {backbone_prefix + k: v.clone() for k, v in backbone.state_dict().items()}
    momentum = momentum or backbone
    state.update({"backbone_momentum." + k: v.clone() + 0.01 for k, v in momentum.state_dict().items()})
    width = next(v for k, v in backbone.state_dict().items() if v.ndim >= 2).shape[0]
    state.update(
        {
            "projection_head.layers.0.weight": torch.randn(32, width),
            "projection_head.layers.0.bias": torch.zeros(32),
            "prediction_head.layers.0.weight": torch.randn(16, 32),
            "decoder_pixel.blocks.0.0.weight": torch.randn(8, width, 3, 3),
            "memory_bank.queue": torch.randn(16, 32),
        }
    )
    return {
        "epoch": block.get("epochs", 0),
        "global_step": block.get("global_step", 0),
        "pytorch-lightning_version": "2.6.6",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}}},
        "callbacks": {},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"arch": block["arch"], "lr": 0.03, "milestones": (120, 160)},
        "cemnet": block,
    }


class WeightsServer(ThreadingHTTPServer):
    """HTTP server on 127.0.0.1 serving ``files`` with scripted faults.

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
    server: WeightsServer

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


@pytest.fixture
def weights_server() -> Iterator[WeightsServer]:
    server = WeightsServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
