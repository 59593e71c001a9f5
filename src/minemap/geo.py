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
    if n <= chunk:
        return func(*arrays)
    bounds = list(range(0, n, chunk)) + [n]
    if workers <= 1:  # still in chunks: the temporaries of a chunk stay in cache, those of a million do not
        return np.concatenate([func(*(x[i:j] for x in arrays)) for i, j in zip(bounds[:-1], bounds[1:])])
    with ThreadPoolExecutor(workers) as pool:
        parts = pool.map(lambda ij: func(*(x[ij[0]:ij[1]] for x in arrays)), zip(bounds[:-1], bounds[1:]))
        return np.concatenate(list(parts))


def pairs_across_years(probe: np.ndarray, geoms: np.ndarray, year_idx: np.ndarray, max_span: int | None,
                       chunk: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), ``i`` of a later year than ``j`` and at most ``max_span`` (processed) years after it (None:
    any), whose boxes meet: ``probe[i]``'s against ``geoms[j]``'s. One index a year, each queried with the
    later years' probes in span only, ``chunk`` probes at a time, on every core: no candidate of a wrong year is
    ever made."""
    n_years = int(year_idx.max()) + 1 if len(year_idx) else 0
    rows = [np.flatnonzero(year_idx == k) for k in range(n_years)]
    trees = [shapely.STRtree(geoms[r]) for r in rows]
    tasks = [(later, earlier, start) for later in range(1, n_years)
             for earlier in range(0 if max_span is None else max(later - max_span, 0), later)
             for start in range(0, len(rows[later]), chunk)]

    def query(task: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        later, earlier, start = task
        mine = rows[later][start:start + chunk]
        i, j = trees[earlier].query(probe[mine])  # releases the GIL: the tasks run side by side
        return mine[i], rows[earlier][j]

    if not tasks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    with ThreadPoolExecutor(min(os.cpu_count() or 1, len(tasks))) as pool:
        parts = list(pool.map(query, tasks))
    return np.concatenate([i for i, _ in parts]), np.concatenate([j for _, j in parts])


def inner_points(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x and y of a point inside each geometry (``point_on_surface``), on every core: computed once per polygon
    and indexed per pair, not once per pair."""
    pts = in_threads(shapely.point_on_surface, np.asarray(geoms, dtype=object)) if len(geoms) else np.zeros(0, object)
    return shapely.get_x(pts), shapely.get_y(pts)


def polygons_meet(p: np.ndarray, q: np.ndarray, px: np.ndarray | None = None, py: np.ndarray | None = None, *,
                  interiors: bool = False) -> np.ndarray:
    """Whether polygons ``p[i]`` and ``q[i]`` intersect (``interiors``: their interiors meet, so that a shared
    edge or corner does not count). A point inside ``p[i]`` (``px``, ``py``: given, as :func:`inner_points` of
    ``p``; else computed) strictly inside ``q[i]`` settles most pairs of a panel (the same place in two years)
    with a point-in-polygon test; the others take the full test, and only those that intersect the test of
    touching."""
    if px is None or py is None:
        inside = shapely.point_on_surface(p)
        px, py = shapely.get_x(inside), shapely.get_y(inside)
    meet = shapely.contains_xy(q, px, py)
    rest = np.flatnonzero(~meet)
    if len(rest):
        pr, qr = p[rest], q[rest]
        hit = shapely.intersects(qr, pr)
        if interiors:
            on = np.flatnonzero(hit)
            hit[on] = ~shapely.touches(qr[on], pr[on])
        meet[rest] = hit
    return meet


_A = 6378137.0  # WGS84 semi-major axis, metres
_E = 0.0818191908426215  # WGS84 first eccentricity


def _unwrapped_ring(xy: np.ndarray) -> np.ndarray:
    """A lon/lat ring's coordinates with jumps of more than 180 degrees in longitude unwrapped (+-360); a ring
    round a pole (its longitude ends a full turn from where it started) is closed through that pole."""
    x = np.unwrap(xy[:, 0], period=360.0)
    out = np.column_stack([x, xy[:, 1]])
    turn = x[-1] - x[0]
    if abs(turn) > 180:  # round a pole: along the pole's latitude back to the start
        pole = 90.0 if xy[:, 1].mean() > 0 else -90.0
        out = np.vstack([out, [[x[-1], pole], [x[0], pole]], out[:1]])
    return out


