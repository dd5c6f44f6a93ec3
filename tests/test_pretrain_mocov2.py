"""MoCoV2: loss, queue, training on real patches, resume, accumulation, checkpoints, guard, CLI.

Runs on the session's ``small_corpus`` (real curated EM patches) with resnet18 at 32-48 px, so the
whole file stays well under a minute on two shared cores.
"""

from __future__ import annotations

import copy
import csv
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from cemnet.data.augment import AugmentConfig
from cemnet.data.datamodule import ArrayCorpus, EMPatchDataModule
from cemnet.methods.callbacks import DivergenceError, DivergenceGuard, ImagesPerSecond, PairSampleLogger
from cemnet.methods.losses import info_nce_queue
from cemnet.methods.memory_bank import KeyQueue
from cemnet.methods.mocov2 import MoCoV2
from cemnet.methods.schedules import lr_factor
from cemnet.weights.checkpoint_io import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONTRACT = {"arch", "in_chans", "mean", "std", "method", "corpus_fingerprint", "epochs", "global_step",
            "spatial_dims", "arch_kwargs"}


def _dm(corpus, crop=32, batch_size=16, **kw) -> EMPatchDataModule:
    kw.setdefault("num_workers", 0)
    return EMPatchDataModule(corpus, batch_size=batch_size, augment=AugmentConfig(crop_size=crop), **kw)


def _model(**kw) -> MoCoV2:
    kw = {"arch": "resnet18", "queue_size": 64, "lr_batch_size": 16, **kw}
    return MoCoV2(**kw)


def _trainer(tmp_path=None, **kw) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    if tmp_path is not None:
        base["default_root_dir"] = str(tmp_path)
    base.update(kw)
    if any(isinstance(c, ModelCheckpoint) for c in base.get("callbacks", [])):
        base["enable_checkpointing"] = True
    return pl.Trainer(**base)


# -- pure pieces ---------------------------------------------------------------------------------
def test_info_nce_queue_matches_cross_entropy_and_stays_fp32_under_bf16():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    queue = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    loss, st = info_nce_queue(q, k, queue, 0.2)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ queue.T], 1) / 0.2
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(8, dtype=torch.long)))
    assert st["acc_top1"] == (logits.argmax(1) == 0).float().mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf, _ = info_nce_queue(q.bfloat16(), k.bfloat16(), queue, 0.2)
    assert loss_bf.dtype == torch.float32
    ref, _ = info_nce_queue(q.bfloat16().float(), k.bfloat16().float(), queue, 0.2)
    torch.testing.assert_close(loss_bf, ref)


def test_key_queue_is_a_persistent_ring():
    qu = KeyQueue(8, 4)
    assert {"keys", "ptr", "n_enqueued"} <= set(qu.state_dict())  # in checkpoints (lightly's is not)
    a, b = F.normalize(torch.randn(5, 4), dim=1), F.normalize(torch.randn(5, 4), dim=1)
    qu.enqueue(a)
    assert int(qu.ptr) == 5 and qu.stats()["fill"] == pytest.approx(5 / 8)
    qu.enqueue(b)  # wraps: rows 5, 6, 7, 0, 1
    assert int(qu.ptr) == 2 and int(qu.n_enqueued) == 10 and qu.stats()["fill"] == 1.0
    torch.testing.assert_close(qu.keys[5:], b[:3])
    torch.testing.assert_close(qu.keys[:2], b[3:])
    torch.testing.assert_close(qu.keys[2:5], a[2:])
    same = KeyQueue(6, 4)
    same.enqueue(F.normalize(torch.ones(4, 4), dim=1))
    assert same.stats()["key_cos"] == pytest.approx(1.0, abs=1e-5)  # collapsed keys -> cosine 1


