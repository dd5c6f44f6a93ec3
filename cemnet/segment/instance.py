"""One instance labelling of a whole volume from block-wise affinities (the documented global step).

The benchmarks' post-processing (:func:`cemnet.benchmarks.instance.segment`: foreground-masked
affinities -> per-slice watershed fragments -> mean-affinity agglomeration) is split so that only
the small part is global:

1. **fragments**, per block: watershed of the block's affinities; ids ``block << 32 | local``;
2. **edges**, per block: the region graph (affinity sum and count per touching fragment pair) of
   the voxel pairs whose *later* voxel lies in the block; pairs across a block face therefore link
   fragments of neighbouring blocks, and every pair is counted exactly once;
3. **agglomeration**, once, in memory: all edges (their number grows with the fragment count, not
   the voxel count) -> greedy mean-affinity merging up to the threshold -> one lookup table;
4. **relabel**, per block: fragments -> final ids (``1..N``, uint32 or uint64).

Fragments cut by a block face are joined again in step 3 by the high affinities across the face,
so the result matches the whole-volume labelling up to the watershed seeds near the faces
(tested by VI / adapted Rand on NeuroProof, ``docs/segment.md``). Each step is resumable per block.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cemnet.segment.tiling import Block

__all__ = ["block_fragments", "block_edges", "agglomerate_edges", "label_instances"]

LOCAL_BITS = 32


def block_fragments(affs: np.ndarray, foreground: np.ndarray, fg_threshold: float) -> np.ndarray:
    """Watershed fragments (int64, 0 = background) of one block's affinities, as the benchmarks do."""
    from cemnet.benchmarks.instance import watershed_fragments

    masked = affs * (foreground >= fg_threshold)[None]
    return watershed_fragments(masked, foreground, fg_threshold)


