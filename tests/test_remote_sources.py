"""Remote sources (issue 13): URLs are sources wherever paths are.

Real servers started by the tests, never mocks: the standard library's threaded HTTP server
(curation.remote_serve.FolderServer, with injected 503s, dropped connections and a chunk that is
never answered) and moto's standalone S3 server. They serve an OME-Zarr (0.5, zarr v3, two
levels), a plain zarr v2, an N5 in OpenOrganelle's layout and a Neuroglancer precomputed volume,
all written from the same real NeuroProof FIB-SEM crop (converted, since shared data has none of
these formats). A remote corpus must equal the corpus of the same data read from disk.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.corpus import CorpusIndex
from curation.pipeline import curate
from curation.readers import SourceSpec, discover, load_manifest, open_volume, source_fingerprint
from curation.remote_serve import FolderServer
from curation.settings import CurateSettings

PATCH = 32
SHAPE = (32, 96, 96)
CHUNKS = (16, 48, 48)  # 2 x 2 x 2 chunks per level


@pytest.fixture(autouse=True)
def quick_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short timeouts and backoff: the fault cases would otherwise wait a minute per try."""
    monkeypatch.setenv("CEMNET_REMOTE_TIMEOUT", "2")
    monkeypatch.setenv("CEMNET_REMOTE_RETRIES", "3")
    monkeypatch.setenv("CEMNET_REMOTE_BACKOFF", "0.05")


@pytest.fixture(scope="module")
def crop(shared_data: Path) -> np.ndarray:
    folder = shared_data / "neuroproof_fibsem_medulla" / "training_sample1" / "grayscale_maps"
    files = sorted(folder.iterdir())[: SHAPE[0]]
    return np.stack([np.asarray(Image.open(f).convert("L"))[40 : 40 + SHAPE[1], 40 : 40 + SHAPE[2]] for f in files])


def _write_stores(vol: np.ndarray, root: Path) -> None:
    import tensorstore as ts
    import zarr

    levels = [vol, vol[::2, ::2, ::2]]
    g = zarr.open_group(root / "vol.ome.zarr", mode="w", zarr_format=3)
    for k, a in enumerate(levels):
        g.create_array(f"s{k}", shape=a.shape, chunks=CHUNKS, dtype="uint8")[...] = a
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
        "datasets": [{"path": f"s{k}", "coordinateTransformations": [{"type": "scale", "scale": [10.0 * 2**k] * 3}]}
                     for k in range(len(levels))]}]}
    g4 = zarr.open_group(root / "v04.ome.zarr", mode="w", zarr_format=2)  # OME-Zarr 0.4: zarr v2, .zattrs
    for k, a in enumerate(levels):
        g4.create_array(str(k), shape=a.shape, chunks=CHUNKS, dtype="uint8")[...] = a
    g4.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
                                "datasets": [{"path": str(k), "coordinateTransformations": [
                                    {"type": "scale", "scale": [0.01 * 2**k] * 3}]} for k in range(len(levels))]}]
    plain = zarr.create_array(root / "plain.zarr", shape=vol.shape, chunks=CHUNKS, dtype="uint8", zarr_format=2)
    plain[...] = vol
    n5 = root / "vol.n5"
    for k, a in enumerate(levels):  # OpenOrganelle: <dataset>.n5/em/fibsem-uint8/s0..sN, x-first dimensions
        level = n5 / "em" / "fibsem-uint8" / f"s{k}"
        store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(level)},
                         "metadata": {"dimensions": list(a.shape[::-1]), "blockSize": list(CHUNKS[::-1]),
                                      "dataType": "uint8", "compression": {"type": "gzip"}}}, create=True).result()
        store[...] = a.T
        attrs = json.loads((level / "attributes.json").read_text())
        attrs["pixelResolution"] = {"dimensions": [10.0 * 2**k] * 3, "unit": "nm"}
        (level / "attributes.json").write_text(json.dumps(attrs))
    for group in (n5, n5 / "em", n5 / "em" / "fibsem-uint8"):
        (group / "attributes.json").write_text(json.dumps({"n5": "2.5.0"}))
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(root / "vol.precomputed")},
                     "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
                     "scale_metadata": {"size": list(vol.shape[::-1]), "resolution": [10, 10, 10],
                                        "chunk_size": list(CHUNKS[::-1]), "encoding": "raw"}}, create=True).result()
    store[...] = vol.T[..., None]


