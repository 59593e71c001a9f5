"""Post-processing and panel speed at the scale of the published panel, against the GeoParquet floor and the
study's own method.

Builds a synthetic panel over tropical land: ``--mines`` mines (default 162,000, the study's ~147,000 polygons
a year plus those the temporal rule drops) in districts of neighbouring pits, over ``--years`` years (default 9,
2016-2024), ~32 vertices each; pits grow, shrink, pause, fuse with neighbours, and some outlines are one-year
noise that the temporal rule drops. Then, from one run:

- floor: reading the per-year polygon files and writing the same polygons as one GeoParquet;
- minemap: ``minemap postprocess`` then ``minemap panel`` (temporal rule, countries, areas; tracking, lineage,
  change statistics and the panel's files), each run as a user runs them, in its own process, with its
  peak resident memory;
- the study's method as its public post-processing script does it, re-written here: its GeoPackage of
  predictions a year read, a spatial join of each year with each neighbour year, each polygon tested against
  every country in a table of tests and the last intersecting country taken from it, areas in Goode
  Homolosine, geometries made valid, a GeoPackage a year written; on the same country layer (its reading,
  computing and writing timed apart; the country step also timed done as one plain loop, for the record);
- that minemap keeps exactly the polygons the study's temporal rule keeps (buffer 0).

The floor and minemap's two commands run ``--runs`` times (default 3, alternating): the figures are medians with
the spread (lowest to highest) beside them; the study's method runs once. Prints the figures and the ratios
(minemap / floor, study / minemap), writes ``benchmarks/results/panel-<date>-<commit>.json``, and exits 1 where
minemap's kept polygons are not the study's. Run: `make bench` or
`.venv/bin/python benchmarks/bench_panel.py [--mines 54000]` (a third of the scale: ~1/3 the time and memory).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from minemap.formats.countries import load_countries
from results_file import write_results

FIRST_YEAR = 2016
VERTICES = 32


def make_panel(n_mines: int, n_years: int, seed: int = 0) -> list[gpd.GeoDataFrame]:
    """Per year, the raw polygons (year, area_km2, mean_probability, geometry; EPSG:4326) of ``n_mines`` pits in
    districts of eight, over tropical land (the embedded country layer, 25 S to 25 N)."""
    rng = np.random.default_rng(seed)
    land = load_countries()
    land = shapely.union_all(shapely.clip_by_rect(np.asarray(land.geometry.values), -180, -25, 180, 25))
    shapely.prepare(land)
    n_districts = -(-n_mines // 8)
    centres = []
    while sum(map(len, centres)) < n_districts:
        lon, lat = rng.uniform(-179.5, 179.5, 4 * n_districts), rng.uniform(-25, 25, 4 * n_districts)
        ok = shapely.contains_xy(land, lon, lat)
        centres.append(np.column_stack([lon[ok], lat[ok]]))
    centres = np.concatenate(centres)[:n_districts]
    district = np.repeat(np.arange(n_districts), 8)[:n_mines]
    deg = 1 / 111_320
    coslat = np.cos(np.radians(centres[district, 1]))
    offset = rng.normal(0, 900, (n_mines, 2)) * deg  # pits within ~1 km of their district's centre
    cx = centres[district, 0] + offset[:, 0] / coslat
    cy = centres[district, 1] + offset[:, 1]
    radius = rng.lognormal(np.log(120), 0.5, n_mines)  # metres
    growth = rng.normal(0.06, 0.05, n_mines)  # share of the radius a year
    first = np.where(rng.uniform(size=n_mines) < 0.7, 0, rng.integers(0, n_years, n_mines))
    shape = rng.uniform(0.8, 1.2, (n_mines, VERTICES))  # each pit's irregular outline
    theta = np.linspace(0, 2 * np.pi, VERTICES, endpoint=False)
    out = []
    for k in range(n_years):
        alive = (first <= k) & (rng.uniform(size=n_mines) > 0.05)  # a pit unseen some years
        noise = rng.uniform(size=n_mines) < 0.08  # one-year noise far from any pit, dropped by the temporal rule
        r = radius * np.clip(1 + growth * (k - first), 0.3, 4) * rng.uniform(0.95, 1.05, n_mines)
        x = cx + np.where(noise, rng.uniform(0.05, 0.2, n_mines), 0) / coslat
        y = cy + np.where(noise, rng.uniform(0.05, 0.2, n_mines), 0)
        sel = np.flatnonzero(alive | noise)
        rr = (r[sel, None] * shape[sel] * deg)
        xs = x[sel, None] + rr * np.cos(theta)[None] / coslat[sel, None]
        ys = y[sel, None] + rr * np.sin(theta)[None]
        coords = np.stack([xs, ys], -1)
        rings = shapely.linearrings(np.concatenate([coords, coords[:, :1]], 1))
        polys = shapely.make_valid(shapely.polygons(rings))
        merged = _dissolve(polys)
        out.append(gpd.GeoDataFrame({"year": FIRST_YEAR + k, "area_km2": np.nan,
                                     "mean_probability": rng.uniform(0.5, 0.99, len(merged)).astype(np.float32)},
                                    geometry=merged, crs="EPSG:4326"))
    return out


def _dissolve(polys: np.ndarray) -> np.ndarray:
    """A year's outlines do not overlap: pits that meet become one outline (unions of the overlapping groups
    only), exploded to polygons."""
    a, b = shapely.STRtree(polys).query(polys, predicate="intersects")
    keep = a < b
    _, comp = connected_components(coo_matrix((np.ones(keep.sum()), (a[keep], b[keep])), shape=(len(polys),) * 2),
                                   directed=False)
    size = np.bincount(comp)
    alone = size[comp] == 1
    groups = pd.Series(np.flatnonzero(~alone)).groupby(comp[~alone]).agg(list)
    unions = [shapely.union_all(polys[g]) for g in groups]
    parts = shapely.get_parts(np.concatenate([polys[alone], np.asarray(unions, dtype=object)]))
    return parts[shapely.get_type_id(parts) == 3]


# Linux records the resident size of the address space a process replaces at exec as that process's peak, so a
# command started from this (large) process would report at least this process's size. A small Python started
# first starts the command and reads its peak: the command then replaces the small one's address space.
_MEASURE = """
import os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss)
"""


def run_cli(args: list[str]) -> tuple[float, float]:
    """Seconds and peak resident memory (GB) of one ``minemap`` command in its own process."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "minemap", *args],
                          capture_output=True, text=True)
    try:
        code, seconds, maxrss_kb = done.stdout.split()
    except ValueError:
        raise SystemExit(f"minemap {' '.join(args)} could not be measured: {done.stderr[-2000:]}") from None
    if int(code) != 0:
        raise SystemExit(f"minemap {' '.join(args)} failed: {done.stderr[-2000:]}")
    return float(seconds), int(maxrss_kb) / 1024 ** 2


