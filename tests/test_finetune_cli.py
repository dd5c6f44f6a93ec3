"""``cemnet finetune`` end to end on real shared data: the model file, its recorded validation
score, resume, instance models and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import cemnet
from cemnet.cli import main as cemnet_main
from helpers import tiny_encoder_export

TINY = ["--arch", "test_resnet", "--batch-size", "2", "--crop-size", "64", "--base-width", "16", "--no-progress",
        "--overlays", "1", "-q"]
MEMBRANES = ["--class-map", "0=membrane", "255=background"]  # ISBI: 0 = membrane, 255 = cell interior


@pytest.fixture(scope="module")
def isbi5(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Five labelled ISBI 2012 slices (images/ and labels/ matched by name)."""
    root = tmp_path_factory.mktemp("isbi5")
    for sub in ("images", "labels"):
        (root / sub).mkdir()
        for i in range(5):
            shutil.copy(shared_data / f"isbi2012/train/{sub}/{i}.png", root / sub / f"{i}.png")
    return root / "images", root / "labels"


def _run(isbi5: tuple[Path, Path], out: Path, *extra: str) -> int:
    return cemnet_main(["finetune", "--images", str(isbi5[0]), "--masks", str(isbi5[1]), *MEMBRANES, *TINY,
                        "--iterations", "4", "--val-every", "2", "--out", str(out), *extra])


@pytest.mark.slow
def test_finetune_writes_a_self_describing_model_that_reproduces_its_score(isbi5: tuple[Path, Path], tmp_path: Path) -> None:
    from cemnet.benchmarks.masks import MaskSemantics
    from cemnet.finetune.data import load_finetune_data
    from cemnet.finetune.run import FinetuneSettings, validation_scores

    out = tmp_path / "run"
    assert _run(isbi5, out) == 0
    for name in ("model.safetensors", "last.safetensors", "metrics.csv", "validation.csv", "run.json", "overlays.png",
                 "checkpoints/last.ckpt"):
        assert (out / name).is_file(), name
    model = cemnet.load_model(out / "model.safetensors")
    spec = model.cemnet_spec
    assert spec.task == "semantic" and spec.dims == "2d" and spec.output == "sigmoid" and spec.out_channels == 1
    assert spec.classes == [{"name": "background", "value": 255}, {"name": "membrane", "value": 0}]
    assert spec.arch["encoder"] == "test_resnet" and spec.encoder["source"] == "random" and spec.encoder["frozen"] == "none"
    assert spec.tile == (128, 128) and spec.halo == (16, 16) and 0 < spec.norm[1] < 1
    assert len(spec.training["data_fingerprint"]) == 64 and spec.training["validation"]["samples"] == ["2"]
    assert spec.training["masks"]["frequencies"]["membrane"] == pytest.approx(0.23, abs=0.03)
    assert spec.scores["step"] in (2, 4) and "iou_membrane" in spec.scores
    # the recorded validation score is the file's own: rebuilt from the file alone, it scores the same
    data, _ = load_finetune_data(images=str(isbi5[0]), masks=str(isbi5[1]),
                                 semantics=MaskSemantics(class_map={0: "membrane", 255: "background"}))
    assert [s.name for s in data.test] == spec.training["validation"]["samples"]
    again = validation_scores(model, data, spec.norm, FinetuneSettings())
    assert again["iou"] == pytest.approx(spec.scores["iou"], abs=1e-6)
    history = json.loads((out / "run.json").read_text())["history"]
    assert [h["iteration"] for h in history] == [2, 4]
    assert spec.scores["iou"] == pytest.approx(max(h["iou"] for h in history))
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in header and "val/iou" in header
    # a finished run is not overwritten by accident
    assert _run(isbi5, out) == 2


@pytest.mark.slow
def test_resume_continues_exactly(isbi5: tuple[Path, Path], tmp_path: Path) -> None:
    """A run stopped after its step-2 checkpoint and resumed ends with the same weights as an
    uninterrupted run (same optimizer, schedule and data position)."""
    import pytorch_lightning as pl

    from cemnet.finetune import run as run_module

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert _run(isbi5, full) == 0

    class Stop(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            if trainer.global_step == 3:
                raise RuntimeError("simulated crash")

    original = run_module._Progress
    run_module._Progress = lambda total, key: Stop()  # the progress slot carries the crash
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            cemnet_main(["finetune", "--images", str(isbi5[0]), "--masks", str(isbi5[1]), *MEMBRANES,
                         *[a for a in TINY if a != "--no-progress"], "--iterations", "4", "--val-every", "2",
                         "--out", str(stopped)])
    finally:
        run_module._Progress = original
    assert (stopped / "checkpoints/last.ckpt").is_file() and not (stopped / "last.safetensors").exists()
    assert _run(isbi5, stopped, "--resume") == 0
    a, b = load_file(str(full / "last.safetensors")), load_file(str(stopped / "last.safetensors"))
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-5) for k in a)
    assert [h["iteration"] for h in json.loads((stopped / "run.json").read_text())["history"]] == [2, 4]
    steps = [line.split(",")[1] for line in (stopped / "metrics.csv").read_text().splitlines()[1:]]
    assert {"0", "1", "2", "3"} <= set(steps)  # the rows logged before the crash are kept
    # resuming with other settings is refused
    assert _run(isbi5, stopped, "--resume", "--lr", "0.1") == 2


