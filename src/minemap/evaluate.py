"""Evaluation: pixel and object metrics of the panel against reference polygons, per year.

Pixel metrics (precision, recall, F1, IoU, accuracy) compare the panel's polygons with the reference, both
rasterised on the probability rasters' grid, over pixels that have imagery. A threshold sweep on the raw
probabilities shows the model's own precision/recall trade-off before vectorising and post-processing.
The calibration of the probabilities (expected calibration error and a reliability table, ten bins) is
measured against the reference the same way. Object metrics: the share of predicted mines that overlap a reference polygon (precision) and of reference
polygons that overlap a predicted mine (recall).

Intervals: pixels next to each other are not independent, so 95 % intervals come from a bootstrap over
spatial blocks (:data:`BLOCK_M` on a side, in the probability rasters' CRS): per-block confusion counts and
object counts are resampled as wholes (:func:`minemap.metrics.block_bootstrap`), per year and pooled over the
years. Where the reference spans several countries, pixel metrics (with intervals) are given per country too,
each block going to the country under its centre.

Reference: one file with a ``year`` column, or a folder of per-year files whose names contain the year.
Writes ``metrics.json``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from rasterio.features import rasterize

from minemap._io import outputs, write_json
from minemap.errors import InputError
from minemap.geo import WGS84, units_per_metre
from minemap.lattice import Grid
from minemap.labels import clean_labels
from minemap.formats.vectors import VECTOR_SUFFIXES, read_vector
from minemap.formats.countries import load_countries
from minemap.metrics import (binary_metrics, block_bootstrap, histograms, metrics_at, object_statistics,
                             pixel_statistics, reliability, sweep)
from minemap.formats.rasters import LEVELS, NODATA

log = logging.getLogger(__name__)
BLOCK_M = 1000.0  # side of the bootstrap's spatial blocks: wider than a mine and its surroundings
BOOTSTRAP = 1000  # resamples


def read_reference(path: Path) -> gpd.GeoDataFrame:
    """Reference polygons with a ``year`` column (EPSG:4326, valid single polygons)."""
    path = Path(path)
    if path.is_dir():
        frames = []
        for f in sorted(path.iterdir()):
            m = re.search(r"(19|20)\d{2}", f.stem)
            if f.suffix.lower() in VECTOR_SUFFIXES and m:
                frames.append(read_vector(f).assign(year=int(m.group(0))))
        if not frames:
            raise InputError(f"{path}: no vector files named by year (e.g. reference_2019.gpkg)")
        gdf = gpd.GeoDataFrame(pd.concat([f.to_crs(WGS84) for f in frames], ignore_index=True), crs=WGS84)
    else:
        gdf = read_vector(path)
        if "year" not in gdf.columns:
            raise InputError(f"{path}: reference needs a 'year' column (or pass a folder of per-year files)")
    try:
        gdf["year"] = gdf["year"].astype(int)
    except (TypeError, ValueError):
        raise InputError(f"{path}: column 'year' holds values that are not years") from None
    return clean_labels(gdf[["year", gdf.geometry.name]])


def _year_tiles(prob_dir: Path, year: int) -> list[Path]:
    folder = Path(prob_dir) / str(year)
    return outputs(folder, "*.tif")  # not the hidden temporaries of tiles being (or left half) written


def _burn(gdf: gpd.GeoDataFrame, shape: tuple[int, int], transform, crs) -> np.ndarray:
    """Pixels of a grid covered by the polygons (pixel centres inside)."""
    if len(gdf) == 0:
        return np.zeros(shape, bool)
    geoms = gdf.to_crs(crs).geometry.values
    return rasterize(((g, 1) for g in geoms), out_shape=shape, transform=transform, dtype=np.uint8) > 0


class _Blocks:
    """Per-block counts of one year: pixel confusion counts (tp, fp, fn, tn) and object counts (predicted,
    predicted that meet a reference, reference, reference met), keyed by the block's (column, row) on a grid of
    ``size`` CRS units in ``crs``."""

    def __init__(self, crs, size: float) -> None:
        self.crs, self.size = crs, size
        self.pixels: dict[tuple[int, int], np.ndarray] = {}
        self.objects: dict[tuple[int, int], np.ndarray] = {}

    def add_pixels(self, truth: np.ndarray, pred: np.ndarray, valid: np.ndarray, transform) -> None:
        h, w = truth.shape
        bx = np.floor((transform.c + (np.arange(w) + 0.5) * transform.a) / self.size).astype(np.int64)
        by = np.floor((transform.f + (np.arange(h) + 0.5) * transform.e) / self.size).astype(np.int64)
        ux, ix = np.unique(bx, return_inverse=True)
        uy, iy = np.unique(by, return_inverse=True)
        local = (iy[:, None] * len(ux) + ix[None, :])[valid]
        code = 2 * truth[valid].astype(np.int64) + pred[valid]  # 0 tn, 1 fp, 2 fn, 3 tp
        counts = np.bincount(4 * local + code, minlength=4 * len(ux) * len(uy)).reshape(-1, 4)[:, [3, 1, 2, 0]]
        for k in np.flatnonzero(counts.sum(1)):
            key = (int(ux[k % len(ux)]), int(uy[k // len(ux)]))
            self.pixels[key] = self.pixels.get(key, 0) + counts[k]

    def add_objects(self, geoms: np.ndarray, hit: np.ndarray, column: int) -> None:
        """Objects (EPSG:4326) go to the block of a point inside them; ``column``: 0 predicted, 2 reference."""
        if len(geoms) == 0:
            return
        pts = gpd.GeoSeries(shapely.point_on_surface(geoms), crs=WGS84).to_crs(self.crs)
        keys = zip(np.floor(pts.x / self.size).astype(np.int64), np.floor(pts.y / self.size).astype(np.int64))
        for key, h in zip(keys, hit):
            row = self.objects.setdefault((int(key[0]), int(key[1])), np.zeros(4))
            row[column] += 1
            row[column + 1] += bool(h)

    def centres(self) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
        """Keys of the blocks with pixels, and their centres' longitude and latitude."""
        keys = list(self.pixels)
        x = (np.array([k[0] for k in keys], float) + 0.5) * self.size
        y = (np.array([k[1] for k in keys], float) + 0.5) * self.size
        lonlat = gpd.GeoSeries(gpd.points_from_xy(x, y), crs=self.crs).to_crs(WGS84)
        return keys, lonlat.x.to_numpy(), lonlat.y.to_numpy()


