"""Hashing, dedup, uint8 conversion and patch geometry, on real EM data."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from curation.to_uint8 import ConversionError, Uint8Converter
from curation.dedup import exemplar_mask, greedy_groups, greedy_groups_reference
from curation.hashing import dhash_batch, dhash_reference, hamming, pack_bits, unpack_bits
from curation.patching import anisotropy, extract_patches, grid_starts, plan_planes, slice_indices


def _real_patches(shared_data, n_images=6, patch=224):
    """Grid patches (with truncated edges) of real ISBI 2012 + CDeep3M + axon SEM images."""
    files = sorted((shared_data / "isbi2012" / "train" / "images").glob("*.png"))[:n_images]
    files += sorted((shared_data / "cdeep3m_mito_sbem" / "training" / "images").glob("*.png"))[:2]
    files += [shared_data / "axondeepseg_sem_demo" / "image.png"]
    patches, sizes = [], []
    for f in files:
        p, boxes = extract_patches(np.asarray(Image.open(f).convert("L")), patch)
        patches.append(p)
        sizes.append(boxes[:, 2:])
    return np.concatenate(patches), np.concatenate(sizes)


def test_vectorised_dhash_matches_cem500k_reference_bit_for_bit(shared_data):
    patches, sizes = _real_patches(shared_data)
    assert (sizes < 224).any(), "the sample must include truncated edge patches"
    fast = dhash_batch(patches, sizes)
    ref = np.array([dhash_reference(p[:h, :w]) for p, (h, w) in zip(patches, sizes)], dtype=np.uint64)
    assert np.array_equal(fast, ref)
    # Same bits as imagehash's own string form (first bit most significant).
    import imagehash

    image = Image.fromarray(patches[0]).resize((224, 224), resample=Image.Resampling.BILINEAR)
    assert f"{int(fast[0]):016x}" == str(imagehash.dhash(image, hash_size=8))


def test_dhash_other_patch_size_and_bit_packing(shared_data):
    patches, sizes = _real_patches(shared_data, n_images=2, patch=128)
    fast = dhash_batch(patches, sizes)
    ref = np.array([dhash_reference(p[:h, :w], 128) for p, (h, w) in zip(patches, sizes)], dtype=np.uint64)
    assert np.array_equal(fast, ref)
    assert np.array_equal(pack_bits(unpack_bits(fast)), fast)
    assert hamming(fast[0], fast[0]) == 0
    assert hamming(np.uint64(0), np.uint64(2**64 - 1)) == 64
    with pytest.raises(ValueError, match="uint8"):
        dhash_batch(patches.astype(np.float32))


def _neuroproof_hashes(shared_data, n_slices=60):
    """Hashes of overlapping 224 crops of consecutive NeuroProof slices: many true near-duplicates."""
    folder = shared_data / "neuroproof_fibsem_medulla" / "training_sample1" / "grayscale_maps"
    files = sorted(folder.glob("*.png"))[:n_slices]
    crops = []
    for f in files:
        img = np.asarray(Image.open(f).convert("L"))
        for y, x in ((0, 0), (26, 26), (13, 0)):
            crops.append(img[y : y + 224, x : x + 224])
    return dhash_batch(np.stack(crops))


def test_dedup_matches_straightforward_cem500k_rule(shared_data):
    hashes = _neuroproof_hashes(shared_data)
    for seed in (0, 1, 7):
        for distance in (6, 12):
            ref = greedy_groups_reference(hashes, distance, seed)
            for batch in (1, 16, 4096):
                got = greedy_groups(hashes, distance, seed, batch_size=batch)
                assert np.array_equal(got, ref), (seed, distance, batch)
    groups = greedy_groups(hashes, 12, 0)
    ex = exemplar_mask(groups)
    assert 1 < ex.sum() < len(hashes), "real adjacent FIB-SEM slices must contain near-duplicates"
    # Every member is within the distance of its exemplar; exemplars point at themselves.
    assert (hamming(hashes, hashes[groups]) <= 12).all()
    assert np.array_equal(groups[ex], np.nonzero(ex)[0])


def test_dedup_seed_changes_exemplars_not_count_semantics(shared_data):
    hashes = _neuroproof_hashes(shared_data, 30)
    a, b = greedy_groups(hashes, 12, 0), greedy_groups(hashes, 12, 1)
    assert not np.array_equal(a, b)
    assert len(greedy_groups(np.zeros(0, np.uint64))) == 0


def test_uint8_cem500k_rule_for_16bit_tiles(shared_data):
    tile = tifffile.imread(shared_data / "muvis_align_sem_tiles" / "tiff_uint16" / "S000" / "000_000_0.tiff")
    conv = Uint8Converter.fit(tile, tile.dtype, "dtype")
    out = conv(tile)
    expected = (tile.astype(np.float32) / 65535 * 255).astype(np.uint8)  # CEM500K cross_section3d.py
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    # The CEM500K 2D-script bug (bits = int('uint16'[-2]) = 1) would saturate; we span the real range.
    assert 100 < out.mean() < 220 and out.std() > 5
    pct = Uint8Converter.fit(tile, tile.dtype, "percentile")(tile)
    assert pct.min() == 0 and pct.max() == 255 and pct.std() > out.std()


def test_uint8_auto_stretches_wide_integers_the_dtype_range_would_flatten(shared_data):
    """Real 16-bit SEM tile stored as uint32 (converted here; no uint32 EM in the shared data):
    by its dtype range it would be all 0; `auto` stretches it and says why; `dtype` obeys."""
    tile = tifffile.imread(shared_data / "muvis_align_sem_tiles" / "tiff_uint16" / "S000" / "000_000_0.tiff")
    wide = tile.astype(np.uint32)
    auto = Uint8Converter.fit(wide, wide.dtype)
    assert auto.rule == "percentile" and "1 of 256 grey levels" in auto.stats["note"]
    assert np.array_equal(auto(wide), Uint8Converter.fit(tile, tile.dtype, "percentile")(tile))
    forced = Uint8Converter.fit(wide, wide.dtype, "dtype")
    assert forced.rule == "dtype" and forced(wide).max() == 0 and "only 1 of 256" in forced.stats["note"]
    twelve_bit = (tile >> 4).astype(np.uint16)  # 12-bit data in uint16: 16 grey levels by dtype range
    assert Uint8Converter.fit(twelve_bit, twelve_bit.dtype).rule == "percentile"
    assert "note" not in Uint8Converter.fit(tile, tile.dtype).stats  # full-range 16-bit: CEM500K's rule
    assert Uint8Converter.fit(tile, tile.dtype).rule == "dtype"


def test_uint8_signed_float_nan_and_constant(shared_data):
    tile = tifffile.imread(shared_data / "muvis_align_sem_tiles" / "tiff_uint16" / "S000" / "000_001_0.tiff")
    signed = (tile.astype(np.int32) - 45000).astype(np.int16)  # real data, shifted to have negatives
    s8 = Uint8Converter.fit(signed, signed.dtype, "dtype")(signed)
    assert s8.min() < s8.max()
    # Monotone mapping: order of values preserved.
    flat = signed.ravel()[:5000]
    order = np.argsort(flat, kind="stable")
    assert (np.diff(s8.ravel()[:5000][order].astype(int)) >= 0).all()
    as_float = tile.astype(np.float32) / 65535.0
    as_float[:10, :10] = np.nan
    as_float[10, :5] = np.inf
    conv = Uint8Converter.fit(as_float, as_float.dtype)  # auto -> percentile for float
    assert conv.rule == "percentile" and conv.stats["nonfinite_fraction"] > 0
    f8 = conv(as_float)
    assert (f8[:10, :10] == 0).all() and (f8[10, :5] == 0).all() and f8.max() == 255
    const = np.full((50, 50), 7.5, np.float32)
    assert (Uint8Converter.fit(const, const.dtype)(const) == 0).all()
    with pytest.raises(ConversionError, match="no finite"):
        Uint8Converter.fit(np.full((4, 4), np.nan, np.float32), np.float32)
    with pytest.raises(ValueError, match="unknown uint8 rule"):
        Uint8Converter.fit(tile, tile.dtype, "magic")


def test_patch_grid_edges_and_small_images():
    assert grid_starts(512, 224) == [0, 224]  # leftover 64 < 112: dropped
    assert grid_starts(560, 224) == [0, 224, 448]  # leftover 112 >= 112: truncated edge patch
    assert grid_starts(150, 224) == [0]  # smaller than a patch, >= half: one truncated patch
    assert grid_starts(100, 224) == []  # less than half a patch: none
    plane = np.arange(560 * 350, dtype=np.uint32).reshape(560, 350).astype(np.uint8)
    patches, boxes = extract_patches(plane, 224)
    assert patches.shape == (3 * 2, 224, 224)
    y, x, h, w = boxes[-1]
    assert (y, x, h, w) == (448, 224, 112, 126)
    assert np.array_equal(patches[-1, :h, :w], plane[y : y + h, x : x + w])
    assert not patches[-1, h:, :].any() and not patches[-1, :, w:].any()


def test_plane_planning_follows_anisotropy_rule():
    shape = (250, 250, 250)
    assert plan_planes(shape, None, is_volume=True, patch_size=224) == ["xy", "xz", "yz"]
    assert plan_planes(shape, (10, 8, 8), is_volume=True, patch_size=224) == ["xy", "xz", "yz"]  # 0.25
    assert plan_planes(shape, (50, 4, 4), is_volume=True, patch_size=224) == ["xy"]  # ssTEM
    assert plan_planes((20, 1024, 1024), None, is_volume=True, patch_size=224) == ["xy"]  # too thin
    assert plan_planes((1, 512, 512), None, is_volume=False, patch_size=224) == ["xy"]
    assert plan_planes(shape, None, is_volume=True, patch_size=224, max_anisotropy=0.1, axes="xy,yz") == ["xy", "yz"]
    assert anisotropy((10, 8, 8)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown plane"):
        plan_planes(shape, None, is_volume=True, patch_size=224, axes="xy,zz")
    assert slice_indices(250, 1)[-1] == 249  # unlike CEM500K, the last slice is kept
    assert list(slice_indices(10, 4)) == [0, 4, 8]


def test_float32_horizontal_pass_is_exact(shared_data):
    """The float32 fast path with exact fallback equals Pillow's fixed-point arithmetic in float64."""
    from curation.hashing import _clip8, _HorizontalPass, _lanczos_matrix

    matrix = _lanczos_matrix(224, 9)
    horizontal_pass = _HorizontalPass(224, 9)
    assert 0.003 < horizontal_pass.margin.max() < 0.006  # the rigorous float32 error bound
    patches, _ = _real_patches(shared_data, n_images=2)
    rows = [patches.reshape(-1, 224).astype(np.float32)]
    rng = np.random.default_rng(0)
    rows.append(rng.integers(0, 256, (4096, 224)).astype(np.float32))  # worst case for rounding
    for r in rows:
        assert np.array_equal(horizontal_pass(r), _clip8(r.astype(np.float64) @ matrix))
