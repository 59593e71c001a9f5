"""Vectorisation: probability COGs of a year -> valid mining polygons in EPSG:4326.

Pixels with P >= threshold become polygons (``rasterio.features.shapes``, holes kept); polygons cut by tile
edges are merged with their neighbours across the seam; optional simplification (tolerance in metres, topology
kept), then a minimum area in m2 on the ellipsoid. Writes ``polygons/<year>.parquet`` (GeoParquet, EPSG:4326,
columns ``year, area_km2, mean_probability, geometry``).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from rasterio.errors import RasterioError
from rasterio.features import shapes
from scipy.ndimage import label as cc_label
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from minemap._io import outputs
from minemap.config import VectorizeConfig
from minemap.errors import InputError
from minemap.execution import map_units
from minemap.geo import WGS84, area_km2, units_per_metre
from minemap.formats.vectors import read_geoparquet, write_geoparquet
from minemap.formats.rasters import LEVELS, NODATA

log = logging.getLogger(__name__)
COLUMNS = ["year", "area_km2", "mean_probability", "geometry"]


def _tile_polygons(path: Path, cut: int) -> tuple[list, list, object, float]:
    try:
        with rasterio.open(path) as src:
            q = src.read(1)
            transform, crs = src.transform, src.crs
    except RasterioError as e:
        raise InputError(f"{path}: cannot read probability raster ({e})") from None
    mask = (q != NODATA) & (q >= cut)
    if not mask.any():
        return [], [], crs, abs(transform.a)
    geoms, sums = [], []
    # one polygon per connected region; its mean probability comes from the pixels it covers
    labels, n = cc_label(mask, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    sum_p = np.bincount(labels.ravel(), weights=q.ravel().astype(np.float64), minlength=n + 1)
    count = np.bincount(labels.ravel(), minlength=n + 1)
    for geom, value in shapes(labels, mask=mask, transform=transform, connectivity=4):
        geoms.append(shapely.geometry.shape(geom))
        v = int(value)
        sums.append((sum_p[v], count[v]))
    return geoms, sums, crs, abs(transform.a)


def merge_across_seams(geoms: np.ndarray, weights: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Union polygons that touch (e.g. halves of one mine cut by a tile edge); weights (sum, count) add up."""
    if len(geoms) == 0:
        return geoms, weights
    snapped = shapely.set_precision(geoms, tolerance)
    a, b = shapely.STRtree(snapped).query(snapped, predicate="intersects")
    n = len(geoms)
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    merged, w = [], []
    for group in np.split(order, bounds):
        merged.append(snapped[group[0]] if len(group) == 1 else shapely.union_all(snapped[group]))
        w.append(weights[group].sum(0))
    return np.array(merged, dtype=object), np.array(w)


def _tile_unit(unit: tuple[int, str, int]) -> tuple[int, tuple[list, list, object, float]]:
    i, path, cut = unit
    return i, _tile_polygons(Path(path), cut)


def vectorize_year(paths: list[Path], year: int, threshold: float, cfg: VectorizeConfig | None = None,
                   workers: int = 1, scheduler: str | None = None, progress: bool = False) -> gpd.GeoDataFrame:
    """Polygons of one year from its probability tiles. The per-tile part (thresholding and polygonising a tile)
    is a (tile, year) unit: serial, in ``workers`` local processes or on a Dask ``scheduler``'s workers (which
    must see the tiles' paths, e.g. on shared storage); the seams are merged here."""
    cfg = cfg or VectorizeConfig()
    cut = int(np.ceil(threshold * LEVELS - 1e-9))
    units = [(i, str(Path(p).absolute()), cut) for i, p in enumerate(paths)]  # workers run in other folders
    by_tile = dict(map_units(_tile_unit, units, workers, desc=f"vectorize {year}", progress=progress,
                             scheduler=scheduler))
    geoms, weights, crs, pixel = [], [], None, None
    for i in range(len(paths)):  # in the tiles' order, whatever order they finished in
        g, w, c, px = by_tile[i]
        geoms += g
        weights += w
        crs, pixel = crs or c, pixel or px
    if not geoms:
        return gpd.GeoDataFrame({c: [] for c in COLUMNS[:-1]}, geometry=[], crs=WGS84)
    geoms = np.array(geoms, dtype=object)
    geoms, weights = merge_across_seams(geoms, np.array(weights, dtype=np.float64), pixel / 100)
    parts, idx = shapely.get_parts(geoms, return_index=True)
    weights = weights[idx]
    if cfg.simplify_m > 0:
        c = shapely.centroid(parts)
        tol = cfg.simplify_m * units_per_metre(crs, shapely.get_x(c), shapely.get_y(c))
        parts = shapely.make_valid(shapely.simplify(parts, tol, preserve_topology=True))
        parts, sub = shapely.get_parts(parts, return_index=True)
        weights = weights[sub]
        poly = shapely.get_type_id(parts) == shapely.GeometryType.POLYGON
        parts, weights = parts[poly], weights[poly]
    gdf = gpd.GeoDataFrame({"year": np.full(len(parts), year, dtype=np.int32)}, geometry=parts, crs=crs).to_crs(WGS84)
    gdf["geometry"] = shapely.make_valid(gdf.geometry.values)
    gdf["area_km2"] = area_km2(gdf.geometry.values)
    gdf["mean_probability"] = weights[:, 0] / np.maximum(weights[:, 1], 1) / LEVELS
    gdf = gdf.loc[gdf.area_km2 * 1e6 >= cfg.min_area_m2, COLUMNS].reset_index(drop=True)
    return gdf


def vectorize(prob_dir: Path, years: list[int], out_dir: Path, threshold: float,
              cfg: VectorizeConfig | None = None, workers: int = 1, scheduler: str | None = None,
              progress: bool = False) -> dict[int, Path]:
    """Stage ``vectorize``: ``out_dir/<year>.parquet`` from ``prob_dir/<year>/*.tif`` (see
    :func:`vectorize_year` for ``workers`` and ``scheduler``)."""
    out = {}
    for year in years:
        folder = Path(prob_dir) / str(year)
        paths = outputs(folder, "*.tif")  # not the hidden temporaries of tiles being (or left half) written
        if not paths:
            raise InputError(f"{folder}: no probability rasters for year {year} (run predict first)")
        gdf = vectorize_year(paths, year, threshold, cfg, workers, scheduler, progress)
        out[year] = write_geoparquet(gdf, Path(out_dir) / f"{year}.parquet")
        log.info("vectorize %d: %d polygons, %.3f km2", year, len(gdf), gdf.area_km2.sum())
    return out


def read_polygons(paths: dict[int, Path] | list[Path]) -> gpd.GeoDataFrame:
    """All years' polygon files as one GeoDataFrame."""
    paths = list(paths.values()) if isinstance(paths, dict) else list(paths)
    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"{p}: polygon file not found (run vectorize first)")
    # two files at a time: one's reading and decompressing (no GIL) beside the other's decoding
    with ThreadPoolExecutor(2) as pool:
        frames = list(pool.map(read_geoparquet, map(Path, paths)))
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=WGS84)
