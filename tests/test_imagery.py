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


def test_block_cache_serves_windows_as_the_source_reads_them(tmp_path):
    """Windows inside one block, and coarse looks on a whole multiple of the pixels, come from a block read once,
    equal to the source's own reads (nearest neighbour for the coarse look); a window across blocks, of another
    year or another pixel lattice goes to the source."""
    from minemap.imagery import BlockCache

    full = _mosaic(tmp_path)
    src = open_imagery(tmp_path)
    grid = src.grid(2020)
    cache = BlockCache(src, 2020, grid, block=20)
    for win in (grid.window(2, 3, 16, 16), grid.window(40, 20, 20, 20), grid.window(21, 1, 5, 7)):
        got, valid = cache.read(2020, win)
        want, want_valid = src.read(2020, win)
        assert np.array_equal(got, want) and np.array_equal(valid, want_valid)
    assert cache.reads == 3  # blocks (0, 0), (2, 1), (1, 0)
    coarse = Grid(grid.crs, grid.window(0, 0, 20, 20).transform @ Affine.scale(4), 5, 5)
    got, _ = cache.read(2020, coarse)
    assert np.array_equal(got, full[:, 2:20:4, 2:20:4].astype(np.float32)) and cache.reads == 3
    assert np.array_equal(got, open_imagery(tmp_path, resampling="nearest").read(2020, coarse)[0])
    across = grid.window(15, 15, 10, 10)  # four blocks: read from the source
    assert np.array_equal(cache.read(2020, across)[0], full[:, 15:25, 15:25]) and cache.reads == 3
    shifted = Grid(grid.crs, grid.transform @ Affine.translation(0.5, 0), 4, 4)
    assert np.array_equal(cache.read(2020, shifted)[0], src.read(2020, shifted)[0]) and cache.reads == 3


def test_block_cache_keeps_memory_bounded(tmp_path):
    from minemap.imagery import BlockCache

    _mosaic(tmp_path)
    src = open_imagery(tmp_path)
    grid = src.grid(2020)
    one_block = 4 * 10 * 10 * 4 + 10 * 10  # float32 bands and the validity mask
    cache = BlockCache(src, 2020, grid, block=10, max_bytes=2 * one_block)
    for c in range(0, 60, 10):
        cache.read(2020, grid.window(c, 0, 10, 10))
    assert len(cache._blocks) == 2 and cache.reads == 6
    cache.read(2020, grid.window(0, 0, 10, 10))  # dropped: read again
    assert cache.reads == 7


def test_a_folder_clipped_to_an_area_keeps_its_pixels(tmp_path):
    """A local folder seen over a bbox (chips from anywhere cut each tile so): the mosaic's grid cut to the
    bbox on the same pixels; a bbox beyond the files is one error naming the folder."""
    from rasterio.warp import transform_bounds

    from minemap.imagery import for_area

    full = _mosaic(tmp_path)
    grid = open_imagery(tmp_path).grid(2020)
    part = grid.window(10, 5, 30, 20)
    bbox = transform_bounds(grid.crs, "EPSG:4326", *part.bounds)
    inner = (bbox[0] + 1e-6, bbox[1] + 1e-6, bbox[2] - 1e-6, bbox[3] - 1e-6)
    src = open_imagery(for_area(tmp_path, inner))
    clipped = src.grid(2020)
    assert clipped.transform == part.transform and (clipped.width, clipped.height) == (30, 20)
    assert np.array_equal(src.read(2020, clipped)[0], full[:, 5:25, 10:40])
    with pytest.raises(ImageryError, match=str(tmp_path)):
        open_imagery(for_area(tmp_path, (100.0, 10.0, 100.1, 10.1))).grid(2020)
