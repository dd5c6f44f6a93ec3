"""How the StatsFilter defaults were chosen: feature distributions on real informative and
uninformative patches, one-criterion threshold sweeps, and the removal rates of the defaults.

Usage (from the repository root; ~40 s on one core, figures copied into docs/filters.md)::

    python perf/filter_thresholds.py --sweep [--data ../shared/data]

Informative (real vEM, cut into 224x224 patches as the curation pipeline does: tiles from the
top-left, truncated edge patches zero-padded, true size in ``sizes``): ISBI 2012, CDeep3M SBEM,
Drosophila VNC ssTEM, NeuroProof FIB-SEM (xy/xz/yz slices), GALA FIB-SEM crops, empanada (MitoNet)
tiles, AxonDeepSeg SEM and the CEM500K example patches (which passed CEM500K's own filter).

Uninformative (real): UroCell label volumes (read with nibabel, min-max to uint8), the label/mask
images shipped with ISBI / CDeep3M / VNC / CEM500K / AxonDeepSeg / empanada, the GALA neuron-id
volumes, and the fill regions of real slices after an alignment-style rotation with zero fill.
Shown but not pooled: the UroCell volumes under a raw-id rule, synthetic constant patches, and
degraded copies of real patches (heavy blur, crushed contrast) that only complement the real
negatives.

MUVIS SEM tiles (16-bit, percentile-scaled to uint8) contain large areas of bare, noisy and
textured substrate; their 128 patches were labelled by eye from a montage (``MUVIS_EMPTY``,
``MUVIS_MIXED``). They show what the statistics cannot see, and what a LogisticFilter trained on
such labels does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cemnet.segment.tiling import cut_tiles  # noqa: E402
from curation.to_uint8 import Uint8Converter  # noqa: E402
from curation.filters import FEATURE_NAMES, StatsFilter, patch_features, train_logistic_filter  # noqa: E402

P = 224


# --------------------------------------------------------------------------------------------
# Cutting and reading
# --------------------------------------------------------------------------------------------


def cut_patches(img: np.ndarray, p: int = P) -> tuple[np.ndarray, np.ndarray]:
    """Tile a 2D uint8 image from the top-left; edge patches truncated and zero-padded."""
    return cut_tiles(img, p, edge="truncate")


def cut_many(imgs: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ps, ss = zip(*(cut_patches(i) for i in imgs))
    return np.concatenate(ps), np.concatenate(ss)


def read_grey(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"))


def to_uint8_minmax(a: np.ndarray) -> np.ndarray:
    """Generic min-max rule (what a reader does with a label volume of unknown dtype)."""
    a = np.asarray(a)
    return Uint8Converter.fit(a, a.dtype, "minmax")(a)


def to_uint8_percentile(a: np.ndarray, lo_q: float = 0.5, hi_q: float = 99.5) -> np.ndarray:
    lo, hi = np.percentile(a, [lo_q, hi_q])
    return np.clip(np.round((a.astype(np.float64) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def volume_slices(vol: np.ndarray, step: int, axes: tuple[int, ...] = (0, 1, 2)) -> list[np.ndarray]:
    # Basic indexing, not np.take: nibabel hands back Fortran-ordered arrays, on which
    # np.take(axis=...) copies the whole volume for each slice.
    out = []
    for ax in axes:
        for i in range(0, vol.shape[ax], step):
            out.append(np.ascontiguousarray(vol[(slice(None),) * ax + (i,)]))
    return out


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

Source = tuple[str, Callable[[Path], tuple[np.ndarray, np.ndarray]]]


def _isbi(d: Path) -> tuple[np.ndarray, np.ndarray]:
    fs = sorted((d / "isbi2012").glob("*/images/*.png"))
    return cut_many(read_grey(f) for f in fs)


def _cdeep3m(d: Path) -> tuple[np.ndarray, np.ndarray]:
    fs = sorted((d / "cdeep3m_mito_sbem").glob("*/images*.png")) + sorted(
        (d / "cdeep3m_mito_sbem").glob("*/images/*.png")
    )
    return cut_many(read_grey(f) for f in fs)


def _vnc(d: Path) -> tuple[np.ndarray, np.ndarray]:
    fs = sorted((d / "drosophila_vnc_gerhard2013").glob("stack*/raw/*.png"))
    return cut_many(read_grey(f) for f in fs)


def _neuroproof_volume(d: Path, name: str) -> np.ndarray:
    fs = sorted((d / "neuroproof_fibsem_medulla" / name / "grayscale_maps").glob("*.png"))
    return np.stack([read_grey(f) for f in fs])


def _neuroproof(d: Path) -> tuple[np.ndarray, np.ndarray]:
    imgs: list[np.ndarray] = []
    for name in ("training_sample1", "training_sample2"):
        imgs += volume_slices(_neuroproof_volume(d, name), step=10)
    return cut_many(imgs)


def _gala(d: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    imgs: list[np.ndarray] = []
    for name in ("train-image.h5", "test-image.h5"):
        with h5py.File(d / "gala_fibsem_crops" / name, "r") as h:
            imgs += volume_slices(np.asarray(h["stack"]), step=5, axes=(0, 1))
    return cut_many(imgs)


def _empanada(d: Path) -> tuple[np.ndarray, np.ndarray]:
    fs = sorted((d / "empanada_test_tiles").glob("*/*/images/*"))
    return cut_many(read_grey(f) for f in fs)


def _axondeepseg(d: Path) -> tuple[np.ndarray, np.ndarray]:
    return cut_patches(read_grey(d / "axondeepseg_sem_demo" / "image.png"))


def _muvis(d: Path) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    fs = sorted((d / "muvis_align_sem_tiles" / "tiff_uint16").glob("*/*.tiff"))
    return cut_many(to_uint8_percentile(tifffile.imread(f)) for f in fs)


def _cem500k(d: Path) -> tuple[np.ndarray, np.ndarray]:
    root = d / "cem500k_example_patches"
    fs = sorted((root / "correlation" / "images").glob("*.png")) + sorted((root / "occlusion").glob("*.tiff"))
    return cut_many(read_grey(f) for f in fs)


def _urocell(d: Path, rule: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    imgs: list[np.ndarray] = []
    for f in sorted((d / "urocell_labels_only").rglob("*.nii.gz")):
        vol = np.asanyarray(nib.load(str(f)).dataobj)
        if rule == "minmax":
            vol = to_uint8_minmax(vol)
        else:  # raw cast: label ids stay small integers (0/1/2...)
            vol = np.clip(vol, 0, 255).astype(np.uint8)
        imgs += volume_slices(vol, step=16)
    return cut_many(imgs)


def _urocell_minmax(d: Path) -> tuple[np.ndarray, np.ndarray]:
    return _urocell(d, "minmax")


def _urocell_raw(d: Path) -> tuple[np.ndarray, np.ndarray]:
    return _urocell(d, "raw")


def _label_images(d: Path) -> tuple[np.ndarray, np.ndarray]:
    fs = (
        sorted((d / "isbi2012" / "train" / "labels").glob("*.png"))
        + sorted((d / "cdeep3m_mito_sbem").glob("*/labels/*.png"))
        + sorted((d / "drosophila_vnc_gerhard2013" / "stack1").glob("membranes/*.png"))
        + sorted((d / "drosophila_vnc_gerhard2013" / "stack1").glob("mitochondria/*.png"))
        + sorted((d / "drosophila_vnc_gerhard2013" / "stack1").glob("synapses/*.png"))
        + sorted((d / "cem500k_example_patches" / "correlation" / "masks").glob("*.png"))
        + [d / "axondeepseg_sem_demo" / "mask.png"]
    )
    # Labels are stored 0/1, 0/255, palette...: min-max them as a reader would.
    imgs = [to_uint8_minmax(read_grey(f)) for f in fs]
    import tifffile

    for f in sorted((d / "empanada_test_tiles").glob("*/*/masks/*")):
        imgs.append(to_uint8_minmax(tifffile.imread(f)))
    return cut_many(imgs)


def _gala_labels(d: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    imgs: list[np.ndarray] = []
    for name in ("train-gt.lzf.h5", "test-gt.lzf.h5", "train-ws.lzf.h5", "test-ws.lzf.h5"):
        with h5py.File(d / "gala_fibsem_crops" / name, "r") as h:
            imgs += volume_slices(to_uint8_minmax(np.asarray(h["stack"])), step=5, axes=(0, 1))
    return cut_many(imgs)


def _alignment_fill(d: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real slices rotated with zero fill, as an alignment/registration step leaves them at the
    volume borders. Returns (patches, sizes, fill fraction of each patch's true region)."""
    from scipy import ndimage

    fs = sorted((d / "cdeep3m_mito_sbem" / "training" / "images").glob("*.png"))[::4] + sorted(
        (d / "drosophila_vnc_gerhard2013" / "stack1" / "raw").glob("*.png")
    )[::4]
    ps, ss, fills = [], [], []
    for k, f in enumerate(fs):
        img = read_grey(f)
        angle = 10.0 + 7.0 * k
        rot = ndimage.rotate(img, angle, reshape=True, order=1, cval=0, prefilter=False)
        valid = ndimage.rotate(np.ones(img.shape, np.float32), angle, reshape=True, order=1, cval=0) > 0.5
        p, s = cut_patches(rot)
        v, _ = cut_patches(valid.astype(np.uint8))
        fills.append(np.array([1.0 - v[i, : s[i, 0], : s[i, 1]].mean() for i in range(len(p))]))
        ps.append(p)
        ss.append(s)
    return np.concatenate(ps), np.concatenate(ss), np.concatenate(fills)


