"""Where a run's calibration error comes from: refit Platt scaling on its validation blocks against the labels
and against the truth, and the maximum calibration error (MCE) over every year against the truth with each.

For runs kept by `benchmarks/bench_accuracy.py --keep DIR` (the scene beside each run):

    .venv/bin/python tools/calibration_refit.py DIR/run-576365 [DIR/run-576368 ...]

Prints, per run, the MCE of its probabilities as written, then for the validation blocks (all of them, and those
holding labels) the scale, bias and MCE of a Platt refit against the labels and against the truth.
"""

from __future__ import annotations

import glob
import sys

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.features import rasterize

from minemap.formats.chips import possible_missed_mines, read_meta
from minemap.formats.rasters import LEVELS, NODATA
from minemap.geo import units_per_metre
from minemap.metrics import fit_platt, histograms, reliability

_P = np.clip(np.arange(LEVELS + 1) / LEVELS, 1e-3, 1 - 1e-3)
LOGIT = np.log(_P / (1 - _P))  # the logit of each quantised level


def _burn(geoms, shape, transform) -> np.ndarray:
    geoms = [g for g in geoms if g is not None and not g.is_empty]
    if not geoms:
        return np.zeros(shape, bool)
    return rasterize([(g, 1) for g in geoms], out_shape=shape, transform=transform, dtype="uint8") > 0


def _recalibrated(hp: np.ndarray, hn: np.ndarray, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    new = np.rint(LEVELS / (1 + np.exp(-(a * LOGIT + b)))).astype(int)
    return np.bincount(new, hp, LEVELS + 1), np.bincount(new, hn, LEVELS + 1)


def main(run: str) -> None:
    run = run.rstrip("/")
    scene = run.replace("run-", "scene-")
    truth = gpd.read_file(glob.glob(f"{scene}/truth*")[0])
    labels = gpd.read_parquet(f"{run}/labels.parquet")
    blocks = gpd.read_parquet(f"{run}/chips/blocks.parquet")
    meta = read_meta(f"{run}/chips")
    missed = possible_missed_mines([f"{run}/chips", f"{run}/hard_negatives/chips"])
    years = sorted(int(p.rsplit("/", 1)[-1]) for p in glob.glob(f"{run}/probabilities/[0-9]*"))
    hist = {y: [0, 0] for y in years}
    val = {k: ([], [], []) for k in ("all", "labelled")}
    for year in years:
        for tif in sorted(glob.glob(f"{run}/probabilities/{year}/*.tif")):
            with rasterio.open(tif) as src:
                q, transform, crs = src.read(1), src.transform, src.crs
            valid = q != NODATA
            t = _burn(truth[truth.year == year].to_crs(crs).geometry, q.shape, transform)
            hp, hn = histograms(q[valid], t[valid])
            hist[year][0] += hp
            hist[year][1] += hn
            if year != years[0]:
                continue
            g = labels.to_crs(crs).geometry.values
            lab = _burn(g, q.shape, transform)
            c = shapely.centroid(shapely.union_all(g))
            band = meta.get("ignore_border_m", 0) * units_per_metre(crs, c.x, c.y)
            skip = _burn(shapely.buffer(shapely.boundary(g), band), q.shape, transform)
            if missed is not None:
                skip |= _burn(missed.to_crs(crs).geometry, q.shape, transform)
            in_val = blocks.split == "val"
            for key, sel in (("all", in_val), ("labelled", in_val & (blocks.label_pixels > 0))):
                use = valid & _burn(blocks[sel].to_crs(crs).geometry, q.shape, transform) & ~skip
                val[key][0].append(LOGIT[q[use]])
                val[key][1].append(lab[use])
                val[key][2].append(t[use])
    mce = max(reliability(*hist[y])["mce"] for y in years)
    print(f"{run}: MCE as written {mce:.3f}")
    for key, (z, lab, t) in val.items():
        z, lab, t = np.concatenate(z), np.concatenate(lab), np.concatenate(t)
        for target, arr in (("labels", lab), ("truth", t)):
            a, b = fit_platt(z, arr)
            refit = max(reliability(*_recalibrated(*hist[y], a, b))["mce"] for y in years)
            print(f"  validation blocks ({key}), refit on the {target}: scale {a:.2f}, bias {b:.2f}, MCE {refit:.3f} "
                  f"({int(arr.sum())} mine pixels of {len(arr)})")


if __name__ == "__main__":
    for path in sys.argv[1:]:
        main(path)
