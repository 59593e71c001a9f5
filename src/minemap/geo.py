"""Geodesy helpers: areas on the ellipsoid, metres <-> CRS units, ground sample distance.

All areas are computed in an equal-area CRS on the WGS84 ellipsoid (EPSG:6933), never in degrees; buffers and
tolerances given in metres are converted to CRS units at each geometry's own latitude.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import shapely
from pyproj import CRS, Geod, Transformer

WGS84 = "EPSG:4326"
EQUAL_AREA = "EPSG:6933"  # WGS 84 / NSIDC EASE-Grid 2.0 Global: cylindrical equal-area on the ellipsoid
_GEOD = Geod(ellps="WGS84")


def in_threads(func, *arrays: np.ndarray, chunk: int = 20_000) -> np.ndarray:
    """``func`` over aligned arrays, in chunks, on every core: shapely's vectorised functions and pyproj's
    transforms release the GIL, so threads run them side by side."""
    n = len(arrays[0])
    workers = min(os.cpu_count() or 1, -(-n // chunk))
    if workers <= 1:
        return func(*arrays)
    bounds = list(range(0, n, chunk)) + [n]
    with ThreadPoolExecutor(workers) as pool:
        parts = pool.map(lambda ij: func(*(x[ij[0]:ij[1]] for x in arrays)), zip(bounds[:-1], bounds[1:]))
        return np.concatenate(list(parts))


def area_km2(geoms_4326: np.ndarray, valid: bool = False) -> np.ndarray:
    """Areas in km2 of EPSG:4326 geometries (made valid first, so self-intersections do not cancel out, unless
    the caller says they are ``valid`` already)."""
    geoms = np.asarray(geoms_4326, dtype=object)

    def one(g: np.ndarray) -> np.ndarray:
        g = g if valid else shapely.make_valid(g)
        t = Transformer.from_crs(WGS84, EQUAL_AREA, always_xy=True)
        projected = shapely.transform(g, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))
        return shapely.area(projected) / 1e6

    return in_threads(one, geoms) if len(geoms) else np.zeros(0)


def units_per_metre(crs: CRS | str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """How many units of ``crs`` one metre on the ground spans, eastwards, at points (x, y) in ``crs``."""
    crs = CRS.from_user_input(crs)
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    to_ll = Transformer.from_crs(crs, WGS84, always_xy=True)
    from_ll = Transformer.from_crs(WGS84, crs, always_xy=True)
    lon, lat = to_ll.transform(x, y)
    step_m = 100.0
    lon2, lat2, _ = _GEOD.fwd(lon, lat, np.full_like(lon, 90.0), np.full_like(lon, step_m))
    x2, y2 = from_ll.transform(lon2, lat2)
    return np.hypot(x2 - x, y2 - y) / step_m


def ground_sample_distance_m(crs: CRS | str, transform, width: int, height: int) -> float:
    """Ground size in metres of one pixel at the centre of a raster grid (x resolution, eastwards)."""
    cx, cy = transform @ (width / 2, height / 2)
    return float(abs(transform.a) / units_per_metre(crs, cx, cy)[0])
