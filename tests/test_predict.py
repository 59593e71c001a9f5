import os
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch

from minemap.config import PredictConfig
from minemap.errors import ImageryError
from minemap.model import load_model, read_card, save_model
from minemap.lattice import window_origins
from minemap.predict import blend_weights, check_compatible, predict, predict_array
from minemap.formats.rasters import NODATA
from minemap.imagery import open_imagery


class PixelModel(torch.nn.Module):
    """A stand-in whose logit at each pixel depends on that pixel alone: blending must reproduce it exactly."""

    def forward(self, pixel_values):
        return SimpleNamespace(logits=pixel_values[:, :1] * 2.0 - pixel_values[:, 3:4])


@pytest.mark.parametrize("window, stride", [(64, 32), (64, 56), (512, 480)])
def test_blend_weights_sum_to_one_where_ramps_meet(window, stride):
    w = blend_weights(window, window - stride)
    n = 4
    total = np.zeros((window + stride * n, window + stride * n))
    for r in range(0, stride * n + 1, stride):
        for c in range(0, stride * n + 1, stride):
            total[r:r + window, c:c + window] += w
    assert np.allclose(total[window:-window, window:-window], 1.0)


def test_window_origins_lie_on_one_lattice():
    # the windows over [100, 300) with 64 px windows every 48 px: every window overlapping it, and no other
    assert window_origins(100, 200, 64, 48) == [48, 96, 144, 192, 240, 288]
    # two tilings of the same span run the same windows over each pixel
    left, right = window_origins(100, 100, 64, 48), window_origins(200, 100, 64, 48)
    assert sorted(set(left) | set(right)) == window_origins(100, 200, 64, 48)
    assert window_origins(-100, 50, 64, 48) == [-144, -96]


def test_sliding_windows_have_no_seams():
    card = SimpleNamespace(chip_size=32, band_mean=[0.0] * 4, band_std=[1.0] * 4, calibrate=torch.sigmoid)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(4, 100, 77)).astype(np.float32)
    valid = np.ones((100, 77), bool)
    prob = predict_array(PixelModel(), card, pixels, valid, overlap=0.5, batch_size=5)
    expected = 1 / (1 + np.exp(-(pixels[0] * 2 - pixels[3])))
    assert np.allclose(prob, expected, atol=1e-5)


def _pixel_model_dir(scene, tmp_path):
    """A saved model directory whose card matches the scene; weights from a real mit-b0."""
    from minemap.model import ModelCard, build_model

    src = open_imagery(scene.imagery)
    g = src.grid(2019)
    card = ModelCard(encoder="mit-b0", bands=src.band_names, band_mean=[1000.0] * 4, band_std=[800.0] * 4,
                     gsd_m=4.75, pixel_size=list(g.res), crs="EPSG:3857", chip_size=64, threshold=0.5)
    return save_model(build_model("mit-b0", 4), card, tmp_path / "model")


def _mosaic(folder, grid, tile_size):
    """The tiles of ``folder`` put back together on ``grid`` (255 where none)."""
    from minemap.grid import make_tiles

    full = np.full((grid.height, grid.width), 255, np.uint8)
    for t in make_tiles(grid, tile_size):
        with rasterio.open(folder / f"{t.tile_id}.tif") as src:
            assert (src.width, src.height) == (t.width, t.height)
            assert src.transform.c == pytest.approx(t.grid(grid).transform.c)
            full[t.row_off:t.row_off + t.height, t.col_off:t.col_off + t.width] = src.read(1)
    return full


