import numpy as np
import pytest
import shapely
from affine import Affine

from minemap.config import VectorizeConfig
from minemap.errors import InputError
from minemap.geo import area_km2
from minemap.lattice import Grid
from minemap.formats.rasters import NODATA, write_cog
from minemap.vectorize import vectorize, vectorize_year

RES = 4.0
T = Affine(RES, 0, 0.0, 0, -RES, 0.0)  # EPSG:3857 at the equator
SQUARES = {"max_rectangularity": 1}  # these tests' pits are squares: shape never decides (tested on its own)


def _tiles(tmp_path, q):
    """Split a quantised probability array into two side-by-side COG tiles."""
    h, w = q.shape
    half = w // 2
    paths = []
    for i, (c0, c1) in enumerate([(0, half), (half, w)]):
        g = Grid("EPSG:3857", T @ Affine.translation(c0, 0), c1 - c0, h)
        p = tmp_path / "2020" / f"r000_c{i:03d}.tif"
        write_cog(p, np.ascontiguousarray(q[:, c0:c1]), g)
        paths.append(p)
    return paths


def test_polygons_merge_across_tile_seams_with_holes(tmp_path):
    q = np.zeros((64, 64), np.uint8)
    q[10:40, 20:50] = 200  # straddles the seam at column 32
    q[20:25, 25:30] = 0  # a hole
    q[50:52, 5:7] = 220  # a 4-pixel speck: 64 m2
    q[55:60, 55:60] = NODATA
    paths = _tiles(tmp_path, q)
    gdf = vectorize_year(paths, 2020, 0.5, VectorizeConfig(min_area_m2=100, **SQUARES))
    assert len(gdf) == 1 and gdf.crs.to_epsg() == 4326 and gdf.geometry.is_valid.all()
    poly = gdf.geometry.iloc[0]
    assert poly.geom_type == "Polygon" and len(poly.interiors) == 1
    expected_m2 = (30 * 30 - 25) * RES * RES
    assert gdf.area_km2.iloc[0] * 1e6 == pytest.approx(expected_m2, rel=0.01)
    assert gdf.mean_probability.iloc[0] == pytest.approx(200 / 250)
    assert gdf.year.iloc[0] == 2020
    small = vectorize_year(paths, 2020, 0.5, VectorizeConfig(min_area_m2=10, **SQUARES))
    assert len(small) == 2
    assert len(vectorize_year(paths, 2020, 0.9)) == 0  # 200/250 = 0.8 < 0.9


