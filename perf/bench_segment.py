"""cemnet segment throughput on CPU: the engine vs a naive whole-slice loop vs the bare forward passes.

For a 2D model on ISBI 2012 ssTEM slices (512 x 512) and a 3D model on NeuroProof FIB-SEM (random
weights: speed does not depend on them; data from ``../shared/data``), one process, one thread:

* **engine**: ``segment_volume`` end to end (read, uint8, tile, forward, blend, write OME-Zarr,
  pyramid, rename), voxels/s;
* **bare forward**: the same tiles' forward passes alone (tensors prepared beforehand), i.e. the
  model's own time including the halo recomputation the tiling implies;
* **naive loop**: each whole slice (2D) or the whole crop (3D) in one forward pass, no tiling, no
  halo: what a user's ``for z in range(nz): model(slice)`` costs.

Engine overhead = (engine - bare forward) / bare forward: reading, tiling, blending, writing (target
<= 15 %). Halo recomputation = bare forward / naive, reported separately. Peak memory: tracemalloc
(numpy buffers) for a volume and for one twice as deep at the same ``--memory-mb`` (flat = equal).

Usage (the setting reported in BENCHMARKS.md):

    OMP_NUM_THREADS=1 python perf/bench_segment.py --slices 8 --memory-mb 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

SPECS = {
    "2d": dict(task="semantic", dims="2d", output="sigmoid", norm=(0.5, 0.2), tile=(256, 256), halo=(32, 32),
               arch={"kind": "unet", "encoder": "resnet18", "spatial_dims": 2, "in_chans": 1, "out_channels": 1,
                     "base_width": 64, "min_width": 16}),
    "3d": dict(task="semantic", dims="3d", output="sigmoid", norm=(0.5, 0.2), tile=(16, 128, 128), halo=(4, 16, 16),
               arch={"kind": "unet", "encoder": "cemnet3d_res_tiny", "encoder_kwargs": {"norm": "batch"},
                     "spatial_dims": 3, "in_chans": 1, "out_channels": 1, "base_width": 32, "min_width": 8}),
}


def _volume(folder: Path, slices: int, size: int) -> np.ndarray:
    from PIL import Image

    files = sorted(folder.glob("*.png"))[:slices]
    return np.stack([np.asarray(Image.open(f).convert("L"))[:size, :size] for f in files])


def _write(vol: np.ndarray, path: Path) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=vol, chunks=(1, *vol.shape[1:])).attrs["element_size_um"] = [0.01] * 3
    return path


@torch.no_grad()
def _bare_and_naive(model, spec, vol: np.ndarray) -> tuple[float, float, int]:
    """(bare forward seconds over the engine's tiles, naive untiled seconds, tile voxels computed)."""
    from cemnet.segment.predictor import Predictor
    from cemnet.segment.tiling import grid_tiles

    pred = Predictor(model, spec, batch_size=4)
    x = (vol.astype(np.float32) / 255 - spec.norm[0]) / spec.norm[1]
    grids = pred.grids(vol.shape)
    if spec.dims == "3d":
        tiles = [torch.from_numpy(x[t[0]][None].copy()) for t in grid_tiles((0, 0, 0), vol.shape, grids)]
    else:
        tiles = [torch.from_numpy(x[z][t[0]][None].copy()) for z in range(vol.shape[0])
                 for t in grid_tiles((0, 0), vol.shape[1:], grids[1:])]
    batches = [torch.stack(tiles[i: i + 4]) for i in range(0, len(tiles), 4)]
    start = time.perf_counter()
    for b in batches:
        torch.sigmoid(model(b))
    bare = time.perf_counter() - start
    start = time.perf_counter()
    if spec.dims == "3d":
        torch.sigmoid(model(torch.from_numpy(x)[None, None]))
    else:
        for z in range(vol.shape[0]):
            torch.sigmoid(model(torch.from_numpy(x[z])[None, None]))
    naive = time.perf_counter() - start
    return bare, naive, sum(t.numel() for t in tiles)


def run(kind: str, vol: np.ndarray, memory_mb: float, tmp: Path) -> dict:
    from cemnet.finetune.model_file import ModelSpec, build_network, load_model, save_model
    from cemnet.segment.run import SegmentSettings, segment_volume

    torch.manual_seed(0)
    spec = ModelSpec(**SPECS[kind])
    path = save_model(build_network(spec), spec, tmp / f"{kind}.safetensors")
    model = load_model(path)
    src = _write(vol, tmp / f"{kind}.h5")
    settings = SegmentSettings(memory_mb=memory_mb, progress=False, outputs=("probabilities",))
    segment_volume(path, src, tmp / f"{kind}-warm.ome.zarr", settings)  # imports, caches
    start = time.perf_counter()
    result = segment_volume(path, src, tmp / f"{kind}.ome.zarr", settings)
    engine = time.perf_counter() - start
    bare, naive, computed = _bare_and_naive(model, spec, vol)
    peaks = []
    for depth in (1, 2):  # the same volume, then twice as deep: memory must not grow
        deep = _write(np.concatenate([vol] * depth), tmp / f"{kind}-deep{depth}.h5")
        tracemalloc.start()
        segment_volume(path, deep, tmp / f"{kind}-deep{depth}.ome.zarr", settings)
        peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
    voxels = vol.size
    return {
        "model": kind, "volume": list(vol.shape), "blocks": result.blocks, "block_shape": list(result.block_shape),
        "engine_s": round(engine, 2), "engine_forward_s": round(result.forward_seconds, 2),
        "bare_forward_s": round(bare, 2), "naive_loop_s": round(naive, 2),
        "engine_voxels_per_s": round(voxels / engine), "bare_voxels_per_s": round(voxels / bare),
        "naive_voxels_per_s": round(voxels / naive),
        "overhead_vs_bare_forward": round((engine - bare) / bare, 3),
        "overhead_outside_network": round((engine - result.forward_seconds) / result.forward_seconds, 3),
        "halo_recompute_factor": round(computed / voxels, 2),
        "peak_numpy_mb_1x_2x_depth": [round(p, 2) for p in peaks], "memory_mb": memory_mb,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--slices", type=int, default=8, help="2D: ISBI slices; 3D: twice as many NeuroProof slices")
    p.add_argument("--memory-mb", type=float, default=4.0)
    p.add_argument("--models", default="2d,3d")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = Path(args.data)
    volumes = {"2d": lambda: _volume(data / "isbi2012/train/images", args.slices, 512),
               "3d": lambda: _volume(data / "neuroproof_fibsem_medulla/training_sample1/grayscale_maps", 2 * args.slices, 250)}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            print(json.dumps(run(kind, volumes[kind](), args.memory_mb, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
