"""Vectorisation and post-processing speed on a synthetic probability mosaic.

Prints polygons per second for vectorize (with seam merging across tiles) and for the temporal filter +
countries + areas. Run: `make bench` or `.venv/bin/python benchmarks/bench_vectorize.py`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from affine import Affine
from scipy.ndimage import gaussian_filter

from minemap.config import VectorizeConfig
from minemap.lattice import Grid
from minemap.postprocess import postprocess
from minemap.formats.rasters import write_cog
from minemap.vectorize import read_polygons, vectorize
from results_file import write_results

SIZE, TILE = 4096, 1024
T = Affine(4.777, 0, -219_000.0, 0, -4.777, 700_000.0)


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        field = gaussian_filter(rng.standard_normal((SIZE, SIZE)).astype(np.float32), 6)
        for year in (2019, 2020):
            q = (np.clip(field / field.std() * 0.25 + 0.35 + 0.02 * (year - 2019), 0, 1) * 250).astype(np.uint8)
            for r in range(0, SIZE, TILE):
                for c in range(0, SIZE, TILE):
                    write_cog(tmp / "probs" / str(year) / f"r{r // TILE:03d}_c{c // TILE:03d}.tif",
                              np.ascontiguousarray(q[r:r + TILE, c:c + TILE]),
                              Grid("EPSG:3857", T @ Affine.translation(c, r), TILE, TILE))
        t0 = time.perf_counter()
        paths = vectorize(tmp / "probs", [2019, 2020], tmp / "polys", 0.5, VectorizeConfig(min_area_m2=0))
        dt_v = time.perf_counter() - t0
        polys = read_polygons(paths)
        t0 = time.perf_counter()
        pp = postprocess(polys)
        dt_p = time.perf_counter() - t0
        print(f"vectorize: {len(polys)} polygons from 2 x {SIZE}x{SIZE} px in {dt_v:.1f} s "
              f"({len(polys) / dt_v:.0f} polygons/s, {2 * SIZE * SIZE / dt_v / 1e6:.1f} Mpx/s)")
        print(f"postprocess: {len(polys)} -> {len(pp)} polygons in {dt_p:.1f} s ({len(polys) / dt_p:.0f} polygons/s)")
    print("results:", write_results("vectorize", 1, {
        "pixels": 2 * SIZE * SIZE, "polygons": len(polys), "vectorize_s": round(dt_v, 3),
        "postprocess_s": round(dt_p, 3), "kept": len(pp)}))


if __name__ == "__main__":
    main()
