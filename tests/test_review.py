"""Review export and import: priorities, the file a reviewer edits, its style and chips, and refusals."""

import xml.etree.ElementTree as ET

import geopandas as gpd
import numpy as np
import pytest
from shapely.geometry import box
from typer.testing import CliRunner

from minemap.cli import app
from minemap.errors import InputError
from minemap.review import REVIEW_COLUMNS, VERDICTS, import_review, qgis_style, read_verdicts, review_candidates


def _panel(rows):
    return gpd.GeoDataFrame([{"mine_id": m, "district_id": m, "year": y, "iso3": "GHA", "country": "Ghana",
                              "first_year": f, "area_km2": a, "mean_probability": p} for m, y, f, a, p, _ in rows],
                            geometry=[g for *_, g in rows], crs="EPSG:4326")


def test_priorities_on_known_cases():
    rows = [
        ("old", 2020, 2019, 1.0, 0.95, box(0, 0, 1, 1)),  # on a label, sure, seen before: nothing to check
        ("old", 2019, 2019, 1.0, 0.95, box(0, 0, 1, 1)),
        ("new", 2020, 2020, 0.5, 0.95, box(2, 0, 3, 1)),  # new this year, away from labels
        ("unsure", 2020, 2019, 0.2, 0.55, box(0, 2, 1, 3)),  # on a label, low confidence
        ("unsure", 2019, 2019, 0.2, 0.55, box(0, 2, 1, 3)),
    ]
    labels = gpd.GeoDataFrame(geometry=[box(0, 0, 1, 1), box(0, 2, 1, 3), box(9, 9, 10, 10)], crs="EPSG:4326")
    got = review_candidates(_panel(rows), 2020, labels, threshold=0.5)
    assert list(got.columns) == REVIEW_COLUMNS and list(got.review_id) == [1, 2, 3, 4]
    by = {(r.kind, r.mine_id): r for r in got.itertuples()}
    assert by[("detection", "new")].reasons == "away from labels; new this year"
    assert by[("detection", "new")].priority == 5 and got.iloc[0].mine_id == "new"  # first to look at
    assert by[("detection", "unsure")].reasons == "low confidence"
    assert by[("label", "")].reasons == "label not detected" and by[("label", "")].priority == 3
    assert by[("detection", "old")].reasons == "large" and got.iloc[-1].mine_id == "old"
    assert (got.verdict == "").all() and got.priority.is_monotonic_decreasing


def test_export_and_import_a_review(tiny_run, tmp_path):
    cfg, _ = tiny_run
    runner = CliRunner()
    out = tmp_path / "review"
    r = runner.invoke(app, ["review", "export", str(cfg.out), "--year", "2021", "--out", str(out)])
    assert r.exit_code == 0, r.output
    gpkg = out / "review_2021.gpkg"
    items = gpd.read_file(gpkg, layer="review")
    assert list(items.columns) == REVIEW_COLUMNS and len(items) > 0 and items.crs.to_epsg() == 4326
    assert items.priority.is_monotonic_decreasing and (items.verdict.fillna("") == "").all()
    chips = [c for c in items.chip if c]
    assert chips and all((out / c).is_file() and (out / c).stat().st_size > 1000 for c in chips)
    style = ET.fromstring((out / "review_2021.qml").read_text().split("\n", 1)[1])
    assert {c.get("value") for c in style.iter("category")} == {"", *VERDICTS}
    assert style.find(".//field[@name='verdict']/editWidget").get("type") == "ValueMap"
    # a reviewer's verdicts come back; a second review of one item replaces the first
    items.loc[0, "verdict"] = "not_mine"
    items.loc[1, "verdict"] = "mine"
    items.to_file(gpkg, layer="review", driver="GPKG")
    r = runner.invoke(app, ["review", "import", str(gpkg), "--run", str(tmp_path / "run")])
    assert r.exit_code == 0 and "not_mine 1" in r.output and "mine 1" in r.output, r.output
    items.loc[0, "verdict"] = "unsure"
    items.to_file(gpkg, layer="review", driver="GPKG")
    assert import_review(gpkg, tmp_path / "run") == {"mine": 1, "not_mine": 0, "unsure": 1}
    # refusals: unknown verdicts, another CRS, a year without mines
    items.loc[2, "verdict"] = "maybe"
    items.to_file(tmp_path / "bad.gpkg", layer="review", driver="GPKG")
    r = runner.invoke(app, ["review", "import", str(tmp_path / "bad.gpkg"), "--run", str(tmp_path / "run")])
    assert r.exit_code == 2 and "unknown verdict(s) 'maybe'" in r.output and "bad.gpkg" in r.output
    items.loc[2, "verdict"] = ""
    items.to_crs("EPSG:3857").to_file(tmp_path / "merc.gpkg", layer="review", driver="GPKG")
    with pytest.raises(InputError, match="EPSG:4326"):
        read_verdicts(tmp_path / "merc.gpkg")
    r = runner.invoke(app, ["review", "export", str(cfg.out), "--year", "2030"])
    assert r.exit_code == 2 and "no mines in 2030" in r.output


def test_style_is_xml_with_every_verdict():
    root = ET.fromstring(qgis_style().split("\n", 1)[1])
    assert root.tag == "qgis" and len(list(root.iter("symbol"))) == len(VERDICTS) + 1
    assert np.all([c.get("label") for c in root.iter("category")])
