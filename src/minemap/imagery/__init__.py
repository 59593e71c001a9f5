"""Imagery sources behind one protocol.

A source serves, for each year, a mosaic on its native grid (CRS, pixel size) and reads any window of it as a
float32 array ``(bands, rows, cols)`` with a validity mask, without loading the mosaic whole. Sources:

- :mod:`minemap.imagery.local`: a directory with one sub-folder per year of GeoTIFF/COG files
  (the published study's ``tiff_tiles/<year>/`` layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
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


@runtime_checkable
class ImagerySource(Protocol):
    """What the pipeline needs of imagery."""

    band_names: list[str]

    def years(self) -> list[int]: ...

    def grid(self, year: int) -> Grid: ...

    def fingerprint(self, year: int) -> str:
        """A short key that changes when ``year``'s pixels may have changed (files, items, settings)."""
        ...

    def check_bands(self, year: int) -> None:
        """Raise :class:`~minemap.errors.ImageryError` if ``year``'s imagery lacks the source's bands."""
        ...

    def read(self, year: int, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of ``year`` on ``grid``: float32 ``(bands, h, w)`` and a bool validity mask ``(h, w)``."""
        ...


def open_imagery(path: Path | str, bands: list[str] | None = None) -> ImagerySource:
    """Open an imagery source from a path (a local directory of year folders)."""
    from minemap.imagery.local import LocalImagery

    return LocalImagery(Path(path), bands=bands)


__all__ = ["Grid", "ImagerySource", "open_imagery"]
