"""The one lattice: cells, their grids and ids, cover of bounds, neighbours; the pieces every stage cuts by it."""

from __future__ import annotations

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS

from minemap.chips.splits import labelled_ground
from minemap.grid import make_tiles
from minemap.lattice import (Grid, Lattice, neighbours, pixel_boxes, pixel_cells, pixel_offset, snapped_grid,
                             window_origins)

UTM = CRS.from_epsg(32630)


def test_cells_over_bounds_known_answers():
    lat = Lattice(100.0)
    # a box inside one cell; one that ends exactly on a cell's edge does not reach the next
    assert lat.cells_over((10, -90, 90, -10)) == [(0, 0)]
    assert lat.cells_over((0, -100, 100, 0)) == [(0, 0)]
    # across the origin: columns westwards are negative, rows northwards of y=0 are negative
    assert lat.cells_over((-50, -50, 50, 50)) == [(-1, -1), (0, -1), (-1, 0), (0, 0)]
    # an anchored lattice
    assert Lattice(10.0, x0=5.0, y0=5.0).cells_over((6, -4, 16, 4)) == [(0, 0), (1, 0)]


def test_cell_grid_and_bounds_agree():
    lat = Lattice(2560.0)
    g = lat.cell_grid(3, -2, 10.0, UTM)
    assert (g.width, g.height) == (256, 256)
    assert g.bounds == lat.cell_bounds(3, -2) == (7680.0, 2560.0, 10240.0, 5120.0)
    assert lat.cells_over(g.bounds) == [(3, -2)]
    assert Lattice.cell_id(3, -2) == "x3_y-2"


def test_snapped_holds_the_bounds_in_whole_cells():
    x, y, nx, ny = Lattice(0.05).snapped((1.01, -2.33, 1.12, -2.2))
    assert np.isclose(x, 1.0) and np.isclose(y, -2.2) and (nx, ny) == (3, 3)
    g = snapped_grid((101.0, 199.0, 259.0, 411.0), UTM, 10.0)
    assert g.bounds == (100.0, 190.0, 260.0, 420.0) and (g.width, g.height) == (16, 23)


def test_neighbours_within_reach():
    cells = {(i, j) for i in range(5) for j in range(5)}
    assert neighbours(cells, {(0, 0)}, 1) == {(0, 0), (1, 0), (0, 1), (1, 1)}
    assert len(neighbours(cells, {(2, 2)}, 2)) == 25
    assert labelled_ground(cells, {(4, 4)}, 0) == {(4, 4)}
    assert labelled_ground(cells, {(4, 4)}, None) == cells


def test_pixel_boxes_clip_where_the_grid_ends():
    grid = Grid(UTM, Affine(10.0, 0, 1000.0, 0, -10.0, 5000.0), 25, 15)
    whole, cut = pixel_boxes(grid, [0, 20], [0, 10], 10, 10), pixel_boxes(grid, [0, 20], [0, 10], 10, 10, clip=True)
    assert shapely.bounds(whole[0]).tolist() == [1000.0, 4900.0, 1100.0, 5000.0]
    assert shapely.bounds(whole[1]).tolist() == [1200.0, 4800.0, 1300.0, 4900.0]
    assert shapely.bounds(cut[1]).tolist() == [1200.0, 4850.0, 1250.0, 4900.0]


def test_tiles_windows_and_cache_tiles_share_the_lattice():
    """A prediction tile and the STAC cache tile of the same side and pixel are the same cell of the same
    lattice; windows are counted from the same origin."""
    grid = Grid(UTM, Affine(10.0, 0, -3000.0, 0, -10.0, 7000.0), 900, 700)
    lat = Lattice(256 * 10.0)
    for tile in make_tiles(grid, 256):
        i, j = (int(v) for v in tile.tile_id[1:].split("_y"))
        if tile.width == tile.height == 256:
            assert tile.grid(grid).bounds == lat.cell_bounds(i, j)
            assert lat.cells_over(tile.grid(grid).bounds) == [(i, j)]
    assert pixel_offset(grid) == (-300, -700)
    assert pixel_cells(0.0, 10.0, 2560.0, 300) == [(0, 0, 256), (1, 256, 44)]
    # the windows over a tile start on multiples of the stride from the CRS's origin
    gx, gy = pixel_offset(grid)
    assert all(o % 48 == 0 for o in window_origins(gx + 37, 200, 64, 48))
