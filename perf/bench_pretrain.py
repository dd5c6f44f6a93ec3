"""Pretraining throughput: our MoCoV2 step vs a bare PyTorch loop, and our loader vs CEM500K's.

1. Training images/s of ``cemnet.methods.mocov2.MoCoV2`` under a Lightning ``Trainer`` vs a bare
   PyTorch loop of the same model, batch and optimizer written in lightly's reference MoCo pattern
   (``lightly.models.utils.update_momentum`` + ``NTXentLoss(memory_bank_size=...)``). Both consume the
   same pre-augmented batches from memory, so only the training step and the framework differ.
   Rounds alternate (ours, bare, ours, bare, ...) so a busy shared machine hits both alike; the
   median over rounds is reported, by wall clock and by process CPU time (the latter is robust to
   other jobs on a shared machine; with one thread and no loader workers it is the work done).
   Target: overhead <= 5 %.
2. Loader throughput, patches/s producing TWO augmented views, one core: our CPU path (one gathered
   memmap read + one batched tensor augmentation per batch, what each loader worker runs) vs the
   per-image PIL/torchvision pipeline of CEM500K's ``train_mocov2.py`` (fed from memory, i.e.
   without its per-patch TIFF open, which only flatters it).

Usage (the small CPU setting reported in docs/pretraining.md):

    OMP_NUM_THREADS=1 python perf/bench_pretrain.py --arch resnet18 --batch 32 --crop 64 --steps 15 --rounds 5

Real patches: a corpus given with ``--corpus`` or, by default, ISBI 2012 training slices from
``../shared/data`` tiled into 224 px patches.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def load_patches(corpus: str | None, patch: int):
    from cemnet.data.datamodule import ArrayCorpus, load_corpus

    if corpus:
        return load_corpus(corpus)
    files = sorted((REPO.parent / "shared" / "data" / "isbi2012" / "train" / "images").glob("*.png"))
    return ArrayCorpus.from_images(files, patch, keep_edges=False)


# -- 1. training step ------------------------------------------------------------------------------
def make_batches(c, n: int, batch: int, crop: int) -> list[dict]:
    from cemnet.data.augment import AugmentConfig, EMAugment

    aug = EMAugment(AugmentConfig(crop_size=crop), c.mean, c.std)
    out = []
    for i in range(n):
        idx = np.arange(i * batch, (i + 1) * batch) % len(c)
        x, s = c.get_padded(idx)
        x, s = torch.from_numpy(x)[:, None], torch.from_numpy(np.asarray(s, np.int64))
        out.append({"views": [aug(x, s), aug(x, s)], "index": torch.from_numpy(idx)})
    return out


def bench_ours(batches: list[dict], args) -> float:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from cemnet.methods.mocov2 import MoCoV2

    times: list[tuple[float, float]] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                times.append((time.perf_counter(), time.process_time()))

        def on_train_end(self, trainer, pl_module):
            times.append((time.perf_counter(), time.process_time()))

    torch.manual_seed(0)
    model = MoCoV2(arch=args.arch, queue_size=args.queue, lr_batch_size=args.batch, schedule="constant")
    loader = DataLoader(batches, batch_size=None, shuffle=False)  # pre-made batches, as the bare loop
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Clock()])
    trainer.fit(model, loader)
    n = (len(batches) - args.warmup) * args.batch
    return n / (times[1][0] - times[0][0]), n / (times[1][1] - times[0][1])


def bench_bare(batches: list[dict], args) -> float:
    """lightly's MoCo example loop (update_momentum, NTXentLoss with a memory bank), same model."""
    from lightly.loss import NTXentLoss
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    from cemnet.methods.backbones import build_backbone
    from cemnet.methods.heads import MoCoV2ProjectionHead

    torch.manual_seed(0)
    backbone = build_backbone(args.arch)
    head = MoCoV2ProjectionHead(backbone.num_features)
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(head_m)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(args.queue, 128))
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.015, momentum=0.9, weight_decay=1e-4)
    backbone.train(), head.train(), backbone_m.train(), head_m.train()
    for i, batch in enumerate(batches):
        if i == args.warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        x_q, x_k = batch["views"]
        update_momentum(backbone, backbone_m, 0.999)
        update_momentum(head, head_m, 0.999)
        q = head(backbone(x_q))
        with torch.no_grad():
            perm = torch.randperm(x_k.shape[0])
            k = head_m(backbone_m(x_k[perm]))[torch.argsort(perm)]
        loss = criterion(q, k)
        loss.backward()
        opt.step()
        opt.zero_grad()
    n = (len(batches) - args.warmup) * args.batch
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


