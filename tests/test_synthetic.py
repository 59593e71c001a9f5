import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Geod
from rasterio.features import rasterize
from rasterio.merge import merge
from scipy.ndimage import binary_dilation

from minemap.geo import area_km2
from minemap.imagery import open_imagery
from minemap.synthetic import NICFI_RES_M, make_scene


def test_scene_has_known_truth(scene):
    src = open_imagery(scene.imagery)
    assert src.years() == [2019, 2020, 2021] and src.band_names == ["red", "green", "blue", "nir"]
    assert len(list((scene.imagery / "2019").glob("*.tif"))) == 4
    g = src.grid(2019)
    assert g.crs.to_epsg() == 3857 and g.res == (NICFI_RES_M, NICFI_RES_M) and g.width == 384
    truth = gpd.read_file(scene.truth)
    per_year = truth.groupby("year").mine.apply(set)
    assert per_year[2020] - per_year[2019] and per_year[2020] - per_year[2021]  # mines appear and vanish
    grow = truth[truth.mine.isin(per_year[2019] & per_year[2021])]
    a = grow.assign(a=area_km2(grow.geometry.values)).pivot_table(index="mine", columns="year", values="a")
    assert (a[2021] >= a[2019] * 0.999).all()
    labels = gpd.read_file(scene.labels)
    assert len(labels) == len(per_year[2019]) - 1  # one mine missing from the noisy labels
    # haze lifts the dark forest pixels of the last year
    clear, _ = src.read(2019, g)
    hazy, _ = src.read(2021, g)
    assert np.percentile(hazy[0], 5) > 1.5 * np.percentile(clear[0], 5)
    assert np.all(clear >= 1)


# --- the options of make_scene ---------------------------------------------------------------------------------

TWO_YEARS = (2019, 2020)
PLAIN = dict(years=TWO_YEARS, size=384, n_mines=8, hazy_year=None, seed=7)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A clear two-year scene with every new option at its default."""
    return make_scene(tmp_path_factory.mktemp("plain"), **PLAIN)


def _files(scene, year):
    return sorted((scene.imagery / str(year)).glob("*.tif"))


def _arrays(scene):
    out = {}
    for year in scene.years:
        for f in _files(scene, year):
            with rasterio.open(f) as src:
                out[f"{year}/{f.name}"] = src.read()
    return out


def _mosaic(scene, year):
    """The year's quads merged: (bands, rows, cols), transform, crs."""
    files = _files(scene, year)
    with rasterio.open(files[0]) as src:
        crs = src.crs
    data, transform = merge([str(f) for f in files])
    return data, transform, crs


def _truth_mask(scene, year, shape, transform, crs):
    truth = gpd.read_file(scene.truth)
    truth = truth[truth.year == year].to_crs(crs)
    return rasterize([(g, 1) for g in truth.geometry], out_shape=shape, transform=transform, dtype="uint8") > 0


def _soil_like(data):
    """Bare, reddish pixels: bright in red and redder than blue (roofs and paved roads are grey, water dark)."""
    red, blue = data[0].astype(float), data[2].astype(float)
    return (red > 1500) & (red > 1.3 * blue)


def test_new_options_default_to_the_old_scene(plain, tmp_path):
    explicit = make_scene(tmp_path / "explicit", **PLAIN, crs="EPSG:3857", nodata_edges=False, confusers=False,
                          cloudy_year=None, missing_labels=1, label_offset_m=0.0)
    a, b = _arrays(plain), _arrays(explicit)
    assert a.keys() == b.keys() and len(a) == 8
    for name in a:
        assert a[name].dtype == b[name].dtype == np.uint16 and np.array_equal(a[name], b[name]), name
    for path in ("labels", "truth"):
        ga, gb = gpd.read_file(getattr(plain, path)), gpd.read_file(getattr(explicit, path))
        assert shapely.equals_exact(ga.geometry.values, gb.geometry.values, 1e-12).all()


def test_label_options_leave_imagery_and_truth_alone(plain, tmp_path):
    other = make_scene(tmp_path / "labels", **PLAIN, missing_labels=0, label_offset_m=0.0)
    a, b = _arrays(plain), _arrays(other)
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert gpd.read_file(plain.truth).geometry.geom_equals_exact(gpd.read_file(other.truth).geometry, 1e-12).all()
    # the labels the default keeps are drawn exactly as before; only the first mine's is added
    kept, every = gpd.read_file(plain.labels), gpd.read_file(other.labels)
    assert len(every) == len(kept) + 1
    assert shapely.equals_exact(every.geometry.values[1:], kept.geometry.values, 1e-12).all()