def cut_at_antimeridian(geoms: np.ndarray) -> np.ndarray:
    """Lon/lat (multi)polygons whose rings cross the antimeridian by jumping from +180 to -180 (as TopoJSON and
    GeoJSON for web maps often draw them, leaving the cut to the renderer), cut into pieces either side of it.

    Taken as they are, such a ring spans every longitude: Fiji's outline would hold a band round the globe
    from 12.5 to 21.7 degrees south (Zambia, Madagascar, northern Australia) and Russia one across Eurasia.
    Each ring is unwrapped (longitudes continued past +-180), the polygon made valid there, cut at the
    antimeridian and each piece moved back into -180..180. Other geometries are returned unchanged."""
    out = np.array(geoms, dtype=object)
    b = shapely.bounds(out)
    for i in np.flatnonzero(np.nan_to_num(b[:, 2] - b[:, 0]) > 180):
        pieces = []
        for part in shapely.get_parts(out[i]):
            if shapely.get_type_id(part) != 3:
                continue
            rings = [np.asarray(r.coords) for r in (part.exterior, *part.interiors)]
            if not any((np.abs(np.diff(r[:, 0])) > 180).any() for r in rings):
                pieces.append(part)
                continue
            whole = shapely.make_valid(shapely.Polygon(_unwrapped_ring(rings[0]),
                                                       [_unwrapped_ring(r) for r in rings[1:]]))
            for k in (-2, -1, 0, 1, 2):  # the turns of the globe the unwrapped polygon reaches into
                piece = shapely.intersection(whole, shapely.box(-180 + 360 * k, -90, 180 + 360 * k, 90))
                if not piece.is_empty:
                    pieces += [shapely.transform(p, lambda xy, k=k: xy - [360.0 * k, 0.0])
                               for p in shapely.get_parts(piece) if shapely.get_type_id(p) == 3]
        out[i] = shapely.union_all(shapely.make_valid(np.asarray(pieces, dtype=object))) if pieces else out[i]
    return out


def _authalic(lonlat: np.ndarray) -> np.ndarray:
    """(lon, lat) in degrees -> (lon in radians, q(lat)), q the authalic function of the WGS84 ellipsoid: a
    cylindrical equal-area map of the ellipsoid (EPSG:6933 up to a scale of x by k and of y by 1 / k), in which
    a polygon's plane area times ``_A ** 2 / 2`` is its area on the ellipsoid."""
    s = np.sin(np.radians(np.clip(lonlat[:, 1], -90, 90)))
    es = _E * s
    q = (1 - _E ** 2) * (s / (1 - es * es) - np.log((1 - es) / (1 + es)) / (2 * _E))
    return np.column_stack([np.radians(lonlat[:, 0]), q])


def group_starts(values: np.ndarray) -> np.ndarray:
    """Where each run of equal values of a sorted array starts (a boolean mask; empty for an empty array)."""
    return np.r_[True, values[1:] != values[:-1]] if len(values) else np.zeros(0, bool)