def _intervals(blocks: dict, statistic) -> dict[str, list[float]]:
    return block_bootstrap(np.array(list(blocks.values())), statistic, BOOTSTRAP) if blocks else {}


EVALUATE_FORMAT = 2  # bumped when metrics.json changes, so that a resumed run evaluates again
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}  # of the split raster; 0: ground in no block
HEADLINE = {True: "test blocks (never trained on nor tuned on)",
            False: "every pixel (no blocks of a training: a model trained elsewhere)"}


class _Scope:
    """Counts of one part of the ground in one year: confusion counts over every pixel (reference that the run
    left without an observation counted as missed) and over observed pixels only, the reference's unobserved
    pixels (all, and those the imagery itself had no data for), probability histograms, and per-block counts."""

    def __init__(self) -> None:
        self.every = np.zeros(4)  # tp, fp, fn, tn
        self.observed = np.zeros(4)
        self.reference = 0
        self.unobserved = 0
        self.unobserved_found = 0  # of those, covered by an outline filled from the years beside (or drawn anyway)
        self.no_imagery = 0
        self.hpos = np.zeros(LEVELS + 1, np.int64)
        self.hneg = np.zeros(LEVELS + 1, np.int64)
        self.blocks: _Blocks | None = None

    def add(self, q, truth, pred, valid, inside, source_valid, transform) -> None:
        def confusion(m):
            t, p = truth[m], pred[m]
            return [np.sum(t & p), np.sum(~t & p), np.sum(t & ~p), np.sum(~t & ~p)]

        self.every += confusion(inside)
        self.observed += confusion(inside & valid)
        ref = truth & inside
        self.reference += int(ref.sum())
        self.unobserved += int((ref & ~valid).sum())
        self.unobserved_found += int((ref & ~valid & pred).sum())
        if source_valid is not None:
            self.no_imagery += int((ref & ~source_valid).sum())
        hp, hn = histograms(q[inside & valid], truth[inside & valid])
        self.hpos += hp
        self.hneg += hn
        self.blocks.add_pixels(truth, pred, inside, transform)

    def unobserved_record(self, with_source: bool) -> dict:
        share = self.unobserved / self.reference if self.reference else 0.0
        out = {"reference_pixels": self.reference, "unobserved_pixels": self.unobserved,
               "reference_share": round(float(share), 5),
               "found_share": round(self.unobserved_found / self.unobserved, 5) if self.unobserved else 0.0}
        if with_source:  # the rest the run masked itself (clouds, shadows)
            out["no_imagery_share"] = round(self.no_imagery / self.reference, 5) if self.reference else 0.0
            out["masked_share"] = round((self.unobserved - self.no_imagery) / self.reference, 5) \
                if self.reference else 0.0
        return out


