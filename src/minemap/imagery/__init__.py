"""Imagery sources behind one protocol.

A source serves, for each year, a mosaic on its native grid (CRS, pixel size) and reads any window of it as a
float32 array ``(bands, rows, cols)`` with a validity mask, without loading the mosaic whole. Sources:

- :mod:`minemap.imagery.local`: a directory with one sub-folder per year of GeoTIFF/COG files
  (the published study's ``tiff_tiles/<year>/`` layout);
- :mod:`minemap.imagery.stac`: yearly cloud-masked median composites of Sentinel-2 L2A (or another STAC
  collection with a scene classification), through a STAC API, cached as COGs;
- :mod:`minemap.imagery.planet`: Planet basemap quads (NICFI's API), the least cloudy mosaic per quad and year.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from affine import Affine

from minemap.imagery.local import LocalImagery, LocalImageryConfig
from minemap.imagery.planet import PlanetImagery, PlanetImageryConfig
from minemap.imagery.remote import public_url
from minemap.imagery.stac import StacImagery, StacImageryConfig
from minemap.lattice import Grid


@runtime_checkable
class ImagerySource(Protocol):
    """What the pipeline needs of imagery."""

    band_names: list[str]
    #: whether the source leaves out cloudy and shadowed pixels itself (a scene classification or a usable-data
    #: mask): where it does not, prediction finds clouds and shadows in the pixels (:mod:`minemap.masks`)
    masks_clouds: bool

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


def open_imagery(desc: Any, bands: list[str] | None = None, resampling: str = "nearest") -> ImagerySource:
    """Open the source a description names: an imagery config (``source = "local"``, ...), or a bare path, which
    is a local directory of year folders. Stages and worker processes receive the description, which pickles,
    and open the source themselves. ``resampling``: how pixels are read onto a grid other than the source's."""
    if isinstance(desc, (str, Path)):
        desc = LocalImageryConfig(path=Path(desc))
    if isinstance(desc, LocalImageryConfig):
        return LocalImagery(desc.path, bands=bands, resampling=resampling, bbox=desc.bbox)
    if isinstance(desc, StacImageryConfig):
        return StacImagery(desc, bands=bands)
    if isinstance(desc, PlanetImageryConfig):
        return PlanetImagery(desc, bands=bands)
    raise TypeError(f"not an imagery description: {desc!r}")


def for_area(desc: Any, bbox: tuple[float, float, float, float]) -> Any:
    """The description of the source ``desc`` names, over ``bbox`` (EPSG:4326) only, in the area's own CRS
    where the source builds its grid: a STAC source composites in the UTM zone of the area's centre (whatever
    ``crs`` the description gives: one CRS cannot serve labels on several continents), Planet quads stay on
    their Web Mercator grid, a local folder on its files' grid. Chips from anywhere (:mod:`minemap.chips.tiles`)
    cut each tile of labels through one."""
    if isinstance(desc, (str, Path)):
        desc = LocalImageryConfig(path=Path(desc))
    update: dict[str, Any] = {"bbox": tuple(float(v) for v in bbox)}
    if isinstance(desc, StacImageryConfig):
        update["crs"] = None
    if not isinstance(desc, (LocalImageryConfig, StacImageryConfig, PlanetImageryConfig)):
        raise TypeError(f"not an imagery description: {desc!r}")
    return desc.model_validate({**desc.model_dump(), **update})


def describe(desc: Any) -> str:
    """A short human name of a source description, for messages: the local path or the API's URL (without a
    query string or credentials: :func:`~minemap.imagery.remote.public_url`)."""
    if getattr(desc, "path", None) is not None:
        return str(desc.path)
    for attr in ("url", "api_url"):
        if getattr(desc, attr, None) is not None:
            return public_url(getattr(desc, attr))
    return str(desc)