@pytest.fixture(scope="module")
def stores(crop: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stores")
    _write_stores(crop, root)
    return root


@pytest.fixture()
def server(stores: Path):
    with FolderServer(stores) as s:
        yield s


# (name in the folder, extra spec fields) of each format
FORMATS = {
    "ome-zarr": ("vol.ome.zarr", {}),
    "ome-zarr-0.4": ("v04.ome.zarr", {}),
    "zarr-v2": ("plain.zarr", {"voxel_size": (10, 10, 10)}),
    "n5": ("vol.n5", {"key": "em/fibsem-uint8"}),
    "precomputed": ("vol.precomputed", {}),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_url_reads_equal_local_reads(fmt, stores, server, crop):
    rel, extra = FORMATS[fmt]
    with open_volume(SourceSpec(f"{server.url}/{rel}", **extra)) as remote, \
            open_volume(SourceSpec(str(stores / rel), **extra)) as local:
        assert remote.shape == local.shape == crop.shape
        assert remote.voxel_size == local.voxel_size == (10.0, 10.0, 10.0)
        assert remote.chunk_zyx == CHUNKS
        np.testing.assert_array_equal(remote.read(), crop)
        np.testing.assert_array_equal(remote.read(slice(3, 20), slice(5, 90), slice(47, 49)), crop[3:20, 5:90, 47:49])
        assert remote.path == f"{server.url}/{rel}"  # never mangled into a path


def test_voxel_size_picks_nearest_level_and_roi_in_nm(server, crop):
    spec = SourceSpec(f"{server.url}/vol.n5", key="em/fibsem-uint8", voxel_size=(18, 18, 18))
    with open_volume(spec) as v:
        assert v.shape == (16, 48, 48) and v.voxel_size == (20.0, 20.0, 20.0)
        assert any("scale level 1 chosen" in n for n in v.notes)
        np.testing.assert_array_equal(v.read(), crop[::2, ::2, ::2])
    spec = SourceSpec(f"{server.url}/vol.ome.zarr", roi=[100, 250, 0, 480, 200, 960], roi_unit="nm")
    with open_volume(spec) as v:  # 10 nm voxels: z 10-25, y 0-48, x 20-96
        assert v.shape == (15, 48, 76) and v.offset == (10, 0, 20)
        np.testing.assert_array_equal(v.read(), crop[10:25, :48, 20:96])


def test_url_sources_in_discovery_manifest_names_and_fingerprint(server, tmp_path):
    url = f"{server.url}/vol.ome.zarr"
    specs, skipped = discover([url, url])
    assert [s.path for s in specs] == [url] and skipped == [] and specs[0].name == "vol"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"- {{path: '{url}', scale: 1, roi: [0, 8, 0, 24, 0, 24], max_patches: 5}}\n"
                        f"- {{path: '{server.url}/vol.n5', key: em/fibsem-uint8}}\n")
    a, b = load_manifest(manifest)
    assert (a.path, a.scale_level, a.roi, a.max_patches, a.name) == (url, 1, (0, 8, 0, 24, 0, 24), 5, "vol")
    assert b.path == f"{server.url}/vol.n5" and b.name == "vol-2"
    first = source_fingerprint(url)
    assert first == source_fingerprint(url)
    for fmt in ("vol.n5", "vol.precomputed", "plain.zarr"):
        assert len(source_fingerprint(f"{server.url}/{fmt}")) == 16
    with pytest.raises(Exception, match="no metadata document"):
        source_fingerprint(f"{server.url}/nothing.zarr")


def _corpus_table(out: Path) -> tuple[dict, list[np.ndarray]]:
    """Patches in provenance order with hash, verdict and their exemplar's provenance (ids follow
    the order parallel units finish in, so they are not compared), and the kept pixels."""
    from curation.corpus import Corpus

    index = CorpusIndex(out)
    try:
        t = index.patch_table(["id", "axis", "slice", "y", "x", "h", "w", "hash", "status", "group_id"])
        sources = {r["name"]: r for r in index.sources()}
    finally:
        index.close()
    where = {int(i): (str(a), int(s), int(y), int(x)) for i, a, s, y, x in zip(t["id"], t["axis"], t["slice"], t["y"], t["x"])}
    rows = sorted((where[int(i)], int(h), int(w), int(hs), str(st), where[int(g)])
                  for i, h, w, hs, st, g in zip(t["id"], t["h"], t["w"], t["hash"], t["status"], t["group_id"]))
    kept = Corpus(out)
    pixels = [kept[i] for i in range(len(kept))]
    return {"rows": rows, "sources": sources}, sorted(pixels, key=lambda p: p.tobytes())


def _curate(specs, out, workers=1, **settings_kw):
    settings = CurateSettings(patch_size=PATCH, dedup_distance=12, **settings_kw)
    return curate(specs, out, settings, workers=workers, progress=False, report=False)


@pytest.mark.parametrize("fmt", ["ome-zarr", "n5", "precomputed"])
def test_remote_corpus_equals_local_corpus(fmt, stores, server, tmp_path):
    rel, extra = FORMATS[fmt]
    local = _curate([SourceSpec(str(stores / rel), name="v", **extra)], tmp_path / "local")
    remote = _curate([SourceSpec(f"{server.url}/{rel}", name="v", **extra)], tmp_path / "remote", workers=2)
    (lt, lp), (rt, rp) = _corpus_table(local), _corpus_table(remote)
    assert rt["sources"]["v"]["status"] == "done" and rt["sources"]["v"]["path"] == f"{server.url}/{rel}"
    assert lt["rows"] == rt["rows"] and len(lt["rows"]) > 100  # same patches, hashes, groups, verdicts
    assert len(lp) == len(rp) and all((a == b).all() for a, b in zip(lp, rp))  # same exemplars


def test_resume_skips_finished_remote_source_without_reading_chunks(server, tmp_path):
    url = f"{server.url}/vol.ome.zarr"
    _curate([SourceSpec(url, name="v")], tmp_path / "c")
    chunk_reads = sum(n for p, n in server.requests.items() if "/c/" in p)
    assert chunk_reads > 0
    _curate([SourceSpec(url, name="v")], tmp_path / "c")
    assert sum(n for p, n in server.requests.items() if "/c/" in p) == chunk_reads  # nothing re-read


# chunk (z, y, x) -> its path on the server, and a metadata document, per format
CHUNK_PATH = {"ome-zarr": lambda z, y, x: f"/vol.ome.zarr/s0/c/{z}/{y}/{x}",
              "n5": lambda z, y, x: f"/vol.n5/em/fibsem-uint8/s0/{x}/{y}/{z}"}  # N5: x first
METADATA_PATH = {"ome-zarr": "/vol.ome.zarr/zarr.json", "n5": "/vol.n5/em/fibsem-uint8/s0/attributes.json"}


@pytest.mark.parametrize("fmt", ["ome-zarr", "n5"])
def test_transient_errors_are_retried(fmt, stores, server, tmp_path):
    rel, extra = FORMATS[fmt]
    local = _curate([SourceSpec(str(stores / rel), name="v", **extra)], tmp_path / "local")
    for chunk in (CHUNK_PATH[fmt](0, 0, 0), CHUNK_PATH[fmt](1, 1, 1)):
        server.faults[chunk] = ["503", "drop", "503"]
    server.faults[METADATA_PATH[fmt]] = ["drop"]
    remote = _curate([SourceSpec(f"{server.url}/{rel}", name="v", **extra)], tmp_path / "remote")
    assert all(not plan for plan in server.faults.values())  # every fault was met, and retried past
    assert _corpus_table(local)[0]["rows"] == _corpus_table(remote)[0]["rows"]


@pytest.mark.parametrize("fmt", ["ome-zarr", "n5"])
def test_chunk_never_answered_loses_its_range_and_the_run_goes_on(fmt, stores, server, tmp_path, monkeypatch):
    monkeypatch.setenv("CEMNET_REMOTE_TIMEOUT", "0.3")
    monkeypatch.setenv("CEMNET_REMOTE_RETRIES", "1")
    server.faults[CHUNK_PATH[fmt](1, 0, 1)] = ["hang"]  # z 16-32, y 0-48, x 48-96
    rel, extra = FORMATS[fmt]
    specs = [SourceSpec(f"{server.url}/{rel}", name="v", **extra), SourceSpec(f"{server.url}/plain.zarr", name="p")]
    out = _curate(specs, tmp_path / "c", patches_per_unit=9 * 20)  # 20 planes -> chunk-aligned units of 16
    index = CorpusIndex(out)
    try:
        v, p = index.source("v"), index.source("p")
        t = index.patch_table(["source", "axis", "slice"])
        skipped = index.skipped()
    finally:
        index.close()
    assert p["status"] == "done"  # the other source is unharmed
    assert v["status"] == "partial" and "unreadable" in v["error"]
    assert [path for path, _ in skipped] == [f"{server.url}/{rel} (xy 16-32)"]
    assert any("a chunk stayed unreadable" in problem for _, problem in skipped)
    xy = t["slice"][(t["source"] == "v") & (t["axis"] == "xy")]
    assert set(xy.tolist()) == set(range(16))  # z 16-32 lost, never zeros; the rest is cut
    # once it failed every try, the chunk is not asked again in this run: a few looks of 2 tries
    # (tensorstore's chunk-by-chunk check adds one), not 2 tries for each of the 8 sampled slices
    # over it and again for the unit
    assert server.requests[CHUNK_PATH[fmt](1, 0, 1)] <= 6

    # the server answers again: the same command completes the source, equal to a clean run
    server.faults.clear()
    _curate(specs, tmp_path / "c", patches_per_unit=9 * 20)
    clean = _curate(specs, tmp_path / "clean", patches_per_unit=9 * 20)
    index = CorpusIndex(out)
    try:
        assert index.source("v")["status"] == "done" and index.skipped() == []
    finally:
        index.close()
    assert _corpus_table(out)[0]["rows"] == _corpus_table(clean)[0]["rows"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(stores: Path):
    """moto's standalone S3 server on 127.0.0.1 holding the stores in bucket 'em-data'."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="em-data")
    for f in stores.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), "em-data", f.relative_to(stores).as_posix(), ExtraArgs={"ACL": "public-read"})
    yield endpoint
    server.stop()


@pytest.mark.parametrize("fmt,credentials", [("ome-zarr", False), ("n5", False), ("zarr-v2", True)])
def test_s3_source_with_endpoint_from_env(fmt, credentials, s3_server, stores, tmp_path, monkeypatch):
    """Anonymous by default (the objects are public-read); signed with credentials from the
    environment when they are given."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    if credentials:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    rel, extra = FORMATS[fmt]
    local = _curate([SourceSpec(str(stores / rel), name="v", **extra)], tmp_path / "local")
    remote = _curate([SourceSpec(f"s3://em-data/{rel}", name="v", **extra)], tmp_path / "remote", workers=2)
    (lt, lp), (rt, rp) = _corpus_table(local), _corpus_table(remote)
    assert rt["sources"]["v"]["status"] == "done" and rt["sources"]["v"]["path"] == f"s3://em-data/{rel}"
    assert lt["rows"] == rt["rows"] and all((a == b).all() for a, b in zip(lp, rp))


def test_cli_curates_a_url(server, tmp_path):
    from curation.cli import main

    out = tmp_path / "c"
    assert main([f"{server.url}/vol.ome.zarr", "--out", str(out), "--patch-size", str(PATCH), "--no-progress",
                 "--workers", "1"]) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["totals"]["raw"] > 0 and summary["sources"][0]["source"] == "vol"
    # an unreachable URL is skipped with one line naming it as written, and the others are curated
    main([f"{server.url}/missing.zarr", f"{server.url}/vol.ome.zarr", "--out", str(tmp_path / "d"),
          "--patch-size", str(PATCH), "--no-progress", "--workers", "1"])
    summary = json.loads((tmp_path / "d" / "report" / "summary.json").read_text())
    assert [s["source"] for s in summary["sources"]] == ["vol"] and summary["totals"]["raw"] > 0
    assert [tuple(x)[0] for x in summary["skipped"]] == [f"{server.url}/missing.zarr"]


def test_sampling_budget_draws_whole_chunks_reproducibly(server, tmp_path):
    """max_patches on a remote OME-Zarr: blocks of whole chunks (here 2 x 1 x 1 chunks: a patch deep
    for the xz / yz planes), drawn with the seed; only their chunks are fetched."""
    from curation.remote_sampling import expand_sampled

    url = f"{server.url}/vol.ome.zarr"
    settings = CurateSettings(patch_size=PATCH)
    spec = SourceSpec(url, name="v", max_patches=500)
    first = expand_sampled([spec], settings)
    assert first == expand_sampled([spec], settings)  # reproducible
    assert len(first) == 2 and all(s.dataset == "v" and s.max_patches is None for s in first)
    for s in first:
        z0, z1, y0, y1, x0, x1 = s.roi
        assert (z0, z1) == (0, 32) and (y1 - y0, x1 - x0) == (48, 48) and y0 % 48 == 0 and x0 % 48 == 0
    assert len(expand_sampled([SourceSpec(url, name="v", sample_fraction=0.75)], settings)) == 3

    server.requests.clear()
    out = _curate([spec], tmp_path / "c")
    index = CorpusIndex(out)
    try:
        rows = {r["name"]: r for r in index.sources()}
        n = index.db.execute("SELECT COUNT(*) FROM patches").fetchone()[0]
    finally:
        index.close()
    assert sorted(rows) == sorted(s.name for s in first) and all(r["status"] == "done" for r in rows.values())
    assert n >= 500
    fetched = {p.rsplit("/s0/c/", 1)[1] for p in server.requests if "/s0/c/" in p}
    wanted = {f"{z}/{s.roi[2] // 48}/{s.roi[4] // 48}" for s in first for z in (0, 1)}
    assert fetched == wanted, (fetched, wanted, [s.roi for s in first])  # whole chunks of the drawn blocks only


def test_changed_roi_cuts_the_source_again(stores, tmp_path):
    path = str(stores / "vol.ome.zarr")
    _curate([SourceSpec(path, name="v", roi=[0, 32, 0, 48, 0, 96])], tmp_path / "c")
    _curate([SourceSpec(path, name="v", roi=[0, 32, 48, 96, 0, 96])], tmp_path / "c")
    index = CorpusIndex(tmp_path / "c")
    try:
        row = index.source("v")
    finally:
        index.close()
    assert "cut again" in row["notes"] and "reader roi" in row["notes"]
    assert json.loads(row["shape_zyx"]) == [32, 48, 96]


def test_remote_source_whose_metadata_changed_is_cut_again(stores, tmp_path):
    import shutil

    shutil.copytree(stores / "plain.zarr", tmp_path / "site" / "plain.zarr")
    with FolderServer(tmp_path / "site") as site:
        spec = SourceSpec(f"{site.url}/plain.zarr", name="p")
        _curate([spec], tmp_path / "c")
        attrs = tmp_path / "site" / "plain.zarr" / ".zattrs"
        attrs.write_text(json.dumps({"note": "re-exported"}))
        _curate([spec], tmp_path / "c")
    index = CorpusIndex(tmp_path / "c")
    try:
        notes = index.source("p")["notes"]
    finally:
        index.close()
    assert "cut again, its files changed" in notes


def test_local_n5_fingerprint_covers_the_levels_below_the_key(stores, tmp_path):
    import shutil

    n5 = tmp_path / "vol.n5"
    shutil.copytree(stores / "vol.n5", n5)
    before = source_fingerprint(n5, "em/fibsem-uint8")
    level = n5 / "em" / "fibsem-uint8" / "s1" / "attributes.json"
    level.write_text(level.read_text().replace('"unit": "nm"', '"unit": "um"'))
    assert source_fingerprint(n5, "em/fibsem-uint8") != before


@pytest.mark.slow
def test_remote_source_on_a_dask_cluster(stores, server, tmp_path):
    """Units of a URL source run on the cluster's worker processes (which read the server
    themselves) and give the same corpus as the local worker pool."""
    from distributed import Client, LocalCluster

    url = f"{server.url}/vol.ome.zarr"
    local = _curate([SourceSpec(url, name="v")], tmp_path / "pool", workers=2)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        out = curate([SourceSpec(url, name="v")], tmp_path / "dask", CurateSettings(patch_size=PATCH),
                     scheduler=cluster.scheduler_address, progress=False, report=False)
        with Client(cluster.scheduler_address) as client:
            ran = client.run(lambda: "curation.remote" in __import__("sys").modules)
    assert list(ran.values()) == [True]  # the worker process opened the remote store
    assert _corpus_table(local)[0]["rows"] == _corpus_table(out)[0]["rows"]


@pytest.mark.parametrize("fmt", ["ome-zarr", "n5"])
def test_public_gs_url_is_read_over_https_without_a_gcs_client(fmt, stores, tmp_path, monkeypatch):
    """gs://BUCKET/PATH without Google credentials is the bucket's public HTTPS address; the test
    points that endpoint (CEMNET_GCS_ENDPOINT) at a local server holding the bucket folder."""
    import shutil

    rel, extra = FORMATS[fmt]
    shutil.copytree(stores / rel, tmp_path / "site" / "em-bucket" / rel)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with FolderServer(tmp_path / "site") as site:
        monkeypatch.setenv("CEMNET_GCS_ENDPOINT", site.url)
        with open_volume(SourceSpec(f"gs://em-bucket/{rel}", **extra)) as remote, \
                open_volume(SourceSpec(str(stores / rel), **extra)) as local:
            assert remote.path == f"gs://em-bucket/{rel}"
            np.testing.assert_array_equal(remote.read(), local.read())
        assert len(source_fingerprint(f"gs://em-bucket/{rel}", extra.get("key"))) == 16


def test_precomputed_scheme_prefix_and_url_names(server, crop):
    url = f"precomputed://{server.url}/vol.precomputed/"
    with open_volume(url) as v:
        assert v.reader == "precomputed" and v.path == url
        np.testing.assert_array_equal(v.read(slice(0, 2)), crop[:2])
    assert len(source_fingerprint(url)) == 16
    specs, _ = discover([url, "s3://bucket/a/jrc_hela-2.n5", "gs://other/a/jrc_hela-2.n5", "https://h/x/"])
    assert [s.name for s in specs] == ["vol", "bucket_a_jrc_hela-2", "other_a_jrc_hela-2", "x"]
    assert all(s.path.startswith(("precomputed://", "s3://", "gs://", "https://")) for s in specs)


def test_unlistable_zarr_group_asks_for_the_key(tmp_path):
    """Over a server without directory listings a zarr group cannot be searched for its array:
    one message saying to name it; with `key` it is read."""
    import zarr

    g = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    g.create_array("raw", shape=(2, 64, 64), chunks=(1, 32, 32), dtype="uint8")[...] = 9
    with FolderServer(tmp_path) as site:
        site.faults["/g.zarr/"] = ["404"]
        site.faults["/g.zarr"] = ["404"]
        with pytest.raises(Exception, match="cannot list this zarr group over http .*set `key`"):
            open_volume(f"{site.url}/g.zarr")
        with open_volume(SourceSpec(f"{site.url}/g.zarr", key="raw")) as v:
            assert v.shape == (2, 64, 64) and (v.read() == 9).all()