# -- 2. loader -----------------------------------------------------------------------------------
def bench_loader_ours(c, args) -> float:
    from cemnet.data.augment import AugmentConfig, EMAugment
    from cemnet.data.datamodule import PatchViewsDataset

    ds = PatchViewsDataset(c, EMAugment(AugmentConfig(crop_size=224), c.mean, c.std), num_views=2)
    rng = np.random.default_rng(0)
    ds.__getitems__(rng.integers(0, len(c), args.loader_batch).tolist())  # warm-up
    n = 0
    t0 = time.perf_counter()
    while n < args.loader_patches:
        ds.__getitems__(rng.integers(0, len(c), args.loader_batch).tolist())
        n += args.loader_batch
    return n / (time.perf_counter() - t0)


def cem500k_pipeline(mean: float, std: float):
    """train_mocov2.py's augmentation, verbatim in torchvision/PIL terms."""
    import torchvision.transforms as tf
    from PIL import ImageFilter

    class GaussianBlur:
        def __init__(self, sigma=(0.1, 2.0)):
            self.sigma = sigma

        def __call__(self, x):
            return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))

    class GaussNoise:
        def __init__(self, var_limit=(1e-5, 1e-4), p=0.5):
            self.var_limit, self.p = np.log(var_limit), p

        def __call__(self, image):
            if np.random.random() < self.p:
                sigma = np.exp(np.random.uniform(*self.var_limit)) ** 0.5
                noise = np.random.normal(0, sigma, size=image.shape).astype(np.float32)
                image = torch.clamp(image + torch.from_numpy(noise), 0, 1)
            return image

    return tf.Compose([
        tf.Grayscale(3), tf.RandomApply([tf.RandomRotation(180)], p=0.5), tf.RandomResizedCrop(224, scale=(0.2, 1.0)),
        tf.ColorJitter(0.4, 0.4, 0.4, 0.1), tf.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5), tf.Grayscale(1),
        tf.RandomHorizontalFlip(), tf.RandomVerticalFlip(), tf.ToTensor(), GaussNoise(p=0.5),
        tf.Normalize(mean=[mean], std=[std]),
    ])


def bench_loader_cem500k(c, args) -> float:
    from PIL import Image

    pipe = cem500k_pipeline(c.mean, c.std)
    rng = np.random.default_rng(0)
    n = 0
    pipe(Image.fromarray(c[0]))
    t0 = time.perf_counter()
    while n < args.loader_patches:
        img = Image.fromarray(np.asarray(c[int(rng.integers(0, len(c)))]))
        torch.stack([pipe(img), pipe(img)])  # two views, as EMData.__getitem__
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=None)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--queue", type=int, default=4096)
    p.add_argument("--steps", type=int, default=15, help="measured steps per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loader-batch", type=int, default=32)
    p.add_argument("--loader-patches", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-loader", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    c = load_patches(args.corpus, 224)
    result: dict = {"setting": vars(args), "patches": len(c), "torch": torch.__version__}
    if not args.skip_train:
        batches = make_batches(c, args.steps + args.warmup, args.batch, args.crop)
        ours, bare = [], []  # (wall img/s, CPU-time img/s) per round
        for _ in range(args.rounds):
            ours.append(bench_ours(batches, args))
            bare.append(bench_bare(batches, args))
            print(f"round: ours {ours[-1][0]:.1f} img/s (cpu {ours[-1][1]:.1f}), "
                  f"bare {bare[-1][0]:.1f} img/s (cpu {bare[-1][1]:.1f})", flush=True)
        res = {}
        for j, kind in enumerate(("wall", "cpu")):
            mo, mb = statistics.median(o[j] for o in ours), statistics.median(b[j] for b in bare)
            res[kind] = {"ours_img_s": mo, "bare_img_s": mb, "overhead_pct": 100.0 * (mb / mo - 1.0)}
        result["train"] = {**res, "rounds_ours": ours, "rounds_bare": bare}
    if not args.skip_loader:
        lo = [bench_loader_ours(c, args) for _ in range(args.rounds)]
        lc = [bench_loader_cem500k(c, args) for _ in range(args.rounds)]
        result["loader"] = {"ours_patches_s": lo, "cem500k_pil_patches_s": lc,
                            "ours_median": statistics.median(lo), "cem500k_median": statistics.median(lc),
                            "speedup": statistics.median(lo) / statistics.median(lc)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
