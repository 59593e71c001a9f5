import geopandas as gpd
import pandas as pd
import pytest
from shapely.geometry import box

import numpy as np
import shapely

from minemap.config import PanelConfig
from minemap.errors import InputError
from minemap.geo import area_km2
from minemap.panel import build_panel, change_statistics, geohash, lineage_table, write_panel
from minemap.formats.panel import CHANGE_COLUMNS, EVENT_COLUMNS, LINEAGE_COLUMNS


def _pp(rows):
    return gpd.GeoDataFrame([{"year": y, "iso3": "GHA", "country": "Ghana"} for y, _ in rows],
                            geometry=[g for _, g in rows], crs="EPSG:4326")


def test_geohash_known_value():
    assert geohash(-5.6, 42.6, 5) == "ezs42"  # the example of geohash.org's documentation


def _ids(panel, year, x):
    """mine_id of the outline of ``year`` whose west edge is at ``x``."""
    rows = panel[(panel.year == year) & (panel.geometry.bounds.minx.round(6) == round(x, 6))]
    assert len(rows) == 1, rows
    return rows.mine_id.iloc[0]


def test_mine_ids_are_anchored_and_stable():
    mine_a = [(2019, box(0, 0, 0.01, 0.01)), (2020, box(0.0, 0, 0.02, 0.01)), (2021, box(0.0, 0, 0.02, 0.01))]
    mine_b = [(2020, box(1, 1, 1.01, 1.01)), (2021, box(1, 1, 1.01, 1.01))]
    panel, events, _ = build_panel(_pp(mine_a + mine_b))
    assert list(panel.columns) == ["mine_id", "district_id", "year", "iso3", "country", "first_year", "area_km2",
                                   "mean_probability", "provisional", "filled_share", "geometry"]
    assert panel.mine_id.nunique() == 2 and panel.groupby(["mine_id", "year"]).size().max() == 1
    a = panel[panel.mine_id == geohash(0.005, 0.005)]  # anchored inside its first outline
    assert list(a.year) == [2019, 2020, 2021] and set(a.first_year) == {2019}
    # adding a mine elsewhere does not change the others' ids
    more, _, _ = build_panel(_pp(mine_a + mine_b + [(2019, box(5, 5, 5.01, 5.01))]))
    assert set(panel.mine_id) < set(more.mine_id)
    # touching at an edge only is not an overlap
    touching, _, _ = build_panel(_pp([(2019, box(0, 0, 1, 1)), (2020, box(1, 0, 2, 1))]))
    assert touching.mine_id.nunique() == 2 and touching.district_id.nunique() == 2
    assert list(events.kind) == ["appeared", "appeared"]


def test_a_merge_continues_the_larger_overlap_and_ends_the_other():
    rows = [(2019, box(0, 0, 2, 1)), (2019, box(3, 0, 4, 1)),  # A (large), B
            (2020, box(0, 0, 4, 1))]  # one pit over both: overlaps A by 2, B by 1
    panel, events, _ = build_panel(_pp(rows))
    a, b = _ids(panel, 2019, 0), _ids(panel, 2019, 3)
    assert _ids(panel, 2020, 0) == a
    merged = events[events.kind == "merged"].iloc[0]
    assert (merged.year, merged.mine_id, merged.parent_ids, merged.child_ids) == (2020, a, f"{a};{b}", a)
    assert not (events.kind == "disappeared").any()  # B ended by the merge, not vanished
    lineage = lineage_table(panel, events).set_index("mine_id")
    assert lineage.loc[b, "last_year"] == 2019 and lineage.loc[a, "years"] == "2019;2020"


def test_a_split_starts_a_new_mine_from_its_parent():
    rows = [(2019, box(0, 0, 3, 1)),
            (2020, box(0, 0, 2, 1)), (2020, box(2.5, 0, 3, 1))]  # the larger part carries the mine on
    panel, events, _ = build_panel(_pp(rows))
    a = _ids(panel, 2019, 0)
    assert _ids(panel, 2020, 0) == a
    child = _ids(panel, 2020, 2.5)
    assert child != a
    split = events[events.kind == "split"].iloc[0]
    assert (split.year, split.mine_id, split.parent_ids, split.child_ids) == (2020, a, a, f"{a};{child}")
    lineage = lineage_table(panel, events).set_index("mine_id")
    assert lineage.loc[child, "split_from"] == a and lineage.loc[child, "first_year"] == 2020
    assert panel.district_id.nunique() == 1


