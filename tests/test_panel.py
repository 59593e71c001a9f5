import geopandas as gpd
import pandas as pd
import pyogrio
import pytest
from shapely.geometry import box

from minemap.panel import build_panel, geohash, write_panel


def _pp(rows):
    return gpd.GeoDataFrame([{"year": y, "iso3": "GHA", "country": "Ghana"} for y, _ in rows],
                            geometry=[g for _, g in rows], crs="EPSG:4326")


def test_geohash_known_value():
    assert geohash(-5.6, 42.6, 5) == "ezs42"  # the example of geohash.org's documentation


def test_mine_ids_follow_overlaps_and_are_stable():
    mine_a = [(2019, box(0, 0, 0.01, 0.01)), (2020, box(0.005, 0, 0.02, 0.01)),
              (2020, box(0.0, 0.0, 0.004, 0.004)),  # mine A splits in two in 2020
              (2022, box(0.01, 0, 0.02, 0.01))]  # pauses in 2021, returns overlapping 2020
    mine_b = [(2020, box(1, 1, 1.01, 1.01)), (2021, box(1, 1, 1.01, 1.01))]
    panel = build_panel(_pp(mine_a + mine_b))
    assert panel.mine_id.nunique() == 2
    a_id = panel[panel.year == 2019].mine_id.iloc[0]
    a = panel[panel.mine_id == a_id].set_index("year")
    assert list(a.index) == [2019, 2020, 2022]
    assert a.loc[2020, "n_polygons"] == 2  # dissolved into one row per mine and year
    assert list(panel.columns) == ["mine_id", "year", "iso3", "country", "area_km2", "n_polygons", "geometry"]
    # adding a third mine elsewhere does not change the others' ids
    more = build_panel(_pp(mine_a + mine_b + [(2019, box(5, 5, 5.01, 5.01))]))
    assert set(panel.mine_id) < set(more.mine_id)
    # touching at an edge only is not an overlap
    touching = build_panel(_pp([(2019, box(0, 0, 1, 1)), (2020, box(1, 0, 2, 1))]))
    assert touching.mine_id.nunique() == 2


def test_exports(tmp_path):
    panel = build_panel(_pp([(2019, box(0, 0, 0.01, 0.01)), (2020, box(0, 0, 0.01, 0.02))]))
    paths = write_panel(panel, tmp_path)
    back = gpd.read_parquet(paths["parquet"])
    assert back.crs.to_epsg() == 4326 and len(back) == 2
    assert [layer for layer, _ in pyogrio.list_layers(paths["gpkg"])] == ["mines_2019", "mines_2020"]
    summary = pd.read_csv(paths["summary"])
    assert list(summary.columns) == ["iso3", "country", "year", "n_mines", "n_polygons", "area_km2"]
    assert list(summary.n_mines) == [1, 1] and list(summary.n_polygons) == [1, 1]
    assert summary.area_km2.iloc[1] == pytest.approx(2 * summary.area_km2.iloc[0], rel=1e-3)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_the_published_study_files_become_a_panel(tmp_path):
    """The study's per-year GeoPackages (id, iso_a3, country_name, year, area; a multipolygon, Natural Earth's -99)
    get mine identities across years and a summary, without imagery; the _buffer variants are left out."""
    from shapely.geometry import MultiPolygon
    from typer.testing import CliRunner

    from minemap.cli import app

    folder = tmp_path / "gpkg"
    folder.mkdir()
    rows = {2019: [box(-1.0, 6.0, -0.99, 6.01), MultiPolygon([box(-52.0, 4.0, -51.99, 4.01),
                                                              box(-51.98, 4.0, -51.97, 4.01)])],
            2020: [box(-0.995, 6.0, -0.985, 6.01)]}
    for year, geoms in rows.items():
        gdf = gpd.GeoDataFrame({"id": range(len(geoms)), "iso_a3": ["GHA", "-99"][:len(geoms)],
                                "country_name": ["Ghana", "France"][:len(geoms)], "year": year,
                                "area": [1.0] * len(geoms)}, geometry=geoms, crs="EPSG:4326")
        gdf.to_file(folder / f"global_mining_polygons_predicted_{year}_postprocessed.gpkg")
        gdf.to_file(folder / f"global_mining_polygons_predicted_{year}_postprocessed_buffer.gpkg")
    r = CliRunner().invoke(app, ["panel", str(folder), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    panel = gpd.read_parquet(tmp_path / "out" / "panel.parquet")
    ghana = panel[panel.iso3 == "GHA"]
    assert len(ghana) == 2 and ghana.mine_id.nunique() == 1  # the same mine in 2019 and 2020
    guiana = panel[panel.country == "France"]
    assert len(guiana) == 2 and guiana.iso3.isna().all() and guiana.mine_id.nunique() == 2  # two parts, no code
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert set(summary.year) == {2019, 2020}
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = CliRunner().invoke(app, ["panel", str(empty), "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "no global_mining_polygons_predicted_<year>_postprocessed.gpkg" in bad.output
