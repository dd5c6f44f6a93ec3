"""Readers on the real shared EM data (``../shared/data``).

Formats the shared data lacks (NRRD, AVI/MP4, JPEG, multipage/BigTIFF/OME/ImageJ TIFF, signed and
float TIFF, zarr v2, MRC mode 0, HDF5 with several datasets) are made IN THE TEST by converting
real stacks (mostly the NeuroProof FIB-SEM volume), never from synthetic noise.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.manifest import ReaderError, SourceSpec, natural_sorted
from curation.readers import describe, discover, load_manifest, open_volume
from helpers import read_grey as pil_grey

NP_DIR = "neuroproof_fibsem_medulla/training_sample2/grayscale_maps"
TILE = "muvis_align_sem_tiles/tiff_uint16/S000/000_001_0.tiff"
TILE_ZARR = "muvis_align_sem_tiles/ome_zarr/S000/S000_000_001.ome.zarr"  # same tile as TILE


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def stats(root: Path, folder: str) -> dict:
    return json.loads((root / folder / "STATS.json").read_text())


def read_all(spec) -> np.ndarray:
    with open_volume(spec) as v:
        return v.read()


@pytest.fixture(scope="module")
def neuroproof(shared_data) -> np.ndarray:
    """The NeuroProof training_sample2 volume (250^3 uint8), decoded independently with PIL."""
    folder = shared_data / NP_DIR
    return np.stack([pil_grey(folder / n) for n in natural_sorted(os.listdir(folder))])


@pytest.fixture(scope="module")
def made(tmp_path_factory, shared_data, neuroproof) -> dict:
    """Files in formats the shared data lacks, converted from the real stacks (written once)."""
    import av
    import h5py
    import nrrd
    import tifffile
    import zarr

    d = tmp_path_factory.mktemp("converted")
    sub = neuroproof[:24]
    out = {"sub": sub}
    tifffile.imwrite(d / "plain.tif", sub)  # uncompressed, contiguous -> memory-mapped
    tifffile.imwrite(d / "zlib_big.tif", sub, compression="zlib", bigtiff=True)
    tifffile.imwrite(d / "imagej.tif", sub, imagej=True, resolution=(1 / 0.008, 1 / 0.008),
                     metadata={"spacing": 0.01, "unit": "um", "axes": "ZYX"})
    tifffile.imwrite(d / "ome.ome.tif", sub, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 8, "PhysicalSizeY": 8, "PhysicalSizeZ": 10,
        "PhysicalSizeXUnit": "nm", "PhysicalSizeYUnit": "nm", "PhysicalSizeZUnit": "nm"})
    tifffile.imwrite(d / "four_d.tif", np.stack([sub, 255 - sub]))  # 4D: 2 x z x y x x
    # NRRD header lists axes fastest-first (x, y, z): spacing x=8, y=8, z=10 nm
    nrrd.write(str(d / "raw.nrrd"), sub, {"encoding": "raw", "space dimension": 3,
               "space directions": np.diag([8.0, 8.0, 10.0]), "space units": ["nm"] * 3}, index_order="C")
    nrrd.write(str(d / "gzip.nrrd"), sub, {"spacings": [0.008, 0.008, 0.01], "units": ["um"] * 3}, index_order="C")
    with h5py.File(d / "multi.h5", "w") as f:
        f.create_dataset("volumes/raw", data=sub, chunks=(4, 125, 125), compression="gzip")
        f["volumes/raw"].attrs["element_size_um"] = [0.01, 0.008, 0.008]
        f.create_dataset("volumes/small", data=sub[:2, :50, :50])
        f.create_dataset("four_d", data=np.stack([sub, 255 - sub]))
        f.create_dataset("ilastik", data=sub[..., None])  # ilastik export: z, y, x, c=1
        f["ilastik"].attrs["axistags"] = json.dumps({"axes": [{"key": k} for k in "zyxc"]})
        f.create_dataset("line", data=sub[0, 0])
        f.create_dataset("empty", shape=(0, 250, 250), dtype="u1")
    g = zarr.open_group(str(d / "v2.zarr"), mode="w", zarr_format=2)  # OME-Zarr 0.4 on zarr v2
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [10, 8, 8]}]}]}]
    g.create_array("0", shape=sub.shape, chunks=(5, 125, 125), dtype=sub.dtype)[:] = sub
    p = zarr.open_group(str(d / "plain_v2.zarr"), mode="w", zarr_format=2)  # no OME metadata
    p.create_array("raw", shape=sub.shape, chunks=(4, 250, 250), dtype=sub.dtype)[:] = sub
    p.create_array("labels", shape=(8, 250, 250), dtype="u1")[:] = sub[:8] > 128
    c = zarr.open_group(str(d / "czyx.zarr"), mode="w", zarr_format=2)  # 2 channels
    c.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a} for a in "czyx"], "datasets": [{"path": "0"}]}]
    c.create_array("0", shape=(2, *sub.shape), dtype=sub.dtype)[:] = np.stack([sub, 255 - sub])
    zarr.open_group(str(d / "empty.zarr"), mode="w").create_array("raw", shape=(0, 250, 250), dtype="u1")

    def video(name: str, codec: str, pix_fmt: str, frames: np.ndarray, fmt: str = "gray") -> None:
        with av.open(str(d / name), "w") as ctr:
            s = ctr.add_stream(codec, rate=10)
            s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
            for f in frames:
                for packet in s.encode(av.VideoFrame.from_ndarray(f, format=fmt)):
                    ctr.mux(packet)
            for packet in s.encode():
                ctr.mux(packet)

    video("ffv1.avi", "ffv1", "gray", sub)
    video("png_rgb.avi", "png", "rgb24", np.repeat(sub[..., None], 3, axis=-1), "rgb24")
    video("h264.mp4", "libx264", "yuv420p", sub)
    out.update({k: d / k for k in os.listdir(d)})
    return out


# --------------------------------------------------------------------------- 2D images and folders


def test_neuroproof_png_folder_is_one_volume(shared_data, neuroproof):
    with open_volume(shared_data / NP_DIR) as v:
        assert (v.shape, v.dtype, v.is_volume, v.reader) == ((250, 250, 250), np.uint8, True, "folder")
        assert v.chunk_zyx == (1, 250, 250) and v.voxel_size is None and v.voxel_size_from == "none"
        full = v.read()
        assert sha(full) == stats(shared_data, "neuroproof_fibsem_medulla")["training_sample2"]["sha256_of_array_bytes"]
        assert np.array_equal(v.read(slice(17, 18))[0], pil_grey(shared_data / NP_DIR / "iso.2617.png"))
        assert np.array_equal(v.read(slice(40, 47, 3), slice(5, 200), slice(None, None, 7)), full[40:47:3, 5:200, ::7])


def test_folder_uses_natural_sort(shared_data):
    folder = shared_data / "isbi2012/train/images"  # 0.png .. 29.png: plain sort puts 10 before 2
    with open_volume(SourceSpec(str(folder), stack=True)) as v:
        assert v.shape == (30, 512, 512)
        assert sha(v.read()) == stats(shared_data, "isbi2012")["train/images"]["sha256_of_array_bytes"]
        assert np.array_equal(v.read(slice(2, 3))[0], pil_grey(folder / "2.png"))


def test_isbi_png_is_2d(shared_data):
    path = shared_data / "isbi2012/test/images/7.png"
    with open_volume(path) as v:
        assert (v.shape, v.is_volume, v.dtype, v.name) == ((1, 512, 512), False, np.uint8, "7")
        assert np.array_equal(v.read()[0], pil_grey(path))
        assert np.array_equal(v.read(y=slice(100, 120), x=slice(3, 9))[0], pil_grey(path)[100:120, 3:9])


def test_vnc_rgb_with_equal_channels_gives_that_channel(shared_data):
    path = shared_data / "drosophila_vnc_gerhard2013/stack2/raw/05.png"
    rgb = np.asarray(Image.open(path))
    assert rgb.shape == (1024, 1024, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.array_equal(read_all(path)[0], rgb[..., 0])


def test_rgb_luma_matches_pil_in_png_and_tiff(tmp_path, shared_data):
    import tifffile

    # three different real ISBI slices as R, G, B, so the luma weights matter
    rgb = np.stack([pil_grey(shared_data / f"isbi2012/train/images/{i}.png") for i in (0, 1, 2)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", np.concatenate([rgb, alpha], -1), photometric="rgb")
    expected = pil_grey(tmp_path / "rgb.png")
    for name in ("rgb.png", "rgb.tif", "rgba.tif"):
        with open_volume(tmp_path / name) as v:
            assert v.dtype == np.uint8 and not v.is_volume
            assert np.array_equal(v.read()[0], expected), name
    assert np.array_equal(read_all(SourceSpec(str(tmp_path / "rgb.tif"), channel=1))[0], rgb[..., 1])


def test_cdeep3m_palette_labels(shared_data, tmp_path):
    import tifffile

    folder = shared_data / "cdeep3m_mito_sbem/training/labels"
    im = Image.open(folder / "mitos_3D.010.png")
    assert im.mode == "P"
    label = read_all(folder / "mitos_3D.010.png")[0]
    assert set(np.unique(label)) == {0, 1} and np.array_equal(label, pil_grey(folder / "mitos_3D.010.png"))
    with open_volume(folder) as v:  # the 20 palette slices as one stack
        assert sha(v.read()) == stats(shared_data, "cdeep3m_mito_sbem")["training/labels"]["sha256_of_array_bytes"]
    # the same palette image as a palette TIFF reads the same ('L' of the colour map)
    colormap = (np.asarray(im.getpalette(), np.uint16).reshape(-1, 3).T * 257)
    colormap = np.pad(colormap, ((0, 0), (0, 256 - colormap.shape[1])))
    tifffile.imwrite(tmp_path / "palette.tif", np.asarray(im), photometric="palette", colormap=colormap)
    assert np.array_equal(read_all(tmp_path / "palette.tif")[0], label)


def test_cem500k_example_tiffs(shared_data):
    info = stats(shared_data, "cem500k_example_patches")
    tiffs = sorted((shared_data / "cem500k_example_patches/occlusion").glob("*.tiff"))
    assert len(tiffs) == 10
    for path in tiffs:
        expected = info[f"occlusion/{path.name}"]
        with open_volume(path) as v:
            assert v.shape == (1, *expected["shape"]) and not v.is_volume and v.reader == "tiff"
            assert sha(v.read()[0]) == expected["sha256_of_array_bytes"]


def test_jpeg_and_16bit_png(tmp_path, shared_data):
    import tifffile

    Image.open(shared_data / "isbi2012/train/images/3.png").save(tmp_path / "isbi.jpg", quality=90)
    jpg = read_all(tmp_path / "isbi.jpg")[0]
    assert np.array_equal(jpg, pil_grey(tmp_path / "isbi.jpg"))  # exact: same decoder
    original = pil_grey(shared_data / "isbi2012/train/images/3.png").astype(int)
    assert np.abs(jpg.astype(int) - original).mean() < 6  # lossy, but close to the original
    tile = tifffile.imread(shared_data / TILE)
    Image.fromarray(tile).save(tmp_path / "tile16.png")  # 16-bit greyscale PNG
    with open_volume(tmp_path / "tile16.png") as v:
        assert v.dtype == np.uint16 and np.array_equal(v.read()[0], tile)


def test_one_pixel_image_opens(tmp_path, shared_data):
    Image.open(shared_data / "isbi2012/train/images/0.png").crop((5, 5, 6, 6)).save(tmp_path / "px.png")
    with open_volume(tmp_path / "px.png") as v:
        assert v.shape == (1, 1, 1) and v.read().shape == (1, 1, 1)


# --------------------------------------------------------------------------- TIFF stacks


def test_tiff_16bit_tile_signed_and_float(tmp_path, shared_data):
    import tifffile

    tile = tifffile.imread(shared_data / TILE)
    with open_volume(shared_data / TILE) as v:  # has a thumbnail page: only series 0 is read
        assert (v.shape, v.dtype, v.is_volume) == ((1, 800, 800), np.uint16, False)
        assert v.voxel_size is None  # its resolution tag is 1 pixel/cm print metadata, ignored
        assert np.array_equal(v.read()[0], tile)
    signed = (tile.astype(np.int32) - 32768).astype(np.int16)
    floats = tile.astype(np.float32) / 65535
    tifffile.imwrite(tmp_path / "i16.tif", signed)
    tifffile.imwrite(tmp_path / "f32.tif", floats, compression="zlib")
    tifffile.imwrite(tmp_path / "be.tif", tile, byteorder=">")
    for name, expected in (("i16.tif", signed), ("f32.tif", floats), ("be.tif", tile)):
        out = read_all(tmp_path / name)[0]
        assert out.dtype == expected.dtype.newbyteorder("=") and np.array_equal(out, expected), name


@pytest.mark.parametrize("name", ["plain.tif", "zlib_big.tif", "imagej.tif", "ome.ome.tif"])
def test_multipage_tiff(made, name):
    with open_volume(made[name]) as v:
        assert (v.shape, v.dtype, v.is_volume, v.chunk_zyx) == ((24, 250, 250), np.uint8, True, (1, 250, 250))
        assert np.array_equal(v.read(), made["sub"])
        assert np.array_equal(v.read(slice(3, 11, 2), slice(7, 99), slice(200, None)), made["sub"][3:11:2, 7:99, 200:])
        if name == "plain.tif":
            assert isinstance(v._arr, np.memmap)  # uncompressed contiguous data is memory-mapped
        if name in ("imagej.tif", "ome.ome.tif"):
            assert (v.voxel_size, v.voxel_size_from) == ((10.0, 8.0, 8.0), "file")


def test_compressed_tiff_range_decodes_only_its_pages(tmp_path, made):
    import tifffile

    path = tmp_path / "damaged.tif"
    shutil.copy(made["zlib_big.tif"], path)
    with tifffile.TiffFile(path) as t:
        off, n = t.pages[-1].dataoffsets[0], t.pages[-1].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[off:off + n] = b"\xff" * n  # garble the last page's compressed strip only
    path.write_bytes(bytes(data))
    with open_volume(path) as v:
        assert np.array_equal(v.read(slice(0, 5)), made["sub"][:5])  # never touches the last page
        with pytest.raises(ReaderError, match="damaged.tif.*read failed"):
            v.read(slice(23, 24))


# --------------------------------------------------------------------------- chunked / volume formats


def test_ome_zarr_16bit_levels(shared_data):
    import tifffile

    info = stats(shared_data, "muvis_align_sem_tiles")[TILE_ZARR.split("/", 1)[1]]
    with open_volume(shared_data / TILE_ZARR) as v:
        assert (v.shape, v.dtype, v.is_volume, v.reader) == ((1, 800, 800), np.uint16, True, "zarr")
        assert v.voxel_size_from == "file" and v.voxel_size[1:] == (32.0, 32.0)  # 0.032 micrometer
        assert v.voxel_size[0] == 1000.0  # z scale 1.0 micrometer, as the metadata says
        full = v.read()
        assert sha(full) == info["0"]["sha256_of_array_bytes"]
        assert np.array_equal(full[0], tifffile.imread(shared_data / TILE))
        assert np.array_equal(v.read(y=slice(10, 333), x=slice(700, None, 3)), full[:, 10:333, 700::3])
    for level, size in ((1, 400), (2, 200)):
        with open_volume(SourceSpec(str(shared_data / TILE_ZARR), scale_level=level)) as v:
            assert v.shape == (1, size, size) and v.voxel_size[1:] == (32.0 * 2**level,) * 2
            assert sha(v.read()) == info[str(level)]["sha256_of_array_bytes"]
    with pytest.raises(ReaderError, match=r"scale_level 3 out of range: levels 0\.\.2"):
        open_volume(SourceSpec(str(shared_data / TILE_ZARR), scale_level=3))


def test_zarr_v2_ome04_plain_and_channels(made):
    sub = made["sub"]
    with open_volume(made["v2.zarr"]) as v:
        assert (v.voxel_size, v.chunk_zyx) == ((10.0, 8.0, 8.0), (5, 125, 125))
        assert np.array_equal(v.read(slice(4, 13), slice(100, 180)), sub[4:13, 100:180])
    with open_volume(made["plain_v2.zarr"]) as v:  # no OME: picks 'raw' and says so
        assert v.shape == sub.shape and v.voxel_size is None and "picked array 'raw'" in v.notes[0]
        assert np.array_equal(v.read(slice(20, 24)), sub[20:24])
    assert read_all(SourceSpec(str(made["plain_v2.zarr"]), key="labels")).shape == (8, 250, 250)
    with pytest.raises(ReaderError, match=r"no array 'nope'; available arrays: 'labels' .*'raw'"):
        open_volume(SourceSpec(str(made["plain_v2.zarr"]), key="nope"))
    with pytest.raises(ReaderError, match=r"czyx.zarr: has 2 channels .*set `channel`"):
        open_volume(made["czyx.zarr"])
    assert np.array_equal(read_all(SourceSpec(str(made["czyx.zarr"]), channel=1)), 255 - sub)


@pytest.mark.parametrize("rel, dtype", [
    ("golgi/approximate/binary/fib1-1-0-3.nii.gz", "int8"),
    ("mito/instance/fib1-0-0-0.nii.gz", "int16"),
    ("mito/binary/fib1-3-2-1.nii.gz", "float32"),
    ("fv/instance/fib1-3-3-0.nii.gz", "float64"),
])
def test_urocell_nifti(shared_data, rel, dtype):
    import nibabel

    path = shared_data / "urocell_labels_only" / rel
    assert stats(shared_data, "urocell_labels_only")[rel]["dtype"] == dtype
    with open_volume(path) as v:
        assert (v.shape, v.dtype, v.is_volume) == ((256, 256, 256), np.dtype(dtype), True)
        # unit zooms with unknown units / "1 mm": not a real voxel size (really ~15x16x16 nm)
        assert v.voxel_size is None and v.voxel_size_from == "none" and v.notes
        xyz = np.asarray(nibabel.load(path).dataobj[:, :, 120:124])  # stored x, y, z
        assert np.array_equal(v.read(slice(120, 124)), xyz.transpose(2, 1, 0))
        if dtype == "int8":  # whole volume against the published checksum (of the x, y, z array)
            assert sha(v.read().transpose(2, 1, 0)) == stats(shared_data, "urocell_labels_only")[rel]["sha256_of_array_bytes"]


def test_nifti_voxel_size_from_header_units(tmp_path, made):
    import nibabel

    img = nibabel.Nifti1Image(made["sub"].transpose(2, 1, 0), np.diag([0.008, 0.008, 0.01, 1]))
    img.header.set_xyzt_units("micron")
    nibabel.save(img, tmp_path / "np.nii")
    with open_volume(tmp_path / "np.nii") as v:
        assert v.voxel_size == (10.0, 8.0, 8.0) and np.array_equal(v.read(), made["sub"])
    with open_volume(SourceSpec(str(tmp_path / "np.nii"), voxel_size=(15, 16, 16))) as v:
        assert (v.voxel_size, v.voxel_size_from) == ((15.0, 16.0, 16.0), "manifest")


def test_mrc_fixtures(shared_data):
    import mrcfile

    info = stats(shared_data, "mrc_format_fixtures_emdb")
    with open_volume(shared_data / "mrc_format_fixtures_emdb/EMD-3197.map") as v:
        assert (v.shape, v.dtype, v.voxel_size) == ((20, 20, 20), np.float32, (1.14, 1.14, 1.14))  # 11.4 Å
        assert isinstance(v._arr, np.memmap) and sha(v.read()) == info["EMD-3197.map"]["sha256_of_array_bytes"]
        assert np.array_equal(v.read(slice(5, 9), x=slice(2, 20, 5)), v.read()[5:9, :, 2:20:5])
    gz = shared_data / "mrc_format_fixtures_emdb/emd_3001.map.gz"
    with mrcfile.open(gz) as m:
        stored = m.data.copy()  # (sections, rows, columns) = (y, x, z): MAPC=3, MAPR=1, MAPS=2
    assert sha(stored) == info["emd_3001.map.gz"]["sha256_of_array_bytes"]
    with open_volume(gz) as v:
        assert v.shape == (73, 25, 43) and np.array_equal(v.read(), stored.transpose(2, 0, 1))
        assert v.voxel_size == pytest.approx((0.045875, 0.03925, 0.044825))  # Å -> nm, z, y, x


def test_mrc_imod_unsigned_bytes(tmp_path, made):
    import mrcfile

    for signed_flag in (0, 1):  # IMOD stamp; flag bit 0 set means the bytes are signed
        path = tmp_path / f"np{signed_flag}.rec"
        with mrcfile.new(path) as m:
            m.set_data(made["sub"].view(np.int8))  # mode 0, the bytes of the real stack
            raw = bytearray(m.header.extra2.tobytes())
            raw[40:48] = np.array([1146047817, signed_flag], "<i4").tobytes()
            m.header.extra2 = bytes(raw)
        out = read_all(path)
        expected = made["sub"].view(np.int8) if signed_flag else made["sub"]
        assert out.dtype == expected.dtype and np.array_equal(out, expected)


def test_gala_hdf5(shared_data):
    import h5py

    info = stats(shared_data, "gala_fibsem_crops")
    path = shared_data / "gala_fibsem_crops/train-gt.lzf.h5"
    with h5py.File(path) as f:
        full = f["stack"][()]
    for spec in (path, SourceSpec(str(path), key="stack"), SourceSpec(str(path), key="/stack")):
        with open_volume(spec) as v:  # autodetected (the single dataset) or named
            assert (v.shape, v.dtype, v.chunk_zyx, v.reader) == ((50, 100, 200), np.int32, (7, 25, 50), "hdf5")
            assert sha(v.read()) == info["train-gt.lzf.h5"]["sha256_of_array_bytes"]
            assert np.array_equal(v.read(slice(3, 30, 4), slice(10, 77), slice(190, 200)), full[3:30:4, 10:77, 190:200])
    with pytest.raises(ReaderError) as err:
        open_volume(SourceSpec(str(path), key="raw"))
    assert err.value.path == str(path) and "no dataset 'raw'; available datasets: 'stack' (50, 100, 200)" in str(err.value)


def test_hdf5_several_datasets(made):
    with open_volume(made["multi.h5"]) as v:  # 'volumes/raw' preferred over larger 'four_d'
        assert v.voxel_size == (10.0, 8.0, 8.0) and v.chunk_zyx == (4, 125, 125)  # element_size_um
        assert np.array_equal(v.read(slice(1, 9, 2), slice(0, 130)), made["sub"][1:9:2, :130])
        assert "picked dataset 'volumes/raw'" in v.notes[0]
    four_d = SourceSpec(str(made["multi.h5"]), key="four_d", channel=1)
    assert np.array_equal(read_all(four_d), 255 - made["sub"])
    with open_volume(SourceSpec(str(made["multi.h5"]), key="ilastik")) as v:  # axes from 'axistags'
        assert v.shape == (24, 250, 250) and np.array_equal(v.read(slice(3, 5)), made["sub"][3:5])


def test_axes_override(shared_data):
    path = shared_data / "gala_fibsem_crops/train-image.h5"
    full = read_all(path)
    with open_volume(SourceSpec(str(path), axes="xyz")) as v:  # declare the stored order x, y, z
        assert v.shape == (200, 100, 50) and v.chunk_zyx == (1, 100, 50)
        assert np.array_equal(v.read(slice(10, 20), x=slice(5, 9)), full.transpose(2, 1, 0)[10:20, :, 5:9])
    with pytest.raises(ReaderError, match=r"axes 'czyx' has 4 letters but the array is 3-D"):
        open_volume(SourceSpec(str(path), axes="czyx"))


@pytest.mark.parametrize("name", ["raw.nrrd", "gzip.nrrd"])
def test_nrrd(made, name):
    with open_volume(made[name]) as v:
        assert (v.shape, v.voxel_size, v.voxel_size_from) == ((24, 250, 250), (10.0, 8.0, 8.0), "file")
        assert isinstance(v._arr, np.memmap) == (name == "raw.nrrd")  # raw data is memory-mapped
        assert np.array_equal(v.read(), made["sub"])
        assert np.array_equal(v.read(slice(20, None), x=slice(1, 2)), made["sub"][20:, :, 1:2])


def test_video_lossless_and_lossy(made):
    for name in ("ffv1.avi", "png_rgb.avi"):  # lossless grey / RGB (R=G=B) frames: exact
        with open_volume(made[name]) as v:
            assert (v.shape, v.dtype, v.is_volume, v.reader) == ((24, 250, 250), np.uint8, True, "video")
            assert np.array_equal(v.read(slice(5, 9)), made["sub"][5:9])
            assert np.array_equal(v.read(slice(2, 3), slice(10, 20)), made["sub"][2:3, 10:20])  # goes back
            assert np.array_equal(v.read(), made["sub"])
    with open_volume(made["h264.mp4"]) as v:  # lossy codec: close, not equal
        assert v.shape == (24, 250, 250)
        assert np.abs(v.read().astype(int) - made["sub"]).mean() < 8


# --------------------------------------------------------------------------- bad input


def _cut(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize("case, problem", [
    ("truncated.png", "truncated"),
    ("truncated.tif", "truncated"),
    ("truncated_pages.tif", "truncated"),
    ("truncated.map", "truncated"),
    ("truncated.h5", "truncated"),
    ("scan.xyz", "unknown file type '.xyz'"),
    ("empty.png", "empty file (0 bytes)"),
    ("empty.tif", "empty file (0 bytes)"),
    ("empty.h5", "empty file (0 bytes)"),
    ("png_bytes.tif", "not a TIFF"),
    ("four_d.tif", "4-D array (shape (2, 24, 250, 250)) needs a channel choice"),
    ("four_d.h5", "4-D array (shape (2, 24, 250, 250)) needs a channel choice"),
    ("line.h5", "1-D array (shape (250,)) is not an image"),
    ("empty.zarr", "empty volume: array shape (0, 250, 250) has a zero-size axis"),
    ("empty_ds.h5", "empty volume"),
    ("groundtruth.h5.gz", "decompress it first"),
    ("missing.png", "does not exist"),
])
def test_bad_input_raises_reader_error(tmp_path, shared_data, made, case, problem):
    isbi = shared_data / "isbi2012/train/images/0.png"
    spec = {
        "truncated.png": lambda: _cut(isbi, tmp_path / case),
        "truncated.tif": lambda: _cut(made["zlib_big.tif"], tmp_path / case),
        "truncated_pages.tif": lambda: _cut(made["plain.tif"], tmp_path / case),
        "truncated.map": lambda: _cut(shared_data / "mrc_format_fixtures_emdb/EMD-3197.map", tmp_path / case),
        "truncated.h5": lambda: _cut(shared_data / "gala_fibsem_crops/train-image.h5", tmp_path / case),
        "scan.xyz": lambda: Path(shutil.copy(isbi, tmp_path / case)),
        "png_bytes.tif": lambda: Path(shutil.copy(isbi, tmp_path / case)),
        "four_d.tif": lambda: made["four_d.tif"],
        "four_d.h5": lambda: SourceSpec(str(made["multi.h5"]), key="four_d"),
        "line.h5": lambda: SourceSpec(str(made["multi.h5"]), key="line"),
        "empty.zarr": lambda: made["empty.zarr"],
        "empty_ds.h5": lambda: SourceSpec(str(made["multi.h5"]), key="empty"),
        "groundtruth.h5.gz": lambda: shared_data / "neuroproof_fibsem_medulla/training_sample2/groundtruth.h5.gz",
        "missing.png": lambda: tmp_path / case,
    }.get(case, lambda: (tmp_path / case).touch() or tmp_path / case)()
    with pytest.raises(ReaderError) as err:
        with open_volume(spec) as v:
            v.read()
    path = spec.path if isinstance(spec, SourceSpec) else str(spec)
    assert err.value.path == path and str(err.value) == f"{path}: {err.value.problem}"
    assert problem in err.value.problem and "\n" not in str(err.value)
    assert Path(path).name in str(err.value)


def test_stack_errors_name_the_bad_slice(tmp_path, shared_data):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(2600, 2605):
        shutil.copy(shared_data / NP_DIR / f"iso.{i}.png", folder)
    _cut(shared_data / NP_DIR / "iso.2605.png", folder / "iso.2605.png")
    with open_volume(folder) as v:  # headers are fine; only reading the cut slice fails
        assert v.shape == (6, 250, 250) and v.read(slice(0, 5)).shape == (5, 250, 250)
        with pytest.raises(ReaderError, match=r"iso\.2605\.png: .*truncated"):
            v.read(slice(4, 6))
    shutil.copy(shared_data / "isbi2012/train/images/0.png", folder / "iso.2606.png")
    with pytest.raises(ReaderError, match=r"slices: slice 'iso.2606.png' is \(512, 512\) uint8 but 'iso.2600.png' is \(250, 250\)"):
        open_volume(folder)



def test_stack_of_png_and_tiff_slices_reads_each_like_a_single_file(tmp_path, shared_data):
    """A stack opens each slice with that file's own reader (PNG or TIFF; the TIFF slices are real
    NeuroProof PNGs converted with tifffile), and a bad slice is named as when opened alone."""
    import tifffile

    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(2600, 2604):
        src = shared_data / NP_DIR / f"iso.{i}.png"
        if i % 2:
            tifffile.imwrite(folder / f"iso.{i}.tif", np.asarray(Image.open(src)))
        else:
            shutil.copy(src, folder)
    files = sorted(folder.iterdir(), key=lambda f: int(f.stem.split(".")[1]))  # iso.2600 .. iso.2603
    with open_volume(folder) as v:
        assert v.shape == (4, 250, 250)
        block = v.read(slice(0, 4), slice(10, 90), slice(20, 60))
    for k, f in enumerate(files):
        with open_volume(f) as single:
            assert np.array_equal(block[k], single.read(slice(None), slice(10, 90), slice(20, 60))[0])
    (folder / "iso.2604.tif").write_bytes(b"")
    with pytest.raises(ReaderError, match=r"iso\.2604\.tif: empty file \(0 bytes\)"):
        open_volume(folder)


# --------------------------------------------------------------------------- discover / manifests


def _tree(root: Path, shared_data: Path) -> Path:
    """A small mixed lab folder built from copies of real files."""
    (root / "stack").mkdir(parents=True)
    for i in (2, 10, 1):  # natural order 1, 2, 10
        shutil.copy(shared_data / NP_DIR / f"iso.{2600 + i}.png", root / "stack" / f"iso.{i}.png")
    (root / "stack" / "README.txt").write_text("acquisition notes")
    (root / "mixed").mkdir()
    shutil.copy(shared_data / "isbi2012/train/images/0.png", root / "mixed" / "a.png")
    shutil.copy(shared_data / NP_DIR / "iso.2600.png", root / "mixed" / "b.png")
    (root / "deep" / "er").mkdir(parents=True)
    shutil.copy(shared_data / "gala_fibsem_crops/train-image.h5", root / "deep" / "er" / "crop.h5")
    shutil.copytree(shared_data / TILE_ZARR, root / "deep" / "tile.ome.zarr")
    shutil.copy(shared_data / "mrc_format_fixtures_emdb/emd_3001.map.gz", root / "deep" / "emd.map.gz")
    (root / "deep" / ".DS_Store").write_text("x")
    (root / "deep" / "empty.tif").touch()
    return root


def test_discover(tmp_path, shared_data):
    root = _tree(tmp_path / "lab", shared_data)
    specs, skipped = discover([root, tmp_path / "nope"])
    rel = [os.path.relpath(s.path, root) for s in specs]
    assert rel == ["deep/emd.map.gz", "deep/er/crop.h5", "deep/tile.ome.zarr", "mixed/a.png",
                   "mixed/b.png", "stack/iso.1.png", "stack/iso.2.png", "stack/iso.10.png"]
    assert [s.name for s in specs][:3] == ["emd", "crop", "tile"]
    assert len({s.name for s in specs}) == len(specs)
    assert {(os.path.relpath(p, root) if "nope" not in p else "nope", why) for p, why in skipped} == {
        ("deep/empty.tif", "empty file (0 bytes)"), ("stack/README.txt", "unknown file type '.txt'"),
        ("nope", "does not exist")}
    stacked, _ = discover([root], stack_folders=True)  # 'mixed' has two shapes: stays 2 files
    rel = [os.path.relpath(s.path, root) for s in stacked]
    assert rel[-3:] == ["mixed/a.png", "mixed/b.png", "stack"] and stacked[-1].stack
    with open_volume(stacked[-1]) as v:
        assert v.shape == (3, 250, 250)
        assert np.array_equal(v.read(slice(2, 3))[0], pil_grey(shared_data / NP_DIR / "iso.2610.png"))
    assert discover([root], stack_folders=True) == (stacked, _)  # deterministic


def test_discover_makes_unique_names(shared_data):
    specs, skipped = discover([shared_data / "urocell_labels_only"])
    assert len(specs) == 42 and len({s.name for s in specs}) == 42
    names = {os.path.relpath(s.path, shared_data / "urocell_labels_only"): s.name for s in specs}
    assert names["mito/binary/fib1-0-0-0.nii.gz"] == "mito_binary_fib1-0-0-0"
    assert names["golgi/precise/binary/fib1-2-2-3.nii.gz"] == "precise_binary_fib1-2-2-3"
    assert {Path(p).name: why for p, why in skipped} == {
        "README.md": "unknown file type '.md'", "SOURCE.md": "unknown file type '.md'",
        "STATS.json": "unknown file type '.json'", "MANIFEST.sha256": "unknown file type '.sha256'"}


def test_load_manifest_yaml_and_csv(tmp_path, shared_data):
    gala = os.path.relpath(shared_data / "gala_fibsem_crops/train-gt.lzf.h5", tmp_path)
    isbi = os.path.relpath(shared_data / "isbi2012/train/images", tmp_path)
    (tmp_path / "m.yaml").write_text(
        f"sources:\n  - path: {gala}\n    voxel_size: [10, 10, 10]\n    key: stack\n"
        f"  - {{path: {isbi}, stack: true, name: isbi_train, voxel_size: '50,4,4'}}\n  - {gala}\n"
    )
    specs = load_manifest(tmp_path / "m.yaml")
    assert [s.name for s in specs] == ["train-gt.lzf", "isbi_train", "train-gt.lzf-2"]
    # Both sides resolved: the data folder may be reached through a symlink (../shared often is one).
    assert Path(specs[0].path).resolve() == (shared_data / "gala_fibsem_crops/train-gt.lzf.h5").resolve()
    with open_volume(specs[1]) as v:
        assert (v.shape, v.voxel_size, v.voxel_size_from) == ((30, 512, 512), (50.0, 4.0, 4.0), "manifest")
    (tmp_path / "m.csv").write_text(
        f"name,path,voxel_size,key,stack\ngt,{gala},\"8,4,4\",stack,\nisbi,{isbi},,,yes\n")
    specs = load_manifest(tmp_path / "m.csv")
    assert [(s.name, s.voxel_size, s.key, s.stack) for s in specs] == [
        ("gt", (8.0, 4.0, 4.0), "stack", False), ("isbi", None, None, True)]
    assert load_manifest(tmp_path / "m.yaml") == load_manifest(tmp_path / "m.yaml")


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "- path: a.h5\n- path: b.h5\n  voxel_size: 4,4\n", "entry 2 (line 2): voxel_size must be 3 positive"),
    ("typo.yaml", "sources:\n  - path: a.h5\n    voxelsize: 4\n", "entry 1 (line 2): unknown field(s) ['voxelsize']"),
    ("bad.csv", "path,channel\na.h5,0\nb.h5,-1\n", "entry 2 (line 3): channel must be an integer >= 0"),
    ("header.csv", "file,voxel\na.h5,4\n", "CSV header must name 'path'"),
    ("dupe.yaml", "- {path: a.h5, name: x}\n- {path: b.h5, name: x}\n", "duplicate source name(s) ['x']"),
    ("axes.yaml", "- {path: a.h5, axes: zyq}\n", "entry 1 (line 1): axes must use"),
])
def test_load_manifest_bad_entries(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ReaderError) as err:
        load_manifest(tmp_path / name)
    assert err.value.path == str(tmp_path / name) and message in err.value.problem


def test_spec_json_describe_and_pickling(shared_data):
    spec = SourceSpec(str(shared_data / TILE_ZARR), voxel_size="30,32,32", scale_level="1", stack="no")
    assert spec.voxel_size == (30.0, 32.0, 32.0) and spec.scale_level == 1 and spec.stack is False
    assert SourceSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(ValueError, match="unknown field"):
        SourceSpec.from_json({"path": "a", "colour": 1})
    with open_volume(SourceSpec(str(shared_data / TILE), key="x")) as v:
        d = describe(v)
    assert json.loads(json.dumps(d)) == d
    assert d["reader"] == "tiff" and d["shape"] == [1, 800, 800] and d["dtype"] == "uint16"
    assert d["notes"] == ["option 'key' does not apply to tiff sources; ignored"]
    err = pickle.loads(pickle.dumps(ReaderError("a.png", "empty file (0 bytes)")))
    assert (err.path, err.problem, str(err)) == ("a.png", "empty file (0 bytes)", "a.png: empty file (0 bytes)")


def test_source_files_and_fingerprint_stand_for_the_data_not_every_chunk(shared_data, made, tmp_path):
    import nrrd

    from curation.readers import source_files, source_fingerprint

    folder = shared_data / "neuroproof_fibsem_medulla" / "training_sample1" / "grayscale_maps"
    assert [f.name for f in source_files(folder)] == natural_sorted(p.name for p in folder.glob("*.png"))
    # zarr stores: metadata only, never the chunk files (a large store has millions)
    v2 = source_files(made["v2.zarr"])
    assert {f.name for f in v2} <= {".zgroup", ".zattrs", ".zarray"} and made["v2.zarr"] / "0" / ".zarray" in v2
    v3 = source_files(shared_data / TILE_ZARR)
    assert len(v3) == 4 and {f.name for f in v3} == {"zarr.json"}  # the group and its 3 levels
    # a detached NRRD header comes with its data file
    nrrd.write(str(tmp_path / "detached.nhdr"), made["sub"], detached_header=True)
    assert {f.name for f in source_files(tmp_path / "detached.nhdr")} == {p.name for p in tmp_path.glob("detached.*")}
    assert len(list(tmp_path.glob("detached.*"))) == 2
    # the fingerprint follows any slice's size or time, and nothing else
    stack = tmp_path / "stack"
    stack.mkdir()
    for f in source_files(folder)[:3]:
        shutil.copy2(f, stack / f.name)
    before = source_fingerprint(stack)
    (stack / "notes.txt").write_text("not a slice")
    assert source_fingerprint(stack) == before
    st = (stack / source_files(folder)[1].name).stat()
    os.utime(stack / source_files(folder)[1].name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert source_fingerprint(stack) != before
