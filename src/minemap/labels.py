"""Labels: read, validate, repair, merge and deduplicate polygons of known mining areas.

Reads one or several GeoPackage, GeoJSON, Shapefile or GeoParquet files; writes one clean GeoParquet
(EPSG:4326, columns ``label_id, source, source_id, geometry``), every geometry a valid, non-empty Polygon.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from minemap.errors import InputError
from minemap.formats.vectors import read_vector, write_geoparquet
from minemap.geo import WGS84

log = logging.getLogger(__name__)

DUPLICATE_IOU = 0.9


@dataclass
class LabelReport:
    """What cleaning did, by count."""

    read: dict[str, int] = field(default_factory=dict)
    dropped_non_polygon: int = 0
    dropped_empty: int = 0
    repaired_invalid: int = 0
    parts_from_multipolygons: int = 0
    dropped_duplicates: int = 0
    dropped_outside_latitude: int = 0
    kept: int = 0

    def as_dict(self) -> dict:
        return asdict(self)



def _polygon_parts(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Explode to single polygons; returns (parts, index of the input each part came from)."""
    parts, idx = shapely.get_parts(geoms, return_index=True)
    # GeometryCollections from make_valid can nest; a second pass flattens them
    nested = shapely.get_type_id(parts) == shapely.GeometryType.GEOMETRYCOLLECTION
    if nested.any():
        sub, sub_idx = shapely.get_parts(parts[nested], return_index=True)
        parts = np.concatenate([parts[~nested], sub])
        idx = np.concatenate([idx[~nested], idx[nested][sub_idx]])
    keep = shapely.get_type_id(parts) == shapely.GeometryType.POLYGON
    return parts[keep], idx[keep]


def clean_labels(gdf: gpd.GeoDataFrame, report: LabelReport | None = None) -> gpd.GeoDataFrame:
    """Repair and explode one source's geometries to valid single Polygons in EPSG:4326."""
    report = report if report is not None else LabelReport()
    gdf = gdf.to_crs(WGS84)
    geoms = np.asarray(gdf.geometry.values)
    missing = pd.isna(geoms) | shapely.is_empty(geoms)
    report.dropped_empty += int(missing.sum())
    types = shapely.get_type_id(geoms)
    polygonal = np.isin(types, [shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON,
                                shapely.GeometryType.GEOMETRYCOLLECTION]) & ~missing
    report.dropped_non_polygon += int((~polygonal & ~missing).sum())
    src_rows = np.flatnonzero(polygonal)
    geoms = geoms[src_rows]
    invalid = ~shapely.is_valid(geoms)
    report.repaired_invalid += int(invalid.sum())
    geoms = geoms.copy()
    geoms[invalid] = shapely.make_valid(geoms[invalid])
    parts, idx = _polygon_parts(geoms)
    report.parts_from_multipolygons += int(len(parts) - len(np.unique(idx)))
    nonempty = ~shapely.is_empty(parts) & (shapely.area(parts) > 0)
    report.dropped_empty += int((~nonempty).sum())
    parts, idx = parts[nonempty], idx[nonempty]
    out = gdf.iloc[src_rows[idx]].drop(columns=gdf.geometry.name).reset_index(drop=True)
    return gpd.GeoDataFrame(out, geometry=parts, crs=WGS84)


def drop_duplicates(gdf: gpd.GeoDataFrame, iou: float = DUPLICATE_IOU) -> tuple[gpd.GeoDataFrame, int]:
    """Drop polygons that repeat an earlier one: the same shape, or an overlap of IoU >= ``iou``."""
    geoms = gdf.geometry.values
    key = shapely.to_wkb(shapely.normalize(shapely.set_precision(np.asarray(geoms), 1e-9)))
    exact_dup = pd.Series(key).duplicated().to_numpy()
    tree = shapely.STRtree(np.asarray(geoms))
    a, b = tree.query(np.asarray(geoms), predicate="intersects")
    later = b > a
    a, b = a[later], b[later]
    ga, gb = np.asarray(geoms)[a], np.asarray(geoms)[b]
    inter = shapely.area(shapely.intersection(ga, gb))
    union = shapely.area(ga) + shapely.area(gb) - inter
    near = inter / np.where(union > 0, union, 1) >= iou
    drop = exact_dup.copy()
    drop[b[near]] = True
    return gdf.loc[~drop].reset_index(drop=True), int(drop.sum())


def read_labels(paths: list[Path] | Path, max_abs_lat: float | None = None) -> tuple[gpd.GeoDataFrame, LabelReport]:
    """Read, clean, merge and deduplicate label files into one GeoDataFrame (EPSG:4326)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise InputError("no label files given")
    report = LabelReport()
    frames = []
    for path in paths:
        raw = read_vector(path)
        report.read[str(path)] = len(raw)
        id_col = next((c for c in ("id", "ID", "fid", "label_id") if c in raw.columns), None)
        raw = raw.assign(source=Path(path).stem,
                         source_id=(raw[id_col] if id_col else pd.Series(range(len(raw)), index=raw.index)).astype(str))
        cleaned = clean_labels(raw[["source", "source_id", raw.geometry.name]], report)
        if len(cleaned) == 0:
            raise InputError(f"{path}: has no polygons (only {', '.join(sorted(set(raw.geom_type.dropna())))})")
        frames.append(cleaned)
    gdf = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=WGS84)
    gdf, report.dropped_duplicates = drop_duplicates(gdf)
    if max_abs_lat is not None:
        lat = shapely.get_y(shapely.centroid(gdf.geometry.values))
        inside = np.abs(lat) <= max_abs_lat
        report.dropped_outside_latitude = int((~inside).sum())
        gdf = gdf.loc[inside].reset_index(drop=True)
    gdf.insert(0, "label_id", np.arange(len(gdf), dtype=np.int64))
    report.kept = len(gdf)
    log.info("labels: %s", report.as_dict())
    return gdf, report



def labels_stage(paths: list[Path], dest: Path, max_abs_lat: float | None = None) -> LabelReport:
    """Stage ``labels``: clean label files into one GeoParquet at ``dest``."""
    gdf, report = read_labels(paths, max_abs_lat=max_abs_lat)
    write_geoparquet(gdf, dest)
    return report
