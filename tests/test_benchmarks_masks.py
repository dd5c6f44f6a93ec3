"""Mask semantics (issue 11 item 9), benchmark data errors (item 13), help (item 14), results
table statistics and frozen marks, random-encoder architecture (item 24) and overlay choice (item 25).

Masks in formats the shared data lacks (JPEG-compressed, 16-bit TIFF) are made by converting the
real ISBI 2012 labels, as the test names say."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cemnet.benchmarks.datasets import load_benchmark, load_custom_2d, read_mask
from cemnet.benchmarks.masks import IGNORE, MaskError, MaskSemantics, parse_class_map
from cemnet.cli import main as cemnet_main
from helpers import tiny_encoder_export


def _isbi_subset(shared_data: Path, tmp_path: Path, n: int = 3) -> tuple[Path, list[np.ndarray]]:
    """The first ``n`` ISBI images in a folder of their own, and their labels (0 membrane / 255 interior)."""
    imgs = tmp_path / "images"
    imgs.mkdir()
    labels = []
    for i in range(n):
        shutil.copy(shared_data / f"isbi2012/train/images/{i}.png", imgs / f"{i}.png")
        labels.append(read_mask(shared_data / f"isbi2012/train/labels/{i}.png"))
    return imgs, labels


def test_axondeepseg_three_values_are_three_classes(shared_data: Path) -> None:
    mask = read_mask(shared_data / "axondeepseg_sem_demo/mask.png")
    assert set(np.unique(mask).tolist()) == {0, 128, 255}
    (auto,), rep = MaskSemantics().apply([mask], ["mask.png"])
    assert rep.mode == "labels" and rep.value_to_class == {0: 0, 128: 1, 255: 2}
    assert auto.max() == 2 and (auto == 2).sum() == (mask == 255).sum()
    assert sum(rep.frequencies.values()) == pytest.approx(1.0) and "class frequencies" in rep.summary()
    (named,), rep = MaskSemantics(class_map=parse_class_map(["128=myelin", "255=axon"])).apply([mask], ["mask.png"])
    assert rep.classes == ("myelin", "axon") and (named == auto).all()
    with pytest.raises(MaskError, match="mask.png.*do not look like class ids"):
        MaskSemantics(mode="labels").apply([mask], ["mask.png"])  # 255 classes refused, not allocated
    (fg,), rep = MaskSemantics(mode="binary").apply([mask], ["mask.png"])
    assert rep.threshold == 127.5 and (fg == (mask > 0)).all()
    with pytest.raises(MaskError, match=r"mask.png: mask values 255 are not in the class map"):
        MaskSemantics(class_map={128: "myelin"}).apply([mask], ["mask.png"])


def test_jpeg_and_16bit_masks(shared_data: Path, tmp_path: Path) -> None:
    """ISBI labels written as JPEG (compression adds many grey values) and as 16-bit 0/65535 TIFF."""
    import tifffile

    imgs, labels = _isbi_subset(shared_data, tmp_path)
    jpg, tif = tmp_path / "jpg", tmp_path / "tif16"
    jpg.mkdir(), tif.mkdir()
    for i, lab in enumerate(labels):
        Image.fromarray(lab).save(jpg / f"{i}_mask.jpg", quality=70)
        tifffile.imwrite(tif / f"{i}.tif", (lab > 0).astype(np.uint16) * 65535)
    assert len(np.unique(read_mask(jpg / "0_mask.jpg"))) > 8
    with pytest.raises(MaskError, match=r"jpg.*distinct mask values.*--mask-mode binary"):
        load_custom_2d(imgs, jpg, "z:0.5")
    d = load_custom_2d(imgs, jpg, "z:0.5", semantics=MaskSemantics(mode="binary", classes=["interior"]))
    agree = np.mean([(s.mask == (lab > 0)).mean() for s, lab in zip(d.train + d.test, labels)])
    assert d.classes == ("interior",) and agree > 0.98
    # interior covers ~78% of ISBI: an all-foreground prediction would score high, so warn
    assert any("covers" in w for w in d.mask_report.warnings)
    d16 = load_custom_2d(imgs, tif, "z:0.5")
    assert d16.mask_report.mode == "binary" and d16.mask_report.threshold == 32767.5 and len(d16.classes) == 1
    assert all(set(np.unique(s.mask).tolist()) <= {0, 1} for s in d16.train + d16.test)


def test_sparse_labels_ignore_value(shared_data: Path) -> None:
    lab = read_mask(shared_data / "isbi2012/train/labels/0.png").copy()
    lab[:100] = 7  # unlabelled band
    (out,), rep = MaskSemantics(mode="binary", ignore_value=7).apply([lab], ["0.png"])
    assert (out[:100] == IGNORE).all() and set(np.unique(out[100:]).tolist()) == {0, 1}
    assert rep.ignored_fraction == pytest.approx(100 / 512)


def test_benchmark_data_errors_are_one_line(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cemnet_main(["benchmark", "isbi2012", "--data-dir", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "isbi2012" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    imgs, labels = _isbi_subset(shared_data, tmp_path)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, lab in enumerate(labels[:2]):
        Image.fromarray(lab).save(masks / f"{i}.png")
    Image.fromarray(labels[2]).save(masks / "other.png")
    rc = cemnet_main(["benchmark", "custom", "--images", str(imgs), "--masks", str(masks), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and str(imgs / "2.png") in err and "no mask named 2" in err and "Traceback" not in err


def test_custom_help_shows_only_its_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    from cemnet.benchmarks.cli import build_parser

    with pytest.raises(SystemExit):
        cemnet_main(["benchmark", "custom", "--help"])
    text = capsys.readouterr().out
    assert "--mask-mode" in text and "--class-map" in text and "(default: auto)" in text
    assert "--data-dir" not in text and "isbi2012" not in text
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "benchmark").choices
    for name in ("custom", "isbi2012", "gala"):
        for action in subs[name]._actions:
            assert action.help, f"benchmark {name}: option {action.option_strings} has no help"


def test_table_sample_std_and_frozen_marks() -> None:
    from cemnet.benchmarks.sweep import markdown_table

    rows = [{"encoder": "enc", "freeze": f, "fraction": 1.0, "seed": s, "iteration": 10, "iou": v}
            for f in ("none", "encoder") for s, v in ((0, 0.5), (1, 0.7))]
    rows.append({"encoder": "solo", "freeze": "none", "fraction": 1.0, "seed": 0, "iteration": 10, "iou": 0.4})
    table = markdown_table(rows)
    assert "| enc | 0.600 ± 0.141 (n=2) |" in table  # ddof=1: std of (0.5, 0.7) is 0.1414, not 0.1
    assert "| enc [frozen: encoder] | 0.600 ± 0.141 (n=2) |" in table and "| solo | 0.400 (n=1) |" in table


def test_random_follows_pretrained_arch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cemnet.benchmarks.sweep import resolve_random_arch

    path, _ = tiny_encoder_export(tmp_path / "tiny.safetensors", seed=None)
    with caplog.at_level(logging.WARNING, logger="cemnet.benchmarks"):
        assert resolve_random_arch([str(path), "random"], None) == "test_resnet"
        assert not caplog.records
        assert resolve_random_arch([str(path), "random"], "resnet18") == "resnet18"
    assert "differ in architecture" in caplog.text
    assert resolve_random_arch(["random"], None) == "resnet50"


def test_overlays_pick_varied_images(shared_data: Path) -> None:
    from cemnet.benchmarks.sweep import choose_overlay_samples

    d = load_benchmark("vnc_mito", shared_data, "z:0.5")
    picked = choose_overlay_samples(d.test, 3)
    names = [s.name for s in d.test]
    idx = sorted(names.index(s.name) for s in picked)
    assert len(set(idx)) == 3 and idx != [0, 1, 2] and max(np.diff(idx)) > 1
    named = choose_overlay_samples(d.test, 3, [d.test[4].name, "1"])
    assert [s.name for s in named] == [d.test[4].name, d.test[1].name]
    with pytest.raises(ValueError, match="no test image"):
        choose_overlay_samples(d.test, 1, ["nope"])
