"""Post-processing: the temporal consistency rule, country attribution and areas.

Temporal rule (Sepin et al. 2025, ``temporal = "study"``): a polygon of year t stays only if a polygon of the
previous or next year (of the years processed), buffered by ``buffer_m`` metres, intersects it; the first and
last year look at their one neighbour, so every mine new in the newest year is dropped. The default,
``temporal = "provisional"``, keeps such a first- or last-year polygon without a neighbour where the model is
confident, marked ``provisional``: a tool extended as each new year arrives would otherwise always under-report
the year its users care about most; the run that adds the next year confirms or drops it. Buffers are applied
in metres at each polygon's latitude (not metres / 100,000 in degrees).

Countries: ISO3 code and name of the country with the largest overlap (areas in an equal-area CRS), from the
embedded Natural Earth 1:10m layer or from a user's file (GADM, geoBoundaries); polygons
offshore of the coarse coastline take the nearest country within ``NEAREST_MAX_M``.

Reads ``polygons/<year>.parquet``; writes ``postprocessed.parquet`` (EPSG:4326, columns
``year, iso3, country, area_km2, mean_probability, provisional, filled_share, geometry``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from minemap.config import PostprocessConfig
from minemap.geo import (EQUAL_AREA, WGS84, area_km2, group_starts, in_threads, inner_points, pairs_across_years,
                         polygons_meet, units_per_metre)
from minemap.formats.countries import load_countries, stored_inland_grid
from minemap.formats.vectors import write_geoparquet
from minemap.lattice import Lattice

log = logging.getLogger(__name__)
NEAREST_MAX_M = 25_000.0

def temporal_support(polygons: gpd.GeoDataFrame, buffer_m: float = 0.0) -> np.ndarray:
    """Per polygon, whether a (buffered) polygon of an adjacent processed year meets it (the study's rule)."""
    years = sorted(polygons["year"].unique())
    if buffer_m > 0:  # Web Mercator stretches by 1/cos(lat): convert metres at each polygon's own latitude
        geoms = np.asarray(polygons.to_crs("EPSG:3857").geometry.values)
        c = shapely.centroid(geoms)
        probe = shapely.buffer(geoms, buffer_m * units_per_metre("EPSG:3857", shapely.get_x(c), shapely.get_y(c)))
    else:  # whether polygons meet does not depend on the projection
        geoms = probe = np.asarray(polygons.geometry.values)
    yi = np.searchsorted(years, polygons["year"].to_numpy())
    # candidates: pairs of adjacent processed years whose (buffered) boxes meet
    a, b = pairs_across_years(probe, probe, yi, 1)
    keep = np.zeros(len(polygons), dtype=bool)
    x, y = inner_points(geoms)
    if buffer_m > 0:  # each polygon against the other's buffer
        keep[a[in_threads(polygons_meet, geoms[a], probe[b], x[a], y[a])]] = True
        keep[b[in_threads(polygons_meet, geoms[b], probe[a], x[b], y[b])]] = True
    else:
        meet = in_threads(polygons_meet, geoms[a], geoms[b], x[a], y[a])
        keep[a[meet]] = keep[b[meet]] = True
    return keep


def temporal_filter(polygons: gpd.GeoDataFrame, buffer_m: float = 0.0) -> gpd.GeoDataFrame:
    """The study's rule: keep the polygons of each year that meet a (buffered) polygon of an adjacent processed
    year; the first and last year look at their one neighbour."""
    return temporal_rule(polygons, "study", buffer_m).drop(columns="provisional")


def temporal_rule(polygons: gpd.GeoDataFrame, mode: str = "provisional", buffer_m: float = 0.0,
                  min_probability: float = 0.5) -> gpd.GeoDataFrame:
    """The polygons the temporal rule keeps, with a ``provisional`` column.

    ``study``: a polygon stays only if one of an adjacent processed year meets it; every mine that first appears
    in the newest year (or last appears in the oldest) has no such neighbour and is dropped. ``provisional``
    (the default): the same, but a polygon of the first or last processed year without a neighbour stays,
    marked ``provisional``, where the model is confident (``mean_probability`` at least ``min_probability``); a
    later run that adds the neighbouring year confirms or drops it. ``off``: every polygon, none provisional."""
    out = polygons.copy()
    out["provisional"] = False
    years = sorted(polygons["year"].unique())
    if mode == "off" or len(polygons) == 0:
        return out
    if len(years) < 2:
        log.warning("temporal rule needs two years or more; %s kept as is", years)
        return out
    keep = temporal_support(polygons, buffer_m)
    provisional = np.zeros(len(polygons), bool)
    if mode == "provisional":
        edge = polygons["year"].isin([years[0], years[-1]]).to_numpy()
        sure = (polygons["mean_probability"].fillna(0).to_numpy() >= min_probability
                if "mean_probability" in polygons else np.zeros(len(polygons), bool))
        provisional = edge & ~keep & sure
    out["provisional"] = provisional
    log.info("temporal rule (%s): kept %d of %d polygons, %d of them provisional", mode,
             int((keep | provisional).sum()), len(keep), int(provisional.sum()))
    return out.loc[keep | provisional].reset_index(drop=True)



GRID_DEG = 0.05  # cell of the grid that settles the polygons far from any border (~5.5 km at the equator)


def inland_cells(countries: gpd.GeoDataFrame, bounds: tuple[float, float, float, float], cell: float = GRID_DEG
                 ) -> tuple[np.ndarray, float, float]:
    """A grid of ``cell`` degrees over ``bounds`` (lon/lat, a cell of margin): in each cell, the index of the
    country that alone holds the whole cell, -1 where none does (a border or coast within a cell of it, sea, or
    countries overlapping). Returns the grid and its top-left corner (x0, y0).

    A cell that no country's boundary crosses lies wholly inside every country that covers its centre, and
    outside the others; the boundaries are burnt in with every cell they touch, and a cell more around them,
    so that rounding at a cell's edge can never leave one out."""
    from rasterio.features import MergeAlg, rasterize
    from rasterio.transform import from_origin
    from scipy.ndimage import binary_dilation

    minx, miny, maxx, maxy = bounds
    left, top, _, _ = Lattice(cell).snapped(bounds)
    x0, y0 = left - cell, top + cell  # a cell of margin
    shape = (int(np.ceil((y0 - miny) / cell)) + 2, int(np.ceil((maxx - x0) / cell)) + 2)
    transform = from_origin(x0, y0, cell, cell)
    c_geoms = np.asarray(countries.geometry.values)
    box = shapely.box(x0, y0 - shape[0] * cell, x0 + shape[1] * cell, y0)
    near = np.flatnonzero(shapely.intersects(c_geoms, box) & ~shapely.is_empty(c_geoms))
    # the polygons of each country (a repaired outline can hold stray lines or points, which hold no land)
    parts, owner = shapely.get_parts(c_geoms[near], return_index=True)
    polygonal = shapely.get_type_id(parts) == 3
    parts, owner = parts[polygonal], near[owner[polygonal]]
    if len(parts) == 0:
        return np.full(shape, -1, np.int32), float(x0), float(y0)
    grid = rasterize(zip(parts, owner), out_shape=shape, transform=transform, fill=-1, dtype="int32")
    count = rasterize(((g, 1) for g in parts), out_shape=shape, transform=transform, fill=0, dtype="uint16",
                      merge_alg=MergeAlg.add)
    edges = rasterize(((r, 1) for r in shapely.get_rings(parts)), out_shape=shape, transform=transform,
                      fill=0, dtype="uint8", all_touched=True)
    edges = binary_dilation(edges.astype(bool), structure=np.ones((3, 3), bool))
    grid[(count != 1) | edges] = -1
    return grid, float(x0), float(y0)


def _inland_country(geoms: np.ndarray, countries: gpd.GeoDataFrame, cell: float = GRID_DEG) -> np.ndarray:
    """Per polygon, the index of the country holding it whole, read from :func:`inland_cells` where the polygon's
    box lies in cells that one country alone holds (a box over at most 2 x 2 cells); -1 elsewhere. The embedded
    layer's grid is stored (:func:`~minemap.formats.countries.stored_inland_grid`); another layer's is computed
    over the polygons' bounds."""
    bounds = shapely.bounds(geoms)
    ok = np.isfinite(bounds).all(1)
    out = np.full(len(geoms), -1, np.int64)
    if not ok.any():
        return out
    grid, x0, y0 = stored_inland_grid(countries, cell) or inland_cells(
        countries, tuple(np.r_[bounds[ok, :2].min(0), bounds[ok, 2:].max(0)]), cell)
    b = np.where(ok[:, None], bounds, 0.0)
    c0, c1 = np.floor((b[:, 0] - x0) / cell).astype(np.int64), np.floor((b[:, 2] - x0) / cell).astype(np.int64)
    r0, r1 = np.floor((y0 - b[:, 3]) / cell).astype(np.int64), np.floor((y0 - b[:, 1]) / cell).astype(np.int64)
    h, w = grid.shape
    small = ok & (c1 - c0 <= 1) & (r1 - r0 <= 1) & (c0 >= 0) & (r0 >= 0) & (c1 < w) & (r1 < h)
    i = np.flatnonzero(small)
    corners = np.stack([grid[r0[i], c0[i]], grid[r0[i], c1[i]], grid[r1[i], c0[i]], grid[r1[i], c1[i]]])
    same = (corners == corners[0]).all(0) & (corners[0] >= 0)
    out[i[same]] = corners[0, same]
    return out


def attribute_countries(polygons: gpd.GeoDataFrame, countries: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Add ``iso3`` and ``country``: the country covering the largest part of each polygon.

    Polygons far from any border or coast (nearly all) take their country from a grid of cells that one country
    alone holds (:func:`inland_cells`); the others within one country take it from a prepared spatial index
    query; only those crossing a border are intersected with the countries, in an equal-area CRS, and those
    offshore of the coastline take the nearest country within ``NEAREST_MAX_M``."""
    out = polygons.copy()
    n = len(out)
    iso = np.full(n, None, dtype=object)
    name = np.full(n, None, dtype=object)
    if n == 0:
        out["iso3"], out["country"] = iso, name
        return out
    c_iso, c_name = countries.iso3.to_numpy(), countries.country.to_numpy()
    all_geoms = np.asarray(out.geometry.values)
    inland = _inland_country(all_geoms, countries)
    held = np.flatnonzero(inland >= 0)
    iso[held], name[held] = c_iso[inland[held]], c_name[inland[held]]
    todo = np.flatnonzero(inland < 0)
    geoms = all_geoms[todo]
    # each country, prepared once (its edges indexed), tested against the polygons in its box: far cheaper than
    # testing each small polygon against a whole country outline
    ci, pi = shapely.STRtree(geoms).query(np.asarray(countries.geometry.values), predicate="contains")
    single = np.bincount(pi, minlength=len(todo)) == 1  # within exactly one country (overlapping layers: measure)
    inside = single[pi]
    iso[todo[pi[inside]]], name[todo[pi[inside]]] = c_iso[ci[inside]], c_name[ci[inside]]
    rest = todo[~single]
    if len(rest):
        p_ea = shapely.make_valid(np.asarray(gpd.GeoSeries(all_geoms[rest], crs=WGS84).to_crs(EQUAL_AREA).values))
        # only the countries near these polygons are projected (a 1:10m layer holds millions of vertices); a
        # country across the antimeridian can come out of the projection self-intersecting
        near = _countries_near(all_geoms[rest], countries)
        c_ea = shapely.make_valid(np.asarray(countries.geometry.iloc[near].to_crs(EQUAL_AREA).values))
        tree = shapely.STRtree(c_ea)
        qi, ci = tree.query(p_ea, predicate="intersects")  # ci: positions in near
        if len(qi):
            share = shapely.area(shapely.intersection(p_ea[qi], c_ea[ci]))
            pairs = pd.DataFrame({"p": qi, "c": ci, "share": share}).sort_values(["p", "share"],
                                                                                ascending=[True, False])
            best = pairs.drop_duplicates("p")
            won = near[best.c.to_numpy()]
            iso[rest[best.p.to_numpy()]], name[rest[best.p.to_numpy()]] = c_iso[won], c_name[won]
        missing = np.flatnonzero(pd.isna(iso[rest]))
        if len(missing):
            src, dst = nearest_outline(p_ea[missing], c_ea, tree, NEAREST_MAX_M)
            dst = near[dst]
            iso[rest[missing[src]]], name[rest[missing[src]]] = c_iso[dst], c_name[dst]
    out["iso3"] = pd.Series(iso, index=out.index, dtype=object)
    out["country"] = pd.Series(name, index=out.index, dtype=object)
    return out


def _countries_near(geoms: np.ndarray, countries: gpd.GeoDataFrame) -> np.ndarray:
    """Sorted indices of the countries whose outline comes within :data:`NEAREST_MAX_M` (in the equal-area
    CRS, whose metres stretch towards the poles) of any of ``geoms`` (EPSG:4326): each polygon's box grown by a
    margin in degrees that covers that distance at the box's latitude, tested against the countries' outlines."""
    b = shapely.bounds(geoms)
    lat = np.clip(np.maximum(np.abs(b[:, 1]), np.abs(b[:, 3])), 0, 89)
    margin = 2 * NEAREST_MAX_M / 111_320 / np.maximum(np.cos(np.radians(lat)), 0.02)  # twice the degrees needed
    boxes = shapely.box(b[:, 0] - margin, b[:, 1] - margin, b[:, 2] + margin, b[:, 3] + margin)
    _, ci = shapely.STRtree(np.asarray(countries.geometry.values)).query(boxes, predicate="intersects")
    return np.unique(ci)


def nearest_outline(geoms: np.ndarray, outlines: np.ndarray, tree: shapely.STRtree, max_distance: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For ``geoms`` that meet none of ``outlines`` (polygons, indexed by ``tree``): (positions in ``geoms``,
    indices of their nearest outline within ``max_distance``), those with none left out. The distance to a
    polygon a geometry lies outside of is the distance to its rings, so the rings of the outlines near any of
    them are cut into segments and indexed: the nearest of a 1:10m country (100,000 vertices) is found in a few
    segment tests, not one test of every vertex. Outlines at the same distance: the first."""
    near = np.unique(tree.query(geoms, predicate="dwithin", distance=max_distance)[1])
    if len(near) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    parts, owner = shapely.get_parts(outlines[near], return_index=True)
    polygonal = shapely.get_type_id(parts) == 3
    parts, owner = parts[polygonal], near[owner[polygonal]]
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
    joined = np.flatnonzero(coord_ring[:-1] == coord_ring[1:])  # consecutive vertices of one ring
    segments = shapely.linestrings(np.stack([coords[joined], coords[joined + 1]], axis=1))
    segment_owner = owner[ring_part[coord_ring[joined]]]
    (src, dst), _ = shapely.STRtree(segments).query_nearest(geoms, max_distance=max_distance,
                                                             return_distance=True, all_matches=True)
    # several at the same distance (a corner's two segments, two countries' shared corner): the first outline
    pairs = np.unique(np.stack([src, segment_owner[dst]], axis=1), axis=0)  # sorted by position, then outline
    first = group_starts(pairs[:, 0])
    return pairs[first, 0], pairs[first, 1]


def make_valid(geoms: np.ndarray) -> np.ndarray:
    """The geometries, with the invalid ones (self-intersecting rings, ...) made valid; valid ones unchanged.
    Testing validity costs about half of repairing, and nearly every polygon is valid."""
    geoms = geoms.copy()
    bad = np.flatnonzero(~in_threads(shapely.is_valid, geoms))
    if len(bad):
        geoms[bad] = shapely.make_valid(geoms[bad])
    return geoms


def postprocess(polygons: gpd.GeoDataFrame, cfg: PostprocessConfig | None = None) -> gpd.GeoDataFrame:
    """Temporal filter (optional), valid geometries, countries and areas in km2 on the ellipsoid."""
    cfg = cfg or PostprocessConfig()
    gdf = polygons.copy()
    gdf["geometry"] = make_valid(np.asarray(gdf.geometry.values))
    gdf = temporal_rule(gdf, cfg.temporal, cfg.buffer_m, cfg.provisional_min_probability)
    gdf = attribute_countries(gdf, load_countries(cfg.countries))
    gdf["area_km2"] = area_km2(gdf.geometry.values, valid=True)  # made valid above
    cols = ["year", "iso3", "country", "area_km2"] + [c for c in ("mean_probability",) if c in gdf] + \
        ["provisional"] + [c for c in ("filled_share",) if c in gdf] + ["geometry"]
    return gdf[cols]


def postprocess_stage(polygons: gpd.GeoDataFrame, dest: Path, cfg: PostprocessConfig | None = None) -> gpd.GeoDataFrame:
    gdf = postprocess(polygons, cfg)
    write_geoparquet(gdf, dest)
    return gdf
