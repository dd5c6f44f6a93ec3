"""Pretraining data: corpus datamodule, samplers, and the EM augmentations (both paths).

Everything runs on real patches: the session's ``small_corpus`` (curated from NeuroProof, ISBI
2012 and a 16-bit SEM tile; 224 px, 3 sources, truncated edge patches included).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from scipy import stats

from cemnet.data.augment import AugmentConfig, EMAugment, _gaussian_blur, _jitter_step, apply_params, sample_params
from cemnet.data.datamodule import ArrayCorpus, EMPatchDataModule, PatchViewsDataset
from cemnet.data.sampling import EpochSampler, source_probabilities


@pytest.fixture(scope="module")
def patches(corpus):
    """First 64 real patches, padded, with true sizes (some truncated)."""
    sizes_all = np.asarray(corpus.sizes)
    truncated = np.nonzero((sizes_all < corpus.patch_size).any(1))[0]
    idx = np.unique(np.concatenate([np.arange(56), truncated[:8]]))
    x, sizes = corpus.get_padded(idx)
    return torch.from_numpy(x)[:, None], torch.from_numpy(np.asarray(sizes, np.int64))


def _identity_cfg(**kw) -> AugmentConfig:
    base = dict(crop_size=224, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation_p=0.0, brightness=0.0,
                contrast=0.0, blur_p=0.0, hflip_p=0.0, vflip_p=0.0, noise_p=0.0)
    base.update(kw)
    return AugmentConfig(**base)


# -- geometry on real patches -----------------------------------------------------------------
def test_identity_and_flips_are_exact(patches):
    x, _ = patches
    x, sizes = x[:4], torch.tensor([[224, 224]] * 4)
    aug = EMAugment(_identity_cfg(), mean=0.0, std=1.0)
    y = aug(x, sizes)
    torch.testing.assert_close(y, x.float() / 255, atol=1e-5, rtol=0)  # full crop at native size = identity
    aug_h = EMAugment(_identity_cfg(hflip_p=1.0), mean=0.0, std=1.0)
    torch.testing.assert_close(aug_h(x, sizes), torch.flip(x.float() / 255, dims=[-1]), atol=1e-5, rtol=0)
    aug_v = EMAugment(_identity_cfg(vflip_p=1.0), mean=0.0, std=1.0)
    torch.testing.assert_close(aug_v(x, sizes), torch.flip(x.float() / 255, dims=[-2]), atol=1e-5, rtol=0)


def test_rotation_90_matches_rot90_and_resize_matches_interpolate(patches):
    x, _ = patches
    x, sizes = x[:2], torch.tensor([[224, 224]] * 2)
    cfg = _identity_cfg()
    p = sample_params(sizes, cfg)
    p["angle"] = torch.full((2,), 90.0, dtype=torch.float64)
    y = apply_params(x, sizes, p, cfg, 0.0, 1.0)
    ref = x.float() / 255
    ok = [torch.allclose(y, torch.rot90(ref, k, dims=(-2, -1)), atol=1e-4) for k in (1, 3)]
    assert any(ok), "a 90 degree rotation must equal rot90 (either sense)"
    # a full-patch crop resized to 96 = bilinear interpolation (align_corners=False, no antialias)
    cfg96 = _identity_cfg(crop_size=96)
    y96 = EMAugment(cfg96, 0.0, 1.0)(x, sizes)
    torch.testing.assert_close(y96, F.interpolate(ref, size=96, mode="bilinear", align_corners=False), atol=1e-4, rtol=0)


def test_truncated_patches_sample_only_their_true_area(corpus):
    sizes_all = np.asarray(corpus.sizes)
    trunc = np.nonzero((sizes_all < corpus.patch_size).any(1))[0]
    assert len(trunc), "the small corpus has truncated edge patches"
    x, sizes = corpus.get_padded(trunc[:4])
    x, sizes = torch.from_numpy(x)[:, None], torch.from_numpy(np.asarray(sizes, np.int64))
    cfg = AugmentConfig(crop_size=64)
    p = sample_params(sizes.repeat(200, 1), cfg)
    s = sizes.repeat(200, 1).double()
    assert (p["top"] >= 0).all() and (p["left"] >= 0).all()
    assert (p["top"] + p["crop_h"] <= s[:, 0]).all() and (p["left"] + p["crop_w"] <= s[:, 1]).all()
    # without rotation, a full-extent crop of a truncated patch shows no zero padding
    cfg = _identity_cfg(crop_size=64)
    p = sample_params(sizes, cfg)
    p["top"], p["left"] = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    p["crop_h"], p["crop_w"] = sizes[:, 0].double(), sizes[:, 1].double()
    y = apply_params(x, sizes, p, cfg, 0.0, 1.0)
    h, w = int(sizes[0, 0]), int(sizes[0, 1])
    ref = F.interpolate(x[:1, :, :h, :w].float() / 255, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y[:1], ref, atol=1e-4, rtol=0)


# -- photometric ops vs torchvision -----------------------------------------------------------
def test_jitter_and_blur_match_torchvision(patches):
    x = patches[0][:6].float() / 255
    b = torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4, 1.1])
    c = torch.tensor([1.4, 0.6, 1.2, 0.9, 1.0, 0.7])
    ones = torch.ones(6, dtype=torch.bool)
    y = _jitter_step(x, ones, b, c)  # brightness
    ref = torch.stack([TF.adjust_brightness(x[i], float(b[i])) for i in range(6)])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    y = _jitter_step(x, ~ones, b, c)  # contrast
    ref = torch.stack([TF.adjust_contrast(x[i], float(c[i])) for i in range(6)])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    sig = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.8])
    y = _gaussian_blur(x, sig, 6)
    ref = torch.stack([TF.gaussian_blur(x[i], [13, 13], [float(sig[i])] * 2) for i in range(6)])
    # torchvision pads by reflection, we replicate: compare away from the border
    torch.testing.assert_close(y[..., 8:-8, 8:-8], ref[..., 8:-8, 8:-8], atol=1e-5, rtol=0)


# -- parameter statistics (CEM500K's MoCoV2 set) ----------------------------------------------
def test_parameter_distributions_match_cem500k_recipe():
    cfg = AugmentConfig()
    n = 20000
    g = torch.Generator().manual_seed(0)
    p = sample_params(torch.tensor([[224, 224]]).expand(n, 2), cfg, g)
    tol = 4 * math.sqrt(0.25 / n)  # 4 sigma of a Bernoulli(0.5) mean
    for key in ("rotate", "hflip", "vflip", "blur", "noise", "brightness_first"):
        assert abs(p[key].float().mean().item() - 0.5) < tol, key
    rot = p["angle"][p["rotate"]]
    assert rot.min() >= -180 and rot.max() <= 180 and stats.kstest(rot.numpy(), "uniform", args=(-180, 360)).pvalue > 1e-3
    assert (p["angle"][~p["rotate"]] == 0).all()
    area = (p["crop_h"] * p["crop_w"] / 224**2).numpy()
    assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0
    ratio = (p["crop_w"] / p["crop_h"]).numpy()
    assert ratio.min() >= 3 / 4 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    # the same crop distribution as torchvision's RandomResizedCrop (rejection sampling included)
    import torchvision.transforms as T

    torch.manual_seed(0)
    img = torch.zeros(1, 224, 224)
    tv = np.array([T.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(5000)], np.float64)
    tv_area, tv_ratio = tv[:, 2] * tv[:, 3] / 224**2, tv[:, 3] / tv[:, 2]
    assert stats.ks_2samp(area, tv_area).pvalue > 1e-3
    assert stats.ks_2samp(ratio, tv_ratio).pvalue > 1e-3
    assert stats.ks_2samp(p["top"].numpy(), tv[:, 0]).pvalue > 1e-3
    for key, (lo, hi) in (("brightness", (0.6, 1.4)), ("contrast", (0.6, 1.4)), ("sigma", (0.1, 2.0))):
        assert p[key].min() >= lo and p[key].max() <= hi
        assert stats.kstest(p[key].numpy(), "uniform", args=(lo, hi - lo)).pvalue > 1e-3, key
    logvar = np.log(p["noise_std"].numpy() ** 2)
    assert stats.kstest(logvar, "uniform", args=(math.log(1e-5), math.log(10))).pvalue > 1e-3


def test_cpu_worker_path_and_on_device_path_agree(corpus):
    """Same patches through loader workers (CPU path) and on_after_batch_transfer (device path):
    per-view intensity statistics must come from the same distribution (two-sample KS)."""
    kw = dict(batch_size=32, num_workers=1, augment=AugmentConfig(crop_size=64), seed=3, persistent_workers=False)
    cpu_dm = EMPatchDataModule(corpus, augment_on_device=False, **kw)
    dev_dm = EMPatchDataModule(corpus, augment_on_device=True, **kw)
    feats = {}
    for name, dm in (("cpu", cpu_dm), ("dev", dev_dm)):
        dm.setup("fit")
        torch.manual_seed(0)
        rows = []
        for i, batch in enumerate(dm.train_dataloader()):
            if name == "dev":
                assert "patches" in batch and batch["patches"].dtype == torch.uint8
                batch = dm.on_after_batch_transfer(batch, 0)
            for v in batch["views"]:
                assert v.shape == (32, 1, 64, 64) and v.dtype == torch.float32
                rows.append(torch.stack([v.mean((1, 2, 3)), v.std((1, 2, 3)), (v[..., 1:] - v[..., :-1]).abs().mean((1, 2, 3))], 1))
            if i == 5:
                break
        feats[name] = torch.cat(rows).numpy()
    for j, what in enumerate(("mean", "std", "gradient")):
        pv = stats.ks_2samp(feats["cpu"][:, j], feats["dev"][:, j]).pvalue
        assert pv > 1e-3, f"{what}: CPU and on-device augmentation differ (KS p={pv:.2g})"
    # normalised with the corpus's own statistics: views are roughly zero-mean
    assert abs(feats["cpu"][:, 0].mean()) < 0.5


# -- datamodule ------------------------------------------------------------------------------
def test_datamodule_reads_whole_batches_from_the_corpus(corpus, monkeypatch):
    calls = []
    orig = type(corpus).get_padded

    def spy(self, idx):
        calls.append(len(idx))
        return orig(self, idx)

    monkeypatch.setattr(type(corpus), "get_padded", spy)
    dm = EMPatchDataModule(corpus, batch_size=16, num_workers=0, augment=AugmentConfig(crop_size=48))
    dm.setup("fit")
    assert dm.mean == pytest.approx(corpus.mean) and dm.std == pytest.approx(corpus.std)
    facts = dm.data_stats()  # the one record the methods read (no attribute probing)
    assert facts.corpus_fingerprint == corpus.fingerprint and (facts.mean, facts.std) == (dm.mean, dm.std)
    assert facts.n_patches == len(corpus) and facts.batch_size == 16
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert calls == [16], "one gathered read per batch, not one per patch"
    assert set(batch) == {"views", "index", "source"} and len(batch["views"]) == 2
    assert batch["source"].tolist() == np.asarray(corpus.source_index)[batch["index"].numpy()].tolist()
    assert len(loader) == len(corpus) // 16
    raw = PatchViewsDataset(corpus, None, num_views=0).__getitems__([0, 1])
    assert raw["image"].dtype == torch.uint8 and raw["image"].shape == (2, 1, 224, 224)


def test_datamodule_opens_a_corpus_path(small_corpus):
    dm = EMPatchDataModule(str(small_corpus), batch_size=8, num_workers=0)
    dm.setup("fit")
    assert len(dm.corpus) > 100 and dm.corpus.patch_size == 224


def test_array_corpus_from_real_images(shared_data):
    files = sorted((shared_data / "isbi2012/train/images").glob("*.png"))[:2]
    c = ArrayCorpus.from_images(files, 200)
    assert len(c) == 2 * 9 and c.patch_size == 200 and set(c.source_index.tolist()) == {0, 1}
    x, sizes = c.get_padded([2])
    assert tuple(sizes[0]) == (200, 112) and (x[0, :, 112:] == 0).all()  # 512 = 200 + 200 + 112
    assert 0 < c.mean < 1 and c.std > 0


# -- samplers --------------------------------------------------------------------------------
def test_epoch_sampler_ranks_partition_a_shared_permutation():
    world = 3
    samplers = [EpochSampler(100, num_replicas=world, rank=r, seed=7, batch_size=4) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    parts = [list(s) for s in samplers]
    assert all(len(p) == len(samplers[0]) == 32 for p in parts)  # 100 // 3 = 33 -> whole batches of 4
    flat = sum(parts, [])
    assert len(set(flat)) == len(flat), "ranks must not overlap"
    again = EpochSampler(100, num_replicas=world, rank=1, seed=7, batch_size=4)
    again.set_epoch(2)
    assert list(again) == parts[1], "order is a function of (seed, epoch) only"
    again.set_epoch(3)
    assert list(again) != parts[1]


def test_balanced_sampler_follows_count_power(corpus):
    src = np.asarray(corpus.source_index)
    counts = np.bincount(src)
    for gamma in (0.5, 1.0):
        s = EpochSampler(len(src), source_index=src, gamma=gamma, num_samples=30000, num_replicas=2, rank=0, seed=1)
        drawn = np.bincount(src[np.array(list(s))], minlength=len(counts))
        expected = source_probabilities(counts, gamma) * drawn.sum()
        assert stats.chisquare(drawn, expected).pvalue > 1e-3
    assert np.allclose(source_probabilities(counts, 1.0), 1 / len(counts))
    assert np.allclose(source_probabilities(counts, 0.0), counts / counts.sum())


def test_datamodule_resume_state_skips_consumed_batches(corpus):
    def indices(dm):
        return [b["index"].tolist() for b in dm.train_dataloader()]

    kw = dict(batch_size=8, num_workers=0, augment_on_device=True, seed=5)
    ref = EMPatchDataModule(corpus, **kw)
    ref.setup("fit")
    ref._resume_state = None
    loader = ref.train_dataloader()
    loader.sampler.set_epoch(1)
    full = [b["index"].tolist() for b in loader]
    state = {"epoch": 1, "batches_done": 3, "batches_per_epoch": len(full), "batch_size": 8, "world_size": 1, "seed": 5}
    dm = EMPatchDataModule(corpus, **kw)
    dm.load_state_dict(state)
    assert indices(dm) == full[3:], "mid-epoch: same order, consumed batches skipped"
    assert indices(dm) != full[3:], "the skip applies once"
    dm.load_state_dict({**state, "batches_done": len(full)})  # saved at the end of epoch 1 -> epoch 2
    nxt = indices(dm)
    assert len(nxt) == len(full) and nxt != full
    with pytest.warns(UserWarning, match="different world size"):
        dm.load_state_dict({**state, "batch_size": 16})
        assert len(indices(dm)) == len(full)
