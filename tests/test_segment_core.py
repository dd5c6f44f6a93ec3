"""cemnet segment: block-wise inference equals one whole-volume pass, memory bound, outputs, resume,
bad input. Real data: CDeep3M SBEM and ISBI crops (written to HDF5 / TIFF: the readers open those),
the 16-bit SEM OME-Zarr tile (scale levels)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from cemnet.finetune.model_file import build_network, load_model, save_model
from cemnet.segment.run import SegmentError, SegmentSettings, segment_volume
from cemnet.segment.tiling import AxisGrid, blend_window, plan_blocks, tile_starts
from segment_models import cached_mito, mito_spec, read_cdeep3m

# Stated tolerance (docs/segment.md): block-wise vs whole-volume probabilities differ by at most
# 0.03 anywhere and 0.003 on average (uint8 storage alone accounts for up to 0.002).
MAX_DIFF, MEAN_DIFF = 0.03, 0.003


def _random_model(path: Path, dims: str = "2d", seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    spec = mito_spec(dims, **overrides)
    return save_model(build_network(spec), spec, path)


def _whole(model_path: Path, vol: np.ndarray) -> np.ndarray:
    """The model on the whole volume in one piece (2D: every slice whole)."""
    model = load_model(model_path)
    spec = model.cemnet_spec
    x = torch.from_numpy((vol.astype(np.float32) / 255 - spec.norm[0]) / spec.norm[1])
    with torch.no_grad():
        if spec.dims == "3d":
            return torch.sigmoid(model(x[None, None]))[0, 0].numpy()
        return torch.sigmoid(model(x[:, None]))[:, 0].numpy()


@pytest.fixture(scope="module")
def mito_crop(shared_data, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """2 real CDeep3M validation slices cropped to 128 x 160, as HDF5 with its voxel size."""
    img, _ = read_cdeep3m(shared_data, part="validation", n=2)
    crop = np.ascontiguousarray(img[:, 300:428, 200:360])
    path = tmp_path_factory.mktemp("seg") / "mito.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=crop).attrs["element_size_um"] = [0.03, 0.015, 0.015]
    return path, crop


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory, shared_data) -> Path:
    """Trained for 6 steps on CDeep3M mitochondria: an output that varies with the image."""
    return cached_mito(tmp_path_factory, shared_data)


def test_tiles_cover_every_voxel_from_their_interiors() -> None:
    assert tile_starts(100, 64, 16) == [0, 32, 36]
    assert tile_starts(50, 64, 16) == [0]
    for kind in ("gaussian", "linear"):
        w = blend_window((64,), (16,), (False,), (False,), kind)
        assert (w[:16] == 0).all() and (w[-16:] == 0).all() and (w[16:-16] > 0).all()
        edge = blend_window((64,), (16,), (True,), (False,), kind)
        assert (edge[:16] > 0).all()  # at the data's border the halo is all there is
    total = np.zeros(100)
    for s in tile_starts(100, 64, 16):
        total[s:s + 64] += blend_window((64,), (16,), (s == 0,), (s + 64 == 100,))
    assert (total > 0).all()
    grids = [AxisGrid(5, 1, 0, context=1), AxisGrid(100, 64, 16), AxisGrid(100, 64, 16)]
    blocks = plan_blocks((2, 64, 64), grids)
    assert len(blocks) == 3 * 2 * 2 and sum(b.voxels for b in blocks) == 5 * 100 * 100
    # the last block's output (64..100) is weighed on by the tiles at 32 (interior 48..80) and 36
    assert blocks[-1].read == ((3, 5), (32, 100), (32, 100))
    assert blocks[0].read == ((0, 3), (0, 100), (0, 100))


def _tiled_whole(model_path: Path, vol: np.ndarray) -> np.ndarray:
    """The same tiles, blended, computed on the whole volume held in memory at once."""
    from cemnet.segment.predictor import Predictor

    model = load_model(model_path)
    return Predictor(model, model.cemnet_spec)(vol)[0]


@pytest.mark.slow
def test_blockwise_equals_whole_volume_2d(model_2d, mito_crop, tmp_path) -> None:
    """Blocks reproduce the whole volume's tiled result exactly (up to uint8 rounding), and that
    differs from one untiled forward pass by at most the stated tolerance."""
    path, crop = mito_crop
    out = tmp_path / "out.ome.zarr"
    result = segment_volume(model_2d, path, out, SegmentSettings(memory_mb=0.55, progress=False))
    assert result.blocks > 2 and result.block_shape[0] == 1  # several blocks, cut in y/x too
    root = zarr.open_group(str(out), mode="r")
    probs = root["0"][:] / 255.0
    assert probs.shape == crop.shape  # level 0 has the input's (z, y, x) shape
    tiled = _tiled_whole(model_2d, crop)
    assert np.abs(probs - tiled).max() <= 0.5 / 255 + 1e-6
    whole = _whole(model_2d, crop)
    assert whole.std() > 0.02  # the model's output varies: the comparison is not vacuous
    diff = np.abs(probs - whole)
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max(), diff.mean())
    labels = root["labels/segmentation/0"][:]
    # labels threshold the unquantised probabilities: they differ from the whole-volume ones only
    # where the two probabilities straddle 0.5 within the tolerance
    near = np.abs(whole - 0.5) <= MAX_DIFF
    np.testing.assert_array_equal(labels[~near], (whole >= 0.5)[~near])
    ome = root.attrs["ome"]
    assert ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [30.0, 15.0, 15.0]
    assert root["labels"].attrs["ome"]["labels"] == ["segmentation"]
    assert not (out.parent / f"{out.name}.partial").exists()
    from curation.readers import open_volume

    with open_volume(out) as v:  # our own reader reads it back, voxel size included
        assert v.shape == crop.shape and v.voxel_size == (30.0, 15.0, 15.0)


@pytest.mark.slow
def test_blockwise_equals_whole_volume_3d(shared_data, tmp_path_factory, tmp_path) -> None:
    """A 3D U-Net on real SBEM sections, blocks cut in z, y and x: the same result as the tiles of
    the whole volume at once. (cemnet's 3D decoder uses instance norm, which normalises per tile:
    tiled and untiled runs of such a model differ by more than the 2D tolerance, docs/segment.md.)"""
    model = cached_mito(tmp_path_factory, shared_data, dims="3d", iterations=4, tile=(4, 32, 32), halo=(1, 8, 8))
    img, _ = read_cdeep3m(shared_data, part="validation", n=10)
    vol = np.ascontiguousarray(img[:, 300:396, 200:296])
    src = tmp_path / "vol.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("raw", data=vol)
    result = segment_volume(model, src, tmp_path / "o.ome.zarr", SegmentSettings(memory_mb=0.75, progress=False,
                                                                                  outputs=("probabilities",)))
    assert result.blocks > 4 and all(b < n for b, n in zip(result.block_shape, vol.shape)), result
    probs = zarr.open_group(str(tmp_path / "o.ome.zarr"), mode="r")["0"][:] / 255.0
    tiled = _tiled_whole(model, vol)
    assert tiled.std() > 0.02
    assert np.abs(probs - tiled).max() <= 0.5 / 255 + 1e-6


@pytest.mark.slow
def test_memory_flat_in_volume_size(shared_data, tmp_path) -> None:
    """Peak numpy memory (tracemalloc) stays under --memory-mb for volumes larger than it, and does
    not grow with the volume: 1 and 3 ISBI slices of 256 x 512 (0.125 / 0.375 MB of uint8, 0.5 /
    1.5 MB as float probabilities) at a 0.45 MB bound (0.25 MB of it for a batch of 4 tiles). The network is a ResNet stem only (what is
    measured is the engine's memory, not the model's)."""
    from PIL import Image

    arch = {**mito_spec().arch, "encoder_kwargs": {"out_indices": [0]}}
    model = _random_model(tmp_path / "stem.safetensors", arch=arch)
    files = sorted((shared_data / "isbi2012/train/images").glob("*.png"))[:3]
    stack = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])[:, :256, :]
    settings = SegmentSettings(memory_mb=0.45, progress=False)
    peaks = []
    for run, n in enumerate((1, 1, 3)):  # the first run only warms up (imports, caches)
        src = tmp_path / f"isbi{run}.h5"
        with h5py.File(src, "w") as f:
            f.create_dataset("raw", data=stack[:n])
        tracemalloc.start()
        segment_volume(model, src, tmp_path / f"o{run}.ome.zarr", settings)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    peaks = peaks[1:]
    assert stack.nbytes > 0.2 * 2**20
    # the bound plus a fixed overhead (zarr codecs, bookkeeping)
    assert max(peaks) < 0.45 * 2**20 + 0.75 * 2**20, peaks
    # 2 more slices would need 1 MB more as float probabilities: the peak grows by far less (0.19 MB
    # measured: the block list and records, O(blocks))
    assert peaks[1] - peaks[0] < 0.3 * 2**20, peaks


def test_tiff_and_hdf5_outputs_and_overwrite(model_2d, mito_crop, tmp_path) -> None:
    import tifffile

    path, crop = mito_crop
    settings = SegmentSettings(progress=False)
    segment_volume(model_2d, path, tmp_path / "p.tif", settings)
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert tif.series[0].shape == crop.shape
    assert tifffile.imread(tmp_path / "p.labels.tif").shape == crop.shape
    segment_volume(model_2d, path, tmp_path / "p.h5", settings)
    with h5py.File(tmp_path / "p.h5") as f:
        assert f["probabilities"].shape == f["labels"].shape == crop.shape
        assert list(f["labels"].attrs["element_size_um"]) == [0.03, 0.015, 0.015]
    with pytest.raises(SegmentError, match="already exists; pass --overwrite"):
        segment_volume(model_2d, path, tmp_path / "p.h5", settings)
    settings.overwrite = True
    segment_volume(model_2d, path, tmp_path / "p.h5", settings)


def test_bad_inputs_clear_messages(model_2d, mito_crop, tmp_path, capsys) -> None:
    from cemnet.cli import main

    path, _ = mito_crop
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(model_2d.read_bytes()[: model_2d.stat().st_size // 2])
    assert main(["segment", str(broken), str(path), "--out", str(tmp_path / "x.ome.zarr")]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "Traceback" not in err
    rgb = _random_model(tmp_path / "rgb.safetensors", arch={**mito_spec().arch, "in_chans": 3})
    assert main(["segment", str(rgb), str(path), "--out", str(tmp_path / "x.ome.zarr")]) == 2
    assert "expects 3 input channels" in capsys.readouterr().err
    assert main(["segment", str(model_2d), str(tmp_path / "missing.h5"), "--out", str(tmp_path / "x.ome.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.ome.zarr").exists()
    # a voxel size far from the training one: a warning that says by how much
    assert main(["segment", str(model_2d), str(path), "--out", str(tmp_path / "v.ome.zarr"), "--no-progress",
                 "--voxel-size", "30", "45", "45"]) == 0
    assert "differs from the model's training voxel size 30x15x15 nm by 200 % along y" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_failure_skips_finished_blocks(model_2d, mito_crop, tmp_path, monkeypatch) -> None:
    """An injected failure in the third block: nothing at OUT, the first two blocks are kept and
    not recomputed by the same command, and the result equals an uninterrupted run."""
    import cemnet.segment.run as run

    path, _ = mito_crop
    out = tmp_path / "r.ome.zarr"
    settings = SegmentSettings(memory_mb=0.55, progress=False)
    real = run.run_block
    calls: list[int] = []

    def failing(job, block):
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        calls.append(block.index)
        return real(job, block)

    monkeypatch.setattr(run, "run_block", failing)
    with pytest.raises(RuntimeError, match="injected"):
        segment_volume(model_2d, path, out, settings)
    assert not out.exists() and (tmp_path / "r.ome.zarr.partial").is_dir()
    done = sorted(p.name for p in (tmp_path / "r.ome.zarr.partial/.cemnet_segment/done").iterdir())
    assert done == [f"predict-{i}" for i in calls]
    second: list[int] = []
    monkeypatch.setattr(run, "run_block", lambda job, block: second.append(block.index) or real(job, block))
    result = segment_volume(model_2d, path, out, settings)
    assert result.blocks_skipped == 2 and not set(second) & set(calls)
    fresh = segment_volume(model_2d, path, tmp_path / "fresh.ome.zarr", settings)
    a = zarr.open_group(str(out), mode="r")["0"][:]
    b = zarr.open_group(str(fresh.out), mode="r")["0"][:]
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_scale_level_matches_training_voxel_size(shared_data, tmp_path) -> None:
    """The 16-bit SEM OME-Zarr tile has levels at 32, 64, ... nm: a model trained at 64 nm reads level 1."""
    src = shared_data / "muvis_align_sem_tiles/ome_zarr/S000/S000_000_000.ome.zarr"
    model = _random_model(tmp_path / "m.safetensors", voxel_size=(64.0, 64.0, 64.0))
    from curation.readers import SourceSpec, open_volume

    with open_volume(SourceSpec(str(src), scale_level=1)) as v:
        level1 = v.shape
    messages: list[str] = []
    result = segment_volume(model, src, tmp_path / "s.ome.zarr", SegmentSettings(progress=False), log=messages.append)
    assert result.scale_level == 1 and result.shape == level1
    assert any("scale level 1" in m for m in messages)
    root = zarr.open_group(str(tmp_path / "s.ome.zarr"), mode="r")
    assert root["0"].shape == level1


def test_orthoplane_and_tta(model_2d, mito_crop, tmp_path) -> None:
    """TTA makes the prediction flip-invariant; orthoplane averages xy, xz and yz predictions."""
    from cemnet.segment.predictor import Predictor

    _, crop = mito_crop
    model = load_model(model_2d)
    vol = crop[:, :64, :64]
    tta = Predictor(model, model.cemnet_spec, tta=True)
    a = tta(vol)
    b = tta(vol[:, ::-1, :].copy())[:, :, ::-1, :]
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a - Predictor(model, model.cemnet_spec)(vol)).max() > 1e-3
    cube = np.ascontiguousarray(np.concatenate([crop[:, :32, :32]] * 16))  # 32 sections of real SBEM
    plain = Predictor(model, model.cemnet_spec)
    ortho = Predictor(model, model.cemnet_spec, orthoplane=True)(cube)
    expect = (plain(cube) + plain(cube.transpose(1, 0, 2).copy()).transpose(0, 2, 1, 3)
              + plain(cube.transpose(2, 0, 1).copy()).transpose(0, 2, 3, 1)) / 3
    np.testing.assert_allclose(ortho, expect, atol=1e-5)
