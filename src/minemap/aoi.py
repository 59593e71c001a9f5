"""Areas of interest: where to map, as one EPSG:4326 geometry.

An AOI is given (``--aoi`` or ``aoi`` in the config) as

- a bbox: ``"west,south,east,north"`` in degrees (or a list of four numbers in the config);
- ISO3 country codes: ``"GHA"`` or ``"GHA,CIV,BFA"`` (the embedded Natural Earth 1:10m layer, or the countries
  file of ``postprocess.countries``; coarse borders, so the tiles that touch them are taken);
- ``tropics``: the belt between 30 degrees south and 30 degrees north, as in the published panel;
- ``labels:<metres>``: the labels grown by that many metres (e.g. ``labels:5000``);
- a vector file (GeoPackage, GeoJSON, Parquet, shapefile): the union of its features.

Prediction then covers only the tiles of the global grid (:mod:`minemap.grid`) that touch the AOI.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
from pyproj import Transformer

from minemap.errors import InputError
from minemap.formats.countries import load_countries
from minemap.formats.vectors import read_vector
from minemap.geo import WGS84, check_bbox, units_per_metre

TROPICS = (-180.0, -30.0, 180.0, 30.0)
_NUMBER = r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*"


def parse_aoi(spec: Any, labels: gpd.GeoDataFrame | None = None, countries: Path | None = None) -> shapely.Geometry:
    """The AOI ``spec`` as one valid EPSG:4326 geometry; :class:`InputError` for an unknown code, a missing or
    unreadable file, an AOI that needs labels without them, or an empty AOI."""
    where = f"aoi {spec!r}"
    if isinstance(spec, (list, tuple)):
        return _bbox([float(v) for v in spec], where)
    if isinstance(spec, Path):
        return _vector_file(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"{where}: expected a bbox, ISO3 codes, 'tropics', 'labels:<metres>' or a vector file")
    text = spec.strip()
    if re.fullmatch(",".join([_NUMBER] * 4), text):
        return _bbox([float(v) for v in text.split(",")], where)
    if text.lower() == "tropics":
        return shapely.box(*TROPICS)
    m = re.fullmatch(r"labels:(" + _NUMBER + ")", text)
    if m:
        return _around_labels(labels, float(m.group(1)), where)
    if re.fullmatch(r"[A-Za-z]{3}(\s*,\s*[A-Za-z]{3})*", text) and not Path(text).exists():
        return _countries([c.strip().upper() for c in text.split(",")], countries, where)
    return _vector_file(Path(text))


def aoi_in(aoi: shapely.Geometry, crs, bounds: tuple[float, float, float, float]) -> shapely.Geometry | None:
    """The part of the AOI over ``bounds`` (an imagery grid's, in ``crs``), in ``crs``; None where they do not
    meet. The AOI is cut to the grid's footprint first, so that an AOI far wider than a projection's zone (the
    tropics and a UTM grid) is never projected where that projection breaks down; edges are densified so they
    follow the projection's curvature."""
    to_ll = Transformer.from_crs(crs, WGS84, always_xy=True)
    from_ll = Transformer.from_crs(WGS84, crs, always_xy=True)
    box = shapely.segmentize(shapely.box(*bounds), (bounds[2] - bounds[0]) / 64)
    footprint = shapely.make_valid(shapely.transform(box, lambda xy: np.column_stack(to_ll.transform(xy[:, 0],
                                                                                                     xy[:, 1]))))
    part = shapely.intersection(aoi, footprint)
    if part.is_empty:
        return None
    dense = shapely.segmentize(part, 0.01)
    return shapely.make_valid(shapely.transform(dense, lambda xy: np.column_stack(from_ll.transform(xy[:, 0],
                                                                                                   xy[:, 1]))))


def _bbox(v: list[float], where: str) -> shapely.Geometry:
    if len(v) != 4:
        raise InputError(f"{where}: a bbox has four numbers: west, south, east, north")
    try:
        return shapely.box(*check_bbox(tuple(v)))
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None


def _around_labels(labels: gpd.GeoDataFrame | None, metres: float, where: str) -> shapely.Geometry:
    if labels is None or len(labels) == 0:
        raise InputError(f"{where}: needs labels (give labels, or another kind of AOI)")
    if metres < 0:
        raise InputError(f"{where}: the distance must be at least 0 metres")
    geoms = np.asarray(labels.to_crs(WGS84).geometry.values)
    c = shapely.centroid(geoms)
    deg = units_per_metre(WGS84, shapely.get_x(c), shapely.get_y(c))  # degrees per metre at each label
    return _nonempty(shapely.union_all(shapely.buffer(geoms, metres * deg)), where)


def _countries(codes: list[str], path: Path | None, where: str) -> shapely.Geometry:
    layer = load_countries(path)
    known = set(layer["iso3"])
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise InputError(f"{where}: unknown country code(s) {', '.join(unknown)} (ISO 3166-1 alpha-3, e.g. GHA, "
                         f"BRA, IDN{'' if path is None else f'; as in {path}'})")
    return _nonempty(shapely.union_all(layer[layer["iso3"].isin(codes)].geometry.values), where)


def _vector_file(path: Path) -> shapely.Geometry:
    if not path.is_file():
        raise InputError(f"aoi {str(path)!r}: not a bbox, ISO3 code, 'tropics' or 'labels:<metres>', and no such "
                         "file")
    gdf = read_vector(path)  # one-line errors for files that are not vector layers or have no CRS
    geoms = shapely.make_valid(np.asarray(gdf.to_crs(WGS84).geometry.values))
    return _nonempty(shapely.union_all(geoms[~shapely.is_empty(geoms)]), f"{path}")


def _nonempty(geom: shapely.Geometry, where: str) -> shapely.Geometry:
    if geom is None or geom.is_empty or shapely.area(geom) == 0:
        raise InputError(f"{where}: the area of interest is empty")
    return shapely.make_valid(geom)
