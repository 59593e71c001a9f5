"""The operating threshold, chosen on the validation blocks of the training year mapped wall to wall.

Validation chips oversample the neighbourhoods of mines (positive chips, and background drawn half as often), so
the threshold of best F1 on them trades recall for whatever confuser lies beside a mine, and maps the scene at
large with too high a threshold. The validation *blocks* are the same held-out ground seen whole: the training
year's probability tiles (mapped by the final model anyway) are read over them, labels rasterised, the band of
``chips.ignore_border_m`` along outlines and the possible missed mines left out, and the threshold chosen
there (:func:`minemap.metrics.operating_threshold`: half the best F1, the optimum for calibrated probabilities)
is the one a run vectorises with. Written as ``threshold.json`` beside the model's card threshold.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from rasterio.features import rasterize

from minemap.formats.chips import read_meta
from minemap.geo import units_per_metre
from minemap.lattice import Grid
from minemap.metrics import histograms, operating_threshold
from minemap.formats.rasters import NODATA

MIN_POSITIVE_PIXELS = 500  # fewer labelled pixels in the validation blocks: keep the card's threshold


def block_threshold(tiles: list[Path], grid: Grid, chips_dir: Path, labels: gpd.GeoDataFrame,
                    ignore: gpd.GeoDataFrame | None = None) -> dict | None:
    """The operating threshold over the validation blocks of ``grid`` (the training year's), with its metrics,
    or None where the blocks hold too few labelled pixels to choose one."""
    meta = read_meta(chips_dir)
    block = int(meta["block_size"])
    blocks = pd.read_parquet(Path(chips_dir) / "blocks.parquet")
    val = {(int(r.bx), int(r.by)) for r in blocks.itertuples() if r.split == "val"}
    if not val:
        return None
    geoms = np.asarray(labels.to_crs(grid.crs).geometry.values)
    c = shapely.centroid(shapely.union_all(geoms)) if len(geoms) else None
    band = float(meta.get("ignore_border_m", 0.0))
    if c is not None and band > 0:
        border = shapely.buffer(shapely.boundary(geoms), band * units_per_metre(grid.crs, c.x, c.y))
    else:
        border = np.array([], dtype=object)
    skip = list(border) + (list(ignore.to_crs(grid.crs).geometry.values) if ignore is not None and len(ignore) else [])
    hpos, hneg = None, None
    for path in tiles:
        with rasterio.open(path) as src:
            q, transform = src.read(1), src.transform
        col0 = int(round((transform.c - grid.transform.c) / grid.transform.a))
        row0 = int(round((transform.f - grid.transform.f) / grid.transform.e))
        rows = (row0 + np.arange(q.shape[0])) // block
        cols = (col0 + np.arange(q.shape[1])) // block
        in_val = np.zeros(q.shape, bool)
        for bx, by in val:
            r, cc = rows == by, cols == bx
            if r.any() and cc.any():
                in_val[np.ix_(r, cc)] = True
        use = in_val & (q != NODATA)
        if not use.any():
            continue
        truth = rasterize(((g, 1) for g in geoms), out_shape=q.shape, transform=transform, dtype=np.uint8) > 0 \
            if len(geoms) else np.zeros(q.shape, bool)
        if skip:
            use &= rasterize(((g, 1) for g in skip), out_shape=q.shape, transform=transform, dtype=np.uint8) == 0
        hp, hn = histograms(q[use], truth[use])
        hpos, hneg = (hp, hn) if hpos is None else (hpos + hp, hneg + hn)
    if hpos is None or hpos.sum() < MIN_POSITIVE_PIXELS:
        return None
    threshold, metrics = operating_threshold(hpos, hneg)
    return {"threshold": float(threshold), "f1": metrics["f1"], "precision": metrics["precision"],
            "recall": metrics["recall"], "positive_pixels": int(hpos.sum()), "pixels": int(hpos.sum() + hneg.sum())}
