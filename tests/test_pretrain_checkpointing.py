"""Run checkpoints: last.ckpt is the newest state however a run ends, and a resume from it sees
exactly the data an uninterrupted run sees; atomic writes; --resume past a broken last.ckpt.

Real ISBI 2012 slices tiled into 64 px patches (8 batches of 16 per epoch) and timm's
``test_resnet`` (BatchNorm, 0.4 M parameters) keep every run to a few seconds.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping

from cemnet.data.augment import AugmentConfig
from cemnet.data.datamodule import ArrayCorpus, EMPatchDataModule
from cemnet.methods.checkpointing import AtomicCheckpointIO, RunCheckpoint, newest_loadable_checkpoint
from cemnet.methods.mocov2 import MoCoV2
from cemnet.weights.checkpoint_io import torch_archive_problem

TOTAL_STEPS = 12  # one and a half epochs of 8 batches


@pytest.fixture(scope="module")
def corpus(shared_data: Path) -> ArrayCorpus:
    images = [shared_data / "isbi2012/train/images" / f"{i}.png" for i in (0, 1)]
    return ArrayCorpus.from_images(images, 64)  # 2 x 64 patches


def _fit(corpus, tmp: Path, callbacks: list, ckpt_path: str | None = None, **trainer_kw) -> tuple[pl.Trainer, list]:
    """One fit; returns the trainer and the (epoch, corpus indices) of every batch it trained on."""
    seen: list = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, batch["index"].tolist()))

    pl.seed_everything(0)
    dm = EMPatchDataModule(corpus, batch_size=16, num_workers=0, augment=AugmentConfig(crop_size=32), seed=5)
    model = MoCoV2(arch="test_resnet", queue_size=64, lr_batch_size=16)
    trainer_kw.setdefault("max_steps", TOTAL_STEPS)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp), callbacks=[Record(), *callbacks], plugins=[AtomicCheckpointIO()], **trainer_kw,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer, seen


class StopAt(pl.Callback):
    """Ends a run the way max_time / early stopping / a signal does, after batch ``step``."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if self.how == "should_stop":  # what Timer (max_time) and EarlyStopping do
            trainer.should_stop = True
        elif self.how in ("SIGINT", "SIGTERM"):
            os.kill(os.getpid(), getattr(signal, self.how))


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> list:
    return _fit(corpus, tmp_path_factory.mktemp("full"), [])[1]


