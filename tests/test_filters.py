"""Tests of curation.filters on the real shared EM data (``shared_data`` fixture).

Informative patches are real vEM images cut into 224x224 patches the way the pipeline does
(tiles from the top-left, truncated edge patches zero-padded); uninformative ones are real label
volumes/maps and real slices with alignment fill. Synthetic arrays appear only where a test needs
an exact construction (constant patch, a corrupt file) and say so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cemnet.segment.tiling import cut_tiles
from curation.to_uint8 import Uint8Converter
from curation.filters import (
    FEATURE_NAMES,
    Cem500kClassifierFilter,
    FilterResult,
    LogisticFilter,
    PatchFilter,
    StatsFilter,
    build_filter,
    cem500k_preprocess,
    patch_features,
    read_label_csv,
    train_logistic_filter,
)
from helpers import read_grey as grey

P = 224


# --------------------------------------------------------------------------------------------
# Real data helpers
# --------------------------------------------------------------------------------------------


def cut_patches(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patches of one image as the threshold study (perf/filter_thresholds.py) cut them:
    the library's tiler from the top-left, truncated edge patches zero-padded."""
    return cut_tiles(img, P, edge="truncate")


def cut_many(imgs) -> tuple[np.ndarray, np.ndarray]:
    patches, sizes = zip(*(cut_patches(i) for i in imgs))
    return np.concatenate(patches), np.concatenate(sizes)


def minmax_u8(a: np.ndarray) -> np.ndarray:
    """The min-max uint8 rule a reader applies to a label volume of unknown dtype."""
    a = np.asarray(a)
    return Uint8Converter.fit(a, a.dtype, "minmax")(a)


def pad_to(crop: np.ndarray, fill: int | np.ndarray = 0) -> np.ndarray:
    out = np.empty((P, P), np.uint8)
    out[...] = fill
    out[: crop.shape[0], : crop.shape[1]] = crop
    return out