def _split_raster(splits: gpd.GeoDataFrame | None, shape, transform, crs) -> np.ndarray | None:
    """Each pixel's split code (:data:`SPLIT_CODES`, 0 outside every block), or None without splits."""
    if splits is None:
        return None
    if len(splits) == 0:
        return np.zeros(shape, np.uint8)
    geoms = splits.to_crs(crs).geometry.values
    codes = splits["split"].map(SPLIT_CODES).fillna(0).astype(int).to_numpy()
    return rasterize(((g, int(c)) for g, c in zip(geoms, codes) if c), out_shape=shape, transform=transform,
                     dtype=np.uint8, fill=0)


def evaluate_year(predicted: gpd.GeoDataFrame, reference: gpd.GeoDataFrame, tiles: list[Path],
                  threshold: float | None = None, splits: gpd.GeoDataFrame | None = None,
                  source=None, year: int | None = None) -> dict:
    """Metrics of one year. ``predicted`` and ``reference`` hold that year's polygons (EPSG:4326).

    Every pixel of the probability tiles counts: reference pixels without an observation (no imagery, or
    masked as cloud or shadow) are missed mines, not pixels left out. ``splits`` (blocks with a ``split``
    column, :func:`minemap.formats.chips.split_blocks`): the headline is the test blocks, and every block's figure is
    given beside it under ``all_blocks``, marked in-sample; without it every pixel is the headline. ``source``
    (an :class:`~minemap.imagery.ImagerySource`, with ``year``): the unobserved reference is split into what the
    imagery itself had no data for and what the run masked. The per-scope counts come back under ``_scopes``
    for pooling over years."""
    held, every = _Scope(), _Scope()
    footprints = []
    for path in tiles:
        with rasterio.open(path) as src:
            q = src.read(1)
            shape, transform, crs = q.shape, src.transform, src.crs
            footprints.append(gpd.GeoSeries([shapely.box(*src.bounds)], crs=crs).to_crs(WGS84).iloc[0])
            if held.blocks is None:  # one grid of blocks for the year, in metres at its first tile's centre
                cx, cy = src.xy(src.height // 2, src.width // 2)
                size = BLOCK_M * float(units_per_metre(crs, cx, cy)[0])
                held.blocks, every.blocks = _Blocks(crs, size), _Blocks(crs, size)
        valid = q != NODATA
        truth = _burn(reference, shape, transform, crs)
        pred = _burn(predicted, shape, transform, crs)
        source_valid = None
        if source is not None:
            source_valid = source.read(year, Grid(crs, transform, shape[1], shape[0]))[1]
        split = _split_raster(splits, shape, transform, crs)
        inside = np.ones(shape, bool)
        every.add(q, truth, pred, valid, inside, source_valid, transform)
        if split is not None:
            inside = split == SPLIT_CODES["test"]
        held.add(q, truth, pred, valid, inside, source_valid, transform)
    area = shapely.union_all(footprints) if footprints else shapely.Polygon()
    ref = np.asarray(reference.geometry.values)
    ref = ref[shapely.intersects(ref, area)]
    pred = np.asarray(predicted.geometry.values)
    pred_hit = np.zeros(len(pred), bool)
    ref_hit = np.zeros(len(ref), bool)
    if len(pred) and len(ref):
        a, b = shapely.STRtree(ref).query(pred, predicate="intersects")
        overlap = shapely.area(shapely.intersection(pred[a], ref[b])) > 0
        pred_hit[a[overlap]] = True
        ref_hit[b[overlap]] = True
    # objects of the headline: those whose inner point lies in a test block (all of them without blocks)
    pred_in, ref_in = np.ones(len(pred), bool), np.ones(len(ref), bool)
    if splits is not None:
        tests = shapely.union_all(splits.loc[splits["split"] == "test"].to_crs(WGS84).geometry.values)
        pred_in = shapely.contains_xy(tests, *_xy(pred)) if len(pred) else pred_in
        ref_in = shapely.contains_xy(tests, *_xy(ref)) if len(ref) else ref_in
    if held.blocks is not None:
        held.blocks.add_objects(pred[pred_in], pred_hit[pred_in], 0)
        held.blocks.add_objects(ref[ref_in], ref_hit[ref_in], 2)
    with_source = source is not None
    pixel = binary_metrics(*held.every)
    obj = {"precision": float(pred_hit[pred_in].mean()) if pred_in.any() else 0.0,
           "recall": float(ref_hit[ref_in].mean()) if ref_in.any() else 0.0,
           "n_predicted": int(pred_in.sum()), "n_reference": int(ref_in.sum())}
    if held.blocks is not None:
        pixel["ci95"] = _intervals(held.blocks.pixels, pixel_statistics)
        obj["ci95"] = _intervals(held.blocks.objects, object_statistics)
    out = {
        "scope": HEADLINE[splits is not None],
        "pixel": pixel,
        "unobserved": held.unobserved_record(with_source),
        "observed_only": {"pixel": binary_metrics(*held.observed),
                          "note": "the headline's pixels with an observation only (unobserved ones left out)"},
        "object": obj,
        "blocks": {"side_m": BLOCK_M, "n": len(held.blocks.pixels) if held.blocks is not None else 0},
        "raw_probability": {"threshold_sweep": sweep(held.hpos, held.hneg)},
        "calibration": reliability(held.hpos, held.hneg),
        "_scopes": (held, every),
    }
    if splits is not None:
        all_pixel = binary_metrics(*every.every)
        if every.blocks is not None:
            all_pixel["ci95"] = _intervals(every.blocks.pixels, pixel_statistics)
        out["all_blocks"] = {"in_sample": True, "pixel": all_pixel,
                             "unobserved": every.unobserved_record(with_source),
                             "calibration": reliability(every.hpos, every.hneg),
                             "note": "every pixel, training and validation blocks included: in-sample"}
    if threshold is not None:
        out["raw_probability"]["at_threshold"] = {"threshold": threshold,
                                                  **metrics_at(held.hpos, held.hneg, threshold)}
    return out


def _xy(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pts = shapely.point_on_surface(geoms)
    return shapely.get_x(pts), shapely.get_y(pts)


def by_country(blocks: _Blocks, countries: gpd.GeoDataFrame) -> dict[str, dict]:
    """Pixel metrics with intervals per country (the one under each block's centre; "(none)" offshore), where
    the reference spans two countries or more; else empty."""
    keys, lon, lat = blocks.centres()
    iso = np.full(len(keys), "(none)", dtype=object)
    pi, ci = shapely.STRtree(np.asarray(countries.geometry.values)).query(shapely.points(lon, lat), predicate="within")
    iso[pi] = countries.iso3.to_numpy()[ci]
    parts = np.array([blocks.pixels[k] for k in keys], dtype=float)
    if len({i for i, c in zip(iso, parts) if c[0] + c[2] > 0}) < 2:
        return {}
    out = {}
    for code in sorted(set(iso)):
        mine = parts[iso == code]
        out[str(code)] = {**binary_metrics(*mine.sum(0)), "blocks": len(mine),
                          "ci95": block_bootstrap(mine, pixel_statistics, BOOTSTRAP)}
    return out


def evaluate(predicted: gpd.GeoDataFrame, reference: gpd.GeoDataFrame, prob_dir: Path,
             threshold: float | None = None, reference_path: Path | None = None,
             splits: gpd.GeoDataFrame | None = None, source=None) -> dict:
    """Per-year and overall metrics of ``predicted`` (panel or polygons, column ``year``) vs ``reference``;
    ``splits`` and ``source`` as in :func:`evaluate_year`."""
    years = sorted(set(predicted["year"]).union(reference["year"]))
    result: dict = {"years": {}, "threshold": threshold, "scope": HEADLINE[splits is not None],
                    "unobserved_rule": "reference pixels without an observation (no imagery, or masked as cloud "
                                       "or shadow) count as missed, unless an outline covers them (filled from "
                                       "the years beside: vectorize.fill_unobserved); found_share: that share of "
                                       "them"}
    totals = [np.zeros(4), np.zeros(4)]  # headline, every pixel
    year_scopes: list[tuple[_Scope, _Scope]] = []
    have = source.years() if source is not None else []
    for year in years:
        tiles = _year_tiles(prob_dir, year)
        if not tiles:
            continue
        ref_y = reference[reference.year == year]
        if len(ref_y) == 0 and year not in set(reference["year"]):
            log.warning("no reference polygons for %d: not evaluated", year)
            continue
        m = evaluate_year(predicted[predicted.year == year], ref_y, tiles, threshold, splits,
                          source if year in have else None, year)
        scopes = m.pop("_scopes")
        year_scopes.append(scopes)
        for total, scope in zip(totals, scopes):
            total += scope.every
        result["years"][str(year)] = m
    if not result["years"]:
        where = f"{reference_path}: " if reference_path else ""
        raise InputError(f"{where}reference covers none of the predicted years {sorted(set(predicted['year']))}")
    result["overall"] = {"pixel": binary_metrics(*totals[0])}
    if splits is not None:
        result["overall"]["all_blocks"] = {"in_sample": True, "pixel": binary_metrics(*totals[1])}
    blocks = [s[0].blocks for s in year_scopes if s[0].blocks is not None]
    if blocks and len({(str(b.crs), round(b.size, 9)) for b in blocks}) == 1:
        # one grid of blocks for every year: a block's years are resampled together
        pooled = _Blocks(blocks[0].crs, blocks[0].size)
        for b in blocks:
            for k, c in b.pixels.items():
                pooled.pixels[k] = pooled.pixels.get(k, 0) + c
        result["overall"]["pixel"]["ci95"] = _intervals(pooled.pixels, pixel_statistics)
        countries = by_country(pooled, load_countries())
        if countries:
            result["by_country"] = countries
    return result


def evaluate_stage(predicted: gpd.GeoDataFrame, reference_path: Path, prob_dir: Path, dest: Path,
                   threshold: float | None = None, splits: gpd.GeoDataFrame | None = None, source=None) -> dict:
    result = evaluate(predicted, read_reference(reference_path), prob_dir, threshold, reference_path, splits,
                      source)
    write_json(dest, result)
    return result
