"""Neuron instance segmentation (SegNeuron-style): affinities -> watershed -> agglomeration.

* Targets: nearest-neighbour affinities along (z, y, x) - ``aff[d, p] = 1`` when voxel ``p`` and
  its predecessor ``p - e_d`` carry the same non-zero id (waterz's convention) - plus a
  foreground channel (``id > 0``).
* Model: :class:`cemnet.models.unet.UNet` with 4 outputs (3 affinities + foreground), in one of
  two modes (:attr:`InstanceConfig.mode`):

  - ``"3d"``: a 3D encoder (``cemnet3d_*`` from :mod:`cemnet.models.encoder3d`, random or
    pretrained via ``cemnet.load_encoder``) on the whole crop.
  - ``"2d"`` (2.5D): a 2D encoder (timm, random or pretrained via ``cemnet.load_encoder``) applied
    per z-slice to the **pair** (slice z-1, slice z) stacked as 2 channels (:func:`slice_pairs`);
    it predicts the 4 channels of slice z: the z affinity (z to z-1, which needs both slices),
    the y and x affinities and the foreground. A pretrained 1-channel first convolution is
    adapted to 2 channels like timm's ``adapt_input_conv`` (``load_encoder(in_chans=2)``: the
    kernel repeated and scaled by 1/2, so a constant pair gives the pretrained response). Slice 0
    has no predecessor: it is paired with itself and its z affinity is set to 0, the convention
    of :func:`affinities_from_labels`. The output has the 3D layout, so the same watershed,
    agglomeration and scores apply.
* Post-processing: affinities are multiplied by the predicted foreground (so no affinity links
  across background), a seeded watershed (scikit-image) on ``1 - mean affinity`` gives an
  over-segmentation, and :func:`agglomerate` merges fragments greedily by **mean boundary
  affinity** on the region adjacency graph (union-find; the score of a merged edge is the mean of
  all its voxel-pair affinities, as in waterz's ``MeanAffinity``). Every merge is recorded once,
  so any set of thresholds is replayed from one run.
* Scores: VI split/merge and adapted Rand (:mod:`cemnet.benchmarks.metrics`; ground-truth id 0 is
  ignored, the prediction's 0 is a segment), with an optional CREMI border mask.
* Domain mixing for fine-tuning on a new target volume: :func:`amplitude_mix` (FDA-style swap of
  the low-frequency amplitude spectrum; SegNeuron's ``L = 0.001`` on 128 px slices gives a window
  half-width ``floor(0.001 * 128) = 0``, i.e. only the DC term - the mean intensity - is swapped)
  and :func:`cutmix` (a target sub-volume pasted into the source crop, its labels ignored).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cemnet.benchmarks.datasets import IGNORE, Sample
from cemnet.benchmarks.metrics import adapted_rand, border_mask, variation_of_information

__all__ = [
    "affinities_from_labels", "watershed_fragments", "region_graph", "agglomerate", "instance_scores",
    "amplitude_mix", "cutmix", "InstanceConfig", "build_instance_model", "train_affinities",
    "predict_affinities", "segment", "affinity_loss_mask", "AffinityCrops", "masked_bce", "threshold_sweep", "evaluate_affinities", "slice_pairs", "DEFAULT_ARCH",
]

log = logging.getLogger(__name__)
OFFSETS = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
# random-init architecture per mode when the encoder is plain "random" (small: CPU benchmarks)
DEFAULT_ARCH = {"3d": "cemnet3d_res_tiny", "2d": "resnet18"}


# --------------------------------------------------------------------------- targets


def affinities_from_labels(labels: np.ndarray) -> np.ndarray:
    """(3, Z, Y, X) float32 nearest-neighbour affinities; the first plane along each axis is 0."""
    affs = np.zeros((3, *labels.shape), np.float32)
    for d in range(3):
        cur = [slice(None)] * 3
        prev = [slice(None)] * 3
        cur[d], prev[d] = slice(1, None), slice(None, -1)
        a, b = labels[tuple(cur)], labels[tuple(prev)]
        affs[(d, *cur)] = (a == b) & (a != 0)
    return affs


# --------------------------------------------------------------------------- post-processing


def watershed_fragments(affs: np.ndarray, foreground: np.ndarray | None = None, fg_threshold: float = 0.5,
                        min_distance: int = 3, boundary_threshold: float = 0.5) -> np.ndarray:
    """Over-segmentation, per xy slice (vEM is often anisotropic): seeds are the connected
    components of the in-plane affinity graph at ``boundary_threshold``, split at the maxima of
    the distance to boundaries where a component has an interior; then a watershed of
    ``1 - mean affinity`` inside the foreground (fragments never cross z; agglomeration joins
    them through the z affinities)."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    # fragments are per xy slice, so only the in-plane (y, x) affinities shape them; the z
    # affinity of the first slice is 0 by construction and would leave it without seeds
    # Node-based boundary map from the edge-based affinities: each voxel takes the lowest of its
    # four in-plane affinities (to y-1, y+1, x-1, x+1). Dense labels without gaps mark a boundary
    # on one voxel only (aff[d, p] links p to p - e_d); the two-sided minimum makes the band two
    # voxels wide, one per side, so each side is flooded from its own seed.
    two_sided = []
    for d in (1, 2):
        nxt = np.ones_like(affs[d])
        sl_dst = [slice(None)] * 3
        sl_src = [slice(None)] * 3
        sl_dst[d], sl_src[d] = slice(None, -1), slice(1, None)
        nxt[tuple(sl_dst)] = affs[d][tuple(sl_src)]
        two_sided.append(np.minimum(affs[d], nxt))
    # the first row/column has no predecessor (affinity 0 by construction): use the successor
    for d, ts in zip((1, 2), two_sided):
        first = [slice(None)] * 3
        first[d] = 0
        second = [slice(None)] * 3
        second[d] = 1
        ts[tuple(first)] = affs[d][tuple(second)]
    planar = np.stack(two_sided)
    mean_aff = planar.mean(axis=0)
    fg = np.ones(mean_aff.shape, bool) if foreground is None else foreground >= fg_threshold
    inside = (planar.min(axis=0) > boundary_threshold) & fg
    markers = np.zeros(mean_aff.shape, np.int64)
    next_id = 1
    for z in range(mean_aff.shape[0]):
        # Seeds: connected components of the in-plane affinity graph (voxels joined by an edge
        # above the threshold), each split at its distance-transform maxima when it is wide
        # enough to have an interior. Edge-based components give a neurite only 1-2 voxels wide,
        # which has no interior once both sides of its boundaries are cut away, its own seed
        # instead of being flooded from a neighbour (that merged bodies even with perfect affinities).
        comps = _affinity_components(affs[1, z], affs[2, z], fg[z], boundary_threshold)
        dist = ndimage.distance_transform_edt(inside[z])
        peaks = peak_local_max(dist, min_distance=min_distance, labels=inside[z].astype(np.int32), exclude_border=False)
        split = np.zeros(comps.shape, np.int64)
        for k, (y, x) in enumerate(peaks, start=1):
            split[y, x] = k
        if len(peaks):  # interior peaks flood their own component only
            split = watershed(-dist, split, mask=inside[z]) * (comps > 0)
        # one marker per (component, peak region); components without a peak keep one marker
        key = comps.astype(np.int64) * (len(peaks) + 1) + split
        _, relabel = np.unique(key, return_inverse=True)
        relabel = relabel.reshape(comps.shape)
        relabel[comps == 0] = 0
        markers[z] = np.where(relabel > 0, relabel + next_id - 1, 0)
        next_id += int(relabel.max())
    frags = np.zeros(mean_aff.shape, np.int64)
    for z in range(mean_aff.shape[0]):  # per slice: fragments never cross z; agglomeration links them
        if markers[z].any():
            frags[z] = watershed(1.0 - mean_aff[z], markers[z], mask=fg[z])
    return frags