def test_predict_tiles_are_cogs_and_resume(scene, tmp_path, monkeypatch):
    from minemap.grid import make_tiles
    from minemap.imagery import open_imagery

    model_dir = _pixel_model_dir(scene, tmp_path)
    real_load = load_model
    monkeypatch.setattr("minemap.predict.load_model", lambda d, dev: (PixelModel(), real_load(d, dev)[1]))
    cfg = PredictConfig(tile_size=200)
    grid = open_imagery(scene.imagery).grid(2019)
    tiles = make_tiles(grid, 200)
    outs = predict(model_dir, scene.imagery, [2019, 2020], tmp_path / "probs", cfg, progress=False)
    assert len(outs) == 2 * len(tiles) >= 2 * 4 and all(p.is_file() for p in outs)
    with rasterio.open(outs[0]) as src:
        assert src.dtypes[0] == "uint8" and src.nodata == NODATA and src.profile["tiled"]
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.read(1).max() <= 250
    # tiles agree with a prediction of the whole scene in larger tiles (no seams between tiles)
    predict(model_dir, scene.imagery, [2019], tmp_path / "whole", PredictConfig(tile_size=4096), progress=False)
    tiled = _mosaic(tmp_path / "probs" / "2019", grid, 200)
    whole = _mosaic(tmp_path / "whole" / "2019", grid, 4096)
    diff = np.abs(tiled.astype(int) - whole.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # equal up to rounding at a half level
    stamp = {p: os.stat(p).st_mtime_ns for p in outs}
    predict(model_dir, scene.imagery, [2019, 2020], tmp_path / "probs", cfg, progress=False)
    assert all(os.stat(p).st_mtime_ns == stamp[p] for p in outs)  # resumed: nothing redone
    outs[2].unlink()
    predict(model_dir, scene.imagery, [2019, 2020], tmp_path / "probs", cfg, progress=False)
    assert outs[2].is_file() and os.stat(outs[0]).st_mtime_ns == stamp[outs[0]]
    predict(model_dir, scene.imagery, [2019], tmp_path / "probs", cfg, overwrite=True, progress=False)
    assert os.stat(outs[0]).st_mtime_ns != stamp[outs[0]]


def test_incompatible_imagery_refused(scene, tmp_path):
    model_dir = _pixel_model_dir(scene, tmp_path)
    card = read_card(model_dir)
    src = open_imagery(scene.imagery)
    with pytest.raises(ImageryError, match=r"imagery bands \['nir', 'red', 'green', 'blue'\] do not match"):
        check_compatible(card, open_imagery(scene.imagery, bands=["nir", "red", "green", "blue"]), 2019)
    coarse = card.model_copy(update={"gsd_m": 10.0})
    with pytest.raises(ImageryError, match=r"ground sample distance of 4.75 m, the model was trained at 10.00 m"):
        check_compatible(coarse, src, 2019)
    with pytest.raises(ImageryError, match="no imagery folder for year 2030"):
        predict(model_dir, scene.imagery, [2030], tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


def test_worker_processes_match_serial(scene, tmp_path):
    model_dir = _pixel_model_dir(scene, tmp_path)
    cfg = PredictConfig(tile_size=200)
    serial = predict(model_dir, scene.imagery, [2019], tmp_path / "serial", cfg, progress=False)
    parallel = predict(model_dir, scene.imagery, [2019], tmp_path / "parallel", cfg, workers=2, progress=False)
    for a, b in zip(serial, parallel):
        with rasterio.open(a) as x, rasterio.open(b) as y:
            assert np.array_equal(x.read(1), y.read(1))


def test_year_radiometry_undoes_a_gain_and_offset(tmp_path):
    """A year that is the training year x 0.8 + 300 (haze-like), with a bright cloud on 6 % of it: the fit finds
    the inverse on the pixels that stayed the same, and the cloud does not pull it."""
    from affine import Affine

    from conftest import write_raster
    from minemap.radiometry import apply, year_radiometry

    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 500.0, (4, 300, 300)).astype(np.float32) + 100
    later = base * 0.8 + 300 + rng.normal(0, 10, base.shape).astype(np.float32)  # sensor noise
    later[:, :60, :90] = 6000  # a cloud
    t = Affine(4.0, 0, 0, 0, -4.0, 0)
    names = ("red", "green", "blue", "nir")
    write_raster(tmp_path / "img" / "2019" / "a.tif", base, t, descriptions=names)
    write_raster(tmp_path / "img" / "2020" / "a.tif", later, t, descriptions=names)
    rad = year_radiometry(open_imagery(tmp_path / "img"), [2019, 2020], 2019, "global")
    assert set(rad) == {2020}
    assert rad[2020]["gain"] == pytest.approx([1.25] * 4, rel=0.01)
    assert rad[2020]["offset"] == pytest.approx([-375.0] * 4, abs=15.0)
    assert 0.85 < rad[2020]["invariant_share"] < 0.97  # the cloud is out
    assert np.abs(apply(later[:, 100:, 100:], rad[2020]) - base[:, 100:, 100:]).mean() < 20
    assert year_radiometry(open_imagery(tmp_path / "img"), [2020], 2017, "global") == {}  # no such year


def test_tta_averages_the_four_flips():
    """A pixel model is flip-equivariant, so test-time flips change nothing; a model that looks at its left
    neighbour is not, and flips average its four views."""
    card = SimpleNamespace(chip_size=16, band_mean=[0.0] * 4, band_std=[1.0] * 4, calibrate=torch.sigmoid)
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(4, 16, 16)).astype(np.float32)
    valid = np.ones((16, 16), bool)
    plain = predict_array(PixelModel(), card, pixels, valid)
    assert np.allclose(predict_array(PixelModel(), card, pixels, valid, tta=True), plain, atol=1e-6)

    class LeftNeighbour(torch.nn.Module):
        def forward(self, pixel_values):
            return SimpleNamespace(logits=torch.roll(pixel_values[:, :1], 1, dims=-1))

    from minemap.predict import window_probability

    x = torch.from_numpy(pixels[None])
    views = [torch.sigmoid(torch.roll(x[:, 0], 1, -1)),
             torch.sigmoid(torch.roll(x[:, 0].flip(-1), 1, -1)).flip(-1),
             torch.sigmoid(torch.roll(x[:, 0].flip(-2), 1, -1)).flip(-2),
             torch.sigmoid(torch.roll(x[:, 0].flip((-2, -1)), 1, -1)).flip((-2, -1))]
    got = window_probability(LeftNeighbour(), card, x, tta=True)
    assert torch.allclose(got, sum(views) / 4, atol=1e-6)


