import numpy as np
import pytest
from affine import Affine
from rasterio.warp import Resampling, reproject

from minemap.errors import ImageryError
from minemap.imagery import open_imagery
from minemap.lattice import Grid
from minemap.imagery.local import LocalImagery

from conftest import write_raster

T = Affine(5.0, 0, 100_000.0, 0, -5.0, 200_000.0)
BANDS = ("red", "green", "blue", "nir")


def _mosaic(root, year=2020, nodata=None):
    rng = np.random.default_rng(0)
    full = rng.integers(1, 5000, (4, 40, 60)).astype(np.uint16)
    for r in range(2):
        for c in range(2):
            block = full[:, r * 20:(r + 1) * 20, c * 30:(c + 1) * 30]
            write_raster(root / str(year) / f"q{r}{c}.tif", block, T @ Affine.translation(c * 30, r * 20),
                         nodata=nodata, descriptions=BANDS)
    return full


def test_quads_read_as_one_mosaic(tmp_path):
    full = _mosaic(tmp_path)
    src = open_imagery(tmp_path)
    assert src.years() == [2020] and src.band_names == list(BANDS)
    grid = src.grid(2020)
    assert (grid.width, grid.height) == (60, 40) and grid.transform == T
    pixels, valid = src.read(2020, grid)
    assert valid.all() and np.array_equal(pixels, full.astype(np.float32))
    # a window straddling all four quads and reaching past the right edge
    win = grid.window(25, 15, 40, 10)
    pixels, valid = src.read(2020, win)
    assert np.array_equal(pixels[:, :, :35], full[:, 15:25, 25:60])
    assert valid[:, :35].all() and not valid[:, 35:].any()


def test_file_in_another_crs_is_reprojected_on_read(tmp_path):
    full = _mosaic(tmp_path)
    # replace one quad by a copy in EPSG:4326
    (tmp_path / "2020" / "q11.tif").unlink()
    block = full[:, 20:40, 30:60]
    src_t = T @ Affine.translation(30, 20)
    from rasterio.warp import calculate_default_transform

    dst_t, w, h = calculate_default_transform("EPSG:3857", "EPSG:4326", 30, 20,
                                              *Grid("EPSG:3857", src_t, 30, 20).bounds)
    out = np.zeros((4, h, w), np.uint16)
    reproject(block, out, src_transform=src_t, src_crs="EPSG:3857", dst_transform=dst_t, dst_crs="EPSG:4326",
              resampling=Resampling.nearest)
    write_raster(tmp_path / "2020" / "q11.tif", out, dst_t, crs="EPSG:4326", nodata=0, descriptions=BANDS)
    src = open_imagery(tmp_path)
    pixels, valid = src.read(2020, src.grid(2020).window(32, 22, 26, 16))
    assert valid.mean() > 0.95
    agree = np.mean(pixels[:, valid] == full[:, 22:38, 32:58][:, valid])
    assert agree > 0.9  # nearest-neighbour round trip through another CRS


def test_nodata_is_invalid(tmp_path):
    full = _mosaic(tmp_path, nodata=0)
    write_raster(tmp_path / "2020" / "q00.tif", np.zeros((4, 20, 30), np.uint16), T, nodata=0, descriptions=BANDS)
    src = open_imagery(tmp_path)
    _, valid = src.read(2020, src.grid(2020))
    assert not valid[:20, :30].any() and valid[20:, :].all()
    assert full.shape == (4, 40, 60)


def test_band_names_from_config_or_default(tmp_path):
    write_raster(tmp_path / "2019" / "a.tif", np.ones((3, 4, 4), np.uint16), T)
    assert LocalImagery(tmp_path).band_names == ["b1", "b2", "b3"]
    assert LocalImagery(tmp_path, bands=["r", "g", "b"]).band_names == ["r", "g", "b"]
    with pytest.raises(ImageryError, match="has 3 bands but the config names 4"):
        LocalImagery(tmp_path, bands=["r", "g", "b", "nir"]).band_names


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ImageryError, match="nowhere: imagery directory not found"):
        open_imagery(tmp_path / "nowhere")
    _mosaic(tmp_path)
    src = open_imagery(tmp_path)
    with pytest.raises(ImageryError, match=r"2021: no imagery folder for year 2021 \(years found: 2020\)"):
        src.grid(2021)
    (tmp_path / "2018").mkdir()
    (tmp_path / "2018" / "broken.tif").write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(ImageryError, match="broken.tif: not a readable raster"):
        open_imagery(tmp_path).grid(2018)
    (tmp_path / "2018" / "broken.tif").unlink()
    (tmp_path / "2017").mkdir()
    with pytest.raises(ImageryError, match="no GeoTIFF files for year 2017"):
        open_imagery(tmp_path).grid(2017)
    write_raster(tmp_path / "2022" / "a.tif", np.ones((3, 4, 4), np.uint16), T)
    with pytest.raises(ImageryError, match=r"a.tif: has 3 bands, expected 4"):
        open_imagery(tmp_path).check_bands(2022)
