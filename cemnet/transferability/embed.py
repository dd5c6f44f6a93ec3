"""Patches in, feature vectors out: sampling patches from any EM data and embedding them.

Data (:func:`load_patch_sets`): a cemnet corpus (one :class:`PatchSet` per source dataset, or one
for the whole corpus), a CEM500K-style folder of TIFF patches, a folder of 2D images (each file
cut into a patch grid, provenance ``file/y/x``), or any single volume :mod:`curation.readers`
opens (xy planes cut into a grid, provenance ``plane/slice/y/x``). Only a bounded random sample
is ever read: at most ``max_planes`` planes per input and ``n`` patches kept, so a terabyte
volume costs the same as ISBI. Full-size patches are preferred over zero-padded edge patches,
because the padding itself would shift the feature distribution (and the MMD).

Encoders (:func:`build_encoder`): anything :func:`cemnet.load_encoder` accepts, loaded with
``num_classes=0`` (timm's global-average-pooled features) and ``in_chans=1`` (the first
convolution summed, which equals feeding a grey image replicated into RGB); or ``timm:ARCH`` for
a randomly initialised, seeded timm model (a baseline and for tests, not a pretrained encoder).

Normalisation: the encoder's recorded mean/std (its pretraining corpus statistics) when known,
else the data's own statistics, as ``docs/weights.md`` recommends.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cemnet.weights.load import load_encoder
from curation.corpus import Corpus, open_corpus
from curation.patching import extract_patches
from curation.readers import IMAGE_EXTS, FolderStack, open_volume, reader_for
from curation.to_uint8 import Uint8Converter, sample_volume

__all__ = [
    "PatchSet",
    "is_data_path",
    "load_patch_sets",
    "build_encoder",
    "build_features_encoder",
    "encoder_norm",
    "iter_batches",
    "embed_patches",
    "norm_for",
]

RANDOM_PREFIX = "timm:"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".tar", ".ckpt", ".bin")


# --------------------------------------------------------------------------- data


@dataclass
class PatchSet:
    """A sample of uint8 patches with their provenance.

    ``records[i]`` holds ``source``, ``file``, ``plane``, ``slice``, ``y``, ``x``, ``h``, ``w``
    (``file`` empty for corpus patches; ``plane``/``slice`` for images are ``xy`` and the page
    index). ``mean``/``std`` are the data's intensity statistics on the [0, 1] scale.
    """

    name: str
    patches: np.ndarray
    sizes: np.ndarray
    records: list[dict[str, Any]] = field(default_factory=list)
    mean: float = 0.5
    std: float = 0.25

    def __len__(self) -> int:
        return len(self.patches)

    def subset(self, idx: np.ndarray | Sequence[int]) -> PatchSet:
        idx = np.asarray(idx, dtype=np.int64)
        return PatchSet(self.name, self.patches[idx], self.sizes[idx], [self.records[i] for i in idx], self.mean, self.std)


def _choose(sizes: np.ndarray, patch_size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` random indices, full-size patches first (edge patches only to fill up)."""
    full = np.nonzero((sizes[:, 0] >= patch_size) & (sizes[:, 1] >= patch_size))[0]
    edge = np.setdiff1d(np.arange(len(sizes)), full)
    pick = rng.permutation(full)[:n]
    if len(pick) < n:
        pick = np.concatenate([pick, rng.permutation(edge)[: n - len(pick)]])
    return np.sort(pick)


def _stats(patches: np.ndarray, sizes: np.ndarray) -> tuple[float, float]:
    """Mean/std on [0, 1] over the true (unpadded) pixels."""
    vals = np.concatenate([p[:h, :w].ravel() for p, (h, w) in zip(patches, sizes)]).astype(np.float64) / 255.0
    return float(vals.mean()), float(max(vals.std(), 1e-3))


def is_corpus(path: Path) -> bool:
    return (path / "corpus.json").is_file() or (
        path.is_dir() and any("-LOC-" in p.name for p in path.rglob("*.tif*"))
    )


