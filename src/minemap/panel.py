"""Panel: mine identities and lineage across years, change statistics, panel files.

Identities are local in time (:func:`track_mines`): a polygon continues the mine it overlaps most in the
previous processed year (or up to ``panel.max_gap`` years back); merges and splits are events, so dense districts
that grow together do not fuse into one giant "mine". A mine has one outline a year; its ``mine_id`` is the
geohash (precision 9, ~5 m) of a point inside its first outline, so it does not change when data elsewhere
change. ``district_id`` keeps the connected component of the overlaps between years.

Writes ``panel.parquet`` (GeoParquet, EPSG:4326, :data:`PANEL_COLUMNS`; other formats: :mod:`minemap.export`),
``summary.csv`` (mines, districts and km2 per country and year), and as Parquet and CSV the
lineage tables ``mines`` (:data:`LINEAGE_COLUMNS`) and ``events`` (:data:`EVENT_COLUMNS`) and the change table
``changes`` (:data:`CHANGE_COLUMNS`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import NamedTuple

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from minemap._io import atomic_path
from minemap.config import PanelConfig
from minemap.errors import InputError
from minemap.geo import (WGS84, area_km2, group_starts, in_threads, inner_points, pairs_across_years, polygons_meet,
                         units_per_metre)
from minemap.formats.panel import (CHANGE_COLUMNS, EVENT_COLUMNS, EVENT_KINDS, LINEAGE_COLUMNS, PANEL_COLUMNS,
                                   PANEL_FILES, STUDY_PATTERN)
from minemap.formats.vectors import read_vector, write_geoparquet

log = logging.getLogger(__name__)
_BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"


def geohash(lon: float, lat: float, precision: int = 9) -> str:
    """Standard geohash of a point."""
    return str(geohashes(np.array([lon]), np.array([lat]), precision)[0])


def geohashes(lon: np.ndarray, lat: np.ndarray, precision: int = 9) -> np.ndarray:
    """Standard geohashes of points, vectorised: the bits of longitude and latitude interleaved (longitude
    first), five to a base-32 character."""
    n_bits = 5 * precision
    lon_bits, lat_bits = (n_bits + 1) // 2, n_bits // 2
    # the cell index along each axis: the binary search of the geohash, done at once
    x = np.clip(np.floor((np.asarray(lon, float) + 180) / 360 * 2.0 ** lon_bits), 0, 2 ** lon_bits - 1).astype(np.int64)
    y = np.clip(np.floor((np.asarray(lat, float) + 90) / 180 * 2.0 ** lat_bits), 0, 2 ** lat_bits - 1).astype(np.int64)
    code = np.zeros(len(x), np.int64)
    for i in range(n_bits):  # bit i (from the most significant): longitude on even i, latitude on odd
        axis, k = (x, lon_bits - 1 - i // 2) if i % 2 == 0 else (y, lat_bits - 1 - i // 2)
        code = (code << 1) | ((axis >> k) & 1)
    chars = np.frombuffer(_BASE32.encode(), np.uint8)
    shifts = 5 * np.arange(precision - 1, -1, -1)
    letters = chars[(code[:, None] >> shifts[None]) & 31]  # (n, precision) ASCII codes
    return np.ascontiguousarray(letters).view(f"S{precision}").ravel().astype(str).astype(object)


def _anchor_ids(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Geohash ids of points (x, y: :func:`~minemap.geo.inner_points` of the geometries anchored); two anchored
    in one ~5 m cell get suffixes -2, -3, ..."""
    if len(x) == 0:
        return np.array([], dtype=object)
    ids = pd.Series(geohashes(x, y))
    rank = ids.groupby(ids).cumcount().to_numpy() + 1
    return np.where(rank == 1, ids.to_numpy(), ids.to_numpy() + "-" + rank.astype(str)).astype(object)


def _buffered(geoms: np.ndarray, buffer_m: float) -> np.ndarray:
    c = shapely.centroid(geoms)
    return shapely.buffer(geoms, buffer_m * units_per_metre(WGS84, shapely.get_x(c), shapely.get_y(c)))


