"""Does MMD^2 pick the best source, and does median-uncertainty selection beat random? (issue 6)

A reduced, CPU-only replication of the NeuroADDA (2025) protocol on the shared real data:

1. Source models: a small U-Net (timm ``resnet10t`` encoder, random init) is trained with labels on
   each labelled source domain - ISBI 2012 membranes, Drosophila VNC stack1 membranes, GALA FIB-SEM
   boundaries (from its dense neuron ids), CDeep3M mitochondria (a different task: only the
   encoder transfers).
2. Transfer: for each target (ISBI, VNC), every other source model is fine-tuned on ``--k`` labelled
   target patches and evaluated (membrane IoU) on held-out target patches. MMD^2 between target
   and source images is measured in the feature space of a fixed encoder (``--encoder``); the
   Spearman correlation between -MMD^2 and IoU says whether "closer" means "transfers better".
3. Active learning: starting from the best-ranked source model, ``--k`` target patches are chosen
   from an unlabelled pool by median / highest uncertainty (of that source model's head, the
   NeuroADDA setting), k-center or random (``--seeds`` draws), fine-tuned, and evaluated.

Everything is at 96 px, a few dozen steps: a smoke-scale check of the method, not a replication of
the paper's numbers. Writes ``results.json``, ``transfer_vs_mmd.png`` and ``active_learning.png``.

    OMP_NUM_THREADS=2 python perf/validate_transferability.py --out /tmp/transfer_validation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cemnet.finetune.engine import FinetuneModule, fit  # noqa: E402
from cemnet.models.unet import UNet  # noqa: E402
from cemnet.transferability.active import patch_uncertainty, select  # noqa: E402
from cemnet.transferability.embed import build_encoder, build_features_encoder, embed_patches, iter_batches  # noqa: E402
from cemnet.transferability.mmd import bandwidths, median_bandwidth, mmd2_test  # noqa: E402

P = 96


def _png(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("L"))


def load_domains(data: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (images uint8 (n, H, W), binary foreground masks (n, H, W)) per labelled domain."""
    import h5py

    isbi = data / "isbi2012/train"
    vnc = data / "drosophila_vnc_gerhard2013/stack1"
    cd = data / "cdeep3m_mito_sbem/training"
    out = {
        "isbi": (np.stack([_png(p) for p in sorted((isbi / "images").glob("*.png"))]),
                 np.stack([_png(p) == 0 for p in sorted((isbi / "labels").glob("*.png"))])),  # 0 = membrane
        "vnc": (np.stack([_png(p) for p in sorted((vnc / "raw").glob("*.png"))]),
                np.stack([_png(p) == 255 for p in sorted((vnc / "membranes").glob("*.png"))])),
        "cdeep3m_mito": (np.stack([_png(p) for p in sorted((cd / "images").glob("*.png"))]),
                         np.stack([np.array(Image.open(p)) == 1 for p in sorted((cd / "labels").glob("*.png"))])),
    }
    with h5py.File(data / "gala_fibsem_crops/train-image.h5") as f:
        img = f["stack"][:]
    with h5py.File(data / "gala_fibsem_crops/train-gt.lzf.h5") as f:
        gt = f["stack"][:]
    edge = gt == 0  # boundary voxels, plus where neighbouring ids differ
    edge[:, 1:] |= gt[:, 1:] != gt[:, :-1]
    edge[:, :, 1:] |= gt[:, :, 1:] != gt[:, :, :-1]
    out["gala"] = (img.astype(np.uint8), edge)
    return out