def test_local_radiometry_undoes_patchy_haze_and_tiles_agree(tmp_path):
    """Haze whose thickness changes across the scene: one gain per band cannot undo it, gain fields can; and
    a tile normalised alone equals the same pixels normalised with the whole grid."""
    from affine import Affine
    from scipy.ndimage import gaussian_filter

    from conftest import write_raster
    from minemap.radiometry import apply, year_radiometry

    rng = np.random.default_rng(4)
    size = 256
    base = (600 * (1 + 0.3 * gaussian_filter(rng.normal(size=(4, size, size)), (0, 2, 2)) * 3)
            + np.array([0, 200, 100, 2400])[:, None, None]).astype(np.float32)
    alpha = np.linspace(0.05, 0.4, size)[None, None, :] * np.ones((1, size, 1))  # thicker to the east
    hazy = ((1 - alpha) * base + alpha * 2200).astype(np.float32)
    t = Affine(4.0, 0, 0, 0, -4.0, 0)
    names = ("red", "green", "blue", "nir")
    write_raster(tmp_path / "img" / "2019" / "a.tif", base, t, descriptions=names)
    write_raster(tmp_path / "img" / "2020" / "a.tif", hazy, t, descriptions=names)
    src = open_imagery(tmp_path / "img")
    err = {}
    for mode in ("global", "local"):
        r = year_radiometry(src, [2020], 2019, mode)[2020]
        err[mode] = np.abs(apply(hazy, r) - base).mean()
        if mode == "local":
            tile = apply(hazy[:, 64:160, 96:200], r, col_off=96, row_off=64)
            assert np.allclose(tile, apply(hazy, r)[:, 64:160, 96:200], atol=1e-3)
    before = np.abs(hazy - base).mean()
    assert err["local"] < 0.5 * err["global"] and err["global"] < before, (before, err)


