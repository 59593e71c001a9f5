"""Chips from anywhere (minemap.chips.tiles), at the study's shape: the 100 real literature polygons on several
continents and UTM zones, imagery served at each place by the loopback STAC server, chips cut per tile in the
tile's own UTM zone, a model trained from the stream and two places mapped with it."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio import features

from minemap.chips.tiles import REGION_DEG, TileArea, group_labels, make_tiled_chips, regions
from minemap.config import ChipConfig, ModelConfig, PredictConfig, TrainConfig
from minemap.errors import InputError
from minemap.imagery.stac import StacImageryConfig, utm_crs

from conftest import SHARED
from stac_server import MINE, VEGETATION, StacServer, serve_places

RES = 30.0  # metres: small scenes, so that a hundred places are served in seconds
MARGIN_M = 5000.0  # each place's scene reaches this far around its polygon (beyond a tile's margin)
YEAR = 2020
ZONE_EDGE = 10  # the literature polygon 4 km east of the UTM zone boundary at 72 W
ANTIMERIDIAN = 99  # the literature polygon 4 km west of 180 degrees
CHIPS = ChipConfig(chip_size=32, stride=16, block_size=50, background_per_positive=0.5, seed=0, other_years=0)

pytestmark = pytest.mark.skipif(not SHARED.exists(), reason="shared literature sample not present")


def _scene_crs(k: int, lon: float, lat: float) -> str:
    """A place's scenes lie in its own UTM zone, except the one near a zone boundary: served in the zone across
    it (Sentinel-2 tiles overlap the boundaries), so its tile's composite is warped from another zone."""
    if k == ZONE_EDGE:
        return utm_crs(lon - 0.1, lat).to_string()
    return utm_crs(lon, lat).to_string()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The loopback STAC API with one scene of 2020 at each literature polygon: vegetation, the polygon as bare
    mine soil (rasterised on the scene's own grid), clear sky."""
    import os

    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    root = tmp_path_factory.mktemp("world")
    labels = gpd.read_file(SHARED)
    server = StacServer(root / "assets", "EPSG:32630", Affine.identity())
    serve_places(server, labels.geometry, YEAR, RES, MARGIN_M, np.random.default_rng(0),
                 crs_of=lambda k, lon, lat: _scene_crs(k, lon, lat))
    yield server, labels, root
    server.close()


def _imagery(server, root, bbox=(-1.0, 5.0, 0.0, 6.0)) -> StacImageryConfig:
    return StacImageryConfig.model_validate({"url": server.url, "bbox": bbox, "months": "1-12", "resolution_m": RES,
                                             "tile_px": 128, "cache_dir": root / "cache", "retries": 1,
                                             "timeout_s": 10, "crs": "EPSG:32630"})


@pytest.fixture(scope="module")
def tiled(world, tmp_path_factory):
    server, labels, root = world
    dest = tmp_path_factory.mktemp("chips") / "chips"
    index = make_tiled_chips(labels, _imagery(server, root), YEAR, dest, CHIPS, workers=2, progress=False)
    return dest, index


def test_labels_are_grouped_into_tiles_of_the_global_lattice():
    """Labels in one cell of the lattice share a tile named by that cell; areas that would overlap merge; the
    margin is clipped at the antimeridian."""
    labels = gpd.GeoDataFrame(geometry=[shapely.box(10.1, -0.5, 10.11, -0.49), shapely.box(10.97, -0.5, 10.98, -0.49),
                                        shapely.box(11.005, -0.5, 11.015, -0.49), shapely.box(12.6, -0.5, 12.61, -0.49),
                                        shapely.box(179.985, -16.2, 179.995, -16.19)], crs="EPSG:4326")
    tiles = group_labels(labels, 1.0, 2000.0)
    assert [(t.tile_id, t.members) for t in tiles] == [("x190_y90", (0, 1, 2)), ("x192_y90", (3,)),
                                                       ("x359_y106", (4,))]
    # labels 0 and 1 share cell x190_y90; label 2 (cell x191) lies 2.8 km from label 1: the areas overlap and merge
    assert tiles[0].bbox[0] < 10.1 - 0.017 and tiles[0].bbox[2] > 11.015 + 0.017
    assert tiles[2].bbox[2] == 180.0
    far = group_labels(labels.iloc[[0, 3]], 1.0, 2000.0)
    assert [t.members for t in far] == [(0,), (1,)]


def test_regions_merge_until_each_can_fill_every_split():
    """Tiles in one 30-degree cell are a region; a region with too few labelled blocks joins the nearest."""
    amazon_w = TileArea("a", (-65.6, -3.6, -65.4, -3.4), (0,))
    amazon_e = TileArea("b", (-61.6, -3.6, -61.4, -3.4), (1,))
    congo = TileArea("c", (20.4, 0.4, 20.6, 0.6), (2,))
    atlantic = TileArea("d", (-10.6, 0.4, -10.4, 0.6), (3,))
    tiles = [amazon_w, amazon_e, congo, atlantic]
    r = regions(tiles, [5, 5, 7, 1], need=7)
    # the two Amazon tiles share a cell (10 blocks); the lone Atlantic tile (1 block) joins its nearest, Africa
    assert r[0] == r[1] and r[3] == r[2] and r[0] != r[2]
    assert regions(tiles, [4, 4, 7, 7], need=7) == [2, 2, 1, 0]  # enough everywhere: one region per cell
    assert regions(tiles, [1, 1, 1, 1], need=7) == [0, 0, 0, 0]  # never enough: one region
    assert REGION_DEG == 30.0


def test_chips_from_anywhere_each_tile_in_its_own_zone(tiled, world):
    """Every literature polygon gets chips, cut in the UTM zone of its tile; the splits are balanced across
    tiles (each holds labelled pixels, train the most); the whole folder indexes every tile's chips."""
    dest, index = tiled
    _, labels, _ = world
    meta = json.loads((dest / "meta.json").read_text())
    manifest = gpd.read_parquet(dest / "tiles.parquet")
    assert meta["layout"] == "tiles" and meta["tiles_without_chips"] == {}
    assert (manifest.status == "cut").all() and manifest.labels.sum() == 100
    assert manifest.grid_crs.nunique() >= 10  # many UTM zones, each tile in its own
    for _, t in manifest.iterrows():
        lon, lat = (t.west + t.east) / 2, (t.south + t.north) / 2
        assert t.grid_crs == utm_crs(lon, lat).to_string(), t.tile_id
    pixels = {s: meta["splits"][s]["positive_pixels"] for s in ("train", "val", "test")}
    assert min(pixels.values()) > 0 and pixels["train"] > pixels["val"] and pixels["train"] > pixels["test"]
    assert meta["regions_in_split"]["val"] == meta["regions_in_split"]["test"] == meta["regions"] > 1
    # every polygon lies under a positive chip, and every chip file named in the index exists
    positives = index[index.kind == "positive"]
    hit = shapely.STRtree(np.asarray(positives.geometry.values)).query(np.asarray(labels.geometry.values),
                                                                      predicate="intersects")[0]
    assert set(hit.tolist()) == set(range(len(labels)))
    assert all((dest / p).is_file() for p in pd.concat([index.image, index["mask"]]))
    blocks = gpd.read_parquet(dest / "blocks.parquet")
    assert blocks.crs.to_epsg() == 4326 and {"tile", "split"} <= set(blocks.columns)


@pytest.mark.parametrize("k", [ZONE_EDGE, ANTIMERIDIAN])
def test_chips_near_a_zone_boundary_and_the_antimeridian_are_right(tiled, world, k):
    """The chips over the polygon by the zone boundary (its scene in the zone across it, warped) and the one by
    the antimeridian: the mask is the polygon on the chip's grid, and the imagery shows the mine there."""
    dest, index = tiled
    _, labels, _ = world
    geom = labels.geometry.iloc[k]
    chips = index[(index.kind == "positive") & index.intersects(geom)]
    assert len(chips)
    agree = []
    for _, c in chips.iterrows():
        with rasterio.open(dest / c.image) as img, rasterio.open(dest / c["mask"]) as msk:
            red, mask = img.read(1), msk.read(1)
            crs = img.crs
            lon = (geom.bounds[0] + geom.bounds[2]) / 2
            assert crs.to_epsg() == utm_crs(lon, geom.bounds[1]).to_epsg()
            local = gpd.GeoSeries([geom], crs="EPSG:4326").to_crs(crs).iloc[0]
            inside = features.rasterize([(local, 1)], red.shape, transform=img.transform).astype(bool)
        scored = mask != 255
        assert np.array_equal(mask[scored] == 1, inside[scored])  # the label, on the chip's own grid
        looks_mined = red > (VEGETATION[0] + MINE[0]) / 2
        agree.append((looks_mined[scored] == inside[scored]).mean())
    # the imagery agrees with the label but on a pixel-wide seam of the warp (bilinear across the mine's edge)
    assert min(agree) > 0.97, agree


def test_training_streams_every_tile_and_maps_two_places(tiled, world, tmp_path):
    """A few steps from the stream over all tiles' blocks, then two places (one in each hemisphere) mapped with
    the model through the same STAC API."""
    from minemap.predict import predict
    from minemap.train import train

    dest, index = tiled
    server, labels, root = world
    card = train(dest, tmp_path / "model", TrainConfig(epochs=1, batch_size=8, epoch_windows=32, learning_rate=1e-3,
                                                      min_val_f1=0.0),
                 ModelConfig(encoder="mit-b0"), progress=False)
    assert card.chip_size == 32 and card.splits["train"]["chips"] > 0 and "blocks" in card.selection["training"]
    for k in (ZONE_EDGE, 40):
        w, s, e, n = labels.geometry.iloc[k].bounds
        imagery = _imagery(server, root, (w - 0.01, s - 0.01, e + 0.01, n + 0.01)).model_copy(update={"crs": None})
        paths = predict(tmp_path / "model", imagery, [YEAR], tmp_path / f"prob{k}", PredictConfig(tile_size=256),
                        progress=False)
        assert paths
        for p in paths:
            with rasterio.open(p) as f:
                prob = f.read(1, masked=True)
                assert f.crs.to_epsg() == utm_crs((w + e) / 2, (s + n) / 2).to_epsg()
                assert prob.count() > 0 and prob.max() <= 250  # P x 250, nodata 255 where no imagery


def test_resume_cuts_only_the_tiles_not_yet_recorded(tiled, world, tmp_path):
    """A rerun with the same settings finds every tile's record and cuts none again; a tile whose record is gone
    is cut again, alone."""
    dest, _ = tiled
    server, labels, root = world
    small = labels.iloc[:12]
    out = tmp_path / "chips"
    cfg = CHIPS.model_copy(update={"val_fraction": 0.0, "test_fraction": 0.0})
    make_tiled_chips(small, _imagery(server, root), YEAR, out, cfg, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "tiles").glob("*.json")}
    make_tiled_chips(small, _imagery(server, root), YEAR, out, cfg, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "tiles").glob("*.json")} == stamps
    gone = sorted(stamps)[0]
    (out / "tiles" / gone).unlink()
    make_tiled_chips(small, _imagery(server, root), YEAR, out, cfg, progress=False)
    again = {p.name: p.stat().st_mtime_ns for p in (out / "tiles").glob("*.json")}
    assert [n for n in again if again[n] != stamps.get(n)] == [gone]


