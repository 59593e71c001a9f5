import json

import geopandas as gpd
import pandas as pd
import pyogrio
import pytest
from shapely.geometry import box
from typer.testing import CliRunner

from minemap.cli import app
from minemap.errors import InputError
from minemap.export import export
from minemap.panel import build_panel, read_study_polygons, write_panel
from minemap.formats.panel import CHANGE_COLUMNS, EVENT_COLUMNS, LINEAGE_COLUMNS, PANEL_COLUMNS


def _panel_dir(tmp_path):
    rows = [(2019, box(-1.0, 6.0, -0.99, 6.01), "GHA", "Ghana"), (2020, box(-1.0, 6.0, -0.985, 6.01), "GHA", "Ghana"),
            (2020, box(-52.0, 4.0, -51.99, 4.01), None, "France")]
    polys = gpd.GeoDataFrame({"year": [r[0] for r in rows], "iso3": [r[2] for r in rows],
                              "country": [r[3] for r in rows]}, geometry=[r[1] for r in rows], crs="EPSG:4326")
    panel, events, _ = build_panel(polys)
    d = tmp_path / "run"
    write_panel(panel, events, d)
    return d, panel


def test_every_format_and_the_study_layout(tmp_path):
    run, panel = _panel_dir(tmp_path)
    (run / "metrics.json").write_text(json.dumps({"years": {
        "2019": {"pixel": {"precision": 0.9, "recall": 0.8, "f1": 0.847}},
        "2020": {"pixel": {"precision": 0.9, "recall": 0.8, "f1": 0.847, "ci95": {"f1": [0.801, 0.889]}}}}}))
    paths = export(run, tmp_path / "out", run_dir=run, licence="ODbL-1.0")
    assert set(paths) == {"gpkg", "fgb", "csv", "study", "card"}
    assert [layer for layer, _ in pyogrio.list_layers(paths["gpkg"])] == ["mines_2019", "mines_2020"]
    fgb = gpd.read_file(paths["fgb"])
    assert len(fgb) == 3 and fgb.crs.to_epsg() == 4326 and set(fgb.year) == {2019, 2020}
    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns) == PANEL_COLUMNS[:-1] + ["lon", "lat"] and len(csv) == 3
    assert csv.lon.between(-52.1, -0.9).all() and csv.lat.between(3.9, 6.1).all()
    files = sorted(p.name for p in paths["study"].iterdir())
    assert files == ["global_mining_polygons_predicted_2019_postprocessed.gpkg",
                     "global_mining_polygons_predicted_2020_postprocessed.gpkg"]
    y20 = gpd.read_file(paths["study"] / files[1])
    assert list(y20.columns) == ["id", "iso_a3", "country_name", "year", "area", "geometry"]
    assert y20.crs.to_epsg() == 4326 and sorted(y20.iso_a3) == ["-99", "GHA"]  # the study's code for "none"
    km2 = panel[panel.year == 2020].sort_values("iso3", na_position="first").area_km2.to_numpy()
    assert sorted(y20["area"]) == pytest.approx(sorted(km2 * 1e6), rel=1e-9)  # m2
    # a drop-in: minemap reads its own study layout back as the same polygons
    back = read_study_polygons([paths["study"]])
    assert len(back) == 3 and back.iso3.isna().sum() == 1
    card = paths["card"].read_text()
    for col in PANEL_COLUMNS + LINEAGE_COLUMNS + EVENT_COLUMNS + CHANGE_COLUMNS:
        assert f"`{col}`" in card
    assert "ODbL-1.0" in card and "| 2019 | 0.900 | 0.800 | 0.847 |" in card and "0.847 (0.801-0.889)" in card and "Sepin" in card
    assert "`study/`" in card and "`panel.fgb`" in card
    few = export(run, tmp_path / "few", ["csv", "card"], run_dir=run)["card"].read_text()
    assert "`panel.csv`" in few and "`study/`" not in few and "`panel.fgb`" not in few  # lists what is there
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_export_refuses_what_is_not_a_panel(tmp_path):
    bad = tmp_path / "bad.parquet"
    gpd.GeoDataFrame({"year": [2019]}, geometry=[box(0, 0, 1, 1)], crs="EPSG:4326").to_parquet(bad)
    with pytest.raises(InputError, match="missing panel column"):
        export(bad, tmp_path / "out")
    r = CliRunner().invoke(app, ["export", str(bad), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and str(bad) in r.output and "missing panel column(s) mine_id" in r.output
    r = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "no panel here" in r.output
    run, _ = _panel_dir(tmp_path)
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "out"), "--formats", "gpkg,shp"])
    assert r.exit_code == 2 and "unknown export format(s) shp" in r.output
    assert not (tmp_path / "out").exists()


def test_provisional_mine_years_are_counted_and_kept_out_of_the_study_layout(tmp_path):
    polys = gpd.GeoDataFrame({"year": [2019, 2020, 2020], "iso3": ["GHA"] * 3, "country": ["Ghana"] * 3,
                              "provisional": [False, False, True]},
                             geometry=[box(-1.0, 6.0, -0.99, 6.01), box(-1.0, 6.0, -0.985, 6.01),
                                       box(-1.2, 6.2, -1.19, 6.21)], crs="EPSG:4326")
    panel, events, _ = build_panel(polys)
    assert list(panel.sort_values(["year", "provisional"]).provisional) == [False, False, True]
    run = tmp_path / "run"
    write_panel(panel, events, run)
    paths = export(run, tmp_path / "out", ["gpkg", "study", "card"], run_dir=run)
    assert len(gpd.read_file(paths["study"] / "global_mining_polygons_predicted_2020_postprocessed.gpkg")) == 1
    assert gpd.read_file(paths["gpkg"], layer="mines_2020").provisional.sum() == 1  # the panel keeps it, marked
    card = paths["card"].read_text()
    assert "| 2020 | 2 |" in card and "| 1, " in card and "1 mine-years are provisional" in card


