"""``cemnet transfer rank|select`` end to end on real data (small_corpus, ISBI 2012 folders)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cemnet.cli import main as cemnet_main

FAST = ["--input-size", "64", "--batch-size", "32"]  # a random-init resnet18 at 64 px: seconds on CPU


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 50


@pytest.fixture(scope="module")
def isbi(shared_data) -> tuple[Path, Path]:
    return shared_data / "isbi2012/train/images", shared_data / "isbi2012/test/images"


def test_rank_corpus_sources(small_corpus, isbi, tmp_path, capsys):
    out = tmp_path / "rank"
    rc = cemnet_main(["transfer", "rank", str(isbi[1]), "--candidates", str(small_corpus),
                      "--encoder", "timm:resnet18", "--n", "48", "--permutations", "50", "--out", str(out), *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "MMD^2" in printed and "rank.csv" in printed
    table = rows(out / "rank.csv")
    assert {r["candidate"] for r in table} == {"isbi2012", "neuroproof", "sem16bit_tile"}
    # the ISBI train slices are the same microscope and tissue as the ISBI test target
    assert table[0]["candidate"] == "isbi2012"
    mmds = [float(r["mmd2"]) for r in table]
    assert mmds == sorted(mmds)
    assert float(table[-1]["p_value"]) < 0.05  # an unrelated source differs significantly
    assert_png(out / "mmd_heatmap.png")
    matrix = np.loadtxt(out / "mmd_heatmap.csv", delimiter=",")
    assert matrix.shape == (4, 4) and np.allclose(matrix, matrix.T)  # target + 3 sources


def test_rank_image_folders_and_errors(isbi, shared_data, tmp_path, capsys):
    out = tmp_path / "rank2"
    vnc = shared_data / "drosophila_vnc_gerhard2013/stack1/raw"
    rc = cemnet_main(["transfer", "rank", str(isbi[0]), "--candidates", str(isbi[1]), str(vnc),
                      "--encoder", "timm:resnet18", "--n", "32", "--permutations", "20", "--out", str(out), *FAST])
    assert rc == 0
    assert [r["candidate"] for r in rows(out / "rank.csv")] == ["test/images", "stack1/raw"]
    assert_png(out / "mmd_heatmap.png")
    capsys.readouterr()
    # a mix of data and encoders, and data candidates without an encoder, are user errors
    assert cemnet_main(["transfer", "rank", str(isbi[0]), "--candidates", str(isbi[1]), "timm:resnet18",
                        "--out", str(out)]) == 2
    assert "not a mix" in capsys.readouterr().err
    assert cemnet_main(["transfer", "rank", str(isbi[0]), "--candidates", str(isbi[1]), "--out", str(out)]) == 2
    assert "--encoder" in capsys.readouterr().err


def _export(path: Path, fingerprint: str | None) -> Path:
    import timm

    from cemnet.weights.convert import EncoderWeights
    from cemnet.weights.export import save_encoder
    from cemnet.weights.meta import EncoderMeta

    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=0)
    meta = EncoderMeta(arch="resnet18", in_chans=1, mean=[0.5], std=[0.2], method="test",
                       corpus_fingerprint=fingerprint)
    return save_encoder(EncoderWeights(model.state_dict(), meta, "cemnet-safetensors"), path)


def test_rank_encoders(small_corpus, isbi, tmp_path, capsys):
    from curation.corpus import open_corpus

    fp = open_corpus(small_corpus).fingerprint
    with_corpus = _export(tmp_path / "a.safetensors", f"sha256:{fp}")
    without = _export(tmp_path / "b.safetensors", None)
    out = tmp_path / "rank_enc"
    args = ["transfer", "rank", str(isbi[1]), "--candidates", str(with_corpus), str(without),
            "--pretrain-corpus", str(small_corpus), "--n", "32", "--permutations", "20", "--out", str(out), *FAST]
    assert cemnet_main(args) == 2  # b records no corpus and there is no --reference proxy
    assert "--reference" in capsys.readouterr().err
    assert cemnet_main([*args, "--reference", str(isbi[0])]) == 0
    table = {Path(r["candidate"]).name: r for r in rows(out / "rank.csv")}
    assert table["a.safetensors"]["reference"].startswith("pretraining corpus (fingerprint match)")
    assert table["b.safetensors"]["reference"].startswith("proxy (--reference)")
    assert_png(out / "mmd_heatmap.png")  # one panel per encoder feature space
    assert_png(out / "mmd_heatmap_1.png")


def test_select_folder_kcenter_random_and_head(isbi, tmp_path, capsys):
    from cemnet.models.unet import UNet
    from cemnet.transferability.active import save_head
    from cemnet.transferability.embed import build_features_encoder

    base = ["transfer", "select", str(isbi[1]), "--pool", "60", *FAST]
    out = tmp_path / "kc"
    assert cemnet_main([*base, "--encoder", "timm:resnet18", "--budget", "5", "--strategy", "kcenter",
                        "--out", str(out)]) == 0
    sel = rows(out / "selection.csv")
    assert len(sel) == 5 and len({(r["file"], r["y"], r["x"]) for r in sel}) == 5
    assert all(Path(r["file"]).is_file() and r["file"].endswith(".png") for r in sel)
    assert all(int(r["y"]) % 224 == 0 and int(r["x"]) % 224 == 0 for r in sel)
    assert_png(out / "montage.png")

    # uncertainty strategies refuse to run without a trained head, and say why
    assert cemnet_main([*base, "--budget", "5", "--strategy", "median", "--out", str(out)]) == 2
    assert "not meaningful" in capsys.readouterr().err

    head = save_head(UNet(build_features_encoder("timm:resnet18"), num_classes=2, base_width=32),
                     tmp_path / "head.pt", encoder="timm:resnet18", num_classes=2,
                     unet_kwargs={"base_width": 32}, input_size=64)
    out2 = tmp_path / "med"
    assert cemnet_main([*base, "--head", str(head), "--budget", "4", "--strategy", "median", "--out", str(out2)]) == 0
    sel = rows(out2 / "selection.csv")
    scores = np.array([float(r["score"]) for r in sel])
    assert len(sel) == 4 and np.all((scores >= 0) & (scores <= 1))
    assert_png(out2 / "montage.png")

    # a model file as `cemnet finetune` writes it (RUN/model.safetensors) is a head too
    from cemnet.finetune.model_file import ModelSpec, build_network, save_model

    spec = ModelSpec(task="semantic", dims="2d", output="sigmoid", norm=(0.5, 0.2), tile=(128, 128), halo=(16, 16),
                     arch={"kind": "unet", "encoder": "resnet18", "spatial_dims": 2, "in_chans": 1, "out_channels": 1,
                           "base_width": 32}, classes=[{"name": "background", "value": 255}, {"name": "membrane", "value": 0}],
                     encoder={"source": "random", "arch": "resnet18"})
    model_file = save_model(build_network(spec), spec, tmp_path / "run" / "model.safetensors")
    out4 = tmp_path / "model_file"
    assert cemnet_main([*base, "--head", str(model_file), "--budget", "4", "--strategy", "highest", "--out", str(out4)]) == 0
    scores4 = [float(r["score"]) for r in rows(out4 / "selection.csv")]
    assert len(scores4) == 4 and scores4 == sorted(scores4, reverse=True)

    out3 = tmp_path / "rnd"
    assert cemnet_main([*base, "--budget", "500", "--strategy", "random", "--out", str(out3)]) == 0
    assert len(rows(out3 / "selection.csv")) == 60  # budget > pool: the whole pool
    assert "exceeds the pool" in capsys.readouterr().out


def test_select_corpus_provenance(small_corpus, tmp_path):
    out = tmp_path / "sel_corpus"
    assert cemnet_main(["transfer", "select", str(small_corpus), "--encoder", "timm:resnet18", "--budget", "6",
                        "--strategy", "kcenter", "--pool", "80", "--out", str(out), *FAST]) == 0
    sel = rows(out / "selection.csv")
    assert len(sel) == 6
    assert {r["source"] for r in sel} <= {"isbi2012", "neuroproof", "sem16bit_tile"}
    assert all(r["plane"] in ("xy", "xz", "yz") and r["file"] == "" for r in sel)
    assert_png(out / "montage.png")