def test_negatives_are_real_keys_once_there_are_any():
    """While the ring fills, its random initial vectors are no negatives (they are orthogonal to
    every query and reward pulling all projections together): the loss sees real keys only."""
    qu = KeyQueue(8, 4)
    torch.testing.assert_close(qu.snapshot(), qu.keys)  # first step: nothing real yet (as MoCo)
    a, b = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(7, 4), dim=1)
    qu.enqueue(a)
    snap = qu.snapshot()
    assert snap.shape == (3, 4) and sorted(snap.sum(1).tolist()) == pytest.approx(sorted(a.sum(1).tolist()))
    qu.enqueue(b)  # wraps: full ring, every row real
    torch.testing.assert_close(qu.snapshot(), qu.keys)
    qu.keys[0] = 0  # a snapshot is a copy
    assert qu.snapshot().data_ptr() != qu.keys.data_ptr()


def test_key_rank_tells_a_shared_direction_from_collapse():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 16, generator=g)
    offset = KeyQueue(256, 16)  # a large shared direction plus isotropic spread: high key_cos, full rank
    offset.enqueue(F.normalize(spread * 0.15 + torch.ones(16), dim=1))
    line = KeyQueue(256, 16)  # keys varying along one direction only: collapse
    line.enqueue(F.normalize(torch.ones(16) + torch.randn(256, 1, generator=g) * torch.eye(16)[0], dim=1))
    so, sl = offset.stats(), line.stats()
    assert so["key_cos"] > 0.9 and so["key_rank"] > 12
    assert sl["key_rank"] < 2


def test_lr_schedules():
    # CEM500K: x0.1 at epochs 120 and 160 of 200, applied at whole epochs
    assert lr_factor(119.99, "step", 200, (120, 160)) == 1.0
    assert lr_factor(120.0, "step", 200, (120, 160)) == pytest.approx(0.1)
    assert lr_factor(165.5, "step", 200, (120, 160)) == pytest.approx(0.01)
    assert lr_factor(0, "cosine", 200) == 1.0 and lr_factor(100, "cosine", 200) == pytest.approx(0.5)
    assert lr_factor(200, "cosine", 200) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.5, "constant", 10, warmup_epochs=1.0) == pytest.approx(0.5)


# -- training on real patches -------------------------------------------------------------------
def test_few_steps_on_cpu_log_queue_logits_throughput_and_view_pairs(corpus, tmp_path):
    pl.seed_everything(0)
    dm = _dm(corpus, augment_on_device=True)  # the on-device path, on the CPU "device"
    model = _model(lr=0.03)
    trainer = _trainer(
        tmp_path, max_steps=4, logger=CSVLogger(tmp_path, name="csv", version=""), log_every_n_steps=1,
        callbacks=[DivergenceGuard(), ImagesPerSecond(), PairSampleLogger(every_n_steps=2, num_pairs=4)],
    )
    trainer.fit(model, dm)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    cols = set(rows[0])
    for name in ("train/loss", "train/lr", "train/queue_fill", "train/queue_key_cos", "train/logit_pos",
                 "train/logit_neg", "train/acc_top1", "train/images_per_s"):
        assert name in cols, name
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert float([r for r in rows if r.get("train/lr")][0]["train/lr"]) == pytest.approx(0.03)  # 0.03 * 16 / 16
    assert int(model.memory_bank.n_enqueued) == 4 * 16 and int(model.memory_bank.ptr) == 0
    fills = [float(r["train/queue_fill"]) for r in rows if r.get("train/queue_fill")]
    assert fills == [0.25, 0.5, 0.75, 1.0]
    pngs = sorted((tmp_path / "samples").glob("view_pairs_step*.png"))
    assert [p.name for p in pngs] == ["view_pairs_step00000001.png", "view_pairs_step00000003.png"]
    assert model.mean == pytest.approx(corpus.mean) and model.corpus_fingerprint == corpus.fingerprint