def crops(images: np.ndarray, masks: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random P x P crops (image, mask) from random slices."""
    z = rng.integers(0, len(images), n)
    y = rng.integers(0, images.shape[1] - P + 1, n)
    x = rng.integers(0, images.shape[2] - P + 1, n)
    return (np.stack([images[a, b:b + P, c:c + P] for a, b, c in zip(z, y, x)]),
            np.stack([masks[a, b:b + P, c:c + P] for a, b, c in zip(z, y, x)]))


def split(images: np.ndarray, masks: np.ndarray, frac: float = 0.7) -> tuple[tuple, tuple]:
    """Slices before / after ``frac``: crops for training and test never share a slice."""
    cut = max(1, int(len(images) * frac))
    return (images[:cut], masks[:cut]), (images[cut:], masks[cut:])


def new_unet(arch: str) -> UNet:
    return UNet(build_features_encoder(f"timm:{arch}"), num_classes=1, base_width=64)


class CropBatches:
    """Random batches of (standardised crop, mask) with flips, for the shared fine-tuning engine;
    standardises by the data's own statistics."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, seed: int) -> None:
        self.xt = torch.from_numpy(x).float().div(255)[:, None]
        self.yt = torch.from_numpy(y.astype(np.float32))[:, None]
        self.mean, self.std = self.xt.mean(), self.xt.std().clamp_min(1e-3)
        self.size = min(batch, len(self.xt))
        self.rng = np.random.default_rng(seed)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.rng.integers(0, len(self.xt), self.size))
        xb, yb = (self.xt[idx] - self.mean) / self.std, self.yt[idx]
        if self.rng.random() < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        if self.rng.random() < 0.5:
            xb, yb = xb.flip(-2), yb.flip(-2)
        return xb, yb


def train(model: UNet, x: np.ndarray, y: np.ndarray, steps: int, lr: float, seed: int, batch: int = 4) -> UNet:
    """Supervised fine-tuning on the shared engine (BCE, Adam at a constant lr, flips)."""
    torch.manual_seed(seed)
    module = FinetuneModule(model, F.binary_cross_entropy_with_logits, steps, max_lr=lr, weight_decay=0.0,
                            schedule="constant")
    fit(module, CropBatches(x, y, batch, seed), steps)
    return model.eval()


