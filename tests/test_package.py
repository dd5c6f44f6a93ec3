"""cemnet package (BioImage Model Zoo, validated by bioimageio.spec and reproduced by
bioimageio.core) and model cards (next to saved models and exported encoders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from segment_models import cached_mito
from test_weights_helpers import cemnet_block, lightning_checkpoint

from cemnet.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data) -> Path:
    return cached_mito(tmp_path_factory, shared_data)


@pytest.mark.slow
def test_package_validates_and_reproduces(trained, shared_data, tmp_path, capsys) -> None:
    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    from cemnet.share.bioimageio_compat import patch

    model = tmp_path / "model.safetensors"
    model.write_bytes(trained.read_bytes())
    sample = shared_data / "cdeep3m_mito_sbem/validation/images"  # real SBEM slices, never seen in training
    out = tmp_path / "pkg"
    assert main(["package", str(model), "--out", str(out), "--sample", str(sample), "--author", "A. Tester"]) == 0
    assert "validated by bioimageio.spec" in capsys.readouterr().out
    rdf = yaml.safe_load((out / "rdf.yaml").read_text())
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript"}
    assert any("doi" in c and c["doi"] == "10.1007/978-3-319-24574-4_28" for c in rdf["cite"])
    for name in ("test_input.npy", "test_output.npy", "cover.png", "README.md", "weights.pt", "weights_torchscript.pt"):
        assert (out / name).is_file(), name
    x = np.load(out / "test_input.npy")
    assert x.shape == (1, 1, 64, 64) and x.std() > 5  # a real tile, not a blank one
    patch()  # bioimageio.spec 0.5.12 + this pydantic: see cemnet/share/bioimageio_compat.py
    descr = load_description(out / "rdf.yaml")
    assert descr.validation_summary.status in ("passed", "valid-format"), descr.validation_summary.format()
    summary = test_model(out / "rdf.yaml")
    failed = [d for d in summary.details if d.status == "failed"]
    assert not failed and summary.status in ("passed", "valid-format"), summary.format()
    reproduced = [d for d in summary.details if "Reproduce test outputs" in d.name]
    assert {d.name.split("(")[-1].rstrip(")") for d in reproduced} == {"pytorch_state_dict", "torchscript"}
    assert (tmp_path / "model.md").is_file()  # the card is written next to the model too
    # a second run refuses to overwrite
    assert main(["package", str(model), "--out", str(out), "--sample", str(sample)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_package_bad_inputs(trained, tmp_path, capsys) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    assert main(["package", str(broken), "--out", str(tmp_path / "p"), "--sample", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "Traceback" not in err
    assert main(["package", str(trained), "--out", str(tmp_path / "p"), "--sample", str(tmp_path / "none.tif")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_model_card_from_recorded_metadata(trained, tmp_path) -> None:
    from cemnet.finetune.model_file import load_model, save_model
    from cemnet.share.model_card import write_model_card

    model = load_model(trained)
    spec = model.cemnet_spec
    spec.encoder = {"source": "cem500k_mocov2_resnet50", "sha256": "ab" * 32, "method": "mocov2",
                    "arch": "resnet50", "corpus_fingerprint": "f00d", "corpus_size": 496544, "global_step": 200000}
    spec.scores = {"iou": 0.8125}
    path = save_model(model, spec, tmp_path / "model.safetensors")
    card = write_model_card(path).read_text()
    assert card.startswith("# Model card: model.safetensors")
    for expected in ("x = (uint8 / 255 - 0.5) / 0.2", "| iou | 0.8125 |", "| pretraining corpus fingerprint | f00d |",
                     "| pretraining corpus size | 496544 |", "| pretraining steps | 200000 |", "MoCo v2",
                     "10.7554/eLife.65894", "mitochondrion=1", "## Licence", "| iterations / steps | 6 |"):
        assert expected in card, expected


def test_export_writes_an_encoder_card(tmp_path) -> None:
    """cemnet export writes <out>.md next to the encoder from its metadata."""
    from cemnet.weights.export import export_encoder

    net = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    torch.save(lightning_checkpoint(net, cemnet_block("resnet18", method="mocov2"), backbone_prefix="backbone."),
               tmp_path / "last.ckpt")
    export_encoder(tmp_path / "last.ckpt", tmp_path / "enc.safetensors")
    card = (tmp_path / "enc.md").read_text()
    assert "| architecture | resnet18 |" in card and "| pretraining method | mocov2 |" in card
    assert "arXiv:2003.04297" in card and "file sha256" in card
