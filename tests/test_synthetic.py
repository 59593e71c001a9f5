import hashlib
import inspect

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Geod
from rasterio.features import rasterize
from rasterio.merge import merge
from scipy.ndimage import binary_dilation, binary_erosion, distance_transform_edt

from minemap.geo import area_km2
from minemap.imagery import open_imagery
from minemap.synthetic import (GREY_TAILINGS, MINE_SOIL_CHOICES, NICFI_RES_M, POND, REGIONS, SOIL, WHITE_KAOLIN,
                               _plan_mines, draw_scene_spec, make_scene)


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
    cloudy, transform, crs = _mosaic(scene, 2020)
    assert not (clear > 5000).all(0).any()
    assert 0.02 < (cloudy > 5000).all(0).mean() < 0.2
    assert (cloudy > 0).all()  # clouds are valid pixels, not nodata
    # shadows: forest that is much darker in NIR than the year before
    forest = (clear[3] > 2200) & (clear[0] < 600)
    darker = cloudy[3].astype(float) < 0.7 * clear[3]
    assert (darker & forest).sum() > 0.01 * forest.sum()
    # the truth of the clouds, on the imagery's grid: opaque-white pixels are clouds (1), the darkened forest
    # lies in shadows (2); the clear year has no such file
    with rasterio.open(tmp_path / "clouds_2020.tif") as src:
        hidden = src.read(1)
        assert src.transform == transform and src.crs == crs
    assert not (tmp_path / "clouds_2019.tif").exists()
    white = (cloudy > 5000).all(0)
    assert (hidden[white] == 1).mean() > 0.99
    assert (hidden[darker & forest & ~white] == 2).mean() > 0.6
    assert 0.02 < (hidden == 1).mean() < 0.3 and (hidden == 2).any()


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


# --- the default scene, file for file as before the options of the family ----------------------------------------

def _digest(scene):
    """sha256 (16 hex) of the imagery (pixels, grid, CRS of every file), of the labels and of the truth
    (coordinates rounded to 1e-9 degrees, and the attributes)."""
    img = hashlib.sha256()
    for year in scene.years:
        for f in _files(scene, year):
            with rasterio.open(f) as src:
                img.update(f"{year}/{f.name}{tuple(src.transform)}{src.crs.to_string()}{src.nodata}".encode())
                img.update(src.read().tobytes())
    out = {"imagery": img.hexdigest()[:16]}
    for name in ("labels", "truth"):
        g = gpd.read_file(getattr(scene, name))
        geoms = shapely.transform(g.geometry.values, lambda xy: np.round(xy, 9))
        h = hashlib.sha256(b"".join(shapely.to_wkb(geoms)))
        h.update(g.drop(columns="geometry").to_csv(index=False).encode())
        out[name] = h.hexdigest()[:16]
    return out


# digests of scenes written by synthetic.py before mine_soil, dredging, gsd_m, seasonal, label_extent and
# missing_share existed: the defaults of the new options must leave them as they were
BEFORE = {
    "default": (dict(years=(2019, 2020, 2021), size=384, n_mines=7, seed=3),
                {"imagery": "e2f7e1ebab81ab09", "labels": "60d555082c384d19", "truth": "991040fa28ad3783"}),
    "options": (dict(years=TWO_YEARS, size=384, n_mines=8, hazy_year=None, seed=7, crs="EPSG:32630",
                     nodata_edges=True, confusers=True, cloudy_year=2020, missing_labels=2, label_offset_m=10.0),
                {"imagery": "20cd07d2a2738b80", "labels": "01df820d1434ae4a", "truth": "e3ffda7f473a6c7e"}),
}


@pytest.mark.parametrize("name", list(BEFORE))
def test_scenes_hash_as_before_the_family(tmp_path, name, scene):
    kwargs, digest = BEFORE[name]
    if name == "default":  # the session's shared scene is this one
        assert _digest(scene) == digest
    written = make_scene(tmp_path, **kwargs, gsd_m=4.77, mine_soil="laterite", pond_colours=False, dredging=False,
                         seasonal=False, missing_share=0.0, label_extent="all")
    assert _digest(written) == digest
    assert written.labelled_area == tmp_path / "labelled_area.gpkg" and written.labelled_area.is_file()


# --- the family's options ----------------------------------------------------------------------------------------

