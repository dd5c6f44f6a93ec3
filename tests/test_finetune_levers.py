"""Fine-tuning levers for a pretrained encoder (cemnet.finetune.engine): a lower encoder learning
rate, layer-wise decay, a frozen-encoder warm-up; and the encoder's recorded normalisation reaching
training on both the semantic and the instance (affinity) path. Real ISBI 2012 / GALA data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from cemnet.benchmarks.datasets import BenchmarkData, load_benchmark
from cemnet.benchmarks.train import FinetuneConfig, build_model, finetune
from cemnet.cli import main as cemnet_main
from cemnet.finetune.engine import FinetuneModule, encoder_param_groups
from helpers import tiny_encoder_export

TINY = FinetuneConfig(iterations=4, batch_size=2, crop_size=64, arch="test_resnet", base_width=16, eval_batch=4)


@pytest.fixture(scope="module")
def isbi(shared_data: Path) -> BenchmarkData:
    d = load_benchmark("isbi2012", shared_data)
    d.train, d.test = d.train[:2], d.test[:1]  # keep it cheap
    return d


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cemnet encoder export recording a normalisation unlike any EM data's own (0.3, 0.4)."""
    return tiny_encoder_export(tmp_path_factory.mktemp("enc") / "tiny.safetensors", mean=0.3, std=0.4,
                               method="mocov2")[0]


def test_param_groups_scale_and_decay_encoder_lr() -> None:
    model, _ = build_model("random", 1, TINY)
    groups = encoder_param_groups(model, 1e-3, model.encoder, encoder_lr_scale=0.1, layer_decay=0.5)
    lrs = {g["name"]: g["lr"] for g in groups}
    stages = [n for n, m in model.encoder.named_children() if any(True for _ in m.parameters())]
    assert lrs["decoder"] == pytest.approx(1e-3)
    assert lrs[f"encoder.{stages[-1]}"] == pytest.approx(1e-4)  # the deepest stage: max_lr x scale
    assert lrs[f"encoder.{stages[-2]}"] == pytest.approx(5e-5)
    n_stages = len(list(model.encoder.named_children()))
    assert lrs[f"encoder.{stages[0]}"] == pytest.approx(1e-4 * 0.5 ** (n_stages - 1))  # the stem: decayed most
    # every trainable parameter exactly once
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    # the OneCycle schedule peaks at each group's own rate
    module = FinetuneModule(model, lambda y, t: y.mean(), 10, max_lr=1e-3, encoder_lr_scale=0.1, layer_decay=0.5)
    opt = module.configure_optimizers()["optimizer"]
    assert sorted(g["max_lr"] for g in opt.param_groups) == pytest.approx(sorted(lrs.values()))
    # defaults: one rate for all (the groups differ only by name)
    assert {g["lr"] for g in encoder_param_groups(model, 1e-3, model.encoder)} == {1e-3}
    with pytest.raises(ValueError, match="layer_decay"):
        encoder_param_groups(model, 1e-3, model.encoder, layer_decay=0)


class _Recorder(pl.Callback):
    """Per optimizer step: did any encoder parameter require grad, was the encoder in train mode,
    and a copy of one encoder and one decoder weight."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start_weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        enc = pl_module.model.encoder
        self.rows.append({"step": trainer.global_step, "grad": any(p.requires_grad for p in enc.parameters()),
                          "enc_grads": any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters()),
                          "train_mode": any(m.training for m in enc.modules()),
                          "trainable": [p.requires_grad for p in enc.parameters()]})


def test_frozen_encoder_warmup(isbi: BenchmarkData, export: Path) -> None:
    rec = _Recorder()
    model0, _ = build_model(str(export), 1, TINY)
    before = {k: v.clone() for k, v in model0.state_dict().items()}
    cfg = dataclasses.replace(TINY, iterations=4, freeze_encoder_iterations=2)
    res = finetune(isbi, str(export), cfg, callbacks=[rec])
    assert [r["step"] for r in rec.rows] == [0, 1, 2, 3]
    warm, after = rec.rows[:2], rec.rows[2:]
    assert not any(r["grad"] or r["enc_grads"] or r["train_mode"] for r in warm)  # frozen, BN statistics too
    assert all(r["grad"] and r["enc_grads"] and r["train_mode"] for r in after)  # released
    # the encoder did move, after the warm-up (it is trained, not lost from the optimizer)
    state = res.model.state_dict()
    assert any(not torch.equal(before[k], state[k]) for k in before if k.startswith("encoder.") and state[k].is_floating_point())


def test_warmup_keeps_permanently_frozen_stages_frozen(isbi: BenchmarkData, export: Path) -> None:
    rec = _Recorder()
    cfg = dataclasses.replace(TINY, iterations=3, freeze="layer3", freeze_encoder_iterations=1)
    res = finetune(isbi, str(export), cfg, callbacks=[rec])
    stem = [p.requires_grad for n, p in res.model.encoder.named_parameters() if not n.startswith(("layer3", "layer4"))]
    assert stem and not any(stem)  # --freeze layer3 still holds after the warm-up released the rest
    assert rec.rows[0]["trainable"].count(True) == 0 and rec.rows[-1]["trainable"].count(True) > 0


def test_encoder_normalisation_reaches_training_and_evaluation(isbi: BenchmarkData, export: Path) -> None:
    seen: list[tuple[float, float]] = []
    res = finetune(isbi, str(export), dataclasses.replace(TINY, iterations=1), setup=lambda m, norm: seen.append(norm))
    assert seen == [pytest.approx((0.3, 0.4))] and res.norm == pytest.approx((0.3, 0.4))
    res = finetune(isbi, "random", dataclasses.replace(TINY, iterations=1))
    assert res.norm[0] != pytest.approx(0.3)  # random init: the data's own statistics


def test_instance_path_uses_the_encoder_normalisation(shared_data: Path, export: Path) -> None:
    from cemnet.benchmarks.instance import InstanceConfig, instance_norm, train_affinities

    d = load_benchmark("gala", shared_data)
    cfg = InstanceConfig(mode="2d", encoder=str(export), iterations=1, batch_size=1, crop=(2, 32, 32), base_width=8,
                         freeze_encoder_iterations=1)
    _, norm = train_affinities(d.train, cfg)
    assert norm == pytest.approx((0.3, 0.4)) and instance_norm(d.train) != pytest.approx((0.3, 0.4))


def test_finetune_and_benchmark_share_the_lever_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cemnet.benchmarks.cli import build_parser as benchmark_parser
    from cemnet.finetune.cli import build_parser as finetune_parser

    levers = ["--encoder-lr-scale", "0.1", "--layer-decay", "0.7", "--freeze-encoder-iterations", "20"]
    a = finetune_parser().parse_args(["--out", "x", *levers])
    b = benchmark_parser().parse_args(["custom", *levers])
    for args in (a, b):
        assert (args.encoder_lr_scale, args.layer_decay, args.freeze_encoder_iterations) == (0.1, 0.7, 20)
    for cmd in (["benchmark", "custom", "--images", "i", "--masks", "m"], ["finetune", "--images", "i", "--masks", "m"]):
        assert cemnet_main([*cmd, "--layer-decay", "1.5", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "--layer-decay must be in (0, 1]" in err and "Traceback" not in err
