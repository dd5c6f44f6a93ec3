"""PretrainMethod as the extension point docs/mgmr.md describes: a new method is a subclass that
writes its model, ``training_step`` and ``configure_optimizers``; the base supplies data stats,
the checkpoint contract, the LR schedule, EMA copies and the batch accessor.

A SimCLR-like method (lightly's head and NT-Xent loss) trains on real curated patches here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from pytorch_lightning.callbacks import ModelCheckpoint

from cemnet.data.augment import AugmentConfig
from cemnet.data.datamodule import EMPatchDataModule
from cemnet.data.stats import DataStats, ProvidesDataStats
from cemnet.methods.backbones import build_backbone
from cemnet.methods.base import PretrainMethod, batch_images, batch_size
from cemnet.methods.heads import upgrade_sequential_head_keys
from cemnet.methods.schedules import lr_factor
from cemnet.weights.checkpoint_io import load_checkpoint


class TinySimCLR(PretrainMethod):
    """docs/mgmr.md's example, plus one EMA pair to exercise ``momentum_pairs``."""

    method_name, spatial_dims = "simclr", 2
    momentum_pairs = (("backbone", "backbone_ema"),)

    def __init__(self, arch: str = "resnet18", arch_kwargs: dict | None = None, lr: float = 0.05,
                 compile: bool = False, mean: float | None = None, std: float | None = None,
                 corpus_fingerprint: str | None = None) -> None:
        super().__init__(arch, arch_kwargs, compile, mean, std, corpus_fingerprint)
        self.save_hyperparameters()
        self.backbone = build_backbone(arch, in_chans=1, **self.arch_kwargs)
        self.projection_head = SimCLRProjectionHead(self.backbone.num_features, 64, 32)
        self.build_momentum_copies()
        self.criterion = NTXentLoss(0.1)

    def training_step(self, batch, batch_idx):
        self.update_momentum_copies(0.9)
        z0, z1 = (self.projection_head(self.backbone(v)) for v in batch["views"])
        return self.criterion(z0, z1)

    def configure_optimizers(self):
        opt = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
        return self.lr_schedule(opt, "cosine", warmup_epochs=0.5)


def test_a_new_method_is_a_subclass_and_gets_stats_checkpoint_schedule_and_ema(corpus, tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = EMPatchDataModule(corpus, batch_size=8, num_workers=0, augment=AugmentConfig(crop_size=32))
    model = TinySimCLR()
    assert not any(p.requires_grad for p in model.backbone_ema.parameters())
    before = [p.clone() for p in model.backbone_ema.parameters()]
    lrs: list[float] = []

    class Lr(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[Lr(), ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(model, dm)
    stats = dm.data_stats()
    assert (model.mean, model.std, model.corpus_fingerprint) == (stats.mean, stats.std, corpus.fingerprint)
    assert model.global_batch_size() == 8
    assert any(not torch.equal(a, b) for a, b in zip(before, model.backbone_ema.parameters())), "EMA never moved"
    meta = load_checkpoint(tmp_path / "last.ckpt")["cemnet"]
    assert meta["method"] == "simclr" and meta["arch"] == "resnet18" and meta["global_step"] == 4
    assert meta["mean"] == pytest.approx(corpus.mean) and meta["corpus_fingerprint"] == corpus.fingerprint
    # the base's per-step schedule: warm-up over half an epoch times a cosine ending at max_steps
    per_epoch = trainer.num_training_batches
    expect = [0.05 * lr_factor(i / per_epoch, "cosine", 4 / per_epoch, warmup_epochs=0.5) for i in range(4)]
    assert lrs == pytest.approx(expect, rel=1e-9, abs=1e-15)


def test_datamodules_provide_data_stats_and_the_accessor_reads_every_batch_format(corpus) -> None:
    dm = EMPatchDataModule(corpus, batch_size=4, num_workers=0)
    assert isinstance(dm, ProvidesDataStats)
    assert dm.data_stats() == DataStats(dm.mean, dm.std, corpus.fingerprint, len(corpus), 4)
    x, _ = corpus.get_padded([0, 1, 2])
    t = torch.from_numpy(x)
    for batch in (t, (t, None), [t], {"image": t}, {"views": [t, t], "index": None}):
        assert batch_images(batch) is t and batch_size(batch) == 3
    with pytest.raises(TypeError, match="'views' or 'image'"):
        batch_images({"patches": t})
    assert batch_size({"patches": t}) == 0  # callbacks count unknown formats as empty, never fail


def test_old_sequential_head_keys_are_renamed_only_under_the_named_heads() -> None:
    old = {"projection_head.0.weight": 1, "projection_head_momentum.2.bias": 2, "backbone.layer1.0.conv1.weight": 3,
           "predictor.0.weight": 4}
    new = upgrade_sequential_head_keys(old, ("projection_head", "projection_head_momentum"))
    assert new == {"projection_head.layers.0.weight": 1, "projection_head_momentum.layers.2.bias": 2,
                   "backbone.layer1.0.conv1.weight": 3, "predictor.0.weight": 4}
    assert upgrade_sequential_head_keys(new, ("projection_head",)) == new  # already new: unchanged
