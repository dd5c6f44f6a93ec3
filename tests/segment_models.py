"""Small saved models for the segment / package tests, trained briefly on real shared data.

Not a test module: ``tests/test_segment_*.py`` and ``tests/test_package*.py`` import it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cemnet.finetune.model_file import ModelSpec, build_network, save_model

# a ResNet-18 cut after its third stage (stride 8), 16-wide decoder: seconds per step on a CPU
TINY_2D = {"kind": "unet", "encoder": "resnet18", "encoder_kwargs": {"out_indices": [0, 1, 2]},
           "spatial_dims": 2, "in_chans": 1, "out_channels": 1, "base_width": 32, "min_width": 8}
TINY_3D = {"kind": "unet", "encoder": "cemnet3d_res_tiny",
           "encoder_kwargs": {"norm": "batch", "widths": [8, 16, 32], "depths": [1, 1, 1],
                              "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]]},
           "spatial_dims": 3, "in_chans": 1, "out_channels": 1, "base_width": 32, "min_width": 8}


def read_cdeep3m(shared_data: Path, part: str = "training", n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` CDeep3M SBEM slices and their mitochondria masks (0/1) as (z, y, x) uint8."""
    from PIL import Image

    files = sorted((shared_data / "cdeep3m_mito_sbem" / part / "images").glob("*.png"))[:n]
    labels = sorted((shared_data / "cdeep3m_mito_sbem" / part / "labels").glob("*.png"))[:n]
    img = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    lab = np.stack([np.asarray(Image.open(f)) for f in labels]).astype(np.uint8)
    return img, lab


def mito_spec(dims: str = "2d", **overrides) -> ModelSpec:
    """A binary mitochondria spec (2D or 3D tiny U-Net)."""
    fields = dict(task="semantic", dims=dims, arch=dict(TINY_2D if dims != "3d" else TINY_3D), output="sigmoid",
                  norm=(0.5, 0.2), tile=(64, 64) if dims != "3d" else (16, 64, 64),
                  halo=(16, 16) if dims != "3d" else (4, 16, 16),
                  classes=[{"name": "background", "value": 0}, {"name": "mitochondrion", "value": 1}],
                  voxel_size=(30.0, 15.0, 15.0),
                  training={"data_fingerprint": "cdeep3m-training-slices", "iterations": 0},
                  encoder={"source": "random", "sha256": None, "method": None, "arch": "resnet18"})
    fields.update(overrides)
    return ModelSpec(**fields)


def train_mito(shared_data: Path, out: Path, dims: str = "2d", iterations: int = 30, seed: int = 0,
               **overrides) -> Path:
    """A tiny mitochondria model trained for ``iterations`` steps on CDeep3M crops, saved to ``out``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = mito_spec(dims, **overrides)
    spec.training["iterations"] = iterations
    net = build_network(spec)
    img, lab = read_cdeep3m(shared_data, n=8)
    x_all = (img.astype(np.float32) / 255 - spec.norm[0]) / spec.norm[1]
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    crop = spec.tile
    net.train()
    for _ in range(iterations):
        xs, ys = [], []
        for _ in range(4):
            if dims == "3d":  # the 8 sections stacked (not consecutive: enough for a varying output)
                z = rng.integers(0, img.shape[0] - crop[0] + 1)
                y, x = rng.integers(0, 1024 - crop[1], 2)
                xs.append(x_all[z:z + crop[0], y:y + crop[1], x:x + crop[2]][None])
                ys.append(lab[z:z + crop[0], y:y + crop[1], x:x + crop[2]][None])
            else:
                z = rng.integers(0, img.shape[0])
                y, x = rng.integers(0, 1024 - crop[0], 2)
                xs.append(x_all[z, y:y + crop[0], x:x + crop[1]][None])
                ys.append(lab[z, y:y + crop[0], x:x + crop[1]][None])
        xb, yb = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    spec.scores = {"train_loss": float(loss.detach())}
    net.eval()
    return save_model(net, spec, out)


def cached_mito(tmp_path_factory, shared_data: Path, dims: str = "2d", iterations: int = 6, **overrides) -> Path:
    """:func:`train_mito` once per test session (a file under the session's base temp folder)."""
    key = "-".join([dims, str(iterations), *(f"{k}={v}" for k, v in sorted(overrides.items()))])
    path = tmp_path_factory.getbasetemp() / "segment_models" / f"mito-{abs(hash(key))}.safetensors"
    if not path.is_file():
        train_mito(shared_data, path, dims=dims, iterations=iterations, **overrides)
    return path
