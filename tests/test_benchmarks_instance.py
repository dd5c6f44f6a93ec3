"""Neuron instance path: affinities, watershed + agglomeration on real GT, domain mixing, training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from cemnet.benchmarks.datasets import IGNORE, load_benchmark
from cemnet.benchmarks.instance import (
    InstanceConfig, _merge_history, affinities_from_labels, agglomerate, amplitude_mix, cutmix, instance_scores, predict_affinities,
    region_graph, segment, threshold_sweep, train_affinities, watershed_fragments,
)
from cemnet.benchmarks import datasets as ds
from cemnet.cli import main as cemnet_main


def test_affinities_hand_case() -> None:
    lab = np.array([[[1, 1, 2], [0, 2, 2]]])  # (1, 2, 3)
    a = affinities_from_labels(lab)
    assert a[0].sum() == 0  # no z neighbour
    assert a[1].tolist() == [[[0, 0, 0], [0, 0, 1]]]  # y: (1,1)-(0,1) differ; (1,2)-(0,2) both 2
    assert a[2].tolist() == [[[0, 1, 0], [0, 0, 1]]]  # x: 1-1 yes, 1-2 no; 0-2 no, 2-2 yes


def test_agglomeration_recovers_gala_gt(shared_data: Path) -> None:
    gt = load_benchmark("gala", shared_data).test[0].mask
    rng = np.random.default_rng(0)
    affs = np.clip(affinities_from_labels(gt) + rng.normal(0, 0.25, (3, *gt.shape)), 0, 1).astype(np.float32)
    frags = watershed_fragments(affs, (gt > 0).astype(np.float32))
    assert instance_scores(frags, gt)["voi_split"] > 2  # over-segmented
    hist = _merge_history(*region_graph(frags, affs))
    scores = [h[0] for h in hist]
    assert all(a >= b - 1e-12 for a, b in zip(scores, scores[1:]))  # replayable by threshold
    rows = threshold_sweep(frags, affs, gt, [0.9, 0.6, 0.3])
    assert [r["segments"] for r in rows] == sorted(r["segments"] for r in rows)[::-1]
    best = min(rows, key=lambda r: r["voi"])
    assert best["voi"] < 0.3 and best["arand"] < 0.05
    seg = agglomerate(frags, affs, [best["threshold"]])[0]
    masked = instance_scores(seg, gt, border_nm=20, voxel_size_nm=(10, 10, 10))
    assert np.isfinite(masked["voi"]) and masked["voi"] != pytest.approx(best["voi"])  # boundary voxels dropped


def test_neuroproof_gt_scores_itself(shared_data: Path) -> None:
    gt = ds.load_neuroproof_gt(shared_data / "neuroproof_fibsem_medulla")[:20, :100, :100]
    s = instance_scores(gt, gt)
    assert s["voi"] == pytest.approx(0.0, abs=1e-9) and s["arand"] == pytest.approx(0.0, abs=1e-12)
    _, segs = segment(affinities_from_labels(gt), (gt > 0).astype(np.float32), [0.5])
    assert instance_scores(segs[0], gt)["arand"] < 0.1


def test_amplitude_mix_dc_only_at_segneuron_L() -> None:
    rng = np.random.default_rng(0)
    src = rng.normal(100, 20, (128, 128))
    tgt = rng.normal(160, 5, (128, 128))
    out = amplitude_mix(src, tgt, L=0.001)  # floor(0.128) = 0: only the DC term
    assert out.mean() == pytest.approx(tgt.mean())
    np.testing.assert_allclose(out - out.mean(), src - src.mean(), atol=1e-8)
    wide = amplitude_mix(src, tgt, L=0.05)  # a 13x13 window also swaps low-frequency contrast
    assert not np.allclose(wide - wide.mean(), src - src.mean())
    assert amplitude_mix(src[None], tgt[None], L=0.001).shape == (1, 128, 128)


def test_cutmix_ignores_pasted_labels() -> None:
    rng = np.random.default_rng(0)
    img, lab, tgt = np.zeros((4, 8, 8)), np.ones((4, 8, 8), np.int64), np.full((4, 8, 8), 9.0)
    out, olab = cutmix(img, lab, tgt, rng, fraction=0.5)
    assert ((out == 9) == (olab == IGNORE)).all() and (olab == IGNORE).sum() == 2 * 4 * 4


def test_train_affinities_and_cli(shared_data: Path, tmp_path: Path) -> None:
    d = load_benchmark("gala", shared_data)
    cfg = InstanceConfig(iterations=3, batch_size=1, crop=(8, 32, 32), base_width=8, mix="both", mix_prob=1.0)
    model, norm = train_affinities(d.train, cfg, target=d.test[0].image)
    affs, fg = predict_affinities(model, d.test[0].image[:8, :40, :40], norm)
    assert affs.shape == (3, 8, 40, 40) and fg.shape == (8, 40, 40) and 0 <= affs.min() <= affs.max() <= 1
    rc = cemnet_main(["benchmark", "gala", "--data-dir", str(shared_data), "--iterations", "2", "--batch-size", "1",
                      "--thresholds", "0.5", "--out", str(tmp_path / "inst"), "-q"])
    assert rc == 0 and "voi_split" in (tmp_path / "inst" / "instance_results.csv").read_text()
