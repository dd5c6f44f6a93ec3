"""Benchmark registry and loaders: every loader on the real shared data; documented layouts of
the others on synthetic files written in that layout."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from cemnet.benchmarks.datasets import (
    IGNORE, LOADERS, Sample, apply_split, label_fraction, load_benchmark, load_custom_2d, load_custom_3d,
)
from cemnet.benchmarks import datasets as ds
from cemnet.benchmarks.registry import get_benchmark, load_benchmarks

REQUIRED = {"isbi2012", "cdeep3m_mito", "vnc_mito", "vnc_membranes", "vnc_synapses", "lucchi_pp", "kasthuri_pp",
            "urocell", "guay", "perez", "cremi_clefts", "neuroproof", "gala"}


def test_registry_entries_are_complete() -> None:
    entries = load_benchmarks()
    assert REQUIRED <= set(entries)
    for e in entries.values():
        assert e.loader in LOADERS and e.urls and e.license and e.citation and e.layout
        for u in e.urls:
            assert u["url"].startswith("http")
            assert u["sha256"] is None or len(u["sha256"]) == 64  # null where the publisher gives none
        assert e.tested_on_real_data == (e.shared_dir is not None)
    with pytest.raises(KeyError, match="unknown benchmark"):
        get_benchmark("nope")


def test_isbi2012(shared_data: Path) -> None:
    d = load_benchmark("isbi2012", shared_data)
    assert (len(d.train), len(d.test)) == (24, 6) and d.classes == ("membrane",)
    s = d.train[0]
    assert s.image.shape == (512, 512) and s.image.dtype == np.uint8
    assert set(np.unique(s.mask)) == {0, 1} and 0.15 < s.mask.mean() < 0.3  # membrane (label 0) is the minority
    # the published folder pairs image i with label i
    assert [x.name for x in d.train[:3]] == ["0", "1", "2"]
    d2 = load_benchmark("isbi2012", shared_data / "isbi2012", split="test:0,29")
    assert [x.name for x in d2.test] == ["0", "29"] and len(d2.train) == 28


def test_cdeep3m_palette_labels(shared_data: Path) -> None:
    d = load_benchmark("cdeep3m_mito", shared_data)
    assert (len(d.train), len(d.test)) == (20, 10)
    m = d.train[0].mask
    assert m.shape == (1024, 1024) and set(np.unique(m)) == {0, 1} and 0.03 < m.mean() < 0.2
    assert d.test[0].name == "images.050"


def test_vnc_targets(shared_data: Path) -> None:
    mito = load_benchmark("vnc_mito", shared_data)
    assert (len(mito.train), len(mito.test)) == (16, 4)
    frac = np.mean([s.mask.mean() for s in mito.train])
    assert 0.03 < frac < 0.1  # ~11.4/255 mean of the anti-aliased 8-bit masks, thresholded at 128
    mem = load_benchmark("vnc_membranes", shared_data).train[0].mask
    syn = load_benchmark("vnc_synapses", shared_data).train[0].mask
    assert set(np.unique(mem)) == {0, 1} and syn.mean() < mem.mean()
    multi = load_benchmark("vnc_multiclass", shared_data).train[0].mask
    assert set(np.unique(multi)) <= {0, 1, 2, 3} and (multi == 2).any()
    stack2 = ds.load_vnc_unlabelled(shared_data / "drosophila_vnc_gerhard2013")
    assert stack2.shape == (20, 1024, 1024) and stack2.dtype == np.uint8  # RGB stored -> grey


def test_urocell_labels(shared_data: Path) -> None:
    root = shared_data / "urocell_labels_only"
    labels = ds.load_urocell_labels(root, ("lysosome", "mitochondria"))
    assert len(labels) == 5
    vol = next(iter(labels.values()))
    assert vol.shape == (256, 256, 256) and set(np.unique(vol)) <= {0, 1, 2} and (vol == 2).any()
    fv = ds.load_urocell_labels(root, ("fusiform_vesicle",))  # float64 on disk
    assert len(fv) == 4 and all(set(np.unique(v)) <= {0, 1} for v in fv.values())
    with pytest.raises(FileNotFoundError, match="raw volume missing"):
        load_benchmark("urocell", shared_data)


def test_neuroproof_and_gala(shared_data: Path) -> None:
    gt = ds.load_neuroproof_gt(shared_data / "neuroproof_fibsem_medulla")
    assert gt.shape == (250, 250, 250) and len(np.unique(gt)) == 526  # STATS.json: 526 bodies incl. 0
    g = load_benchmark("gala", shared_data)
    assert g.task == "instance3d" and g.train[0].image.shape == (50, 100, 200) and g.test[0].mask.max() == 132


def test_documented_layouts_synthetic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Lucchi++ / Kasthuri++: {Train,Test}_{In,Out} slice folders, masks 0/255
    for part in ("Train", "Test"):
        for sub in ("In", "Out"):
            (tmp_path / "lpp" / f"{part}_{sub}").mkdir(parents=True)
        for z in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 40), dtype=np.uint8)).save(tmp_path / "lpp" / f"{part}_In" / f"{z}.png")
            Image.fromarray((rng.random((32, 40)) > 0.8).astype(np.uint8) * 255).save(tmp_path / "lpp" / f"{part}_Out" / f"{z}.png")
    d = load_benchmark("lucchi_pp", tmp_path / "lpp")
    assert d.train[0].image.shape == (3, 32, 40) and set(np.unique(d.test[0].mask)) == {0, 1}
    # Guay: 3D TIFF pairs
    (tmp_path / "guay").mkdir()
    for part in ("train", "eval", "test"):
        tifffile.imwrite(tmp_path / "guay" / f"{part}-images.tif", rng.integers(0, 255, (4, 16, 16), dtype=np.uint8), photometric="minisblack")
        tifffile.imwrite(tmp_path / "guay" / f"{part}-labels.tif", rng.integers(0, 7, (4, 16, 16), dtype=np.uint8), photometric="minisblack")
    d = load_benchmark("guay", tmp_path / "guay")
    assert [s.name for s in d.test] == ["test"] and [s.name for s in d.train] == ["train"]  # eval held out
    assert d.train[0].mask.shape == (4, 16, 16) and d.train[0].mask.max() <= 6
    # CREMI: max uint64 = no cleft
    (tmp_path / "cremi").mkdir()
    clefts = np.full((4, 8, 8), np.iinfo(np.uint64).max, np.uint64)
    clefts[1, 2:4, 2:4] = 7
    with h5py.File(tmp_path / "cremi" / "sample_A_20160501.hdf", "w") as h:
        h["volumes/raw"] = rng.integers(0, 255, (4, 8, 8), dtype=np.uint8)
        h["volumes/labels/clefts"] = clefts
    d = load_benchmark("cremi_clefts", tmp_path / "cremi", split="z:0.5")
    assert d.train[0].mask.sum() == 4 and d.test[0].mask.sum() == 0
    # Perez-style images/masks folders
    for part in ("train", "test"):
        for sub in ("images", "masks"):
            (tmp_path / "perez" / part / sub).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "perez" / part / "images" / "a.png")
        Image.fromarray(np.eye(16, dtype=np.uint8) * 255).save(tmp_path / "perez" / part / "masks" / "a.png")
    d = load_benchmark("perez", tmp_path / "perez")
    assert d.test[0].mask.sum() == 16


def test_custom_2d_and_3d(tmp_path: Path, shared_data: Path) -> None:
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    imgs.mkdir(), masks.mkdir()
    src = shared_data / "isbi2012" / "train"
    for i in range(4):
        Image.open(src / "images" / f"{i}.png").save(imgs / f"slice{i}.png")
        Image.open(src / "labels" / f"{i}.png").save(masks / f"slice{i}_mask.png")  # 0/255, suffixed name
    d = load_custom_2d(imgs, masks, "z:0.5")
    assert (len(d.train), len(d.test)) == (2, 2) and d.classes == ("foreground",)  # binary: the class is named foreground
    assert set(np.unique(d.train[0].mask)) == {0, 1}  # 0/255 -> 0/1
    d = load_custom_2d(imgs, masks, "test:slice3", classes=["interior"])
    assert [s.name for s in d.test] == ["slice3"] and d.classes == ("interior",)
    # 3D: gala image (HDF5) + labels as a TIFF volume
    raw = shared_data / "gala_fibsem_crops" / "train-image.h5"
    with h5py.File(shared_data / "gala_fibsem_crops" / "train-gt.lzf.h5") as h:
        tifffile.imwrite(tmp_path / "gt.tif", (h["stack"][...] > 0).astype(np.uint8))
    d3 = load_custom_3d(raw, tmp_path / "gt.tif", "z:0.8", key="stack")
    assert d3.train[0].image.shape == (40, 100, 200) and d3.test[0].mask.shape == (10, 100, 200)
    inst = load_custom_3d(raw, shared_data / "gala_fibsem_crops" / "train-gt.lzf.h5", "z:0.5", key="stack", label_key="stack", instance=True)
    assert inst.task == "instance3d" and inst.train[0].mask.max() > 50


def test_split_rules_and_label_fraction() -> None:
    samples = [Sample(np.zeros((100, 100), np.uint8), np.zeros((100, 100), np.int64), str(i)) for i in range(10)]
    tr, te = apply_split(samples, "z:0.8")
    assert [s.name for s in te] == ["8", "9"]
    with pytest.raises(ValueError):
        apply_split(samples, "z:1.0")
    with pytest.raises(ValueError, match="no sample"):
        apply_split(samples, "test:foo")
    sub = label_fraction(samples, 0.25, seed=0, min_side=10)
    assert sum(s.mask.size for s in sub) == pytest.approx(0.25 * 10 * 100 * 100, rel=0.05)
    assert len(sub) == 3 and sub[-1].mask.shape != (100, 100)  # 2 slices + a box of half a slice
    assert label_fraction(samples, 0.25, seed=0, min_side=10)[0].name == sub[0].name  # seeded
    vol = [Sample(np.zeros((4, 8, 8), np.uint8), np.full((4, 8, 8), IGNORE), "v")]
    assert len(label_fraction(vol, 1.0, 0)) == 4  # volumes become xy slices