def test_no_imagery_anywhere_is_one_clear_error(world, tmp_path):
    server, _, root = world
    nowhere = gpd.GeoDataFrame(geometry=[shapely.box(-150.0, 40.0, -149.99, 40.01)], crs="EPSG:4326")
    with pytest.raises(InputError, match="no tile"):
        make_tiled_chips(nowhere, _imagery(server, root), YEAR, tmp_path / "chips", CHIPS, progress=False)


def test_cli_cuts_chips_from_anywhere_through_a_stac_config(world, tmp_path):
    """``minemap chips --imagery <config.toml>`` with a STAC source: tiles of one degree, each in its own zone,
    cut by two worker processes; a wrong --tile-deg is one line."""
    from typer.testing import CliRunner

    from minemap.cli import app

    server, labels, root = world
    labels.iloc[[ZONE_EDGE, ANTIMERIDIAN, 40, 41, 42, 43, 60, 61, 62, 80, 81, 82]].to_file(tmp_path / "some.gpkg")
    (tmp_path / "source.toml").write_text(
        f'[imagery]\nsource = "stac"\nurl = "{server.url}"\nresolution_m = {RES}\ntile_px = 128\n'
        f'cache_dir = "{root / "cache"}"\n')
    args = ["chips", "--labels", str(tmp_path / "some.gpkg"), "--imagery", str(tmp_path / "source.toml"),
            "--year", str(YEAR), "--out", str(tmp_path / "chips"), "--chip-size", "32", "--stride", "16",
            "--block-size", "50", "--workers", "2", "--other-years", "0"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "chips" / "meta.json").read_text())
    assert meta["layout"] == "tiles" and meta["tile_deg"] == 1.0 and meta["tiles_cut"] == meta["tiles"] >= 10
    assert "EPSG:32760" in meta["crs"] and "EPSG:32719" in meta["crs"]
    r = CliRunner().invoke(app, [*args, "--tile-deg", "0"])
    assert r.exit_code == 2 and "--tile-deg 0" in r.output and "Traceback" not in r.output