def test_lineage_rows_of_known_mines():
    """Years spelt in order (by bit patterns, or one by one beyond 62 years), the largest outline's country (the
    earliest of equal ones), one row per mine sorted by id."""
    def panel_of(rows):
        return pd.DataFrame(rows, columns=["mine_id", "year", "area_km2", "iso3"]).assign(
            district_id="d", country=lambda d: d.iso3 + "-land")

    rows = [("b", 2021, 1.0, "AAA"), ("a", 2019, 2.0, "BBB"), ("b", 2016, 3.0, "CCC"), ("a", 2017, 2.0, "DDD"),
            ("b", 2024, 3.0, "EEE")]
    no_events = pd.DataFrame({c: pd.Series(dtype=str) for c in EVENT_COLUMNS})
    lin = lineage_table(panel_of(rows), no_events)
    assert list(lin.mine_id) == ["a", "b"] and list(lin.years) == ["2017;2019", "2016;2021;2024"]
    assert list(lin.iso3) == ["DDD", "CCC"] and list(lin.country) == ["DDD-land", "CCC-land"]
    assert list(lin.max_area_km2) == [2.0, 3.0] and list(lin.years_seen) == [2, 3]
    assert list(lin.first_year) == [2017, 2016] and list(lin.last_year) == [2019, 2024]
    many = [("m", y, 1.0, "AAA") for y in range(1950, 2030, 2)] + [("n", y, 1.0, "AAA") for y in range(1951, 2030, 2)]
    lin = lineage_table(panel_of(many), no_events)
    assert lin.years.tolist() == [";".join(map(str, range(1950, 2030, 2))), ";".join(map(str, range(1951, 2030, 2)))]


def test_a_gap_year_keeps_the_identity_up_to_max_gap():
    rows = [(2019, box(0, 0, 1, 1)), (2021, box(0, 0, 1, 1)),  # unseen in 2020
            (2019, box(5, 5, 6, 6)), (2020, box(5, 5, 6, 6)), (2021, box(5, 5, 6, 6)),  # keeps 2020 processed
            (2019, box(9, 9, 10, 10)), (2022, box(9, 9, 10, 10))]  # unseen two years
    rows += [(2022, box(5, 5, 6, 6))]
    panel, events, _ = build_panel(_pp(rows))
    assert _ids(panel, 2021, 0) == _ids(panel, 2019, 0)
    assert _ids(panel, 2022, 9) != _ids(panel, 2019, 9)  # a gap of two years: a new mine
    back = events[events.kind == "reappeared"]
    assert list(zip(back.year, back.mine_id)) == [(2021, _ids(panel, 2019, 0))]
    gone = events[events.kind == "disappeared"]
    assert set(zip(gone.year, gone.mine_id)) == {(2020, _ids(panel, 2019, 0)), (2020, _ids(panel, 2019, 9)),
                                                 (2022, _ids(panel, 2019, 0))}
    strict, _, _ = build_panel(_pp(rows), PanelConfig(max_gap=0))
    assert _ids(strict, 2021, 0) != _ids(strict, 2019, 0)
    wider, _, _ = build_panel(_pp(rows), PanelConfig(max_gap=2))
    assert _ids(wider, 2022, 9) == _ids(wider, 2019, 9)


def test_a_district_growing_together_stays_many_mines():
    """Ten pits, each growing a little every year until neighbours touch and fuse: connected components would
    make one 'mine' of them all; lineage keeps most pits as mines, with merge events, in one district."""
    rows = []
    for year in range(2016, 2025):
        grow = 0.06 * (year - 2016)  # gaps of 0.4 close in 2020
        pits = [box(i - grow, 0, i + 0.6 + grow, 1) for i in range(10)]
        rows += [(year, g) for g in shapely.get_parts(shapely.union_all(pits))]
    panel, events, _ = build_panel(_pp(rows))
    assert panel.district_id.nunique() == 1
    assert panel[panel.year == 2016].mine_id.nunique() == 10 and (panel.year == 2020).sum() == 1
    assert panel.groupby(["mine_id", "year"]).size().max() == 1
    merged = events[events.kind == "merged"]
    assert len(merged) == 1 and merged.year.iloc[0] == 2020 and len(merged.parent_ids.iloc[0].split(";")) == 10
    assert len(panel[panel.year == 2024]) == 1
    # the fused outline carries one of the pits on; the others merged into it
    assert panel[panel.year == 2024].mine_id.iloc[0] in set(panel[panel.year == 2016].mine_id)


