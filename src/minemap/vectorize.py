"""Vectorisation: probability COGs of a year -> valid mining polygons in EPSG:4326.

Pixels with P >= threshold become polygons (``rasterio.features.shapes``, holes kept); polygons cut by tile
edges are merged with their neighbours across the seam; optional simplification (tolerance in metres, topology
kept), then a minimum area in m2 on the ellipsoid. Writes ``polygons/<year>.parquet`` (GeoParquet, EPSG:4326,
columns ``year, area_km2, mean_probability, filled_share, geometry``).

Pixels a year did not observe (cloud, shadow, no imagery: NODATA) are filled from the processed years beside it
(``vectorize.fill_unobserved``): mining where the previous year shows mining and the next year, where there is one
and it observed the pixel, does too. Mines rarely close within a year, so a pit under this year's cloud is still
there; the first year is never filled (a mine of the next year may be new). ``filled_share`` is the share of an
outline's pixels so filled (0: observed throughout).

Outlines shaped like fields are dropped (``vectorize.max_rectangularity``): one of 64 pixels or more that fills
more than 0.9 of its smallest enclosing rectangle, in the tiles' projected CRS, after the seams are merged.
Fields, clearings and plantation blocks are rectangles; pits, tailings and dredge ponds rarely are (of the
literature's sample of 100 mining polygons, 4 exceed 0.9). Where the labels hold more rectangles than that, the
level is raised to their 99th percentile (:func:`minemap.geo.shape_level`).
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
from minemap.geo import WGS84, area_km2, shape_level, shaped_like_fields, units_per_metre
from minemap.formats.vectors import read_geoparquet, write_geoparquet
from minemap.formats.rasters import LEVELS, NODATA

log = logging.getLogger(__name__)
COLUMNS = ["year", "area_km2", "mean_probability", "filled_share", "geometry"]


def _read_tile(path: Path) -> tuple[np.ndarray, object, object]:
    try:
        with rasterio.open(path) as src:
            return src.read(1), src.transform, src.crs
    except RasterioError as e:
        raise InputError(f"{path}: cannot read probability raster ({e})") from None


def fill_unobserved(q: np.ndarray, previous: np.ndarray | None, following: np.ndarray | None,
                    cut: int) -> np.ndarray:
    """``q`` (probability levels, NODATA where unobserved) with its unobserved pixels filled where the previous
    year's tile (same grid) is at least ``cut`` and the following year's, where given and observed, is too; a
    filled pixel takes the previous year's level. Returns a new array, or ``q`` itself where nothing is filled."""
    if previous is None:
        return q
    fill = (q == NODATA) & (previous != NODATA) & (previous >= cut)
    if following is not None:
        fill &= (following == NODATA) | (following >= cut)
    if not fill.any():
        return q
    out = q.copy()
    out[fill] = previous[fill]
    return out


def _neighbour(folder: str | None, name: str, q: np.ndarray, transform) -> np.ndarray | None:
    """The same tile of a neighbouring year, where it exists on the same grid."""
    if folder is None or not (Path(folder) / name).is_file():
        return None
    other, t, _ = _read_tile(Path(folder) / name)
    return other if other.shape == q.shape and t == transform else None