def _constant(_: Path) -> tuple[np.ndarray, np.ndarray]:
    """Constant patches at every 5th grey level, full-size and truncated (padding is zeros)."""
    levels = np.arange(0, 256, 5, dtype=np.uint8)
    full = np.repeat(levels[:, None], P * P, axis=1).reshape(-1, P, P)
    trunc = np.zeros_like(full)
    rng = np.random.default_rng(0)
    sizes_t = np.stack([rng.integers(16, P, len(levels)), rng.integers(16, P + 1, len(levels))], axis=1)
    for i, (h, w) in enumerate(sizes_t):
        trunc[i, :h, :w] = levels[i]
    return np.concatenate([full, trunc]), np.concatenate([np.full((len(levels), 2), P), sizes_t])


def _full_size_subset(p: np.ndarray, s: np.ndarray, step: int) -> np.ndarray:
    return p[(s == P).all(axis=1)][::step]


def _derived(informative: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Degraded copies of real full-size patches (complement only, never the sole negatives)."""
    from scipy import ndimage

    base = np.concatenate([_full_size_subset(p, s, 8) for p, s in informative])
    blur = np.stack(
        [np.clip(np.round(ndimage.gaussian_filter(b.astype(np.float64), 8.0)), 0, 255).astype(np.uint8) for b in base]
    )
    # Contrast crushed to 4 % of the original around the mean (std ~1-3 grey levels).
    m = base.reshape(len(base), -1).mean(axis=1)[:, None, None]
    crushed = np.clip(np.round(m + (base - m) * 0.04), 0, 255).astype(np.uint8)
    sz = np.full((len(base), 2), P)
    return {"blurred (gaussian sigma=8 px)": (blur, sz), "contrast-crushed (x0.04)": (crushed, sz)}


#: Hand labels of the 128 MUVIS patches (tiles in sorted path order, 16 patches per 800x800 tile,
#: row-major). "empty": >= ~80 % bare substrate/resin; "mixed": partly empty (excluded from the
#: rates); all others show cells ("cell").
MUVIS_EMPTY = (1, 19, 23, 39, 47, 52, 63, 73, 74, 75, 78, 79, 119, 127)
MUVIS_MIXED = (0, 18, 25, 27, 30, 31, 32, 38, 44, 56, 60, 71, 72, 90, 99, 107, 111, 114, 117, 122, 123, 124)


def muvis_hand_labels(n: int) -> np.ndarray:
    lab = np.full(n, "cell", dtype=object)
    lab[list(MUVIS_EMPTY)] = "empty"
    lab[list(MUVIS_MIXED)] = "mixed"
    return lab


INFORMATIVE: list[Source] = [
    ("ISBI 2012 ssTEM", _isbi),
    ("CDeep3M SBEM", _cdeep3m),
    ("VNC ssTEM", _vnc),
    ("NeuroProof FIB-SEM xy/xz/yz", _neuroproof),
    ("GALA FIB-SEM crops", _gala),
    ("empanada tiles", _empanada),
    ("AxonDeepSeg SEM", _axondeepseg),
    ("CEM500K example patches", _cem500k),
]

UNINFORMATIVE: list[Source] = [
    ("UroCell labels (min-max)", _urocell_minmax),
    ("label/mask images", _label_images),
    ("GALA neuron-id maps", _gala_labels),
]

#: Shown but not pooled: the same UroCell volumes under another conversion rule (pooling both
#: would count every label slice twice), and synthetic constant patches.
EXTRA_UNINFORMATIVE: list[Source] = [
    ("UroCell labels (raw ids, not pooled)", _urocell_raw),
    ("synthetic constant, full + truncated (not pooled)", _constant),
]

#: Columns shown in the distribution table: the ones the StatsFilter thresholds.
TABLE_FEATURES = (
    "uniform_fraction", "saturated_fraction", "std", "range_p1_p99", "entropy_bits", "flat_pair_fraction",
    "gradient_rel",
)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _quantile_table(sets: list[tuple[str, np.ndarray]], names: tuple[str, ...]) -> str:
    qs = (0, 1, 50, 99, 100)
    lines = [f"| set | n | feature | {' | '.join(f'p{q}' if q not in (0, 100) else ('min' if q == 0 else 'max') for q in qs)} |",
             "|---|---|---|" + "---|" * len(qs)]
    for set_name, f in sets:
        for j, nm in enumerate(names):
            col = f[:, FEATURE_NAMES.index(nm)]
            vals = np.percentile(col, qs)
            lines.append(f"| {set_name if j == 0 else ''} | {len(f) if j == 0 else ''} | {nm} | "
                         + " | ".join(f"{v:.3g}" for v in vals) + " |")
    return "\n".join(lines)


def _reasons(res_reason: np.ndarray) -> str:
    codes, counts = np.unique(res_reason[res_reason != ""], return_counts=True)
    return ", ".join(f"{c} {n}" for c, n in sorted(zip(codes, counts), key=lambda t: -t[1])) or "-"


def _removal_row(name: str, filt: StatsFilter, f: np.ndarray, s: np.ndarray) -> tuple[str, int, int]:
    res = filt.decide(f, (s == 0).any(axis=1))
    removed = int((~res.keep).sum())
    return f"| {name} | {len(f)} | {removed} | {100.0 * removed / max(len(f), 1):.2f} % | {_reasons(res.reason)} |", removed, len(f)


def _sweep(filt: StatsFilter, inf: np.ndarray, uninf: np.ndarray, field: str, values: Iterable[float]) -> str:
    """Each criterion alone at several values: false removal on real informative vs removal of
    real uninformative (the other criteria switched off)."""
    import dataclasses

    off = dict(uniform_fraction=1.0, max_saturated=1.0, min_std=0.0, min_range=0.0, min_entropy=0.0,
               max_flat_pairs=1.0, min_gradient_rel=0.0)
    out = [f"{field:>18s}: " + "  ".join(f"{v:g}" for v in values)]
    rows_i, rows_u = [], []
    for v in values:
        kw = dict(off)
        if field in kw:
            kw[field] = v
        g = dataclasses.replace(filt, **kw)
        # A fraction threshold of 1.0 still removes exact-1.0 patches: that is the intent.
        rows_i.append(100.0 * (~g.decide(inf).keep).mean())
        rows_u.append(100.0 * (~g.decide(uninf).keep).mean())
    out.append(f"{'informative rm %':>18s}: " + "  ".join(f"{v:.2f}" for v in rows_i))
    out.append(f"{'uninformative rm %':>18s}: " + "  ".join(f"{v:.1f}" for v in rows_u))
    return "\n".join(out)


def main() -> None:
    import time

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--sweep", action="store_true", help="also print one-criterion threshold sweeps")
    args = ap.parse_args()
    d = args.data
    filt = StatsFilter()
    print(f"StatsFilter defaults: {filt.describe()}\n")

    t0 = time.perf_counter()
    inf_sets = [(n, *fn(d)) for n, fn in INFORMATIVE]
    uninf_sets = [(n, *fn(d)) for n, fn in UNINFORMATIVE]
    extra_sets = [(n, *fn(d)) for n, fn in EXTRA_UNINFORMATIVE]
    fill_p, fill_s, fill = _alignment_fill(d)
    muvis_p, muvis_s = _muvis(d)
    derived = _derived([(p, s) for _, p, s in inf_sets])
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    feats = {n: patch_features(p, s)[0] for n, p, s in inf_sets + uninf_sets + extra_sets}
    t_feat = time.perf_counter() - t0
    n_feat = sum(len(p) for _, p, _ in inf_sets + uninf_sets + extra_sets)
    fill_f = patch_features(fill_p, fill_s)[0]
    muvis_f = patch_features(muvis_p, muvis_s)[0]
    derived_f = {n: patch_features(p, s)[0] for n, (p, s) in derived.items()}
    sizes = {n: s for n, _, s in inf_sets + uninf_sets + extra_sets}

    inf_all = np.concatenate([feats[n] for n, _, _ in inf_sets])
    uninf_all = np.concatenate([feats[n] for n, _, _ in uninf_sets])
    muvis_lab = muvis_hand_labels(len(muvis_p))

    print("## Feature distributions (true region only)\n")
    print(_quantile_table([(n, feats[n]) for n, _, _ in inf_sets] + [("ALL real informative", inf_all)]
                          + [("MUVIS SEM, hand-labelled cell", muvis_f[muvis_lab == "cell"]),
                             ("MUVIS SEM, hand-labelled empty", muvis_f[muvis_lab == "empty"])]
                          + [(n, feats[n]) for n, _, _ in uninf_sets + extra_sets]
                          + [("alignment fill >= 80 %", fill_f[fill >= 0.8])]
                          + [(n, f) for n, f in derived_f.items()], TABLE_FEATURES))

    if args.sweep:
        print("\n## One-criterion sweeps (all real informative vs all real uninformative)\n")
        for field, vals in (
            ("uniform_fraction", (0.5, 0.6, 0.7, 0.8, 0.9)),
            ("max_saturated", (0.1, 0.25, 0.5, 0.75, 0.9)),
            ("min_std", (1, 2, 3, 4, 5, 8)),
            ("min_range", (5, 8, 12, 16, 20, 30)),
            ("min_entropy", (1, 2, 3, 4, 4.5)),
            ("max_flat_pairs", (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
            ("min_gradient_rel", (0.05, 0.08, 0.1, 0.15)),
        ):
            print(_sweep(filt, inf_all, uninf_all, field, vals) + "\n")
        print("uniform_std (block flatness tolerance) vs max uniform_fraction on real informative:")
        for tol in (1.0, 2.0, 3.0, 4.0):
            u = np.concatenate([patch_features(p, s, uniform_std=tol)[0][:, FEATURE_NAMES.index("uniform_fraction")]
                                for _, p, s in inf_sets])
            print(f"  uniform_std={tol:g}: p99={np.percentile(u, 99):.3f} max={u.max():.3f} "
                  f">=0.8: {100 * (u >= 0.8).mean():.2f} %")

    print("\n## Removal by the defaults\n")
    print("| set | patches | removed | rate | reasons |\n|---|---|---|---|---|")
    def removal_rows_and_total(sets: list, label: str) -> None:
        tot_r = tot_n = 0
        for n, _, _ in sets:
            row, r, k = _removal_row(n, filt, feats[n], sizes[n])
            print(row)
            tot_r, tot_n = tot_r + r, tot_n + k
        print(f"| **ALL real {label}** | {tot_n} | {tot_r} | **{100.0 * tot_r / tot_n:.2f} %** | |")

    removal_rows_and_total(inf_sets, "informative")
    for lab in ("cell", "mixed", "empty"):
        m = muvis_lab == lab
        print(_removal_row(f"MUVIS SEM hand-labelled {lab}", filt, muvis_f[m], muvis_s[m])[0])
    removal_rows_and_total(uninf_sets, "uninformative")
    for n, _, _ in extra_sets:
        print(_removal_row(n, filt, feats[n], sizes[n])[0])
    for lo, hi, label in ((0.8, 1.01, "alignment fill >= 80 %"), (0.2, 0.8, "alignment fill 20-80 %"),
                          (0.0, 0.2, "alignment fill < 20 %")):
        m = (fill >= lo) & (fill < hi)
        print(_removal_row(label, filt, fill_f[m], fill_s[m])[0])
    for n, f in derived_f.items():
        print(_removal_row(f"derived: {n}", filt, f, np.full((len(f), 2), P))[0])

    print("\n## A trained LogisticFilter on what the statistics cannot see (MUVIS empty substrate)\n")
    sec = np.repeat(np.arange(len(muvis_p) // 16), 16) // 4  # 4 tiles per section: S000, S001
    tr = (muvis_lab != "mixed") & (sec == 0)
    uro_p, uro_s = next((p, s) for n, p, s in uninf_sets if n.startswith("UroCell labels (min-max)"))
    uro_p, uro_s = uro_p[::16], uro_s[::16]
    pos = [(p, s) for n, p, s in inf_sets if n in ("ISBI 2012 ssTEM", "NeuroProof FIB-SEM xy/xz/yz")]
    tp = np.concatenate([muvis_p[tr]] + [p for p, _ in pos] + [uro_p])
    ts = np.concatenate([muvis_s[tr]] + [s for _, s in pos] + [uro_s])
    ty = np.concatenate([muvis_lab[tr] == "cell", np.ones(sum(len(p) for p, _ in pos), bool), np.zeros(len(uro_p), bool)])
    logi, rep = train_logistic_filter(tp, ts, ty)
    print(f"trained on MUVIS section S000 (hand labels) + ISBI + NeuroProof (informative) + 1/16 of the "
          f"UroCell min-max label patches: n={rep['n']}, 5-fold CV accuracy {rep['cv_accuracy']:.3f}, "
          f"AUC {rep['cv_auc']:.3f}\n")
    print("| held-out set | patches | removed | rate |\n|---|---|---|---|")
    held = [(f"MUVIS S001 hand-labelled {lab}", muvis_p[(muvis_lab == lab) & (sec == 1)],
             muvis_s[(muvis_lab == lab) & (sec == 1)]) for lab in ("cell", "mixed", "empty")]
    held += [(n, p, s) for n, p, s in inf_sets if n not in ("ISBI 2012 ssTEM", "NeuroProof FIB-SEM xy/xz/yz")]
    held += [(n, p, s) for n, p, s in uninf_sets + extra_sets if not n.startswith("UroCell")]
    held += [("alignment fill >= 80 %", fill_p[fill >= 0.8], fill_s[fill >= 0.8])]
    for n, p, s in held:
        r = int((~logi(p, s).keep).sum())
        print(f"| {n} | {len(p)} | {r} | {100.0 * r / max(len(p), 1):.2f} % |")

    print(f"\npatch_features throughput: {n_feat / t_feat:.0f} patches/s on {n_feat} real patches "
          f"(data loading {t_load:.0f} s)")


if __name__ == "__main__":
    main()