def test_clouds_are_nodata_not_no_mine():
    """Pixels brighter in every band than anything the model was trained on are opaque cloud: the probability
    raster says 'no observation' there (with a 2 px rim for the soft edge), not 'no mine'."""
    from minemap.predict import cloud_mask
    from minemap.model import ModelCard

    card = ModelCard(encoder="mit-b0", bands=["red", "green", "blue", "nir"], band_mean=[0.0] * 4,
                     band_std=[1.0] * 4, gsd_m=4.75, pixel_size=[4.77, 4.77], crs="EPSG:3857", chip_size=32,
                     cloud_level=[4000.0, 4000.0, 4000.0, 5000.0])
    pixels = np.full((4, 40, 40), 1000, np.float32)
    pixels[:, 10:20, 10:20] = 6000  # a cloud
    pixels[:3, 30:35, 30:35] = 6000  # bright in the visible only (a roof, bare sand): not a cloud
    m = cloud_mask(pixels, card)
    # grown by 2 px (4-connected steps: the rim's corners are cut)
    assert m[10:20, 8:22].all() and m[8:22, 10:20].all() and m.sum() == 100 + 4 * 2 * 10 + 4
    assert not m[28:37, 28:37].any()
    card.cloud_level = None  # an older card: nothing is masked
    assert not cloud_mask(pixels, card).any()


def test_local_radiometry_gain_is_not_lowered_by_noise(tmp_path):
    """Sensor noise grows with brightness, so a hazy year is noisier in absolute terms; a gain from raw spreads
    comes out too low and leaves bright ground (a mine) too dark. Spreads of 3 x 3 means keep it near the truth."""
    from affine import Affine
    from scipy.ndimage import gaussian_filter

    from conftest import write_raster
    from minemap.radiometry import apply, year_radiometry

    rng = np.random.default_rng(5)
    size = 256
    forest = np.array([350, 600, 380, 3000], np.float32)[:, None, None]
    base = forest * (1 + 0.12 * gaussian_filter(rng.normal(size=(1, size, size)), (0, 3, 3)) * 4)
    base = base.astype(np.float32)
    soil = np.zeros((size, size), bool)
    soil[100:140, 100:140] = True  # bright ground present in both years
    base[:, soil] = np.array([2100, 1750, 1250, 2300], np.float32)[:, None]
    alpha = 0.25
    hazy = (1 - alpha) * base + alpha * np.array([2100, 2150, 2250, 2300], np.float32)[:, None, None]

    def noisy(a):
        return (a * (1 + 0.03 * rng.standard_normal(a.shape))).astype(np.float32)

    t = Affine(4.0, 0, 0, 0, -4.0, 0)
    names = ("red", "green", "blue", "nir")
    write_raster(tmp_path / "img" / "2019" / "a.tif", noisy(base), t, descriptions=names)
    write_raster(tmp_path / "img" / "2020" / "a.tif", noisy(hazy), t, descriptions=names)
    src = open_imagery(tmp_path / "img")
    r = year_radiometry(src, [2020], 2019, "local")[2020]
    out = apply(hazy, r)
    rel = np.abs(out[:3, soil] - base[:3, soil]).mean(1) / base[:3, soil].mean(1)  # the visible bands
    assert (rel < 0.2).all(), rel  # raw spreads: 0.40, 0.21, 0.31