@pytest.mark.slow  # six pairs of short runs
@pytest.mark.parametrize(
    "how, stop_step",
    [("max_steps", 5), ("should_stop", 5), ("SIGINT", 3), ("SIGTERM", 6), ("epoch_end", 8), ("max_epochs", 8)],
)
def test_resume_after_any_end_sees_the_data_of_an_uninterrupted_run(corpus, tmp_path, uninterrupted, how, stop_step):
    ckpt = RunCheckpoint(dirpath=str(tmp_path / "checkpoints"), filename="step{step:08d}", auto_insert_metric_name=False,
                         every_n_train_steps=100)  # never periodic here: only the end-of-run save
    if how == "max_steps":
        first, seen_a = _fit(corpus, tmp_path, [ckpt], max_steps=stop_step)
    elif how == "max_epochs":
        first, seen_a = _fit(corpus, tmp_path, [ckpt], max_steps=-1, max_epochs=1)
    elif how == "epoch_end":  # a stopper that acts at an epoch's end (as max_time's Timer also does)
        stopper = EarlyStopping("train/loss", stopping_threshold=1e9, check_on_train_epoch_end=True)
        first, seen_a = _fit(corpus, tmp_path, [ckpt, stopper])
    else:
        first, seen_a = _fit(corpus, tmp_path, [ckpt, StopAt(stop_step, how)])
    assert first.global_step == stop_step and len(seen_a) == stop_step
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == stop_step, f"last.ckpt must hold the final step ({how})"
    assert ckpt.end_reason and (ckpt.stopped_by is not None) == how.startswith("SIG")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    second, seen_b = _fit(corpus, tmp_path, [], ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert second.global_step == TOTAL_STEPS
    assert seen_a + seen_b == uninterrupted, f"data position after a resume ({how}) differs from an uninterrupted run"


def test_last_ckpt_stays_newest_when_the_interval_changes_on_resume(corpus, tmp_path):
    def ckpt(every: int) -> RunCheckpoint:
        return RunCheckpoint(dirpath=str(tmp_path / "checkpoints"), filename="step{step:08d}",
                             auto_insert_metric_name=False, every_n_train_steps=every, save_top_k=-1,
                             monitor="step", mode="max")

    _fit(corpus, tmp_path, [ckpt(2)], max_steps=3)
    last = tmp_path / "checkpoints" / "last.ckpt"
    _fit(corpus, tmp_path, [ckpt(4)], max_steps=5, ckpt_path=str(last))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step00000002.ckpt", "step00000004.ckpt"], names  # no last-v1.ckpt
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 5
    assert not list(tmp_path.rglob("*.tmp-*")) and (last.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated by a failing pickle)")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1 and torch_archive_problem(path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_resume_falls_back_past_a_truncated_last_ckpt(corpus, tmp_path, capsys):
    ck = RunCheckpoint(dirpath=str(tmp_path / "checkpoints"), filename="step{step:08d}", auto_insert_metric_name=False,
                       every_n_train_steps=2, save_top_k=-1, monitor="step", mode="max")
    _fit(corpus, tmp_path, [ck], max_steps=3)
    last = tmp_path / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a crash mid-write of a non-atomic writer
    found, broken = newest_loadable_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoints" / "step00000002.ckpt"
    assert [p for p, _ in broken] == [last] and "unreadable" in broken[0][1]
    step = found.read_bytes()
    found.write_bytes(step[:1000] + bytes(4096) + step[5096:])  # zeroed in the middle, same length
    assert newest_loadable_checkpoint(tmp_path)[0] is None


def test_divergence_guard_refuses_a_checkpoint_with_non_finite_buffers(corpus, tmp_path):
    """A finite loss with BatchNorm's running_var at inf (what a huge lr does): no such checkpoint."""
    from cemnet.methods.callbacks import DivergenceError, DivergenceGuard

    class BreakBuffers(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                pl_module.backbone.bn1.running_var.fill_(float("inf"))

    ck = RunCheckpoint(dirpath=str(tmp_path / "checkpoints"), filename="step{step:08d}", auto_insert_metric_name=False,
                       every_n_train_steps=2, save_top_k=-1, monitor="step", mode="max")
    with pytest.raises(DivergenceError, match=r"backbone\.bn1\.running_var.*global step 4.*last good checkpoint is .*last\.ckpt"):
        _fit(corpus, tmp_path, [DivergenceGuard(), BreakBuffers(), ck], max_steps=6)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 and not (tmp_path / "checkpoints" / "step00000004.ckpt").exists()
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_one_patch_corpus_is_one_line_naming_the_corpus(tmp_path, shared_data, capsys):
    """A corpus curated from one real 224 px crop of an ISBI slice holds a single patch."""
    import numpy as np
    from PIL import Image

    from cemnet.cli import main as cemnet_main
    from cemnet.methods.cli import main

    img = np.asarray(Image.open(shared_data / "isbi2012/train/images/0.png"))[:224, :224]
    Image.fromarray(img).save(tmp_path / "slice.png")
    assert cemnet_main(["curate", str(tmp_path / "slice.png"), "--out", str(tmp_path / "corpus")]) == 0
    capsys.readouterr()
    rc = main(["--config", str(Path(__file__).resolve().parents[1] / "experiments/tiny_mocov2_cpu.yaml"),
               "--run_dir", str(tmp_path / "run"), "--data.init_args.corpus", str(tmp_path / "corpus"),
               "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{tmp_path / 'corpus'}: 1 patch(es) per epoch, too few for one batch of 32" in err