def block_edges(fragments: np.ndarray, affs: np.ndarray, margin: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Region-graph edges owned by one block: ``fragments`` / ``affs`` cover the block plus
    ``margin`` (0 or 1) planes before it along each axis; only pairs whose later voxel is in the
    block count. Returns (pairs (n, 2) uint64 with u < v, affinity sums, counts)."""
    us, vs, ws = [], [], []
    for d in range(3):
        cur = [slice(m, None) for m in margin]
        cur[d] = slice(max(margin[d], 1), None)
        prev = list(cur)
        prev[d] = slice(cur[d].start - 1, -1 if fragments.shape[d] > 1 else 0)
        a, b = fragments[tuple(cur)].ravel(), fragments[tuple(prev)].ravel()
        w = affs[(d, *cur)].ravel()
        keep = (a != b) & (a != 0) & (b != 0)
        us.append(np.minimum(a[keep], b[keep])), vs.append(np.maximum(a[keep], b[keep])), ws.append(w[keep])
    return _sum_pairs(np.concatenate(us), np.concatenate(vs), np.concatenate(ws).astype(np.float64),
                      np.ones(sum(len(u) for u in us)))


def _sum_pairs(u: np.ndarray, v: np.ndarray, w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if u.size == 0:
        return np.zeros((0, 2), np.uint64), np.zeros(0), np.zeros(0)
    pairs, inv = np.unique(np.stack([u, v], 1).astype(np.uint64), axis=0, return_inverse=True)
    inv = inv.ravel()
    return pairs, np.bincount(inv, weights=w), np.bincount(inv, weights=c)


def agglomerate_edges(n_fragments: int, pairs: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                      threshold: float) -> np.ndarray:
    """Lookup table (size ``n_fragments + 1``, 0 -> 0) from compact fragment ids (1..n) to final
    ids 1..N: merge while the best mean affinity between two regions is >= ``threshold``."""
    from cemnet.benchmarks.instance import _merge_history

    parent = np.arange(n_fragments + 1)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    pairs, sums, counts = _sum_pairs(pairs[:, 0], pairs[:, 1], sums, counts) if len(pairs) else (pairs, sums, counts)
    for score, a, b in _merge_history(pairs.astype(np.int64), sums, counts):
        if score < threshold:
            break
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra
    roots = np.array([find(i) for i in range(n_fragments + 1)])
    _, final = np.unique(roots, return_inverse=True)  # root of 0 is 0 -> final id 0
    return final.ravel().astype(np.int64)


# --------------------------------------------------------------------------- the block steps


def _state(job: Any) -> Path:
    from cemnet.segment.run import STATE_DIR

    return Path(job.work) / STATE_DIR


def _read_affs(root: Any, job: Any, region: Sequence[slice]) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(root[job.prob_array][(slice(None), *region)], dtype=np.float32) / np.float32(255.0)
    return probs[:3], probs[3]


def fragment_block(job: Any, block: Block) -> dict[str, Any]:
    """Step 1 for one block (see the module doc); the fragment count goes to its marker."""
    import zarr

    from cemnet.segment.run import _mark_done, _worker_name

    root = zarr.open_group(job.work, mode="r+")
    affs, fg = _read_affs(root, job, block.out_slices)
    frags = block_fragments(affs, fg, job.fg_threshold)
    n = int(frags.max())
    if n >= 2**LOCAL_BITS:
        raise RuntimeError(f"block {block.index}: {n} fragments; use smaller blocks (--memory-mb)")
    ids = np.where(frags > 0, (np.uint64(block.index) << np.uint64(LOCAL_BITS)) | frags.astype(np.uint64), 0)
    root["_fragments"][block.out_slices] = ids.astype(np.uint64)
    (_state(job) / "counts").mkdir(exist_ok=True)
    tmp = _state(job) / "counts" / f"{block.index}.tmp"
    tmp.write_text(json.dumps(n))
    os.replace(tmp, _state(job) / "counts" / f"{block.index}.json")
    _mark_done(job.work, "fragments", block.index)
    return {"index": block.index, "voxels": block.voxels, "worker": _worker_name(), "forward_seconds": 0.0}


def edges_block(job: Any, block: Block) -> dict[str, Any]:
    """Step 2 for one block: its edges, saved as ``edges/INDEX.npz``."""
    import zarr

    from cemnet.segment.run import _mark_done, _worker_name

    root = zarr.open_group(job.work, mode="r")
    margin = [1 if a > 0 else 0 for a, _ in block.out]
    region = tuple(slice(a - m, b) for (a, b), m in zip(block.out, margin))
    frags = np.asarray(root["_fragments"][region])
    affs, fg = _read_affs(root, job, region)
    affs *= (fg >= job.fg_threshold)[None]
    pairs, sums, counts = block_edges(frags, affs, margin)
    folder = _state(job) / "edges"
    folder.mkdir(exist_ok=True)
    tmp = folder / f"{block.index}.tmp.npz"
    np.savez(tmp, pairs=pairs, sums=sums, counts=counts)
    os.replace(tmp, folder / f"{block.index}.npz")
    _mark_done(job.work, "edges", block.index)
    return {"index": block.index, "voxels": block.voxels, "worker": _worker_name(), "forward_seconds": 0.0}


def relabel_block(job: Any, block: Block) -> dict[str, Any]:
    """Step 4 for one block: fragment ids -> final ids through the saved lookup table."""
    import zarr

    from cemnet.segment.run import _mark_done, _worker_name

    root = zarr.open_group(job.work, mode="r+")
    lut = np.load(_state(job) / "lut.npy", mmap_mode="r")
    offsets = np.load(_state(job) / "offsets.npy")
    gid = np.asarray(root["_fragments"][block.out_slices])
    cid = np.where(gid > 0, offsets[(gid >> np.uint64(LOCAL_BITS)).astype(np.int64)] +
                   (gid & np.uint64(2**LOCAL_BITS - 1)).astype(np.int64), 0)
    arr = root[job.instance_labels]
    arr[block.out_slices] = np.asarray(lut[cid.ravel()]).reshape(cid.shape).astype(arr.dtype)
    _mark_done(job.work, "relabel", block.index)
    return {"index": block.index, "voxels": block.voxels, "worker": _worker_name(), "forward_seconds": 0.0}


def label_instances(job: Any, blocks: list[Block], label_array: str | None, threshold: float, fg_threshold: float,
                    settings: Any, log: Callable[[str], None]) -> int:
    """Steps 1-4 over all blocks (each resumable); returns the number of instances."""
    import dataclasses
    import math

    import zarr

    from cemnet.segment.output import create_image
    from cemnet.segment.run import _marker, _run_blocks

    job = dataclasses.replace(job)
    job.fg_threshold = fg_threshold  # type: ignore[attr-defined]
    state = _state(job)
    root = zarr.open_group(job.work, mode="r+")
    if "_fragments" not in root:
        root.create_array("_fragments", shape=job.shape, chunks=job.block_shape, dtype=np.uint64, fill_value=0)
    total = math.prod(job.shape)

    def run(stage: str, fn: Callable) -> None:
        todo = [b for b in blocks if not _marker(job.work, stage, b.index).exists()]
        done = {b.index for b in blocks} - {b.index for b in todo}
        _run_blocks(job, todo, settings, total, sum(b.voxels for b in blocks if b.index in done), stage, fn)

    run("fragments", fragment_block)
    run("edges", edges_block)
    counts = np.array([json.loads((state / "counts" / f"{b.index}.json").read_text()) for b in blocks], np.int64)
    offsets_by_block = np.zeros(max(b.index for b in blocks) + 1, np.int64)
    offsets_by_block[[b.index for b in blocks]] = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n = int(counts.sum())
    parts = [np.load(state / "edges" / f"{b.index}.npz") for b in blocks]
    pairs = np.concatenate([p["pairs"] for p in parts]) if parts else np.zeros((0, 2), np.uint64)

    def compact(g: np.ndarray) -> np.ndarray:
        return offsets_by_block[(g >> np.uint64(LOCAL_BITS)).astype(np.int64)] + (g & np.uint64(2**LOCAL_BITS - 1)).astype(np.int64)

    cpairs = np.stack([compact(pairs[:, 0]), compact(pairs[:, 1])], 1) if len(pairs) else np.zeros((0, 2), np.int64)
    cpairs = np.sort(cpairs, axis=1)
    log(f"agglomerating {n} fragments, {len(cpairs)} edges, threshold {threshold:g}")
    lut = agglomerate_edges(n, cpairs, np.concatenate([p["sums"] for p in parts]),
                            np.concatenate([p["counts"] for p in parts]), threshold)
    np.save(state / "offsets.npy", offsets_by_block)
    tmp = state / "lut.tmp.npy"
    np.save(tmp, lut)
    os.replace(tmp, state / "lut.npy")
    instances = int(lut.max())
    dtype = np.uint32 if instances < 2**32 - 1 else np.uint64
    name = label_array or "_instances/0"
    job.instance_labels = name  # type: ignore[attr-defined]
    if name not in root:
        prefix = name.rsplit("/", 1)[0] if "/" in name else ""
        create_image(root, prefix, job.shape, job.block_shape, dtype)
    run("relabel", relabel_block)
    if label_array is None and "_instances" in root:
        del root["_instances"]
    return instances
