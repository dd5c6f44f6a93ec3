"""`cemnet benchmark study` end to end at a tiny budget on real data.

Target: 256 px crops of four real CDeep3M SBEM slices and their mitochondria masks, written as PNG
(a smaller copy of real data: the full 1024 px slices make a test minutes long). Pretraining
sources: the real AxonDeepSeg SEM micrograph, plus the target's own folder and a byte-identical
copy of one target image elsewhere, which the study must leave out.
"""

from __future__ import annotations

import csv
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cemnet.benchmarks.datasets import Sample
from cemnet.benchmarks.study import (RANDOM, StudyConfig, iterations_to_reach, labelled_slices, report_existing,
                                     run_study, select_sources, summarise)

REPO = Path(__file__).resolve().parents[1]


def _target(shared_data: Path, root: Path) -> tuple[Path, Path]:
    src = shared_data / "cdeep3m_mito_sbem" / "training"
    images, masks = root / "target" / "images", root / "target" / "labels"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for name in sorted(p.name for p in (src / "images").glob("*.png"))[:4]:
        img = np.asarray(Image.open(src / "images" / name).convert("L"))
        lab = np.asarray(Image.open(src / "labels" / name.replace("images", "mitos_3D")))  # palette 0/1, as stored
        ys, xs = np.nonzero(lab)  # a crop around mitochondria, so every slice has foreground
        y = int(np.clip(ys.mean() - 128, 0, img.shape[0] - 256)) if len(ys) else 0
        x = int(np.clip(xs.mean() - 128, 0, img.shape[1] - 256)) if len(xs) else 0
        Image.fromarray(img[y:y + 256, x:x + 256]).save(images / name)
        Image.fromarray((lab[y:y + 256, x:x + 256] > 0).astype(np.uint8) * 255).save(masks / name)
    return images, masks


def _manifest(shared_data: Path, root: Path, images: Path) -> Path:
    copy = root / "elsewhere"
    copy.mkdir()
    shutil.copy(next(images.glob("*.png")), copy / "renamed.png")
    doc = {"sources": [
        {"name": "axon_sem", "path": str(shared_data / "axondeepseg_sem_demo" / "image.png")},
        {"name": "the_target", "path": str(images), "stack": True},
        {"name": "a_copy", "path": str(copy / "renamed.png")},
    ]}
    path = root / "sources.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _recipe(root: Path) -> Path:
    cfg = yaml.safe_load((REPO / "experiments" / "study_mgmr_resnet18_cpu.yaml").read_text(encoding="utf-8"))
    cfg["model"]["init_args"].update(input_size=64, decoder_width=16)
    cfg["data"]["init_args"].update(batch_size=2, num_workers=0, samples_per_epoch=8)
    cfg["data"]["init_args"]["augment"].update(crop_size=64)
    cfg["trainer"]["enable_progress_bar"] = False
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_select_sources_leaves_out_the_target_by_path_and_by_bytes(shared_data, tmp_path):
    images, _ = _target(shared_data, tmp_path)
    doc, excluded = select_sources(_manifest(shared_data, tmp_path, images), [images])
    assert [s["name"] for s in doc["sources"]] == ["axon_sem"]
    assert {name for name, _ in excluded} == {"the_target", "a_copy"}
    assert "same bytes" in dict(excluded)["a_copy"]


def test_labelled_slices_are_paired_and_skip_empty_slices():
    rng = np.random.default_rng(0)
    samples = [Sample(rng.integers(0, 255, (8, 8), dtype=np.uint8), np.full((8, 8), i % 2, np.int64), f"s{i}")
               for i in range(6)]
    one = labelled_slices(samples, 3, seed=4)
    assert [s.name for s in one] == [s.name for s in labelled_slices(samples, 3, seed=4)]
    assert all((s.mask > 0).any() for s in one)  # three slices with foreground exist: no empty one


def test_summary_pairs_by_seed_and_counts_iterations_to_reach_random():
    rows = [{"encoder": e, "labelled_slices": 1, "seed": s, "iteration": it, "iou": v}
            for e, s, curve in [(RANDOM, 0, [(50, 0.1), (100, 0.5)]), (RANDOM, 1, [(50, 0.2), (100, 0.4)]),
                                ("pretrained", 0, [(50, 0.6), (100, 0.7)]), ("pretrained", 1, [(50, 0.3), (100, 0.45)])]
            for it, v in curve]
    md = summarise(rows)
    assert "+0.125 ± 0.106 (n=2)" in md  # paired: (0.7 - 0.5, 0.45 - 0.4)
    assert "2/2" in md and "50, 100 (seeds 0, 1)" in md
    assert iterations_to_reach([(100, 0.2), (50, 0.3)], 0.25) == 50
    assert iterations_to_reach([(50, 0.1)], 0.25) is None


@pytest.mark.slow
def test_study_runs_end_to_end_without_curating_the_target_and_resumes(shared_data, tmp_path):
    images, masks = _target(shared_data, tmp_path)
    from cemnet.benchmarks.cli_study import build_parser, load_target

    args = build_parser().parse_args(["--images", str(images), "--masks", str(masks), "--split",
                                      "test:" + sorted(p.stem for p in images.glob("*.png"))[-1], "--out", "x"])
    target = load_target(args)
    assert len(target.data.train) == 3 and len(target.data.test) == 1
    cfg = StudyConfig(out=tmp_path / "study", manifest=_manifest(shared_data, tmp_path, images), recipe=_recipe(tmp_path),
                      pretrain_steps=2, slices=(1,), seeds=(0,), iterations=3, eval_at=(1,), batch_size=2,
                      crop_size=64, base_width=16)
    messages: list[str] = []
    results = run_study(cfg, target, progress=messages.append)
    assert any(m.startswith("study: estimated time on this machine:") for m in messages)
    assert any("the_target left out" in m for m in messages) and any("a_copy left out" in m for m in messages)

    # the corpus holds only the AxonDeepSeg micrograph: the target was never curated
    with sqlite3.connect(cfg.pretrain_root / "corpus" / "index.sqlite") as db:
        paths = [p for (p,) in db.execute("SELECT path FROM sources")]
    assert paths and all("axondeepseg" in p for p in paths)

    with open(results, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {"encoder", "labelled_slices", "seed", "iou", "iteration"} <= set(rows[0])
    assert {r["encoder"] for r in rows} == {"random", "pretrained", "pretrained+decoder"}
    assert {int(r["iteration"]) for r in rows} == {1, 3}
    assert all(0.0 <= float(r["iou"]) <= 1.0 for r in rows)
    # paired: every encoder fine-tuned on the same labelled slice
    assert len({r["train_slices"] for r in rows}) == 1
    assert "paired difference to random" in (cfg.out / "results.md").read_text(encoding="utf-8")
    assert (cfg.out / "iteration_efficiency.png").stat().st_size > 0

    # resume: nothing is redone (run files and the export untouched), the report is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in [*(cfg.out / "runs").glob("*.csv"), cfg.pretrain_root / "encoder.safetensors"]}
    messages.clear()
    run_study(cfg, target, progress=messages.append)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sum("(done before)" in m for m in messages) == 3
    assert not any("pretraining" in m and "steps ->" in m for m in messages)

    # the report alone, from the run files (what a study split over processes is joined with)
    (cfg.out / "results.csv").unlink()
    report_existing(cfg, target.data, progress=messages.append)
    with open(cfg.out / "results.csv", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
