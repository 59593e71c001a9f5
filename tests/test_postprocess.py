import geopandas as gpd
import numpy as np
import pytest
from pyproj import Geod
from shapely.geometry import box

from minemap.config import PostprocessConfig
from minemap.errors import InputError
from minemap.geo import area_km2
from minemap.postprocess import attribute_countries, load_countries, postprocess, temporal_filter

DEG_PER_M = 1 / 111_320  # at the equator


def _polys(rows):
    return gpd.GeoDataFrame([{"year": y, "name": n} for y, n, _ in rows], geometry=[g for *_, g in rows],
                            crs="EPSG:4326")


def test_temporal_rule_of_the_study():
    a = box(0, 0, 0.01, 0.01)
    rows = [
        (2019, "a19", a), (2020, "a20", a), (2021, "a21", a),  # persistent
        (2019, "lonely19", box(1, 1, 1.01, 1.01)),  # no neighbour-year overlap: dropped
        (2021, "only_first_and_last", box(2, 2, 2.01, 2.01)), (2019, "far_year", box(2, 2, 2.01, 2.01)),
        (2020, "b20", box(3, 3, 3.01, 3.01)), (2021, "b21", box(3.005, 3, 3.02, 3.01)),  # overlap next year
    ]
    kept = set(temporal_filter(_polys(rows)).name)
    # 2019 and 2021 are not adjacent: a polygon present in those two years alone is dropped in both
    assert kept == {"a19", "a20", "a21", "b20", "b21"}


def test_buffer_is_in_metres():
    gap_m = 30
    left = box(0, 0, 0.001, 0.001)
    right = box(0.001 + gap_m * DEG_PER_M, 0, 0.003, 0.001)
    rows = [(2019, "l", left), (2020, "r", right)]
    assert len(temporal_filter(_polys(rows), buffer_m=10)) == 0
    assert len(temporal_filter(_polys(rows), buffer_m=40)) == 2


def test_area_on_the_ellipsoid():
    # a 0.01 x 0.01 degree square at the equator: compare with pyproj.Geod
    sq = box(10, 0, 10.01, 0.01)
    expected = abs(Geod(ellps="WGS84").geometry_area_perimeter(sq)[0]) / 1e6
    assert area_km2(np.array([sq]))[0] == pytest.approx(expected, rel=1e-4)
    # self-intersecting input is made valid before its area is taken
    from shapely.geometry import Polygon

    bowtie = Polygon([(0, 0), (0.01, 0.01), (0.01, 0), (0, 0.01)])
    assert area_km2(np.array([bowtie]))[0] > 0


def test_countries_by_largest_overlap():
    countries = load_countries()
    rows = [
        (2019, "french_guiana", box(-53.0, 4.0, -52.99, 4.01)),
        (2019, "ghana", box(-1.95, 6.2, -1.94, 6.21)),
        (2019, "offshore_ghana", box(-1.0, 4.9, -0.99, 4.91)),  # just off the 1:110m coastline
        (2019, "mid_atlantic", box(-30, 0, -29.99, 0.01)),
    ]
    out = attribute_countries(_polys(rows), countries).set_index("name")
    assert out.loc["french_guiana", "iso3"] == "FRA"  # not -99 as in the published pipeline
    assert out.loc["ghana", "iso3"] == "GHA" and out.loc["ghana", "country"] == "Ghana"
    assert out.loc["offshore_ghana", "iso3"] == "GHA"
    assert out.loc["mid_atlantic", "iso3"] is None


def test_custom_country_file_and_straddling_polygon(tmp_path):
    custom = gpd.GeoDataFrame({"ISO_A3": ["AAA", "-99"], "ADM0_A3": ["AAA", "BBB"], "NAME": ["Aland", "Bland"]},
                              geometry=[box(0, 0, 1, 1), box(1, 0, 2, 1)], crs="EPSG:4326")
    custom.to_file(tmp_path / "countries.gpkg")
    rows = [(2019, "mostly_b", box(0.9, 0.5, 1.2, 0.6)), (2020, "mostly_b", box(0.9, 0.5, 1.2, 0.6))]
    out = postprocess(_polys(rows), PostprocessConfig(countries=tmp_path / "countries.gpkg"))
    assert list(out.iso3) == ["BBB", "BBB"] and list(out.country) == ["Bland", "Bland"]
    assert list(out.columns) == ["year", "iso3", "country", "area_km2", "geometry"]
    gpd.GeoDataFrame({"foo": [1]}, geometry=[box(0, 0, 1, 1)], crs="EPSG:4326").to_file(tmp_path / "bad.gpkg")
    with pytest.raises(InputError, match="bad.gpkg: no country code or name column"):
        load_countries(tmp_path / "bad.gpkg")


def test_only_invalid_geometries_are_repaired():
    from shapely.geometry import Polygon

    from minemap.postprocess import make_valid

    bowtie = Polygon([(0, 0), (0.01, 0.01), (0.01, 0), (0, 0.01)])
    square = box(0, 0, 1, 1)
    geoms = np.array([square, bowtie], dtype=object)
    out = make_valid(geoms)
    assert out[0] is square and geoms[1] is bowtie  # valid ones kept as they are; the input untouched
    assert out[1].is_valid and out[1].area == pytest.approx(0.00005)
    rows = [(2019, "b", bowtie), (2020, "b", bowtie)]
    pp = postprocess(_polys(rows), PostprocessConfig())
    assert pp.geometry.is_valid.all() and (pp.area_km2 > 0.5).all()  # two triangles of ~0.6 km2