def is_data_path(spec: str) -> bool:
    """True for data (corpus, image folder, volume); False for encoder weights / names."""
    if spec.startswith(RANDOM_PREFIX):
        return False
    path = Path(spec)
    if not path.exists():
        return False  # a registry name
    if path.is_file():
        return not path.name.lower().endswith(_WEIGHT_SUFFIXES)
    # a run folder holds checkpoints, data folders hold images/arrays
    return not ((path / "checkpoints").is_dir() or any(path.glob("*.ckpt")))


def _from_corpus(path: Path, n: int, by_source: bool, rng: np.random.Generator) -> list[PatchSet]:
    corpus = open_corpus(path)
    p = corpus.patch_size
    sizes_all = corpus.sizes if isinstance(corpus, Corpus) else None
    groups = [(s, np.nonzero(corpus.source_index == i)[0]) for i, s in enumerate(corpus.sources)]
    if not by_source:
        groups = [(path.name, np.arange(len(corpus)))]
    out = []
    for name, members in groups:
        if len(members) == 0:
            continue
        if sizes_all is not None:
            pick = members[_choose(sizes_all[members], p, n, rng)]
        else:  # a TIFF folder: sizes are only known after reading, so sample uniformly
            pick = np.sort(rng.permutation(members)[:n])
        patches, sizes = corpus.get_padded(pick)
        records = []
        for i, (h, w) in zip(pick, sizes):
            if isinstance(corpus, Corpus):
                rec = {"source": corpus.sources[corpus.source_index[i]], "file": "", "plane": corpus.axes[i],
                       "slice": int(corpus.slices[i]), "y": int(corpus.ys[i]), "x": int(corpus.xs[i])}
            else:
                rec = {"source": corpus.sources[corpus.source_index[i]], "file": str(corpus.files[i]),
                       "plane": "xy", "slice": 0, "y": 0, "x": 0}
            records.append({**rec, "h": int(h), "w": int(w)})
        mean, std = _stats(patches, sizes)
        out.append(PatchSet(name, patches, np.asarray(sizes), records, mean, std))
    return out


def _display_name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _volume_inputs(path: Path) -> list[Path]:
    """The files to open: every 2D/3D image file of a folder, or the path itself."""
    if path.is_dir() and not path.name.endswith(".zarr") and reader_for(path) is FolderStack:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if files:
            return files
    return [path]


def _from_images(path: Path, n: int, patch_size: int, max_planes: int, rng: np.random.Generator) -> PatchSet:
    files = _volume_inputs(path)
    shown = [str(f) if f != path else "" for f in files]
    volumes = {}
    planes: list[tuple[int, int]] = []  # (file index, z)
    for fi, f in enumerate(files):
        vol = open_volume(f)
        volumes[fi] = vol
        planes += [(fi, z) for z in range(vol.shape[0])]
    try:
        chosen = sorted(rng.permutation(len(planes))[:max_planes].tolist())
        converters: dict[int, Any] = {}
        all_patches, all_sizes, records = [], [], []
        for ci in chosen:
            fi, z = planes[ci]
            vol = volumes[fi]
            if fi not in converters:  # one uint8 mapping per file, fitted like the curation does
                converters[fi] = Uint8Converter.fit(sample_volume(vol), vol.dtype, "auto")
            plane = converters[fi](vol.read(slice(z, z + 1))[0])
            patches, boxes = extract_patches(plane, patch_size)
            for patch, (y, x, h, w) in zip(patches, boxes):
                all_patches.append(patch)
                all_sizes.append((h, w))
                records.append({"source": _display_name(path), "file": shown[fi], "plane": "xy", "slice": z,
                                "y": int(y), "x": int(x), "h": int(h), "w": int(w)})
    finally:
        for vol in volumes.values():
            vol.close()
    if not all_patches:
        raise ValueError(f"{path}: no patch of {patch_size} px could be cut (images smaller than half a patch?)")
    sizes = np.asarray(all_sizes, dtype=np.int32)
    pick = _choose(sizes, patch_size, n, rng)
    patches = np.stack([all_patches[i] for i in pick])
    mean, std = _stats(patches, sizes[pick])
    # two path components: "images"/"raw" alone would not say which data set
    return PatchSet(_display_name(path), patches, sizes[pick], [records[i] for i in pick], mean, std)


