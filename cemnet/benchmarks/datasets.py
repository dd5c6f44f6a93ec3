"""Benchmark data: loaders for published layouts, custom user data, split rules, label subsets.

Everything is loaded into memory as :class:`Sample` s (an image and an integer class mask of the
same shape, 2D slices or 3D volumes): benchmark datasets are small (tens of 512-1024 px slices or
a few 256^3 volumes), and in-memory arrays keep the fine-tuning loop free of I/O.

Mask convention: ``0`` = background, ``k`` = ``classes[k-1]``, :data:`IGNORE` = not scored and
no loss (instance benchmarks store instance ids instead, ``0`` = unlabelled/background).

Label gotchas handled here (see ../shared/data/README.md): masks are read **without** grey
conversion (a CDeep3M palette PNG with indices 0/1 would otherwise become palette colours), VNC
mitochondria are anti-aliased and thresholded at 128, ISBI labels are 255 = cell interior so the
membrane class is ``label == 0``, VNC stack2 is RGB and converted to grey, UroCell NIfTI dtypes
vary (int8..float64) and are cast.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cemnet.benchmarks.masks import IGNORE, MaskReport, MaskSemantics
from cemnet.benchmarks.registry import BenchmarkEntry, get_benchmark

__all__ = [
    "IGNORE", "Sample", "BenchmarkData", "LOADERS", "load_benchmark", "load_custom_2d", "load_custom_3d",
    "apply_split", "label_fraction", "read_image", "read_mask", "read_volume", "read_labelled_volume",
]

_IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclasses.dataclass
class Sample:
    """One image (uint8/float, 2D (H, W) or 3D (Z, Y, X)) and its integer mask of the same shape."""

    image: np.ndarray
    mask: np.ndarray
    name: str

    def __post_init__(self) -> None:
        if self.image.shape != self.mask.shape:
            raise ValueError(f"{self.name}: image {self.image.shape} and mask {self.mask.shape} differ in shape")


@dataclasses.dataclass
class BenchmarkData:
    """Train and test samples of one benchmark (after the split rule)."""

    name: str
    task: str
    classes: tuple[str, ...]
    train: list[Sample]
    test: list[Sample]
    voxel_size_nm: tuple[float, float, float] | None = None
    mask_report: MaskReport | None = None  # custom data: how mask values were read as classes

    @property
    def ndim(self) -> int:
        return self.train[0].image.ndim if self.train else self.test[0].image.ndim

    def summary(self) -> str:
        shapes = {s.image.shape for s in self.train + self.test}
        return (f"{self.name}: {self.task}, classes {list(self.classes)}, {len(self.train)} train / "
                f"{len(self.test)} test samples, shapes {sorted(shapes)}")


# --------------------------------------------------------------------------- low-level readers


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXTS and not p.name.startswith(".")), key=_natural_key)
    if not files:
        raise FileNotFoundError(f"{folder}: no image files ({', '.join(_IMAGE_EXTS)})")
    return files


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A 2D image as grey (RGB -> luma, via :func:`curation.readers.open_volume`)."""
    from curation.readers import open_volume

    with open_volume(path) as vol:
        arr = vol.read()
    if arr.shape[0] != 1:
        raise ValueError(f"{path}: expected a 2D image, got a volume of shape {arr.shape}")
    return arr[0]


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A 2D mask with its stored values: palette indices stay indices, mode '1' becomes 0/1."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        arr = np.asarray(tifffile.imread(path))
    else:
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im)  # no convert(): 'P' gives indices, '1' gives bool
    if arr.ndim == 3:  # RGB(A) mask: any non-zero channel counts
        arr = arr[..., :3].max(axis=-1)
    return arr