def _affinity_components(aff_y: np.ndarray, aff_x: np.ndarray, mask: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of one slice's voxels inside ``mask``, joined where the edge
    affinity to the previous row (``aff_y``) or column (``aff_x``) exceeds ``threshold``.
    Labels 1..n, 0 outside ``mask``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    h, w = mask.shape
    idx = np.arange(h * w).reshape(h, w)
    src, dst = [], []
    link_y = (aff_y[1:, :] > threshold) & mask[1:, :] & mask[:-1, :]
    src.append(idx[1:, :][link_y]); dst.append(idx[:-1, :][link_y])
    link_x = (aff_x[:, 1:] > threshold) & mask[:, 1:] & mask[:, :-1]
    src.append(idx[:, 1:][link_x]); dst.append(idx[:, :-1][link_x])
    src, dst = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(h * w, h * w))
    _, labels = connected_components(graph, directed=False)
    labels = labels.reshape(h, w) + 1
    labels[~mask] = 0
    # compact to 1..n (a leading 0 keeps "outside" at 0 even when the mask covers everything)
    return np.unique(np.concatenate(([0], labels.ravel())), return_inverse=True)[1][1:].reshape(h, w)


def region_graph(fragments: np.ndarray, affs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges ``(u, v)`` (u < v, both non-zero) between touching fragments, with the sum and count
    of the affinities of the voxel pairs across their boundary."""
    us, vs, ws = [], [], []
    for d in range(3):
        cur = [slice(None)] * 3
        prev = [slice(None)] * 3
        cur[d], prev[d] = slice(1, None), slice(None, -1)
        a, b = fragments[tuple(cur)].ravel(), fragments[tuple(prev)].ravel()
        w = affs[(d, *cur)].ravel()
        keep = (a != b) & (a != 0) & (b != 0)
        us.append(np.minimum(a[keep], b[keep])), vs.append(np.maximum(a[keep], b[keep])), ws.append(w[keep])
    u, v, w = np.concatenate(us), np.concatenate(vs), np.concatenate(ws).astype(np.float64)
    if u.size == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0), np.zeros(0)
    key = u * (int(fragments.max()) + 1) + v
    uniq, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv, weights=w)
    counts = np.bincount(inv).astype(np.float64)
    edges = np.stack([uniq // (int(fragments.max()) + 1), uniq % (int(fragments.max()) + 1)], 1)
    return edges, sums, counts


def _merge_history(edges: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> list[tuple[float, int, int]]:
    """Greedy mean-affinity agglomeration; returns the merges ``(score, a, b)`` in order.

    Scores never increase along the history (a merged edge's mean lies between its parts' means,
    both at most the merged score), so "all merges with score >= t" is the result at threshold t.
    """
    adj: dict[int, dict[int, list[float]]] = {}
    for (a, b), s, c in zip(edges.tolist(), sums.tolist(), counts.tolist()):
        adj.setdefault(a, {})[b] = [s, c]
        adj.setdefault(b, {})[a] = [s, c]
    heap = [(-s / c, a, b) for (a, b), s, c in zip(edges.tolist(), sums.tolist(), counts.tolist())]
    heapq.heapify(heap)
    alive = set(adj)
    merges = []
    while heap:
        neg, a, b = heapq.heappop(heap)
        if a not in alive or b not in alive or b not in adj[a]:
            continue
        s, c = adj[a][b]
        if not math.isclose(-neg, s / c):  # stale entry: the edge changed since it was pushed
            continue
        merges.append((-neg, a, b))
        # merge the smaller adjacency into the larger; the survivor keeps its id
        if len(adj[a]) < len(adj[b]):
            a, b = b, a
        alive.discard(b)
        del adj[a][b]
        for n, (sn, cn) in adj.pop(b).items():
            if n == a:
                continue
            del adj[n][b]
            if n in adj[a]:
                adj[a][n][0] += sn
                adj[a][n][1] += cn
            else:
                adj[a][n] = [sn, cn]
            adj[n][a] = adj[a][n]  # shared list: both directions see later updates
            heapq.heappush(heap, (-adj[a][n][0] / adj[a][n][1], min(a, n), max(a, n)))
    return merges


AGGLOMERATION = ("mean", "waterz")


def agglomerate(fragments: np.ndarray, affs: np.ndarray, thresholds: Sequence[float],
                backend: str = "mean") -> list[np.ndarray]:
    """Segmentations at each affinity threshold (merge while the best mean affinity >= t).

    ``backend="mean"`` is our greedy union-find over the region graph; ``"waterz"`` runs the same
    rule (``OneMinus<MeanAffinity>``, score threshold ``1 - t``) in waterz's C++ implementation
    (Funke et al.), the established library, which compiles its kernel on first use.
    """
    if backend == "waterz":
        return _agglomerate_waterz(fragments, affs, thresholds)
    if backend != "mean":
        raise ValueError(f"unknown agglomeration backend {backend!r}; choose from {', '.join(AGGLOMERATION)}")
    edges, sums, counts = region_graph(fragments, affs)
    history = _merge_history(edges, sums, counts)
    out = []
    n = int(fragments.max()) + 1
    for t in thresholds:
        parent = np.arange(n)

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = int(parent[x])
            return x
        for score, a, b in history:
            if score < t:
                break
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[rb] = ra
        lut = np.array([find(i) for i in range(n)])
        out.append(lut[fragments])
    return out


def _agglomerate_waterz(fragments: np.ndarray, affs: np.ndarray, thresholds: Sequence[float]) -> list[np.ndarray]:
    try:
        import waterz
    except ImportError as err:
        raise RuntimeError("agglomeration backend 'waterz' needs `pip install waterz` (and a C++ compiler: "
                           "it compiles its kernel on first use)") from err
    # waterz merges while 1 - mean affinity < threshold and needs increasing thresholds
    order = np.argsort([1.0 - t for t in thresholds], kind="stable")
    scores = [1.0 - float(thresholds[i]) for i in order]
    segs = [seg.astype(np.int64) for seg in waterz.agglomerate(
        np.ascontiguousarray(affs, dtype=np.float32), scores, fragments=np.ascontiguousarray(fragments, dtype=np.uint64),
        aff_threshold_low=0.0, aff_threshold_high=1.0)]  # copies: waterz reuses one array
    out: list[np.ndarray] = [np.empty(0)] * len(thresholds)
    for i, seg in zip(order, segs):
        out[i] = seg
    return out


def instance_scores(pred: np.ndarray, gt: np.ndarray, *, ignore_labels: Sequence[int] = (0,),
                    border_nm: float | None = None, voxel_size_nm: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """VI split/merge (bits) and adapted Rand error of an instance segmentation.

    Ignored: ground-truth ids in ``ignore_labels`` and, with ``border_nm``, voxels within that
    distance (xy) of a ground-truth boundary (CREMI uses 25 nm)."""
    mask = border_mask(gt, border_nm, voxel_size_nm) if border_nm else None
    split, merge = variation_of_information(gt, pred, ignore_labels, mask=mask)
    are, precision, recall = adapted_rand(gt, pred, ignore_labels, mask=mask)
    return {"voi_split": split, "voi_merge": merge, "voi": split + merge, "arand": are,
            "rand_precision": precision, "rand_recall": recall}


def threshold_sweep(fragments: np.ndarray, affs: np.ndarray, gt: np.ndarray, thresholds: Sequence[float],
                    backend: str = "mean", **score_kwargs: Any) -> list[dict[str, float]]:
    """Scores of the agglomeration at every threshold (plus the fragments themselves as 1.0+)."""
    rows = []
    for t, seg in zip(thresholds, agglomerate(fragments, affs, thresholds, backend)):
        rows.append({"threshold": float(t), "segments": int(len(np.unique(seg)) - (seg == 0).any()), **instance_scores(seg, gt, **score_kwargs)})
    return rows


# --------------------------------------------------------------------------- domain mixing


def amplitude_mix(source: np.ndarray, target: np.ndarray, L: float = 0.001, lam: float = 1.0) -> np.ndarray:
    """Give ``source`` the low-frequency amplitude spectrum of ``target`` (per 2D slice; FDA).

    The window is centred on the DC term with half-width ``floor(L * min(H, W))``; ``lam``
    blends (1 = full swap). Phase (structure) stays the source's. With SegNeuron's ``L=0.001``
    on 128 px slices the half-width is 0: only the DC term (the mean intensity) is exchanged.
    """
    src = source.astype(np.float64)
    tgt = target.astype(np.float64)
    squeeze = src.ndim == 2
    src, tgt = (src[None], tgt[None]) if squeeze else (src, tgt)
    out = np.empty_like(src)
    for z in range(src.shape[0]):
        fs, ft = np.fft.fftshift(np.fft.fft2(src[z])), np.fft.fftshift(np.fft.fft2(tgt[z % tgt.shape[0]]))
        amp_s, pha_s, amp_t = np.abs(fs), np.angle(fs), np.abs(ft)
        h, w = src.shape[-2:]
        b = int(math.floor(min(h, w) * L))
        cy, cx = h // 2, w // 2
        win = (slice(cy - b, cy + b + 1), slice(cx - b, cx + b + 1))
        amp_s[win] = (1 - lam) * amp_s[win] + lam * amp_t[win]
        out[z] = np.real(np.fft.ifft2(np.fft.ifftshift(amp_s * np.exp(1j * pha_s))))
    return out[0] if squeeze else out


def cutmix(source: np.ndarray, labels: np.ndarray, target: np.ndarray, rng: np.random.Generator,
           fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Paste a random sub-volume of ``target`` (same shape) into ``source``; its labels become
    IGNORE (the target is unlabelled). The box has ``fraction`` of each side."""
    img, lab = source.copy(), labels.copy()
    box = []
    for n in source.shape:
        s = max(1, int(round(n * fraction)))
        o = int(rng.integers(0, n - s + 1))
        box.append(slice(o, o + s))
    img[tuple(box)] = target[tuple(box)]
    lab[(Ellipsis, *box)] = IGNORE
    return img, lab


# --------------------------------------------------------------------------- model + training


@dataclasses.dataclass
class InstanceConfig:
    """Affinity training settings (small CPU defaults; SegNeuron uses 20x128x128 crops).

    ``mode="2d"`` trains on slice pairs: only ``crop[1:]`` is used (the z extent is always 2)."""

    encoder: str = "random"  # "random" (DEFAULT_ARCH[mode]), "random:ARCH", or a load_encoder source
    mode: str = "3d"  # "3d": 3D encoder on crops; "2d": 2D encoder on (z-1, z) slice pairs (2.5D)
    iterations: int = 200
    batch_size: int = 2
    crop: tuple[int, int, int] = (16, 64, 64)
    max_lr: float = 3e-3
    weight_decay: float = 0.1
    encoder_lr_scale: float = 1.0  # encoder levers, as in benchmarks.train.FinetuneConfig
    layer_decay: float = 1.0
    freeze_encoder_iterations: int = 0
    base_width: int = 32
    seed: int = 0
    mix: str = "none"  # "none" | "amplitude" | "cutmix" | "both": domain mixing with `target`
    mix_L: float = 0.001
    mix_prob: float = 0.5
    device: str = "cpu"


def build_instance_model(cfg: InstanceConfig) -> nn.Module:
    """UNet with 4 outputs (3 affinities + foreground): a 3D encoder on 1 channel (``mode="3d"``)
    or a 2D encoder on 2 channels, the slice pair (``mode="2d"``)."""
    from cemnet.models.unet import UNet
    from cemnet.weights.load import load_unet

    if cfg.mode not in DEFAULT_ARCH:
        raise ValueError(f"InstanceConfig.mode={cfg.mode!r}: expected one of {sorted(DEFAULT_ARCH)}")
    in_chans = 2 if cfg.mode == "2d" else 1
    if cfg.encoder.startswith("random"):
        arch = cfg.encoder.partition(":")[2] or DEFAULT_ARCH[cfg.mode]
        if cfg.mode == "2d":
            import timm

            encoder = timm.create_model(arch, pretrained=False, features_only=True, in_chans=in_chans)
        else:
            from cemnet.models.encoder3d import build_encoder3d

            encoder = build_encoder3d(arch, in_chans, features_only=True)
        return UNet(encoder, 4, base_width=cfg.base_width)
    # load_encoder adapts a pretrained 1-channel first conv to in_chans (timm's adapt_input_conv)
    model = load_unet(cfg.encoder, 4, in_chans=in_chans, base_width=cfg.base_width)
    if model.spatial_dims != (2 if cfg.mode == "2d" else 3):
        raise ValueError(f"encoder {cfg.encoder!r} is {model.spatial_dims}D but mode={cfg.mode!r}")
    return model


def slice_pairs(volume: np.ndarray) -> np.ndarray:
    """(Z, 2, Y, X) inputs of the 2D mode: channel 0 is slice z-1, channel 1 slice z; slice 0 is
    paired with itself (its z affinity is defined as 0, see :func:`predict_affinities`)."""
    prev = np.concatenate([volume[:1], volume[:-1]])
    return np.stack([prev, volume], axis=1)


def _as_slice_pairs(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batches of 2-slice crops -> the 2D mode's tensors. ``x`` (B, 1, 2, Y, X) becomes
    (B, 2, Y, X) (z as channels, in :func:`slice_pairs`' order), the targets ``y`` and mask ``m``
    (B, 4, 2, Y, X) keep the second slice: its z affinity links it to the first, exactly as in
    the whole volume."""
    return x[:, 0], y[:, :, 1], m[:, :, 1]


def _crop(vol: np.ndarray, lab: np.ndarray, size: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    sl = tuple(slice(o, o + s) for o, s in ((int(rng.integers(0, n - s + 1)), s) for n, s in zip(vol.shape, size)))
    img, l = vol[sl], lab[sl]
    k = int(rng.integers(4))  # rot90/flips in yx only: z is anisotropic
    img, l = np.rot90(img, k, axes=(1, 2)), np.rot90(l, k, axes=(1, 2))
    if rng.random() < 0.5:
        img, l = img[:, :, ::-1], l[:, :, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(l)


def affinity_loss_mask(valid: np.ndarray) -> np.ndarray:
    """(4, ...) loss mask of the affinity + foreground targets of a crop whose labelled voxels are
    ``valid``: an affinity counts only when both voxels it links are labelled and inside the crop.

    ``aff[d, p]`` links ``p`` to ``p - e_d``: on the first plane along ``d`` that predecessor lies
    outside the crop (its target is unknown, not 0), and next to a CutMix box it lies in the
    pasted, unlabelled region. The foreground channel counts where ``valid``."""
    mask = np.zeros((4, *valid.shape), bool)
    for d in range(3):
        cur = [slice(None)] * 3
        prev = [slice(None)] * 3
        cur[d], prev[d] = slice(1, None), slice(None, -1)
        mask[(d, *cur)] = valid[tuple(cur)] & valid[tuple(prev)]
    mask[3] = valid
    return mask


class AffinityCrops:
    """Training batches of the affinity path: random crops (yx rot90/flips), optional domain
    mixing with an unlabelled ``target`` volume, affinity + foreground targets and their loss
    mask (:func:`affinity_loss_mask`); the 2D mode's crops become slice pairs."""

    def __init__(self, train: Sequence[Sample], cfg: InstanceConfig, norm: tuple[float, float],
                 target: np.ndarray | None = None) -> None:
        self.train, self.cfg, self.norm, self.target = list(train), cfg, norm, target
        self.rng = np.random.default_rng(cfg.seed)
        # 2D mode: crops are slice pairs, converted to 2-channel images after the shared crop,
        # augmentation, mixing and target code below
        self.crop = (2, *cfg.crop[1:]) if cfg.mode == "2d" else tuple(cfg.crop)

    def one(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg, rng, crop, target = self.cfg, self.rng, self.crop, self.target
        s = self.train[int(rng.integers(len(self.train)))]
        img, lab = _crop(s.image, s.mask, crop, rng)
        img = img.astype(np.float64)
        if target is not None and cfg.mix in ("amplitude", "both") and rng.random() < cfg.mix_prob:
            timg, _ = _crop(target, np.zeros(target.shape, np.int64), crop, rng)
            img = np.clip(amplitude_mix(img, timg, cfg.mix_L), 0, 255)
        valid = lab != IGNORE
        if target is not None and cfg.mix in ("cutmix", "both") and rng.random() < cfg.mix_prob:
            timg, _ = _crop(target, np.zeros(target.shape, np.int64), crop, rng)
            img, lab = cutmix(img, lab, timg.astype(np.float64), rng)
            valid = lab != IGNORE
        lab = np.where(valid, lab, 0)
        aff = affinities_from_labels(lab)
        y = np.concatenate([aff, (lab > 0)[None].astype(np.float32)])
        return (img / 255.0 - self.norm[0]) / self.norm[1], y, affinity_loss_mask(valid)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys, ms = zip(*(self.one() for _ in range(self.cfg.batch_size)))
        x = torch.from_numpy(np.stack(xs).astype(np.float32))[:, None]
        y = torch.from_numpy(np.stack(ys))
        m = torch.from_numpy(np.stack(ms).astype(np.float32))
        if self.cfg.mode == "2d":
            x, y, m = _as_slice_pairs(x, y, m)
        return x, y, m


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the voxels where ``mask`` is 1 (the affinity loss)."""
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * mask).sum() / mask.sum().clamp(min=1)


def instance_norm(train: Sequence[Sample]) -> tuple[float, float]:
    """(mean, std) of the training volumes on the [0, 1] scale (the affinity path's normalisation)."""
    vals = np.concatenate([s.image.ravel()[::97] for s in train]).astype(np.float64) / 255
    return float(vals.mean()), float(max(vals.std(), 1e-3))


def train_affinities(train: Sequence[Sample], cfg: InstanceConfig, target: np.ndarray | None = None, *,
                     evaluate: Any = None, eval_at: Sequence[int] = (), on_result: Any = None,
                     callbacks: Sequence[Any] = (), logger: Any = False, progress: bool = False,
                     ckpt_path: str | None = None, root_dir: str | None = None, history: list | None = None,
                     setup: Any = None) -> tuple[nn.Module, tuple[float, float]]:
    """Train the affinity + foreground model on labelled volumes; with ``target`` (an unlabelled
    volume of the new domain) and ``cfg.mix``, crops are domain-mixed as in SegNeuron.

    ``cfg.mode`` picks the 3D U-Net or the 2D slice-pair one (see the module docstring); both
    share the sampling, augmentation, mixing and loss code (:class:`AffinityCrops`). Training runs
    on the shared engine (:mod:`cemnet.finetune.engine`); ``evaluate(model) -> metrics`` is run
    at ``eval_at`` steps and at the end when given, its rows appended to ``history``; the other
    keyword arguments are those of :func:`cemnet.benchmarks.train.finetune`. Returns the model and
    the (mean, std) input normalisation for :func:`predict_affinities`: the pretrained encoder's
    recorded one, else the training volumes' (:func:`instance_norm`)."""
    from cemnet.benchmarks.train import encoder_levers, encoder_norm
    from cemnet.finetune.engine import FinetuneModule, PeriodicEvaluation, StepHook, fit

    torch.manual_seed(cfg.seed)
    model = build_instance_model(cfg)
    # a pretrained encoder sees inputs scaled as in its pretraining; random init: the data's own
    norm = encoder_norm(model.encoder) or instance_norm(train)
    if setup is not None:
        setup(model, norm)
    module = FinetuneModule(model, masked_bce, cfg.iterations, max_lr=cfg.max_lr, weight_decay=cfg.weight_decay,
                            **encoder_levers(cfg))
    t0 = time.perf_counter()
    hooks: list[Any] = [StepHook(lambda it, loss: (it % 50 == 0) and log.info(
        "affinity iteration %d loss %.4f (%.0f s)", it, loss, time.perf_counter() - t0))]
    if evaluate is not None:
        steps = sorted({i for i in eval_at if 0 < i < cfg.iterations} | {cfg.iterations})
        hooks.append(PeriodicEvaluation(evaluate, steps, on_result))
    fit(module, AffinityCrops(train, cfg, norm, target), cfg.iterations, device=cfg.device,
        callbacks=[*hooks, *callbacks], logger=logger, progress=progress, ckpt_path=ckpt_path, root_dir=root_dir)
    if history is not None:
        history.extend(module.history)
    model.to(cfg.device).eval()
    return model, norm


@torch.no_grad()
def predict_affinities(model: nn.Module, volume: np.ndarray, norm: tuple[float, float], device: str = "cpu",
                       slices_per_batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(affinities (3, Z, Y, X), foreground (Z, Y, X)) probabilities for a whole (small) volume.

    The mode follows the model: a 3D U-Net sees the whole volume, a 2D one (``mode="2d"``) the
    :func:`slice_pairs`, ``slices_per_batch`` at a time. Inputs are padded to a multiple of the
    encoder's largest stride (at least 16) per axis and cropped back."""
    from cemnet.models.unet import feature_spec

    model.eval()
    _, reductions, dims = feature_spec(model.encoder)  # type: ignore[arg-type]
    mult = max(16, *(max(r) for r in reductions))
    vol = ((volume.astype(np.float32) / 255.0) - norm[0]) / norm[1]
    shape = volume.shape
    if dims == 3:
        x = torch.from_numpy(vol)[None, None].to(device)
        pads = [(-n) % mult for n in shape]
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")
        out = torch.sigmoid(model(x))[0, :, : shape[0], : shape[1], : shape[2]].cpu().numpy()
    else:
        pairs = torch.from_numpy(slice_pairs(vol))
        pads = [(-n) % mult for n in shape[1:]]
        chunks = []
        for z0 in range(0, shape[0], slices_per_batch):
            x = F.pad(pairs[z0: z0 + slices_per_batch].to(device), (0, pads[1], 0, pads[0]), mode="replicate")
            chunks.append(torch.sigmoid(model(x))[:, :, : shape[1], : shape[2]].cpu())
        out = torch.cat(chunks).permute(1, 0, 2, 3).numpy().copy()  # (Z, 4, Y, X) -> (4, Z, Y, X)
        out[0, 0] = 0.0  # slice 0 has no predecessor (it was paired with itself)
    return out[:3], out[3]


def segment(affs: np.ndarray, foreground: np.ndarray | None, thresholds: Sequence[float], fg_threshold: float = 0.5) -> tuple[np.ndarray, list[np.ndarray]]:
    """Foreground-restricted affinities -> fragments -> one segmentation per threshold."""
    if foreground is not None:
        affs = affs * (foreground >= fg_threshold)[None]
    frags = watershed_fragments(affs, foreground, fg_threshold)
    return frags, agglomerate(frags, affs, thresholds)


def evaluate_affinities(affs: np.ndarray, foreground: np.ndarray | None, gt: np.ndarray, thresholds: Sequence[float],
                        fg_threshold: float = 0.5, backend: str = "mean", **score_kwargs: Any) -> list[dict[str, float]]:
    """:func:`segment` + :func:`threshold_sweep`: one score row per threshold for predicted (or
    ground-truth) affinities; ``score_kwargs`` go to :func:`instance_scores` (border mask)."""
    frags, _ = segment(affs, foreground, [], fg_threshold)
    if foreground is not None:  # the same foreground-restricted affinities segment() used
        affs = affs * (foreground >= fg_threshold)[None]
    return threshold_sweep(frags, affs, gt, thresholds, backend, **score_kwargs)
