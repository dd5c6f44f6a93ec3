"""``cemnet transfer rank|select``: which source to transfer from, which patches to label first.

``rank`` embeds a sample of the target and of each candidate and ranks the candidates by
unbiased MMD^2 (smaller = closer = the better source, NeuroADDA 2025), with permutation
p-values, a table (stdout + ``rank.csv``) and a heatmap of pairwise MMD^2 between all sets.
``select`` scores unlabelled target patches and writes the ``--budget`` chosen ones as
``selection.csv`` + ``montage.png``. See ``docs/transferability.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cemnet.cli_help import HelpFormatter

# The work (torch, timm, curation) is imported inside the functions, after argument parsing,
# so that `--help` and argument errors answer at once.

__all__ = ["main", "RankRow", "rank", "select_patches", "save_heatmap", "save_montage"]


@dataclass
class RankRow:
    """One ranked candidate: MMD^2 to the target in ``space`` (the encoder that embedded both)."""

    candidate: str
    mmd2: float
    p_value: float | None
    null_q95: float | None
    n_target: int
    n_candidate: int
    space: str
    reference: str = ""  # encoder mode: what stood in for the encoder's pretraining data


# --------------------------------------------------------------------------- figures


def save_heatmap(names: list[str], matrix: np.ndarray, path: Path, title: str) -> Path:
    """Annotated heatmap PNG of a symmetric distance matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * k, 1.0 + 0.8 * k))
    im = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] < matrix.max() / 2 else "black")
    fig.colorbar(im, ax=ax, label="unbiased MMD$^2$")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_montage(patches: np.ndarray, labels: list[str], path: Path, tile: int = 128, cols: int = 8) -> Path:
    """Grid PNG of uint8 patches, each captioned (rank and score) so an annotator can start."""
    from PIL import Image, ImageDraw

    n = len(patches)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    pad, cap = 4, 14
    sheet = Image.new("L", (cols * (tile + pad) + pad, rows * (tile + cap + pad) + pad), 255)
    draw = ImageDraw.Draw(sheet)
    for i, (patch, label) in enumerate(zip(patches, labels)):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (tile + pad), pad + r * (tile + cap + pad)
        sheet.paste(Image.fromarray(np.asarray(patch, np.uint8)).resize((tile, tile), Image.BILINEAR), (x0, y0 + cap))
        draw.text((x0, y0), label, fill=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# --------------------------------------------------------------------------- rank


def _fingerprint(path: str) -> str | None:
    from curation.corpus import open_corpus

    try:
        return str(open_corpus(path).fingerprint)
    except (FileNotFoundError, ValueError):
        return None


def _embed_sets(model: Any, sets: list, norm: tuple[float, float], args: argparse.Namespace) -> list[np.ndarray]:
    from cemnet.transferability.embed import embed_patches

    return [embed_patches(model, s.patches, mean=norm[0], std=norm[1], batch_size=args.batch_size,
                          input_size=args.input_size) for s in sets]


def rank(args: argparse.Namespace, log: Any = print) -> tuple[list[RankRow], dict[str, Any]]:
    """Compute the ranking (see module docstring); returns rows (best first) and figure info."""
    from cemnet.transferability.embed import build_encoder, is_data_path, load_patch_sets, norm_for
    from cemnet.transferability.mmd import bandwidths, median_bandwidth, mmd2_test, pairwise_mmd2

    data_cands = [c for c in args.candidates if is_data_path(c)]
    enc_cands = [c for c in args.candidates if not is_data_path(c)]
    if data_cands and enc_cands:
        raise ValueError("--candidates must be all data (corpora/images/volumes) or all encoders, not a mix: "
                         f"data {data_cands}, encoders {enc_cands}")
    load = dict(n=args.n, patch_size=args.patch_size, max_planes=args.max_planes, seed=args.seed)
    target = load_patch_sets(args.target, by_source=False, **load)[0]
    target.name = f"TARGET:{target.name}"
    log(f"target {args.target}: {len(target)} patches")
    mmd_kw = dict(permutations=args.permutations, block=args.block, seed=args.seed)
    rows: list[RankRow] = []
    figures: dict[str, Any] = {}
    if data_cands:
        if not args.encoder:
            raise ValueError("ranking data candidates needs --encoder (the feature space to compare in)")
        model = build_encoder(args.encoder)
        sources = [s for c in data_cands for s in load_patch_sets(c, by_source=True, **load)]
        if len({s.name for s in sources}) < len(sources):  # same source name in two corpora
            for i, s in enumerate(sources):
                s.name = f"{s.name}#{i}"
        norm = norm_for(model, target)
        log(f"encoder {args.encoder}; normalisation mean={norm[0]:.3f} std={norm[1]:.3f} (from {norm[2]})")
        feats = _embed_sets(model, [target, *sources], norm, args)
        # one kernel for every comparison, so the MMD^2 values are comparable with each other
        sigmas = bandwidths(median_bandwidth(np.concatenate(feats), seed=args.seed))
        for s, f in zip(sources, feats[1:]):
            res = mmd2_test(feats[0], f, sigmas=sigmas, **mmd_kw)
            rows.append(RankRow(s.name, res.mmd2, res.p_value, res.null_q95, len(target), len(s), args.encoder))
        names = [target.name, *[s.name for s in sources]]
        figures["panels"] = [(args.encoder, names, pairwise_mmd2(feats, sigmas=sigmas, block=args.block))]
    else:
        # Encoder mode: each candidate encoder is scored by MMD^2 between the target and its own
        # pretraining data (a corpus given with --pretrain-corpus whose fingerprint matches the
        # one recorded in the weights), both embedded by that encoder. Without it, --reference
        # (a stand-in sample of generic EM) is the documented proxy.
        corpora = {(_fingerprint(p) or ""): p for p in args.pretrain_corpus}
        panels = []
        for cand in enc_cands:
            model = build_encoder(cand)
            meta = getattr(model, "cemnet_meta", None)
            fp = (getattr(meta, "corpus_fingerprint", None) or "").split(":")[-1]
            ref_path = corpora.get(fp) if fp else None
            how = "pretraining corpus (fingerprint match)"
            if ref_path is None:
                if not args.reference:
                    raise ValueError(
                        f"{cand}: its pretraining corpus is not available (recorded fingerprint "
                        f"{fp or 'none'}; pass it with --pretrain-corpus) and no --reference proxy was given")
                ref_path, how = args.reference, "proxy (--reference)"
            ref = load_patch_sets(ref_path, by_source=False, **load)[0]
            norm = norm_for(model, target)
            ft, fr = _embed_sets(model, [target, ref], norm, args)
            sigmas = bandwidths(median_bandwidth(np.concatenate([ft, fr]), seed=args.seed))
            res = mmd2_test(ft, fr, sigmas=sigmas, **mmd_kw)
            rows.append(RankRow(cand, res.mmd2, res.p_value, res.null_q95, len(target), len(ref), cand,
                                f"{how}: {ref_path}"))
            panels.append((Path(cand).name, [target.name, f"ref:{Path(ref_path).name}"],
                           pairwise_mmd2([ft, fr], sigmas=sigmas, block=args.block)))
            log(f"{cand}: reference = {how} {ref_path}")
        figures["panels"] = panels
    rows.sort(key=lambda r: r.mmd2)
    return rows, figures


def _write_rank(rows: list[RankRow], figures: dict[str, Any], out: Path, log: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    header = f"{'rank':>4}  {'candidate':<40} {'MMD^2':>9} {'p':>7} {'null95':>8} {'n_t':>5} {'n_c':>5}"
    log(header)
    for i, r in enumerate(rows, 1):
        p = "-" if r.p_value is None else f"{r.p_value:.3f}"
        q = "-" if r.null_q95 is None else f"{r.null_q95:.4f}"
        log(f"{i:>4}  {r.candidate[-40:]:<40} {r.mmd2:>9.4f} {p:>7} {q:>8} {r.n_target:>5} {r.n_candidate:>5}")
    with open(out / "rank.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "candidate", "mmd2", "p_value", "null_q95", "n_target", "n_candidate", "space", "reference"])
        for i, r in enumerate(rows, 1):
            w.writerow([i, r.candidate, f"{r.mmd2:.6g}", r.p_value, r.null_q95, r.n_target, r.n_candidate, r.space, r.reference])
    for k, (space, names, matrix) in enumerate(figures["panels"]):
        name = "mmd_heatmap.png" if k == 0 else f"mmd_heatmap_{k}.png"
        save_heatmap(names, matrix, out / name, f"pairwise MMD$^2$ in the features of {Path(space).name}")
        np.savetxt(out / name.replace(".png", ".csv"), matrix, delimiter=",", header=",".join(names), fmt="%.6g")
        log(f"wrote {out / name}")
    log(f"wrote {out / 'rank.csv'}")


# --------------------------------------------------------------------------- select


def select_patches(args: argparse.Namespace, log: Any = print) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """Score the target pool and choose ``args.budget`` patches; returns (pool, chosen, scores)."""
    from cemnet.transferability.active import (
        UNCERTAINTY_STRATEGIES, HeadRequiredError, load_head, patch_uncertainty, select,
    )
    from cemnet.transferability.embed import build_encoder, embed_patches, iter_batches, load_patch_sets, norm_for

    if args.strategy in UNCERTAINTY_STRATEGIES and not args.head:
        raise HeadRequiredError(
            f"--strategy {args.strategy} ranks patches by the uncertainty of a trained segmentation head: "
            "pass --head (a model made by cemnet finetune: RUN/model.safetensors). The uncertainty "
            "of an untrained head or a linear probe is not meaningful. Without a head use "
            "--strategy kcenter (needs --encoder) or random.")
    if args.strategy == "kcenter" and not (args.encoder or args.head):
        raise ValueError("--strategy kcenter needs --encoder (embeddings for the diversity criterion)")
    pool = load_patch_sets(args.target, n=args.pool, patch_size=args.patch_size, by_source=False,
                           max_planes=args.max_planes, seed=args.seed)[0]
    log(f"target {args.target}: pool of {len(pool)} unlabelled patches")
    scores = embeddings = None
    if args.head:
        import torch

        head, record = load_head(args.head)
        mean = record.get("mean") if record.get("mean") is not None else pool.mean
        std = record.get("std") if record.get("std") is not None else pool.std
        size = args.input_size or record.get("input_size")
        batches = list(iter_batches(pool.patches, mean, std, batch_size=args.batch_size, input_size=size))
        # true-pixel masks, so the zero padding of edge patches does not count as tissue
        p = pool.patches.shape[-1]
        s = size or p
        masks = []
        for i in range(0, len(pool), args.batch_size):
            m = np.zeros((len(pool.sizes[i:i + args.batch_size]), s, s), bool)
            for j, (h, w) in enumerate(pool.sizes[i:i + args.batch_size]):
                m[j, : int(np.ceil(h * s / p)), : int(np.ceil(w * s / p))] = True
            masks.append(torch.from_numpy(m))
        scores = patch_uncertainty(head, batches, args.uncertainty, masks)
        log(f"head {args.head}: {args.uncertainty} uncertainty, median {np.median(scores):.4f} "
            f"(range {scores.min():.4f}-{scores.max():.4f})")
    if args.strategy == "kcenter":
        model = build_encoder(args.encoder or load_head(args.head)[1]["encoder"])
        norm = norm_for(model, pool)
        embeddings = embed_patches(model, pool.patches, mean=norm[0], std=norm[1],
                                   batch_size=args.batch_size, input_size=args.input_size)
    chosen = select(args.strategy, args.budget, scores=scores, embeddings=embeddings, n=len(pool), seed=args.seed)
    if args.budget > len(pool):
        log(f"budget {args.budget} exceeds the pool of {len(pool)}: all patches selected")
    return pool, chosen, scores


def _write_selection(pool: Any, chosen: np.ndarray, scores: np.ndarray | None, out: Path, log: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cols = ["rank", "source", "file", "plane", "slice", "y", "x", "h", "w", "score"]
    with open(out / "selection.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for rank_, i in enumerate(chosen, 1):
            rec = pool.records[int(i)]
            w.writerow({**{c: rec.get(c, "") for c in cols[1:-1]}, "rank": rank_,
                        "score": "" if scores is None else f"{scores[int(i)]:.6g}"})
    labels = [f"#{r}" + ("" if scores is None else f" u={scores[int(i)]:.3f}") for r, i in enumerate(chosen, 1)]
    save_montage(pool.patches[chosen], labels, out / "montage.png")
    log(f"wrote {out / 'selection.csv'} ({len(chosen)} patches) and {out / 'montage.png'}")


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cemnet transfer", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("target", help="target data: a corpus, a folder of images, or a volume")
        q.add_argument("--out", type=Path, default=Path("transfer_out"), help="output folder")
        q.add_argument("--patch-size", type=int, default=224, help="patch side for images/volumes (a corpus keeps its own)")
        q.add_argument("--input-size", type=int, default=None, help="resize patches to this side before the encoder (CPU speed)")
        q.add_argument("--batch-size", type=int, default=64, help="patches per encoder forward pass")
        q.add_argument("--max-planes", type=int, default=64, help="planes read per image folder/volume at most")
        q.add_argument("--seed", type=int, default=0, help="seed of the patch sampling")

    r = sub.add_parser("rank", help="rank candidate sources (or encoders) by MMD^2 to the target", formatter_class=HelpFormatter)
    common(r)
    r.add_argument("--candidates", nargs="+", required=True,
                   help="data (corpora: one candidate per source dataset; image folders; volumes) or encoders")
    r.add_argument("--encoder", help="encoder embedding target and data candidates (export, registry name, timm:ARCH)")
    r.add_argument("--n", type=int, default=256, help="patches sampled per source and for the target")
    r.add_argument("--permutations", type=int, default=200, help="permutation-test relabellings (0 = none)")
    r.add_argument("--block", type=int, default=512, help="kernel tile side (memory ~ block^2)")
    r.add_argument("--pretrain-corpus", nargs="*", default=[],
                   help="encoder mode: corpora matched to each encoder by its recorded corpus fingerprint")
    r.add_argument("--reference", help="encoder mode: proxy sample when an encoder's pretraining corpus is unavailable")

    s = sub.add_parser("select", help="choose patches of the target to annotate first", formatter_class=HelpFormatter)
    common(s)
    s.add_argument("--encoder", help="encoder for kcenter embeddings")
    s.add_argument("--head", help="fine-tuned segmentation model: a cemnet finetune RUN/model.safetensors (or a save_head file); required for median/highest")
    s.add_argument("--budget", type=int, required=True, help="number of patches to select")
    s.add_argument("--strategy", default="median", choices=["median", "highest", "kcenter", "random"],
                   help="median/highest uncertainty of --head, kcenter coverage of --encoder features, or random")
    s.add_argument("--uncertainty", default="entropy", choices=["entropy", "margin"],
                   help="per-pixel uncertainty of the head: normalised entropy or 1 - margin of its class probabilities")
    s.add_argument("--pool", type=int, default=1000, help="unlabelled patches sampled from the target and scored")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cemnet transfer``; returns the exit status."""
    from curation.manifest import ReaderError

    args = _parser().parse_args(argv)
    t0 = time.time()
    try:
        if args.cmd == "rank":
            rows, figures = rank(args)
            _write_rank(rows, figures, args.out, print)
            (args.out / "rank.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
        else:
            pool, chosen, scores = select_patches(args)
            _write_selection(pool, chosen, scores, args.out, print)
    except (ValueError, FileNotFoundError, ReaderError) as err:  # user errors: one line, exit 2
        print(f"cemnet transfer {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
