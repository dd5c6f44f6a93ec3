"""MGMR decoder transfer: `cemnet export` writes the pixel decoder next to the encoder, and the
segmentation U-Net loads exactly those tensors where shapes match (a real MGMR run on real patches)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cemnet.weights.decoder import decoder_path, load_decoder, read_decoder
from cemnet.weights.load import load_unet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mgmr_export(shared_data: Path, tmp_path_factory) -> Path:
    """Encoder export of a 2-step MGMR2D run (test_resnet, U-Net skips, decoder width 32)."""
    from cemnet.cli import main

    tmp = tmp_path_factory.mktemp("mgmr")
    corpus = shared_data / "cem500k_example_patches" / "occlusion"
    assert main(["pretrain", "fit", "--config", str(REPO / "experiments" / "tiny_mgmr_2d_cpu.yaml"),
                 "--run_dir", str(tmp / "run"), f"--data.init_args.corpus={corpus}", "--trainer.max_steps=2",
                 "--trainer.enable_progress_bar=false", "--samples_every_n_steps=0", "--model.init_args.arch=test_resnet",
                 "--model.init_args.decoder_skips=true", "--model.init_args.decoder_width=32"]) == 0
    out = tmp / "encoder.safetensors"
    assert main(["export", str(tmp / "run"), "--out", str(out)]) == 0
    return out


def test_export_writes_the_pixel_decoder_companion(mgmr_export: Path) -> None:
    from cemnet.weights.checkpoint_io import load_checkpoint

    companion = decoder_path(mgmr_export)
    assert companion.name == "encoder.decoder.safetensors"
    tensors, settings = read_decoder(companion)
    ckpt = load_checkpoint(mgmr_export.parent / "run" / "checkpoints" / "last.ckpt")
    expected = {k[len("pixel_decoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("pixel_decoder.")}
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert settings["base_width"] == 32 and settings["use_skips"] is True and settings["decoder"] == "pixel_decoder"
    # the encoder file itself stays exactly timm's tensors
    assert not any(k.startswith(("pixel_decoder", "hog_decoder", "blocks", "head")) for k in load_file(str(mgmr_export)))


def test_unet_decoder_holds_exactly_the_exported_tensors(mgmr_export: Path) -> None:
    tensors, _ = read_decoder(decoder_path(mgmr_export))
    unet = load_unet(mgmr_export, num_classes=1, in_chans=1, base_width=32, decoder="auto")
    own = unet.decoder.state_dict()
    assert own.keys() == tensors.keys()
    assert all(torch.equal(own[k], tensors[k]) for k in own)
    assert sorted(unet.decoder_report.loaded) == sorted(own) and not unet.decoder_report.skipped
    unet.eval()
    with torch.no_grad():
        assert unet(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_mismatched_shapes_are_reported_not_loaded(mgmr_export: Path) -> None:
    tensors, _ = read_decoder(decoder_path(mgmr_export))
    unet = load_unet(mgmr_export, num_classes=3, in_chans=1, base_width=32)  # 3 classes: the 1x1 head differs
    fresh_head = unet.decoder.head.weight.clone()
    report = load_decoder(unet.decoder, decoder_path(mgmr_export))
    assert set(report.skipped) == {"head.weight", "head.bias"} and "shape" in report.skipped["head.weight"]
    assert torch.equal(unet.decoder.head.weight, fresh_head)
    assert all(torch.equal(unet.decoder.state_dict()[k], tensors[k]) for k in report.loaded) and report.loaded
    assert "2 kept at initialisation" in report.describe()
    assert load_unet(mgmr_export, num_classes=1, in_chans=1, base_width=32).decoder_report is None  # only when asked


def test_missing_decoder_file_is_one_clear_error(mgmr_export: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="decoder file not found"):
        load_unet(mgmr_export, num_classes=1, in_chans=1, base_width=32, decoder=tmp_path / "none.decoder.safetensors")
