"""The project's one tiler (cemnet/segment/tiling.py): tile starts under each edge rule and the
2D tile cutter that the filter-threshold study and the probe use. Index arrays (each pixel holds
its own position) check placement exactly; a real SEM image checks that nothing is lost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cemnet.segment.tiling import EDGES, cut_tiles, tile_starts


@pytest.mark.parametrize("length", [1, 50, 63, 64, 65, 100, 128, 129, 300])
@pytest.mark.parametrize("halo", [0, 8])
def test_every_edge_rule_covers_what_it_promises(length: int, halo: int) -> None:
    tile = 64
    step = tile - 2 * halo
    flush, truncate, drop = (tile_starts(length, tile, halo, e) for e in EDGES)
    for starts in (flush, truncate, drop):
        assert starts == sorted(set(starts)) and all(s >= 0 for s in starts)
    # flush: every tile inside the axis (one at 0 when the axis is shorter), the last one ends at it
    assert all(s + tile <= length for s in flush) or flush == [0]
    assert flush[-1] + tile == length or (length <= tile and flush == [0])
    # truncate: a regular grid that reaches the end, with no tile starting past what is needed
    assert truncate == [i * step for i in range(len(truncate))] and truncate[-1] + tile >= length
    assert len(truncate) == 1 or truncate[-2] + tile < length
    # drop: the regular grid's whole tiles only
    assert drop == [s for s in truncate if s + tile <= length]
    assert drop == [] if length < tile else drop[-1] + tile + step > length


def test_segment_grid_unchanged() -> None:
    assert tile_starts(100, 64, 16) == [0, 32, 36]  # the inference grid: last tile flush
    assert tile_starts(100, 64, 0, "truncate") == [0, 64] and tile_starts(100, 64, 0, "drop") == [0]
    with pytest.raises(ValueError, match="unknown tile edge rule 'wrap'"):
        tile_starts(100, 64, 0, "wrap")


@pytest.mark.parametrize("edge", ["truncate", "drop", "flush"])
def test_cut_tiles_places_every_pixel(edge: str) -> None:
    index = np.arange(130 * 75, dtype=np.int32).reshape(130, 75) + 1  # 0 is left for padding
    tiles, sizes = cut_tiles(index, 32, edge)
    ys, xs = tile_starts(130, 32, 0, edge), tile_starts(75, 32, 0, edge)
    assert tiles.shape == (len(ys) * len(xs), 32, 32) and tiles.dtype == np.int32 and sizes.dtype == np.int64
    for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
        h, w = sizes[k]
        assert (h, w) == (min(32, 130 - y), min(32, 75 - x))
        assert (tiles[k, :h, :w] == index[y: y + h, x: x + w]).all()
        assert (tiles[k, h:] == 0).all() and (tiles[k, :, w:] == 0).all()


def test_cut_tiles_rejects_a_volume() -> None:
    with pytest.raises(ValueError, match=r"2D image, got shape \(2, 3, 4\)"):
        cut_tiles(np.zeros((2, 3, 4), np.uint8), 2)


def test_truncated_tiles_of_a_real_image_put_back_together(shared_data: Path) -> None:
    """AxonDeepSeg's 1096 x 1541 SEM image: 5 x 7 tiles of 224, the last row and column truncated."""
    image = np.asarray(Image.open(shared_data / "axondeepseg_sem_demo" / "image.png").convert("L"))
    tiles, sizes = cut_tiles(image, 224)
    assert len(tiles) == 5 * 7 and sizes[-1].tolist() == [1096 - 4 * 224, 1541 - 6 * 224]
    rebuilt = tiles.reshape(5, 7, 224, 224).transpose(0, 2, 1, 3).reshape(5 * 224, 7 * 224)
    assert (rebuilt[:1096, :1541] == image).all() and not rebuilt[1096:].any() and not rebuilt[:, 1541:].any()