def _links(geoms: np.ndarray, year_idx: np.ndarray, buffer_m: float, max_span: int | None,
           points: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (later, earlier) of polygons of different years, at most ``max_span`` processed years apart (None:
    any), whose interiors meet (a shared edge or corner is not an overlap), or that lie within ``buffer_m``.
    Candidates come from each year's index, queried with the boxes of the years in span; the exact test runs on
    every core.
    ``points``: :func:`~minemap.geo.inner_points` of the polygons, where the caller has them."""
    probe = _buffered(geoms, buffer_m) if buffer_m > 0 else geoms
    a, b = pairs_across_years(probe, geoms, year_idx, max_span)
    if len(a) == 0:
        return a, b
    if buffer_m > 0:
        meet = in_threads(shapely.intersects, geoms[b], probe[a])
    else:
        x, y = points if points is not None else inner_points(geoms)
        meet = in_threads(lambda p, q, px, py: polygons_meet(p, q, px, py, interiors=True), geoms[a], geoms[b], x[a],
                          y[a])
    return a[meet], b[meet]


def _overlap(geoms: np.ndarray, a: np.ndarray, b: np.ndarray, buffer_m: float) -> np.ndarray:
    """How much polygons a and b overlap (their intersection's area in square degrees; within a buffer, the
    shared area of a's buffer): only compared between pairs at one place, so degrees do. Nested pairs (a pit
    that grew or shrank within its outline) are settled by a ``covers`` test: the smaller one's area. (Nothing
    is prepared: an index of a polygon's edges costs ~3.6 kB and pays only when one polygon takes many tests.)"""
    ga = _buffered(geoms[a], buffer_m) if buffer_m > 0 else geoms[a]

    def areas(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        out = np.full(len(p), np.nan)
        bp, bq = shapely.bounds(p), shapely.bounds(q)
        for (small, bs), (big, bb) in (((p, bp), (q, bq)), ((q, bq), (p, bp))):
            # only pairs whose boxes nest can nest: the others skip the test
            boxed = (bs[:, :2] >= bb[:, :2]).all(1) & (bs[:, 2:] <= bb[:, 2:]).all(1)
            todo = np.flatnonzero(np.isnan(out) & boxed)
            nested = todo[shapely.covers(big[todo], small[todo])]
            out[nested] = shapely.area(small[nested])
        rest = np.flatnonzero(np.isnan(out))
        out[rest] = shapely.area(shapely.intersection(p[rest], q[rest]))
        return out

    return in_threads(areas, ga, geoms[b])



def track_mines(polygons: gpd.GeoDataFrame, max_gap: int = 1, buffer_m: float = 0.0,
                links: tuple[np.ndarray, ...] | None = None, points: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Mine identities across years, kept local in time. Returns per polygon its ``mine_id`` and
    ``district_id``, and the lineage events (:data:`EVENT_COLUMNS`; ids joined with ``;``).

    Years are the processed years, in order. A polygon continues the mine it overlaps most among the
    polygons of the previous year; with none there, it looks up to ``max_gap`` years further back (the mine
    *disappeared* in the first year it was missing and *reappeared*); with none at all, a mine *appeared*.
    A polygon overlapping several mines continues the one it overlaps most; the others end there unless another
    polygon continues them (*merged*: the parents, the child). Several polygons continuing one mine: the one overlapping it most carries it on and the others start
    mines of their own (*split*: the parent, the children), so a mine has one polygon a year and never grows
    into a chain of fused pits. A mine that is not continued *disappeared* in the next processed year, unless it
    merged. ``mine_id``: the geohash of a point inside the mine's first polygon, so it does not change when
    data elsewhere change. ``district_id``: the connected component of overlaps between years (at most
    ``max_gap`` + 1 apart; what ``mine_id`` meant before lineage), anchored the same way in its earliest,
    largest polygon.

    ``links`` and ``points``, where the caller has them: the pairs of :func:`_links` (later, earlier; and, as a
    third array, their overlaps of :func:`_overlap` where known, NaN where not) and the
    :func:`~minemap.geo.inner_points` of the polygons.
    """
    n = len(polygons)
    if n == 0:
        empty = np.array([], dtype=object)
        return empty, empty, pd.DataFrame({c: [] for c in EVENT_COLUMNS})
    geoms = np.asarray(polygons.geometry.values)
    years = np.sort(polygons["year"].unique())
    yi = np.searchsorted(years, polygons["year"].to_numpy())
    x, y = points if points is not None else inner_points(geoms)
    links = links if links is not None else _links(geoms, yi, buffer_m, max_gap + 1, (x, y))
    la, lb = links[:2]
    known = links[2] if len(links) > 2 else np.full(len(la), np.nan)

    # districts: connected components of the overlaps between years (those the identities are built from)
    _, comp = connected_components(coo_matrix((np.ones(len(la)), (la, lb)), shape=(n, n)), directed=False)
    first = pd.DataFrame({"comp": comp, "yi": yi, "area": -shapely.area(geoms), "i": np.arange(n)}).sort_values(
        ["comp", "yi", "area", "i"]).drop_duplicates("comp")
    district_of = np.empty(comp.max() + 1, dtype=object)
    district_of[first.comp.to_numpy()] = _anchor_ids(x[first.i.to_numpy()], y[first.i.to_numpy()])

    # mines, year by year: each polygon picks a parent mine in the nearest earlier year it overlaps
    dy = yi[la] - yi[lb]
    nearest = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(nearest, la, dy)
    keep = np.flatnonzero(dy == nearest[la])
    keep = keep[np.argsort(yi[la[keep]], kind="stable")]  # by the child's year
    lc, lp, lov = la[keep], lb[keep], np.asarray(known, float)[keep]
    at_year = np.searchsorted(yi[lc], np.arange(len(years) + 1))
    mine = np.full(n, -1, np.int64)
    last_t = np.full(n, -1, np.int64)  # per mine number, the last year it was seen so far
    n_mines = 0
    ev: list[pd.DataFrame] = []  # columns t, kind, m, parents (list of mine numbers), kids (list)
    for t in range(len(years)):
        c, p, ov_link = lc[at_year[t]:at_year[t + 1]], lp[at_year[t]:at_year[t + 1]], lov[at_year[t]:at_year[t + 1]]
        m = mine[p]  # earlier years are settled: every parent has its mine
        # the (child, mine) pairs: a child may meet a mine through several of its polygons (a gap year's)
        _, first, pair = np.unique(c * (n + 1) + m, return_index=True, return_inverse=True)
        pc, pm = c[first], m[first]
        kids = np.bincount(pm, minlength=n)[pm]  # children meeting the pair's mine
        mines = np.bincount(pc, minlength=n)[pc]  # mines the pair's child meets
        ov = np.zeros(len(pc))
        # overlap areas only where a choice is to be made: a child meeting several mines, a mine met by several
        need = (kids > 1) | (mines > 1)
        if need.any():
            rows = np.flatnonzero(need[pair])
            todo = rows[np.isnan(ov_link[rows])]
            if len(todo):
                ov_link[todo] = _overlap(geoms, c[todo], p[todo], buffer_m)
            ov = np.where(need, np.bincount(pair[rows], weights=ov_link[rows], minlength=len(pc)), 0.0)
        by_child = np.lexsort((pm, -ov, pc))  # each child's pairs, the mine it overlaps most first
        claims = by_child[group_starts(pc[by_child])]
        several = by_child[mines[by_child] > 1]
        if len(several):
            heads = np.flatnonzero(group_starts(pc[several]))
            ev.append(pd.DataFrame({"t": t, "kind": "merged", "c": pc[several[heads]],
                                    "parents": [list(g) for g in np.split(pm[several], heads[1:])]}))
        # each mine goes on with the child overlapping it most; the other children split off as new mines
        claims = claims[np.lexsort((pc[claims], -ov[claims], pm[claims]))]
        goes_on = group_starts(pm[claims])
        carry, split = claims[goes_on], claims[~goes_on]
        mine[pc[carry]] = pm[carry]
        back = pm[carry][last_t[pm[carry]] < t - 1]
        if len(back):  # unseen since a year before the last: gone in the year after it was last seen, and back
            ev.append(pd.DataFrame({"t": last_t[back] + 1, "kind": "disappeared", "m": back}))
            ev.append(pd.DataFrame({"t": t, "kind": "reappeared", "m": back}))
        last_t[pm[carry]] = t
        this = np.flatnonzero(yi == t)
        new = this[mine[this] < 0]
        mine[new] = np.arange(n_mines, n_mines + len(new))
        last_t[mine[new]] = t
        n_mines += len(new)
        split_off = np.zeros(n, bool)
        split_off[pc[split]] = True
        appeared = new[~split_off[new]]
        ev.append(pd.DataFrame({"t": t, "kind": "appeared", "m": mine[appeared]}))
        if len(split):
            heads = np.flatnonzero(group_starts(pm[split]))
            parents = pm[split[heads]]
            ev.append(pd.DataFrame({"t": t, "kind": "split", "m": parents, "kids": [
                [int(k) for k in (mp, *g)] for mp, g in zip(parents, np.split(mine[pc[split]], heads[1:]))]}))
    # the mine each merging child carries on, known once the year's claims are settled
    ev = pd.concat(ev, ignore_index=True)
    if "c" in ev:
        merged = ev.kind == "merged"
        ev.loc[merged, "m"] = mine[ev.loc[merged, "c"].to_numpy().astype(np.int64)]
    ev["m"] = ev["m"].astype(np.int64)
    # disappeared: last seen before the last year, and not ended by a merge in the year after
    last = np.full(n_mines, -1)
    np.maximum.at(last, mine, yi)
    gone = np.flatnonzero(last < len(years) - 1)
    if (ev.kind == "merged").any():
        mp = ev.loc[ev.kind == "merged", ["t", "m", "parents"]].explode("parents")
        p, tm = mp.parents.to_numpy().astype(np.int64), mp.t.to_numpy().astype(np.int64)
        ended = p[(p != mp.m.to_numpy()) & (tm > last[p])]
        gone = np.setdiff1d(gone, ended)
    ev = pd.concat([ev, pd.DataFrame({"t": last[gone] + 1, "kind": "disappeared", "m": gone})], ignore_index=True)

    order = np.lexsort((yi, mine))
    firsts = order[group_starts(mine[order])]
    ids = np.empty(n_mines, dtype=object)
    ids[mine[firsts]] = _anchor_ids(x[firsts], y[firsts])

    def joined(col: str) -> np.ndarray:
        """The ids of each event's list in ``col`` joined with ";"; the event's own mine where it has none."""
        out = ids[ev.m.to_numpy()]
        if col in ev:
            lists = ev[col].to_numpy()
            rows = np.flatnonzero([isinstance(v, list) for v in lists])
            out[rows] = [";".join(ids[np.asarray(v, np.int64)]) for v in lists[rows]]
        return out

    kind = ev.kind.to_numpy()
    parents = joined("parents")
    kids = joined("kids")
    out = pd.DataFrame({"year": years[ev.t.to_numpy().astype(np.int64)], "kind": kind, "mine_id": ids[ev.m.to_numpy()],
                        "parent_ids": np.where(kind == "appeared", "", parents),
                        "child_ids": np.where(kind == "disappeared", "", kids)})
    out["_k"] = out.kind.map({k: i for i, k in enumerate(EVENT_KINDS)})
    out = out.sort_values(["year", "_k", "mine_id"]).drop(columns="_k").reset_index(drop=True)
    return ids[mine], district_of[comp], out



def read_study_polygons(paths: list[Path]) -> gpd.GeoDataFrame:
    """The published study's per-year polygons (``global_mining_polygons_predicted_<year>_postprocessed.gpkg``:
    id, iso_a3, country_name, year, area; EPSG:4326) as post-processed polygons (year, iso3, country,
    geometry), so that its data gets mine identities and a summary without any imagery. ``paths``: such files,
    or folders holding them (the ``_buffer`` variants are left out of a folder; name them to use them)."""

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


class Panel(NamedTuple):
    """What :func:`build_panel` makes: the mine-year panel, the lineage events and the change table."""

    panel: gpd.GeoDataFrame
    events: pd.DataFrame
    changes: pd.DataFrame


def build_panel(polygons: gpd.GeoDataFrame, cfg: PanelConfig | None = None, where: str = "polygons") -> Panel:
    """The mine-year panel (:data:`PANEL_COLUMNS`, one row per mine and year) from post-processed polygons
    (columns year, iso3, country, geometry; area_km2, mean_probability, provisional and filled_share kept where
    present), the lineage events of :func:`track_mines` and the change table of :func:`change_statistics`, which
    shares the tracking's overlap search (without a buffer). ``where`` names the polygons' file in errors."""
    cfg = cfg or PanelConfig()
    check_polygons(polygons, where)
    gdf = polygons.reset_index(drop=True)
    if len(gdf) == 0:
        empty = gpd.GeoDataFrame({c: [] for c in PANEL_COLUMNS[:-1]}, geometry=[], crs=WGS84)
        return Panel(empty, pd.DataFrame({c: [] for c in EVENT_COLUMNS}), change_statistics(empty))
    geoms = np.asarray(gdf.geometry.values)
    yi = np.searchsorted(np.sort(gdf["year"].unique()), gdf["year"].to_numpy())
    points = inner_points(geoms)
    la, lb = _links(geoms, yi, cfg.buffer_m, cfg.max_gap + 1, points)
    # the overlaps of consecutive years, without a buffer: every one for the change table, and the tracking's
    one = yi[la] - yi[lb] == 1
    overlaps = np.full(len(la), np.nan)
    if cfg.buffer_m == 0 and one.any():
        overlaps[one] = _overlap(geoms, la[one], lb[one], 0.0)
    mine_id, district_id, events = track_mines(gdf, cfg.max_gap, cfg.buffer_m, (la, lb, overlaps), points)
    year = gdf["year"].astype(int).to_numpy()
    code, _ = pd.factorize(mine_id, sort=True)
    order = np.lexsort((year, code))  # by mine_id, then year
    start = order[group_starts(code[order])]
    first_of = np.empty(code.max() + 1, dtype=year.dtype)
    first_of[code[start]] = year[start]
    panel = gpd.GeoDataFrame({
        "mine_id": mine_id, "district_id": district_id, "year": year,
        "iso3": gdf["iso3"].array, "country": gdf["country"].array, "first_year": first_of[code],
        "area_km2": gdf["area_km2"].to_numpy() if "area_km2" in gdf else area_km2(gdf.geometry.values),
        "mean_probability": gdf["mean_probability"].to_numpy() if "mean_probability" in gdf else np.nan,
        "provisional": gdf["provisional"].fillna(False).astype(bool).to_numpy() if "provisional" in gdf else False,
        "filled_share": gdf["filled_share"].fillna(0.0).to_numpy() if "filled_share" in gdf else 0.0,
    }, geometry=gdf.geometry.values, crs=WGS84)
    changes = change_statistics(panel, (la[one], lb[one], overlaps[one]) if cfg.buffer_m == 0 else None)
    return Panel(panel.take(order).reset_index(drop=True)[PANEL_COLUMNS], events, changes)


def check_polygons(gdf: gpd.GeoDataFrame, where: str) -> None:
    """Refuse polygons the panel cannot use: one line naming ``where`` and the problem."""
    missing = [c for c in ("year", "iso3", "country", "geometry") if c not in gdf.columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {', '.join(missing)} (post-processed polygons have year, "
                         "iso3, country, geometry)")
    if gdf.crs is None or not gdf.crs.equals(WGS84):
        raise InputError(f"{where}: polygons must be in EPSG:4326, not {gdf.crs}")


def lineage_table(panel: gpd.GeoDataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """One row per mine (sorted by ``mine_id``): district, first and last year, years seen (count and list),
    largest area, the country of its largest outline (the earliest of equals), and the mine it split from (if
    any)."""
    if len(panel) == 0:
        return pd.DataFrame({c: [] for c in LINEAGE_COLUMNS})
    code, ids = pd.factorize(panel["mine_id"], sort=True)
    year = panel["year"].to_numpy()
    area = panel["area_km2"].to_numpy(dtype=float)
    by = np.lexsort((year, code))  # rows by mine, then year
    start = np.flatnonzero(group_starts(code[by]))
    end = np.r_[start[1:], len(by)]
    # the years of each mine spelt "2016;2017;2019": a bit a year seen, each pattern spelt once
    seen, yi = np.unique(year, return_inverse=True)
    if len(seen) <= 62:
        mask = np.bitwise_or.reduceat(np.left_shift(1, yi[by].astype(np.int64)), start)
        patterns, which = np.unique(mask, return_inverse=True)
        spelt = np.array([";".join(str(y) for k, y in enumerate(seen) if p >> k & 1) for p in patterns], dtype=object)
        years = spelt[which]
    else:  # more years than bits: concatenated in one pass over the rows sorted by mine and year
        head = np.zeros(len(by), bool)
        head[start] = True
        years = np.add.reduceat(np.where(head, "", ";").astype(object) + year[by].astype(str).astype(object), start)
    big = np.lexsort((year, -area, code))[start]  # per mine, its largest outline (the earliest of equals)
    out = pd.DataFrame({
        "mine_id": np.asarray(ids, dtype=object), "district_id": panel["district_id"].array[big],
        "first_year": year[by][start], "last_year": year[by][end - 1], "years_seen": end - start,
        "years": years, "max_area_km2": area[big],
        "iso3": panel["iso3"].array[big], "country": panel["country"].array[big],
    })
    splits = events[events.kind == "split"]
    born = splits.assign(child=splits.child_ids.str.split(";")).explode("child")
    born = born[born.child != born.mine_id].set_index("child")["mine_id"]
    out["split_from"] = born.reindex(out["mine_id"]).fillna("").to_numpy()
    return out[LINEAGE_COLUMNS]


def change_statistics(panel: gpd.GeoDataFrame, pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                      ) -> pd.DataFrame:
    """Per country and year, in km2: mining area and mines, and what changed since the previous processed year
    (:data:`CHANGE_COLUMNS`), computed geometrically between the two years' outlines:

    - new: outlines of this year that meet none of the previous year;
    - expanded: the parts of this year's other outlines outside every outline of the previous year;
    - shrunk: the parts of the previous year's outlines outside every outline of this year, for those that
      still meet one;
    - abandoned: previous-year outlines that meet none of this year.

    Parts are measured as shares of each outline's area (outlines of one year do not overlap), so every figure
    is in the same km2 as ``area_km2``, and attributed to the outline's country. The first year has no change
    figures (empty). ``pairs``: the overlapping pairs of consecutive years (this year, the year before) and their
    overlaps (:func:`_overlap`), where the caller has them.
    """
    df = pd.DataFrame(panel.drop(columns="geometry"))
    if len(df) == 0:
        return pd.DataFrame({c: [] for c in CHANGE_COLUMNS})
    geoms = np.asarray(panel.geometry.values)
    years = np.sort(df.year.unique())
    yi = np.searchsorted(years, df.year.to_numpy())
    deg_area = shapely.area(geoms)
    # a in year t, b in the processed year before, interiors meeting
    if pairs is None:
        a, b = _links(geoms, yi, 0.0, 1)
        inter = _overlap(geoms, a, b, 0.0) if len(a) else np.zeros(0)
    else:
        a, b, inter = pairs
    # the share of each outline outside the previous year's outlines, and outside the next year's
    out_prev = 1 - np.clip(np.bincount(a, weights=inter, minlength=len(df)) / np.maximum(deg_area, 1e-30), 0, 1)
    out_next = 1 - np.clip(np.bincount(b, weights=inter, minlength=len(df)) / np.maximum(deg_area, 1e-30), 0, 1)
    meets_prev = np.zeros(len(df), bool)
    meets_prev[a] = True
    meets_next = np.zeros(len(df), bool)
    meets_next[b] = True
    area = df.area_km2.to_numpy()
    df["iso3"] = df["iso3"].fillna("")
    df["country"] = df["country"].fillna("(none)")
    first_year = yi == 0
    gain = pd.DataFrame({"iso3": df.iso3, "country": df.country, "year": df.year,
                         "new_km2": np.where(~meets_prev & ~first_year, area, 0.0),
                         "expanded_km2": np.where(meets_prev, area * out_prev, 0.0)})
    # losses of year t - 1 are reported in year t
    lost = yi < len(years) - 1
    loss = pd.DataFrame({"iso3": df.iso3[lost], "country": df.country[lost],
                         "year": years[np.minimum(yi[lost] + 1, len(years) - 1)],
                         "shrunk_km2": np.where(meets_next, area * out_next, 0.0)[lost],
                         "abandoned_km2": np.where(~meets_next, area, 0.0)[lost]})
    keys = ["iso3", "country", "year"]
    base = df.groupby(keys, as_index=False).agg(n_mines=("mine_id", "nunique"), area_km2=("area_km2", "sum"))
    out = base.merge(gain.groupby(keys, as_index=False).sum(), on=keys, how="outer")
    out = out.merge(loss.groupby(keys, as_index=False).sum(), on=keys, how="outer")
    for c in ("n_mines", "area_km2", "new_km2", "expanded_km2", "shrunk_km2", "abandoned_km2"):
        out[c] = out[c].fillna(0.0)
    out["n_mines"] = out["n_mines"].astype(int)
    for c in ("new_km2", "expanded_km2", "shrunk_km2", "abandoned_km2"):
        out.loc[out.year == years[0], c] = np.nan
    return out.sort_values(keys).reset_index(drop=True)[CHANGE_COLUMNS]


def summarise(panel: gpd.GeoDataFrame) -> pd.DataFrame:
    """Mines, polygons and km2 per country and year."""
    df = pd.DataFrame(panel.drop(columns="geometry"))
    df["iso3"] = df["iso3"].fillna("")
    df["country"] = df["country"].fillna("(none)")
    out = df.groupby(["iso3", "country", "year"], as_index=False).agg(
        n_mines=("mine_id", "nunique"), n_districts=("district_id", "nunique"), area_km2=("area_km2", "sum"))
    return out.sort_values(["iso3", "year"]).reset_index(drop=True)



def write_panel(panel: gpd.GeoDataFrame, events: pd.DataFrame, out_dir: Path, changes: pd.DataFrame | None = None
                ) -> dict[str, Path]:
    """Write into ``out_dir``, each file atomically: panel.parquet (GeoParquet; other formats are exports, see
    :mod:`minemap.export`), summary.csv (mines and km2 per country and year), the lineage tables mines.* (one row per mine) and
    events.* (appeared, reappeared, split, merged, disappeared), and changes.* (new, expanded, shrunk and
    abandoned km2 per country and year), each as Parquet and CSV."""
    out_dir = Path(out_dir)
    paths = {k: out_dir / v for k, v in PANEL_FILES.items()}
    write_geoparquet(panel, paths["parquet"])
    tables = {"summary": summarise(panel), "mines": lineage_table(panel, events), "events": events,
              "changes": change_statistics(panel) if changes is None else changes}
    for name, table in tables.items():
        if name != "summary":
            with atomic_path(paths[name]) as tmp:
                table.to_parquet(tmp, index=False)
        write_csv(table, paths[name if name == "summary" else f"{name}_csv"])
    return paths


def write_csv(table: pd.DataFrame, dest: Path, decimals: int = 6) -> Path:
    """A table as CSV, atomically, through Arrow's writer (a tenth of pandas' time on the lineage tables of a
    published-scale panel): floats rounded to ``decimals`` places and written in their shortest form, text in
    double quotes (so a name holding a comma stays one field), missing values empty."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = table.copy()
    for c in table.select_dtypes("float").columns:
        table[c] = table[c].round(decimals)
    with atomic_path(Path(dest)) as tmp:
        pacsv.write_csv(pa.Table.from_pandas(table, preserve_index=False), tmp)
    return Path(dest)
