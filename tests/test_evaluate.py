import json

import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from shapely.geometry import box

from minemap.errors import InputError
from minemap.evaluate import evaluate, evaluate_stage, read_reference
from minemap.lattice import Grid
from minemap.formats.rasters import write_cog

T = Affine(4.0, 0, 0.0, 0, -4.0, 0.0)


def _px_box(c0, r0, c1, r1):
    x0, y0 = T @ (c0, r0)
    x1, y1 = T @ (c1, r1)
    return gpd.GeoSeries([box(x0, y1, x1, y0)], crs="EPSG:3857").to_crs("EPSG:4326").iloc[0]


@pytest.fixture
def probs(tmp_path):
    q = np.zeros((100, 100), np.uint8)
    q[10:30, 10:30] = 240
    q[10:30, 10:20] = 100  # half of the mine has a low probability
    write_cog(tmp_path / "probs" / "2020" / "r000_c000.tif", q, Grid("EPSG:3857", T, 100, 100))
    return tmp_path / "probs"


def _gdf(geoms, year=2020):
    return gpd.GeoDataFrame({"year": [year] * len(geoms)}, geometry=geoms, crs="EPSG:4326")


def test_known_answers(probs):
    ref = _gdf([_px_box(10, 10, 30, 30), _px_box(60, 60, 70, 70)])
    pred = _gdf([_px_box(20, 10, 30, 30), _px_box(80, 80, 90, 90)])  # half of one mine, plus a false one
    m = evaluate(pred, ref, probs, threshold=0.5)["years"]["2020"]
    px = m["pixel"]
    assert (px["tp"], px["fp"], px["fn"]) == (200, 100, 300)
    assert px["precision"] == pytest.approx(200 / 300) and px["recall"] == pytest.approx(200 / 500)
    assert px["iou"] == pytest.approx(200 / 600)
    assert m["object"] == {"precision": 0.5, "recall": 0.5, "n_predicted": 2, "n_reference": 2, "ci95": {}}
    assert m["pixel"]["ci95"] == {} and m["blocks"] == {"side_m": 1000.0, "n": 1}  # 400 m: one block, no interval
    raw = m["raw_probability"]["at_threshold"]  # P >= 0.5 covers 200 px of the first mine only
    assert (raw["tp"], raw["fp"]) == (200, 0)
    sweep = {r["threshold"]: r for r in m["raw_probability"]["threshold_sweep"]}
    assert sweep[0.35]["tp"] == 400 and sweep[0.45]["tp"] == 200


def test_perfect_prediction_and_files(probs, tmp_path):
    ref = _gdf([_px_box(10, 10, 30, 30)])
    ref.to_file(tmp_path / "ref.gpkg")
    res = evaluate_stage(ref, tmp_path / "ref.gpkg", probs, tmp_path / "metrics.json")
    assert res["years"]["2020"]["pixel"]["f1"] == 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["overall"]["pixel"]["iou"] == 1.0


def test_reference_folder_and_errors(tmp_path):
    (tmp_path / "ref").mkdir()
    _gdf([box(0, 0, 1, 1)]).drop(columns="year").to_file(tmp_path / "ref" / "mines_2020.gpkg")
    assert list(read_reference(tmp_path / "ref").year) == [2020]
    _gdf([box(0, 0, 1, 1)]).drop(columns="year").to_file(tmp_path / "noyear.gpkg")
    with pytest.raises(InputError, match="noyear.gpkg: reference needs a 'year' column"):
        read_reference(tmp_path / "noyear.gpkg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no vector files named by year"):
        read_reference(tmp_path / "empty")


def test_reliability_known_answers():
    from minemap.metrics import reliability
    from minemap.formats.rasters import LEVELS

    pos, neg = np.zeros(LEVELS + 1), np.zeros(LEVELS + 1)
    pos[LEVELS], neg[0] = 30, 70  # sure and right
    assert reliability(pos, neg)["ece"] == pytest.approx(0.0)
    pos[:], neg[:] = 0, 0
    pos[200], neg[200] = 50, 50  # says 0.8, right half the time
    rel = reliability(pos, neg)
    assert rel["ece"] == pytest.approx(0.3)
    assert rel["table"] == [{"bin": [0.8, 0.9], "pixels": 100, "mine_pixels": 50, "mean_probability": 0.8,
                             "observed": 0.5}]
    assert rel["mce"] == pytest.approx(0.3)