def _changed_only_on_mines(plain, scene, year=2019):
    """Pixels that differ from the plain scene lie on the truth (1 px of rasterisation slack); truth and
    labels are the same."""
    a, b = _arrays(plain), _arrays(scene)
    data, transform, crs = _mosaic(plain, year)
    mines = binary_dilation(_truth_mask(plain, year, data.shape[1:], transform, crs))
    other, _, _ = _mosaic(scene, year)
    assert (other != data).any(0)[~mines].sum() == 0
    assert a.keys() == b.keys()
    for path in ("labels", "truth"):
        ga, gb = gpd.read_file(getattr(plain, path)), gpd.read_file(getattr(scene, path))
        assert shapely.equals_exact(ga.geometry.values, gb.geometry.values, 1e-12).all()


@pytest.mark.parametrize("soil", ["grey", "white", "mixed"])
def test_mine_soil_colours_the_mines(plain, tmp_path, soil):
    scene = make_scene(tmp_path, **PLAIN, mine_soil=soil)
    _changed_only_on_mines(plain, scene)
    data, transform, crs = _mosaic(scene, 2019)
    truth = gpd.read_file(scene.truth)
    truth = truth[truth.year == 2019].to_crs(crs)
    spectra = {"laterite": SOIL, "grey": GREY_TAILINGS, "white": WHITE_KAOLIN}
    kinds = set()
    for g in truth.geometry:
        inside = binary_erosion(rasterize([(g, 1)], out_shape=data.shape[1:], transform=transform) > 0, iterations=2)
        median = np.median(data[:, inside], axis=1)  # ponds are a minority of a mine; +-5 % per mine and year
        near = {k: np.abs(median / v - 1).max() for k, v in spectra.items()}
        best = min(near, key=near.get)
        assert near[best] < 0.16, (median, near)
        kinds.add(best)
    assert kinds == ({"laterite", "grey", "white"} if soil == "mixed" else {soil})
    if soil == "white":  # the mean over the training year's truth, ponds and all, is near the white spectrum
        inside = _truth_mask(scene, 2019, data.shape[1:], transform, crs)
        assert np.abs(data[:, inside].mean(1) / WHITE_KAOLIN - 1).max() < 0.2


def test_pond_colours_vary_between_mines(plain, tmp_path):
    scene = make_scene(tmp_path, **PLAIN, pond_colours=True)
    _changed_only_on_mines(plain, scene)
    data, transform, crs = _mosaic(scene, 2019)
    truth = gpd.read_file(scene.truth)
    ponds = []
    for g in truth[truth.year == 2019].to_crs(crs).geometry:
        inside = rasterize([(g, 1)], out_shape=data.shape[1:], transform=transform) > 0
        wet = inside & (data[0] < 2100 * 0.75)  # darker than the soil's texture reaches
        if wet.sum() > 10:
            ponds.append(np.median(data[:, wet], axis=1))
    ponds = np.array(ponds)
    assert len(ponds) >= 4
    assert (np.abs(ponds / POND - 1).max(1) > 0.15).sum() >= 2  # not all the default pond colour
    assert ponds[:, 0].std() > 150  # red differs between mines


def _ground_res(scene, year=2019):
    """The pixel size, CRS and bounds of the year's mosaic."""
    data, transform, crs = _mosaic(scene, year)
    bounds = rasterio.transform.array_bounds(*data.shape[1:], transform)
    return (transform.a, -transform.e), crs, bounds


@pytest.mark.parametrize("crs", ["EPSG:3857", "EPSG:32630"])
def test_gsd_keeps_metres(plain, tmp_path, crs):
    scene = make_scene(tmp_path, **PLAIN, gsd_m=10, crs=crs)
    (rx, ry), src_crs, _ = _ground_res(scene)
    lat = 6.25
    if crs == "EPSG:3857":  # Mercator pixels are 1 / cos(lat) larger than on the ground
        assert rx * np.cos(np.radians(lat)) == pytest.approx(10, abs=1e-6) and ry == rx
    else:
        assert src_crs.to_epsg() == 32630 and (rx, ry) == pytest.approx((10, 10), abs=1e-6)
    # the scene spans ~10 / 4.75 times the metres; a mine keeps its area in km2, so it covers fewer pixels
    t10, t5 = gpd.read_file(scene.truth), gpd.read_file(plain.truth)
    a10 = area_km2(t10[t10.year == 2019].geometry.values)
    a5 = area_km2(t5[t5.year == 2019].geometry.values)
    assert 0.5 < np.median(a10) / np.median(a5) < 2 and 0.5 < a10.sum() / a5.sum() < 2
    data, transform, src = _mosaic(scene, 2019)
    px10 = _truth_mask(scene, 2019, data.shape[1:], transform, src).sum() / len(a10)
    data5, transform5, src5 = _mosaic(plain, 2019)
    px5 = _truth_mask(plain, 2019, data5.shape[1:], transform5, src5).sum() / len(a5)
    assert 0.1 < px10 / px5 < 0.45  # ~(4.75 / 10)^2 = 0.23 of the pixels per mine
    soil = _soil_like(data)
    inside = _truth_mask(scene, 2019, data.shape[1:], transform, src)
    assert soil[inside].mean() > 0.7 and soil[~binary_dilation(inside)].sum() < 0.05 * soil[inside].sum()