@pytest.mark.slow
def test_loss_decreases_when_overfitting_a_small_set(corpus):
    """16 real patches, views differing by flips (full-patch crops): memorisation must work.

    Full CEM500K augmentation needs far more than a test's steps to move the loss; this checks that
    the optimisation path (gradients, momentum encoder, queue) learns at all. Lenient: -20%.
    """
    pl.seed_everything(0)
    x, sizes = corpus.get_padded(np.linspace(0, len(corpus) - 1, 16).astype(int))
    small = ArrayCorpus(x, sizes, mean=corpus.mean, std=corpus.std)
    aug = AugmentConfig(crop_size=48, crop_scale=(1.0, 1.0), rotation_p=0.0, brightness=0.0, contrast=0.0,
                        blur_p=0.0, noise_p=0.0)
    dm = EMPatchDataModule(small, batch_size=16, num_workers=0, augment=aug)
    model = _model(queue_size=16, lr=0.06, key_momentum=0.99, schedule="constant")
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    _trainer(max_steps=32, callbacks=[Record()]).fit(model, dm)
    early, late = np.mean(losses[1:9]), np.mean(losses[-8:])  # step 0 still sees the random initial queue
    print(f"overfit loss {early:.3f} -> {late:.3f}")
    assert late < 0.8 * early, f"loss did not decrease: {early:.3f} -> {late:.3f}"


def _training_state(trainer: pl.Trainer, model: MoCoV2) -> dict[str, torch.Tensor]:
    """What an exact resume must restore: queue, optimizer momentum, lr, momentum encoder."""
    mb, opt = model.memory_bank, trainer.optimizers[0]
    p0 = next(p for p in model.parameters() if p.requires_grad)
    return dict(keys=mb.keys.clone(), ptr=mb.ptr.clone(), n=mb.n_enqueued.clone(),
                buf=opt.state[p0]["momentum_buffer"].clone(), lr=torch.tensor(opt.param_groups[0]["lr"]),
                kenc=next(model.backbone_momentum.parameters()).clone())