def test_an_unreadable_accuracy_is_said_in_the_card_not_left_out(tmp_path, caplog):
    """metrics.json that is there but cannot be read (cut short, or not minemap's) gives a card that says the
    accuracy could not be read and why, never a card without the section as if no reference had been given;
    an unreadable model card or threshold record is named likewise."""
    import logging

    run, _ = _panel_dir(tmp_path)
    no_reference = "No reference was given"
    card = export(run, tmp_path / "none", ["card"], run_dir=run)["card"].read_text()
    assert no_reference in card and "could not be read" not in card  # no metrics.json: nothing to read
    (run / "metrics.json").write_text('{"years": {"2019": {"pixel": {"precision": 0.9')  # cut short
    with caplog.at_level(logging.WARNING, logger="minemap"):
        card = export(run, tmp_path / "cut", ["card"], run_dir=run)["card"].read_text()
    accuracy = card.split("## Accuracy", 1)[1].split("## Columns", 1)[0]
    assert "**The accuracy could not be read** from `" in accuracy and "metrics.json` (JSONDecodeError:" in accuracy
    assert no_reference not in accuracy and "| year | precision" not in accuracy
    assert "metrics.json: cannot be read" in caplog.text
    (run / "metrics.json").write_text(json.dumps({"years": {"2019": {"pixel": [0.9, 0.8]}}}))  # not minemap's form
    card = export(run, tmp_path / "form", ["card"], run_dir=run)["card"].read_text()
    assert "could not be read** from" in card and "holds no per-year accuracy in the form minemap writes" in card
    (run / "metrics.json").write_text(json.dumps([1, 2]))
    card = export(run, tmp_path / "list", ["card"], run_dir=run)["card"].read_text()
    assert "(not a JSON object but a list)" in card
    (run / "model").mkdir()
    (run / "model" / "model.json").write_bytes(b"\xff\xfe not text")
    (run / "threshold.json").write_text("{")
    card = export(run, tmp_path / "model", ["card"], run_dir=run)["card"].read_text()
    assert "- Model: its card `" in card and "model.json` could not be read (UnicodeDecodeError:" in card
    assert "- Threshold: its record `" in card and "threshold.json` could not be read (JSONDecodeError:" in card


def test_the_card_says_how_the_model_was_validated_and_each_years_f1(tmp_path):
    """A model validated on every year it saw (train.validation_years = "shown") has its validation and each
    year's F1 at the threshold in the dataset card; one validated on the labels' year says that alone."""
    run, _ = _panel_dir(tmp_path)
    (run / "model").mkdir()
    shown = "blocks, wall to wall, in the labels' year and again in 2020 (changed ground left out); chosen on all " \
            "of them pooled"
    card = {"encoder": "mit-b0", "train_year": 2019, "chip_size": 256, "gsd_m": 4.77, "epochs_trained": 3,
            "stopped": "at the cap of 3 epochs", "calibration": {"method": "platt"},
            "selection": {"training": "the training chips", "validation": shown},
            "val_metrics": {"f1": 0.8, "by_year": {"2019": {"f1": 0.9}, "2020": {"f1": 0.7}}}}
    (run / "model" / "model.json").write_text(json.dumps(card))
    text = export(run, tmp_path / "shown", ["card"], run_dir=run)["card"].read_text()
    assert f"- Validation: {shown}; F1 at the threshold by year: 2019 0.900, 2020 0.700.\n" in text
    card["selection"]["validation"] = "blocks, wall to wall"
    del card["val_metrics"]["by_year"]
    (run / "model" / "model.json").write_text(json.dumps(card))
    assert "- Validation: blocks, wall to wall.\n" in export(run, tmp_path / "labels", ["card"],
                                                             run_dir=run)["card"].read_text()


def test_a_panel_from_before_filled_share_is_read_with_nothing_filled(tmp_path):
    from minemap.formats.panel import read_panel

    run, panel = _panel_dir(tmp_path)
    old = panel.drop(columns="filled_share")
    old.to_parquet(run / "panel.parquet")
    back = read_panel(run)
    assert list(back.columns) == PANEL_COLUMNS and (back.filled_share == 0).all()
    paths = export(run, tmp_path / "out", formats=("csv", "card"))
    assert (pd.read_csv(paths["csv"]).filled_share == 0).all()
    assert "filled from the years beside" not in paths["card"].read_text()
    # outlines filled under a cloud: the card gives the km2 filled per year
    filled = panel.assign(filled_share=[0.0, 0.5, 0.0])
    filled.to_parquet(run / "panel.parquet")
    card = export(run, tmp_path / "out2", formats=("card",))["card"].read_text()
    km2 = float((filled.area_km2 * filled.filled_share).sum())
    assert "Unobserved ground filled from the years beside it" in card
    assert f"{int(filled.year[filled.filled_share > 0].iloc[0])} {km2:,.2f} km2" in card
