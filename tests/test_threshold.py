"""The operating threshold chosen on the validation blocks of the training year, mapped wall to wall."""

import json

import geopandas as gpd
import numpy as np
import pandas as pd
from affine import Affine
from pyproj import CRS
from shapely.geometry import box

from minemap.lattice import Grid
from minemap.formats.rasters import quantise, write_cog
from minemap.threshold import block_threshold


def test_threshold_comes_from_the_validation_blocks_only(tmp_path):
    """Block (0, 0) is validation: a mine at 0.6 on ground at 0. The training blocks hold ground at 0.55, which
    would push the threshold to 0.6 if they counted; a possible missed mine at 0.9 in the validation block is
    left out, else it would be a false alarm."""
    grid = Grid(CRS.from_epsg(3857), Affine(5.0, 0, 0, 0, -5.0, 640.0), 128, 128)
    chips = tmp_path / "chips"
    chips.mkdir()
    (chips / "meta.json").write_text(json.dumps({"block_size": 64, "ignore_border_m": 0}))
    gpd.GeoDataFrame({"chip_id": []}, geometry=[], crs="EPSG:4326").to_parquet(chips / "index.parquet")
    pd.DataFrame({"bx": [0, 1, 0, 1], "by": [0, 0, 1, 1], "split": ["val", "train", "train", "test"],
                  "label_pixels": [1.0, 0, 0, 0]}).to_parquet(chips / "blocks.parquet")
    prob = np.full((128, 128), 0.55, np.float32)
    prob[:64, :64] = 0.0
    prob[16:48, 16:48] = 0.6  # the labelled mine, in the validation block
    prob[50:60, 50:60] = 0.9  # a mine the labels miss
    write_cog(tmp_path / "p" / "t.tif", quantise(prob), grid)

    def px(c0, r0, c1, r1):  # pixel box -> EPSG:3857 polygon
        return box(c0 * 5.0, 640 - r1 * 5.0, c1 * 5.0, 640 - r0 * 5.0)

    labels = gpd.GeoDataFrame(geometry=[px(16, 16, 48, 48)], crs="EPSG:3857")
    missed = gpd.GeoDataFrame(geometry=[px(50, 50, 60, 60)], crs="EPSG:3857")
    found = block_threshold([tmp_path / "p" / "t.tif"], grid, chips, labels, missed)
    assert found["f1"] == 1.0 and found["threshold"] <= 0.55
    assert found["positive_pixels"] == 32 * 32 and found["pixels"] == 64 * 64 - 100
    with_missed = block_threshold([tmp_path / "p" / "t.tif"], grid, chips, labels, None)
    assert with_missed["f1"] < 1.0
    pd.DataFrame({"bx": [0], "by": [0], "split": ["train"], "label_pixels": [1.0]}).to_parquet(chips / "blocks.parquet")
    assert block_threshold([tmp_path / "p" / "t.tif"], grid, chips, labels, missed) is None  # no validation block


def test_operating_threshold_is_half_the_best_f1():
    """Calibrated probabilities (a pixel at p is a mine with probability p): the F1-optimal threshold is half the
    best F1, and the rule finds it. Validation labels that miss half the confident mines push the sweep's argmax
    to the top of the range; the rule stays at half the best F1."""
    from minemap.formats.rasters import LEVELS
    from minemap.metrics import best_threshold, metrics_at, operating_threshold, sweep

    levels = np.arange(LEVELS + 1) / LEVELS
    n = np.where(levels < 0.1, 20_000, 400).astype(float)  # most pixels sure background, as in a scene
    pos, neg = np.rint(n * levels), np.rint(n * (1 - levels))
    t, row = operating_threshold(pos, neg)
    best = max(r["f1"] for r in sweep(pos, neg))
    assert abs(t - best / 2) <= 0.025 and row == metrics_at(pos, neg, t) | {"threshold": t}
    assert abs(t - best_threshold(pos, neg)[0]) <= 0.05  # calibrated: the argmax agrees with the rule
    # labels miss most mines the model is less than sure of: they count as false alarms in validation
    drawn = np.where(levels < 0.9, np.rint(pos * 0.3), pos)
    missed = neg + pos - drawn
    assert best_threshold(drawn, missed)[0] >= 0.85 and operating_threshold(drawn, missed)[0] <= 0.45
    # nothing to go by: even odds
    assert operating_threshold(np.zeros(LEVELS + 1), neg)[0] == 0.5