def test_unit_reads_only_its_own_year_and_masks_by_signature(scene, tmp_path, monkeypatch):
    """A unit of a year other than the training year reads that year alone (no comparison with the training
    year, which would mask land that changed) and, for a source that does not mask clouds itself, masks thin
    clouds and shadows found in the year's own pixels; a source that masks them itself is left to it."""
    from minemap import predict as pr
    from minemap.grid import make_tiles

    model_dir = _pixel_model_dir(scene, tmp_path)
    # a cloud level that mine soil reaches: opaque 'clouds' are nodata, but the signature mask sees them too
    card = read_card(model_dir).model_copy(update={"train_year": 2019, "cloud_level": [2000, 1600, 1100, 2000]})

    class Recording:
        """The scene's imagery, recording the years read."""

        def __init__(self, masks_clouds):
            self.inner, self.masks_clouds, self.reads = open_imagery(scene.imagery), masks_clouds, []
            self.band_names = self.inner.band_names

        def grid(self, year):
            return self.inner.grid(year)

        def read(self, year, grid):
            self.reads.append(year)
            pixels, valid = self.inner.read(year, grid)
            self.valid = valid.copy()
            return pixels, valid

    calls = []
    monkeypatch.setattr(pr, "obscured_mask", lambda pixels, valid, bands: calls.append((list(bands), valid.copy()))
                        or np.zeros(valid.shape, bool))
    tile = make_tiles(open_imagery(scene.imagery).grid(2021), 4096)[0]
    sources = {}
    for masks_clouds in (False, True):
        source = sources[masks_clouds] = Recording(masks_clouds)
        ctx = pr._Context(str(model_dir), "recording", None, None, "cpu", None)  # a state put in place
        pr._STATES[ctx.key] = dict(model_dir=ctx.model_dir, model_fp=ctx.model_fp, model=PixelModel(), card=card,
                                   device=torch.device("cpu"), source=source)
        try:
            unit = (2021, tile, str(tmp_path / f"{masks_clouds}.tif"), PredictConfig(window_size=64), None, ctx)
            assert pr._predict_unit(unit)[2]
        finally:
            pr._STATES.pop(ctx.key, None)
        assert source.reads == [2021]  # the training year (2019) is never read
        with rasterio.open(tmp_path / f"{masks_clouds}.tif") as out:
            assert (out.read(1) == NODATA).any()  # the opaque level masks
    assert len(calls) == 1 and calls[0][0] == card.bands  # once: for the source that does not mask clouds itself
    assert np.array_equal(calls[0][1], sources[False].valid)  # every pixel of the year, opaque clouds included


def test_the_signature_mask_sees_ground_around_the_windows(scene, tmp_path, monkeypatch):
    """Clouds and shadows found by their signature are judged on each unit's windows and CONTEXT_PX of ground
    around them (an object cut by the region's edge would be judged on half of itself: a white-sand mine was taken
    for a cloud in a tile one window high), and the mask is put back where it was found: with a stand-in that
    masks the scene's brightest pixels, every tile writes nodata at exactly those pixels."""
    from minemap import predict as pr
    from minemap.masks import CONTEXT_PX

    model_dir = _pixel_model_dir(scene, tmp_path)
    src = open_imagery(scene.imagery)
    grid = src.grid(2020)
    full, full_valid = src.read(2020, grid)
    bright = np.percentile(full[0][full_valid], 99)
    regions = []

    def brightest(pixels, valid, bands):
        regions.append(pixels.shape[1:])
        return (pixels[0] > bright) & valid

    monkeypatch.setattr(pr, "obscured_mask", brightest)
    window, stride = 128, 96
    cfg = PredictConfig(tile_size=160, window_size=window, window_overlap=0.25)
    predict(model_dir, scene.imagery, [2020], tmp_path / "p", cfg, progress=False)
    written = _mosaic(tmp_path / "p" / "2020", grid, 160) == NODATA
    assert written.any() and np.array_equal(written, ((full[0] > bright) & full_valid) | ~full_valid)
    assert len(regions) >= 4  # one per tile, each its windows and the context around them
    for h, w in regions:
        assert h >= window + 2 * CONTEXT_PX and (h - 2 * CONTEXT_PX - window) % stride == 0
        assert w >= window + 2 * CONTEXT_PX and (w - 2 * CONTEXT_PX - window) % stride == 0


