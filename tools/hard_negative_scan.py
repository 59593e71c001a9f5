"""Diagnose hard-negative mining on a kept benchmark run: the first model's detections away from the labels,
with their mean probability relative to the median over labelled mines, and what the truth says they are.

Usage: `.venv/bin/python tools/hard_negative_scan.py KEEP_DIR scene [scene ...]`, where KEEP_DIR is the folder
given to `benchmarks/bench_accuracy.py --keep` (each scene has `scene/` and `run/`). A detection whose part
beyond 60 m of every label is covered 90 % or more by a true mine is a mine the labels miss; one covered by
nothing is a confuser. Hard-negative mining should ignore the first and teach the second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import geopandas as gpd
import numpy as np

from minemap.config import VectorizeConfig
from minemap.vectorize import vectorize_year

BUFFER_M = 60.0  # hard_negatives.buffer_m's default; the scenes are in metres once in EPSG:3857 near the equator


def scan(keep: Path, name: str, year: int = 2019, level: float = 0.1) -> None:
    run, scene = keep / name / "run", keep / name / "scene"
    tiles = sorted((run / "hard_negatives" / "probabilities" / str(year)).glob("*.tif"))
    det = vectorize_year(tiles, year, level, VectorizeConfig(min_area_m2=0.0)).to_crs(3857)
    truth = gpd.read_file(scene / "truth.gpkg").to_crs(3857)
    truth = truth[truth.year == year]
    labels = gpd.read_file(scene / f"labels_{year}.gpkg").to_crs(3857)
    near = labels.buffer(BUFFER_M).union_all()
    on = np.array([labels.distance(g).min() < 1 for g in det.geometry])
    median = float(np.median(det.mean_probability[on])) if on.any() else float("nan")
    print(f"{name}: {len(det)} detections, {int(on.sum())} on labels, median p on labels {median:.3f}")
    rows = []
    for geom, p, is_on in zip(det.geometry, det.mean_probability, on):
        if is_on:
            continue
        far = geom.difference(near)
        if far.is_empty:
            continue
        hit = truth[truth.intersects(far)]
        cover = far.intersection(hit.union_all()).area / far.area if len(hit) else 0.0
        rows.append((p / median, p, far.area, cover))
    for rel, p, area, cover in sorted(rows, reverse=True):
        kind = "missed mine" if cover >= 0.9 else "confuser" if cover == 0 else "mixed"
        print(f"  p {p:.3f} ({rel:.2f} x median)  {area / 1e4:7.1f} ha  truth cover {cover:.2f}  {kind}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    for scene_name in sys.argv[2:]:
        scan(Path(sys.argv[1]), scene_name)
