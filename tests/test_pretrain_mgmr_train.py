"""MGMR 2D/3D training on real EM: CLI runs, overfitting, checkpoints and exported keys."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from cemnet.methods.backbones import build_backbone
from cemnet.methods.losses import mgmr_loss
from cemnet.methods.mgmr import MGMR2D, MGMR3D
from cemnet.models.encoder3d import build_encoder3d
from cemnet.weights.checkpoint_io import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _isbi_crops(shared_data: Path, n: int, size: int) -> torch.Tensor:
    """n real ISBI ssTEM crops, uint8 (n, 1, size, size)."""
    img = np.asarray(Image.open(shared_data / "isbi2012" / "train" / "images" / "4.png").convert("L"))
    crops = [img[y : y + size, x : x + size] for y, x in [(0, 0), (100, 300), (260, 40), (400, 400)][:n]]
    return torch.from_numpy(np.stack(crops))[:, None]


def _neuroproof_crops(shared_data: Path, n: int, d: int, s: int) -> torch.Tensor:
    folder = shared_data / "neuroproof_fibsem_medulla" / "training_sample2" / "grayscale_maps"
    files = sorted(folder.glob("*.png"))[120 : 120 + d]
    vol = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    return torch.from_numpy(np.stack([vol[:, 20 + 90 * i : 20 + 90 * i + s, 60 : 60 + s] for i in range(n)]))[:, None]


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.values.append(float(outputs["loss"]))


def _fit(model: pl.LightningModule, loader: DataLoader, steps: int) -> list[float]:
    rec = _Losses()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
    )
    trainer.fit(model, train_dataloaders=loader)
    return rec.values


def _backbone_keys(ckpt: dict) -> dict[str, torch.Tensor]:
    sd = ckpt["state_dict"]
    assert not any("_orig_mod" in k or k.startswith(("model.", "module.")) for k in sd)
    return {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}


def _check_export(run_dir: Path, encoder: torch.nn.Module) -> None:
    """`cemnet export` keeps exactly the encoder's tensors and drops both decoders."""
    from cemnet.weights.export import export_encoder

    weights = export_encoder(run_dir, run_dir / "encoder.safetensors")
    assert set(weights.state_dict) == set(encoder.state_dict())
    encoder.load_state_dict(weights.state_dict, strict=True)


def _check_sample_pictures(run_dir: Path, ckpt: dict) -> None:
    """Masked inputs and reconstructions are logged as pictures: one column per panel."""
    pngs = sorted((run_dir / "samples").glob("masked_reconstruction_step*.png"))
    assert pngs, "no sample pictures written"
    grid = np.asarray(Image.open(pngs[0]))
    hog = ckpt["hyper_parameters"].get("hog", "segneuron")
    panels = 5 if hog == "segneuron" else 3  # image, masked, reconstruction (+ HOG target, HOG prediction)
    assert grid.shape[1] % panels == 0 and grid.shape[1] // panels > 4
    assert grid.std() > 0


def _run_cli(config: str, run_dir: Path, *overrides: str) -> dict:
    from cemnet.methods.cli import main

    rc = main(["fit", "--config", str(REPO / "experiments" / config), "--run_dir", str(run_dir),
               "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", *overrides])
    assert rc == 0
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_tiny_2d_config_runs_and_exports_clean_timm_keys(shared_data: Path, tmp_path: Path) -> None:
    corpus = shared_data / "cem500k_example_patches" / "occlusion"
    ckpt = _run_cli("tiny_mgmr_2d_cpu.yaml", tmp_path / "run", f"--data.init_args.corpus={corpus}",
                    "--samples_every_n_steps=1", "--trainer.log_every_n_steps=2")
    _check_sample_pictures(tmp_path / "run", ckpt)
    columns = set(next(csv.reader(open(tmp_path / "run" / "csv" / "metrics.csv"))))
    promised = {"train/loss", "train/loss_pixel", "train/loss_hog", "train/mask_fraction", "train/lr",
                "train/images_per_s"}  # docs/pretraining.md, "The run folder"
    assert promised <= columns, promised - columns
    meta = ckpt["cemnet"]
    assert meta["method"] == "mgmr2d" and meta["spatial_dims"] == 2 and meta["arch"] == "resnet18"
    assert meta["in_chans"] == 1 and meta["global_step"] == 2 and meta["corpus_fingerprint"]
    assert 0.0 < meta["mean"] < 1.0 and 0.0 < meta["std"] < 1.0
    enc = build_backbone(meta["arch"], meta["in_chans"], **meta["arch_kwargs"])
    enc.load_state_dict(_backbone_keys(ckpt), strict=True)  # timm's own key names
    from cemnet.weights.build import check_state_dict
    from cemnet.weights.meta import EncoderMeta

    check_state_dict(_backbone_keys(ckpt), EncoderMeta.from_dict(meta))
    _check_export(tmp_path / "run", enc)


