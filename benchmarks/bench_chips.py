"""Chips from anywhere (issue 21): places and chips cut a second, per worker, from a local folder and from the
loopback STAC server, against the floor of each source.

Prints, from one run (figures as ratios measured in this run, since machines are noisy):

1. **STAC.** ``--places`` places drawn across the tropics (30 S to 30 N, every longitude: several continents and
   UTM zones, some by the antimeridian), each a cluster of 1-3 mining polygons with one clear Sentinel-2-like
   scene of ``--res`` m around it in its own UTM zone, served by the loopback STAC API of the tests
   (tests/stac_server.py: HTTP with range requests, without a network's latency). ``make_tiled_chips`` cuts
   them tile by tile with 1 worker and with ``--workers`` workers (each from an empty cache). The floor: the
   composites that cut built, built alone, serially (the part every cut must do: search, read, composite). The
   server answers every worker from one Python process, so the speed-up of several workers is bounded by it.
2. **Local folder.** Four GeoTIFFs of 2048 px at 4.77 m (Planet's pixel size) 0.3 degrees apart in one UTM zone
   with ``--local-places`` mines among them, cut in tiles of ``--tile-deg`` degrees, 1 and ``--workers`` workers. The floor:
   each cut tile's area read once from the mosaic, serially.

The chips of 1 and of N workers must be the same (ids and pixels of the index): the benchmark exits 1 if not.
Writes ``benchmarks/results/chips-<date>-<commit>.json``.
Run: `make bench` or `.venv/bin/python benchmarks/bench_chips.py [--places 48] [--workers 2]`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from affine import Affine
from rasterio import features

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from stac_server import MINE, VEGETATION, StacServer, serve_places  # noqa: E402

from minemap.chips.tiles import make_tiled_chips  # noqa: E402
from minemap.config import ChipConfig  # noqa: E402
from minemap.imagery import for_area, open_imagery  # noqa: E402
from minemap.imagery.local import LocalImageryConfig  # noqa: E402
from minemap.imagery.stac import StacImageryConfig  # noqa: E402
from results_file import write_results  # noqa: E402

YEAR = 2020


def blob(lon: float, lat: float, radius_m: float, rng: np.random.Generator) -> shapely.Geometry:
    """An irregular polygon of about ``radius_m`` around (lon, lat), in degrees."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    r = radius_m * rng.uniform(0.5, 1.0, 9) / 111_320.0
    return shapely.Polygon(np.c_[lon + r * np.cos(angles) / math.cos(math.radians(lat)),
                                 lat + r * np.sin(angles)]).convex_hull


def places(n: int, rng: np.random.Generator) -> tuple[gpd.GeoDataFrame, list[shapely.Geometry]]:
    """``n`` places across the tropics, each 1-3 polygons within 1.5 km: the labels and each place's union."""
    rows, unions = [], []
    for k in range(n):
        lon, lat = rng.uniform(-179.9, 179.9), rng.uniform(-30, 30)
        polys = [blob(lon + dx / (111_320 * math.cos(math.radians(lat))), lat + dy / 111_320,
                      rng.uniform(100, 400), rng)
                 for dx, dy in rng.uniform(-1500, 1500, (rng.integers(1, 4), 2))]
        rows += [{"place": k, "geometry": p} for p in polys]
        unions.append(shapely.union_all(polys))
    return gpd.GeoDataFrame(rows, crs="EPSG:4326"), unions


