import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from shapely.geometry import Polygon, box

from minemap.chips import assign_splits, make_chips
from minemap.config import ChipConfig
from minemap.errors import InputError
from minemap.imagery import open_imagery

from conftest import write_raster

RES = 4.0
T = Affine(RES, 0, 0.0, 0, -RES, 0.0)  # EPSG:3857 at the equator: origin (0, 0), 4 m pixels


def _scene(tmp_path, size=256):
    data = np.full((4, size, size), 1000, np.uint16)
    write_raster(tmp_path / "img" / "2019" / "a.tif", data, T, descriptions=("red", "green", "blue", "nir"))
    return open_imagery(tmp_path / "img")


def _label_px(x0, y0, x1, y1, hole=None):
    """A polygon in pixel coordinates -> EPSG:3857 coordinates of grid T."""
    def to_xy(px, py):
        return T @ (px, py)
    shell = [to_xy(*p) for p in box(x0, y0, x1, y1).exterior.coords]
    holes = [[to_xy(*p) for p in box(*hole).exterior.coords]] if hole else []
    return Polygon(shell, holes)


def test_mask_is_rasterised_exactly_with_holes(tmp_path):
    src = _scene(tmp_path)
    lab = gpd.GeoDataFrame(geometry=[_label_px(10, 20, 50, 60, hole=(20, 30, 30, 40))], crs="EPSG:3857")
    cfg = ChipConfig(chip_size=64, stride=64, block_size=66, background_per_positive=0, val_fraction=0,
                     test_fraction=0)
    index = make_chips(lab, src, 2019, tmp_path / "chips", cfg)
    first = index[index.chip_id == "2019_000001_000001"].iloc[0]
    with rasterio.open(tmp_path / "chips" / first["mask"]) as m, rasterio.open(tmp_path / "chips" / first.image) as im:
        mask = m.read(1)
        assert im.res == (RES, RES) and im.count == 4 and im.descriptions == ("red", "green", "blue", "nir")
        assert im.transform == T @ Affine.translation(1, 1)
    expected = np.zeros((64, 64), np.uint8)
    expected[19:59, 9:49] = 1  # label pixels 10..49 x 20..59, chip origin at pixel (1, 1)
    expected[29:39, 19:29] = 0  # the hole
    assert np.array_equal(mask, expected)
    assert first.positive_fraction == pytest.approx(expected.mean())


def test_splits_never_overlap_or_touch(tmp_path):
    src = _scene(tmp_path, size=512)
    rng = np.random.default_rng(1)
    polys = [_label_px(x, y, x + 20, y + 20) for x, y in rng.integers(0, 480, (25, 2))]
    lab = gpd.GeoDataFrame(geometry=polys, crs="EPSG:3857")
    cfg = ChipConfig(chip_size=32, stride=16, block_size=96, background_per_positive=1.0, val_fraction=0.2,
                     test_fraction=0.2, seed=4)
    index = make_chips(lab, src, 2019, tmp_path / "chips", cfg).to_crs("EPSG:3857")
    assert set(index.split) == {"train", "val", "test"}
    assert (index[index.split != "train"].positive_fraction > 0).any()
    geoms = np.asarray(index.geometry.values)
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")  # intersects includes touching
    split = index.split.to_numpy()
    assert np.all(split[a] == split[b])
    # positives and background both present, and chips are inside one block each
    assert (index.positive_fraction > 0).sum() > 0 and (index.positive_fraction == 0).sum() > 0
    meta = json.loads((tmp_path / "chips" / "meta.json").read_text())
    assert meta["chip_size"] == 32 and meta["bands"] == ["red", "green", "blue", "nir"]
    assert meta["gsd_m"] == pytest.approx(RES, rel=1e-3)  # at the equator Web Mercator metres are ground metres


def test_assign_splits_gives_val_and_test_positive_blocks():
    blocks = np.array([(i, 0) for i in range(10)])
    splits = assign_splits(blocks, {(0, 0), (1, 0), (2, 0)}, ChipConfig(val_fraction=0.1, test_fraction=0.1))
    assert sorted(splits[(i, 0)] for i in range(3)) == ["test", "train", "val"]


def test_labels_missing_the_imagery(tmp_path):
    src = _scene(tmp_path)
    lab = gpd.GeoDataFrame(geometry=[box(10, 10, 11, 11)], crs="EPSG:4326")
    with pytest.raises(InputError, match=r"labels.gpkg: none of the 1 labels lies within the 2019 imagery"):
        make_chips(lab, src, 2019, tmp_path / "chips", ChipConfig(chip_size=64), labels_path=tmp_path / "labels.gpkg")
    assert not (tmp_path / "chips").exists()


def test_chip_larger_than_block_is_refused(tmp_path):
    src = _scene(tmp_path)
    lab = gpd.GeoDataFrame(geometry=[_label_px(10, 10, 20, 20)], crs="EPSG:3857")
    with pytest.raises(InputError, match="block_size 64 must exceed chip_size 64"):
        make_chips(lab, src, 2019, tmp_path / "chips", ChipConfig(chip_size=64, block_size=64))
