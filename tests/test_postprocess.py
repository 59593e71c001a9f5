import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from pyproj import Geod
from shapely.geometry import box

from minemap.config import PostprocessConfig
from minemap.errors import InputError
from minemap.geo import area_km2
from minemap.postprocess import attribute_countries, postprocess, temporal_filter
from minemap.formats.countries import load_countries

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


def test_edge_years_keep_confident_new_mines_as_provisional():
    a = box(0, 0, 0.01, 0.01)
    rows = [
        (2019, "a19", a), (2020, "a20", a), (2021, "a21", a),  # persistent
        (2021, "new21", box(1, 1, 1.01, 1.01)),  # first seen in the newest year, the model sure of it
        (2021, "doubt21", box(2, 2, 2.01, 2.01)),  # first seen in the newest year, the model unsure
        (2019, "gone19", box(3, 3, 3.01, 3.01)),  # last seen in the oldest year, sure
        (2020, "lonely20", box(4, 4, 4.01, 4.01)),  # a middle year has both neighbours to judge it: dropped
    ]
    polys = _polys(rows).assign(mean_probability=[0.9, 0.9, 0.9, 0.8, 0.3, 0.7, 0.95])
    out = postprocess(polys)  # the default rule
    assert set(out.loc[out.provisional, "mean_probability"]) == {0.8, 0.7}
    assert sorted(out.loc[out.provisional, "year"]) == [2019, 2021] and len(out) == 5
    assert not out.loc[out.year == 2020, "provisional"].any()
    # the study's rule keeps exactly what it kept before, none provisional
    study = postprocess(polys, PostprocessConfig(temporal="study"))
    assert len(study) == 3 and not study.provisional.any()
    assert len(postprocess(polys, PostprocessConfig(temporal="off"))) == 7
    # a later run adds 2022: the 2021 mine seen again is confirmed, the one not seen again is dropped
    later = pd.concat([polys, _polys([(2022, "new22", box(1, 1, 1.01, 1.01)), (2022, "a22", a)])
                       .assign(mean_probability=0.9)], ignore_index=True)
    out = postprocess(later)
    new21 = out[(out.year == 2021) & (out.mean_probability == 0.8)]
    assert len(new21) == 1 and not new21.provisional.iloc[0]
    assert 0.7 not in set(out.loc[out.year == 2021, "mean_probability"])
    # an older config's temporal_filter = false still means every polygon
    assert PostprocessConfig.model_validate({"temporal_filter": False}).temporal == "off"
    assert PostprocessConfig.model_validate({"temporal_filter": True}).temporal == "provisional"


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


def test_area_of_holes_parts_and_small_outlines_far_from_the_origin():
    from shapely.geometry import MultiPolygon, Polygon

    geod = Geod(ellps="WGS84")
    rng = np.random.default_rng(3)
    ring = [(179.9 + 0.0005 * np.cos(t) * rng.uniform(0.8, 1.2), -24.5 + 0.0005 * np.sin(t))
            for t in np.linspace(0, 2 * np.pi, 40, endpoint=False)]
    cases = [Polygon(ring), Polygon(ring[::-1]),  # ~50 m across near the antimeridian, either orientation
             box(10, 0, 11, 1).difference(box(10.2, 0.2, 10.4, 0.4)),  # a hole
             MultiPolygon([box(0, 0, 1, 1), box(-60, 20, -59, 21)]), box(-60, 20, -59.99999, 20.00001)]
    expected = [abs(geod.geometry_area_perimeter(g)[0]) / 1e6 for g in cases]
    got = area_km2(np.array(cases + [Polygon(), None], dtype=object), valid=True)
    assert got[:2] == pytest.approx(expected[:2], rel=1e-6) and got[4] == pytest.approx(expected[4], rel=1e-6)
    assert got[2:4] == pytest.approx(expected[2:4], rel=1e-4)  # a degree wide: geodesic edges bow a little
    assert got[-2] == 0 and np.isnan(got[-1])
    # polygons measured from their coordinates and through a transformed copy agree on many at once
    many = np.array([shapely.Point(x, y).buffer(0.003, quad_segs=8) for x, y in rng.uniform(-40, 40, (50_000, 2))]
                    + [cases[2]], dtype=object)
    fast = area_km2(many, valid=True)
    slow = area_km2(np.array([MultiPolygon([g]) for g in many], dtype=object), valid=True)
    assert np.allclose(fast, slow, rtol=1e-12, atol=0)