def local_mosaic(root: Path, n_mines: int, rng: np.random.Generator) -> gpd.GeoDataFrame:
    """Four GeoTIFFs of 2048 px at 4.77 m in UTM 30N (Ghana), 0.3 degrees apart (quads of a basemap downloaded
    where the labels are), vegetation with ``n_mines`` mines among them; the labels (EPSG:4326)."""
    res, side = 4.77, 2048
    folder = root / str(YEAR)
    folder.mkdir(parents=True)
    mines = []
    for q in range(4):
        x0, y0 = 600_000.0 + (q % 2) * 33_000, 700_000.0 - (q // 2) * 33_000
        t = Affine(res, 0, x0, 0, -res, y0)
        own = [shapely.Point(rng.uniform(x0 + 300, x0 + side * res - 300), rng.uniform(y0 - side * res + 300, y0 - 300))
               .buffer(rng.uniform(60, 250), quad_segs=3) for _ in range(n_mines // 4 + (q < n_mines % 4))]
        mines += own
        inside = features.rasterize([(m, 1) for m in own], (side, side), transform=t).astype(bool)
        data = np.empty((4, side, side), np.uint16)
        for b in range(4):
            band = VEGETATION[b] + rng.normal(0, 40, (side, side))
            band[inside] = MINE[b] + rng.normal(0, 40, int(inside.sum()))
            data[b] = np.clip(band, 1, None)
        with rasterio.open(folder / f"q{q}.tif", "w", driver="GTiff", width=side, height=side, count=4,
                           dtype="uint16", crs="EPSG:32630", transform=t, tiled=True, compress="deflate",
                           nodata=0) as dst:
            dst.write(data)
            dst.descriptions = ("red", "green", "blue", "nir")
    return gpd.GeoDataFrame(geometry=mines, crs="EPSG:32630").to_crs("EPSG:4326")


def fingerprint(dest: Path) -> str:
    """The chips a folder holds: ids, splits and every image's and mask's pixels."""
    index = pd.read_parquet(dest / "index.parquet").sort_values("chip_id")
    h = hashlib.sha256()
    for row in index.itertuples():
        h.update(f"{row.chip_id}:{row.split}:{row.kind}".encode())
        for rel in (row.image, row.mask):
            with rasterio.open(dest / rel) as f:
                h.update(f.read().tobytes())
    return h.hexdigest()


def cut(labels: gpd.GeoDataFrame, imagery, dest: Path, cfg: ChipConfig, workers: int, tile_deg: float) -> dict:
    start = time.perf_counter()
    index = make_tiled_chips(labels, imagery, YEAR, dest, cfg, tile_deg=tile_deg, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    tiles = gpd.read_parquet(dest / "tiles.parquet")
    return {"workers": workers, "seconds": round(seconds, 2), "tiles": int((tiles.status == "cut").sum()),
            "labels": len(labels), "chips": int(len(index)), "labels_per_s": round(len(labels) / seconds, 2),
            "chips_per_s": round(len(index) / seconds, 2),
            "chips_per_s_per_worker": round(len(index) / seconds / workers, 2)}


def floor(dest: Path, imagery, used=None) -> float:
    """Seconds to read each cut tile's area once (a local folder), or (``used``: the STAC description whose cache
    a cut filled) to build the very composites that cut built, each alone, into ``imagery``'s empty cache."""
    tiles = gpd.read_parquet(dest / "tiles.parquet")
    start = time.perf_counter()
    for t in tiles[tiles.status == "cut"].itertuples():
        bbox = (t.west, t.south, t.east, t.north)
        src = open_imagery(for_area(imagery, bbox))
        if used is None:
            src.read(YEAR, src.grid(YEAR))
            continue
        done = open_imagery(for_area(used, bbox))
        for cell in done.tiles_over(done.grid(YEAR)):
            if done.tile_path(YEAR, cell).is_file():
                src.composite(YEAR, cell)
    return time.perf_counter() - start


def compare(name: str, one: dict, many: dict, floor_s: float, same: bool) -> dict:
    scaling = one["seconds"] / many["seconds"]
    out = {"one_worker": one, "n_workers": many, "floor_seconds": round(floor_s, 2),
           "floor_vs_stage": round(floor_s / one["seconds"], 3),
           "speed_up": round(scaling, 2), "efficiency": round(scaling / many["workers"], 2), "same_chips": same}
    print(f"{name}: {one['labels']} labels in {one['tiles']} tiles -> {one['chips']} chips; 1 worker "
          f"{one['labels_per_s']} labels/s, {one['chips_per_s']} chips/s; {many['workers']} workers "
          f"{many['chips_per_s_per_worker']} chips/s per worker (speed-up {scaling:.2f}, efficiency "
          f"{scaling / many['workers']:.2f}); floor ({'composites alone' if name == 'stac' else 'reads alone'}) "
          f"{floor_s:.1f} s = {floor_s / one['seconds']:.2f} of the 1-worker cut; same chips: {same}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--places", type=int, default=48, help="places served by the STAC API")
    ap.add_argument("--res", type=float, default=10.0, help="STAC pixel size in metres")
    ap.add_argument("--local-places", type=int, default=60, help="mines in the local mosaic")
    ap.add_argument("--tile-deg", type=float, default=0.25, help="tile side in degrees for the local mosaic")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    rng = np.random.default_rng(args.seed)
    results: dict = {"args": vars(args)}
    ok = True
    with tempfile.TemporaryDirectory(prefix="minemap-bench-chips-") as tmp:
        tmp = Path(tmp)
        # STAC: places on every continent
        labels, unions = places(args.places, rng)
        server = StacServer(tmp / "assets", "EPSG:32630", Affine.identity())
        serve_places(server, unions, YEAR, args.res, 2500.0, rng)
        # the labels' year only (other_years=0), as the figures in benchmarks/results were measured: the
        # server holds one year, and the cost of other years' composites is that of the first, per year
        cfg = ChipConfig(chip_size=64, stride=32, seed=0, other_years=0)

        def stac(cache: str) -> StacImageryConfig:
            return StacImageryConfig.model_validate({"url": server.url, "bbox": (-1.0, 5.0, 0.0, 6.0),
                                                     "months": "1-12", "resolution_m": args.res, "tile_px": 256,
                                                     "cache_dir": tmp / cache, "retries": 1, "timeout_s": 30})

        one = cut(labels, stac("cache1"), tmp / "stac1", cfg, 1, 1.0)
        many = cut(labels, stac("cacheN"), tmp / "stacN", cfg, args.workers, 1.0)
        same = fingerprint(tmp / "stac1") == fingerprint(tmp / "stacN")
        ok &= same
        results["stac"] = compare("stac", one, many, floor(tmp / "stac1", stac("cacheF"), stac("cache1")), same)
        server.close()
        # a local folder
        lab = local_mosaic(tmp / "mosaic", args.local_places, rng)
        folder = LocalImageryConfig(path=tmp / "mosaic")
        cfg = ChipConfig(chip_size=128, seed=0, other_years=0)
        one = cut(lab, folder, tmp / "local1", cfg, 1, args.tile_deg)
        many = cut(lab, folder, tmp / "localN", cfg, args.workers, args.tile_deg)
        same = fingerprint(tmp / "local1") == fingerprint(tmp / "localN")
        ok &= same
        results["local"] = compare("local", one, many, floor(tmp / "local1", folder), same)
    path = write_results("chips", args.workers, results)
    print(f"results: {path}")
    if not ok:
        print("FAILED: the chips of 1 and of several workers differ", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