class Resampled:
    """A source seen at another pixel size: its grids scaled by ``factor`` (new pixel / old pixel), its pixels
    read onto them by the source (which resamples any grid it is asked for)."""

    def __init__(self, inner: ImagerySource, factor: float) -> None:
        self.inner, self.factor = inner, float(factor)
        self.band_names = inner.band_names
        self.masks_clouds = bool(getattr(inner, "masks_clouds", False))

    def years(self) -> list[int]:
        return self.inner.years()

    def grid(self, year: int) -> Grid:
        g = self.inner.grid(year)
        return Grid(g.crs, g.transform @ Affine.scale(self.factor), max(1, round(g.width / self.factor)),
                    max(1, round(g.height / self.factor)))

    def fingerprint(self, year: int) -> str:
        return f"{self.inner.fingerprint(year)}@x{self.factor:.6g}"

    def check_bands(self, year: int) -> None:
        self.inner.check_bands(year)

    def read(self, year: int, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.read(year, grid)


class BlockCache:
    """One year of a source read a block at a time and kept in memory (up to ``max_bytes``, the oldest block
    dropped first): cutting chips reads windows of each block many times over (the coarse looks that group the
    background, the chips, the block itself). A grid on the area's pixels, or on a whole multiple of them (a
    coarse look: the pixel at each coarse pixel's centre, as a nearest-neighbour read gives), that lies inside
    one block of ``block`` px of ``area`` is served from that block; any other read goes to the source."""

    def __init__(self, inner: ImagerySource, year: int, area: Grid, block: int, max_bytes: int = 1 << 30) -> None:
        self.inner, self.year, self.area, self.block, self.max_bytes = inner, year, area, int(block), max_bytes
        self.band_names = inner.band_names
        self.masks_clouds = bool(getattr(inner, "masks_clouds", False))
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.reads = 0  # blocks read from the source

    def years(self) -> list[int]:
        return self.inner.years()

    def grid(self, year: int) -> Grid:
        return self.inner.grid(year)

    def fingerprint(self, year: int) -> str:
        return self.inner.fingerprint(year)

    def check_bands(self, year: int) -> None:
        self.inner.check_bands(year)

    def read(self, year: int, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        at = self._place(grid) if year == self.year and grid.crs == self.area.crs else None
        if at is None:
            return self.inner.read(year, grid)
        key, rows, cols = at
        pixels, valid = self._block(key)
        return pixels[:, rows, cols].copy(), valid[rows, cols].copy()

    def _block(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if key not in self._blocks:
            bx, by = key
            c, r = bx * self.block, by * self.block
            self._blocks[key] = self.inner.read(self.year, self.area.window(
                c, r, min(self.block, self.area.width - c), min(self.block, self.area.height - r)))
            self.reads += 1
            size = sum(p.nbytes + v.nbytes for p, v in self._blocks.values())
            while size > self.max_bytes and len(self._blocks) > 1:
                p, v = self._blocks.pop(next(iter(self._blocks)))
                size -= p.nbytes + v.nbytes
        return self._blocks[key]

    def _place(self, grid: Grid) -> tuple[tuple[int, int], slice, slice] | None:
        """The block that holds ``grid`` and the rows and columns of its pixels there, if any."""
        a, g = self.area.transform, grid.transform
        if a.b or a.d or g.b or g.d or a.a <= 0 or a.e >= 0:
            return None
        k = g.a / a.a
        if round(k) < 1 or abs(k - round(k)) > 1e-9 or abs(g.e / a.e - k) > 1e-9 * k:
            return None
        k = int(round(k))
        col, row = (g.c - a.c) / a.a, (g.f - a.f) / a.e
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            return None
        col, row = int(round(col)), int(round(row))
        right, bottom = col + grid.width * k, row + grid.height * k
        if col < 0 or row < 0 or right > self.area.width or bottom > self.area.height:
            return None
        bx, by = col // self.block, row // self.block
        if (right - 1) // self.block != bx or (bottom - 1) // self.block != by:
            return None
        c, r, first = col - bx * self.block, row - by * self.block, k // 2
        return (bx, by), slice(r + first, r + first + grid.height * k, k), slice(c + first, c + first + grid.width * k, k)

__all__ = ["BlockCache", "ImagerySource", "Resampled", "describe", "for_area", "open_imagery"]