def test_simplify_in_metres(tmp_path):
    q = np.zeros((64, 64), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    q[(yy - 32) ** 2 + (xx - 32) ** 2 < 20 ** 2] = 250  # a pixelated disc: many vertices
    paths = _tiles(tmp_path, q)
    raw = vectorize_year(paths, 2020, 0.5, VectorizeConfig(min_area_m2=0))
    simple = vectorize_year(paths, 2020, 0.5, VectorizeConfig(min_area_m2=0, simplify_m=6))
    n_raw = shapely.get_num_coordinates(raw.geometry.values)[0]
    n_simple = shapely.get_num_coordinates(simple.geometry.values)[0]
    assert n_simple < n_raw / 2
    assert simple.area_km2.iloc[0] == pytest.approx(raw.area_km2.iloc[0], rel=0.05)


def test_vectorize_writes_geoparquet_and_errors(tmp_path):
    q = np.zeros((32, 32), np.uint8)
    q[5:15, 5:15] = 250
    _tiles(tmp_path / "probs", q)
    out = vectorize(tmp_path / "probs", [2020], tmp_path / "polys", 0.5, VectorizeConfig(**SQUARES))
    import geopandas as gpd

    gdf = gpd.read_parquet(out[2020])
    assert list(gdf.columns) == ["year", "area_km2", "mean_probability", "filled_share", "geometry"]
    assert (gdf.filled_share == 0).all()  # one year: nothing beside it to fill from
    assert gdf.area_km2.sum() == pytest.approx(area_km2(gdf.geometry.values).sum())
    with pytest.raises(InputError, match="no probability rasters for year 2021"):
        vectorize(tmp_path / "probs", [2021], tmp_path / "polys", 0.5)


def _year_tile(folder, year, q):
    p = folder / str(year) / "r000_c000.tif"
    write_cog(p, q, Grid("EPSG:3857", T, q.shape[1], q.shape[0]))


def test_unobserved_pixels_are_filled_from_the_years_beside_them(tmp_path):
    """A pit under the middle year's cloud is mining where the years before and after show it; a pit the next
    year no longer shows is not filled; the first year is never filled from the next; the last year is filled
    from the previous one alone, where that one observed it; ``fill_unobserved = false`` leaves the holes."""
    import geopandas as gpd

    probs = tmp_path / "probs"
    before, middle, after = (np.zeros((64, 64), np.uint8) for _ in range(3))
    for q in (before, middle, after):
        q[5:25, 5:25] = 225  # pit A, 400 px, every year
    before[40:60, 40:60] = middle[40:60, 40:60] = 225  # pit B: closed in the last year
    before[40:50, 5:15] = middle[40:50, 5:15] = 225  # pit C, 100 px: closed in the last year
    middle[5:25, 40:60] = after[5:25, 40:60] = 225  # pit D: new in the middle year
    before[0:30, 34:64] = NODATA  # the first year did not see D's ground
    middle[0:30, 0:30] = NODATA  # a cloud over A in the middle year
    middle[38:62, 38:62] = NODATA  # and one over B
    after[10:20, 45:55] = NODATA  # the last year: a cloud over D (100 px)
    after[45:55, 45:55] = NODATA  # and one over B's ground, which the middle year did not see either
    for year, q in ((2019, before), (2020, middle), (2021, after)):
        _year_tile(probs, year, q)

    def pixels(gdf):  # outline areas in pixels, smallest first
        return sorted(int(v) for v in np.round(gdf.area_km2 / (RES * RES / 1e6) / 0.9933))  # ellipsoid / 3857

    out = vectorize(probs, [2019, 2020, 2021], tmp_path / "polys", 0.5, VectorizeConfig(min_area_m2=0, **SQUARES))
    y19, y20, y21 = (gpd.read_parquet(out[y]) for y in (2019, 2020, 2021))
    assert pixels(y19) == [100, 400, 400] and (y19.filled_share == 0).all()  # A, B, C; D is not back-filled
    # C and D observed; A filled whole; of B only the centre the last year did not see either (the rest of it
    # the last year sees as no mine)
    assert pixels(y20) == [100, 100, 400, 400]
    assert sorted(y20.filled_share) == [0, 0, 1, 1]
    assert pixels(y21) == [400, 400]  # A observed; D filled where the cloud hid it; nothing on B's ground
    assert sorted(y21.filled_share) == [0, pytest.approx(0.25)]
    off = vectorize(probs, [2019, 2020, 2021], tmp_path / "off", 0.5,
                    VectorizeConfig(min_area_m2=0, fill_unobserved=False, **SQUARES))
    assert pixels(gpd.read_parquet(off[2020])) == [100, 400]  # A lost under the cloud
    assert pixels(gpd.read_parquet(off[2021])) == [300, 400]  # D with a hole
    assert (gpd.read_parquet(off[2021]).filled_share == 0).all()
    # one year alone has no neighbours: nothing filled
    alone = vectorize(probs, [2020], tmp_path / "alone", 0.5, VectorizeConfig(min_area_m2=0, **SQUARES))
    assert pixels(gpd.read_parquet(alone[2020])) == [100, 400]


def test_outlines_shaped_like_fields_are_dropped(tmp_path):
    """An outline of 64 px or more filling more than vectorize.max_rectangularity (0.9) of its smallest enclosing
    rectangle is a field, not a mine: a rotated rectangle is dropped, an ellipse of the same size and a small
    square kept; labels that are rectangles themselves raise the level (quarries drawn as boxes keep their
    like); 1 turns the rule off."""
    import geopandas as gpd

    from minemap.geo import rectangularity
    from minemap.vectorize import field_level

    yy, xx = np.mgrid[:128, :128].astype(float)
    q = np.zeros((128, 128), np.uint8)
    u, v = (xx - 40) * np.cos(0.5) + (yy - 40) * np.sin(0.5), -(xx - 40) * np.sin(0.5) + (yy - 40) * np.cos(0.5)
    q[(np.abs(u) < 22) & (np.abs(v) < 12)] = 230  # a field: a rotated rectangle of ~1,000 px
    q[((xx - 90) / 24) ** 2 + ((yy - 90) / 13) ** 2 < 1] = 230  # a pit: an ellipse of about the same size
    q[110:116, 10:16] = 230  # 36 px: too small to judge by shape
    paths = _tiles(tmp_path, q)
    everything = vectorize_year(paths, 2020, 0.5, VectorizeConfig(min_area_m2=0, max_rectangularity=1))
    assert len(everything) == 3
    rect = rectangularity(everything.geometry.values, geographic=True)
    ellipse, field, square = sorted(rect)
    assert ellipse < 0.85 and 0.9 < field < square
    kept = vectorize_year(paths, 2020, 0.5, VectorizeConfig(min_area_m2=0))
    assert len(kept) == 2 and sorted(kept.area_km2 * 1e6 / RES ** 2) == [pytest.approx(36, rel=0.03),
                                                                         pytest.approx(np.pi * 24 * 13, rel=0.03)]
    # labels drawn as boxes raise the level above the field's: it is kept
    boxes = gpd.GeoDataFrame(geometry=[shapely.box(10, 0, 10.01, 0.01 * (1 + k / 10)) for k in range(20)],
                             crs="EPSG:4326")
    assert field_level(VectorizeConfig()) == 0.9 and field_level(VectorizeConfig(), boxes) > 0.99
    assert field_level(VectorizeConfig(max_rectangularity=1), boxes) is None
    cfg = VectorizeConfig(min_area_m2=0)
    out = vectorize(tmp_path, [2020], tmp_path / "polys", 0.5, cfg, fields=field_level(cfg, boxes))
    assert len(gpd.read_parquet(out[2020])) == 3