@pytest.mark.parametrize("crs", ["EPSG:32630", "EPSG:4326"])
def test_crs_warps_imagery_at_the_same_ground_size(tmp_path, crs):
    scene = make_scene(tmp_path, **PLAIN, crs=crs)
    geod = Geod(ellps="WGS84")
    for f in _files(scene, 2019):
        with rasterio.open(f) as src:
            assert src.crs == rasterio.crs.CRS.from_user_input(crs) and src.nodata == 0
            (x, y), (rx, ry) = src.lnglat(), src.res
        if crs == "EPSG:4326":  # degrees, that span ~4.75 m on the ground east-west and north-south alike
            ground = geod.inv(x, y, x + rx, y)[2], geod.inv(x, y, x, y + ry)[2]
            assert rx < 1e-4 and ry < 1e-4
        else:
            ground = rx, ry
        assert ground == pytest.approx((4.75, 4.75), abs=0.03)
    # the truth still falls on the mines: bare soil inside, hardly any bare soil outside
    data, transform, src_crs = _mosaic(scene, 2019)
    inside = _truth_mask(scene, 2019, data.shape[1:], transform, src_crs)
    soil = _soil_like(data)
    assert inside.sum() > 2000
    assert soil[inside].mean() > 0.8 and np.median(data[0][inside]) > 1500
    assert soil[~inside].sum() < 0.05 * soil[inside].sum()
    # nodata only outside the warped footprint: a thin margin at most
    assert 0 < (data[0] > 0).mean() and (data[:, 5:-5, 5:-5] > 0).all()


def test_nodata_edges_only_on_outer_borders(tmp_path):
    scene = make_scene(tmp_path, **PLAIN, nodata_edges=True)
    for year in TWO_YEARS:
        for f in _files(scene, year):
            with rasterio.open(f) as src:
                band = src.read(1)
            assert (band == 0).sum() > 5 * band.shape[0]  # every quad has a strip 5-40 px deep
        data, _, _ = _mosaic(scene, year)
        valid = data[0] > 0
        assert valid[40:-40, 40:-40].all()  # strips are 40 px deep at most, and never along the inner seams
        assert valid[data.shape[1] // 2, data.shape[2] // 2]
        edge = ~valid[:40].all(), ~valid[-40:].all(), ~valid[:, :40].all(), ~valid[:, -40:].all()
        assert sum(edge) >= 2
        assert ((data == 0).all(0) == ~valid).all()  # all bands are nodata together


def test_confusers_are_bare_but_not_mines(plain, tmp_path):
    scene = make_scene(tmp_path, **PLAIN, confusers=True)
    assert gpd.read_file(plain.truth).geometry.geom_equals_exact(gpd.read_file(scene.truth).geometry, 1e-12).all()
    counts = {}
    for name, s in (("without", plain), ("with", scene)):
        for year in TWO_YEARS:
            data, transform, crs = _mosaic(s, year)
            mines = _truth_mask(s, year, data.shape[1:], transform, crs)
            soil = _soil_like(data)
            counts[name, year] = (soil & ~mines).sum()
            ring = binary_dilation(mines, iterations=3) & ~mines
            assert soil[ring].mean() < 0.02  # confusers never touch a mine
    for year in TWO_YEARS:
        assert counts["without", year] < 50
        assert counts["with", year] > 3000  # fields alone are at least 4 x 30 x 30 px


def test_cloudy_year_has_clouds_and_shadows(tmp_path):
    scene = make_scene(tmp_path, **PLAIN, cloudy_year=2020)
    clear, _, _ = _mosaic(scene, 2019)
    cloudy, _, _ = _mosaic(scene, 2020)
    assert not (clear > 5000).all(0).any()
    assert 0.02 < (cloudy > 5000).all(0).mean() < 0.2
    assert (cloudy > 0).all()  # clouds are valid pixels, not nodata
    # shadows: forest that is much darker in NIR than the year before
    forest = (clear[3] > 2200) & (clear[0] < 600)
    darker = cloudy[3].astype(float) < 0.7 * clear[3]
    assert (darker & forest).sum() > 0.01 * forest.sum()


@pytest.mark.parametrize("missing", [0, 3])
def test_missing_labels(plain, tmp_path, missing):
    scene = make_scene(tmp_path, **PLAIN, missing_labels=missing)
    truth = gpd.read_file(scene.truth)
    n = (truth.year == 2019).sum()
    assert n >= 6 and len(gpd.read_file(scene.labels)) == n - missing


def test_label_offset_moves_labels(plain, tmp_path):
    scene = make_scene(tmp_path, **PLAIN, missing_labels=0, label_offset_m=30)
    truth = gpd.read_file(scene.truth)
    truth = truth[truth.year == 2019].to_crs("EPSG:32630")
    for s, lo, hi in ((plain, 0, 12), (scene, 19, 41)):
        labels = gpd.read_file(s.labels).to_crs("EPSG:32630")
        match = truth.iloc[len(truth) - len(labels):]  # the labels leave out the first mines
        d = shapely.distance(labels.centroid.values, match.centroid.values)
        assert ((d >= lo) & (d <= hi)).all(), d
    assert abs(d.mean() - 30) < 5
