"""Grids and lattices: where a pixel, a window, a chip block, a tile, a cache tile or a country cell lies.

Two ideas, used by every stage that cuts ground into pieces:

- :class:`Grid`: a raster grid (CRS, the affine transform of its top-left pixel corner, size in pixels).
- :class:`Lattice`: square cells of ``side`` CRS units anchored at an origin (the CRS's own by default), with
  column ``i`` counting eastwards and row ``j`` southwards, so that a cell ``x{i}_y{j}`` names the same ground
  in every year, rerun and extent. Prediction tiles, the STAC source's cache tiles and the countries' inland
  cells are cells of a lattice; inference windows are the lattice of ``stride`` pixels from the CRS's origin
  (:func:`window_origins`), chip blocks the lattice of ``block`` pixels from the scene's first pixel
  (:func:`pixel_boxes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS, affine transform of the top-left pixel corner, size in pixels."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS."""
        x0, y0 = self.transform @ (0, 0)
        x1, y1 = self.transform @ (self.width, self.height)
        return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)

    @property
    def res(self) -> tuple[float, float]:
        return abs(self.transform.a), abs(self.transform.e)

    def window(self, col_off: int, row_off: int, width: int, height: int) -> Grid:
        """The sub-grid starting at pixel (col_off, row_off); it may reach outside this grid."""
        return Grid(self.crs, self.transform @ Affine.translation(col_off, row_off), width, height)


@dataclass(frozen=True)
class Lattice:
    """Square cells of ``side`` CRS units whose corner ``(0, 0)`` lies at ``(x0, y0)``: cell ``(i, j)`` spans
    ``x0 + i * side <= x < x0 + (i + 1) * side`` and ``y0 - (j + 1) * side < y <= y0 - j * side``."""

    side: float
    x0: float = 0.0
    y0: float = 0.0

    @staticmethod
    def cell_id(i: int, j: int) -> str:
        return f"x{i}_y{j}"

    def cell_bounds(self, i: int, j: int) -> tuple[float, float, float, float]:
        s = self.side
        return self.x0 + i * s, self.y0 - (j + 1) * s, self.x0 + (i + 1) * s, self.y0 - j * s

    def cells_over(self, bounds: tuple[float, float, float, float]) -> list[tuple[int, int]]:
        """The cells (i, j) that the box ``bounds`` (left, bottom, right, top) reaches into, row by row; a box
        that ends on a cell's edge does not reach the next."""
        left, bottom, right, top = bounds
        s, eps = self.side, 1e-6 * self.side
        cols = range(math.floor((left - self.x0) / s), math.floor((right - self.x0 - eps) / s) + 1)
        rows = range(math.floor((self.y0 - top) / s), math.floor((self.y0 - bottom - eps) / s) + 1)
        return [(i, j) for j in rows for i in cols]

    def cell_grid(self, i: int, j: int, res: float, crs: CRS) -> Grid:
        """Cell ``(i, j)`` as a grid of ``res`` pixels (``side`` a whole number of them)."""
        n = int(round(self.side / res))
        left, _, _, top = self.cell_bounds(i, j)
        return Grid(crs, Affine(res, 0, left, 0, -res, top), n, n)

    def snapped(self, bounds: tuple[float, float, float, float]) -> tuple[float, float, int, int]:
        """The smallest whole cells holding ``bounds``: (left, top, columns, rows)."""
        left, bottom, right, top = bounds
        s = self.side
        x = self.x0 + math.floor((left - self.x0) / s) * s
        y = self.y0 - math.floor((self.y0 - top) / s) * s
        return x, y, int(math.ceil((right - x) / s)), int(math.ceil((y - bottom) / s))


def neighbours(cells: set[tuple[int, int]], of: set[tuple[int, int]], reach: int) -> set[tuple[int, int]]:
    """The cells of ``cells`` within ``reach`` cells (along rows, columns or diagonals) of one of ``of``."""
    return {b for b in cells if any(abs(b[0] - x) <= reach and abs(b[1] - y) <= reach for x, y in of)}


def pixel_cells(origin: float, step: float, side: float, n: int) -> list[tuple[int, int, int]]:
    """Lattice cells of size ``side`` crossed by ``n`` pixels of size ``step`` starting at ``origin`` (all in the
    axis' own direction, cells anchored at 0): (cell index, first pixel, pixel count), by pixel centres."""
    def cell(k: float) -> int:  # the cell of pixel k's centre
        return math.floor((origin + (k + 0.5) * step) / side + 1e-9)

    out = []
    first, last = cell(0), cell(n - 1)
    for i in range(first, last + 1):
        start = max(0, math.ceil((i * side - origin) / step - 0.5 - 1e-9))
        stop = min(n, math.ceil(((i + 1) * side - origin) / step - 0.5 - 1e-9))
        if stop > start:
            out.append((i, start, stop - start))
    return out


def pixel_offset(grid: Grid) -> tuple[int, int]:
    """The grid's first pixel in whole pixels from the CRS's origin (columns eastwards, rows southwards): the
    anchor of lattices counted in pixels, the same for any extent of the same pixel lattice."""
    t = grid.transform
    return int(round(t.c / t.a)), int(round(-t.f / -t.e))


def window_origins(start: int, length: int, window: int, stride: int) -> list[int]:
    """Origins of the windows of the lattice ``k * stride`` (in pixels from the CRS's origin) that overlap
    ``[start, start + length)``: every tiling of the same ground runs the same windows, so tiles agree with one
    pass over their union exactly."""
    first = (start - window) // stride + 1  # the first k with k * stride + window > start
    last = -(-(start + length) // stride) - 1  # the last k with k * stride < start + length
    return [k * stride for k in range(first, last + 1)]


def pixel_boxes(grid: Grid, cols, rows, width, height, clip: bool = False) -> np.ndarray:
    """Boxes (the grid's CRS) of the pixel windows with top-left pixel (``cols``, ``rows``) and size (``width``,
    ``height``), arrays or numbers; with ``clip`` cut short where the grid ends."""
    cols, rows = np.asarray(cols), np.asarray(rows)
    c1, r1 = cols + width, rows + height
    if clip:
        c1, r1 = np.minimum(c1, grid.width), np.minimum(r1, grid.height)
    x0, y0 = grid.transform @ (cols, rows)
    x1, y1 = grid.transform @ (c1, r1)
    return shapely.box(np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1))


def snapped_grid(bounds: tuple[float, float, float, float], crs: CRS, res: float) -> Grid:
    """The grid of ``res`` pixels in ``crs`` covering ``bounds`` (in ``crs``), snapped to multiples of ``res``
    from the CRS origin, so that grids of overlapping areas share their pixels."""
    left, bottom, right, top = bounds
    x0, y1 = np.floor(left / res) * res, np.ceil(top / res) * res
    return Grid(crs, Affine(res, 0, x0, 0, -res, y1), int(np.ceil((right - x0) / res)),
                int(np.ceil((y1 - bottom) / res)))


def area_grid(bbox: tuple[float, float, float, float], crs: CRS, res: float) -> Grid:
    """The grid of ``res`` pixels in ``crs`` covering ``bbox`` (EPSG:4326), snapped to multiples of ``res`` from
    the CRS origin (:func:`snapped_grid`), so that grids of overlapping areas share their pixels."""
    from rasterio.warp import transform_bounds

    return snapped_grid(transform_bounds("EPSG:4326", crs, *bbox, densify_pts=21), crs, res)
