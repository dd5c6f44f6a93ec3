"""Fine-tuning loop, freezing, pretrained encoders, inference and the CLI end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from cemnet.benchmarks.datasets import BenchmarkData, Sample, load_benchmark
from cemnet.benchmarks.sweep import markdown_table, read_csv
from cemnet.benchmarks.train import FinetuneConfig, build_model, finetune, predict, set_trainable
from cemnet.cli import main as cemnet_main
from helpers import tiny_encoder_export

TINY = FinetuneConfig(iterations=40, batch_size=4, crop_size=128, arch="test_resnet", base_width=32, eval_batch=4)


@pytest.fixture(scope="module")
def isbi(shared_data: Path) -> BenchmarkData:
    d = load_benchmark("isbi2012", shared_data)
    d.test = d.test[:2]  # keep evaluation cheap
    return d


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cemnet encoder export (test_resnet with recorded mean/std)."""
    return tiny_encoder_export(tmp_path_factory.mktemp("enc") / "tiny.safetensors", mean=0.5, std=0.2,
                               method="mocov2")[0]


@pytest.mark.slow
def test_short_finetune_beats_untrained(isbi: BenchmarkData) -> None:
    res = finetune(isbi, "random", dataclasses.replace(TINY, eval_at=(0,)))
    start, end = res.history[0], res.final
    assert start["iteration"] == 0 and end["iteration"] == 40
    assert end["iou"] > start["iou"] + 0.15 and end["iou"] > 0.35
    assert {"v_rand", "v_info", "precision_membrane", "recall_membrane", "f1_membrane"} <= set(end)


def test_freeze_modes(isbi: BenchmarkData, export: Path) -> None:
    model, norm = build_model(str(export), 1, TINY)
    assert norm == pytest.approx((0.5, 0.2))  # the export's normalisation is used
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune(isbi, str(export), dataclasses.replace(TINY, iterations=3, freeze="encoder"))
    after = res.model.state_dict()
    enc_keys = [k for k in before if k.startswith("encoder.")]
    # frozen encoder: weights and BatchNorm running statistics untouched
    assert all(torch.equal(before[k], after[k]) for k in enc_keys)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    model, _ = build_model("random", 1, TINY)
    frozen = set_trainable(model, "layer3")
    assert len(frozen) == 6  # conv1, bn1, act1, maxpool, layer1, layer2
    assert all(p.requires_grad for p in model.encoder.layer3.parameters())
    with pytest.raises(ValueError, match="stages are"):
        set_trainable(model, "layer9")


@pytest.mark.slow
def test_predict_orthoplane_3d() -> None:
    model, _ = build_model("random", 3, TINY)  # 2 classes + background
    vol = np.random.default_rng(0).integers(0, 255, (6, 20, 24), dtype=np.uint8)
    p = predict(model, vol, (0.5, 0.2), orthoplane=True)
    assert p.shape == (3, 6, 20, 24) and np.allclose(p.sum(0), 1, atol=1e-5)
    model1, _ = build_model("random", 1, TINY)
    assert predict(model1, vol, (0.5, 0.2), orthoplane=True).shape == (6, 20, 24)
    data = BenchmarkData("vol", "semantic3d", ("a",), [Sample(vol, (vol > 128).astype(np.int64), "v")],
                         [Sample(vol, (vol > 128).astype(np.int64), "v")])
    res = finetune(data, "random", dataclasses.replace(TINY, iterations=2, crop_size=16, orthoplane=True))
    assert 0 <= res.final["iou"] <= 1


@pytest.mark.slow
def test_label_efficiency_cli_end_to_end(tmp_path: Path, shared_data: Path, export: Path) -> None:
    out = tmp_path / "bench"
    rc = cemnet_main([
        "benchmark", "isbi2012", "--data-dir", str(shared_data), "--split", "test:24,25",
        "--encoders", str(export), "random:test_resnet", "--train-fraction", "0.05", "1.0", "--seeds", "0", "1",
        "--iterations", "6", "--eval-at", "3", "--batch-size", "2", "--crop-size", "64", "--base-width", "16",
        "--out", str(out), "-q",
    ])
    assert rc == 0
    rows = read_csv(out / "results.csv")
    assert len(rows) == 2 * 2 * 2 * 2  # encoders x fractions x seeds x evaluated iterations
    assert {r["encoder"] for r in rows} == {"tiny", "random:test_resnet"} and {r["iteration"] for r in rows} == {3, 6}
    small = [r for r in rows if r["fraction"] == 0.05]
    assert all(r["labelled_pixels"] == pytest.approx(0.05 * 28 * 512 * 512, rel=0.02) for r in small)
    table = (out / "results.md").read_text()
    assert "| tiny |" in table and "5% labels" in table and "(n=2)" in table
    assert table == markdown_table(rows, title="isbi2012: label efficiency")
    for png in ("label_efficiency.png", "iteration_efficiency.png", "overlays.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_custom_cli_and_list(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cemnet_main(["benchmark", "list"]) == 0
    assert "untested on real data" in capsys.readouterr().out
    rc = cemnet_main([
        "benchmark", "custom", "--images", str(shared_data / "isbi2012/train/images"), "--masks",
        str(shared_data / "isbi2012/train/labels"), "--split", "test:29", "--classes", "interior",
        "--encoders", "random:test_resnet", "--iterations", "2", "--batch-size", "2", "--crop-size", "64",
        "--base-width", "16", "--out", str(tmp_path / "c"), "-q",
    ])
    assert rc == 0 and "iou_interior" in (tmp_path / "c" / "results.csv").read_text()