@pytest.mark.slow
def test_tiny_3d_config_runs_and_build_encoder3d_loads_strictly(shared_data: Path, tmp_path: Path) -> None:
    volumes = {
        "neuroproof": {"path": str(shared_data / "neuroproof_fibsem_medulla" / "training_sample2" / "grayscale_maps"), "stack": True},
        "gala": {"path": str(shared_data / "gala_fibsem_crops" / "train-image.h5")},
    }
    ckpt = _run_cli(
        "tiny_mgmr_3d_cpu.yaml", tmp_path / "run", f"--data.init_args.volumes={json.dumps(volumes)}",
        "--data.init_args.size=[20, 32, 32]", "--samples_every_n_steps=1",
    )
    _check_sample_pictures(tmp_path / "run", ckpt)
    meta = ckpt["cemnet"]
    assert meta["method"] == "mgmr3d" and meta["spatial_dims"] == 3 and meta["arch"].startswith("cemnet3d_")
    assert meta["global_step"] == 2 and meta["corpus_fingerprint"].startswith("volumes-")
    meta = json.loads(json.dumps(meta))  # what a safetensors header / JSON file gives back
    enc = build_encoder3d(meta["arch"], meta["in_chans"], **meta["arch_kwargs"])
    enc.load_state_dict(_backbone_keys(ckpt), strict=True)
    _check_export(tmp_path / "run", enc)


def test_mgmr2d_overfits_real_patches(shared_data: Path) -> None:
    pl.seed_everything(0)
    x = _isbi_crops(shared_data, 4, 64)
    model = MGMR2D("resnet18", input_size=64, decoder_width=64, lr=5e-3, weight_decay=0.0,
                   warmup_epochs=0, mean=0.5, std=0.2)
    loss = _fit(model, DataLoader(x, batch_size=4), steps=30)
    first, last = np.mean(loss[:3]), np.mean(loss[-5:])
    assert last < 0.6 * first, (first, last)
    # both heads learned: compare with a fresh model on the same masks and noise (batch-norm in
    # train mode for both, so neither depends on running statistics)
    model.train()
    with torch.no_grad():
        fresh = MGMR2D("resnet18", input_size=64, decoder_width=64, mean=0.5, std=0.2)
        torch.manual_seed(1)
        trained_terms = model.shared_step(x)
        torch.manual_seed(1)
        fresh_terms = fresh.shared_step(x)
    for k in ("loss_pixel", "loss_hog"):
        assert float(trained_terms[k]) < 0.8 * float(fresh_terms[k]), k


def test_mgmr3d_overfits_real_subvolumes(shared_data: Path) -> None:
    pl.seed_everything(0)
    x = _neuroproof_crops(shared_data, 2, 20, 32)
    model = MGMR3D("cemnet3d_res_tiny", decoder_width=32, lr=3e-3, weight_decay=0.0, warmup_epochs=0,
                   mean=0.5, std=0.2)
    loss = _fit(model, DataLoader(x, batch_size=2), steps=25)
    first, last = np.mean(loss[:3]), np.mean(loss[-5:])
    assert last < 0.6 * first, (first, last)