def test_buffer_links_polygons_a_little_apart():
    rows = [(2019, box(0, 0, 0.01, 0.01)), (2020, box(0.0101, 0, 0.02, 0.01))]  # ~11 m apart at the equator
    apart, _, _ = build_panel(_pp(rows))
    assert apart.mine_id.nunique() == 2
    near, _, _ = build_panel(_pp(rows), PanelConfig(buffer_m=20))
    assert near.mine_id.nunique() == 1


def test_change_statistics_on_known_areas():
    """Squares in degrees near the equator, areas measured by the same km2 as area_km2."""
    rows = [(2019, box(0, 0, 0.1, 0.1)), (2019, box(1, 0, 1.1, 0.1)),  # P grows, Q is abandoned
            (2020, box(0, 0, 0.1, 0.15)),  # P + 50 %
            (2020, box(2, 0, 2.1, 0.1)),  # R is new
            (2021, box(0, 0, 0.1, 0.05)),  # P shrinks to a third
            (2021, box(2, 0, 2.1, 0.1))]
    rows_other = [(2019, box(30, 0, 30.1, 0.1)), (2020, box(30, 0, 30.1, 0.1)), (2021, box(30, 0, 30.1, 0.1))]
    polys = _pp(rows + rows_other)
    polys.loc[len(rows):, ["iso3", "country"]] = ["GAB", "Gabon"]
    panel, _, shared = build_panel(polys)
    ch = change_statistics(panel).set_index(["iso3", "year"])
    # the table build_panel makes from the tracking's overlap search is the one of a search of its own
    pd.testing.assert_frame_equal(shared.set_index(["iso3", "year"]), ch)
    sq = area_km2(np.array([box(0, 0, 0.1, 0.1)]))[0]  # ~123 km2
    gha20, gha21 = ch.loc[("GHA", 2020)], ch.loc[("GHA", 2021)]
    assert gha20.new_km2 == pytest.approx(sq, rel=1e-3)
    assert gha20.expanded_km2 == pytest.approx(sq / 2, rel=1e-3)
    assert gha20.abandoned_km2 == pytest.approx(sq, rel=1e-3) and gha20.shrunk_km2 == 0
    assert gha21.shrunk_km2 == pytest.approx(sq, rel=1e-3)  # 0.15 -> 0.05 degrees: one square lost
    assert gha21.new_km2 == 0 and gha21.expanded_km2 == 0 and gha21.abandoned_km2 == 0
    assert gha21.area_km2 == pytest.approx(1.5 * sq, rel=1e-3) and gha21.n_mines == 2
    # the books balance: area(t) = area(t-1) + new + expanded - shrunk - abandoned
    for (iso, year), row in ch.iterrows():
        if year > 2019:
            prev = ch.loc[(iso, year - 1), "area_km2"]
            assert row.area_km2 == pytest.approx(prev + row.new_km2 + row.expanded_km2 - row.shrunk_km2
                                                 - row.abandoned_km2, rel=1e-6)
    gab = ch.loc["GAB"]
    assert np.isnan(gab.loc[2019, "new_km2"]) and (gab.loc[[2020, 2021], ["new_km2", "abandoned_km2"]] == 0).all().all()


