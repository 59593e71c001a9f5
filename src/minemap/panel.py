"""Panel: mine identities across years, panel assembly and exports.

Polygons of different years that overlap belong to one mine (connected components of the overlap graph, so a
mine that pauses a year keeps its identity). A mine's ``mine_id`` is the geohash (precision 9, ~5 m) of a point
inside its first-year outline, so it does not change when other mines are added or removed elsewhere. The panel
has one row per mine and year (its polygons of that year dissolved).

Writes ``panel.parquet`` (GeoParquet, EPSG:4326: mine_id, year, iso3, country, area_km2, n_polygons,
geometry), ``panel.gpkg`` (one layer per year, ``mines_<year>``) and ``summary.csv`` (iso3, country, year,
n_mines, n_polygons, area_km2).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from minemap._io import atomic_path
from minemap.errors import InputError
from minemap.geo import WGS84, area_km2
from minemap.labels import write_geoparquet

log = logging.getLogger(__name__)
PANEL_COLUMNS = ["mine_id", "year", "iso3", "country", "area_km2", "n_polygons", "geometry"]
_BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"


def geohash(lon: float, lat: float, precision: int = 9) -> str:
    """Standard geohash of a point."""
    lo, hi = [-180.0, -90.0], [180.0, 90.0]
    bits, out, even = [], [], True
    while len(out) < precision:
        axis, v = (0, lon) if even else (1, lat)
        mid = (lo[axis] + hi[axis]) / 2
        if v >= mid:
            bits.append(1)
            lo[axis] = mid
        else:
            bits.append(0)
            hi[axis] = mid
        even = not even
        if len(bits) == 5:
            out.append(_BASE32[int("".join(map(str, bits)), 2)])
            bits = []
    return "".join(out)


def assign_mine_ids(polygons: gpd.GeoDataFrame) -> np.ndarray:
    """A ``mine_id`` per polygon: polygons of different years that overlap share one."""
    n = len(polygons)
    if n == 0:
        return np.array([], dtype=object)
    geoms = np.asarray(polygons.geometry.values)
    year = polygons["year"].to_numpy()
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    keep = (year[a] != year[b]) & (a < b)
    # overlap, not just a shared edge or corner
    inter = shapely.area(shapely.intersection(geoms[a[keep]], geoms[b[keep]])) > 0
    a, b = a[keep][inter], b[keep][inter]
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    df = pd.DataFrame({"comp": comp, "year": year, "area": shapely.area(geoms), "i": np.arange(n)})
    first = df.sort_values(["comp", "year", "area"], ascending=[True, True, False]).drop_duplicates("comp")
    anchor = shapely.point_on_surface(geoms[first.i.to_numpy()])
    ids = [geohash(x, y) for x, y in zip(shapely.get_x(anchor), shapely.get_y(anchor))]
    seen: dict[str, int] = {}
    unique = []
    for g in ids:  # two mines anchored in one ~5 m cell: suffix the later ones
        seen[g] = seen.get(g, 0) + 1
        unique.append(g if seen[g] == 1 else f"{g}-{seen[g]}")
    comp_to_id = dict(zip(first.comp.to_numpy(), unique))
    return np.array([comp_to_id[c] for c in comp], dtype=object)


STUDY_PATTERN = re.compile(r"global_mining_polygons_predicted_((?:19|20)\d{2})_postprocessed\.gpkg$")


def read_study_polygons(paths: list[Path]) -> gpd.GeoDataFrame:
    """The published study's per-year polygons (``global_mining_polygons_predicted_<year>_postprocessed.gpkg``:
    id, iso_a3, country_name, year, area; EPSG:4326) as post-processed polygons (year, iso3, country,
    geometry), so that its data gets mine identities and a summary without any imagery. ``paths``: such files,
    or folders holding them (the ``_buffer`` variants are left out of a folder; name them to use them)."""
    from minemap.labels import read_vector

    files: list[tuple[Path, int | None]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if STUDY_PATTERN.search(f.name))
            if not found:
                raise InputError(f"{p}: no global_mining_polygons_predicted_<year>_postprocessed.gpkg files")
            files += [(f, int(STUDY_PATTERN.search(f.name).group(1))) for f in found]
        else:
            m = re.search(r"predicted_((?:19|20)\d{2})_", p.name)
            files.append((p, int(m.group(1)) if m else None))
    frames = []
    for path, year in files:
        gdf = read_vector(path)
        if "year" in gdf.columns:
            years = gdf["year"]
        elif year is not None:
            years = pd.Series(year, index=gdf.index)
        else:
            raise InputError(f"{path}: no 'year' column and no year in the file name")
        iso = gdf["iso_a3"] if "iso_a3" in gdf.columns else pd.Series(None, index=gdf.index, dtype=object)
        name = gdf["country_name"] if "country_name" in gdf.columns else pd.Series(None, index=gdf.index, dtype=object)
        frames.append(gpd.GeoDataFrame({"year": years.astype(int).to_numpy(),
                                        "iso3": iso.where(iso.astype(str) != "-99").to_numpy(),
                                        "country": name.to_numpy()},
                                       geometry=gdf.to_crs(WGS84).geometry.values, crs=WGS84))
    gdf = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=WGS84)
    gdf["geometry"] = shapely.make_valid(np.asarray(gdf.geometry.values))
    gdf = gdf.explode(index_parts=False).reset_index(drop=True)
    polys = gdf.geometry.geom_type == "Polygon"
    return gdf[polys & ~gdf.geometry.is_empty].reset_index(drop=True)


def build_panel(polygons: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Mine-year panel from post-processed polygons (columns year, iso3, country, geometry)."""
    if len(polygons) == 0:
        return gpd.GeoDataFrame({c: [] for c in PANEL_COLUMNS[:-1]}, geometry=[], crs=WGS84)
    gdf = polygons.copy()
    gdf["mine_id"] = assign_mine_ids(gdf)
    gdf["_area"] = area_km2(gdf.geometry.values)
    # a mine's country in a year: that of its largest polygon
    lead = gdf.sort_values("_area", ascending=False).drop_duplicates(["mine_id", "year"])
    lead = lead.set_index(["mine_id", "year"])[["iso3", "country"]]
    keys = gdf[["mine_id", "year"]].apply(tuple, axis=1)
    codes, uniques = pd.factorize(keys)
    geoms = np.asarray(gdf.geometry.values)
    order = np.argsort(codes, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
    rows = []
    for g in groups:
        mine_id, year = uniques[codes[g[0]]]
        geom = geoms[g[0]] if len(g) == 1 else shapely.union_all(geoms[g])
        iso3, country = lead.loc[(mine_id, year)]
        rows.append({"mine_id": mine_id, "year": int(year), "iso3": iso3, "country": country,
                     "n_polygons": len(g), "geometry": geom})
    panel = gpd.GeoDataFrame(rows, geometry="geometry", crs=WGS84)
    panel["area_km2"] = area_km2(panel.geometry.values)
    panel = panel.sort_values(["mine_id", "year"]).reset_index(drop=True)
    return panel[PANEL_COLUMNS]


def summarise(panel: gpd.GeoDataFrame) -> pd.DataFrame:
    """Mines, polygons and km2 per country and year."""
    df = pd.DataFrame(panel.drop(columns="geometry"))
    df["iso3"] = df["iso3"].fillna("")
    df["country"] = df["country"].fillna("(none)")
    out = df.groupby(["iso3", "country", "year"], as_index=False).agg(
        n_mines=("mine_id", "nunique"), n_polygons=("n_polygons", "sum"), area_km2=("area_km2", "sum"))
    return out.sort_values(["iso3", "year"]).reset_index(drop=True)


def write_panel(panel: gpd.GeoDataFrame, out_dir: Path) -> dict[str, Path]:
    """Write panel.parquet, panel.gpkg (a layer a year) and summary.csv into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    paths = {"parquet": out_dir / "panel.parquet", "gpkg": out_dir / "panel.gpkg", "summary": out_dir / "summary.csv"}
    write_geoparquet(panel, paths["parquet"])
    with atomic_path(paths["gpkg"]) as tmp:
        years = sorted(panel["year"].unique()) or []
        if not years:
            panel.to_file(tmp, driver="GPKG", layer="mines")
        for y in years:
            panel[panel.year == y].to_file(tmp, driver="GPKG", layer=f"mines_{y}")
    with atomic_path(paths["summary"]) as tmp:
        summarise(panel).to_csv(tmp, index=False, float_format="%.6f")
    return paths
