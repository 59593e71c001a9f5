"""Tiles of the fixed global grid: ids name the same ground whatever the imagery's extent."""

from __future__ import annotations

import pytest
import shapely
from affine import Affine

from minemap.errors import ImageryError
from minemap.grid import make_tiles
from minemap.lattice import Grid


def _ground(grid: Grid, tile) -> tuple[float, ...]:
    return tuple(round(v, 6) for v in tile.grid(grid).bounds)


def test_tile_ids_do_not_depend_on_the_extent():
    big = Grid("EPSG:3857", Affine(10.0, 0, -1234.0, 0, -10.0, 5678.0), 300, 260)
    small = big.window(37, 81, 150, 90)  # another extent on the same pixel lattice
    t_big = {t.tile_id: _ground(big, t) for t in make_tiles(big, 64)}
    t_small = {t.tile_id: _ground(small, t) for t in make_tiles(small, 64)}
    assert set(t_small) <= set(t_big)
    for tid, bounds in t_small.items():  # a shared id is the same ground, cut where the smaller extent ends
        b = shapely.box(*t_big[tid])
        assert shapely.box(*bounds).within(b.buffer(1e-6)), tid
    # the tiles cover every pixel exactly once; interior tiles are whole
    tiles = make_tiles(big, 64)
    assert sum(t.width * t.height for t in tiles) == 300 * 260
    assert max(t.width for t in tiles) == 64 and max(t.height for t in tiles) == 64
    # tile x{i}_y{j} lies on the lattice of side 640 m anchored at the CRS origin
    t = next(t for t in tiles if t.width == 64 and t.height == 64)
    left, bottom, right, top = t.grid(big).bounds
    i, j = (int(v) for v in t.tile_id[1:].split("_y"))
    # (the pixels whose centres lie in the cell: edges within half a pixel of the lattice's)
    assert abs(left - i * 640) <= 5 and abs(right - (i + 1) * 640) <= 5 and abs(top + j * 640) <= 5


def test_negative_coordinates_and_aoi():
    g = Grid("EPSG:32630", Affine(5.0, 0, -1000.0, 0, -5.0, -2000.0), 100, 100)  # west and south of the origin
    tiles = make_tiles(g, 50)
    assert [t.tile_id for t in tiles] == ["x-4_y8", "x-3_y8", "x-4_y9", "x-3_y9"]
    assert sum(t.width * t.height for t in tiles) == 100 * 100
    aoi = shapely.box(-990, -2100, -960, -2050)  # the top-left corner only
    assert [t.tile_id for t in make_tiles(g, 50, aoi)] == [tiles[0].tile_id]


def test_rotated_grid_is_refused():
    with pytest.raises(ImageryError, match="north-up"):
        make_tiles(Grid("EPSG:3857", Affine(10.0, 1.0, 0, 0, -10.0, 0), 10, 10), 4)