def test_pretrained_frozen_encoder_provenance_and_wandb(isbi5: tuple[Path, Path], tmp_path: Path) -> None:
    """A pretrained export, frozen: the file records its sha256, method and normalisation, the
    network is rebuilt from the spec alone (strict load), and --wandb writes an offline run."""
    import hashlib

    import torch

    export, state = tiny_encoder_export(tmp_path / "enc.safetensors", mean=0.5, std=0.2, method="mocov2")
    out = tmp_path / "pre"
    rc = cemnet_main(["finetune", "--images", str(isbi5[0]), "--masks", str(isbi5[1]), *MEMBRANES, *TINY,
                      "--encoder", str(export), "--freeze", "encoder", "--iterations", "2", "--wandb", "--out", str(out)])
    assert rc == 0
    spec = cemnet.load_model(out / "model.safetensors").cemnet_spec
    assert spec.encoder["sha256"] == hashlib.sha256(export.read_bytes()).hexdigest()
    assert spec.encoder["method"] == "mocov2" and spec.encoder["frozen"] == "encoder" and spec.norm == (0.5, 0.2)
    weights = load_file(str(out / "model.safetensors"))
    for k, v in state.items():  # frozen: the encoder is the export's, unchanged
        if f"encoder.{k}" in weights:
            assert torch.equal(weights[f"encoder.{k}"], v), k
    assert list((out / "wandb").glob("offline-run-*"))
    import wandb

    assert wandb.run is None  # finished: a later run in this process (pretrain, a sweep) gets its own


def test_bad_input_gives_one_clear_message(isbi5: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    def fails(*args: str) -> str:
        assert cemnet_main(["finetune", *args, *TINY, "--iterations", "1", "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        return err

    assert "not in the class map" in fails("--images", str(isbi5[0]), "--masks", str(isbi5[1]), "--class-map", "0=membrane")
    masks = tmp_path / "renamed"
    shutil.copytree(isbi5[1], masks)
    (masks / "3.png").rename(masks / "x3.png")
    err = fails("--images", str(isbi5[0]), "--masks", str(masks))
    assert str(isbi5[0] / "3.png") in err and "no mask named 3" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: no image files" in fails("--images", str(empty), "--masks", str(isbi5[1]))
    assert "exactly one of" in fails("--images", str(isbi5[0]), "--masks", str(isbi5[1]), "--image", "x.tif",
                                     "--labels", "y.tif")
    one = tmp_path / "one"
    one.mkdir()
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(one / "0.png")
    assert "no foreground" in fails("--images", str(one), "--masks", str(one), "--mask-mode", "binary", "--threshold",
                                    "255")


def test_help_lists_every_option_with_default(capsys: pytest.CaptureFixture[str]) -> None:
    from cemnet.finetune.cli import build_parser

    for action in build_parser()._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        cemnet_main(["finetune", "--help"])
    text = capsys.readouterr().out
    assert "--mask-mode" in text and "(default: 500)" in text and "--resume" in text


@pytest.mark.slow
def test_instance_model_from_a_manifest(shared_data: Path, tmp_path: Path) -> None:
    """Neuron instances from a manifest (gala train volume for training, its test volume as the
    given validation): affinities + foreground, the best agglomeration threshold recorded, and the
    loaded model reproduces the recorded VI."""
    from cemnet.finetune.data import load_finetune_data
    from cemnet.finetune.run import FinetuneSettings, validation_scores

    import h5py

    gala = shared_data / "gala_fibsem_crops"
    # validation: a 10x64x64 crop of gala's test volume (image and ids), written as HDF5, so
    # that scoring an untrained model (many fragments to agglomerate) stays quick
    val = tmp_path / "val.h5"
    with h5py.File(gala / "test-image.h5") as fi, h5py.File(gala / "test-gt.lzf.h5") as fg, h5py.File(val, "w") as fo:
        fo["raw"] = fi["stack"][:10, :64, :64]
        fo["ids"] = fg["stack"][:10, :64, :64]
    manifest = tmp_path / "volumes.yaml"
    manifest.write_text(
        f"- {{image: {gala / 'train-image.h5'}, key: stack, labels: {gala / 'train-gt.lzf.h5'}, label_key: stack}}\n"
        f"- {{image: {val}, key: raw, labels: {val}, label_key: ids, split: validation}}\n")
    out = tmp_path / "inst"
    rc = cemnet_main(["finetune", "--task", "instance", "--manifest", str(manifest), "--iterations", "2", "--val-every", "2",
                      "--batch-size", "1", "--crop-size", "32", "--crop-z", "8", "--base-width", "8",
                      "--thresholds", "0.7", "0.3", "--voxel-size", "10", "10", "10", "--no-progress", "--overlays", "1",
                      "-q", "--out", str(out)])
    assert rc == 0
    model = cemnet.load_model(out / "model.safetensors")
    spec = model.cemnet_spec
    assert spec.task == "instance" and spec.dims == "3d" and spec.out_channels == 4 and spec.arch["spatial_dims"] == 3
    assert spec.postprocess["threshold"] in (0.7, 0.3) and spec.voxel_size == (10.0, 10.0, 10.0)
    assert len(spec.tile) == 3 and spec.classes == [] and spec.training["validation"]["rule"] == "given"
    data, _ = load_finetune_data(manifest=str(manifest), instance=True)
    assert [s.name for s in data.test] == ["val"] and data.test[0].image.shape == (10, 64, 64)
    again = validation_scores(model, data, spec.norm, FinetuneSettings(task="instance", thresholds=(0.7, 0.3)),
                              spec.voxel_size)
    assert again["voi"] == pytest.approx(spec.scores["voi"], abs=1e-6)