def test_sources_say_whether_they_mask_clouds():
    """STAC composites leave out the scene classes of clouds and shadows; local files and Planet basemaps are
    taken as they are; a resampled source says what its source says."""
    from minemap.imagery import Resampled
    from minemap.imagery.local import LocalImagery
    from minemap.imagery.planet import PlanetImagery
    from minemap.imagery.stac import StacImagery

    assert StacImagery.masks_clouds is True
    assert LocalImagery.masks_clouds is False and PlanetImagery.masks_clouds is False
    for masks in (False, True):
        inner = type("Source", (), {"band_names": ["red"], "masks_clouds": masks})()
        assert Resampled(inner, 2.0).masks_clouds is masks


def test_another_tiling_leaves_no_stale_tiles(scene, tmp_path):
    """Tiles are named by place on the global lattice: predicting again with another tile size redoes the tiles
    whose names both tilings share and removes the first tiling's others, so vectorising never mixes two
    tilings."""
    from conftest import tiny_config
    from minemap.grid import make_tiles
    from minemap.imagery import open_imagery
    from minemap.pipeline import run

    cfg = tiny_config(scene, tmp_path / "out", years=[2019], train={"epochs": 1, "batch_size": 8, "epoch_windows": 16},
                      hard_negatives={"enabled": False}, predict={"tile_size": 128})
    run(cfg, progress=False)
    grid = open_imagery(cfg.imagery).grid(2019)
    folder = cfg.out / "probabilities" / "2019"
    assert sorted(p.stem for p in folder.glob("*.tif")) == sorted(t.tile_id for t in make_tiles(grid, 128))
    run(cfg.model_copy(update={"predict": cfg.predict.model_copy(update={"tile_size": 256})}), progress=False)
    tiles = make_tiles(grid, 256)
    assert sorted(p.stem for p in folder.glob("*.tif")) == sorted(t.tile_id for t in tiles)
    with rasterio.open(folder / f"{tiles[0].tile_id}.tif") as src:
        assert (src.width, src.height) == (tiles[0].width, tiles[0].height)


def test_tiles_equal_one_pass_over_their_union_with_a_real_model(scene, tmp_path):
    """A real (untrained) SegFormer looks at context, so windows placed differently would disagree: on the global
    window lattice, an area cut into tiles gives the same probabilities as one pass over it."""
    model_dir = _pixel_model_dir(scene, tmp_path)
    grid = open_imagery(scene.imagery).grid(2020)
    small = PredictConfig(tile_size=160, window_size=128, window_overlap=0.25)
    predict(model_dir, scene.imagery, [2020], tmp_path / "tiles", small, progress=False)
    predict(model_dir, scene.imagery, [2020], tmp_path / "one", small.model_copy(update={"tile_size": 4096}),
            progress=False)
    from minemap.grid import make_tiles

    assert len(make_tiles(grid, 160)) >= 4 and len(make_tiles(grid, 4096)) <= 2
    tiled, whole = _mosaic(tmp_path / "tiles" / "2020", grid, 160), _mosaic(tmp_path / "one" / "2020", grid, 4096)
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1  # within 1/250 (equal but for rounding)
    assert (tiled == whole).mean() > 0.999


