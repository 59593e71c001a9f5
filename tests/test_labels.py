import geopandas as gpd
import numpy as np
import pytest
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box

from minemap.errors import InputError
from minemap.labels import labels_stage, read_labels

from conftest import SHARED


def _gdf(geoms, crs="EPSG:4326", **cols):
    return gpd.GeoDataFrame(cols, geometry=list(geoms), crs=crs)


@pytest.mark.skipif(not SHARED.exists(), reason="shared literature sample not present")
def test_literature_sample_reads_clean(tmp_path):
    gdf, report = read_labels([SHARED])
    assert report.read[str(SHARED)] == 100
    assert len(gdf) == report.kept and report.kept >= 100 - report.dropped_duplicates
    assert gdf.crs.to_epsg() == 4326
    assert gdf.geometry.is_valid.all() and (gdf.geom_type == "Polygon").all()
    # the polygon touching the antimeridian survives, valid and with its area
    east = gdf[gdf.geometry.bounds.maxx > 179.9]
    assert len(east) == 1 and east.geometry.iloc[0].area > 0
    assert set(gdf.columns) >= {"label_id", "source", "source_id", "geometry"}
    dest = labels_stage([SHARED], tmp_path / "labels.parquet")
    assert gpd.read_parquet(tmp_path / "labels.parquet").shape[0] == dest.kept


def test_repair_explode_drop_and_count(tmp_path):
    bowtie = Polygon([(0, 0), (1, 1), (1, 0), (0, 1)])  # self-intersecting: two triangles once repaired
    multi = MultiPolygon([box(2, 0, 3, 1), box(4, 0, 5, 1)])
    with_hole = Polygon(box(6, 0, 9, 3).exterior.coords, [box(7, 1, 8, 2).exterior.coords])
    src = _gdf([bowtie, multi, Point(0, 0), LineString([(0, 0), (1, 1)]), with_hole, None], id=list("abcdef"))
    src.to_file(tmp_path / "a.gpkg")
    gdf, report = read_labels([tmp_path / "a.gpkg"])
    assert report.repaired_invalid == 1
    assert report.dropped_non_polygon == 2
    assert report.dropped_empty == 1
    assert report.parts_from_multipolygons == 2  # bowtie 1 -> 2, multi 1 -> 2
    assert len(gdf) == 5
    assert gdf.geometry.is_valid.all() and (gdf.geom_type == "Polygon").all()
    hole = gdf[gdf.source_id == "e"].geometry.iloc[0]
    assert len(hole.interiors) == 1 and hole.area == pytest.approx(8.0)


def test_duplicates_across_sources_dropped(tmp_path):
    a = box(0, 0, 0.01, 0.01)
    near = box(0, 0, 0.01, 0.0102)  # IoU ~0.98
    half = box(0.005, 0, 0.015, 0.01)  # IoU 1/3: a different polygon
    _gdf([a, box(1, 1, 1.01, 1.01)]).to_file(tmp_path / "one.geojson", driver="GeoJSON")
    _gdf([a, near, half]).to_parquet(tmp_path / "two.parquet")
    gdf, report = read_labels([tmp_path / "one.geojson", tmp_path / "two.parquet"])
    assert report.dropped_duplicates == 2
    assert len(gdf) == 3
    assert sorted(gdf.source) == ["one", "one", "two"]


def test_reprojected_to_4326(tmp_path):
    _gdf([box(500000, 0, 501000, 1000)], crs="EPSG:32630").to_file(tmp_path / "utm.gpkg")
    gdf, _ = read_labels([tmp_path / "utm.gpkg"])
    assert gdf.crs.to_epsg() == 4326
    minx, miny, maxx, maxy = gdf.total_bounds
    assert minx == pytest.approx(-3.0, abs=1e-6) and maxx == pytest.approx(-3.0 + 1000 / 111320, abs=1e-3)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.gpkg: file not found"):
        read_labels([tmp_path / "missing.gpkg"])
    (tmp_path / "empty.gpkg").write_bytes(b"")
    with pytest.raises(InputError, match="empty.gpkg: file is empty"):
        read_labels([tmp_path / "empty.gpkg"])
    (tmp_path / "junk.geojson").write_text("{not json")
    with pytest.raises(InputError, match="junk.geojson: not a readable vector file"):
        read_labels([tmp_path / "junk.geojson"])
    _gdf([box(0, 0, 1, 1)], crs=None).to_file(tmp_path / "nocrs.shp")
    with pytest.raises(InputError, match="nocrs.shp: has no CRS"):
        read_labels([tmp_path / "nocrs.shp"])
    _gdf([Point(0, 0)]).to_file(tmp_path / "points.gpkg")
    with pytest.raises(InputError, match="points.gpkg: has no polygons"):
        read_labels([tmp_path / "points.gpkg"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="x.csv: unsupported vector format"):
        read_labels([tmp_path / "x.csv"])


def test_latitude_filter(tmp_path):
    _gdf([box(0, 0, 0.1, 0.1), box(0, 40, 0.1, 40.1)]).to_file(tmp_path / "l.gpkg")
    gdf, report = read_labels([tmp_path / "l.gpkg"], max_abs_lat=30)
    assert len(gdf) == 1 and report.dropped_outside_latitude == 1
    assert np.allclose(shapely.get_y(shapely.centroid(gdf.geometry.values)), 0.05)


def test_large_frames_written_in_row_groups_read_back_the_same(tmp_path, monkeypatch):
    import json

    import pandas as pd
    import pyarrow.parquet as pq

    import minemap.formats.vectors as labels_mod

    monkeypatch.setattr(labels_mod, "PARQUET_CHUNK_ROWS", 4)
    n = 10
    gdf = gpd.GeoDataFrame({
        "year": np.arange(n, dtype=np.int64),
        "iso3": [None] * 5 + ["GHA"] * 5,  # no value in the first row group: its type comes from the whole
        "area_km2": np.linspace(0.1, 1.0, n),
    }, geometry=[box(i, -i, i + 1, -i + 0.5) for i in range(n)], crs="EPSG:4326")
    gdf.loc[3, "geometry"] = MultiPolygon([box(20, 20, 21, 21), box(22, 22, 23, 23)])
    path = labels_mod.write_geoparquet(gdf, tmp_path / "big.parquet")
    assert pq.ParquetFile(path).num_row_groups == 3
    back = gpd.read_parquet(path)
    chunked = labels_mod.read_geoparquet(path)  # read in batches of 4 rows: the same frame
    pd.testing.assert_frame_equal(pd.DataFrame(chunked.drop(columns="geometry")), pd.DataFrame(back.drop(columns="geometry")))
    assert chunked.crs == back.crs and chunked.geometry.geom_equals_exact(back.geometry, 0).all()
    pd.testing.assert_frame_equal(pd.DataFrame(back.drop(columns="geometry")), pd.DataFrame(gdf.drop(columns="geometry")))
    assert back.crs.to_epsg() == 4326 and back.geometry.geom_equals(gdf.geometry).all()
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])["columns"]["geometry"]
    assert geo["bbox"] == pytest.approx(list(gdf.total_bounds))  # of every row group, not the first
    assert geo["geometry_types"] == ["MultiPolygon", "Polygon"]
    # small frames, and frames with an index of their own, are written in one piece as before
    small = labels_mod.write_geoparquet(gdf.iloc[:3], tmp_path / "small.parquet")
    assert pq.ParquetFile(small).num_row_groups == 1
