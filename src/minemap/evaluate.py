"""Evaluation: pixel and object metrics of the panel against reference polygons, per year.

Pixel metrics (precision, recall, F1, IoU, accuracy) compare the panel's polygons with the reference, both
rasterised on the probability rasters' grid, over pixels that have imagery. A threshold sweep on the raw
probabilities shows the model's own precision/recall trade-off before vectorising and post-processing.
The calibration of the probabilities (expected calibration error and a reliability table, ten bins) is
measured against the reference the same way. Object metrics: the share of predicted mines that overlap a reference polygon (precision) and of reference
polygons that overlap a predicted mine (recall).

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

from minemap._io import write_json
from minemap.errors import InputError
from minemap.geo import WGS84
from minemap.labels import VECTOR_SUFFIXES, clean_labels, read_vector
from minemap.metrics import binary_metrics, histograms, metrics_at, reliability, sweep
from minemap.rasters import LEVELS, NODATA

log = logging.getLogger(__name__)


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
    return sorted(folder.glob("*.tif")) if folder.is_dir() else []


def _burn(gdf: gpd.GeoDataFrame, shape: tuple[int, int], transform, crs) -> np.ndarray:
    """Pixels of a grid covered by the polygons (pixel centres inside)."""
    if len(gdf) == 0:
        return np.zeros(shape, bool)
    geoms = gdf.to_crs(crs).geometry.values
    return rasterize(((g, 1) for g in geoms), out_shape=shape, transform=transform, dtype=np.uint8) > 0


def evaluate_year(predicted: gpd.GeoDataFrame, reference: gpd.GeoDataFrame, tiles: list[Path],
                  threshold: float | None = None) -> dict:
    """Metrics of one year. ``predicted`` and ``reference`` hold that year's polygons (EPSG:4326)."""
    counts = np.zeros(4)  # tp, fp, fn, tn
    hpos = np.zeros(LEVELS + 1, np.int64)
    hneg = np.zeros(LEVELS + 1, np.int64)
    footprints = []
    for path in tiles:
        with rasterio.open(path) as src:
            q = src.read(1)
            shape, transform, crs = q.shape, src.transform, src.crs
            footprints.append(gpd.GeoSeries([shapely.box(*src.bounds)], crs=crs).to_crs(WGS84).iloc[0])
        valid = q != NODATA
        truth = _burn(reference, shape, transform, crs)
        pred = _burn(predicted, shape, transform, crs)
        t, p = truth[valid], pred[valid]
        counts += [np.sum(t & p), np.sum(~t & p), np.sum(t & ~p), np.sum(~t & ~p)]
        hp, hn = histograms(q[valid], t)
        hpos += hp
        hneg += hn
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
    out = {
        "pixel": binary_metrics(*counts),
        "object": {"precision": float(pred_hit.mean()) if len(pred) else 0.0,
                   "recall": float(ref_hit.mean()) if len(ref) else 0.0,
                   "n_predicted": int(len(pred)), "n_reference": int(len(ref))},
        "raw_probability": {"threshold_sweep": sweep(hpos, hneg)},
        "calibration": reliability(hpos, hneg),
        "_counts": counts.tolist(),
    }
    if threshold is not None:
        out["raw_probability"]["at_threshold"] = {"threshold": threshold, **metrics_at(hpos, hneg, threshold)}
    return out


def evaluate(predicted: gpd.GeoDataFrame, reference: gpd.GeoDataFrame, prob_dir: Path,
             threshold: float | None = None, reference_path: Path | None = None) -> dict:
    """Per-year and overall metrics of ``predicted`` (panel or polygons, column ``year``) vs ``reference``."""
    years = sorted(set(predicted["year"]).union(reference["year"]))
    result: dict = {"years": {}, "threshold": threshold}
    total = np.zeros(4)
    for year in years:
        tiles = _year_tiles(prob_dir, year)
        if not tiles:
            continue
        ref_y = reference[reference.year == year]
        if len(ref_y) == 0 and year not in set(reference["year"]):
            log.warning("no reference polygons for %d: not evaluated", year)
            continue
        m = evaluate_year(predicted[predicted.year == year], ref_y, tiles, threshold)
        total += m.pop("_counts")
        result["years"][str(year)] = m
    if not result["years"]:
        where = f"{reference_path}: " if reference_path else ""
        raise InputError(f"{where}reference covers none of the predicted years {sorted(set(predicted['year']))}")
    result["overall"] = {"pixel": binary_metrics(*total)}
    return result


def evaluate_stage(predicted: gpd.GeoDataFrame, reference_path: Path, prob_dir: Path, dest: Path,
                   threshold: float | None = None) -> dict:
    result = evaluate(predicted, read_reference(reference_path), prob_dir, threshold, reference_path)
    write_json(dest, result)
    return result
