"""MoCoV2 keys of a randomly initialised resnet18 on the CPU corpus (BENCHMARKS.md, "MoCoV2 at
small scale"): queue_key_cos at init (train- and eval-mode BN, raw and centred) and whether
train-mode BatchNorm lets a query tell keys of its own batch from keys of another batch.
Forward passes only (seconds)::

    cemnet curate --manifest experiments/pretrain_sources_no_benchmarks.yaml --out runs/corpus_pretrain
    python perf/mocov2_init_keys.py
"""
import torch
import torch.nn.functional as F

from cemnet.data.augment import AugmentConfig
from cemnet.data.datamodule import EMPatchDataModule
from lightly.models.utils import batch_shuffle, batch_unshuffle
from cemnet.methods.mocov2 import MoCoV2


def mean_pairwise_cos(z: torch.Tensor) -> float:
    z = F.normalize(z, dim=1)
    n, s = z.shape[0], z.sum(0)
    return float((s @ s - n) / (n * (n - 1)))


def init_key_cos() -> None:
    torch.manual_seed(0)
    dm = EMPatchDataModule("runs/corpus_pretrain", batch_size=64, num_workers=0, augment=AugmentConfig(crop_size=96))
    dm.setup()
    print("corpus", len(dm.corpus), "mean/std", dm.mean, dm.std)
    m = MoCoV2(arch="resnet18", queue_size=1024)
    x_q, _ = next(iter(dm.train_dataloader()))["views"]
    for mode in ("train", "eval"):
        m.train(mode == "train")
        with torch.no_grad():
            f = m.backbone(x_q)
            z = m.projection_head(f)
        print(mode, "feature cos", mean_pairwise_cos(f), "proj cos", mean_pairwise_cos(z),
              "proj cos (centered)", mean_pairwise_cos(z - z.mean(0)))


def batch_leak() -> None:
    torch.manual_seed(0)
    dm = EMPatchDataModule("runs/corpus_pretrain", batch_size=32, num_workers=0, augment=AugmentConfig(crop_size=96))
    dm.setup()
    it = iter(dm.train_dataloader())
    batches = [next(it)["views"] for _ in range(4)]
    for splits in (1, 4):
        torch.manual_seed(0)
        m = MoCoV2(arch="resnet18", queue_size=1024, bn_splits=splits).train()
        with torch.no_grad():
            out = []
            for xq, xk in batches:
                q = F.normalize(m.projection_head(m.backbone(xq)), dim=1)
                xs, un = batch_shuffle(xk)  # in-device (one process)
                k = F.normalize(batch_unshuffle(m.projection_head_momentum(m.backbone_momentum(xs)), un), dim=1)
                out.append((q, k))
        pos, same, other = [], [], []
        for b, (q, k) in enumerate(out):
            c = q @ k.T
            pos.append(c.diag().mean())
            same.append((c.sum() - c.diag().sum()) / (c.numel() - len(c)))
            other.append((q @ out[(b + 1) % len(out)][1].T).mean())
        f = lambda v: float(torch.stack(v).mean())  # noqa: E731
        print(f"bn_splits={splits}: cos(q,k+)={f(pos):.3f}  cos(q, other keys of its batch)={f(same):.3f}  "
              f"cos(q, keys of another batch)={f(other):.3f}")


if __name__ == "__main__":
    init_key_cos()
    batch_leak()
