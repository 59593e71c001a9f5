"""Clouds and shadows found in one year's own pixels (minemap.masks): known answers on synthetic tiles."""

import logging

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, gaussian_filter, maximum_filter

from minemap import masks
from minemap.masks import changed_since, find_obscured, obscured_mask

BANDS = ["red", "green", "blue", "nir"]
# reflectance x 10,000 (R, G, B, NIR)
FOREST = np.array([350, 600, 380, 3000], np.float32)
SOIL = np.array([2100, 1750, 1250, 2300], np.float32)  # mine soil: red well above blue
POND = np.array([1000, 1150, 900, 600], np.float32)
WATER = np.array([300, 450, 500, 250], np.float32)
ROOF = np.array([2300, 2300, 2350, 2450], np.float32)
TAILINGS = np.array([1800, 1800, 1750, 1900], np.float32)
KAOLIN = np.array([3200, 3100, 2800, 3300], np.float32)
SAND = np.array([3000, 3000, 2900, 3100], np.float32)  # very light sand
HAZE = np.array([2100, 2150, 2250, 2300], np.float32)
CLOUD = np.array([6000, 6000, 6200, 6500], np.float32)
SIZE = 256


def _smooth(rng, sigma):
    f = gaussian_filter(rng.standard_normal((SIZE, SIZE)).astype(np.float32), sigma)
    return f / f.std()


def _disk(cy, cx, r):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2