def read_volume(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """A whole (z, y, x) volume in any format :mod:`curation.readers` supports (raw values kept)."""
    from curation.readers import SourceSpec, open_volume

    p = Path(path)
    spec = SourceSpec(str(p), key=key, stack=p.is_dir() and not (p / "zarr.json").exists() and not (p / ".zarray").exists())
    with open_volume(spec) as vol:
        return vol.read()


def _read_mask_volume(path: Path, key: str | None = None) -> np.ndarray:
    if path.is_dir():  # a folder of mask slices: read raw values, not grey
        return np.stack([read_mask(f) for f in _files(path)])
    return read_volume(path, key=key)


def binarize(mask: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """0/1 uint8 from a 0/1, 0/255 or anti-aliased mask (``threshold`` default: half the max)."""
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if threshold is None:
        top = float(mask.max()) if mask.size else 1.0
        threshold = 0.5 if top <= 1 else top / 2
    return (mask >= threshold).astype(np.uint8)


def _stack_samples(images: np.ndarray, masks: np.ndarray, names: Sequence[str]) -> list[Sample]:
    return [Sample(images[i], masks[i].astype(np.int64), str(n)) for i, n in enumerate(names)]


# --------------------------------------------------------------------------- split rules


def apply_split(samples: list[Sample], rule: str | None) -> tuple[list[Sample], list[Sample]]:
    """Split a pool of samples into (train, test).

    Rules: ``z:F`` (first fraction ``F`` of 2D slices, in order, for training; 3D volumes are each
    cut along z at ``F``), ``test:a,b`` (samples named or indexed ``a``, ``b`` are the test set),
    ``volumes:a,b`` (alias of ``test:`` for volume benchmarks).
    """
    if not rule:
        rule = "z:0.8"
    kind, _, arg = rule.partition(":")
    if kind == "z":
        frac = float(arg)
        if not 0 < frac < 1:
            raise ValueError(f"split {rule!r}: fraction must be in (0, 1)")
        if all(s.image.ndim == 3 for s in samples):
            train, test = [], []
            for s in samples:
                k = int(round(frac * s.image.shape[0]))
                if not 0 < k < s.image.shape[0]:
                    raise ValueError(f"split {rule!r} leaves an empty part of {s.name} (z={s.image.shape[0]})")
                train.append(Sample(s.image[:k], s.mask[:k], f"{s.name}[:{k}]"))
                test.append(Sample(s.image[k:], s.mask[k:], f"{s.name}[{k}:]"))
            return train, test
        k = int(round(frac * len(samples)))
        if not 0 < k < len(samples):
            raise ValueError(f"split {rule!r} leaves an empty train or test set ({len(samples)} samples)")
        return samples[:k], samples[k:]
    if kind in ("test", "volumes"):
        wanted = [w.strip() for w in arg.split(",") if w.strip()]
        names = [s.name for s in samples]
        test_idx = set()
        for w in wanted:
            if w in names:
                test_idx.add(names.index(w))
            elif w.isdigit() and int(w) < len(samples):
                test_idx.add(int(w))
            else:
                raise ValueError(f"split {rule!r}: no sample named or indexed {w!r} (have {names[:8]}...)")
        test = [s for i, s in enumerate(samples) if i in test_idx]
        train = [s for i, s in enumerate(samples) if i not in test_idx]
        if not train or not test:
            raise ValueError(f"split {rule!r} leaves an empty train or test set")
        return train, test
    raise ValueError(f"unknown split rule {rule!r}; use z:F, test:a,b or volumes:a,b")


def label_fraction(samples: list[Sample], fraction: float, seed: int, min_side: int = 64) -> list[Sample]:
    """A random subset holding ``fraction`` of the labelled pixels (2D slices).

    Whole slices are taken in a seeded random order until the budget is reached; the last one is
    cut to a centred box of the remaining area (sides >= ``min_side``), so fractions below one
    slice (5% of 24 ISBI slices) still mean 5% of the labelled pixels. 3D samples are first cut
    into xy slices.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    slices = [Sample(s.image[z], s.mask[z], f"{s.name}/z{z}") for s in samples for z in range(s.image.shape[0])] \
        if samples and samples[0].image.ndim == 3 else list(samples)
    if fraction >= 1:
        return slices
    total = sum(s.mask.size for s in slices)
    budget = fraction * total
    order = np.random.default_rng(seed).permutation(len(slices))
    out: list[Sample] = []
    for i in order:
        s = slices[int(i)]
        if budget >= s.mask.size:
            out.append(s)
            budget -= s.mask.size
            continue
        if budget > 0:
            h, w = s.mask.shape
            scale = float(np.sqrt(budget / s.mask.size))
            bh, bw = max(min(h, min_side), int(h * scale)), max(min(w, min_side), int(w * scale))
            rng = np.random.default_rng(seed + 1000 + int(i))
            y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            out.append(Sample(s.image[y0:y0 + bh, x0:x0 + bw], s.mask[y0:y0 + bh, x0:x0 + bw], f"{s.name}[box]"))
        break
    return out


# --------------------------------------------------------------------------- published layouts


def load_isbi2012(root: Path, **_: Any) -> list[Sample]:
    """ISBI 2012: 30 labelled train slices. Target class 1 = membrane (label value 0)."""
    imgs = _files(root / "train" / "images")
    labs = _files(root / "train" / "labels")
    return [Sample(read_image(i), (read_mask(l) == 0).astype(np.int64), i.stem) for i, l in zip(imgs, labs, strict=True)]


def load_cdeep3m(root: Path, **_: Any) -> dict[str, list[Sample]]:
    """CDeep3M mito_testsample: training/ and validation/ (palette PNG labels 0/1)."""
    out: dict[str, list[Sample]] = {}
    for part in ("training", "validation"):
        imgs, labs = _files(root / part / "images"), _files(root / part / "labels")
        out[part] = [Sample(read_image(i), binarize(read_mask(l), 0.5).astype(np.int64), i.stem)
                     for i, l in zip(imgs, labs, strict=True)]
    return out


_VNC_TARGETS = ("membranes", "mitochondria", "synapses")


def load_vnc(root: Path, target: str = "mitochondria", **_: Any) -> list[Sample]:
    """Drosophila VNC stack1 (20 labelled sections). ``target`` one of membranes, mitochondria,
    synapses (binary) or ``all`` (class map 1 membrane, 2 mitochondria, 3 synapse; later wins)."""
    targets = _VNC_TARGETS if target == "all" else (target,)
    if any(t not in _VNC_TARGETS for t in targets):
        raise ValueError(f"VNC target must be one of {_VNC_TARGETS} or 'all', got {target!r}")
    raws = _files(root / "stack1" / "raw")
    masks = np.zeros((len(raws), *read_image(raws[0]).shape), np.int64)
    for k, t in enumerate(targets, start=1):
        for z, f in enumerate(_files(root / "stack1" / t)):
            # mitochondria are anti-aliased 8-bit: threshold at 128; membranes/synapses are 1-bit
            m = binarize(read_mask(f), 128 if t == "mitochondria" else None)
            masks[z][m > 0] = k
    return [Sample(read_image(r), masks[z], r.stem) for z, r in enumerate(raws)]


def load_vnc_unlabelled(root: Path) -> np.ndarray:
    """VNC stack2 (20 unlabelled sections, stored RGB with R=G=B) as a grey (z, y, x) volume."""
    return np.stack([read_image(f) for f in _files(root / "stack2" / "raw")])


_UROCELL_CLASSES = {"lysosome": "lyso", "mitochondria": "mito", "fusiform_vesicle": "fv", "golgi": "golgi"}


def load_urocell_labels(root: Path, classes: Sequence[str] = ("lysosome", "mitochondria")) -> dict[str, np.ndarray]:
    """UroCell class maps per volume name (``fib1-X-Y-Z``), built from ``<class>/binary``
    (golgi: ``golgi/precise/binary``); only volumes that have every requested class."""
    per_class: list[dict[str, Path]] = []
    for c in classes:
        sub = _UROCELL_CLASSES[c]
        folder = root / sub / ("precise/binary" if sub == "golgi" else "binary")
        per_class.append({p.name.split(".")[0]: p for p in sorted(folder.glob("*.nii.gz"))})
    names = sorted(set.intersection(*(set(d) for d in per_class)))
    out = {}
    for n in names:
        vol = None
        for k, d in enumerate(per_class, start=1):
            m = read_volume(d[n])
            m = np.asarray(m).astype(np.float64) > 0.5  # dtypes differ per folder (int8..float64)
            vol = np.zeros(m.shape, np.int64) if vol is None else vol
            vol[m] = k
        out[n] = vol
    return out


def load_urocell(root: Path, classes: Sequence[str] = ("lysosome", "mitochondria"), **_: Any) -> list[Sample]:
    """UroCell: raw ``data/fib1-*.nii.gz`` + class maps. Raises if the raw volumes are absent
    (as in the labels-only shared copy)."""
    labels = load_urocell_labels(root, classes)
    out = []
    for name, lab in labels.items():
        raw = root / "data" / f"{name}.nii.gz"
        if not raw.is_file():
            raise FileNotFoundError(f"{raw}: UroCell raw volume missing (labels found); download the raw data")
        out.append(Sample(read_volume(raw), lab, name))
    return out


def load_in_out_folders(root: Path, **_: Any) -> dict[str, list[Sample]]:
    """Lucchi++ / Kasthuri++ layout: ``{Train,Test}_{In,Out}`` slice folders -> one 3D volume each."""
    out = {}
    for part in ("Train", "Test"):
        imgs = np.stack([read_image(f) for f in _files(root / f"{part}_In")])
        labs = np.stack([binarize(read_mask(f)) for f in _files(root / f"{part}_Out")]).astype(np.int64)
        out[part.lower()] = [Sample(imgs, labs, part.lower())]
    return out


def load_guay(root: Path, **_: Any) -> dict[str, list[Sample]]:
    """Guay et al. platelets: ``{train,eval,test}-{images,labels}.tif`` 3D TIFFs (label ids 0..6)."""
    out = {}
    for part in ("train", "eval", "test"):
        img = root / f"{part}-images.tif"
        if img.is_file():
            out[part] = [Sample(read_volume(img), read_volume(root / f"{part}-labels.tif").astype(np.int64), part)]
    return out


def load_images_masks(root: Path, **_: Any) -> dict[str, list[Sample]]:
    """``{train,test}/images`` + ``{train,test}/masks`` folders matched by name (Perez et al.)."""
    return {part: _pairs(root / part / "images", root / part / "masks") for part in ("train", "test") if (root / part).is_dir()}


_CREMI_NO_CLEFT = np.uint64(0xFFFFFFFFFFFFFFFF)


def load_cremi(root: Path, **_: Any) -> list[Sample]:
    """CREMI samples ``sample_*.hdf``: ``volumes/raw`` + ``volumes/labels/clefts`` (max uint64 =
    no cleft) -> binary cleft mask, one volume per sample."""
    import h5py

    out = []
    for f in sorted(root.glob("sample_*.hdf")) + sorted(root.glob("sample_*.h5")):
        with h5py.File(f, "r") as h:
            raw = h["volumes/raw"][...]
            clefts = h["volumes/labels/clefts"][...]
        out.append(Sample(raw, (clefts.astype(np.uint64) != _CREMI_NO_CLEFT).astype(np.int64), f.stem))
    if not out:
        raise FileNotFoundError(f"{root}: no sample_*.hdf files")
    return out


def _gunzip_h5(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    import h5py

    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / path.name.removesuffix(".gz")
        with gzip.open(path, "rb") as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out)
        with h5py.File(dst, "r") as h:
            return {k: h[k][...] for k in keys}


def load_neuroproof_gt(root: Path, sample: str = "training_sample2") -> np.ndarray:
    """NeuroProof dense neuron ids: supervoxels mapped through ``transforms`` (0 = unlabelled)."""
    d = _gunzip_h5(root / sample / "groundtruth.h5.gz", ("stack", "transforms"))
    stack, transforms = d["stack"], d["transforms"]
    lut = np.arange(int(max(stack.max(), transforms[:, 0].max())) + 1, dtype=np.int64)
    lut[transforms[:, 0]] = transforms[:, 1]
    return lut[stack]


def load_neuroproof(root: Path, sample: str = "training_sample2", **_: Any) -> list[Sample]:
    """NeuroProof 250^3 FIB-SEM with dense neuron ground truth (instance ids)."""
    raw = np.stack([read_image(f) for f in _files(root / sample / "grayscale_maps")])
    return [Sample(raw, load_neuroproof_gt(root, sample), sample)]


def load_gala(root: Path, **_: Any) -> dict[str, list[Sample]]:
    """gala crops: ``{train,test}-image.h5`` + ``{train,test}-gt.lzf.h5`` (key 'stack')."""
    return {part: [Sample(read_volume(root / f"{part}-image.h5", key="stack"),
                          read_volume(root / f"{part}-gt.lzf.h5", key="stack").astype(np.int64), part)]
            for part in ("train", "test")}


LOADERS: dict[str, Callable[..., list[Sample] | dict[str, list[Sample]]]] = {
    "isbi2012": load_isbi2012,
    "cdeep3m": load_cdeep3m,
    "vnc": load_vnc,
    "urocell": load_urocell,
    "in_out_folders": load_in_out_folders,
    "guay": load_guay,
    "images_masks": load_images_masks,
    "cremi": load_cremi,
    "neuroproof": load_neuroproof,
    "gala": load_gala,
}
# published split names -> which part is the test set, in order of preference
_TEST_PARTS = ("test", "validation", "eval")


def load_benchmark(name: str | BenchmarkEntry, data_dir: str | os.PathLike, split: str | None = None) -> BenchmarkData:
    """Load a registered benchmark from a local copy and apply its split rule.

    ``split`` overrides the entry's ``default_split``: a published part name (``test``,
    ``validation``) for loaders with published splits, else a rule of :func:`apply_split`.
    """
    entry = name if isinstance(name, BenchmarkEntry) else get_benchmark(name)
    root = entry.data_dir(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (--data-dir of {entry.name})")
    try:
        loaded = LOADERS[entry.loader](root, **entry.loader_kwargs)
    except (FileNotFoundError, StopIteration, OSError) as err:
        raise FileNotFoundError(f"{root}: not a copy of {entry.name} ({err}); 'cemnet benchmark info {entry.name}' "
                                "shows its layout and where to get it") from None
    if not loaded:
        raise FileNotFoundError(f"{root}: no {entry.name} data found; 'cemnet benchmark info {entry.name}' shows "
                                "its layout and where to get it")
    rule = split or entry.default_split
    if isinstance(loaded, dict):
        if rule in loaded:
            test_part = rule
        else:
            test_part = next((p for p in _TEST_PARTS if p in loaded), None)
        if rule and rule not in loaded and ":" in rule:  # a rule over the pooled parts
            train, test = apply_split([s for part in loaded.values() for s in part], rule)
        else:
            if test_part is None:
                raise ValueError(f"{entry.name}: no test part in {sorted(loaded)}")
            test = loaded[test_part]
            train = [s for p, part in loaded.items() if p != test_part and p not in ("eval",) for s in part]
    else:
        train, test = apply_split(loaded, rule)
    return BenchmarkData(entry.name, entry.task, entry.classes, train, test, entry.voxel_size_nm)


# --------------------------------------------------------------------------- custom data


_MASK_SUFFIXES = ("_mask", "_masks", "_label", "_labels", "_gt", "-mask", "-label", "-labels")


def _match_key(stem: str) -> str:
    for suf in _MASK_SUFFIXES:
        if stem.lower().endswith(suf):
            return stem[: -len(suf)]
    return stem


def _pairs(images_dir: Path, masks_dir: Path, semantics: MaskSemantics | None = None) -> list[Sample]:
    return _read_pairs(images_dir, masks_dir, semantics)[0]


def _read_pairs(images_dir: Path, masks_dir: Path, semantics: MaskSemantics | None = None) -> tuple[list[Sample], MaskReport]:
    """Images and masks matched by name (a mask may carry a ``_mask``/``_label`` suffix), the
    masks converted to classes by ``semantics`` (default: ``auto``)."""
    mask_files = _files(masks_dir)
    masks: dict[str, Path] = {}
    for p in mask_files:
        key = _match_key(p.stem)
        if key in masks:
            raise ValueError(f"{p}: two masks match the image name {key!r} ({masks[key].name} and {p.name})")
        masks[key] = p
    images = _files(images_dir)
    missing = [img for img in images if _match_key(img.stem) not in masks]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]}: no mask named {_match_key(missing[0].stem)}.* (or with a _mask/_label suffix) in "
            f"{masks_dir}" + (f" ({len(missing) - 1} more images without a mask)" if len(missing) > 1 else ""))
    pairs = [(img, masks[_match_key(img.stem)]) for img in images]
    raw = [read_mask(m) for _, m in pairs]
    imgs = [read_image(i) for i, _ in pairs]
    for (i, m), im, mk in zip(pairs, imgs, raw):
        if im.shape != mk.shape:
            raise ValueError(f"{m}: mask shape {mk.shape} differs from its image {i.name} {im.shape}")
    classes, report = (semantics or MaskSemantics()).apply(raw, [str(m) for _, m in pairs])
    return [Sample(im, c, i.stem) for (i, _), im, c in zip(pairs, imgs, classes)], report


def load_custom_2d(images_dir: str | os.PathLike, masks_dir: str | os.PathLike, split: str | None = "z:0.8",
                   classes: Sequence[str] | None = None, name: str = "custom",
                   semantics: MaskSemantics | None = None) -> BenchmarkData:
    """A custom 2D benchmark: images and masks matched by file name (a mask may carry a
    ``_mask``/``_label`` suffix); mask values become classes by ``semantics`` (default ``auto``,
    see :mod:`cemnet.benchmarks.masks`); ``classes`` names the classes when ``semantics`` does not."""
    semantics = semantics or MaskSemantics(classes=classes)
    samples, report = _read_pairs(Path(images_dir), Path(masks_dir), semantics)
    train, test = apply_split(samples, split)
    return BenchmarkData(name, "semantic2d", report.classes, train, test, mask_report=report)


def load_custom_3d(image: str | os.PathLike, labels: str | os.PathLike, split: str | None = "z:0.8",
                   classes: Sequence[str] | None = None, name: str = "custom", key: str | None = None,
                   label_key: str | None = None, instance: bool = False,
                   semantics: MaskSemantics | None = None) -> BenchmarkData:
    """A custom 3D benchmark: an image volume + a label volume in any format
    :mod:`curation.readers` supports (folder of slices, TIFF, HDF5, zarr, MRC, NIfTI, ...);
    semantic labels become classes by ``semantics`` (see :func:`load_custom_2d`)."""
    img, lab, report = read_labelled_volume(image, labels, key=key, label_key=label_key, instance=instance,
                                            semantics=semantics or MaskSemantics(classes=classes))
    train, test = apply_split([Sample(img, lab, Path(image).stem)], split)
    if instance:
        return BenchmarkData(name, "instance3d", ("object",), train, test)
    return BenchmarkData(name, "semantic3d", report.classes, train, test, mask_report=report)


def read_labelled_volume(image: str | os.PathLike, labels: str | os.PathLike, *, key: str | None = None,
                         label_key: str | None = None, instance: bool = False,
                         semantics: MaskSemantics | None = None) -> tuple[np.ndarray, np.ndarray, MaskReport | None]:
    """(image, classes or instance ids, mask report) of one labelled volume; shapes must agree."""
    img = read_volume(image, key=key)
    lab = _read_mask_volume(Path(labels), key=label_key)
    if img.shape != lab.shape:
        raise ValueError(f"{labels}: labels {lab.shape} and image {image} {img.shape} differ in shape")
    if instance:
        return img, lab.astype(np.int64), None
    (lab,), report = (semantics or MaskSemantics()).apply([lab], [str(labels)])
    return img, lab, report