def _ring_areas(xy: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Plane areas of ``n`` single rings from their closed coordinates in order (``index``: the ring of each
    coordinate): the shoelace sum, each ring shifted to its first vertex so that small rings far from the origin
    keep their digits."""
    if len(xy) == 0:
        return np.zeros(n)
    start = np.flatnonzero(group_starts(index))
    first = np.repeat(start, np.diff(np.r_[start, len(index)]))
    x, y = xy[:, 0] - xy[first, 0], xy[:, 1] - xy[first, 1]
    cross = x[:-1] * y[1:] - x[1:] * y[:-1]
    same = index[:-1] == index[1:]
    return np.abs(np.bincount(index[:-1][same], weights=cross[same], minlength=n)) / 2


def area_km2(geoms_4326: np.ndarray, valid: bool = False) -> np.ndarray:
    """Areas in km2 on the WGS84 ellipsoid of EPSG:4326 geometries (made valid first, so self-intersections do
    not cancel out, unless the caller says they are ``valid`` already): the plane areas of the geometries in a
    cylindrical equal-area map (the same areas as in :data:`EQUAL_AREA`, computed from the formula, on every
    core). Polygons without holes (nearly all) are measured from their coordinates directly; the others through
    a transformed copy."""
    geoms = np.asarray(geoms_4326, dtype=object)
    scale = _A * _A / 2 / 1e6

    def one(g: np.ndarray) -> np.ndarray:
        g = g if valid else shapely.make_valid(g)
        simple = (shapely.get_type_id(g) == 3) & (shapely.get_num_interior_rings(g) == 0)
        out = np.empty(len(g))
        out[~simple] = shapely.area(shapely.transform(g[~simple], _authalic)) * scale
        xy, index = shapely.get_coordinates(g[simple], return_index=True)
        out[simple] = _ring_areas(_authalic(xy), index, int(simple.sum())) * scale
        return out

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


def check_bbox(v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """A bbox of longitudes and latitudes (west, south, east, north), checked: ValueError where it is not one."""
    w, s, e, n = v
    if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
        raise ValueError(f"bbox {list(v)}: expected west < east and south < north, in degrees")
    return v


SHAPE_MIN_PIXELS = 64  # outlines smaller than this many pixels are not judged by their shape (few pixels are square)
LABEL_RECT_QUANTILE = 0.99  # a rectangle is judged against this quantile of the labels' rectangularity


def rectangularity(geoms: np.ndarray, geographic: bool = False) -> np.ndarray:
    """Each outline's area over that of its smallest enclosing (rotated) rectangle: 1 for a rectangle, about 0.79
    for an ellipse, less for ragged or branching shapes; NaN for an empty or flat outline. ``geographic``:
    longitude and latitude, measured with each outline's longitudes shrunk by the cosine of its latitude (a
    rectangle on the ground stays one)."""
    geoms = np.asarray(geoms, dtype=object)
    out = np.full(len(geoms), np.nan)
    ok = ~shapely.is_empty(geoms) & (shapely.area(geoms) > 0)
    if not ok.any():
        return out
    g = geoms[ok]
    if geographic:
        xy, idx = shapely.get_coordinates(g, return_index=True)
        lat = shapely.get_y(shapely.centroid(g))
        xy[:, 0] *= np.cos(np.radians(lat))[idx]
        g = shapely.set_coordinates(g.copy(), xy)
    rect = shapely.area(shapely.minimum_rotated_rectangle(g))
    out[ok] = np.minimum(shapely.area(g) / np.maximum(rect, 1e-30), 1.0)  # 1 + rounding for a box
    return out


def shape_level(level: float, label_outlines: np.ndarray | None = None, geographic: bool = False) -> float | None:
    """The rectangularity above which an outline is judged a field, not a mine: ``level``, raised to the labels'
    :data:`LABEL_RECT_QUANTILE` quantile where more of them are rectangles than that (quarries drawn as boxes keep
    their like); None (never judged) for ``level`` 1."""
    if level >= 1:
        return None
    if label_outlines is None or len(label_outlines) == 0:
        return level
    shown = rectangularity(shapely.get_parts(np.asarray(label_outlines, dtype=object)), geographic)
    shown = shown[np.isfinite(shown)]
    return max(level, float(np.quantile(shown, LABEL_RECT_QUANTILE))) if len(shown) else level


def shaped_like_fields(geoms: np.ndarray, level: float | None, pixel_area: float) -> np.ndarray:
    """Which outlines (in a projected CRS whose pixels span ``pixel_area`` square units) fill more than ``level``
    of their enclosing rectangle, among those of :data:`SHAPE_MIN_PIXELS` pixels or more: (n,) bool."""
    geoms = np.asarray(geoms, dtype=object)
    if level is None or len(geoms) == 0:
        return np.zeros(len(geoms), bool)
    big = shapely.area(geoms) >= SHAPE_MIN_PIXELS * pixel_area
    return big & (np.nan_to_num(rectangularity(geoms)) > level)
