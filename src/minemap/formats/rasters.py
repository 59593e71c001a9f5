"""The probability raster: one encoding shared by the stages that write it (predict) and read it (vectorize,
evaluate, hard-negative mining, reports).

``probabilities/<year>/<tile>.tif``: a tiled, deflate-compressed Cloud-Optimised GeoTIFF, one uint8 band,
``round(P(mining) x 250)`` (levels 0..250), 255 where there was no imagery.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.io import MemoryFile

from minemap._io import atomic_path
from minemap.lattice import Grid

LEVELS = 250
NODATA = 255


def quantise(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 levels 0..250."""
    return np.clip(np.rint(prob * LEVELS), 0, LEVELS).astype(np.uint8)


def write_cog(dest: Path, data: np.ndarray, grid: Grid, nodata: int | None = NODATA, blocksize: int = 256,
              descriptions: tuple[str, ...] | None = None) -> None:
    """Write ``data`` (h, w), or (bands, h, w), as a tiled, deflate-compressed Cloud-Optimised GeoTIFF of its
    dtype, atomically. A single uint8 band without ``descriptions`` is a probability raster and is named so."""
    stack = data[None] if data.ndim == 2 else data
    if descriptions is None and data.ndim == 2 and data.dtype == np.uint8:
        descriptions = ("P(mining) x 250",)
    profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=len(stack), dtype=stack.dtype.name,
                   crs=grid.crs, transform=grid.transform, nodata=nodata)
    with atomic_path(dest) as tmp, MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(stack)
            if descriptions:
                ds.descriptions = tuple(descriptions)
            rasterio.shutil.copy(ds, tmp, driver="COG", compress="DEFLATE", blocksize=blocksize,
                                 overview_resampling="average")


def read_probability(path: Path) -> tuple[np.ndarray, Grid]:
    """A probability COG as float32 in [0, 1] (NaN where nodata) and its grid."""
    with rasterio.open(path) as src:
        q = src.read(1)
        grid = Grid(src.crs, src.transform, src.width, src.height)
    prob = q.astype(np.float32) / LEVELS
    prob[q == NODATA] = np.nan
    return prob, grid


def zonal_mean(paths: list[Path], geoms: np.ndarray, crs) -> np.ndarray:
    """Mean probability over each polygon of ``geoms`` (in ``crs``) across the probability tiles ``paths``, pixel
    centres inside; NaN where a polygon covers no pixel with data."""
    import geopandas as gpd
    from rasterio.features import rasterize

    n = len(geoms)
    sums, counts = np.zeros(n), np.zeros(n)
    for path in paths:
        with rasterio.open(path) as src:
            q, transform, tile_crs = src.read(1), src.transform, src.crs
        local = gpd.GeoSeries(list(geoms), crs=crs).to_crs(tile_crs).values
        shapes = [(g, i + 1) for i, g in enumerate(local) if g is not None and not g.is_empty]
        if not shapes:
            continue
        ids = rasterize(shapes, out_shape=q.shape, transform=transform, dtype="int32")
        hit = (ids > 0) & (q != NODATA)
        sums += np.bincount(ids[hit], weights=q[hit], minlength=n + 1)[1:]
        counts += np.bincount(ids[hit], minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts / LEVELS