def _tile_polygons(path: Path, cut: int, previous: str | None = None,
                   following: str | None = None) -> tuple[list, list, object, float]:
    q, transform, crs = _read_tile(path)
    observed = q != NODATA
    if previous is not None and not observed.all():
        prev = _neighbour(previous, path.name, q, transform)
        # the next year's tile is read only where the previous year leaves something to fill (it may veto it)
        if fill_unobserved(q, prev, None, cut) is not q:
            q = fill_unobserved(q, prev, _neighbour(following, path.name, q, transform), cut)
    mask = (q != NODATA) & (q >= cut)
    if not mask.any():
        return [], [], crs, abs(transform.a)
    geoms, sums = [], []
    # one polygon per connected region; its mean probability comes from the pixels it covers, its filled share
    # from those it holds without an observation
    labels, n = cc_label(mask, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    sum_p = np.bincount(labels.ravel(), weights=q.ravel().astype(np.float64), minlength=n + 1)
    count = np.bincount(labels.ravel(), minlength=n + 1)
    filled = np.bincount(labels[~observed], minlength=n + 1)
    for geom, value in shapes(labels, mask=mask, transform=transform, connectivity=4):
        geoms.append(shapely.geometry.shape(geom))
        v = int(value)
        sums.append((sum_p[v], count[v], filled[v]))
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


def _tile_unit(unit: tuple) -> tuple[int, tuple[list, list, object, float]]:
    i, path, cut, previous, following = unit
    return i, _tile_polygons(Path(path), cut, previous, following)


def vectorize_year(paths: list[Path], year: int, threshold: float, cfg: VectorizeConfig | None = None,
                   workers: int = 1, scheduler: str | None = None, progress: bool = False,
                   neighbours: tuple[Path | None, Path | None] = (None, None),
                   fields: float | None | str = "config") -> gpd.GeoDataFrame:
    """Polygons of one year from its probability tiles. The per-tile part (thresholding and polygonising a tile)
    is a (tile, year) unit: serial, in ``workers`` local processes or on a Dask ``scheduler``'s workers (which
    must see the tiles' paths, e.g. on shared storage); the seams are merged here. ``neighbours``: the folders of
    the previous and next processed years' tiles (same names, same grids), which fill the pixels this year did
    not observe (:func:`fill_unobserved`); None: no fill. ``fields``: the rectangularity above which an outline is
    dropped as a field (:func:`field_level`; None: never; "config": ``cfg.max_rectangularity``)."""
    cfg = cfg or VectorizeConfig()
    fields = field_level(cfg) if fields == "config" else fields
    cut = int(np.ceil(threshold * LEVELS - 1e-9))
    previous, following = (str(Path(f).absolute()) if f is not None else None for f in neighbours)
    units = [(i, str(Path(p).absolute()), cut, previous, following)  # workers run in other folders
             for i, p in enumerate(paths)]
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
    shaped = shaped_like_fields(parts, fields, pixel * pixel)
    if shaped.any():
        log.info("vectorize %d: %d outlines shaped like fields dropped (rectangularity above %.3f)", year,
                 int(shaped.sum()), fields)
        parts, weights = parts[~shaped], weights[~shaped]
    gdf = gpd.GeoDataFrame({"year": np.full(len(parts), year, dtype=np.int32)}, geometry=parts, crs=crs).to_crs(WGS84)
    gdf["geometry"] = shapely.make_valid(gdf.geometry.values)
    gdf["area_km2"] = area_km2(gdf.geometry.values)
    gdf["mean_probability"] = weights[:, 0] / np.maximum(weights[:, 1], 1) / LEVELS
    gdf["filled_share"] = weights[:, 2] / np.maximum(weights[:, 1], 1)
    gdf = gdf.loc[gdf.area_km2 * 1e6 >= cfg.min_area_m2, COLUMNS].reset_index(drop=True)
    return gdf


def vectorize(prob_dir: Path, years: list[int], out_dir: Path, threshold: float,
              cfg: VectorizeConfig | None = None, workers: int = 1, scheduler: str | None = None,
              progress: bool = False, fields: float | None | str = "config") -> dict[int, Path]:
    """Stage ``vectorize``: ``out_dir/<year>.parquet`` from ``prob_dir/<year>/*.tif`` (see
    :func:`vectorize_year` for ``workers`` and ``scheduler``). With ``cfg.fill_unobserved`` a year's unobserved
    pixels are filled from the years beside it in ``years`` (the processed years, as the temporal rule's).
    ``fields``: the rectangularity above which an outline is dropped as a field (:func:`field_level`, which the
    labels the model learnt from may raise; None: never; "config": ``cfg.max_rectangularity``)."""
    cfg = cfg or VectorizeConfig()
    out = {}
    order = sorted(set(years))
    for year in years:
        folder = Path(prob_dir) / str(year)
        paths = outputs(folder, "*.tif")  # not the hidden temporaries of tiles being (or left half) written
        if not paths:
            raise InputError(f"{folder}: no probability rasters for year {year} (run predict first)")
        k = order.index(year)
        neighbours = (Path(prob_dir) / str(order[k - 1]) if cfg.fill_unobserved and k > 0 else None,
                      Path(prob_dir) / str(order[k + 1]) if cfg.fill_unobserved and k + 1 < len(order) else None)
        gdf = vectorize_year(paths, year, threshold, cfg, workers, scheduler, progress, neighbours, fields)
        out[year] = write_geoparquet(gdf, Path(out_dir) / f"{year}.parquet")
        filled = float((gdf.area_km2 * gdf.filled_share).sum())
        log.info("vectorize %d: %d polygons, %.3f km2 (%.3f km2 filled from the years beside it)", year, len(gdf),
                 gdf.area_km2.sum(), filled)
    return out


def field_level(cfg: VectorizeConfig, labels: gpd.GeoDataFrame | None = None) -> float | None:
    """The rectangularity above which an outline is dropped as a field: ``cfg.max_rectangularity``, raised by
    ``labels`` (any CRS) where more of them are rectangles; None: shape never decides."""
    if labels is None or len(labels) == 0:
        return shape_level(cfg.max_rectangularity)
    geographic = labels.crs is None or labels.crs.is_geographic
    return shape_level(cfg.max_rectangularity, np.asarray(labels.geometry.values), geographic)


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