def study_method(paths: list[Path], countries: gpd.GeoDataFrame, out_dir: Path) -> tuple[gpd.GeoDataFrame, dict]:
    """The study's post-processing as its public script does it, re-written: read each year's GeoPackage of
    predictions; keep a polygon of year t if a spatial join finds one of t-1 or t+1 intersecting it; then, a
    year at a time, a table of intersects tests of every polygon against every country (no index), the last
    intersecting country winning; areas in Interrupted Goode Homolosine, then valid geometries; write a
    GeoPackage a year
    (``global_mining_polygons_predicted_<year>_postprocessed.gpkg``). On the same country layer as minemap.

    Returns the kept polygons (before repair, to compare with minemap's) and the seconds of reading, computing
    (of which the country step) and writing, and of the country step done as one loop (the same answer, checked),
    which is not counted."""
    seconds = {}
    t0 = time.perf_counter()
    years = [gpd.read_file(p) for p in paths]
    seconds["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept = []
    for i, gdf in enumerate(years):
        hit = np.zeros(len(gdf), bool)
        for j in (i - 1, i + 1):
            if 0 <= j < len(years):
                joined = gpd.sjoin(gdf[["geometry"]], years[j][["geometry"]], predicate="intersects", how="inner")
                hit[np.unique(gdf.index.get_indexer(joined.index))] = True
        kept.append(gdf[hit])
    out = gpd.GeoDataFrame(pd.concat(kept, ignore_index=True), crs="EPSG:4326")
    geoms = np.asarray(out.geometry.values)
    t1 = time.perf_counter()
    parts = []
    for _, year in out.groupby("year"):  # the script's country step, a year at a time: a table of intersects
        # tests (a row per polygon, a column per country), each country's code where true, the last one found
        hits = year.geometry.apply(lambda g: countries.geometry.intersects(g))
        codes = {}
        for col, values in (("iso_a3", countries.iso3), ("country_name", countries.country)):
            codes[col] = (hits * values.to_numpy()).replace("", np.nan).ffill(axis="columns").iloc[:, -1]
        parts.append(pd.DataFrame(codes, index=year.index))
    result = out.join(pd.concat(parts)).assign(area=out.to_crs("+proj=igh").area)
    result["geometry"] = shapely.make_valid(geoms)
    seconds["countries"] = time.perf_counter() - t1
    seconds["compute"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for y, part in result.groupby("year"):
        part.assign(id=np.arange(len(part)))[["id", "iso_a3", "country_name", "year", "area", "geometry"]].to_file(
            out_dir / f"global_mining_polygons_predicted_{y}_postprocessed.gpkg", driver="GPKG")
    seconds["write"] = time.perf_counter() - t0
    # the same answer done efficiently (one intersects test of a polygon against every country, no table): timed
    # for the record, not counted in the study's time
    t0 = time.perf_counter()
    cgeoms = np.asarray(countries.geometry.values)
    last = np.array([(lambda f: f[-1] if len(f) else -1)(np.flatnonzero(shapely.intersects(g, cgeoms)))
                     for g in geoms])
    lean = np.where(last >= 0, countries.iso3.to_numpy()[last], None)
    seconds["countries_lean"] = time.perf_counter() - t0
    same = pd.Series(lean, index=result.index).fillna("").eq(result.iso_a3.fillna("")).all()
    if not same:
        raise SystemExit("the two ways of the study's country step disagree")
    return out, seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3, help="runs of the floor and of minemap's commands")
    ap.add_argument("--mines", type=int, default=162_000, help="pits (the study: ~147,000 polygons a year)")
    ap.add_argument("--years", type=int, default=9)
    ap.add_argument("--keep", type=Path, default=None, help="keep the files in this folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t0 = time.perf_counter()
        frames = make_panel(args.mines, args.years)
        years = [FIRST_YEAR + k for k in range(args.years)]
        poly_dir = root / "polygons"
        poly_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for y, gdf in zip(years, frames):
            gdf.to_parquet(poly_dir / f"{y}.parquet")
            paths.append(poly_dir / f"{y}.parquet")
        n = sum(map(len, frames))
        vertices = int(np.mean([shapely.get_num_coordinates(np.asarray(f.geometry.values)).mean() for f in frames]))
        del frames
        print(f"synthetic panel: {n:,} polygons ({args.years} years x ~{n // args.years:,}), "
              f"~{vertices} vertices each, built in {time.perf_counter() - t0:.0f} s")

        span = f"{years[0]}-{years[-1]}"
        floors, pps, panels, peaks = [], [], [], []
        for run in range(args.runs):
            t0 = time.perf_counter()
            all_polys = gpd.GeoDataFrame(pd.concat([gpd.read_parquet(p) for p in paths], ignore_index=True),
                                         crs="EPSG:4326")
            all_polys.to_parquet(root / "floor.parquet")
            floors.append(time.perf_counter() - t0)
            del all_polys
            pp = root / ("pp.parquet" if run == 0 else f"pp{run}.parquet")
            t_pp, m_pp = run_cli(["postprocess", str(poly_dir), "--years", span, "--out", str(pp),
                                  "--temporal", "study"])
            t_panel, m_panel = run_cli(["panel", str(pp), "--out", str(root / ("panel" if run == 0 else f"panel{run}"))])
            pps.append(t_pp)
            panels.append(t_panel)
            peaks.append(max(m_pp, m_panel))
        floor, t_pp, t_panel = float(np.median(floors)), float(np.median(pps)), float(np.median(panels))
        totals = [a + b for a, b in zip(pps, panels)]
        minemap_s = float(np.median(totals))

        gpkgs = []  # the study's own input: a GeoPackage of predictions a year
        for y, p in zip(years, paths):
            gpkgs.append(poly_dir / f"global_mining_polygons_predicted_{y}.gpkg")
            gpd.read_parquet(p).to_file(gpkgs[-1], driver="GPKG")
        study_out = root / "study"
        study_out.mkdir(exist_ok=True)
        study, study_parts = study_method(gpkgs, load_countries(), study_out)
        study_s = sum(study_parts[k] for k in ("read", "compute", "write"))
        ours = gpd.read_parquet(root / "pp.parquet")
        same = len(ours) == len(study) and all(
            np.array_equal(np.sort(shapely.to_wkb(np.asarray(ours[ours.year == y].geometry.values))),
                           np.sort(shapely.to_wkb(np.asarray(study[study.year == y].geometry.values))))
            for y in years)
        panel = pd.read_parquet(root / "panel" / "mines.parquet", columns=["mine_id"])
        events = pd.read_parquet(root / "panel" / "events.parquet", columns=["kind"])

    ratios = [t / f for t, f in zip(totals, floors)]
    print(f"floor (read the year files, write one GeoParquet): median {floor:.1f} s of {args.runs} runs "
          f"({min(floors):.1f}-{max(floors):.1f})")
    print(f"minemap postprocess: median {t_pp:.1f} s; minemap panel: median {t_panel:.1f} s; both "
          f"{minemap_s:.1f} s ({min(totals):.1f}-{max(totals):.1f}); peak {max(peaks):.2f} GB "
          f"({len(panel):,} mines; events {events.kind.value_counts().to_dict()})")
    print(f"study's method (temporal rule, countries, areas; its GeoPackages in and out; one run): {study_s:.1f} s "
          f"(read {study_parts['read']:.1f} s, compute {study_parts['compute']:.1f} s of which countries "
          f"{study_parts['countries']:.1f} s the script's way (a table of intersects tests of every polygon "
          f"against every country), {study_parts['countries_lean']:.1f} s done as one loop; "
          f"write {study_parts['write']:.1f} s)")
    print(f"minemap / floor: {minemap_s / floor:.1f} x, median of the runs' ratios {np.median(ratios):.1f} "
          f"({min(ratios):.1f}-{max(ratios):.1f}; goal <= 3); study / minemap: {study_s / minemap_s:.2f} x "
          f"(its computing alone: {study_parts['compute'] / minemap_s:.2f} x minemap's whole commands; without "
          f"its table of tests, {(study_s - study_parts['countries'] + study_parts['countries_lean']) / minemap_s:.2f}"
          f" x); peak RSS {max(peaks):.2f} GB (goal <= 4 at 1.46 million polygons)")
    print(f"kept polygons identical to the study's temporal rule: {same} ({len(ours):,} vs {len(study):,})")
    path = write_results("panel", os.cpu_count() or 1, {
        "mines": args.mines, "years": args.years, "polygons": n, "runs": args.runs, "floor_s": [round(v, 2) for v in floors],
        "postprocess_s": [round(v, 2) for v in pps], "panel_s": [round(v, 2) for v in panels],
        "peak_gb": round(max(peaks), 3), "minemap_vs_floor_median": round(float(np.median(ratios)), 3),
        "minemap_vs_floor_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "study_s": {k: round(v, 2) for k, v in study_parts.items()}, "study_vs_minemap": round(study_s / minemap_s, 3),
        "kept_identical": bool(same), "kept": [len(ours), len(study)]})
    print(f"results: {path}")
    if not same:
        print("FAILED: minemap's kept polygons differ from the study's temporal rule", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
