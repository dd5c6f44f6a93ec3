"""load_encoder: channel adaptation, features_only, smp and U-Net recipes, cheap `import cemnet`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from test_weights_helpers import cemnet_block, lightning_checkpoint, real_patch
from timm.data import resolve_data_config
from timm.models import adapt_input_conv

import cemnet
from cemnet.models.unet import UNet
from cemnet.weights.build import adapt_first_conv
from cemnet.weights.export import export_encoder
from cemnet.weights.load import encoder_state_dict, load_unet


@pytest.fixture(scope="module")
def resnet18_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=0).eval()
    folder = tmp_path_factory.mktemp("resnet18")
    torch.save(lightning_checkpoint(model, cemnet_block("resnet18", mean=[0.45], std=[0.2])), folder / "last.ckpt")
    export_encoder(folder / "last.ckpt", folder / "encoder.safetensors")
    return folder / "encoder.safetensors", model


def test_adapt_first_conv_follows_timm() -> None:
    torch.manual_seed(0)
    rgb = torch.randn(8, 3, 7, 7)
    for n in (1, 2, 5):
        assert torch.equal(adapt_first_conv(rgb, n), adapt_input_conv(n, rgb, base_chans=3))
    grey = torch.randn(8, 1, 7, 7)
    assert torch.allclose(adapt_first_conv(grey, 3), grey.repeat(1, 3, 1, 1) / 3)
    # 5-D (3D conv) weights: same rules
    vol = torch.randn(4, 3, 3, 3, 3)
    assert torch.allclose(adapt_first_conv(vol, 1), vol.sum(1, keepdim=True))
    assert torch.allclose(adapt_first_conv(vol, 6), vol.repeat(1, 2, 1, 1, 1) / 2)


def test_in_chans_and_normalisation(resnet18_export: tuple[Path, torch.nn.Module], shared_data: Path) -> None:
    path, model = resnet18_export
    x = real_patch(shared_data)
    rgb = cemnet.load_encoder(path, in_chans=3).eval()
    with torch.no_grad():
        assert torch.allclose(rgb(x.repeat(1, 3, 1, 1)), model(x), rtol=1e-5, atol=1e-5)
    config = resolve_data_config(model=rgb)
    assert config["mean"] == pytest.approx((0.45,) * 3) and config["std"] == pytest.approx((0.2,) * 3)
    assert config["input_size"][0] == 3
    assert rgb.cemnet_meta.in_chans == 3 and rgb.cemnet_meta.mean == pytest.approx([0.45] * 3)


def test_features_only(resnet18_export: tuple[Path, torch.nn.Module], shared_data: Path) -> None:
    path, model = resnet18_export
    features = cemnet.load_encoder(path, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    assert features.feature_info.channels() == [64, 128, 256, 512]
    x = real_patch(shared_data)
    with torch.no_grad():
        maps = features(x)
        assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
        assert torch.equal(maps[-1], model.forward_features(x))


def test_timm_kwargs_pass_through(resnet18_export: tuple[Path, torch.nn.Module]) -> None:
    path, model = resnet18_export
    classifier = cemnet.load_encoder(path, num_classes=4)
    assert classifier.fc.out_features == 4
    assert torch.equal(classifier.conv1.weight, model.conv1.weight)


def test_smp_resnet18_recipe(resnet18_export: tuple[Path, torch.nn.Module], shared_data: Path) -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    path, model = resnet18_export
    unet = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=1).eval()
    sd = encoder_state_dict(path)
    unet.encoder.load_state_dict(sd, strict=True)
    encoder_sd = unet.encoder.state_dict()
    assert set(sd) == set(encoder_sd) and all(torch.equal(encoder_sd[k], v) for k, v in sd.items())
    x = real_patch(shared_data)
    with torch.no_grad():
        assert torch.equal(unet.encoder(x)[-1], model.forward_features(x))
        assert unet(x).shape == (1, 1, 64, 64)


def test_unet2d_on_export(resnet18_export: tuple[Path, torch.nn.Module], shared_data: Path) -> None:
    path, model = resnet18_export
    unet = load_unet(path, num_classes=2, base_width=64)
    assert torch.equal(unet.encoder.conv1.weight, model.conv1.weight)
    x = real_patch(shared_data, size=96)
    logits = unet(x)
    assert logits.shape == (1, 2, 96, 96)
    logits.mean().backward()  # trainable end to end
    assert unet.encoder.conv1.weight.grad is not None
    # also on an odd size (features are resized to their skips, not assumed x2)
    with torch.no_grad():
        assert unet.eval()(real_patch(shared_data, size=72)).shape == (1, 2, 72, 72)


def test_unet_takes_a_module_and_names_load_unet_otherwise(resnet18_export: tuple[Path, torch.nn.Module]) -> None:
    path, _ = resnet18_export
    with pytest.raises(TypeError, match="cemnet.weights.load_unet"):
        UNet(path, num_classes=2)  # type: ignore[arg-type]
    assert cemnet.weights.load_unet is load_unet


def test_unknown_name_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="registered: .*cem500k_mocov2_resnet50"):
        cemnet.load_encoder(tmp_path / "nope.safetensors")


def test_import_cemnet_does_not_import_torch() -> None:
    code = (
        "import sys, cemnet, cemnet.weights, cemnet.weights.cli, cemnet.weights.cli_export\n"
        "import cemnet.transferability, cemnet.transferability.cli\n"
        "assert 'torch' not in sys.modules, 'torch imported eagerly'\n"
        "assert callable(cemnet.load_encoder) and 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