def test_vit_maskfeat_masked_loss_step(shared_data: Path) -> None:
    torch.manual_seed(0)
    model = MGMR2D("vit_tiny_patch16_224", arch_kwargs={"img_size": 32}, input_size=32, hog="maskfeat",
                   loss_on="masked", decoder_width=32, mean=0.5, std=0.2)
    x = _isbi_crops(shared_data, 2, 32)
    pred_img, pred_hog = model(model.normalize(x.float() / 255))
    assert pred_img.shape == (2, 1, 32, 32) and pred_hog.shape == (2, 9, 4, 4)
    out = model.shared_step(x)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.backbone.patch_embed.proj.weight.grad is not None
    enc = build_backbone("vit_tiny_patch16_224", 1, img_size=32)
    enc.load_state_dict(model.backbone_state_dict(), strict=True)


def test_compiled_backbone_never_leaks_orig_mod(shared_data: Path) -> None:
    model = MGMR3D("cemnet3d_res_tiny", decoder_width=16, mean=0.5, std=0.2)
    model.backbone = torch.compile(model.backbone)  # an OptimizedModule: keys gain `_orig_mod.`
    assert any("_orig_mod" in k for k in model.state_dict())
    ckpt = {"state_dict": model.state_dict(), "epoch": 0, "global_step": 0}
    model.on_save_checkpoint(ckpt)
    enc = build_encoder3d("cemnet3d_res_tiny")
    enc.load_state_dict(_backbone_keys(ckpt), strict=True)
    assert set(model.backbone_state_dict()) == set(enc.state_dict())


def test_normalised_views_are_mapped_back_to_raw_intensities(shared_data: Path) -> None:
    from cemnet.data.augment import AugmentConfig
    from cemnet.data.datamodule import ArrayCorpus, EMPatchDataModule

    corpus = ArrayCorpus(_isbi_crops(shared_data, 4, 64)[:, 0].numpy())
    identity = AugmentConfig(crop_size=64, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation_p=0.0,
                             brightness=0.0, contrast=0.0, blur_p=0.0, hflip_p=0.0, vflip_p=0.0, noise_p=0.0)
    dm = EMPatchDataModule(corpus, batch_size=4, num_workers=0, num_views=1, augment=identity)
    batch = next(iter(dm.train_dataloader()))
    model = MGMR2D("resnet18", input_size=64, decoder_width=32, mean=0.3, std=0.1)  # != the corpus's
    model._view_stats = (dm.mean, dm.std)  # what setup() takes from the datamodule
    raw = torch.from_numpy(corpus.get_padded(batch["index"].numpy())[0]).float()[:, None] / 255
    torch.testing.assert_close(model.unit_images(batch), raw, rtol=0, atol=1e-5)


def test_mgmr_loss_weights_and_masked_mode() -> None:
    g = torch.Generator().manual_seed(0)
    p, t = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    ph, th = torch.rand(2, 9, 1, 1, generator=g), torch.rand(2, 9, 1, 1, generator=g)
    out = mgmr_loss(p, t, ph, th)
    torch.testing.assert_close(out["loss"], 0.2 * F.mse_loss(p, t) + F.mse_loss(ph, th))
    m = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    m[:, :, :4] = True
    masked = mgmr_loss(p, t, ph, th, img_weight_map=m)
    torch.testing.assert_close(masked["loss_pixel"], F.mse_loss(p[:, :, :4], t[:, :, :4]))


@pytest.mark.parametrize("hog", ["segneuron", "maskfeat"])
def test_bf16_autocast_step_keeps_fp32_loss(shared_data: Path, hog: str) -> None:
    model = MGMR3D("cemnet3d_res_tiny", hog=hog, decoder_width=16, mean=0.5, std=0.2)
    x = _neuroproof_crops(shared_data, 1, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.shared_step(x)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