def _ground(rng, mine_radius=40):
    """Textured forest with a mine (soil, a pond) in the middle and a river along the bottom; the mine's mask."""
    img = FOREST[:, None, None] * (1 + 0.12 * _smooth(rng, 12))[None]
    mine = _disk(128, 128, mine_radius)
    img[:, mine] = (SOIL[:, None, None] * (1 + 0.08 * _smooth(rng, 3))[None])[:, mine]
    img[:, _disk(128, 128 - mine_radius // 2, mine_radius // 4)] = POND[:, None]
    img[:, 236:246] = WATER[:, None, None]
    return img, mine


def _observe(rng, img):
    return (img * (1 + 0.03 * rng.standard_normal(img.shape))).astype(np.float32)


def _cumulus(offset=(20, -25)):
    """A thick cloud over the mine's edge and a thin one (half opaque) over forest, soft-edged (opacity); the
    shadows' factor on the ground: the same blobs shifted by ``offset``, dimming to about half."""
    hard = _disk(95, 150, 22) | _disk(80, 170, 12)
    thin = _disk(190, 60, 16)
    alpha = gaussian_filter(hard.astype(np.float32), 2) + 0.5 * gaussian_filter(thin.astype(np.float32), 2)
    shadow = np.zeros_like(alpha)
    dy, dx = offset
    shadow[max(dy, 0):SIZE + min(dy, 0), max(dx, 0):SIZE + min(dx, 0)] = \
        alpha[max(-dy, 0):SIZE + min(-dy, 0), max(-dx, 0):SIZE + min(-dx, 0)]
    return alpha, 1 - 0.5 * shadow


def test_a_mine_that_grows_into_forest_is_not_masked():
    """One year forest around a mine, the next the mine has eaten into the forest (red, green and blue up 3-5 x,
    near infrared down): each year alone shows no cloud and no shadow, so nothing is masked."""
    rng = np.random.default_rng(0)
    valid = np.ones((SIZE, SIZE), bool)
    before, _ = _ground(rng, mine_radius=25)
    after, mine = _ground(rng, mine_radius=60)
    for img in (before, after):
        hidden = obscured_mask(_observe(rng, img), valid, BANDS)
        assert not hidden[mine].any() and hidden.mean() < 0.001


def test_a_cloud_over_a_mine_and_its_shadow_are_masked():
    """A thick cloud over a mine's edge, a thin one over forest, and their shadows beside them: the clouds, their
    shadows (found at the sun's offset) are masked; the mine beyond them is not."""
    rng = np.random.default_rng(1)
    ground, mine = _ground(rng)
    alpha, darken = _cumulus()
    img = (1 - alpha) * ground * darken + alpha * CLOUD[:, None, None]
    found = find_obscured(_observe(rng, img), np.ones((SIZE, SIZE), bool), BANDS)
    assert found.offset is not None and abs(found.offset[0] - 20) <= 2 and abs(found.offset[1] + 25) <= 2
    hidden = found.mask
    cloud, shadow = alpha > 0.3, (darken < 0.85) & (alpha <= 0.3)
    assert hidden[cloud].mean() > 0.95 and hidden[shadow].mean() > 0.9
    assert hidden[cloud & mine].mean() > 0.95 and hidden[(darken < 0.85) & mine].mean() > 0.85
    thin = _disk(190, 60, 14)
    assert hidden[thin].all()  # half opaque: a thin cloud is a cloud too
    clear = (alpha < 0.02) & (darken > 0.99)
    assert hidden[clear & mine].mean() < 0.02 and hidden[clear].mean() < 0.02


@pytest.mark.parametrize("patchy", [False, True])
def test_a_haze_over_the_whole_tile_is_not_masked(patchy):
    """A haze over the whole tile (a third of the light from the haze, or 15-40 % varying over the tile) is
    radiometric normalisation's business: no pixel of it is a cloud, or else a hazy year would be all nodata.
    A thick cloud in the hazy tile is still found (its shadow falls on the mine, which under the haze is too
    unlike the rest of the tile to be told from ground of another colour: it is kept as a thick cloud)."""
    rng = np.random.default_rng(2)
    ground, mine = _ground(rng)
    h = np.clip(0.27 + 0.08 * _smooth(rng, 60), 0.15, 0.4) if patchy else np.full((SIZE, SIZE), 0.3, np.float32)
    hazy = (1 - h) * ground + h * HAZE[:, None, None]
    valid = np.ones((SIZE, SIZE), bool)
    assert not obscured_mask(_observe(rng, hazy), valid, BANDS).any()
    alpha, darken = _cumulus()
    cloudy = (1 - alpha) * ((1 - h) * ground * darken + h * HAZE[:, None, None]) + alpha * CLOUD[:, None, None]
    hidden = obscured_mask(_observe(rng, cloudy), valid, BANDS)
    assert hidden[(alpha > 0.3) & (_disk(95, 150, 22) | _disk(80, 170, 12))].mean() > 0.95
    assert hidden[mine & (alpha < 0.02) & (darken > 0.99)].mean() < 0.02


@pytest.mark.parametrize("patchy", [False, True])
def test_ground_that_changed_since_the_labels_year(patchy, caplog):
    """The same forest two years apart: a mine grew from 25 to 45 px and a small pit was abandoned and grown
    over; the later year under a haze (uniform, or 15-40 % varying over the tile). The grown ring lost its
    vegetation and the abandoned pit gained it; the forest, the pit's old ground and the river did not change,
    whatever the haze does to their colours. Without a near infrared band there is no measure."""
    rng = np.random.default_rng(5)
    forest = FOREST[:, None, None] * (1 + 0.12 * _smooth(rng, 12))[None]
    soil = SOIL[:, None, None] * (1 + 0.08 * _smooth(rng, 3))[None]
    old, grown, pit = _disk(128, 128, 25), _disk(128, 128, 45), _disk(50, 50, 15)
    before, after = forest.copy(), forest.copy()
    before[:, old | pit] = soil[:, old | pit]
    after[:, grown] = soil[:, grown]
    for img in (before, after):
        img[:, 236:246] = WATER[:, None, None]
    h = np.clip(0.27 + 0.08 * _smooth(rng, 60), 0.15, 0.4) if patchy else np.full((SIZE, SIZE), 0.25, np.float32)
    after = (1 - h) * after + h * HAZE[:, None, None]
    valid = np.ones((SIZE, SIZE), bool)
    lost, gained = changed_since(_observe(rng, before), _observe(rng, after), valid, BANDS)
    ring = _disk(128, 128, 43) & ~_disk(128, 128, 27)
    still = ~_disk(128, 128, 48) & ~_disk(50, 50, 18)
    assert lost[ring].mean() > 0.98 and gained[_disk(50, 50, 13)].mean() > 0.98
    assert lost[still].mean() < 0.01 and gained[still].mean() < 0.01
    assert not lost[_disk(128, 128, 23)].any() and not gained[_disk(128, 128, 23)].any()
    masks._warned.discard(("changed_since", tuple(BANDS[:3])))
    with caplog.at_level("WARNING", logger="minemap.masks"):
        assert changed_since(before[:3], after[:3], valid, BANDS[:3]) is None
        assert changed_since(before[:3], after[:3], valid, BANDS[:3]) is None  # said once, not once a block
    said = [r.getMessage() for r in caplog.records if "near infrared" in r.getMessage()]
    assert len(said) == 1 and "not left out of the other years' training" in said[0]


def test_bright_ground_casting_no_shadow_is_not_a_cloud():
    """White and grey ground (kaolin and tailings mines, very light sand, roofs) can look like a thin cloud
    pixel by pixel, but casts no shadow: without clouds nothing is masked; with clouds beside them, only the
    clouds and their shadows are."""
    rng = np.random.default_rng(3)
    img = FOREST[:, None, None] * (1 + 0.12 * _smooth(rng, 12))[None]
    patches = {"kaolin": (_disk(60, 60, 30), KAOLIN), "tailings": (_disk(60, 190, 25), TAILINGS),
               "sand": (_disk(200, 200, 20), SAND)}
    roofs = np.zeros((SIZE, SIZE), bool)
    for y, x in rng.integers(150, 230, (12, 2)):
        roofs[y - 3:y + 3, x - 120:x - 114] = True
    patches["roofs"] = (roofs, ROOF)
    for where, value in patches.values():
        img[:, where] = value[:, None]
    valid = np.ones((SIZE, SIZE), bool)
    assert not obscured_mask(_observe(rng, img), valid, BANDS).any()
    alpha, darken = _cumulus()
    cloudy = (1 - alpha) * img * darken + alpha * CLOUD[:, None, None]
    hidden = obscured_mask(_observe(rng, cloudy), valid, BANDS)
    assert hidden[alpha > 0.3].mean() > 0.95
    for name, (where, _) in patches.items():
        away = where & (alpha < 0.02) & (darken > 0.99)
        assert hidden[away].mean() < 0.05, name


def test_water_is_dark_but_no_shadow():
    """Ponds and rivers are dark, but mostly in the near infrared, with blue and green up: as bright as other
    water, they are not shadows, even beside a cloud whose shadow falls elsewhere."""
    rng = np.random.default_rng(4)
    ground, _ = _ground(rng)
    ponds = _disk(200, 180, 15) | _disk(40, 40, 12)
    ground[:, ponds] = POND[:, None]
    alpha, darken = _cumulus()
    img = (1 - alpha) * ground * darken + alpha * CLOUD[:, None, None]
    hidden = obscured_mask(_observe(rng, img), np.ones((SIZE, SIZE), bool), BANDS)
    water = (ponds | (np.arange(SIZE)[:, None] >= 236) & (np.arange(SIZE)[:, None] < 246)) & (darken > 0.99) \
        & (alpha < 0.02)
    assert not hidden[water].any()


def test_without_red_or_blue_nothing_is_masked(caplog):
    rng = np.random.default_rng(5)
    ground, _ = _ground(rng)
    alpha, darken = _cumulus()
    img = _observe(rng, (1 - alpha) * ground * darken + alpha * CLOUD[:, None, None])
    valid = np.ones((SIZE, SIZE), bool)
    masks._warned.clear()
    with caplog.at_level(logging.WARNING, logger="minemap.masks"):
        for _ in range(2):
            assert not obscured_mask(img, valid, ["nir", "green", "swir", "red"]).any()
    assert sum("lack red or blue" in r.message for r in caplog.records) == 1  # logged once
    # without near infrared, the visible bands suffice; no data is never judged, whatever it holds
    assert obscured_mask(img[:3], valid, BANDS[:3])[alpha > 0.3].mean() > 0.9
    assert not obscured_mask(img, np.zeros_like(valid), BANDS).any()
    holes = img.copy()
    holes[:, :40] = np.nan
    hidden = obscured_mask(holes, np.isfinite(holes).all(0), BANDS)
    assert hidden[(alpha > 0.3) & (np.arange(SIZE)[:, None] >= 44)].mean() > 0.9 and not hidden[:40].any()
    # integers (reflectance as read from uint16 files) are taken as numbers, not wrapped around
    assert np.array_equal(obscured_mask(img.astype(np.uint16), valid, BANDS),
                          obscured_mask(img.astype(np.uint16).astype(np.float32), valid, BANDS))


def test_morphology_helpers_match_scipy():
    a = np.random.default_rng(6).random((97, 61)) > 0.97
    for px in (1, 2, 3):
        assert np.array_equal(masks._grow(a, px), binary_dilation(a, iterations=px))
    for px in (0, 1, 4, 10):
        assert np.array_equal(masks._near(a, px), maximum_filter(a, size=2 * px + 1, mode="constant"))


def test_rates_on_a_generated_scene(tmp_path):
    """On a synthetic scene (768 px, cumulus in 2020, haze in 2021): in the clear and the hazy year at most
    0.5 % of the true mine pixels are masked; in the cloudy year at least 90 % of the cloud (opacity > 0.3) and
    of the shadow (light < 0.85) pixels are, and at most 2 % of the mine pixels outside them."""
    import geopandas as gpd
    from rasterio.features import rasterize

    from minemap.imagery import open_imagery
    from minemap.synthetic import _CLOUDS, _cumulus, make_scene

    seed, size = 1, 768
    scene = make_scene(tmp_path / "scene", years=(2019, 2020, 2021), size=size, seed=seed, cloudy_year=2020,
                       hazy_year=2021)
    alpha, darken, _ = _cumulus(np.random.default_rng([seed, _CLOUDS]), size)
    source = open_imagery(scene.imagery)
    truth = gpd.read_file(scene.truth)
    for year in scene.years:
        grid = source.grid(year)
        assert (grid.width, grid.height) == (size, size)
        pixels, valid = source.read(year, grid)
        geoms = truth[truth["year"] == year].to_crs(grid.crs).geometry
        mine = rasterize([(g, 1) for g in geoms], out_shape=(size, size), transform=grid.transform) > 0
        hidden = obscured_mask(pixels, valid, source.band_names)
        if year != 2020:
            assert hidden[mine].mean() <= 0.005, (year, hidden[mine].mean())
            continue
        cloud, shadow = alpha > 0.3, darken < 0.85
        outside = ~cloud & ~shadow
        rates = (hidden[cloud].mean(), hidden[shadow & ~cloud].mean(), hidden[mine & outside].mean())
        assert rates[0] >= 0.9 and rates[1] >= 0.9 and rates[2] <= 0.02, rates