def test_tiles_show_training_other_years(world, tmp_path):
    """chips.other_years in tiles: each tile's training and validation blocks cut again from another year's
    composite in the tile's own zone, named in the folder's other_years.parquet (paths under the tile's folder,
    with their split) and read by training and validation after the labels' year's blocks; a year the STAC API
    has no scenes of gives no block, and the tile's chips are cut all the same."""
    from minemap.trainset import block_pieces

    server, labels, root = world
    some = [ZONE_EDGE, ANTIMERIDIAN, 40, 41, 60]
    serve_places(server, labels.geometry.iloc[some], 2021, RES, MARGIN_M, np.random.default_rng(1),
                 crs_of=lambda k, lon, lat: _scene_crs(some[k], lon, lat), prefix="S2later")
    cfg = CHIPS.model_copy(update={"other_years": [2021, 2019]})
    index = make_tiled_chips(labels.iloc[some], _imagery(server, root), YEAR, tmp_path / "chips", cfg, progress=False)
    dest = tmp_path / "chips"
    other = pd.read_parquet(dest / "other_years.parquet")
    blocks = pd.read_parquet(dest / "blocks.parquet")
    training = blocks[(blocks.split == "train") & blocks.image.notna()]
    shown = blocks[blocks.split.isin(["train", "val"]) & blocks.image.notna()]
    assert set(other.year) == {2021} and len(other) > 0
    assert set(zip(other.tile, other.bx, other.by, other.split)) == \
        set(zip(shown.tile, shown.bx, shown.by, shown.split))
    for r in other.itertuples():
        assert r.image.startswith(f"tiles/{r.tile}/blocks/2021_")
        with rasterio.open(dest / r.image) as im, rasterio.open(dest / r.mask) as mk:
            assert im.crs == rasterio.open(dest / shown.set_index(["tile", "bx", "by"]).loc[
                (r.tile, r.bx, r.by), "image"]).crs
            assert (mk.read(1) == 1).sum() == r.positive_pixels
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["other_years"] == {"2021": {"blocks": len(other), "positive_pixels": int(other.positive_pixels.sum())}}
    tile_meta = json.loads((dest / "tiles" / other.tile.iloc[0] / "meta.json").read_text())
    assert tile_meta["other_years"]["2019"]["blocks"] == 0  # no scenes that year: no block, the rest cut
    train = block_pieces(dest, "train", index[index.split == "train"].assign(root=str(dest)))
    n_other_train = int((other.split == "train").sum())
    assert len(train.pieces) == len(training) + n_other_train and train.own == len(training)
    assert len(block_pieces(dest, "val").pieces) == len(shown) - len(training) + len(other) - n_other_train