def test_only_tiles_this_tool_wrote_are_cleaned_up(scene, tmp_path, monkeypatch, caplog):
    """Predicting again with another tiling removes the first tiling's tiles, and a tile-named probability
    raster left by a unit killed before it was recorded, but never a file minemap did not write: imagery in the
    output folder, a user's raster that happens to be named like a tile. Those are left, with one warning."""
    import logging

    from affine import Affine

    from conftest import write_raster
    from minemap.grid import make_tiles
    from minemap.formats.rasters import write_cog

    model_dir = _pixel_model_dir(scene, tmp_path)
    real_load = load_model
    monkeypatch.setattr("minemap.predict.load_model", lambda d, dev: (PixelModel(), real_load(d, dev)[1]))
    grid = open_imagery(scene.imagery).grid(2019)
    out = tmp_path / "probs"
    first = predict(model_dir, scene.imagery, [2019], out, PredictConfig(tile_size=200), progress=False)
    folder = out / "2019"
    t = Affine(4.0, 0, 0, 0, -4.0, 0)
    scene_tif = write_raster(folder / "scene.tif", np.ones((4, 8, 8), np.uint16), t)  # imagery kept here
    users = write_raster(folder / "x7_y-7.tif", np.ones((8, 8), np.uint8), t)  # tile-named, not minemap's
    killed = folder / "x-1_y-1.tif"  # written by a unit killed before the manifest recorded it
    write_cog(killed, np.zeros((8, 8), np.uint8), grid.window(0, 0, 8, 8))
    torn = folder / ".x-2_y-2.tif.0123abcd.tmp.tif"  # a write killed half-way
    torn.write_bytes(b"II*\0")
    with caplog.at_level(logging.WARNING, logger="minemap.predict"):
        second = predict(model_dir, scene.imagery, [2019], out, PredictConfig(tile_size=128), progress=False)
    assert scene_tif.is_file() and users.is_file()
    assert not killed.exists() and not torn.exists()
    new = {f"{tile.tile_id}.tif" for tile in make_tiles(grid, 128)}
    assert {p.name for p in second} == new
    assert {p.name for p in folder.glob("*.tif")} == new | {"scene.tif", "x7_y-7.tif"}
    assert all(p.name in new or not p.exists() for p in first)  # the first tiling's other tiles are gone
    warned = [r.getMessage() for r in caplog.records if "not written by minemap" in r.getMessage()]
    assert len(warned) == 1 and "2 file(s)" in warned[0] and "scene.tif" in warned[0]


def test_a_unit_reported_written_without_its_file_is_an_error(scene, tmp_path, monkeypatch):
    """A unit is recorded done only once its file is where the run reads it: a worker that says it wrote a tile
    which is not there (written in its own folder, on its own disk) stops the run with an error naming the
    unit, and nothing of it is recorded."""
    from minemap.errors import ExecutionError
    from minemap.manifest import Manifest

    model_dir = _pixel_model_dir(scene, tmp_path)
    real_load = load_model
    monkeypatch.setattr("minemap.predict.load_model", lambda d, dev: (PixelModel(), real_load(d, dev)[1]))
    monkeypatch.setattr("minemap.predict.write_cog", lambda *a, **k: None)  # 'written' elsewhere
    out = tmp_path / "probs"
    with pytest.raises(ExecutionError, match=r"^unit 2019/x-?\d+_y-?\d+: its worker reported .* not there") as e:
        predict(model_dir, scene.imagery, [2019], out, PredictConfig(tile_size=200), progress=False)
    assert "\n" not in str(e.value)
    assert len(Manifest(out / "manifest.jsonl")) == 0 and not (out / "tiles.json").exists()


def test_radiometry_cache_tells_a_rewritten_file_apart(tmp_path):
    """Workers keep a year's normalisation loaded; a rerun that writes another into the same path (new imagery,
    another mode) is read afresh, and a file whose content is not what the run sent is refused."""
    from minemap import radiometry as rad

    path = tmp_path / "radiometry" / "2020.npz"
    one = {"mode": "global", "gain": np.ones(4, np.float32), "offset": np.zeros(4, np.float32),
           "invariant_share": 0.9, "reference_year": 2019}
    two = {**one, "gain": np.full(4, 2.0, np.float32)}
    rad.save(one, path)
    assert np.array_equal(rad.load_cached(path, rad.content_key(one))["gain"], one["gain"])
    rad.save(two, path)  # rewritten in place
    assert np.array_equal(rad.load_cached(path, rad.content_key(two))["gain"], two["gain"])
    with pytest.raises(ImageryError, match="radiometry file changed"):
        rad.load_cached(path, "0" * 16)