def test_label_extent_west(plain, tmp_path):
    scene = make_scene(tmp_path, **PLAIN, label_extent="west", missing_labels=0)
    assert gpd.read_file(plain.truth).geometry.geom_equals_exact(gpd.read_file(scene.truth).geometry, 1e-12).all()
    _, _, (left, bottom, right, top) = _ground_res(plain)
    mid = (left + right) / 2
    labels = gpd.read_file(scene.labels).to_crs("EPSG:3857")
    truth = gpd.read_file(scene.truth)
    truth = truth[truth.year == 2019].to_crs("EPSG:3857")
    assert 0 < len(labels) < len(truth)
    assert (labels.centroid.x < mid).all()
    assert (truth.centroid.x > mid + 100).sum() > 0  # mines in the east that no one labelled
    area = gpd.read_file(scene.labelled_area)
    assert area.crs.to_epsg() == 4326 and len(area) == 1 and area.extent.iloc[0] == "west"
    a = area.to_crs("EPSG:3857").geometry.iloc[0]
    assert a.bounds == pytest.approx((left, bottom, mid, top), abs=1.0)
    assert a.area == pytest.approx((mid - left) * (top - bottom), rel=1e-3)
    whole = gpd.read_file(plain.labelled_area).to_crs("EPSG:3857").geometry.iloc[0]
    assert whole.bounds == pytest.approx((left, bottom, right, top), abs=1.0)
    assert whole.covers(a) and whole.area == pytest.approx(2 * a.area, rel=1e-3)


def _river_distance_m(scene, year=2019):
    """Metres from each truth polygon of ``year`` to the river: dark water (NIR < 450) off the mines."""
    data, transform, crs = _mosaic(scene, year)
    mines = binary_dilation(_truth_mask(scene, year, data.shape[1:], transform, crs), iterations=2)
    river = (data[3] < 450) & ~mines
    dist = distance_transform_edt(~river) * transform.a
    truth = gpd.read_file(scene.truth)
    out = []
    for g in truth[truth.year == year].to_crs(crs).geometry:
        inside = rasterize([(g, 1)], out_shape=data.shape[1:], transform=transform) > 0
        out.append(dist[inside].min() if inside.any() else np.inf)
    return np.array(out)


def test_dredging_sites_lie_along_the_river(plain, tmp_path):
    scene = make_scene(tmp_path, **PLAIN, dredging=True)
    truth, before = gpd.read_file(scene.truth), gpd.read_file(plain.truth)
    assert len(truth) == len(before) and (truth.mine.values == before.mine.values).all()
    dist, dist_plain = _river_distance_m(scene), _river_distance_m(plain)
    n = (truth.year == 2019).sum()
    moved = dist != dist_plain  # the mines that became dredging sites: a third, all at the river
    assert n == 8 and moved.sum() == round(n / 3) and (dist[moved] <= 50).all(), (dist, dist_plain)
    # a site is a string of blobs: several parts, or one long outline
    sites = truth[truth.year == 2019][moved]
    assert sites.geometry.apply(lambda g: shapely.get_num_geometries(g) > 1 or
                                g.minimum_rotated_rectangle.length > 3 * np.sqrt(g.area)).any()
    data, transform, crs = _mosaic(scene, 2019)
    inside = binary_erosion(_truth_mask(scene, 2019, data.shape[1:], transform, crs))
    forest = (data[3] > 2400) & (data[0] < 600)
    assert forest[inside].mean() < 0.05  # the sites are worked ground and water, not forest
    assert len(gpd.read_file(scene.labels)) == n - 1


