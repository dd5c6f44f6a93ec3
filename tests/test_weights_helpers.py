"""Shared helpers for the transfer tests (no tests here).

* :func:`real_patch`: a crop of a real ISBI 2012 ssTEM slice as a normalised tensor.
* :func:`lightning_checkpoint`: a checkpoint in the exact layout the pretraining code writes
  (``backbone.``, ``backbone_momentum.``, heads, ``_orig_mod.``/``module.`` wrappers, the
  ``checkpoint["cemnet"]`` block).
* ``weights_server`` fixture: :class:`helpers.FileServer` (a local HTTP server on 127.0.0.1 with
  injectable faults: truncated body, HTTP 500, corrupted bytes, Range support on/off).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from helpers import FileServer as WeightsServer
from helpers import serving


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


@pytest.fixture
def weights_server() -> Iterator[WeightsServer]:
    with serving(WeightsServer()) as server:
        yield server