def test_country_grid_agrees_with_the_exact_attribution():
    """Polygons settled from the grid of cells one country alone holds get what the exact intersection gives,
    next to a land border, a coast and two countries overlapping, and the grid settles those far from them."""
    from shapely.geometry import GeometryCollection, LineString

    from minemap.postprocess import GRID_DEG, _inland_country, inland_cells

    outlines = [box(0, 0, 1, 1), box(1, 0, 2, 1), box(1.5, 0.5, 2.5, 1.5)]
    stray = LineString([(0.2, 0.2), (0.8, 0.8)])  # a repair can leave a stray line in an outline
    countries = gpd.GeoDataFrame({"iso3": ["AAA", "BBB", "CCC"], "country": ["A", "B", "C"]},
                                 geometry=[GeometryCollection([outlines[0], stray]), *outlines[1:]],
                                 crs="EPSG:4326")
    grid, x0, y0 = inland_cells(countries, (0, 0, 2.5, 1.5))

    def cell(x, y):
        return grid[int((y0 - y) // GRID_DEG), int((x - x0) // GRID_DEG)]

    assert cell(0.5, 0.5) == 0 and cell(1.25, 0.25) == 1 and cell(2.2, 1.2) == 2
    assert cell(1.0 - GRID_DEG / 2, 0.5) == -1 and cell(1.0 + GRID_DEG / 2, 0.5) == -1  # the border and around it
    assert cell(1.75, 0.75) == -1 and cell(2.3, 0.2) == -1  # B and C overlap; sea
    rng = np.random.default_rng(0)
    xy = rng.uniform([-0.1, -0.1], [2.6, 1.6], (3000, 2))
    size = rng.uniform(0.001, 0.03, 3000)
    polys = _polys([(2019, str(i), box(x, y, x + s, y + s)) for i, ((x, y), s) in enumerate(zip(xy, size))])
    got = attribute_countries(polys, countries)
    ea = countries.to_crs("EPSG:6933").geometry.values
    p_ea = polys.to_crs("EPSG:6933").geometry.values
    shares = np.array([[g.intersection(c).area for c in ea] for g in p_ea])
    dist = np.array([[g.distance(c) for c in ea] for g in p_ea])
    best = np.where(shares.max(1) > 0, shares.argmax(1), np.where(dist.min(1) <= 25_000, dist.argmin(1), -1))
    expected = np.where(best >= 0, countries.iso3.to_numpy()[np.maximum(best, 0)], None)
    assert list(got.iso3) == list(expected)
    settled = _inland_country(np.asarray(polys.geometry.values), countries) >= 0
    deep = (shares.max(1) > 0) & np.array([min(g.distance(c.boundary) for c in outlines) > 2 * GRID_DEG
                                            for g in polys.geometry])
    assert settled[deep].mean() > 0.9 and not settled[shares.max(1) == 0].any()



def test_the_stored_inland_grid_is_the_embedded_layers():
    """The grid stored for the embedded 1:10m layer is the one inland_cells computes from it (compared over West
    Africa's borders and coasts, and the Guianas), and holds for that layer alone: a subset or a reordering of it
    (whose row indices differ) gets None, so its grid is computed."""
    from minemap.formats.countries import stored_inland_grid
    from minemap.postprocess import GRID_DEG, inland_cells

    countries = load_countries()
    stored = stored_inland_grid(countries, GRID_DEG)
    assert stored is not None, "rerun `python tools/make_countries.py --inland` after changing the layer"
    grid, x0, y0 = stored
    assert grid.shape == (3603, 7203) and (grid >= 0).mean() > 0.2
    for bounds in ((-12.0, 3.0, 3.0, 13.0), (-60.0, 1.0, -50.0, 9.0)):
        local, lx, ly = inland_cells(countries, bounds, GRID_DEG)
        r, c = round((y0 - ly) / GRID_DEG), round((lx - x0) / GRID_DEG)
        inner = (slice(2, -2), slice(2, -2))  # a country just past the local grid can reach its edge cells only
        assert np.array_equal(grid[r:r + local.shape[0], c:c + local.shape[1]][inner], local[inner])
        assert (local[inner] >= 0).any() and (local[inner] == -1).any()
    assert stored_inland_grid(countries.iloc[:-1], GRID_DEG) is None
    assert stored_inland_grid(countries.iloc[::-1].reset_index(drop=True), GRID_DEG) is None
    assert stored_inland_grid(countries, 2 * GRID_DEG) is None
    assert stored_inland_grid(load_countries(scale="110m"), GRID_DEG) is None

def test_countries_by_largest_overlap():
    countries = load_countries()
    rows = [
        (2019, "french_guiana", box(-53.0, 4.0, -52.99, 4.01)),
        (2019, "ghana", box(-1.95, 6.2, -1.94, 6.21)),
        (2019, "offshore_ghana", box(-1.16, 5.10, -1.15, 5.11)),  # 3 km off the 1:10m coastline
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
    assert list(out.columns) == ["year", "iso3", "country", "area_km2", "provisional", "geometry"]
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


def test_pairs_across_years_are_every_box_meeting_pair_in_span(monkeypatch):
    from minemap.geo import in_threads, pairs_across_years

    rng = np.random.default_rng(1)
    n = 400
    xy = rng.uniform(0, 1, (n, 2))
    geoms = np.array([box(x, y, x + 0.05, y + 0.05) for x, y in xy], dtype=object)
    probe = shapely.buffer(geoms, 0.01)  # boxes of the probes a little larger than those indexed
    year = rng.integers(0, 5, n)
    bp, bg = shapely.bounds(probe), shapely.bounds(geoms)
    meet = ((bp[:, None, 0] <= bg[None, :, 2]) & (bg[None, :, 0] <= bp[:, None, 2])
            & (bp[:, None, 1] <= bg[None, :, 3]) & (bg[None, :, 1] <= bp[:, None, 3]))
    dy = year[:, None] - year[None, :]
    for span in (1, 2, None):
        a, b = pairs_across_years(probe, geoms, year, span, chunk=7)
        expected = meet & (dy > 0) & ((dy <= span) if span is not None else True)
        assert sorted(zip(a, b)) == sorted(zip(*np.nonzero(expected)))
    # the work in chunks gives what one call gives, on two cores and on one
    for cores in (2, 1):
        monkeypatch.setattr("os.cpu_count", lambda: cores)
        assert np.array_equal(in_threads(shapely.area, probe, chunk=30), shapely.area(probe))


def test_polygons_either_side_of_a_border_get_their_country():
    """Small mines (100 m squares) 300 m either side of tropical borders where small-scale mining clusters
    (Ghana and Cote d'Ivoire, Guyana and Suriname, DR Congo and Uganda, Brazil and Venezuela): the default
    1:10m layer gives each the country it lies in; the 1:110m layer, whose borders are kilometres off, gets a
    good share of them wrong, so the test can fail."""
    fine, coarse = load_countries(), load_countries(scale="110m")
    vertices = [int(shapely.get_num_coordinates(np.asarray(c.geometry.values)).sum()) for c in (fine, coarse)]
    assert vertices[0] > 20 * vertices[1]  # the default is the 1:10m layer
    rows, expected = [], []
    for a, b in (("GHA", "CIV"), ("GUY", "SUR"), ("COD", "UGA"), ("BRA", "VEN")):
        ga, gb = (fine.loc[fine.iso3 == c].geometry.iloc[0] for c in (a, b))
        border = shapely.line_merge(shapely.intersection(ga.boundary, gb.boundary))
        for line in shapely.get_parts(border):
            if line.geom_type != "LineString" or line.length < 0.1:
                continue
            for d in np.arange(0.02, line.length - 0.02, 0.08):
                p, q = line.interpolate(d - 0.005), line.interpolate(d + 0.005)
                dx, dy = q.x - p.x, q.y - p.y
                norm = np.hypot(dx, dy)
                c = line.interpolate(d)
                k = np.cos(np.radians(c.y))
                for side in (1, -1):  # 300 m across the border, a 100 m square
                    x = c.x + side * (-dy / norm) * 0.0027 / k
                    y = c.y + side * (dx / norm) * 0.0027
                    sq = box(x - 0.00045 / k, y - 0.00045, x + 0.00045 / k, y + 0.00045)
                    owner = [iso for iso, g in ((a, ga), (b, gb)) if g.contains(sq)]
                    if len(owner) == 1:
                        rows.append((2019, f"{a}-{b}", sq))
                        expected.append(owner[0])
    assert len(expected) > 100
    got = attribute_countries(_polys(rows), fine)
    assert list(got.iso3) == expected
    wrong = attribute_countries(_polys(rows), coarse).iso3.to_numpy() != np.array(expected, dtype=object)
    assert wrong.mean() > 0.05


def test_nearest_outline_is_the_nearest_polygon_within_reach():
    """Offshore polygons take the nearest country: found from the rings' segments, equal to the distance to the
    polygons themselves (a lake inside a country counts its shore), none beyond the reach."""
    import shapely

    from minemap.postprocess import nearest_outline

    west = shapely.box(0, 0, 100, 100)
    east = shapely.Polygon(shapely.box(300, 0, 400, 100).exterior.coords, [shapely.box(330, 30, 370, 70).exterior.coords])
    islands = shapely.MultiPolygon([shapely.box(0, 200, 10, 210), shapely.box(500, 500, 520, 520)])
    outlines = np.array([west, east, islands])
    geoms = np.array([shapely.box(110, 40, 112, 42),  # 10 from west, 188 from east
                      shapely.box(250, 40, 252, 42),  # 150 from west, 48 from east
                      shapely.box(349, 49, 351, 51),  # in the lake: 19 from its shore (east)
                      shapely.box(5, 150, 6, 151),  # 49 from the island of the third, 50 from west
                      shapely.box(900, 900, 901, 901)])  # beyond reach
    src, dst = nearest_outline(geoms, outlines, shapely.STRtree(outlines), max_distance=120)
    assert dict(zip(src.tolist(), dst.tolist())) == {0: 0, 1: 1, 2: 1, 3: 2}
    want = [int(np.argmin(shapely.distance(g, outlines))) for g in geoms[:4]]
    assert want == [0, 1, 1, 2]


def _across_antimeridian(lat0: float, lat1: float) -> shapely.Polygon:
    """An island from 179.5 E to 179.5 W drawn as web maps draw it: its ring jumps from +180 to -180 and back."""
    return shapely.Polygon([(179.5, lat0), (180, lat0), (-180, lat0), (-179.5, lat0), (-179.5, lat1), (-180, lat1),
                            (180, lat1), (179.5, lat1)])


def test_outlines_across_the_antimeridian_are_cut_there(tmp_path):
    """A country whose ring jumps across the antimeridian holds, taken as it is, a band round the globe: a mine
    in a country of the same latitudes on the other side of the world would be given it. Cut there, the island
    is its own 1,000-odd km2 either side of the line, and the mainland's mine is the mainland's."""
    from minemap.geo import cut_at_antimeridian

    island = _across_antimeridian(-17.5, -16.5)
    cut = cut_at_antimeridian(np.array([island, box(20, -18, 30, -10)], dtype=object))
    assert cut[1].equals(box(20, -18, 30, -10))  # nothing to cut: unchanged
    parts = shapely.get_parts(cut[0])
    assert len(parts) == 2 and all(p.bounds[2] - p.bounds[0] <= 0.5 + 1e-9 for p in parts)
    assert area_km2(np.array([cut[0]]))[0] == pytest.approx(1.0 * 111.0 * 106.4, rel=0.03)  # 1 x 1 degree
    countries = gpd.GeoDataFrame({"ISO3": ["FJI", "ZMB"], "NAME": ["Fiji", "Zambia"]},
                                 geometry=[island, box(20, -18, 30, -10)], crs="EPSG:4326")
    countries.to_file(tmp_path / "countries.geojson", driver="GeoJSON")
    rows = [(2019, "zambia", box(25, -17.2, 25.01, -17.19)), (2019, "fiji west", box(179.7, -17.2, 179.71, -17.19)),
            (2019, "fiji east", box(-179.71, -17.2, -179.7, -17.19)),
            (2019, "fiji across", box(179.99, -17.2, 180, -17.19))]
    out = postprocess(_polys(rows), PostprocessConfig(countries=tmp_path / "countries.geojson", temporal="off"))
    assert list(out.iso3) == ["ZMB", "FJI", "FJI", "FJI"]


def test_the_embedded_layers_hold_no_band_round_the_globe():
    """Fiji and Russia cross the antimeridian: in the embedded layers each is its own size, and a place in
    Zambia, Madagascar or northern Australia (Fiji's latitudes) lies in one country only."""
    for scale in ("10m", "110m"):
        c = load_countries(scale=scale)
        areas = dict(zip(c.iso3, area_km2(np.asarray(c.geometry.values))))
        assert 15_000 < areas["FJI"] < 25_000 and 16e6 < areas["RUS"] < 17.5e6, (scale, areas["FJI"], areas["RUS"])
        for x, y, iso in ((28.3, -15.4, "ZMB"), (46.9, -19.0, "MDG"), (133.0, -17.0, "AUS"), (-63.5, -17.5, "BOL")):
            holders = c.iso3[shapely.contains_xy(np.asarray(c.geometry.values), x, y)].tolist()
            assert holders == [iso], (scale, x, y, holders)