def load_patch_sets(
    path: str | Path,
    *,
    n: int = 256,
    patch_size: int = 224,
    by_source: bool = False,
    max_planes: int = 64,
    seed: int = 0,
) -> list[PatchSet]:
    """Sample up to ``n`` patches from ``path`` (per source dataset when ``by_source``).

    ``patch_size`` applies to images and volumes; a corpus keeps its own patch size.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    rng = np.random.default_rng(seed)
    if is_corpus(path):
        return _from_corpus(path, n, by_source, rng)
    return [_from_images(path, n, patch_size, max_planes, rng)]


# --------------------------------------------------------------------------- encoders


def _random_timm(arch: str, **kwargs: Any) -> nn.Module:
    import timm

    with torch.random.fork_rng():  # seeded, without disturbing the caller's RNG
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, in_chans=1, **kwargs)
    model.cemnet_random_init = True
    return model


def build_encoder(spec: str | nn.Module) -> nn.Module:
    """A pooled-feature encoder (``num_classes=0``, 1 input channel) in eval mode."""
    if isinstance(spec, nn.Module):
        return spec.eval()
    if spec.startswith(RANDOM_PREFIX):
        return _random_timm(spec[len(RANDOM_PREFIX):], num_classes=0).eval()
    return load_encoder(spec, in_chans=1, num_classes=0, progress=False).eval()


def build_features_encoder(spec: str) -> nn.Module:
    """The same encoder as timm ``features_only`` (for :class:`cemnet.models.unet.UNet`)."""
    if spec.startswith(RANDOM_PREFIX):
        return _random_timm(spec[len(RANDOM_PREFIX):], features_only=True)
    return load_encoder(spec, features_only=True, in_chans=1, progress=False)


def encoder_norm(model: nn.Module) -> tuple[float, float] | None:
    """The mean/std the encoder was pretrained with (grey, [0, 1] scale), or None if unknown.

    A random-init ``timm:`` model has timm's ImageNet defaults in ``pretrained_cfg``, which say
    nothing about EM, so it reports None (use the data's statistics).
    """
    meta = getattr(model, "cemnet_meta", None)
    if meta is None or getattr(model, "cemnet_random_init", False) or not meta.mean or not meta.std:
        return None
    return float(np.mean(meta.mean)), float(np.mean(meta.std))


def iter_batches(
    patches: np.ndarray,
    mean: float,
    std: float,
    *,
    batch_size: int = 64,
    input_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Normalised float (B, 1, S, S) batches of uint8 (n, P, P) patches, resized to ``input_size``.

    Resizing uses area interpolation (an average, no aliasing) when shrinking; a smaller input
    is how embeddings stay affordable on CPU.
    """
    for i in range(0, len(patches), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(patches[i : i + batch_size])).float().div_(255.0)[:, None]
        if input_size is not None and x.shape[-1] != input_size:
            mode = "area" if input_size < x.shape[-1] else "bilinear"
            x = F.interpolate(x, size=(input_size, input_size), mode=mode)
        yield (x - mean) / std


@torch.no_grad()
def embed_patches(
    model: nn.Module,
    patches: np.ndarray,
    *,
    mean: float,
    std: float,
    batch_size: int = 64,
    input_size: int | None = None,
) -> np.ndarray:
    """Global-average-pooled features (n, D) float32 of uint8 patches (n, P, P)."""
    model.eval()
    feats = []
    for x in iter_batches(patches, mean, std, batch_size=batch_size, input_size=input_size):
        f = model(x)
        if f.ndim > 2:  # a model without a pooling head: average over space ourselves
            f = f.flatten(2).mean(2)
        feats.append(f.float().cpu().numpy())
    if not feats:
        return np.zeros((0, 0), dtype=np.float32)
    out = np.concatenate(feats)
    if not np.all(np.isfinite(out)):
        warnings.warn("non-finite features from the encoder (bad normalisation?)", stacklevel=2)
    return out


def norm_for(model: nn.Module, data: PatchSet) -> tuple[float, float, str]:
    """(mean, std, where from): the encoder's statistics if recorded, else ``data``'s.

    Callers comparing several data sets pass the *target* here and use the result for every
    set: one fixed transform keeps intensity differences between domains visible to the MMD
    (normalising each set by its own statistics would hide them).
    """
    norm = encoder_norm(model)
    if norm is not None:
        return norm[0], norm[1], "encoder"
    return data.mean, data.std, "data"