@pytest.fixture(scope="module")
def real_em(shared_data: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Real informative EM patches from seven datasets, truncated edge patches included."""
    import h5py

    d = shared_data
    np_dir = d / "neuroproof_fibsem_medulla" / "training_sample1" / "grayscale_maps"
    np_vol = np.stack([grey(f) for f in sorted(np_dir.glob("*.png"))[::25]])  # 10 slices, 250x250
    with h5py.File(d / "gala_fibsem_crops" / "train-image.h5", "r") as h:
        gala = np.asarray(h["stack"][::10])
    cem = d / "cem500k_example_patches"
    return {
        "isbi2012": cut_many(grey(f) for f in sorted((d / "isbi2012" / "train" / "images").glob("*.png"))[:4]),
        "cdeep3m": cut_many(grey(f) for f in sorted((d / "cdeep3m_mito_sbem" / "training" / "images").glob("*.png"))[:3]),
        "vnc": cut_many(grey(f) for f in sorted((d / "drosophila_vnc_gerhard2013" / "stack2" / "raw").glob("*.png"))[:2]),
        "neuroproof": cut_many(list(np_vol) + [np_vol[:, 100, :]]),
        "gala": cut_many(list(gala)),
        "axondeepseg": cut_patches(grey(d / "axondeepseg_sem_demo" / "image.png")),
        "cem500k": cut_many(
            [grey(f) for f in sorted((cem / "correlation" / "images").glob("*.png"))]
            + [grey(f) for f in sorted((cem / "occlusion").glob("*.tiff"))]
        ),
    }


@pytest.fixture(scope="module")
def urocell_labels(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """UroCell label volumes (binary float32, int8, int16 on disk) sliced along z, min-max to uint8;
    only slices that contain foreground, so the patches are not trivially constant."""
    import nibabel as nib

    root = shared_data / "urocell_labels_only"
    imgs = []
    for rel in ("mito/binary/fib1-0-0-0.nii.gz", "golgi/precise/binary/fib1-2-2-3.nii.gz",
                "lyso/binary/fib1-1-0-3.nii.gz", "mito/instance/fib1-3-2-1.nii.gz"):
        vol = minmax_u8(np.asanyarray(nib.load(str(root / rel)).dataobj))
        for z in range(0, vol.shape[2], 16):
            sl = np.ascontiguousarray(vol[:, :, z])
            if sl.any():
                imgs.append(sl)
    assert len(imgs) >= 20
    return cut_many(imgs)


@pytest.fixture(scope="module")
def muvis(shared_data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MUVIS 16-bit SEM tiles (percentile-scaled to uint8) with hand labels (the same as
    perf/filter_thresholds.py): returns patches, sizes, label ('cell'/'empty'/'mixed'),
    section index (0 = S000, 1 = S001)."""
    import tifffile

    fs = sorted((shared_data / "muvis_align_sem_tiles" / "tiff_uint16").glob("*/*.tiff"))
    imgs = []
    for f in fs:
        a = tifffile.imread(f).astype(np.float64)
        lo, hi = np.percentile(a, [0.5, 99.5])
        imgs.append(np.clip(np.round((a - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8))
    p, s = cut_many(imgs)
    lab = np.full(len(p), "cell", dtype=object)
    lab[[1, 19, 23, 39, 47, 52, 63, 73, 74, 75, 78, 79, 119, 127]] = "empty"
    lab[[0, 18, 25, 27, 30, 31, 32, 38, 44, 56, 60, 71, 72, 90, 99, 107, 111, 114, 117, 122, 123, 124]] = "mixed"
    section = np.array([0 if "S000" in str(f) else 1 for f in fs]).repeat(16)
    return p, s, lab, section


# --------------------------------------------------------------------------------------------
# patch_features
# --------------------------------------------------------------------------------------------


def _reference_features(crop: np.ndarray, uniform_std: float = 2.0) -> dict[str, float]:
    """Slow, obvious per-patch implementation of a subset of the features."""
    x = crop.astype(np.float64)
    flat = np.sort(x.ravel())
    n = flat.size
    b = crop[: crop.shape[0] // 2 * 2, : crop.shape[1] // 2 * 2].astype(np.float64)
    b = (b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]) / 4
    starts = lambda L: sorted(set(list(range(0, L - min(4, L) + 1, min(4, L))) + [L - min(4, L)]))  # noqa: E731
    flat_blocks = [b[r : r + 4, c : c + 4].std() < uniform_std for r in starts(b.shape[0]) for c in starts(b.shape[1])]
    pairs = crop[::2, 1:] == crop[::2, :-1]
    return {
        "mean": x.mean(),
        "std": x.std(),
        "p1": flat[int(np.ceil(0.01 * n)) - 1],
        "p99": flat[int(np.ceil(0.99 * n)) - 1],
        "saturated_fraction": np.isin(crop, (0, 255)).mean(),
        "uniform_fraction": float(np.mean(flat_blocks)),
        "flat_pair_fraction": pairs.mean(),
    }


def test_patch_features_match_slow_reference(real_em):
    p, s = np.concatenate([real_em["isbi2012"][0], real_em["cem500k"][0]]), np.concatenate(
        [real_em["isbi2012"][1], real_em["cem500k"][1]]
    )
    # Include odd, non-multiple-of-8 true sizes (ragged block tiling) from real content.
    extra = [(p[0][:37, :150], (37, 150)), (p[1][:223, :9], (223, 9)), (p[2][:130, :131], (130, 131))]
    p = np.concatenate([p, np.stack([pad_to(c) for c, _ in extra])])
    s = np.concatenate([s, np.array([sz for _, sz in extra])])
    feats, names = patch_features(p, s)
    assert names == list(FEATURE_NAMES)
    assert feats.shape == (len(p), len(FEATURE_NAMES)) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    for i in range(len(p)):
        ref = _reference_features(p[i, : s[i, 0], : s[i, 1]])
        for k, v in ref.items():
            assert feats[i, names.index(k)] == pytest.approx(v, abs=1e-3), (i, k)


def test_padding_is_not_content(real_em):
    """Features of a truncated patch do not depend on what fills the padding."""
    p, _ = real_em["vnc"]
    crops = [p[0][:224, :40], p[1][:30, :224], p[2][:100, :100], p[3][:26, :26]]
    sizes = np.array([c.shape for c in crops])
    zeros = np.stack([pad_to(c, 0) for c in crops])
    rng = np.random.default_rng(0)
    noise = np.stack([pad_to(c, rng.integers(0, 256, (P, P), dtype=np.uint8)) for c in crops])
    f0, _ = patch_features(zeros, sizes)
    f1, _ = patch_features(noise, sizes)
    np.testing.assert_array_equal(f0, f1)
    assert StatsFilter()(zeros, sizes).keep.all()


def test_bad_batches_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        patch_features(np.zeros((1, 8, 8), np.float32), np.array([[8, 8]]))
    with pytest.raises(ValueError, match="shape"):
        patch_features(np.zeros((2, 8, 8), np.uint8), np.array([[8, 8]]))
    with pytest.raises(ValueError, match=r"\[0, 8\]"):
        patch_features(np.zeros((1, 8, 8), np.uint8), np.array([[9, 8]]))
    feats, _ = patch_features(np.zeros((0, 8, 8), np.uint8), np.zeros((0, 2), np.int64))
    assert feats.shape == (0, len(FEATURE_NAMES))


# --------------------------------------------------------------------------------------------
# StatsFilter
# --------------------------------------------------------------------------------------------


def test_stats_keeps_real_em_from_several_datasets(real_em):
    filt = StatsFilter()
    total = kept = 0
    for name, (p, s) in real_em.items():
        res = filt(p, s)
        assert isinstance(res, FilterResult) and len(res) == len(p)
        assert res.keep.mean() >= 0.98, (name, list(res.reason[~res.keep]))
        assert (res.reason[res.keep] == "").all()
        total, kept = total + len(p), kept + int(res.keep.sum())
    assert total > 250 and kept / total >= 0.98


def test_stats_removes_urocell_label_patches(urocell_labels):
    p, s = urocell_labels
    res = StatsFilter()(p, s)
    assert (~res.keep).mean() >= 0.99
    assert set(res.reason[~res.keep]) <= {"uniform>=0.80", "saturated>=0.80", "piecewise-constant", "few-grey-levels",
                                          "low-contrast"}
    assert (res.score[~res.keep] <= 0).all()


def test_stats_removes_gala_neuron_id_maps_as_piecewise_constant(shared_data):
    import h5py

    with h5py.File(shared_data / "gala_fibsem_crops" / "train-gt.lzf.h5", "r") as h:
        ids = minmax_u8(np.asarray(h["stack"]))
    p, s = cut_many(list(ids[::10]))
    res = StatsFilter()(p, s)
    assert not res.keep.any()
    assert (res.reason == "piecewise-constant").mean() > 0.5


def test_constant_patch_removed_as_uniform():
    # Synthetic by construction: the exact case "100 % uniform" at several grey levels.
    p = np.stack([np.full((P, P), v, np.uint8) for v in (0, 37, 128, 254, 255)])
    res = StatsFilter()(p, np.full((len(p), 2), P))
    assert not res.keep.any()
    assert list(res.reason) == ["uniform>=0.80"] * len(p)


def test_half_empty_padded_patch_removed(real_em):
    """A truncated patch whose true half is flat resin: removed as uniform, although the whole
    padded array (flat grey next to zero padding) has a high std that would fool a naive filter."""
    resin_level = int(np.median(real_em["cdeep3m"][0][0]))
    p = pad_to(np.full((P, P // 2), resin_level, np.uint8))[None]
    assert p.std() > 40
    res = StatsFilter()(p, np.array([[P, P // 2]]))
    assert not res.keep[0] and res.reason[0] == "uniform>=0.80"


def test_alignment_fill_patches(shared_data):
    """Real slice rotated with zero fill (registration borders): mostly-fill patches removed,
    mostly-EM patches kept."""
    from scipy import ndimage

    img = grey(sorted((shared_data / "cdeep3m_mito_sbem" / "training" / "images").glob("*.png"))[0])
    rot = ndimage.rotate(img, 33, reshape=True, order=1, cval=0, prefilter=False)
    valid = ndimage.rotate(np.ones(img.shape, np.float32), 33, reshape=True, order=1, cval=0) > 0.5
    p, s = cut_patches(rot)
    v, _ = cut_patches(valid.astype(np.uint8))
    fill = np.array([1 - v[i, : s[i, 0], : s[i, 1]].mean() for i in range(len(p))])
    res = StatsFilter()(p, s)
    assert (fill >= 0.9).sum() >= 3 and (fill <= 0.5).sum() >= 10
    assert not res.keep[fill >= 0.9].any()
    assert res.keep[fill <= 0.5].all()


def test_reason_codes_name_the_failed_criterion(real_em):
    real = real_em["cdeep3m"][0][0]
    # Contrast crushed to 5 % (std ~2.4 < min_std); a tight flat-block tolerance keeps this
    # from also reading as uniform, so the contrast criterion is the one that fails first.
    crushed = np.clip(np.round(real.mean() + (real - real.mean()) * 0.05), 0, 255).astype(np.uint8)
    # Salt-and-pepper 0/255 (synthetic): not flat, but fully saturated.
    sp = (np.random.default_rng(1).random((P, P)) < 0.5).astype(np.uint8) * 255
    p = np.stack([real, crushed, sp, real])
    s = np.array([[P, P], [P, P], [P, P], [0, 0]])
    res = StatsFilter(uniform_std=0.25)(p, s)
    assert list(res.keep) == [True, False, False, False]
    assert list(res.reason) == ["", "low-contrast", "saturated>=0.80", "empty"]
    assert res.score[0] > 0 and (res.score[1:] <= 0).all()
    # Parameters are honoured (and reported).
    strict = StatsFilter(min_std=real.std() + 1)
    assert strict(p[:1], s[:1]).reason[0] == "low-contrast"
    assert strict.describe()["min_std"] == pytest.approx(real.std() + 1)


def test_stats_describe_and_validation():
    d = StatsFilter().describe()
    assert d["name"] == "stats"
    assert json.loads(json.dumps(d, sort_keys=True)) == d  # the pipeline stores it as JSON
    for k in ("uniform_fraction", "uniform_std", "max_saturated", "min_std", "min_range", "min_entropy",
              "max_flat_pairs", "min_gradient_rel"):
        assert k in d
    assert isinstance(StatsFilter(), PatchFilter)
    with pytest.raises(ValueError, match="uniform_fraction"):
        StatsFilter(uniform_fraction=1.5)
    with pytest.raises(ValueError, match="min_std"):
        StatsFilter(min_std=-1)


def test_filter_result_validates_shapes():
    with pytest.raises(ValueError, match="shape"):
        FilterResult(keep=np.ones(3, bool), reason=np.array(["", ""], object), score=np.zeros(3))


# --------------------------------------------------------------------------------------------
# LogisticFilter
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_logistic(real_em, urocell_labels, muvis):
    """Trained on MUVIS section S000 (hand labels: cell vs empty substrate) plus real EM and
    UroCell labels; MUVIS section S001 is held out."""
    mp, ms, mlab, sec = muvis
    train = (mlab != "mixed") & (sec == 0)
    up, us = urocell_labels
    p = np.concatenate([mp[train], real_em["isbi2012"][0], real_em["neuroproof"][0], up[::4]])
    s = np.concatenate([ms[train], real_em["isbi2012"][1], real_em["neuroproof"][1], us[::4]])
    y = np.concatenate([mlab[train] == "cell", np.ones(len(real_em["isbi2012"][0]) + len(real_em["neuroproof"][0]), bool),
                        np.zeros(len(up[::4]), bool)])
    return train_logistic_filter(p, s, y, l2=1e-3, seed=0)


def test_logistic_held_out_accuracy_on_real_labels(trained_logistic, muvis, real_em):
    filt, report = trained_logistic
    assert report["cv_accuracy"] >= 0.95 and report["cv_auc"] >= 0.97
    assert report["n_informative"] > 0 and report["n_uninformative"] > 0 and report["folds"] == 5
    mp, ms, mlab, sec = muvis
    test = (mlab != "mixed") & (sec == 1)
    res = filt(mp[test], ms[test])
    truth = mlab[test] == "cell"
    assert (res.keep == truth).mean() >= 0.95
    assert not res.keep[~truth].any()  # every held-out empty-substrate patch removed
    # Held-out datasets never seen in training.
    for name in ("cdeep3m", "vnc"):
        assert filt(*real_em[name]).keep.mean() >= 0.95
    assert all(r.startswith("classifier p=") for r in res.reason[~res.keep])
    np.testing.assert_allclose(res.score, filt.predict_proba(mp[test], ms[test]))


def test_logistic_save_load_round_trip(trained_logistic, muvis, tmp_path):
    filt, _ = trained_logistic
    path = tmp_path / "filt.json"
    filt.save(path)
    back = LogisticFilter.load(path)
    for k in ("mean", "std", "weights"):
        np.testing.assert_array_equal(getattr(back, k), getattr(filt, k))
    assert back.bias == filt.bias and back.threshold == filt.threshold
    assert back.feature_names == filt.feature_names
    mp, ms, _, _ = muvis
    np.testing.assert_array_equal(back.predict_proba(mp, ms), filt.predict_proba(mp, ms))
    assert json.dumps(back.describe(), sort_keys=True) == json.dumps(filt.describe(), sort_keys=True)
    assert isinstance(back, PatchFilter)
    via_spec = build_filter(f"logistic:{path},threshold=0.9")
    assert isinstance(via_spec, LogisticFilter) and via_spec.threshold == 0.9
    np.testing.assert_array_equal(via_spec.weights, filt.weights)


def test_logistic_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        LogisticFilter.load(bad)
    other = tmp_path / "other.json"
    other.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="other.json"):
        LogisticFilter.load(other)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        LogisticFilter.load(tmp_path / "missing.json")


def test_logistic_training_input_errors(real_em):
    p, s = real_em["isbi2012"]
    with pytest.raises(ValueError, match="both"):
        train_logistic_filter(p, s, np.ones(len(p), bool))
    with pytest.raises(ValueError, match="shape"):
        train_logistic_filter(p, s, np.ones(len(p) - 1, bool))


# --------------------------------------------------------------------------------------------
# read_label_csv
# --------------------------------------------------------------------------------------------


def test_read_label_csv_accepts_all_spellings(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text(
        "\ufeffpatch_id, informative ,note\n"
        "1,yes,a\n2,No,\n3,TRUE,\n4,false,\n\n# a comment\n5,1,\n6,0,\n7,good,\n8, Bad ,x\n",
        encoding="utf-8",
    )
    assert read_label_csv(f) == {1: True, 2: False, 3: True, 4: False, 5: True, 6: False, 7: True, 8: False}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("patch_id,informative\n1,yes\n2,maybe\n", r"labels\.csv:3: .*'maybe'"),
        ("patch_id,informative\n1,yes\nx7,no\n", r"labels\.csv:3: .*'x7'"),
        ("patch_id,informative\n1,yes\n1,no\n", r"labels\.csv:3: .*twice"),
        ("patch_id,informative\n1\n", r"labels\.csv:2: "),
        ("id,label\n1,yes\n", r"labels\.csv:1: .*header"),
        ("", r"labels\.csv: empty"),
    ],
)
def test_read_label_csv_bad_rows(tmp_path, text, match):
    f = tmp_path / "labels.csv"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_label_csv(f)


# --------------------------------------------------------------------------------------------
# Cem500kClassifierFilter
# --------------------------------------------------------------------------------------------


def _cem500k_model() -> torch.nn.Module:
    """Exactly CEM500K's classify_nn.py layout: torchvision resnet34, fc = Linear(512, 1)."""
    from torchvision.models import resnet34

    torch.manual_seed(0)
    model = resnet34(weights=None)
    model.fc = torch.nn.Linear(in_features=512, out_features=1)
    return model.eval()


def _reference_input(patches: np.ndarray, sizes: np.ndarray) -> torch.Tensor:
    """Documented preprocessing written out independently: crop to true size, bilinear resize
    to 224 (rounded back to uint8 as cv2 does), GRAY2RGB, ImageNet Normalize."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    out = []
    for p, (h, w) in zip(patches, sizes):
        x = torch.from_numpy(p[:h, :w].astype(np.float32))[None, None]
        if (h, w) != (224, 224):
            x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
            x = x.round().clamp(0, 255)
        rgb = x[0].repeat(3, 1, 1)
        out.append((rgb / 255.0 - mean) / std)
    return torch.stack(out)


@pytest.fixture(scope="module")
def one_torch_thread():
    # The test machine's cores are shared: one thread is ~7x faster than two fighting threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cem500k_files(tmp_path_factory, real_em, one_torch_thread):
    """A random-init classifier saved the way CEM500K saves it, plus DataParallel-prefixed and
    {'state_dict': ...} copies. BatchNorm statistics are first set from real patches (train-mode
    passes), otherwise an untrained ResNet saturates every sigmoid to 0 and the comparison would
    prove nothing."""
    d = tmp_path_factory.mktemp("cem500k")
    model = _cem500k_model()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    p, s = real_em["cdeep3m"]
    with torch.no_grad():
        model.train()(_reference_input(p[:6], s[:6]))
    model.eval()
    sd = model.state_dict()
    torch.save(sd, d / "patch_quality_classifier_nn.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, d / "dataparallel.pth")
    torch.save({"state_dict": sd}, d / "wrapped.pth")
    return model, d


def test_cem500k_probabilities_match_direct_torchvision_forward(cem500k_files, real_em):
    model, d = cem500k_files
    trunc = [i for i, sz in enumerate(real_em["isbi2012"][1]) if tuple(sz) != (P, P)][:1]
    p = np.concatenate([real_em["vnc"][0][:2], real_em["isbi2012"][0][trunc]])
    s = np.concatenate([real_em["vnc"][1][:2], real_em["isbi2012"][1][trunc]])
    assert (s != P).any()
    with torch.no_grad():
        x = _reference_input(p, s)
        ref = torch.sigmoid(model(x))[:, 0].double().numpy()
        # Power check: a 5 % intensity error moves the output far beyond the tolerance below.
        off = torch.sigmoid(model(x * 1.05))[:, 0].double().numpy()
    assert np.abs(off - ref).max() > 1e-3
    filt = Cem500kClassifierFilter(d / "patch_quality_classifier_nn.pth", batch_size=2)
    prob = filt.predict_proba(p, s)
    np.testing.assert_allclose(prob, ref, rtol=0, atol=1e-5)
    for name in ("dataparallel.pth", "wrapped.pth"):
        other = Cem500kClassifierFilter(d / name)
        for k, v in filt.model.state_dict().items():
            assert torch.equal(other.model.state_dict()[k], v), (name, k)
    # Decision rule: kept iff p > threshold; reason carries p.
    res = filt(p, s)
    np.testing.assert_array_equal(res.keep, prob > 0.5)
    np.testing.assert_allclose(res.score, prob)
    thr = float(np.sort(prob)[0] + np.sort(prob)[1]) / 2  # between the two lowest: 1 removed
    res = Cem500kClassifierFilter(d / "wrapped.pth", threshold=thr)(p, s)
    assert res.keep.sum() == len(p) - 1
    assert res.reason[~res.keep][0] == f"classifier p={prob.min():.2f}"
    assert (res.reason[res.keep] == "").all()
    desc = filt.describe()
    assert desc["name"] == "cem500k" and desc["threshold"] == 0.5 and len(desc["sha256"]) == 64
    assert json.loads(json.dumps(desc, sort_keys=True)) == desc
    assert isinstance(filt, PatchFilter)


def test_cem500k_preprocess_full_size_is_exact(real_em):
    p, s = real_em["cdeep3m"][0][:2], real_em["cdeep3m"][1][:2]
    x = cem500k_preprocess(p, s)
    assert x.shape == (2, 3, 224, 224)
    expect = (p[0].astype(np.float32) / 255.0 - 0.456) / 0.224
    np.testing.assert_allclose(x[0, 1].numpy(), expect, atol=1e-6)


def test_cem500k_wrong_file_gives_clear_error(tmp_path, one_torch_thread):
    from torchvision.models import resnet18

    wrong = resnet18(weights=None)
    wrong.fc = torch.nn.Linear(512, 1)
    torch.save(wrong.state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match=r"resnet18\.pth.*resnet34.*missing keys"):
        Cem500kClassifierFilter(tmp_path / "resnet18.pth")
    two = _cem500k_model()
    two.fc = torch.nn.Linear(512, 2)
    torch.save(two.state_dict(), tmp_path / "two_logits.pth")
    with pytest.raises(ValueError, match=r"two_logits\.pth.*fc\.weight"):
        Cem500kClassifierFilter(tmp_path / "two_logits.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pth"):
        Cem500kClassifierFilter(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Cem500kClassifierFilter(tmp_path / "nope.pth")


# --------------------------------------------------------------------------------------------
# build_filter
# --------------------------------------------------------------------------------------------


def test_build_filter_specs(cem500k_files):
    _, d = cem500k_files
    assert build_filter("none") is None
    assert build_filter("stats").describe() == StatsFilter().describe()
    f = build_filter(" stats:uniform_fraction=0.85, min_std=6 ")
    assert isinstance(f, StatsFilter) and f.uniform_fraction == 0.85 and f.min_std == 6.0
    assert f.min_range == StatsFilter().min_range
    c = build_filter(f"cem500k:{d / 'patch_quality_classifier_nn.pth'},threshold=0.7,device=cpu")
    assert isinstance(c, Cem500kClassifierFilter) and c.threshold == 0.7 and c.device == "cpu"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "unknown filter spec"),
        ("random", "unknown filter spec"),
        ("stats:", "nothing after"),
        ("stats:bogus=1", "unknown option 'bogus'"),
        ("stats:min_std=abc", "not a valid float"),
        ("stats:min_std", "not KEY=VALUE"),
        ("stats:min_std=1,min_std=2", "given twice"),
        ("stats:uniform_fraction=2", "uniform_fraction"),
        ("logistic", "needs a file path"),
        ("logistic:", "missing file path"),
        ("cem500k:x.pth,colour=red", "unknown option 'colour'"),
        ("none:x", "unknown filter spec"),
    ],
)
def test_build_filter_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        build_filter(spec)


def test_build_filter_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_filter(f"cem500k:{tmp_path / 'absent.pth'}")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        build_filter(f"logistic:{tmp_path / 'absent.json'}")
