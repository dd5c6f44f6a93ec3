"""3D encoders: multi-scale features for a 3D U-Net, strict rebuild from checkpoint metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cemnet.models.decoders import ReconDecoder
from cemnet.models.encoder3d import build_encoder3d, list_encoders3d, resolve_arch_kwargs


def _neuroproof_crop(shared_data: Path, d: int, h: int, w: int) -> torch.Tensor:
    folder = shared_data / "neuroproof_fibsem_medulla" / "training_sample2" / "grayscale_maps"
    files = sorted(folder.glob("*.png"))[50 : 50 + d]
    vol = np.stack([np.asarray(Image.open(f).convert("L"))[100 : 100 + h, 30 : 30 + w] for f in files])
    return torch.from_numpy(vol).float()[None, None] / 255.0


@pytest.mark.parametrize("arch", list_encoders3d())
def test_feature_list_matches_feature_info(shared_data: Path, arch: str) -> None:
    assert arch.startswith("cemnet3d_")
    enc = build_encoder3d(arch).eval()
    x = _neuroproof_crop(shared_data, 20, 32, 32)
    with torch.no_grad():
        feats = enc.forward_features(x)
    assert len(feats) == len(enc.feature_info)
    for f, info in zip(feats, enc.feature_info):
        assert f.shape[1] == info["num_chs"]
        expect = tuple(-(-s // r) for s, r in zip(x.shape[2:], info["reduction"]))
        assert tuple(f.shape[2:]) == expect
    assert enc.feature_info[0]["reduction"] == (1, 1, 1)  # finest feature at full resolution
    assert enc.num_features == feats[-1].shape[1]


def test_rebuild_from_json_metadata_loads_strictly() -> None:
    kwargs = resolve_arch_kwargs("cemnet3d_res_tiny", widths=[8, 16, 24, 32], norm="group")
    stored = json.loads(json.dumps({"arch": "cemnet3d_res_tiny", "in_chans": 1, "arch_kwargs": kwargs}))
    enc = build_encoder3d("cemnet3d_res_tiny", widths=[8, 16, 24, 32], norm="group")
    again = build_encoder3d(stored["arch"], stored["in_chans"], **stored["arch_kwargs"])
    again.load_state_dict(enc.state_dict(), strict=True)
    assert not any(k.startswith(("backbone.", "_orig_mod", "module.")) for k in enc.state_dict())


def test_features_only_view_shares_weights_and_feeds_a_3d_unet(shared_data: Path) -> None:
    enc = build_encoder3d("cemnet3d_res_tiny")
    seg = build_encoder3d("cemnet3d_res_tiny", features_only=True, out_indices=(0, 1, 2, 3))
    seg.load_state_dict(enc.state_dict(), strict=True)
    x = _neuroproof_crop(shared_data, 20, 32, 32)
    feats = seg(x)
    assert isinstance(feats, list) and len(feats) == 4
    deep = build_encoder3d("cemnet3d_res_tiny", features_only=True, out_indices=(-1,))
    assert [i["num_chs"] for i in deep.feature_info] == [64]
    # a U-Net decoder with skips on the features gives a full-resolution 2-class output
    head = ReconDecoder(
        [i["num_chs"] for i in seg.feature_info], [i["reduction"] for i in seg.feature_info],
        out_chans=2, spatial_dims=3, base_width=32, use_skips=True, activation="none",
    )
    assert head(feats, x.shape[2:]).shape == (1, 2, 20, 32, 32)


def test_export_side_builds_and_checks_3d_weights() -> None:
    # the export code (cemnet.weights.build) rebuilds 3D encoders through build_encoder3d
    from cemnet.weights.build import create_encoder
    from cemnet.weights.meta import EncoderMeta

    enc = build_encoder3d("cemnet3d_res_tiny")
    meta = EncoderMeta(arch="cemnet3d_res_tiny", spatial_dims=3, arch_kwargs=resolve_arch_kwargs("cemnet3d_res_tiny"))
    model = create_encoder(meta, enc.state_dict(), features_only=True)
    assert len(model(torch.zeros(1, 1, 8, 16, 16))) == len(enc.feature_info)


def test_unknown_names_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown 3D encoder"):
        build_encoder3d("resnet18")
    with pytest.raises(TypeError, match="unknown arch_kwargs"):
        build_encoder3d("cemnet3d_res_tiny", channels=[1, 2])