@torch.no_grad()
def iou(model: UNet, x: np.ndarray, y: np.ndarray) -> float:
    xt = torch.from_numpy(x).float().div(255)[:, None]
    pred = model((xt - xt.mean()) / xt.std().clamp_min(1e-3))[:, 0] > 0
    truth = torch.from_numpy(y)
    return float((pred & truth).sum() / (pred | truth).sum().clamp_min(1))


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("transfer_validation"))
    ap.add_argument("--arch", default="resnet10t", help="U-Net encoder (random init)")
    ap.add_argument("--encoder", default="timm:resnet18", help="feature space for MMD (any cemnet encoder)")
    ap.add_argument("--targets", nargs="+", default=["isbi", "vnc"])
    ap.add_argument("--source-steps", type=int, default=80)
    ap.add_argument("--finetune-steps", type=int, default=40)
    ap.add_argument("--k", type=int, default=4, help="labelled target patches")
    ap.add_argument("--pool", type=int, default=64, help="unlabelled target pool for active learning")
    ap.add_argument("--n-mmd", type=int, default=128, help="patches per domain for MMD")
    ap.add_argument("--seeds", type=int, default=3, help="random-selection draws")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()
    rng = np.random.default_rng(0)
    domains = load_domains(args.data)
    parts = {name: split(*d) for name, d in domains.items()}
    train_crops = {n: crops(*parts[n][0], 96, rng) for n in domains}
    test_crops = {n: crops(*parts[n][1], 32, rng) for n in domains}

    # 1. source models
    sources: dict[str, UNet] = {}
    for name in domains:
        sources[name] = train(new_unet(args.arch), *train_crops[name], args.source_steps, 1e-3, seed=1)
        print(f"[{time.time() - t0:5.0f}s] source {name}: in-domain IoU {iou(sources[name], *test_crops[name]):.3f}")

    # MMD^2 between domains in one fixed feature space, one kernel for all pairs
    enc = build_encoder(args.encoder)
    mmd_imgs = {n: crops(*domains[n], args.n_mmd, np.random.default_rng(1))[0] for n in domains}
    feats = {n: embed_patches(enc, im, mean=0.5, std=0.2, input_size=P) for n, im in mmd_imgs.items()}
    sigmas = bandwidths(median_bandwidth(np.concatenate(list(feats.values()))))

    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "transfer": {}, "active": {}}
    for target in args.targets:
        pool_x, pool_y = crops(*parts[target][0], args.pool, np.random.default_rng(2))
        lab = np.random.default_rng(3).choice(args.pool, args.k, replace=False)
        rows = []
        scratch = train(new_unet(args.arch), pool_x[lab], pool_y[lab], args.finetune_steps, 1e-3, seed=2)
        for src in (s for s in domains if s != target):
            m = mmd2_test(feats[target], feats[src], sigmas=sigmas, permutations=100)
            model = new_unet(args.arch)
            model.load_state_dict(sources[src].state_dict())
            model = train(model, pool_x[lab], pool_y[lab], args.finetune_steps, 3e-4, seed=2)
            rows.append({"source": src, "mmd2": m.mmd2, "p": m.p_value, "iou": iou(model, *test_crops[target])})
            print(f"[{time.time() - t0:5.0f}s] {target} <- {src}: MMD^2 {m.mmd2:.4f} IoU {rows[-1]['iou']:.3f}")
        rho = spearman([-r["mmd2"] for r in rows], [r["iou"] for r in rows])
        best_by_mmd = min(rows, key=lambda r: r["mmd2"])["source"]
        best_by_iou = max(rows, key=lambda r: r["iou"])["source"]
        results["transfer"][target] = {"rows": rows, "spearman_negmmd_iou": rho, "scratch_iou": iou(scratch, *test_crops[target]),
                                       "best_by_mmd": best_by_mmd, "best_by_iou": best_by_iou}
        print(f"  {target}: Spearman(-MMD^2, IoU) = {rho:.2f}; MMD picks {best_by_mmd}, IoU best {best_by_iou}")

        # 3. active learning from the MMD-chosen source model
        src_model = sources[best_by_mmd]
        xt = torch.from_numpy(pool_x).float().div(255)
        scores = patch_uncertainty(src_model, list(iter_batches(pool_x, float(xt.mean()), float(xt.std()), batch_size=32)))
        emb = embed_patches(enc, pool_x, mean=0.5, std=0.2)
        al = {}
        for strategy in ("median", "highest", "kcenter", "random"):
            vals = []
            for seed in range(args.seeds if strategy == "random" else 1):
                chosen = select(strategy, args.k, scores=scores, embeddings=emb, n=args.pool, seed=seed)
                model = new_unet(args.arch)
                model.load_state_dict(src_model.state_dict())
                vals.append(iou(train(model, pool_x[chosen], pool_y[chosen], args.finetune_steps, 3e-4, seed=2),
                                *test_crops[target]))
            al[strategy] = {"iou_mean": float(np.mean(vals)), "iou_all": vals}
            print(f"[{time.time() - t0:5.0f}s] {target} AL {strategy}: IoU {np.mean(vals):.3f}")
        results["active"][target] = {"source": best_by_mmd, **al}

    results["seconds"] = time.time() - t0
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out)
    print(f"wrote {args.out}/results.json, transfer_vs_mmd.png, active_learning.png in {results['seconds']:.0f} s")
    return 0


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(results["transfer"])
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    for ax, t in zip(axes[0], targets):
        r = results["transfer"][t]
        for row in r["rows"]:
            ax.scatter(row["mmd2"], row["iou"])
            ax.annotate(row["source"], (row["mmd2"], row["iou"]), fontsize=8)
        ax.axhline(r["scratch_iou"], ls="--", c="grey", lw=1, label="from scratch")
        ax.set(xlabel="MMD$^2$(target, source)", ylabel="target IoU after fine-tuning",
               title=f"target {t}: Spearman {r['spearman_negmmd_iou']:.2f}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "transfer_vs_mmd.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.4), squeeze=False)
    for ax, t in zip(axes[0], targets):
        a = results["active"][t]
        names = ["median", "highest", "kcenter", "random"]
        ax.bar(names, [a[n]["iou_mean"] for n in names], color=["C0", "C1", "C2", "grey"])
        ax.set(ylabel="target IoU", title=f"target {t}, source {a['source']}")
        lo = min(a[n]["iou_mean"] for n in names)
        ax.set_ylim(max(0, lo - 0.1), None)
    fig.tight_layout()
    fig.savefig(out / "active_learning.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
