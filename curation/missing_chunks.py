"""Chunks absent from a zarr / N5 / precomputed store: read as the fill value (zarr's rule, legitimate for sparse
volumes such as the regions outside the sample in public FIB-SEM stores), but never taken for data.

Readers report the boxes they found missing (:meth:`curation.readers.Volume.take_missing`); the
pipeline keeps them per source (``sources.missing_chunks``, a note with their count and ranges),
and patches made mostly of them get their own filter reason, :data:`MISSING_CHUNKS_REASON`,
instead of being judged as data. A manifest entry with ``missing_chunks: error`` makes a missing
chunk a read error instead (its range is lost and listed, the source ``partial``).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from curation.filters import MISSING_CHUNKS_REASON

# A patch counts as missing data when at least this fraction of its true area comes from absent chunks.
MISSING_FRACTION = 0.5
_NOTE_PREFIX = "chunk(s) absent from the store"


def box_text(box: Sequence[int]) -> str:
    return f"z {box[0]}-{box[1]} y {box[2]}-{box[3]} x {box[4]}-{box[5]}"


def record_missing_chunks(index: Any, source: str, boxes: Sequence[Sequence[int]]) -> None:
    """Store a source's missing-chunk boxes (ROI voxel coordinates) and a note naming them."""
    row = index.source(source) or {}
    notes = [n for n in json.loads(row.get("notes") or "[]") if _NOTE_PREFIX not in n]
    shown = "; ".join(box_text(b) for b in boxes[:8]) + (f"; ... ({len(boxes) - 8} more)" if len(boxes) > 8 else "")
    notes.append(f"{len(boxes)} {_NOTE_PREFIX}, read as fill value (patches mostly made of them are filtered "
                 f"as '{MISSING_CHUNKS_REASON}'): {shown}")
    index.upsert_source(source, missing_chunks=[list(map(int, b)) for b in boxes], notes=notes)


def missing_fraction(table: dict[str, np.ndarray], boxes: Sequence[Sequence[int]]) -> np.ndarray:
    """Fraction of each patch's true area inside the (disjoint) ``boxes``.

    ``table``: columns axis, slice, y, x, h, w of patches (xy: slice is z, rows y, columns x;
    xz: slice is y, rows z, columns x; yz: slice is x, rows z, columns y)."""
    axis = np.asarray(table["axis"]).astype(str)
    sl, r0, c0 = (np.asarray(table[k], dtype=np.int64) for k in ("slice", "y", "x"))
    r1, c1 = r0 + np.asarray(table["h"], dtype=np.int64), c0 + np.asarray(table["w"], dtype=np.int64)
    # which box axis the slice index, the rows and the columns run along, per plane
    dims = {"xy": (0, 1, 2), "xz": (1, 0, 2), "yz": (2, 0, 1)}
    covered = np.zeros(len(sl), dtype=np.int64)
    for b in boxes:
        lo, hi = b[0::2], b[1::2]
        for plane, (s_ax, r_ax, c_ax) in dims.items():
            pick = axis == plane
            inside = pick & (sl >= lo[s_ax]) & (sl < hi[s_ax])
            rows = np.clip(np.minimum(r1, hi[r_ax]) - np.maximum(r0, lo[r_ax]), 0, None)
            cols = np.clip(np.minimum(c1, hi[c_ax]) - np.maximum(c0, lo[c_ax]), 0, None)
            covered += np.where(inside, rows * cols, 0)
    area = np.maximum((r1 - r0) * (c1 - c0), 1)
    return covered / area


def label_missing_chunk_patches(index: Any, threshold: float = MISSING_FRACTION) -> int:
    """Give exemplars mostly made of missing chunks the filter reason :data:`MISSING_CHUNKS_REASON`
    (whatever the patch filter said); returns how many."""
    total = 0
    for row in index.sources():
        boxes = json.loads(row.get("missing_chunks") or "[]")
        if not boxes:
            continue
        table = index.exemplar_patches(row["name"], ["id", "axis", "slice", "y", "x", "h", "w"])
        if len(table["id"]) == 0:
            continue
        hit = missing_fraction(table, boxes) >= threshold
        if hit.any():
            ids = table["id"][hit].astype(np.int64)
            index.set_decisions(ids, {"filter_reason": np.full(len(ids), MISSING_CHUNKS_REASON, dtype=object)})
            total += int(hit.sum())
    return total