def test_maximum_calibration_error_sees_the_bins_of_the_mines():
    from minemap.metrics import reliability
    from minemap.formats.rasters import LEVELS

    pos, neg = np.zeros(LEVELS + 1), np.zeros(LEVELS + 1)
    neg[0] = 1_000_000  # sure background, right: the lowest bin holds nearly every pixel
    pos[LEVELS] = 900  # most mines sure and right
    pos[38], neg[38] = 80, 20  # says 0.15, a mine 80 % of the time: 9 % of the mine pixels
    pos[125], neg[125] = 1, 0  # says 0.5, always a mine, but 0.1 % of the mine pixels: too few to judge
    rel = reliability(pos, neg)
    assert rel["ece"] < 0.001  # the mean over pixels hides it
    assert rel["mce"] == pytest.approx(0.8 - 38 / LEVELS, abs=1e-9)


def test_platt_fit_recovers_scale_and_bias():
    from minemap.metrics import fit_platt

    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 200_000)
    truth = rng.uniform(size=z.size) < 1 / (1 + np.exp(-(0.4 * z - 1.0)))
    a, b = fit_platt(z, truth)
    assert a == pytest.approx(0.4, abs=0.02) and b == pytest.approx(-1.0, abs=0.03)
    assert fit_platt(z, np.zeros_like(truth)) == (1.0, 0.0)  # one class only: nothing to fit
    sep = fit_platt(np.array([-2.0, -1, 1, 2]), np.array([0, 0, 1, 1]))  # separable: bounded, not runaway
    assert np.isfinite(sep).all() and sep[0] <= 1e3


def test_metrics_json_has_calibration(probs, tmp_path):
    ref = gpd.GeoDataFrame({"year": [2020]}, geometry=[_px_box(10, 10, 30, 30)], crs="EPSG:4326")
    pred = gpd.GeoDataFrame({"year": [2020]}, geometry=[_px_box(10, 10, 30, 30)], crs="EPSG:4326")
    m = evaluate(pred, ref, probs)["years"]["2020"]["calibration"]
    # 200 mine pixels at 0.96 (all mine), 200 at 0.40 (all mine), 9,600 at 0 (none): gaps 0.04 and 0.60
    assert m["ece"] == pytest.approx((200 * 0.04 + 200 * 0.6) / 10_000, abs=1e-6)


def _grid_4326(tmp_path, year, west, south, cols, rows, step):
    q = np.full((rows, cols), 10, np.uint8)
    t = Affine(step, 0, west, 0, -step, south + rows * step)
    write_cog(tmp_path / "probs" / str(year) / "r000_c000.tif", q, Grid("EPSG:4326", t, cols, rows))
    return t


def _cell(t, c, r, n=1):
    x0, y0 = t @ (c, r)
    x1, y1 = t @ (c + n, r + n)
    return box(x0, y1, x1, y0)


def test_intervals_over_blocks_and_by_country(tmp_path):
    from minemap.metrics import block_bootstrap, pixel_statistics

    # identical blocks: every resample gives the same rates, so the interval is the point itself
    same = block_bootstrap(np.tile([3, 1, 1, 5], (20, 1)), pixel_statistics, 200)
    assert same["precision"] == pytest.approx([0.75, 0.75]) and same["f1"] == pytest.approx([0.75, 0.75])
    # blocks of 0.05 degrees (5.5 km: one pixel, one block each) across the Cote d'Ivoire - Ghana border
    t = _grid_4326(tmp_path, 2020, -5.0, 7.0, 80, 20, 0.05)
    rng = np.random.default_rng(0)
    ref_cells = [(c, r) for c in range(0, 80, 3) for r in range(0, 20, 3)]
    # the prediction finds most reference cells, misses some, adds some false ones: rates vary between blocks
    pred_cells = [cr for cr in ref_cells if rng.random() < 0.8] + [(c, r) for c in range(1, 80, 7)
                                                                      for r in range(1, 20, 5)]
    ref = _gdf([_cell(t, c, r) for c, r in ref_cells])
    pred = _gdf([_cell(t, c, r) for c, r in pred_cells])
    res = evaluate(pred, ref, tmp_path / "probs")
    px = res["years"]["2020"]["pixel"]
    lo, hi = px["ci95"]["f1"]
    assert lo < px["f1"] < hi and hi - lo > 0.02
    assert res["years"]["2020"]["blocks"]["n"] == 80 * 20
    assert res["overall"]["pixel"]["ci95"]["f1"] == pytest.approx([lo, hi])  # one year: the same resamples
    lo_o, hi_o = res["years"]["2020"]["object"]["ci95"]["recall"]
    assert lo_o <= res["years"]["2020"]["object"]["recall"] <= hi_o
    countries = res["by_country"]
    assert {"CIV", "GHA"} <= set(countries)
    assert sum(c["tp"] for c in countries.values()) == px["tp"]  # every block counted once
    for c in ("CIV", "GHA"):
        assert countries[c]["ci95"]["f1"][0] <= countries[c]["f1"] <= countries[c]["ci95"]["f1"][1]
    # one country only: no table by country
    one = evaluate(pred.iloc[:0], ref.iloc[:1], tmp_path / "probs")
    assert "by_country" not in one