def test_dredging_only(tmp_path):
    scene = make_scene(tmp_path, **dict(PLAIN, n_mines=6), dredging=1.0, missing_labels=0)
    d = _river_distance_m(scene)
    assert (d <= 50).mean() >= 0.8, d


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_missing_share(plain, tmp_path, share):
    every = make_scene(tmp_path / "every", **PLAIN, missing_labels=0)
    scene = make_scene(tmp_path / "share", **PLAIN, missing_labels=0, missing_share=share)
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(every).values(), _arrays(scene).values()))
    truth = gpd.read_file(scene.truth)
    n = (truth.year == 2019).sum()
    labels, full = gpd.read_file(scene.labels), gpd.read_file(every.labels)
    assert len(labels) == n - round(share * n) and len(full) == n
    # the labels kept are drawn exactly as without the share: a subset
    kept = shapely.equals_exact(np.array(list(labels.geometry))[:, None], np.array(list(full.geometry))[None, :],
                                1e-12)
    assert (kept.sum(1) == 1).all()
    both = make_scene(tmp_path / "both", **PLAIN, missing_labels=2, missing_share=share)
    assert len(gpd.read_file(both.labels)) == n - 2 - round(share * n)


def test_seasonal_land_changes_off_the_mines(plain, tmp_path):
    scene = make_scene(tmp_path, **PLAIN, seasonal=True)
    assert gpd.read_file(plain.truth).geometry.geom_equals_exact(gpd.read_file(scene.truth).geometry, 1e-12).all()

    def bare(data):
        red, blue, nir = (data[i].astype(float) for i in (0, 2, 3))
        return (red > 1200) & (red > 1.3 * blue) & (nir < 2500)

    changes = {}
    for name, s in (("plain", plain), ("seasonal", scene)):
        d0, transform, crs = _mosaic(s, 2019)
        d1, _, _ = _mosaic(s, 2020)
        mines = binary_dilation(_truth_mask(s, 2019, d0.shape[1:], transform, crs)
                                | _truth_mask(s, 2020, d0.shape[1:], transform, crs), iterations=3)
        nir_change = np.abs(d1[3].astype(float) / d0[3] - 1) > 0.4  # drift and phenology reach ~0.3
        new_bare = bare(d1) & ~bare(d0)
        changes[name] = (nir_change & ~mines).sum(), (new_bare & ~mines).sum()
        # nothing seasonal on the mines: their ground is bare in both years
        inner = binary_erosion(mines, iterations=6)
        assert (nir_change & inner).mean() < 0.01
    size = PLAIN["size"] ** 2
    assert changes["plain"][0] < 0.0005 * size and changes["plain"][1] < 50
    assert changes["seasonal"][0] > 0.005 * size  # fields turned green or ploughed, land cleared
    assert changes["seasonal"][1] > 300  # land cleared or ploughed in 2020 that is no mine


def test_hazy_and_cloudy_years_by_index(tmp_path):
    scene = make_scene(tmp_path, years=(2019, 2020, 2021), size=256, n_mines=8, seed=7, hazy_year=-2,
                       cloudy_year=-1)
    d = {y: _mosaic(scene, y)[0] for y in scene.years}
    assert np.percentile(d[2020][0], 5) > 1.5 * np.percentile(d[2019][0], 5)  # 2020 hazy
    assert (d[2021] > 5000).all(0).mean() > 0.02 and not (d[2020] > 5000).all(0).any()  # 2021 cloudy
    with pytest.raises(ValueError):
        make_scene(tmp_path / "x", years=(2019, 2020), size=128, hazy_year=-3)


def test_forty_mines_fit():
    for size, scale in ((1536, 1.0), (1536, 4.75 / 10), (512, 1.0)):
        for seed in range(3):
            assert len(_plan_mines(np.random.default_rng(seed), size, [2019, 2020, 2021], 40, scale)) == 40


# --- the family -------------------------------------------------------------------------------------------------

def _region(spec):
    return [name for name, (x0, x1, y0, y1) in REGIONS.items()
            if x0 <= spec["lon"] <= x1 and y0 <= spec["lat"] <= y1]


