"""Foreign checkpoints in their published layouts -> timm weights (every tensor lands)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from test_weights_helpers import real_patch
from timm.data import IMAGENET_DEFAULT_MEAN
from torch import nn

from cemnet.cli import main as cemnet_main
from cemnet.weights.build import classifier_keys
from cemnet.weights.convert import UnknownArchitectureError, convert_checkpoint, infer_resnet_arch, read_weights
from cemnet.weights.load import encoder_state_dict, load_encoder
from cemnet.weights.meta import EncoderMeta

CEM_NORMS = [[0.57287], [0.12741]]  # per-channel lists, 1 channel, as CEM500K stores `norms`


def _close(a: torch.Tensor, b: torch.Tensor, scale: float = 1e-6) -> bool:
    # Same weights, different kernels (timm mean-pool vs torchvision adaptive pool; a summed conv
    # vs three convs): float rounding only, so allow `scale` of the output's magnitude.
    return bool((a - b).abs().max() <= scale * b.abs().max())


@pytest.fixture(scope="module")
def tv_resnet50() -> nn.Module:
    """torchvision ResNet50 (3 channels) with deterministic random weights and BN statistics."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    for module in model.modules():  # non-trivial running stats, so a lost buffer would show
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _grey(model: nn.Module) -> nn.Module:
    """The 1-channel variant CEM500K trained (conv1 (64, 1, 7, 7))."""
    grey = copy.deepcopy(model)
    grey.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    grey.conv1.weight.data = model.conv1.weight.data.sum(1, keepdim=True)
    return grey.eval()


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    trunk = copy.copy(model)
    trunk.fc = nn.Identity()
    with torch.no_grad():
        return trunk(x)


def _optimizer_state(params: list[torch.Tensor]) -> dict:
    return {"state": {0: {"momentum_buffer": torch.zeros_like(params[0])}}, "param_groups": [{"lr": 0.015, "momentum": 0.9, "params": list(range(len(params)))}]}


