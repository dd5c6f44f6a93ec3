"""cemnet export: checkpoints in the pretraining layout -> clean timm-keyed safetensors."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from test_weights_helpers import cemnet_block, lightning_checkpoint, real_patch

from cemnet.cli import main as cemnet_main
from cemnet.weights.build import IncompatibleWeightsError
from cemnet.weights.checkpoint_io import CheckpointError, find_checkpoint, load_checkpoint
from cemnet.weights.export import export_encoder
from cemnet.weights.keys import clean_key, split_prefix
from cemnet.weights.load import load_encoder, load_unet


def _timm(arch: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, in_chans=1, num_classes=0, **kwargs).eval()


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_clean_key_strips_wrappers_only_where_they_belong() -> None:
    assert clean_key("module._orig_mod.backbone._orig_mod.layer1.0.conv1.weight") == "backbone.layer1.0.conv1.weight"
    assert clean_key("module.module.conv1.weight") == "conv1.weight"
    # a real submodule called "module" deeper down is architecture, not a wrapper
    assert clean_key("blocks.module.weight") == "blocks.module.weight"
    inside, outside = split_prefix({"_orig_mod.backbone.module.fc.weight": 1, "backbone_momentum.fc.weight": 2}, "backbone")
    assert inside == {"fc.weight": 1} and outside == {"backbone_momentum.fc.weight": 2}


def test_export_run_folder_resnet18(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _timm("resnet18")
    ckpt = lightning_checkpoint(model, cemnet_block("resnet18"), backbone_prefix="module.backbone._orig_mod.")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    out = tmp_path / "encoder.safetensors"

    assert cemnet_main(["export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cemnet-lightning" in printed and f"backbone_momentum ({len(model.state_dict())})" in printed

    with safe_open(str(out), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(model.state_dict())  # exactly timm's keys: no prefixes, heads or momentum
    header = _header(out)
    assert json.loads(header["arch"]) == "resnet18"
    assert json.loads(header["in_chans"]) == 1
    assert json.loads(header["mean"]) == [0.5] and json.loads(header["std"]) == [0.25]
    assert json.loads(header["method"]) == "mocov2"
    assert json.loads(header["corpus_fingerprint"]) == "sha256:0123abcd"
    assert json.loads(header["epochs"]) == 7 and json.loads(header["global_step"]) == 70

    loaded = load_encoder(out).eval()
    x = real_patch(shared_data)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg["mean"] == (0.5,)
    assert loaded.cemnet_meta.corpus_fingerprint == "sha256:0123abcd"


def test_find_checkpoint_prefers_last_then_newest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    older, newer = run / "checkpoints" / "epoch=1.ckpt", run / "checkpoints" / "epoch=2.ckpt"
    older.write_bytes(b"a")
    newer.write_bytes(b"b")
    os.utime(older, (1_000, 1_000))
    os.utime(newer, (2_000, 2_000))
    assert find_checkpoint(run) == newer
    (run / "checkpoints" / "last.ckpt").write_bytes(b"c")
    assert find_checkpoint(run) == run / "checkpoints" / "last.ckpt"
    assert find_checkpoint(older) == older
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.ckpt"):
        find_checkpoint(tmp_path / "empty_run")


def test_export_non_resnet_drops_classifier(tmp_path: Path, shared_data: Path) -> None:
    # A backbone built with its default head: the classifier is not part of the encoder.
    with_head = timm.create_model("test_convnext", pretrained=False, in_chans=1).eval()
    ckpt = lightning_checkpoint(with_head, cemnet_block("test_convnext", method="mgmr2d"), backbone_prefix="backbone.")
    path = tmp_path / "mgmr.ckpt"
    torch.save(ckpt, path)
    weights = export_encoder(path, tmp_path / "enc.safetensors")
    assert weights.dropped["head.fc (classifier)"] == 2
    bare = _timm("test_convnext")
    with safe_open(str(tmp_path / "enc.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == set(bare.state_dict())
    loaded = load_encoder(tmp_path / "enc.safetensors").eval()
    x = real_patch(shared_data)
    with torch.no_grad():
        assert torch.equal(loaded(x), with_head.forward_head(with_head.forward_features(x), pre_logits=True))


def test_export_3d_encoder_and_unet3d(tmp_path: Path, shared_data: Path) -> None:
    from cemnet.models.encoder3d import build_encoder3d

    torch.manual_seed(0)
    arch_kwargs = {"widths": [8, 16, 24], "depths": [1, 1, 1], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]]}
    encoder = build_encoder3d("cemnet3d_res_tiny", in_chans=1, **arch_kwargs).eval()
    block = cemnet_block("cemnet3d_res_tiny", method="mgmr3d", spatial_dims=3, arch_kwargs=arch_kwargs)
    torch.save(lightning_checkpoint(encoder, block), tmp_path / "last.ckpt")
    out = tmp_path / "enc3d.safetensors"
    export_encoder(tmp_path / "last.ckpt", out)
    with safe_open(str(out), framework="pt") as handle:
        assert set(handle.keys()) == set(encoder.state_dict())

    # a real 8-slice stack of ISBI crops (z, y, x)
    volume = torch.cat([real_patch(shared_data, size=32)] * 8, dim=0).permute(1, 0, 2, 3).unsqueeze(0)
    loaded = load_encoder(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(volume), encoder(volume))
        two = load_encoder(out, in_chans=2).eval()  # 5-D first conv adapted like timm's rule
        assert torch.allclose(two(volume.repeat(1, 2, 1, 1, 1)), encoder(volume), atol=1e-5)
    unet = load_unet(out, num_classes=3).eval()
    with torch.no_grad():
        assert unet(volume).shape == (1, 3, 8, 32, 32)


def test_export_rejects_weights_that_do_not_fit(tmp_path: Path) -> None:
    ckpt = lightning_checkpoint(_timm("resnet18"), cemnet_block("resnet34"))
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(IncompatibleWeightsError, match=r"resnet34.*missing"):
        export_encoder(tmp_path / "bad.ckpt", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert cemnet_main(["export", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path / "x.safetensors")]) == 1


def test_checkpoints_are_loaded_weights_only(tmp_path: Path) -> None:
    # an arbitrary object (here argparse's Namespace, as old Lightning hparams hold) is refused
    torch.save({"state_dict": {}, "hparams": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="argparse.Namespace.*weights_only=True"):
        load_checkpoint(tmp_path / "pickled.ckpt")
    # plain data in numpy scalars and paths is fine
    torch.save({"norms": [np.float64(0.57), np.float32(0.12)], "dir": Path("/data/run")}, tmp_path / "plain.ckpt")
    loaded = load_checkpoint(tmp_path / "plain.ckpt")
    assert loaded["norms"][0] == pytest.approx(0.57) and loaded["dir"] == Path("/data/run")


@pytest.mark.parametrize("method", ["mocov2", "mgmr3d"])
def test_contract_with_pretraining_modules(tmp_path: Path, shared_data: Path, method: str) -> None:
    """The real pretraining modules' checkpoint hook produces what export expects."""
    if method == "mocov2":
        from cemnet.methods.mocov2 import MoCoV2

        module = MoCoV2(arch="test_resnet", queue_size=64, mean=0.5, std=0.25, corpus_fingerprint="fp")
        x = real_patch(shared_data)
    else:
        from cemnet.methods.mgmr import MGMR3D

        module = MGMR3D(arch="cemnet3d_res_tiny", mean=0.5, std=0.25)
        x = torch.cat([real_patch(shared_data, size=32)] * 4, dim=0).permute(1, 0, 2, 3).unsqueeze(0)
    module.eval()
    ckpt = {"state_dict": module.state_dict(), "epoch": 3, "global_step": 9, "hyper_parameters": {}}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "last.ckpt")
    weights = export_encoder(tmp_path / "last.ckpt", tmp_path / "enc.safetensors")
    assert weights.meta.method == method and weights.meta.mean == [0.5]
    assert set(weights.state_dict) == set(module.backbone.state_dict())
    loaded = load_encoder(tmp_path / "enc.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), module.backbone(x))


def test_export_refuses_non_finite_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A diverged run (BatchNorm running_var inf, finite loss) must not become an encoder."""
    model = _timm("test_resnet")
    model.bn1.running_var[0] = float("inf")
    torch.save(lightning_checkpoint(model, cemnet_block("test_resnet")), tmp_path / "last.ckpt")
    out = tmp_path / "enc.safetensors"
    assert cemnet_main(["export", str(tmp_path / "last.ckpt"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "bn1.running_var" in err and "NaN/inf" in err and str(tmp_path / "last.ckpt") in err
    assert "Traceback" not in err and not out.exists()


def test_export_gets_the_usual_file_permissions(tmp_path: Path) -> None:
    torch.save(lightning_checkpoint(_timm("test_resnet"), cemnet_block("test_resnet")), tmp_path / "last.ckpt")
    old = os.umask(0o022)
    try:
        export_encoder(tmp_path / "last.ckpt", tmp_path / "enc.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "enc.safetensors").stat().st_mode & 0o777 == 0o644


def test_published_file_gets_the_usual_permissions_even_from_an_old_0600_export(tmp_path: Path) -> None:
    from cemnet.weights.publish import publish

    torch.save(lightning_checkpoint(_timm("test_resnet"), cemnet_block("test_resnet")), tmp_path / "last.ckpt")
    export = tmp_path / "enc.safetensors"
    export_encoder(tmp_path / "last.ckpt", export)
    export.chmod(0o600)  # what exports were before the fix
    old = os.umask(0o022)
    try:
        _, published = publish(export, "tiny", "https://example.org/w", out_dir=tmp_path / "pub", move=True)
    finally:
        os.umask(old)
    assert published.stat().st_mode & 0o777 == 0o644


def test_non_checkpoints_get_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pickle

    from cemnet.weights.publish import publish

    model = _timm("test_resnet")
    raw = tmp_path / "weights.pkl"  # pickle.dump, not torch.save
    raw.write_bytes(pickle.dumps({k: v.numpy() for k, v in model.state_dict().items()}))
    assert cemnet_main(["export", str(raw), "--out", str(tmp_path / "o.safetensors"), "--arch", "test_resnet"]) == 1
    err = capsys.readouterr().err
    assert str(raw) in err and "plain Python pickle" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(CheckpointError, match=r"weights\.pkl.*plain Python pickle"):
        load_encoder(raw, arch="test_resnet")
    legacy = tmp_path / "legacy.pth"  # legacy torch.save files are still read
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert set(load_checkpoint(legacy)) == set(model.state_dict())
    with pytest.raises(CheckpointError, match=r"legacy\.pth: a torch\.save checkpoint, not \.safetensors"):
        publish(legacy, "x", "https://example.org")
    assert cemnet_main(["weights", "publish", str(legacy), "--name", "x", "--url-base", "https://example.org"]) == 1
    err = capsys.readouterr().err
    assert "legacy.pth" in err and "Traceback" not in err


def test_help_of_export_weights_and_transfer_shows_every_option_with_help_and_default() -> None:
    from cemnet.weights import cli_export, cli as cli_weights
    from cemnet.transferability import cli as cli_transfer
    from cemnet.cli_help import undocumented_options

    for parser in (cli_export.build_parser(), cli_weights.build_parser(), cli_transfer._parser()):
        assert undocumented_options(parser) == []
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for sub in [parser, *(p for a in subs for p in a.choices.values())]:
            for action in sub._actions:
                if action.option_strings and action.dest != "help":  # each option's help names its default
                    entry = sub._get_formatter()._expand_help(action)
                    assert "default" in entry.lower(), f"{sub.prog} {action.option_strings[0]}: {entry}"