@pytest.mark.slow
def test_resume_restores_queue_optimizer_schedule_and_data_position(corpus, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    seen_a: list[list[int]] = []
    at_step3: dict[str, torch.Tensor] = {}

    class RecordA(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_a.append(batch["index"].tolist())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                at_step3.update(_training_state(trainer, pl_module))

    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=3, save_top_k=-1, save_last=True)
    model_a = _model(schedule="cosine")
    _trainer(tmp_path, max_steps=6, callbacks=[RecordA(), ckpt]).fit(model_a, _dm(corpus, seed=11))
    assert (ckpt_dir / "step=3.ckpt").is_file() and int(at_step3["ptr"]) == 48

    restored: dict[str, torch.Tensor] = {}
    seen_b: list[list[int]] = []

    class RecordB(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            restored.update(_training_state(trainer, pl_module))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_b.append(batch["index"].tolist())

    pl.seed_everything(123)  # a different seed: the data order must come from the checkpoint, not luck
    model_b = _model(schedule="cosine")
    trainer_b = _trainer(tmp_path, max_steps=6, callbacks=[RecordB()])
    trainer_b.fit(model_b, _dm(corpus, seed=11), ckpt_path=str(ckpt_dir / "step=3.ckpt"))
    for key in ("keys", "ptr", "n", "buf", "kenc"):
        assert torch.equal(restored[key], at_step3[key]), f"{key} not restored bit-for-bit"
    assert restored["lr"] == at_step3["lr"]
    assert seen_b == seen_a[3:6], "resume must continue with the 4th batch of the epoch"
    assert trainer_b.global_step == 6 and int(model_b.memory_bank.n_enqueued) == 6 * 16


@pytest.mark.slow
def test_momentum_encoder_moves_only_on_optimizer_steps(corpus):
    changes: dict[int, bool] = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = [p.clone() for p in pl_module.backbone_momentum.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = list(pl_module.backbone_momentum.parameters())
            changes[batch_idx] = any(not torch.equal(a, b) for a, b in zip(self.before, after))

    pl.seed_everything(0)
    _trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[Watch()]).fit(_model(), _dm(corpus, batch_size=8))
    assert sorted(changes) == [0, 1, 2, 3, 4, 5]
    assert not changes[1] and not changes[3] and not changes[5], "key encoder moved on a non-stepping micro-batch"
    assert changes[2] and changes[4], "key encoder must move once after each optimizer step"


def test_training_step_equals_plain_torch_moco_with_the_blocks_it_replaced(corpus):
    """MoCoV2 builds on lightly's head, momentum update and batch shuffle: one step must give the
    loss (and key-encoder weights) of MoCo written out in plain torch with the blocks cemnet had
    before (an ``nn.Sequential`` head, foreach EMA, an in-device randperm shuffle), same seed."""
    torch.manual_seed(0)
    model = _model()
    with torch.no_grad():  # online != momentum weights, so the EMA update shows in the keys
        for p in [*model.backbone.parameters(), *model.projection_head.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    dm = _dm(corpus)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    x_q, x_k = batch["views"]
    head, head_m = (torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
                    for _ in range(2))
    head.load_state_dict({k.removeprefix("layers."): v for k, v in model.projection_head.state_dict().items()})
    head_m.load_state_dict({k.removeprefix("layers."): v for k, v in model.projection_head_momentum.state_dict().items()})
    backbone, backbone_m = copy.deepcopy(model.backbone), copy.deepcopy(model.backbone_momentum)
    queue = model.memory_bank.keys.clone()

    torch.manual_seed(1)
    out = model.training_step(batch, 0)

    torch.manual_seed(1)
    q = head(backbone(x_q))
    with torch.no_grad():
        for online, ema in ((backbone, backbone_m), (head, head_m)):
            for p, p_m in zip(online.parameters(), ema.parameters()):
                p_m.mul_(0.999).add_(p, alpha=0.001)
        perm = torch.randperm(x_k.shape[0])
        k = F.normalize(head_m(backbone_m(x_k[perm]))[torch.argsort(perm)].float(), dim=1)
    q = F.normalize(q, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.2
    ref = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    torch.testing.assert_close(out["loss"], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["keys"], k, rtol=0, atol=1e-6)
    for a, b in zip(model.backbone_momentum.parameters(), backbone_m.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_checkpoint_with_the_old_sequential_head_keys_still_loads(corpus, tmp_path):
    """Checkpoints written before the heads were lightly's name them ``projection_head.0.weight``."""
    torch.manual_seed(0)
    written = _model()
    state = written.state_dict()
    old = {re.sub(r"^(projection_head(?:_momentum)?)\.layers\.", r"\1.", k): v for k, v in state.items()}
    assert "projection_head.0.weight" in old and "projection_head_momentum.2.bias" in old
    torch.save({"state_dict": old, "hyper_parameters": dict(written.hparams), "global_step": 0, "epoch": 0,
                "pytorch-lightning_version": pl.__version__, "cemnet": {"mean": 0.4, "std": 0.2}}, tmp_path / "old.ckpt")
    loaded = MoCoV2.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert (loaded.mean, loaded.std) == (0.4, 0.2)


def test_checkpoint_contract_and_clean_backbone_keys(corpus, tmp_path):
    pl.seed_everything(0)
    model = _model()
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=True,
                       callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(model, _dm(corpus))
    ck = load_checkpoint(tmp_path / "last.ckpt")
    meta = ck["cemnet"]
    assert set(meta) == CONTRACT
    assert meta["arch"] == "resnet18" and meta["in_chans"] == 1 and meta["method"] == "mocov2"
    assert meta["mean"] == pytest.approx(corpus.mean) and meta["std"] == pytest.approx(corpus.std)
    assert meta["corpus_fingerprint"] == corpus.fingerprint and meta["global_step"] == 2 and meta["spatial_dims"] == 2
    sd = ck["state_dict"]
    assert not [k for k in sd if "_orig_mod" in k or k.startswith(("model.", "module.", "_forward_module."))]
    assert {k.split(".")[0] for k in sd} == {"backbone", "backbone_momentum", "projection_head",
                                            "projection_head_momentum", "memory_bank"}
    fresh = timm.create_model("resnet18", in_chans=1, num_classes=0)
    fresh.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, strict=True)

    # torch.compile: nn.Module.compile() (what compile=True does) keeps keys clean by construction
    compiled = _model(compile=True)
    compiled.setup("fit")
    assert compiled.backbone._compiled_call_impl is not None
    assert not [k for k in compiled.state_dict() if "_orig_mod" in k]
    # a backbone wrapped by torch.compile(...) is stripped on save and remapped on load
    wrapped = _model()
    wrapped.backbone = torch.compile(wrapped.backbone, backend="eager")
    assert any("_orig_mod" in k for k in wrapped.state_dict())
    ckpt = {"state_dict": wrapped.state_dict(), "epoch": 0, "global_step": 0}
    wrapped.on_save_checkpoint(ckpt)
    assert not [k for k in ckpt["state_dict"] if "_orig_mod" in k] and ckpt["cemnet"]["arch"] == "resnet18"
    fresh.load_state_dict({k[9:]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}, strict=True)
    again = _model()
    again.backbone = torch.compile(again.backbone, backend="eager")
    back = {"state_dict": dict(ckpt["state_dict"]), "cemnet": ckpt["cemnet"]}
    again.on_load_checkpoint(back)
    again.load_state_dict(back["state_dict"], strict=True)


def test_checkpoint_records_whole_epochs_trained_not_the_epoch_index(corpus, tmp_path):
    # issue 11 item 24: a 2-epoch run recorded epochs=1 (Lightning's index of the epoch in progress)
    pl.seed_everything(0)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=2, enable_checkpointing=True,
                       callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(_model(), _dm(corpus))
    meta = load_checkpoint(tmp_path / "last.ckpt")["cemnet"]
    assert meta["global_step"] == 4 and meta["epochs"] == 2


@pytest.mark.slow
def test_divergence_guard_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    class Diverging(MoCoV2):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            if self.global_step == 3:
                out["loss"] = out["loss"] * float("nan")
            return out

    pl.seed_everything(0)
    model = Diverging(arch="resnet18", queue_size=64, lr_batch_size=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    with pytest.raises(DivergenceError, match="non-finite loss .* global step 3"):
        _trainer(tmp_path, max_steps=10, callbacks=[DivergenceGuard(), ckpt]).fit(model, _dm(corpus))
    last = load_checkpoint(tmp_path / "last.ckpt")
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters()), "no optimizer step after the NaN"


# -- CLI -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_tiny_config_runs_checkpoints_and_resumes(small_corpus, tmp_path, monkeypatch):
    from cemnet.methods.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    # log_every_n_steps 2 (not 1): metrics computed on the wrong steps would be dropped by Lightning
    common = ["--config", str(REPO / "experiments/tiny_mocov2_cpu.yaml"), "--run_dir", str(run),
              "--data.init_args.corpus", str(small_corpus), "--data.init_args.num_workers", "0",
              "--data.init_args.augment.crop_size", "32", "--data.init_args.batch_size", "16",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--checkpoint_every_n_steps", "2", "--samples_every_n_steps", "2", "--trainer.log_every_n_steps", "2"]
    assert main([*common, "--trainer.max_steps", "2", "--wandb"]) == 0
    assert (run / "checkpoints" / "step00000002.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "csv" / "metrics.csv").is_file() and (run / "csv" / "config.yaml").is_file()
    columns = set(next(csv.reader(open(run / "csv" / "metrics.csv"))))
    promised = {"train/loss", "train/lr", "train/logit_pos", "train/logit_neg", "train/acc_top1", "train/queue_fill",
                "train/queue_key_cos", "train/images_per_s"}  # docs/pretraining.md, "The run folder"
    assert promised <= columns, promised - columns
    # W&B offline: a run folder in RUN_DIR/wandb holding the same metrics
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    (records,) = wandb_run.glob("run-*.wandb")
    for _ in range(60):  # W&B's service process writes the record file asynchronously
        missing = [name for name in promised if name.encode() not in records.read_bytes()]
        if not missing:
            break
        time.sleep(0.5)
    assert not missing, f"W&B offline run lacks {missing}"
    assert list((wandb_run / "files" / "media").rglob("*view_pairs*.png"))  # samples go to W&B when attached
    first = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 2 and first["cemnet"]["method"] == "mocov2"
    assert main(["fit", *common, "--trainer.max_steps", "4", "--resume"]) == 0
    resumed = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 4
    assert int(resumed["state_dict"]["memory_bank.n_enqueued"]) == 4 * 16  # the queue carried over


def test_cli_help_shows_cemnet_options_with_defaults_and_names_real_commands(capsys):
    from cemnet.methods.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])  # `fit` is the default subcommand: its options are the ones shown
    options = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]
    for option, default in (("--run_dir RUN_DIR", "runs/pretrain"), ("--resume, --no_resume", "False"),
                            ("--wandb, --no_wandb", "False"), ("--wandb_mode WANDB_MODE", "offline"),
                            ("--checkpoint_every_n_steps CHECKPOINT_EVERY_N_STEPS", "1000")):
        entry = re.search(re.escape(option) + r" (.*?)\(type: [^)]*default: ([^)]*)\)", options)
        assert entry and entry.group(1).strip() and entry.group(2) == default, option  # one line of help + default
    with pytest.raises(SystemExit):
        main(["--no_such_option"])
    err = capsys.readouterr().err
    assert "cemnet pretrain fit --help" in err and "cemnet fit" not in err


def test_cli_exposes_mgmr_by_class_path(capsys):
    from cemnet.methods.cli import main

    for name in ("cemnet.methods.mgmr.MGMR2D", "MGMR3D", "MoCoV2"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", name, "--data", "cemnet.data.datamodule.EMPatchDataModule", "--data.corpus", "x",
                  "--print_config"])
        assert exit_info.value.code in (0, None)
        out = capsys.readouterr().out
        assert "class_path: cemnet.methods." in out


def test_paper_config_parses_to_cem500k_settings(capsys):
    import yaml

    from cemnet.methods.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(REPO / "experiments/cem500k_mocov2_resnet50.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert (m["arch"], m["queue_size"], m["key_momentum"], m["temperature"]) == ("resnet50", 65536, 0.999, 0.2)
    assert m["lr"] * d["batch_size"] * t["devices"] / m["lr_batch_size"] == pytest.approx(0.015)  # CEM500K's lr
    assert (m["schedule"], list(m["milestones"]), t["max_epochs"]) == ("step", [120, 160], 200)
    assert d["augment"]["crop_size"] == 224 and list(d["augment"]["crop_scale"]) == [0.2, 1.0]


def test_split_batchnorm_emulates_per_device_bn_and_keeps_keys():
    from cemnet.methods.distributed import SplitBatchNorm2d, convert_split_batchnorm

    plain = MoCoV2(arch="resnet18", queue_size=64)
    split = MoCoV2(arch="resnet18", queue_size=64, bn_splits=2)
    assert list(plain.state_dict()) == list(split.state_dict())  # export-compatible
    bns = [m for m in split.backbone.modules() if isinstance(m, SplitBatchNorm2d)]
    assert bns and all(m.num_splits == 2 for m in bns)
    assert any(isinstance(m, SplitBatchNorm2d) for m in split.backbone_momentum.modules())
    bn = convert_split_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), 2)[0].train()
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    ref = torch.empty_like(x)
    for j in range(2):  # sub-batches are every 2nd sample (MoCo's view trick), like 2 devices
        ref[j::2] = F.batch_norm(x[j::2], None, None, training=True)
    torch.testing.assert_close(bn(x), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(bn.running_mean, 0.1 * x.mean((0, 2, 3)), atol=1e-5)


def test_vit_backbone_trains(corpus):
    pl.seed_everything(0)
    model = _model(arch="vit_tiny_patch16_224", arch_kwargs={"img_size": 32, "patch_size": 8}, lr=0.01)
    assert model.projection_head.input_dim == 192
    _trainer(max_steps=2).fit(model, _dm(corpus))
    assert int(model.memory_bank.n_enqueued) == 32 and model.cemnet_metadata({})["arch_kwargs"]["img_size"] == 32
