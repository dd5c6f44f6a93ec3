"""Selection strategies, per-patch uncertainty and head checkpoints."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cemnet.transferability.active import (
    HeadRequiredError,
    load_head,
    patch_uncertainty,
    pixel_uncertainty,
    save_head,
    select,
    select_highest,
    select_kcenter,
    select_median,
    select_random,
)


def test_median_picks_closest_to_median():
    scores = np.array([0.9, 0.1, 0.5, 0.45, 0.56, 0.3, 0.7])  # median 0.5
    assert select_median(scores, 3).tolist() == [2, 3, 4]
    rng = np.random.default_rng(0)
    s = rng.random(101)
    chosen = select_median(s, 10)
    dist = np.abs(s - np.median(s))
    assert set(chosen) == set(np.argsort(dist)[:10])
    assert dist[chosen].max() <= np.delete(dist, chosen).min()  # nothing left out is closer


def test_highest_and_random():
    scores = np.array([0.2, 0.9, 0.9, 0.1])
    assert select_highest(scores, 2).tolist() == [1, 2]  # ties by index
    r = select_random(50, 10, seed=3)
    assert len(set(r.tolist())) == 10 and r.max() < 50
    assert select_random(50, 10, seed=3).tolist() == r.tolist()


def test_kcenter_greedy_property_and_2_approximation():
    x = np.random.default_rng(1).normal(size=(40, 3))
    picks = select_kcenter(x, 6)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    for t in range(1, len(picks)):  # each pick is the farthest point from the picks before it
        nearest = d[:, picks[:t]].min(1)
        assert nearest[picks[t]] == pytest.approx(nearest.max())
    radius = d[:, picks].min(1).max()
    small = x[:12]
    ds = np.linalg.norm(small[:, None] - small[None], axis=-1)
    opt = min(ds[:, list(c)].min(1).max() for c in itertools.combinations(range(12), 3))
    greedy = ds[:, select_kcenter(small, 3)].min(1).max()
    assert greedy <= 2 * opt + 1e-12 and radius > 0


def test_kcenter_avoids_duplicates():
    x = np.array([[0.0, 0.0]] * 5 + [[1.0, 0.0], [0.0, 1.0]])
    assert len(set(select_kcenter(x, 3).tolist())) == 3


def test_budget_edge_cases():
    s = np.arange(5.0)
    assert sorted(select_median(s, 99).tolist()) == [0, 1, 2, 3, 4]  # budget > pool: whole pool
    assert select_median(s, 1).tolist() == [2]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            select_median(s, bad)
    with pytest.raises(ValueError, match="empty"):
        select_random(0, 3)
    with pytest.raises(ValueError, match="NaN"):
        select_median(np.array([0.1, np.nan]), 1)
    with pytest.raises(HeadRequiredError, match="trained segmentation head"):
        select("median", 3, embeddings=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="unknown strategy"):
        select("entropy-max", 3, scores=s)
    assert len(select("random", 3, n=5)) == 3


def test_pixel_uncertainty_ranges():
    sure = torch.tensor([[[[10.0]], [[-10.0]]]])  # (1, 2, 1, 1): confident
    unsure = torch.zeros(1, 2, 1, 1)
    assert pixel_uncertainty(sure).item() < 1e-6 and pixel_uncertainty(unsure).item() == pytest.approx(1.0)
    assert pixel_uncertainty(unsure, "margin").item() == pytest.approx(1.0)
    assert pixel_uncertainty(torch.zeros(1, 1, 2, 2)).mean().item() == pytest.approx(1.0)  # sigmoid 0.5
    assert pixel_uncertainty(torch.randn(2, 4, 3, 3)).max() <= 1.0 + 1e-6


def test_patch_uncertainty_masks_padding():
    class Half(torch.nn.Module):  # confident on the left half, unsure on the right half
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
            logits[:, 0, :, : x.shape[-1] // 2] = 20.0
            return logits

    x = torch.zeros(2, 1, 4, 4)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0] = True
    mask[1, :, :2] = True  # patch 1 is a truncated edge patch: only its left half is real
    u = patch_uncertainty(Half(), [x], "entropy", [mask])
    assert u[0] == pytest.approx(0.5, abs=1e-6) and u[1] == pytest.approx(0.0, abs=1e-6)


def test_head_roundtrip(tmp_path):
    from cemnet.models.unet import UNet
    from cemnet.transferability.embed import build_features_encoder

    unet = UNet(build_features_encoder("timm:resnet18"), num_classes=2, base_width=32).eval()
    path = save_head(unet, tmp_path / "head.pt", encoder="timm:resnet18", num_classes=2,
                     unet_kwargs={"base_width": 32}, mean=0.5, std=0.2, input_size=64)
    loaded, record = load_head(path)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), unet(x), atol=1e-6)
    assert record["input_size"] == 64 and record["mean"] == 0.5
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a segmentation head"):
        load_head(tmp_path / "other.pt")


def test_finetune_model_file_is_a_head(tmp_path):
    """``cemnet finetune``'s model file loads as a head (same outputs, its normalisation);
    instance models are refused with a reason."""
    from cemnet.finetune.model_file import ModelSpec, build_network, save_model

    spec = ModelSpec(task="semantic", dims="2d", output="softmax", norm=(0.4, 0.3), tile=(128, 128), halo=(16, 16),
                     arch={"kind": "unet", "encoder": "resnet18", "spatial_dims": 2, "in_chans": 1, "out_channels": 3,
                           "base_width": 32}, encoder={"source": "random", "arch": "resnet18"})
    net = build_network(spec).eval()
    path = save_model(net, spec, tmp_path / "model.safetensors")
    head, record = load_head(path)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(head(x), net(x), atol=1e-6)
    assert record["num_classes"] == 3 and record["mean"] == 0.4 and record["encoder"] == "timm:resnet18"
    spec3 = ModelSpec(task="instance", dims="3d", output="sigmoid", norm=(0.5, 0.2), tile=(32, 64, 64), halo=(4, 8, 8),
                      arch={"kind": "unet", "encoder": "cemnet3d_res_tiny", "spatial_dims": 3, "in_chans": 1,
                            "out_channels": 4, "base_width": 8})
    inst = save_model(build_network(spec3), spec3, tmp_path / "inst.safetensors")
    with pytest.raises(ValueError, match="needs a semantic 2D model"):
        load_head(inst)