def test_panel_refuses_bad_polygons(tmp_path):
    from typer.testing import CliRunner

    from minemap.cli import app

    with pytest.raises(InputError, match="missing column"):
        build_panel(_pp([(2019, box(0, 0, 1, 1))]).drop(columns="iso3"))
    with pytest.raises(InputError, match="EPSG:4326"):
        build_panel(_pp([(2019, box(0, 0, 1, 1))]).set_crs("EPSG:3857", allow_override=True))
    bad = tmp_path / "bad.parquet"
    _pp([(2019, box(0, 0, 1, 1))]).drop(columns="year").to_parquet(bad)
    r = CliRunner().invoke(app, ["panel", str(bad), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "missing column(s) year" in r.output and str(bad) in r.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_panel_files(tmp_path):
    panel, events, _ = build_panel(_pp([(2019, box(0, 0, 0.01, 0.01)), (2020, box(0, 0, 0.01, 0.02))]))
    paths = write_panel(panel, events, tmp_path)
    back = gpd.read_parquet(paths["parquet"])
    assert back.crs.to_epsg() == 4326 and len(back) == 2
    assert "gpkg" not in paths  # other formats are exports (test_export.py)
    summary = pd.read_csv(paths["summary"])
    assert list(summary.columns) == ["iso3", "country", "year", "n_mines", "n_districts", "area_km2"]
    assert list(summary.n_mines) == [1, 1]
    assert summary.area_km2.iloc[1] == pytest.approx(2 * summary.area_km2.iloc[0], rel=1e-3)
    mines = pd.read_csv(paths["mines_csv"])
    assert list(mines.columns) == LINEAGE_COLUMNS and mines.years_seen.tolist() == [2]
    assert pd.read_parquet(paths["mines"]).equals(lineage_table(panel, events))
    ev = pd.read_csv(paths["events_csv"], keep_default_na=False)
    assert list(ev.columns) == EVENT_COLUMNS and list(ev.kind) == ["appeared"]
    changes = pd.read_parquet(paths["changes"])
    assert list(changes.columns) == CHANGE_COLUMNS
    assert changes.expanded_km2.iloc[1] == pytest.approx(summary.area_km2.iloc[0], rel=1e-3)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_tables_as_csv_read_back(tmp_path):
    """The CSV writer: a name holding a comma and quotes stays one field, floats come back to 6 places, missing
    values empty, whole numbers as integers."""
    from minemap.panel import write_csv

    table = pd.DataFrame({"iso3": ["BES", None], "country": ['Bonaire, Sint "Eustatius"', "(none)"],
                          "year": [2019, 2020], "area_km2": [0.123456789, np.nan]})
    write_csv(table, tmp_path / "t.csv")
    back = pd.read_csv(tmp_path / "t.csv")
    assert back.country.tolist() == table.country.tolist() and back.year.tolist() == [2019, 2020]
    assert back.area_km2.iloc[0] == 0.123457 and np.isnan(back.area_km2.iloc[1]) and pd.isna(back.iso3.iloc[1])
    assert not list(tmp_path.glob(".*tmp*"))


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


def _pair_cases():
    """Pairs (p, q) of every kind: nested both ways, equal, partly overlapping, sharing an edge, a corner, a
    stretch of edge inside the other's outline, apart; polygons with holes and concave outlines."""
    rng = np.random.default_rng(3)
    ring = shapely.Point(0, 0).buffer(1.0).difference(shapely.Point(0, 0).buffer(0.4))  # a pit with a hole
    concave = shapely.Polygon([(0, 0), (3, 0), (3, 3), (2, 3), (2, 1), (1, 1), (1, 3), (0, 3)])
    p = [box(0, 0, 2, 2), box(0.5, 0.5, 1, 1), box(0, 0, 2, 2), box(0, 0, 2, 2), box(0, 0, 2, 2), box(0, 0, 2, 2),
         box(0, 0, 2, 2), ring, ring, concave, concave]
    q = [box(0.5, 0.5, 1, 1), box(0, 0, 2, 2), box(0, 0, 2, 2), box(1, 1, 3, 3), box(2, 0, 3, 2), box(2, 2, 3, 3),
         box(5, 5, 6, 6), shapely.Point(0, 0).buffer(0.3), shapely.Point(0.7, 0).buffer(0.2), box(1.5, 0.5, 2.5, 4),
         box(1, 1, 2, 3)]
    for _ in range(40):  # random jittered outlines of one pit in two years
        c = rng.uniform(-1, 1, 2)
        p.append(shapely.Point(0, 0).buffer(rng.uniform(0.5, 1.5), quad_segs=4))
        q.append(shapely.Point(*c).buffer(rng.uniform(0.5, 1.5), quad_segs=5))
    return np.array(p, dtype=object), np.array(q, dtype=object)


def test_overlap_shortcuts_agree_with_the_full_geometry():
    from minemap.geo import polygons_meet
    from minemap.panel import _overlap

    p, q = _pair_cases()
    geoms = np.concatenate([p, q])
    a, b = np.arange(len(p)), np.arange(len(p), 2 * len(p))
    expected_meet = shapely.intersects(p, q) & ~shapely.touches(p, q)
    assert list(polygons_meet(p, q, interiors=True)) == list(expected_meet)
    assert list(polygons_meet(p, q)) == list(shapely.intersects(p, q))  # the temporal rule's: touching counts
    assert polygons_meet(p, q)[4] and polygons_meet(p, q)[5]
    assert not expected_meet[4] and not expected_meet[5] and expected_meet[9]  # edge, corner; a stretch inside
    area = _overlap(geoms, a, b, 0.0)
    assert np.allclose(area, shapely.area(shapely.intersection(p, q)), rtol=1e-12, atol=1e-15)
    assert area[0] == pytest.approx(0.25) and area[7] == pytest.approx(0.0, abs=1e-12)  # the hole: no overlap