def test_mmseg_layout_of_a_tiled_folder_keeps_every_chip(tiled, tmp_path):
    """Chip ids are unique over the tiles (each prefixed by its tile), so the MMSegmentation layout holds them all."""
    from minemap.mmseg import write_layout

    dest, index = tiled
    assert index.chip_id.is_unique and all(c.startswith(t + "_") for c, t in zip(index.chip_id, index.tile))
    n = write_layout(dest, tmp_path / "mmseg")
    assert n == len(index) == len(list((tmp_path / "mmseg").glob("*/img_dir/*/*.tif")))


def test_tiles_cut_on_a_dask_cluster_equal_the_serial_cut(world, tmp_path):
    """``scheduler``: each tile is a task on the cluster's workers (processes started in a folder of their
    own, reaching the STAC API and the chips folder by absolute paths); the chips are those of a serial cut."""
    from distributed import LocalCluster

    server, labels, root = world
    small = labels.iloc[[ZONE_EDGE, ANTIMERIDIAN, 40, 41, 60, 80]]
    cfg = CHIPS.model_copy(update={"val_fraction": 0.0, "test_fraction": 0.0})
    serial = make_tiled_chips(small, _imagery(server, root), YEAR, tmp_path / "serial", cfg, progress=False)
    here = pytest.MonkeyPatch()
    here.chdir(tmp_path)
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, memory_limit="2GiB") as lc:
            here.chdir(root)
            cut = make_tiled_chips(small, _imagery(server, root), YEAR, "on-cluster", cfg,
                                   scheduler=lc.scheduler_address, progress=False)
    finally:
        here.undo()
    columns = ["chip_id", "split", "kind", "positive_pixels"]
    assert cut[columns].sort_values("chip_id").reset_index(drop=True).equals(
        serial[columns].sort_values("chip_id").reset_index(drop=True))
    for rel in cut.image:
        with rasterio.open(root / "on-cluster" / rel) as a, rasterio.open(tmp_path / "serial" / rel) as b:
            assert np.array_equal(a.read(), b.read()), rel
    assert json.loads((root / "on-cluster" / "meta.json").read_text())["tiles_cut"] == len(set(cut.tile))
