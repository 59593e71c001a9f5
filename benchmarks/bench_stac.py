"""Sentinel-2 composite through STAC: build time of one cache tile and year against a loopback STAC API, and the
time of a second (cached) run, with their ratio.

The server (tests/stac_server.py) serves ``--scenes`` items over one 512 x 512 px tile at 10 m, each with four
reflectance COGs and a scene classification with scattered clouds, over HTTP with range requests, as a remote
catalogue would (without the network's latency). Run: `make bench` or
`.venv/bin/python benchmarks/bench_stac.py [--scenes 24] [--tile 512]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from affine import Affine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from stac_server import Scene, StacServer  # noqa: E402

from minemap.imagery.stac import StacImageryConfig
from minemap.imagery import open_imagery  # noqa: E402
from results_file import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=24, help="scenes in the year")
    ap.add_argument("--tile", type=int, default=512, help="tile side in pixels")
    args = ap.parse_args()
    n = args.tile
    side = n * 10.0
    transform = Affine(10.0, 0, 100 * side, 0, -10.0, 130 * side)  # one lattice tile in UTM 30N
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="minemap-bench-stac-") as tmp:
        server = StacServer(Path(tmp) / "assets", "EPSG:32630", transform)
        base = (800 + 400 * rng.random((n, n))).astype(np.float32)
        for i in range(args.scenes):
            month, day = 1 + i * 12 // args.scenes, 1 + (i * 7) % 27
            bands = {b: (base * (1 + 0.2 * k) * rng.uniform(0.95, 1.05)).astype(np.uint16)
                     for k, b in enumerate(("red", "green", "blue", "nir"))}
            scl = np.full((n, n), 4, np.uint8)
            cy, cx, r = rng.integers(0, n, 3) % (n // 2) + n // 4
            yy, xx = np.ogrid[:n, :n]
            scl[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = 9
            server.add(Scene(f"S2_{i:03d}", f"2021-{month:02d}-{day:02d}", bands, scl,
                             {"s2:processing_baseline": "03.01"}))
        from rasterio.warp import transform_bounds

        bbox = transform_bounds("EPSG:32630", "EPSG:4326", transform.c + 5, transform.f - side + 5,
                                transform.c + side - 5, transform.f - 5)
        cfg = StacImageryConfig(url=server.url, bbox=bbox, crs="EPSG:32630", tile_px=n,
                                cache_dir=Path(tmp) / "cache")
        t0 = time.perf_counter()
        src = open_imagery(cfg)
        records = src.fetch([2021], progress=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = open_imagery(cfg)
        again.fetch([2021], progress=False)
        again.read(2021, again.grid(2021))
        second = time.perf_counter() - t0
        server.close()
    r = records[0]
    print(f"composite of {r['scenes']} scenes, {n} x {n} px, 4 bands: first run {first:.2f} s "
          f"({r['clear_share']:.1%} clear), second (cached) run {second:.3f} s, ratio {second / first:.4f}")
    print("results:", write_results("stac", 1, {"scenes": r["scenes"], "tile_px": n, "first_s": round(first, 3),
                                                "cached_s": round(second, 4), "ratio": round(second / first, 4)}))


if __name__ == "__main__":
    main()