def test_cem500k_mocov2_layout(tmp_path: Path, shared_data: Path, tv_resnet50: nn.Module, capsys: pytest.CaptureFixture[str]) -> None:
    grey = _grey(tv_resnet50)
    # MoCo v2: encoder_q = resnet50(num_classes=128) with fc -> Linear(2048, 2048), ReLU, Linear(2048, 128)
    q_state = {k: v for k, v in grey.state_dict().items() if not k.startswith("fc.")}
    q_state |= {"fc.0.weight": torch.randn(2048, 2048), "fc.0.bias": torch.randn(2048), "fc.2.weight": torch.randn(128, 2048), "fc.2.bias": torch.randn(128)}
    state = {f"module.encoder_q.{k}": v for k, v in q_state.items()}
    # encoder_k has the same keys and shapes; sharing storage only keeps the test file small
    state |= {f"module.encoder_k.{k}": v for k, v in q_state.items()}
    state |= {"module.queue": torch.randn(128, 65536), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    ckpt = {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": _optimizer_state(list(q_state.values())), "norms": CEM_NORMS}
    path = tmp_path / "cem500k_mocov2_resnet50_200ep.pth.tar"
    torch.save(ckpt, path)

    weights = read_weights(path)
    assert weights.source_format == "mocov2"
    n_q = len(q_state)
    assert weights.dropped == {"encoder_q.fc (projection MLP)": 4, "encoder_k": n_q, "queue": 1, "queue_ptr": 1}
    expected = {k: v for k, v in grey.state_dict().items() if not k.startswith("fc.")}
    assert set(weights.state_dict) == set(expected)  # no missing, no unexpected
    assert all(torch.equal(weights.state_dict[k], v) for k, v in expected.items())
    assert weights.meta.arch == "resnet50" and weights.meta.in_chans == 1 and weights.meta.epochs == 200
    assert weights.meta.mean == pytest.approx(CEM_NORMS[0]) and weights.meta.std == pytest.approx(CEM_NORMS[1])

    # the CLI converts and reports the format
    out = tmp_path / "cem500k.safetensors"
    assert cemnet_main(["export", str(path), "--out", str(out)]) == 0
    assert "mocov2" in capsys.readouterr().out
    x = real_patch(shared_data, mean=CEM_NORMS[0][0], std=CEM_NORMS[1][0])
    encoder = load_encoder(out).eval()
    with torch.no_grad():
        assert _close(encoder(x), _features(grey, x))
    assert encoder.pretrained_cfg["mean"] == pytest.approx(tuple(CEM_NORMS[0]))

    # recipe: the same weights in segmentation_models_pytorch (smp ResNet encoders = torchvision names - fc)
    smp = pytest.importorskip("segmentation_models_pytorch")
    unet = smp.Unet(encoder_name="resnet50", encoder_weights=None, in_channels=1, classes=2).eval()
    sd = encoder_state_dict(out, in_chans=1)
    unet.encoder.load_state_dict(sd, strict=True)  # raises on any missing/unexpected key
    assert set(sd) == set(unet.encoder.state_dict())
    assert all(torch.equal(unet.encoder.state_dict()[k], v) for k, v in sd.items())
    with torch.no_grad():
        deepest = unet.encoder(x)[-1]
        trunk = nn.Sequential(*list(grey.children())[:-2])
        assert torch.equal(deepest, trunk(x))


def _swav_state(trunk: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # facebookresearch/swav resnet50: no fc; projection_head = Linear, BN1d, ReLU, Linear; prototypes
    head = nn.Sequential(nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 128))
    state = {f"{prefix}{k}": v for k, v in trunk.items()}
    state |= {f"{prefix}projection_head.{k}": v for k, v in head.state_dict().items()}
    state[f"{prefix}prototypes.weight"] = torch.randn(3000, 128)
    return state


def test_swav_layout_3_channels(tmp_path: Path, shared_data: Path, tv_resnet50: nn.Module) -> None:
    trunk = {k: v for k, v in tv_resnet50.state_dict().items() if not k.startswith("fc.")}
    # bare keys (single-GPU save) convert the same way as DDP's module.-prefixed ones
    bare = convert_checkpoint({"epoch": 200, "state_dict": _swav_state(trunk, "")})
    assert bare.source_format == "swav" and set(bare.state_dict) == set(trunk)
    path = tmp_path / "swav.pth.tar"
    ckpt = {"epoch": 200, "state_dict": _swav_state(trunk, "module."), "optimizer": _optimizer_state(list(trunk.values()))}
    torch.save(ckpt, path)

    weights = read_weights(path)
    assert weights.source_format == "swav"
    assert weights.dropped == {"projection_head": 9, "prototypes": 1}
    assert set(weights.state_dict) == set(trunk)
    assert all(torch.equal(weights.state_dict[k], v) for k, v in trunk.items())
    assert weights.meta.in_chans == 3 and weights.meta.mean is None

    x = real_patch(shared_data)
    with torch.no_grad():
        reference = _features(tv_resnet50, x.repeat(1, 3, 1, 1))
        with pytest.warns(UserWarning, match="no input mean/std"):  # the raw SwAV file has no norms
            rgb, grey = load_encoder(path).eval(), load_encoder(path, in_chans=1).eval()
        assert _close(rgb(x.repeat(1, 3, 1, 1)), reference)
        # adapted on load: the summed 1-channel conv sees the grey patch once
        assert _close(grey(x), reference, scale=1e-5)
    assert grey.pretrained_cfg["mean"] == pytest.approx((sum(IMAGENET_DEFAULT_MEAN) / 3,))


def test_released_state_dict_with_norms(tmp_path: Path, shared_data: Path, tv_resnet50: nn.Module) -> None:
    """CEM1.5M as empanada loads it: {'state_dict': bare ResNet50 keys (1 channel), 'norms': [mean, std]}."""
    grey = _grey(tv_resnet50)
    state = {k: v for k, v in grey.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": state, "norms": [0.5757, 0.1276]}, tmp_path / "cem15m.pth.tar")
    weights = read_weights(tmp_path / "cem15m.pth.tar")
    assert weights.source_format == "state-dict" and weights.dropped == {}
    assert weights.meta.arch == "resnet50" and weights.meta.in_chans == 1
    assert weights.meta.mean == pytest.approx([0.5757]) and weights.meta.std == pytest.approx([0.1276])
    x = real_patch(shared_data)
    with torch.no_grad():
        assert _close(load_encoder(tmp_path / "cem15m.pth.tar").eval()(x), _features(grey, x))


def test_torchvision_resnet18_state_dict(tmp_path: Path, shared_data: Path) -> None:
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None).eval()
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    weights = read_weights(tmp_path / "resnet18.pth")
    assert weights.source_format == "state-dict" and weights.meta.arch == "resnet18"
    assert weights.dropped == {"fc (classifier)": 2}
    assert set(weights.state_dict) == set(model.state_dict()) - {"fc.weight", "fc.bias"}
    x = real_patch(shared_data, channels=3)
    with pytest.warns(UserWarning, match="no input mean/std"):
        loaded = load_encoder(tmp_path / "resnet18.pth").eval()
    with torch.no_grad():
        assert _close(loaded(x), _features(model, x))


def test_timm_state_dict_needs_arch(tmp_path: Path, shared_data: Path) -> None:
    torch.manual_seed(2)
    model = timm.create_model("test_efficientnet", pretrained=False).eval()  # with its classifier
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))  # bare, like an HF hub file
    with pytest.raises(UnknownArchitectureError, match="arch="):
        read_weights(tmp_path / "model.safetensors")
    weights = read_weights(tmp_path / "model.safetensors", arch="test_efficientnet")
    assert weights.source_format == "state-dict"
    assert weights.dropped == {"classifier (classifier)": 2}
    x = real_patch(shared_data, channels=3)
    with pytest.warns(UserWarning, match="no input mean/std"):
        loaded = load_encoder(tmp_path / "model.safetensors", arch="test_efficientnet").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_own_export_is_recognised(tmp_path: Path) -> None:
    model = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=0)
    meta = EncoderMeta(arch="test_resnet", in_chans=1, mean=0.4, std=0.2, method="mgmr2d")
    save_file(model.state_dict(), str(tmp_path / "e.safetensors"), metadata=meta.to_safetensors())
    weights = read_weights(tmp_path / "e.safetensors")
    assert weights.source_format == "cemnet-safetensors" and weights.meta == meta


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2"])
def test_infer_resnet_arch(arch: str) -> None:
    with torch.device("meta"):
        state = timm.create_model(arch, pretrained=False).state_dict()
    assert infer_resnet_arch(state) == arch
    assert classifier_keys(EncoderMeta(arch=arch)) == {"fc.weight", "fc.bias"}


def test_lightning_checkpoint_without_cemnet_block() -> None:
    """e.g. a lightly/solo-learn module: encoder under backbone., heads beside it."""
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=0)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state |= {"projection_head.layers.0.weight": torch.randn(8, 512), "prototypes.layers.weight": torch.randn(10, 8)}
    weights = convert_checkpoint({"state_dict": state, "epoch": 5, "global_step": 50})
    assert weights.source_format == "lightning-backbone" and weights.meta.arch == "resnet18"
    assert weights.meta.epochs == 5 and weights.dropped == {"projection_head": 1, "prototypes": 1}
    assert set(weights.state_dict) == set(model.state_dict())


def test_pre_0_4_1_checkpoint_gets_batchnorm_counters() -> None:
    state = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if "num_batches_tracked" not in k}
    weights = convert_checkpoint(state)
    counters = [k for k in weights.state_dict if k.endswith("num_batches_tracked")]
    assert len(counters) == 20 and all(int(weights.state_dict[k]) == 0 for k in counters)
