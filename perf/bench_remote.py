"""Remote curation speed: patches/s curating a volume served over HTTP on this machine vs the same
volume read from disk.

    python perf/bench_remote.py [--workers 2] [--size 250 500 500] [--chunks 64 128 128]

Builds a near-isotropic volume from the real NeuroProof FIB-SEM stacks (mirrored and tiled to
``--size``, as ``bench_curation.py extract`` does), writes it as an OME-Zarr (zarr v3, zstd) and as
an N5 in OpenOrganelle's layout (gzip), then times ``cemnet curate`` (xy + xz + yz, dedup and
filter included) on: the OME-Zarr from disk, the same OME-Zarr over HTTP from
``curation.remote_serve.FolderServer`` (the standard library's threaded server on 127.0.0.1), and
the N5 from disk and over HTTP (tensorstore). The server shares the machine's cores with the
workers, so this measures the client's overhead (requests, retries bookkeeping, decoding), not a
network.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_curation import _mirror_tile, _neuroproof, _timed_curate  # noqa: E402


def write_stores(vol, root: Path, chunks: tuple[int, int, int]) -> None:
    import tensorstore as ts
    import zarr

    g = zarr.open_group(root / "vol.ome.zarr", mode="w", zarr_format=3)
    g.create_array("s0", shape=vol.shape, chunks=chunks, dtype="uint8")[...] = vol
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
        "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [10.0] * 3}]}]}]}
    level = root / "vol.n5" / "em" / "fibsem-uint8" / "s0"
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(level)},
                     "metadata": {"dimensions": list(vol.shape[::-1]), "blockSize": list(chunks[::-1]),
                                  "dataType": "uint8", "compression": {"type": "gzip"}}}, create=True).result()
    store[...] = vol.T
    attrs = json.loads((level / "attributes.json").read_text())
    attrs["pixelResolution"] = {"dimensions": [10.0] * 3, "unit": "nm"}
    (level / "attributes.json").write_text(json.dumps(attrs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=3, default=(250, 500, 500), metavar=("Z", "Y", "X"))
    ap.add_argument("--chunks", type=int, nargs=3, default=(64, 128, 128), metavar=("Z", "Y", "X"))
    ap.add_argument("--workdir", default=None, help="where the stores and corpora go (default: a temp folder)")
    a = ap.parse_args()

    from curation.readers import SourceSpec
    from curation.remote_serve import FolderServer

    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        root = Path(tmp)
        vol = _mirror_tile(_neuroproof(), tuple(a.size))
        # Written in a child process: tensorstore used in this one would make the worker pool
        # spawn instead of fork (curation.executor._pool_context), unlike a real `cemnet curate`.
        writer = mp.get_context("spawn").Process(target=write_stores, args=(vol, root / "stores", tuple(a.chunks)))
        writer.start()
        writer.join()
        print(f"volume {tuple(vol.shape)} uint8 ({vol.nbytes / 2**20:.0f} MiB), chunks {tuple(a.chunks)}, "
              f"{a.workers} workers")
        results = []
        with FolderServer(root / "stores") as server:
            cases = [
                ("OME-Zarr, disk", SourceSpec(str(root / "stores" / "vol.ome.zarr"), name="v")),
                ("OME-Zarr, HTTP", SourceSpec(f"{server.url}/vol.ome.zarr", name="v")),
                ("N5, disk", SourceSpec(str(root / "stores" / "vol.n5"), name="v", key="em/fibsem-uint8")),
                ("N5, HTTP", SourceSpec(f"{server.url}/vol.n5", name="v", key="em/fibsem-uint8")),
            ]
            for k, (label, spec) in enumerate(cases):
                n, seconds = _timed_curate([spec], root / f"corpus{k}", a.workers)
                results.append((label, n, seconds))
                print(f"{label:16s} {n:7d} patches  {seconds:6.1f} s  {n / seconds:7.0f} patches/s", flush=True)
        print("\n| source | patches | seconds | patches/s |\n|---|---|---|---|")
        for label, n, seconds in results:
            print(f"| {label} | {n} | {seconds:.1f} | {n / seconds:.0f} |")


if __name__ == "__main__":
    main()
