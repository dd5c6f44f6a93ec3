"""Representation probe on real EM (VNC mitochondria): library, `cemnet benchmark probe`, and the
online callback during pretraining.

The "trained" encoder is a tiny timm ResNet trained with supervision on the probe data's training
slices (a real, ImageNet-free training run of a few CPU seconds); the probe must score it above
the same architecture at random initialisation on held-out tiles, seed by seed.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from cemnet.benchmarks.datasets import load_benchmark
from cemnet.benchmarks.probe import ProbeConfig, make_probe_set, probe_encoder, summarize_scores
from cemnet.benchmarks.train import FinetuneConfig, finetune

REPO = Path(__file__).resolve().parents[1]
ARCH = "test_resnet"  # timm's tiny ResNet: the contrast costs seconds, not minutes
CFG = ProbeConfig(tile=96, train_tiles=32, test_tiles=64)


@pytest.fixture(scope="module")
def vnc_mito(shared_data: Path):
    return load_benchmark("vnc_mito", shared_data)


@pytest.fixture(scope="module")
def trained_encoder(vnc_mito, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A test_resnet encoder trained (supervised, training slices only) and saved as a timm state dict."""
    torch.manual_seed(0)
    cfg = FinetuneConfig(iterations=80, batch_size=8, crop_size=64, base_width=16, max_lr=0.01, arch=ARCH, seed=0)
    encoder = finetune(vnc_mito, f"random:{ARCH}", cfg).model.encoder
    path = tmp_path_factory.mktemp("enc") / "trained.pth"
    torch.save({"state_dict": encoder.state_dict(), "arch": ARCH}, path)
    return encoder, path


@pytest.mark.slow
def test_probe_separates_trained_from_random_encoder(vnc_mito, trained_encoder) -> None:
    trained, _ = trained_encoder
    gains = []
    for seed in (0, 1):
        probe_set = make_probe_set(vnc_mito, CFG, seed=seed)
        torch.manual_seed(seed)
        random_enc = timm.create_model(ARCH, features_only=True, in_chans=1)
        rnd = probe_encoder(random_enc, probe_set, CFG)
        trn = probe_encoder(trained, probe_set, CFG)
        assert 0.0 < rnd["probe_iou"] < 1.0 and 0.0 <= rnd["probe_knn_acc"] <= 1.0
        gains.append(trn["probe_iou"] - rnd["probe_iou"])
    # measured (perf/probe_positive_control.py, 80 iterations): +0.047, +0.042, +0.034 on seeds 0, 1, 2
    assert min(gains) > 0.015 and np.mean(gains) > 0.025, gains  # paired, every seed


def test_probe_set_tiles_are_seeded_and_checked(vnc_mito) -> None:
    a, b = make_probe_set(vnc_mito, CFG, seed=3), make_probe_set(vnc_mito, CFG, seed=3)
    assert np.array_equal(a.test_images, b.test_images) and a.train_images.shape == (32, 96, 96)
    assert set(np.unique(a.train_masks)) <= {-1, 0, 1} and (a.test_masks == 1).any()
    assert not np.array_equal(make_probe_set(vnc_mito, CFG, seed=4).test_images, a.test_images)
    with pytest.raises(ValueError, match="no foreground"):
        make_probe_set(vnc_mito, dataclasses.replace(CFG, foreground=7))
    with pytest.raises(ValueError, match="tile fits"):
        make_probe_set(vnc_mito, dataclasses.replace(CFG, tile=4096))


def test_summarize_scores_uses_sample_std() -> None:
    mean, std, n = summarize_scores([{"m": 0.1}, {"m": 0.2}, {"m": 0.6}], "m")
    assert (n, round(mean, 6), round(std, 6)) == (3, 0.3, round(float(np.std([0.1, 0.2, 0.6], ddof=1)), 6))


@pytest.mark.slow
def test_benchmark_probe_command(trained_encoder, shared_data: Path, tmp_path: Path, capsys) -> None:
    from cemnet.cli import main

    _, path = trained_encoder
    out = tmp_path / "probe"
    missing = tmp_path / "missing.safetensors"
    rc = main(["benchmark", "probe", f"random:{ARCH}", str(path), str(missing), "--benchmark", "vnc_mito",
               "--data-dir", str(shared_data), "--seeds", "0", "1", "--tile", "96", "--train-tiles", "32",
               "--test-tiles", "64", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and f"{missing}" in err and "skipped" in err and "Traceback" not in err  # the others still ran
    with open(out / "results.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["encoder"], r["seed"]) for r in rows] == [(f"random:{ARCH}", "0"), (f"random:{ARCH}", "1"),
                                                        ("trained", "0"), ("trained", "1")]
    table = (out / "results.md").read_text(encoding="utf-8")
    iou = [float(r["probe_iou"]) for r in rows if r["encoder"] == "trained"]
    assert f"| trained | {np.mean(iou):.3f} ± {np.std(iou, ddof=1):.3f} (n=2)" in table
    by_enc = {e: np.mean([float(r["probe_iou"]) for r in rows if r["encoder"] == e]) for e in ("trained", f"random:{ARCH}")}
    assert by_enc["trained"] > by_enc[f"random:{ARCH}"]


def test_benchmark_probe_bad_input_is_one_message(tmp_path: Path, capsys) -> None:
    from cemnet.cli import main

    rc = main(["benchmark", "probe", "random", "--images", str(tmp_path / "nope"), "--masks", str(tmp_path / "nope"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "Traceback" not in err


def test_online_probe_during_mgmr_pretraining(shared_data: Path, tmp_path: Path) -> None:
    from cemnet.methods.cli import main

    extra = tmp_path / "probe.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n    - class_path: cemnet.methods.probe_callback.RepresentationProbe\n"
        f"      init_args: {{every_n_steps: 2, benchmark: vnc_mito, data_dir: '{shared_data}', tile: 64,"
        " train_tiles: 8, test_tiles: 8}\n", encoding="utf-8")
    run = tmp_path / "run"
    corpus = shared_data / "cem500k_example_patches" / "occlusion"
    rc = main(["fit", "--config", str(REPO / "experiments" / "tiny_mgmr_2d_cpu.yaml"), "--config", str(extra),
               "--run_dir", str(run), f"--data.init_args.corpus={corpus}", "--trainer.max_steps=4",
               "--trainer.enable_progress_bar=false", "--samples_every_n_steps=0"])
    assert rc == 0
    with open(run / "csv" / "metrics.csv", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("probe_iou")]
    assert sorted(int(r["step"]) for r in rows) == [0, 2, 4]  # the initialisation, every 2 steps, the end
    assert all(0.0 <= float(r["probe_iou"]) <= 1.0 and 0.0 <= float(r["probe_knn_acc"]) <= 1.0 for r in rows)
    assert (run / "probe.png").stat().st_size > 0


def test_misconfigured_online_probe_warns_and_training_goes_on(shared_data: Path, tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from cemnet.methods.probe_callback import RepresentationProbe

    probe = RepresentationProbe(every_n_steps=1, benchmark=None, images=str(tmp_path / "missing"),
                                masks=str(tmp_path / "missing"))
    module = torch.nn.Module()
    module.backbone = torch.nn.Identity()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.warns(UserWarning, match="RepresentationProbe disabled.*missing"):
        probe.setup(trainer, module, "fit")
    probe._run(trainer, module)  # no probe set: nothing happens
    assert probe.history == []