def _split_blocks(tests, trains):
    geoms = [_px_box(*b) for b in tests + trains]
    return gpd.GeoDataFrame({"split": ["test"] * len(tests) + ["train"] * len(trains)}, geometry=geoms,
                            crs="EPSG:4326")


def test_unobserved_reference_counts_as_missed(tmp_path):
    q = np.zeros((100, 100), np.uint8)
    q[10:30, 10:30] = 240
    q[10:30, 20:30] = 255  # half of the mine has no observation (a cloud masked, or no imagery)
    write_cog(tmp_path / "probs" / "2020" / "r000_c000.tif", q, Grid("EPSG:3857", T, 100, 100))
    ref = _gdf([_px_box(10, 10, 30, 30)])
    pred = _gdf([_px_box(10, 10, 20, 30)])  # found where it was seen
    m = evaluate(pred, ref, tmp_path / "probs")["years"]["2020"]
    assert (m["pixel"]["tp"], m["pixel"]["fn"], m["pixel"]["fp"]) == (200, 200, 0)
    assert m["pixel"]["recall"] == pytest.approx(0.5)
    assert m["unobserved"] == {"reference_pixels": 400, "unobserved_pixels": 200, "reference_share": 0.5,
                               "found_share": 0.0}
    assert m["observed_only"]["pixel"]["recall"] == 1.0  # what the old figure said
    assert m["scope"].startswith("every pixel") and "all_blocks" not in m
    # an outline filled from the years beside over a quarter of the mine's unobserved half: found, not missed
    filled = evaluate(_gdf([_px_box(10, 10, 25, 30)]), ref, tmp_path / "probs")["years"]["2020"]
    assert (filled["pixel"]["tp"], filled["pixel"]["fn"]) == (300, 100)
    assert filled["unobserved"]["found_share"] == 0.5 and filled["unobserved"]["reference_share"] == 0.5


class _Imagery:
    """A source whose imagery lacks the mine's right quarter (the rest of the unobserved part was masked)."""

    def years(self):
        return [2020]

    def read(self, year, grid):
        valid = np.ones((grid.height, grid.width), bool)
        valid[10:30, 25:30] = False
        return np.zeros((4, grid.height, grid.width), np.float32), valid


def test_unobserved_split_into_no_imagery_and_masked(tmp_path):
    q = np.zeros((100, 100), np.uint8)
    q[10:30, 20:30] = 255
    write_cog(tmp_path / "probs" / "2020" / "r000_c000.tif", q, Grid("EPSG:3857", T, 100, 100))
    m = evaluate(_gdf([_px_box(10, 10, 20, 30)]), _gdf([_px_box(10, 10, 30, 30)]), tmp_path / "probs",
                 source=_Imagery())["years"]["2020"]
    assert m["unobserved"]["reference_share"] == 0.5
    assert m["unobserved"]["no_imagery_share"] == 0.25 and m["unobserved"]["masked_share"] == 0.25


def test_test_blocks_are_the_headline_and_the_rest_in_sample(probs):
    # the left half of the tile is a test block, the right half a training block
    splits = _split_blocks([(0, 0, 50, 100)], [(50, 0, 100, 100)])
    ref = _gdf([_px_box(10, 10, 30, 30), _px_box(60, 60, 70, 70)])
    pred = _gdf([_px_box(10, 10, 30, 30), _px_box(60, 60, 70, 70), _px_box(80, 80, 90, 90)])
    res = evaluate(pred, ref, probs, splits=splits)
    m = res["years"]["2020"]
    assert m["scope"].startswith("test blocks")
    assert (m["pixel"]["tp"], m["pixel"]["fp"], m["pixel"]["fn"]) == (400, 0, 0)  # the test block alone
    assert m["pixel"]["tp"] + m["pixel"]["tn"] == 50 * 100
    assert m["object"]["n_predicted"] == 1 and m["object"]["n_reference"] == 1
    every = m["all_blocks"]
    assert every["in_sample"] is True
    assert (every["pixel"]["tp"], every["pixel"]["fp"]) == (500, 100)  # the training block's false alarm
    assert res["overall"]["pixel"]["f1"] == 1.0 and res["overall"]["all_blocks"]["pixel"]["fp"] == 100
