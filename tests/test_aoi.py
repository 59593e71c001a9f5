"""Areas of interest: parsed from every kind of spec, and prediction limited to the tiles that touch them."""

from __future__ import annotations

import json
import shutil

import geopandas as gpd
import pytest
import shapely
from pyproj import Transformer

from minemap.aoi import TROPICS, aoi_in, parse_aoi
from minemap.config import PredictConfig
from minemap.errors import ImageryError, InputError
from minemap.grid import make_tiles
from minemap.imagery import open_imagery
from minemap.manifest import Manifest
from minemap.predict import EMPTY, predict


def test_specs():
    assert parse_aoi("-1.5, 5, -1, 5.5").bounds == (-1.5, 5, -1, 5.5)
    assert parse_aoi([10, -2, 11, -1]).bounds == (10, -2, 11, -1)
    assert parse_aoi("tropics").bounds == TROPICS
    gha = parse_aoi("GHA")
    assert gha.contains(shapely.Point(-1.6, 6.7)) and not gha.contains(shapely.Point(2.4, 6.4))  # Kumasi; Benin
    two = parse_aoi("gha, civ")
    assert two.contains(shapely.Point(-5.3, 7.5)) and two.area > gha.area


@pytest.mark.parametrize("spec, message", [
    ("XYZ", "unknown country code"), ("GHA,QQQ", "QQQ"), ("5,1,4,2", "west < east"),
    ("nowhere.gpkg", "no such file"), ("labels:100", "needs labels"), ("", "expected a bbox"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(InputError, match=message) as e:
        parse_aoi(spec)
    assert "\n" not in str(e.value)


def test_around_labels_and_from_a_file(tmp_path):
    labels = gpd.GeoDataFrame(geometry=[shapely.box(-1.0, 6.0, -0.99, 6.01)], crs="EPSG:4326")
    grown = parse_aoi("labels:1000", labels=labels)
    # about 1 km (0.009 degrees) all round at 6 N
    w, s, e, n = grown.bounds
    assert w == pytest.approx(-1.009, abs=0.0005) and n == pytest.approx(6.019, abs=0.0005)
    path = tmp_path / "area.gpkg"
    labels.to_crs("EPSG:32630").to_file(path)  # another CRS: read back in EPSG:4326
    assert parse_aoi(str(path)).symmetric_difference(labels.geometry[0]).area < 1e-3 * labels.geometry[0].area
    (tmp_path / "empty.gpkg").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        parse_aoi(str(tmp_path / "empty.gpkg"))


def test_aoi_in_a_utm_grid_is_cut_to_the_footprint_first():
    # the tropics projected to a UTM zone would break down far from the zone: only the grid's footprint is taken
    bounds = (600000.0, 600000.0, 650000.0, 650000.0)
    part = aoi_in(parse_aoi("tropics"), "EPSG:32630", bounds)
    assert part is not None and part.is_valid
    assert shapely.box(*bounds).symmetric_difference(part).area < 1e-3 * shapely.box(*bounds).area
    assert aoi_in(parse_aoi("10,40,11,41"), "EPSG:32630", bounds) is None


def _scene_bbox(grid):
    t = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True)
    return t.transform_bounds(*grid.bounds)


def test_predict_only_the_tiles_of_the_aoi(scene, tmp_path, monkeypatch):
    from test_predict import PixelModel, _pixel_model_dir
    from minemap.model import load_model

    real_load = load_model
    monkeypatch.setattr("minemap.predict.load_model", lambda d, dev: (PixelModel(), real_load(d, dev)[1]))
    model_dir = _pixel_model_dir(scene, tmp_path)
    grid = open_imagery(scene.imagery).grid(2019)
    w, s, e, n = _scene_bbox(grid)
    corner = shapely.box(w, n - (n - s) * 0.1, w + (e - w) * 0.1, n)  # the north-west tenth of the scene
    cfg = PredictConfig(tile_size=64)
    outs = predict(model_dir, scene.imagery, [2019], tmp_path / "aoi", cfg, progress=False, aoi=corner)
    every = {t.tile_id for t in make_tiles(grid, 64)}
    names = {p.stem for p in outs}
    assert names and names < every and len(names) <= 4  # the tiles touching the corner, named as in a full run
    full = predict(model_dir, scene.imagery, [2019], tmp_path / "full", cfg, progress=False)
    assert {p.stem for p in full} == every
    with pytest.raises(ImageryError, match="misses the imagery of every year"):
        predict(model_dir, scene.imagery, [2019], tmp_path / "far", cfg, progress=False,
                aoi=shapely.box(100, 10, 101, 11))


def test_tiles_without_imagery_are_skipped_and_counted(scene, tmp_path, monkeypatch):
    from test_predict import PixelModel, _pixel_model_dir
    from minemap.model import load_model

    real_load = load_model
    monkeypatch.setattr("minemap.predict.load_model", lambda d, dev: (PixelModel(), real_load(d, dev)[1]))
    model_dir = _pixel_model_dir(scene, tmp_path)
    imagery = tmp_path / "imagery"
    shutil.copytree(scene.imagery, imagery)
    quads = sorted((imagery / "2019").glob("*.tif"))
    quads[0].unlink()  # a quarter of the scene has no imagery
    cfg = PredictConfig(tile_size=64)
    outs = predict(model_dir, imagery, [2019], tmp_path / "probs", cfg, progress=False)
    counts = json.loads((tmp_path / "probs" / "tiles.json").read_text())["2019"]
    grid = open_imagery(imagery).grid(2019)
    assert counts["tiles"] == len(make_tiles(grid, 64)) == counts["predicted"] + counts["no_imagery"]
    assert counts["no_imagery"] >= 4 and len(outs) == counts["predicted"]
    # recorded as done: a rerun reads nothing again
    m = Manifest(tmp_path / "probs" / "manifest.jsonl")
    assert sum(v.endswith(EMPTY) for _, v in m.items()) == counts["no_imagery"]
    monkeypatch.setattr("minemap.predict._predict_unit", lambda u: pytest.fail("a finished unit was redone"))
    again = predict(model_dir, imagery, [2019], tmp_path / "probs", cfg, progress=False)
    assert again == outs
