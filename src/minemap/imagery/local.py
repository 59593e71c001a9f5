"""Local imagery: a directory with one sub-folder per year of GeoTIFF (or COG) files.

Layout (the published study's ``data/tiff_tiles/<year>/<quad>.tiff``)::

    DIR/2019/a.tif  DIR/2019/b.tif  DIR/2020/...

All files of a year form one mosaic; files may be in any CRS (reprojected on read to the year's grid, which
takes the CRS and pixel size of the year's first file). Windows are read through GDAL warped VRTs, so only the
pixels asked for are read. Band names come from the files' band descriptions, or from the config.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
import rasterio.windows
from affine import Affine
from pyproj import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from pydantic import Field, field_validator

from minemap.settings import Section
from minemap.geo import check_bbox
from minemap._io import stable_hash
from minemap.errors import ImageryError
from minemap.lattice import Grid


class LocalImageryConfig(Section):
    """GeoTIFF/COG files on disk, one folder per year: ``path/<year>/*.tif``."""

    source: Literal["local"] = "local"
    path: Path
    bbox: tuple[float, float, float, float] | None = Field(
        None, description="only this area of the folders' mosaic: west, south, east, north (EPSG:4326); "
                          "default the whole mosaic")

    _area = field_validator("bbox")(classmethod(lambda cls, v: v if v is None else check_bbox(v)))


log = logging.getLogger(__name__)
_SUFFIXES = {".tif", ".tiff", ".vrt"}


@dataclass(frozen=True)
class _FileInfo:
    path: Path
    crs: CRS
    count: int
    dtype: str
    res: tuple[float, float]
    bounds: tuple[float, float, float, float]
    descriptions: tuple[str | None, ...]


class LocalImagery:
    """Imagery from ``root/<year>/*.tif``."""

    masks_clouds = False  # the files are taken as they are: clouds and shadows in them are valid pixels

    def __init__(self, root: Path, bands: list[str] | None = None, resampling: str = "nearest",
                 bbox: tuple[float, float, float, float] | None = None) -> None:
        self.root = Path(root)
        self.bbox = bbox
        self.resampling = Resampling[resampling]  # nearest: the files' own pixels where the grids agree
        if not self.root.is_dir():
            raise ImageryError(f"{self.root}: imagery directory not found")
        self._bands_cfg = list(bands) if bands else None
        self._files: dict[int, list[_FileInfo]] = {}

    def years(self) -> list[int]:
        return sorted(int(p.name) for p in self.root.iterdir() if p.is_dir() and re.fullmatch(r"\d{4}", p.name))

    def _paths(self, year: int) -> list[Path]:
        folder = self.root / str(year)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES and not p.name.startswith("."))

    def _scan(self, year: int) -> list[_FileInfo]:
        if year in self._files:
            return self._files[year]
        folder = self.root / str(year)
        if not folder.is_dir():
            have = ", ".join(map(str, self.years())) or "none"
            raise ImageryError(f"{folder}: no imagery folder for year {year} (years found: {have})")
        paths = self._paths(year)
        if not paths:
            raise ImageryError(f"{folder}: no GeoTIFF files for year {year}")
        infos = [file_info(p) for p in paths]
        first = infos[0]
        for info in infos[1:]:
            if info.count != first.count:
                raise ImageryError(f"{info.path}: has {info.count} bands, {first.path.name} has {first.count}")
        self._files[year] = infos
        return infos

    @cached_property
    def band_names(self) -> list[str]:  # type: ignore[override]
        years = [y for y in self.years() if self._paths(y)]
        if not years:
            raise ImageryError(f"{self.root}: no year folders with GeoTIFFs (expected e.g. {self.root}/2019/*.tif)")
        first = self._scan(years[0])[0]
        if self._bands_cfg is not None:
            if len(self._bands_cfg) != first.count:
                raise ImageryError(
                    f"{first.path}: has {first.count} bands but the config names {len(self._bands_cfg)} "
                    f"({', '.join(self._bands_cfg)})"
                )
            return self._bands_cfg
        if all(first.descriptions):
            return [d.lower() for d in first.descriptions]  # type: ignore[union-attr]
        return [f"b{i + 1}" for i in range(first.count)]

    def check_bands(self, year: int) -> None:
        """Raise if a file of ``year`` has another band count or other band names than the source's."""
        names = self.band_names
        for info in self._scan(year):
            if info.count != len(names):
                raise ImageryError(f"{info.path}: has {info.count} bands, expected {len(names)} ({', '.join(names)})")
            if self._bands_cfg is None and all(info.descriptions):
                got = [d.lower() for d in info.descriptions]  # type: ignore[union-attr]
                if got != names:
                    raise ImageryError(f"{info.path}: bands {got} differ from {names}")

    def fingerprint(self, year: int) -> str:
        """Names, sizes and modification times of the year's files: changes when its imagery does."""
        return stable_hash(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self._paths(year)))

    def grid(self, year: int) -> Grid:
        infos = self._scan(year)
        first = infos[0]
        xres, yres = first.res
        lefts, bottoms, rights, tops = [], [], [], []
        for info in infos:
            b = info.bounds if info.crs == first.crs else transform_bounds(info.crs, first.crs, *info.bounds)
            lefts.append(b[0]), bottoms.append(b[1]), rights.append(b[2]), tops.append(b[3])
        # snap the union to the first file's pixel lattice so that its pixels are read without resampling
        ox, oy = first.bounds[0], first.bounds[3]
        left = ox + np.floor((min(lefts) - ox) / xres + 1e-6) * xres
        top = oy + np.ceil((max(tops) - oy) / yres - 1e-6) * yres
        width = int(np.ceil((max(rights) - left) / xres - 1e-6))
        height = int(np.ceil((top - min(bottoms)) / yres - 1e-6))
        whole = Grid(first.crs, Affine(xres, 0, left, 0, -yres, top), width, height)
        return whole if self.bbox is None else self._clip(whole, year)

    def _clip(self, whole: Grid, year: int) -> Grid:
        """The part of the mosaic's grid over :attr:`bbox`, on the same pixels."""
        w, s, e, n = transform_bounds("EPSG:4326", whole.crs, *self.bbox, densify_pts=21)
        t = whole.transform
        c0, c1 = max(0, int(np.floor((w - t.c) / t.a + 1e-6))), min(whole.width, int(np.ceil((e - t.c) / t.a - 1e-6)))
        r0, r1 = max(0, int(np.floor((n - t.f) / t.e + 1e-6))), min(whole.height, int(np.ceil((s - t.f) / t.e - 1e-6)))
        if c1 <= c0 or r1 <= r0:
            raise ImageryError(f"{self.root / str(year)}: no imagery over bbox {list(self.bbox)}")
        return whole.window(c0, r0, c1 - c0, r1 - r0)

    def read(self, year: int, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        return read_files(self._scan(year), grid, len(self.band_names), self.resampling)


def file_info(path: Path) -> _FileInfo:
    """What the readers need of a raster file (CRS, bands, resolution, bounds), or an ImageryError naming it."""
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise ImageryError(f"{path}: raster has no CRS")
            return _FileInfo(Path(path), CRS.from_user_input(src.crs), src.count, src.dtypes[0], src.res,
                             tuple(src.bounds), tuple(src.descriptions))
    except RasterioError as e:
        raise ImageryError(f"{path}: not a readable raster ({e})") from None


def read_files(files: list[_FileInfo], grid: Grid, n: int,
               resampling: Resampling = Resampling.nearest) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` bands of a mosaic of ``files`` on ``grid`` (float32 ``(n, h, w)``) and where it has data;
    where files overlap, the first one with data wins. Only the window asked for is read (warped VRTs)."""
    out = np.zeros((n, grid.height, grid.width), dtype=np.float32)
    valid = np.zeros((grid.height, grid.width), dtype=bool)
    gl, gb, gr, gt = grid.bounds
    for info in files:
        b = info.bounds if info.crs == grid.crs else transform_bounds(info.crs, grid.crs, *info.bounds)
        if b[0] >= gr or b[2] <= gl or b[1] >= gt or b[3] <= gb:
            continue
        try:
            with rasterio.open(info.path) as src:
                offset = _pixel_offset(src, grid) if info.crs == grid.crs else None
                if offset is not None:  # the grid is on the file's own pixel lattice: a plain windowed read
                    _read_aligned(src, grid, offset, n, out, valid)
                    continue
                with WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width,
                               height=grid.height, resampling=resampling, add_alpha=True) as vrt:
                    data = vrt.read()
        except RasterioError as e:
            raise ImageryError(f"{info.path}: cannot read pixels ({e})") from None
        fill = (data[-1] > 0) & ~valid
        out[:, fill] = data[:n, fill]
        valid |= fill
    return out, valid


def _pixel_offset(src, grid: Grid) -> tuple[int, int] | None:
    """(column, row) of the grid's first pixel in the file's pixels, if the grid lies on the file's pixel
    lattice (same CRS assumed, same pixel size, whole-pixel offset, no rotation); else None."""
    a, g = src.transform, grid.transform
    if a.b or a.d or g.b or g.d or abs(a.a - g.a) > 1e-9 * abs(a.a) or abs(a.e - g.e) > 1e-9 * abs(a.e):
        return None
    col, row = (g.c - a.c) / a.a, (g.f - a.f) / a.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return int(round(col)), int(round(row))


def _read_aligned(src, grid: Grid, offset: tuple[int, int], n: int, out: np.ndarray, valid: np.ndarray) -> None:
    """Read the part of ``src`` under ``grid`` into ``out``/``valid`` where nothing is yet (first file wins)."""
    col, row = offset
    c0, r0 = max(col, 0), max(row, 0)
    c1, r1 = min(col + grid.width, src.width), min(row + grid.height, src.height)
    if c1 <= c0 or r1 <= r0:
        return
    win = rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)
    data = src.read(list(range(1, n + 1)), window=win)
    mask = src.dataset_mask(window=win) > 0
    rows, cols = slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)
    fill = mask & ~valid[rows, cols]
    if fill.all():
        out[:, rows, cols] = data
    else:
        sub = out[:, rows, cols]
        sub[:, fill] = data[:, fill]
    valid[rows, cols] |= fill