def test_draw_scene_spec_covers_the_family():
    specs = [draw_scene_spec(seed) for seed in range(200)]
    assert specs == [draw_scene_spec(seed) for seed in range(200)]  # deterministic per seed
    assert len({tuple(sorted(s.items())) for s in specs}) == 200
    params = inspect.signature(make_scene).parameters
    values = {}
    for seed, s in enumerate(specs):
        assert s["seed"] == seed and set(s) <= set(params) and "years" not in s and "size" not in s
        assert len(_region(s)) == 1
        if s["gsd_m"] == 4.77:
            assert s["crs"] in ("EPSG:3857", "EPSG:4326")
        else:
            assert s["gsd_m"] == 10
            if s["crs"] != "EPSG:4326":  # the UTM zone of the scene's centre
                zone = int((s["lon"] + 180) // 6) + 1
                assert s["crs"] == f"EPSG:{(32600 if s['lat'] >= 0 else 32700) + zone}"
        assert 8 <= s["n_mines"] <= 40 and 0 <= s["missing_share"] <= 0.2 and 0 <= s["label_offset_m"] <= 10
        crs = s["crs"] if s["crs"] in ("EPSG:3857", "EPSG:4326") else "UTM"
        dredging = {False: "pits", 1.0: "dredging"}.get(s["dredging"], "both")
        if dredging == "both":
            assert 0.2 <= s["dredging"] <= 0.5
        for key, v in (("crs", crs), ("dredging", dredging), ("region", _region(s)[0]),
                       *((k, s[k]) for k in ("mine_soil", "gsd_m", "hazy_year", "cloudy_year", "seasonal",
                                             "confusers", "nodata_edges", "label_extent", "pond_colours",
                                             "quads", "n_mines"))):
            values.setdefault(key, set()).add(v)
    assert values["mine_soil"] == set(MINE_SOIL_CHOICES)
    assert values["gsd_m"] == {4.77, 10.0} and values["crs"] == {"EPSG:3857", "EPSG:4326", "UTM"}
    assert values["dredging"] == {"pits", "both", "dredging"} and values["region"] == set(REGIONS)
    assert values["hazy_year"] == values["cloudy_year"] == {None, -1, -2}
    for key in ("seasonal", "confusers", "nodata_edges", "pond_colours"):
        assert values[key] == {False, True}, key
    assert values["label_extent"] == {"all", "west"} and values["quads"] == {1, 2, 3}
    assert min(values["n_mines"]) == 8 and max(values["n_mines"]) == 40
    west = sum(s["label_extent"] == "west" for s in specs)
    assert 30 <= west <= 70  # about 1 in 4
    shares = np.array([s["missing_share"] for s in specs])
    assert shares.min() < 0.02 and shares.max() > 0.18


def test_drawn_specs_make_scenes(tmp_path):
    specs = [draw_scene_spec(seed) for seed in range(200)]
    # a 10 m UTM scene of dredging sites labelled in the west only, and a 4.77 m one in EPSG:4326
    picks = [next(s for s in specs if s["gsd_m"] == 10 and s["crs"].startswith("EPSG:32") and s["dredging"]
                  and s["label_extent"] == "west"),
             next(s for s in specs if s["gsd_m"] == 4.77 and s["crs"] == "EPSG:4326" and s["seasonal"])]
    for s in picks:
        scene = make_scene(tmp_path / str(s["seed"]), years=(2019, 2020, 2021), size=256, **s)
        truth, labels = gpd.read_file(scene.truth), gpd.read_file(scene.labels)
        assert len(truth) and scene.labelled_area.is_file()
        assert len(labels) <= (truth.year == 2019).sum()
        with rasterio.open(_files(scene, 2019)[0]) as src:
            assert src.crs == rasterio.crs.CRS.from_user_input(s["crs"])


def test_clouds_reaching_past_the_scene_edge():
    """Puffs of a cloud centred off the scene (seed 4 at 768 px drew them) give an empty window, not a crash."""
    from minemap.synthetic import _CLOUDS, _cumulus, _window

    rows, cols, dy, dx = _window(100, -30.0, -30.0, 5.0)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (0, 0) and dy.shape == (0, 1) and dx.shape == (1, 0)
    for seed in (4, 8, 10):
        alpha, darken, bright = _cumulus(np.random.default_rng([seed, _CLOUDS]), 768)
        assert alpha.shape == (768, 768) and 0.04 < (alpha > 0.5).mean() < 0.2


def test_cloud_truth_is_warped_with_the_imagery(tmp_path):
    scene = make_scene(tmp_path, **PLAIN, cloudy_year=2020, crs="EPSG:32630")
    cloudy, transform, crs = _mosaic(scene, 2020)
    with rasterio.open(tmp_path / "clouds_2020.tif") as src:
        hidden = src.read(1)
        assert (src.transform, src.crs, hidden.shape) == (transform, crs, cloudy.shape[1:])
    assert (hidden[(cloudy > 5000).all(0)] == 1).mean() > 0.99
    assert (hidden[(cloudy == 0).all(0)] == 0).all()  # nothing outside the warped footprint
