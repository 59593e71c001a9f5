"""Tiles of a fixed global grid: the unit of work of prediction is (tile, year).

Tiles lie on a lattice of the imagery's CRS anchored at the CRS's origin: tile ``x{i}_y{j}`` holds the pixels whose
centres fall in ``i * side <= x < (i + 1) * side`` and ``j * side <= -y < (j + 1) * side``, with ``side`` =
``tile_size`` pixels of the grid's pixel size (``j`` counts southwards, like rows). A tile's id therefore names
the same ground in every year, in every rerun and for any imagery on that CRS and pixel size, whatever the
imagery's extent: in Web Mercator the lattice is a quadtree-like grid of squares, in a UTM zone tiles of the
zone. The same naming as the STAC source's cache tiles. A tile is cut short where the imagery ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import shapely

from minemap.errors import ImageryError
from minemap.lattice import Grid, Lattice, pixel_boxes, pixel_cells

TILE_FILE = re.compile(r"x-?\d+_y-?\d+\.tif")  # a tile's file, named by :func:`make_tiles`


@dataclass(frozen=True)
class Tile:
    tile_id: str
    col_off: int
    row_off: int
    width: int
    height: int

    def grid(self, parent: Grid, halo: int = 0) -> Grid:
        """This tile's grid in ``parent``, grown by ``halo`` pixels on every side."""
        return parent.window(self.col_off - halo, self.row_off - halo, self.width + 2 * halo, self.height + 2 * halo)


def make_tiles(grid: Grid, tile_size: int, aoi: shapely.Geometry | None = None) -> list[Tile]:
    """Tiles of the global lattice (``tile_size`` pixels a side) that hold pixels of ``grid``; with ``aoi`` (in
    the grid's CRS), only those whose pixels touch it."""
    t = grid.transform
    if t.b or t.d or t.a <= 0 or t.e >= 0:
        raise ImageryError(f"imagery grid {tuple(t)[:6]}: tiles need a north-up grid (rotated or flipped rasters "
                           "are not supported; warp them first)")
    cols = pixel_cells(t.c, t.a, tile_size * t.a, grid.width)
    rows = pixel_cells(-t.f, -t.e, tile_size * -t.e, grid.height)  # southwards: -y grows with the row
    tiles = [Tile(Lattice.cell_id(i, j), c0, r0, w, h) for j, r0, h in rows for i, c0, w in cols]
    if aoi is not None:
        boxes = pixel_boxes(grid, [t.col_off for t in tiles], [t.row_off for t in tiles],
                            [t.width for t in tiles], [t.height for t in tiles])
        tiles = [t for t, hit in zip(tiles, shapely.intersects(boxes, aoi)) if hit]
    return tiles
