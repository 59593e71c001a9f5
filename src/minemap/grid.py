"""Fixed tiles over an imagery grid: the unit of work of prediction is (tile, year).

Tiles are named ``r<row>_c<col>`` by their position in the grid, so that names are stable across years and
reruns; a tile may be cut short at the grid's right and bottom edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

from minemap.imagery import Grid


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
    """Tiles of ``tile_size`` pixels covering ``grid``; with ``aoi`` (in the grid's CRS), only those touching it."""
    tiles = []
    for r, row_off in enumerate(range(0, grid.height, tile_size)):
        for c, col_off in enumerate(range(0, grid.width, tile_size)):
            tiles.append(Tile(f"r{r:03d}_c{c:03d}", col_off, row_off,
                              min(tile_size, grid.width - col_off), min(tile_size, grid.height - row_off)))
    if aoi is not None:
        boxes = np.array([shapely.box(*t.grid(grid).bounds) for t in tiles], dtype=object)
        tiles = [t for t, hit in zip(tiles, shapely.intersects(boxes, aoi)) if hit]
    return tiles
