"""Issue 11 item 6: chunks absent from a zarr store are the fill value by zarr's rules, so they are
not an error, but they are counted and reported per source with their ranges, patches made of
them get their own filter reason, and a manifest entry can make them an error.

The store is an uncompressed zarr built from real data (a NeuroProof FIB-SEM crop, 16 chunks of
which 3 are deleted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.corpus import CorpusIndex
from curation.filters import MISSING_CHUNKS_REASON
from curation.missing_chunks import missing_fraction
from curation.pipeline import curate
from curation.readers import SourceSpec, open_volume
from curation.settings import CurateSettings

PATCH = 32


@pytest.fixture(scope="module")
def sparse_zarr(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, list]:
    """(16, 128, 128) uint8 NeuroProof crop as zarr v2, chunks (8, 32, 64) -> 2 x 4 x 2 = 16 chunk
    files, uncompressed; chunks (0,1,0), (1,2,1), (1,3,0) deleted."""
    import zarr

    folder = shared_data / "neuroproof_fibsem_medulla" / "training_sample1" / "grayscale_maps"
    files = sorted(folder.iterdir())[:16]
    vol = np.stack([np.asarray(Image.open(f).convert("L"))[:128, :128] for f in files])
    path = tmp_path_factory.mktemp("sparse") / "sparse.zarr"
    arr = zarr.create_array(path, shape=vol.shape, chunks=(8, 32, 64), dtype="uint8", zarr_format=2,
                            compressors=None, fill_value=0)
    arr[...] = vol
    assert len([p for p in path.iterdir() if not p.name.startswith(".")]) == 16
    deleted = [(0, 1, 0), (1, 2, 1), (1, 3, 0)]
    for c in deleted:
        (path / ".".join(map(str, c))).unlink()
    boxes = [(c[0] * 8, c[0] * 8 + 8, c[1] * 32, c[1] * 32 + 32, c[2] * 64, c[2] * 64 + 64) for c in deleted]
    return path, vol, boxes


@pytest.fixture(scope="module")
def sparse_tensorstores(sparse_zarr) -> Path:
    """The same crop as N5 and as Neuroglancer precomputed (written with tensorstore, chunks
    (8, 32, 64) z, y, x), the same 3 chunks deleted."""
    import tensorstore as ts

    path, vol, boxes = sparse_zarr
    root = path.parent / "ts"
    n5 = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(root / "sparse.n5")},
                  "metadata": {"dimensions": [128, 128, 16], "blockSize": [64, 32, 8], "dataType": "uint8",
                               "compression": {"type": "raw"}}}, create=True).result()
    n5[...] = vol.T
    pre = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(root / "sparse.pre")},
                   "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
                   "scale_metadata": {"size": [128, 128, 16], "resolution": [10, 10, 40], "chunk_size": [64, 32, 8],
                                      "encoding": "raw"}}, create=True).result()
    pre[...] = vol.T[..., None]
    for z0, z1, y0, y1, x0, x1 in boxes:
        (root / "sparse.n5" / str(x0 // 64) / str(y0 // 32) / str(z0 // 8)).unlink()
        (root / "sparse.pre" / "10_10_40" / f"{x0}-{x1}_{y0}-{y1}_{z0}-{z1}").unlink()
    return root


@pytest.mark.parametrize("name", ["sparse.n5", "sparse.pre"])
def test_tensorstore_readers_report_missing_chunk_boxes(name, sparse_zarr, sparse_tensorstores):
    """N5 and precomputed: absent chunks found, read as the fill value, locally and over HTTP."""
    from curation.remote_serve import FolderServer

    path, vol, boxes = sparse_zarr
    expected = vol.copy()
    for z0, z1, y0, y1, x0, x1 in boxes:
        expected[z0:z1, y0:y1, x0:x1] = 0
    with FolderServer(sparse_tensorstores) as server:
        for where in (str(sparse_tensorstores / name), f"{server.url}/{name}"):
            with open_volume(where) as v:
                np.testing.assert_array_equal(v.read(), expected)
                assert sorted(v.take_missing()) == sorted(boxes)
                v.read(slice(0, 8), slice(0, 32))  # no missing chunk there
                assert v.take_missing() == []
            with open_volume(SourceSpec(where, missing_chunks="error")) as v, \
                    pytest.raises(Exception, match="3 chunk.s. missing from the store"):
                v.read()


def test_reader_reports_missing_chunk_boxes(sparse_zarr):
    path, vol, boxes = sparse_zarr
    with open_volume(str(path)) as v:
        data = v.read()
        assert sorted(v.take_missing()) == sorted(boxes)
        assert v.take_missing() == []  # taken
        for z0, z1, y0, y1, x0, x1 in boxes:
            assert (data[z0:z1, y0:y1, x0:x1] == 0).all()  # the fill value, as zarr says
        v.read(slice(0, 8), slice(0, 32))  # a region without missing chunks
        assert v.take_missing() == []
    with open_volume(SourceSpec(str(path), roi=[4, 16, 16, 128, 0, 128])) as v:  # ROI coordinates
        v.read()
        assert (0, 4, 16, 48, 0, 64) in v.take_missing()


def test_missing_fraction_geometry():
    box = [(0, 8, 32, 64, 0, 64)]
    table = {"axis": np.array(["xy", "xy", "xz", "yz", "xz"]), "slice": np.array([3, 9, 40, 10, 10]),
             "y": np.array([32, 32, 0, 0, 0]), "x": np.array([0, 0, 0, 32, 0]),
             "h": np.array([32, 32, 16, 16, 16]), "w": np.array([64, 64, 64, 32, 64])}
    np.testing.assert_allclose(missing_fraction(table, box), [1.0, 0.0, 0.5, 0.5, 0.0])


def _curate(specs, out, **kw):
    settings = CurateSettings(patch_size=PATCH, filter="stats", dedup_scope="none", **kw)
    return curate(specs, out, settings, workers=1, progress=False, report=False)


def test_curate_reports_and_labels_missing_chunks(sparse_zarr, tmp_path):
    path, vol, boxes = sparse_zarr
    out = _curate([SourceSpec(str(path), name="sparse", axes="zyx", voxel_size=(40, 10, 10))], tmp_path / "c")
    index = CorpusIndex(out)
    try:
        row = index.source("sparse")
        assert row["status"] == "done"
        assert sorted(map(tuple, json.loads(row["missing_chunks"]))) == sorted(boxes)
        note = next(n for n in json.loads(row["notes"]) if "absent from the store" in n)
        assert note.startswith("3 chunk(s)") and "z 8-16 y 64-96 x 64-128" in note
        t = index.patch_table(["id", "axis", "slice", "y", "x", "h", "w", "status", "reason"])
    finally:
        index.close()
    frac = missing_fraction(t, boxes)
    labelled = t["reason"] == MISSING_CHUNKS_REASON
    assert labelled.sum() == (frac >= 0.5).sum() > 0
    assert (t["status"][labelled] == "filtered").all()
    # every patch cut wholly from the missing chunks is labelled, and none made of real data
    assert labelled[frac == 1].all() and not labelled[frac == 0].any()


def test_missing_chunks_error_loses_only_their_ranges(sparse_zarr, tmp_path):
    path, vol, boxes = sparse_zarr
    # rows 0-64: chunk (0, 1, 0) is missing in z 0-8, nothing in z 8-16
    spec = SourceSpec(str(path), name="sparse", missing_chunks="error", voxel_size=(40, 10, 10),
                      roi=[0, 16, 0, 64, 0, 128])
    out = _curate([spec], tmp_path / "c", patches_per_unit=8, axes="xy")  # xy units of one slice
    index = CorpusIndex(out)
    try:
        row = index.source("sparse")
        assert row["status"] == "partial"
        skipped = index.skipped()
        z = index.patch_table(["slice"])["slice"]
    finally:
        index.close()
    assert len(skipped) == 8 and all("missing_chunks: error" in p for _, p in skipped)
    assert sorted(path for path, _ in skipped) == sorted(f"{path} (xy {z}-{z + 1})" for z in range(8))
    assert set(z.tolist()) == set(range(8, 16))  # the slices without missing chunks are cut


def test_manifest_missing_chunks_key(tmp_path):
    from curation.readers import load_manifest

    m = tmp_path / "m.yaml"
    m.write_text("- {path: /data/a.zarr, missing_chunks: error}\n- {path: /data/b.zarr}\n")
    a, b = load_manifest(m)
    assert (a.missing_chunks, b.missing_chunks) == ("error", "fill")
    m.write_text("- {path: /data/a.zarr, missing_chunks: zero}\n")
    with pytest.raises(Exception, match="missing_chunks must be one of fill, error"):
        load_manifest(m)


def test_missing_chunks_follow_a_new_cut_and_survive_a_resume(sparse_zarr, tmp_path):
    path, vol, boxes = sparse_zarr

    def recorded() -> list:
        index = CorpusIndex(tmp_path / "c")
        try:
            return sorted(map(tuple, json.loads(index.source("sparse")["missing_chunks"] or "[]")))
        finally:
            index.close()

    spec = SourceSpec(str(path), name="sparse", voxel_size=(40, 10, 10))
    _curate([spec], tmp_path / "c")
    _curate([spec], tmp_path / "c")  # finished: skipped, its record kept
    assert recorded() == sorted(boxes)
    _curate([SourceSpec(str(path), name="sparse", voxel_size=(40, 10, 10), roi=[0, 16, 0, 64, 0, 128])], tmp_path / "c")
    assert recorded() == [(0, 8, 32, 64, 0, 64)]  # only the new cut's, in its ROI coordinates
