"""Sentinel-2 composites through a STAC API, against a loopback server whose assets are COGs written here."""

import json
import time

import numpy as np
import pytest
import rasterio
from affine import Affine

from minemap.imagery.stac import StacImageryConfig
from minemap.errors import ImageryError
from minemap.imagery import open_imagery
from minemap.imagery.stac import boa_offset

from stac_server import Scene, StacServer

CRS = "EPSG:32630"
SIZE = 96
TRANSFORM = Affine(10.0, 0, 500000.0, 0, -10.0, 700000.0)  # near 3 W, 6.3 N
BANDS = ("red", "green", "blue", "nir")
CLOUD = (slice(20, 50), slice(30, 70))
SHADOW = (slice(60, 80), slice(10, 40))


def _scene(item_id, date, value, scl_boxes=(), box_value=None, **props):
    bands = {b: np.full((SIZE, SIZE), value + 10 * i, np.uint16) for i, b in enumerate(BANDS)}
    scl = np.full((SIZE, SIZE), 4, np.uint8)  # vegetation
    for box, cls in scl_boxes:
        scl[box] = cls
        if box_value is not None:
            for b in bands.values():
                b[box] = box_value
    return Scene(item_id, date, bands, scl, props)


@pytest.fixture
def stac(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = StacServer(tmp_path / "assets", CRS, TRANSFORM)
    # 2019: three clear-ish scenes in Feb-Aug, the last with a cloud and a shadow; one in November
    server.add(_scene("S2_20190210", "2019-02-10", 1000))
    server.add(_scene("S2_20190510", "2019-05-10", 1100))
    server.add(_scene("S2_20190810", "2019-08-10", 1200, [(CLOUD, 9), (SHADOW, 3)], box_value=5000))
    server.add(_scene("S2_20191110", "2019-11-10", 1300))
    # the processing-baseline change: 2021 before it; 2022 after, once raw and once already harmonised
    server.add(_scene("S2_20210601", "2021-06-01", 1500, [(CLOUD, 9)], box_value=7000,
                      **{"s2:processing_baseline": "02.14"}))
    server.add(_scene("S2_20220301", "2022-03-01", 2500, **{"s2:processing_baseline": "04.00"}))
    server.add(_scene("S2_20220601", "2022-06-01", 1500, **{"s2:processing_baseline": "04.00",
                                                             "earthsearch:boa_offset_applied": True}))
    yield server
    server.close()


def _cfg(stac, tmp_path, **over):
    left, top = TRANSFORM.c, TRANSFORM.f
    from rasterio.warp import transform_bounds

    bbox = transform_bounds(CRS, "EPSG:4326", left + 5, top - SIZE * 10 + 5, left + SIZE * 10 - 5, top - 5)
    data = {"source": "stac", "url": stac.url, "bbox": bbox, "months": "1-9", "tile_px": 64,
            "cache_dir": tmp_path / "cache", "crs": CRS, "retries": 2, "timeout_s": 5} | over
    return StacImageryConfig.model_validate(data)


def test_composite_masks_clouds_pixel_by_pixel(stac, tmp_path):
    """Median of the clear observations in the chosen months: 1100 where three are clear, 1050 under the cloud
    and the shadow of one scene; the November scene is outside months 1-9; a count band beside the bands."""
    src = open_imagery(_cfg(stac, tmp_path))
    assert src.band_names == list(BANDS)
    src.check_bands(2019)
    grid = src.grid(2019)
    assert grid.crs.to_epsg() == 32630 and grid.res == (10.0, 10.0)
    px, valid = src.read(2019, grid)
    assert valid.all()
    # the area's grid starts on the 10 m lattice of the assets: map the boxes into it
    col0 = int(round((TRANSFORM.c - grid.transform.c) / 10))
    row0 = int(round((grid.transform.f - TRANSFORM.f) / 10))
    expect = np.full((grid.height, grid.width), 1100.0)
    for r, c in (CLOUD, SHADOW):
        expect[r.start - row0:r.stop - row0, c.start - col0:c.stop - col0] = 1050
    for i in range(4):
        assert np.array_equal(px[i], expect + 10 * i), i
    tiles = sorted((src.root / "2019").glob("*.tif"))
    assert tiles and all(p.with_suffix(".json").is_file() for p in tiles)
    record = json.loads(tiles[0].with_suffix(".json").read_text())
    assert record["items"] == ["S2_20190210", "S2_20190510", "S2_20190810"] and record["scenes"] == 3
    counts = []
    for p in tiles:
        with rasterio.open(p) as f:
            assert f.descriptions[-1] == "clear_observations" and f.nodata == 0
            counts.append(set(np.unique(f.read(5))))
    assert set().union(*counts) >= {2, 3}


def test_baseline_change_is_harmonised_and_cloudy_pixels_are_nodata(stac, tmp_path):
    """Baseline 04.00 adds 1000 unless the item says it is removed: 2021 and 2022 compare. A pixel whose only
    scene is cloudy has no clear observation: nodata, not zero."""
    assert boa_offset({"s2:processing_baseline": "04.00"}) == -1000
    assert boa_offset({"s2:processing_baseline": "05.10", "earthsearch:boa_offset_applied": True}) == 0
    assert boa_offset({"s2:processing_baseline": "02.14"}) == boa_offset({}) == 0
    src = open_imagery(_cfg(stac, tmp_path))
    grid = src.grid(2022)
    px22, v22 = src.read(2022, grid)
    px21, v21 = src.read(2021, grid)
    assert v22.all() and np.array_equal(px22[0][v22], np.full(v22.sum(), 1500.0))
    assert 0 < (~v21).sum() < v21.size and np.all(px21[0][v21] == 1500) and np.all(px21[:, ~v21] == 0)
    raw = open_imagery(_cfg(stac, tmp_path, harmonise=False))
    assert raw.read(2022, grid)[0][0].max() == 2000  # median of 2500 and 1500 without harmonising


def test_second_run_fetches_nothing(stac, tmp_path):
    cfg = _cfg(stac, tmp_path)
    first = open_imagery(cfg)
    grid = first.grid(2019)
    a, _ = first.read(2019, grid)
    n = len(stac.requests)
    assert any(r.startswith("GET /data/") for r in stac.requests)
    again = open_imagery(cfg)
    again.check_bands(2019)
    b, _ = again.read(2019, grid)
    assert len(stac.requests) == n and np.array_equal(a, b)
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]
    # another month selection is another composite
    open_imagery(_cfg(stac, tmp_path, months=[11])).read(2019, grid)
    assert len(stac.requests) > n


def test_busy_api_is_retried_honouring_retry_after(stac, tmp_path):
    stac.fail_next = [(429, {"Retry-After": "1"}), (503, {})]
    t0 = time.perf_counter()
    open_imagery(_cfg(stac, tmp_path)).check_bands(2019)
    assert time.perf_counter() - t0 >= 1.0
    assert stac.requests.count("POST /search") >= 3


def test_bad_sources_fail_in_one_line(stac, tmp_path):
    with pytest.raises(ImageryError, match=r"no sentinel-2-l2a scenes for 2018 over bbox .* months 1,2,3"):
        open_imagery(_cfg(stac, tmp_path)).check_bands(2018)
    with pytest.raises(ImageryError, match=r"no landsat scenes for 2019 .*is the collection right"):
        open_imagery(_cfg(stac, tmp_path, collection="landsat")).check_bands(2019)
    with pytest.raises(ImageryError, match=r"items have no asset 'B08' \(they have blue, green, nir, red, scl\)"):
        open_imagery(_cfg(stac, tmp_path, assets={"red": "red", "nir": "B08"})).check_bands(2019)
    with pytest.raises(ImageryError, match=r"bands \['swir'\] are not among the source's"):
        open_imagery(_cfg(stac, tmp_path), bands=["red", "swir"])
    stac.fail_next = [(503, {})] * 10
    with pytest.raises(ImageryError, match=r"STAC API refused the search|no answer from the STAC API") as e:
        open_imagery(_cfg(stac, tmp_path, retries=1)).check_bands(2019)
    assert "\n" not in str(e.value)
    dead = _cfg(stac, tmp_path, url="http://127.0.0.1:9", retries=0, timeout_s=2)
    with pytest.raises(ImageryError, match=r"127.0.0.1:9: no answer from the STAC API"):
        open_imagery(dead).check_bands(2019)


def test_run_maps_with_a_stac_source(stac, tmp_path, tiny_run):
    """`minemap run` with `imagery.source = "stac"` and a trained model: composites are built, cached and mapped,
    unchanged stages know nothing of the source; a rerun fetches nothing."""
    import tomli_w
    from typer.testing import CliRunner

    from minemap.cli import app

    model = tiny_run[0].out / "model"
    gsd = json.loads((model / "model.json").read_text())["gsd_m"]
    imagery = _cfg(stac, tmp_path, resolution_m=gsd).model_dump(mode="json", exclude_none=True)
    (tmp_path / "run.toml").write_text(tomli_w.dumps({
        "years": "2019,2021-2022", "out": "out", "imagery": imagery, "model": {"path": str(model)},
        "accept_weak_model": True, "predict": {"tile_size": 128}}))
    r = CliRunner().invoke(app, ["run", str(tmp_path / "run.toml")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert (out / "panel.parquet").is_file()
    for year in (2019, 2021, 2022):
        assert list((out / "probabilities" / str(year)).glob("*.tif")), year
    record = json.loads((out / "probabilities" / "imagery.json").read_text())
    assert record["source"]["source"] == "stac" and record["bands"] == list(BANDS)
    n = len(stac.requests)
    r = CliRunner().invoke(app, ["run", str(tmp_path / "run.toml"), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert stac.requests[n:] == []  # composites come from the cache: no search, no download


def test_cli_fetch_fills_the_cache_and_reports(stac, tmp_path):
    from typer.testing import CliRunner

    from minemap.cli import app

    cfg = _cfg(stac, tmp_path)
    args = ["imagery", "fetch", "--years", "2019,2022", "--url", stac.url, "--collection", "sentinel-2-l2a",
            "--aoi", ",".join(map(str, cfg.bbox)), "--months", "1-9", "--cache", str(tmp_path / "cache")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "fetched" in r.output and "100.0%" in r.output
    n = len(list((tmp_path / "cache").rglob("*.tif")))
    assert n >= 2 and f"{n} composites ({n} fetched, 0 already cached)" in r.output.replace("\n", " ")
    again = CliRunner().invoke(app, args)
    assert f"({0} fetched, {n} already cached)" in again.output.replace("\n", " ")
    bad = CliRunner().invoke(app, args[:-2] + ["--aoi", "west"])
    assert bad.exit_code == 2 and "--aoi 'west'" in bad.output
    none = CliRunner().invoke(app, ["imagery", "fetch", "--years", "2018", "--url", stac.url, "--aoi",
                                    ",".join(map(str, cfg.bbox)), "--cache", str(tmp_path / "cache")])
    assert none.exit_code == 2 and "no sentinel-2-l2a scenes for 2018" in none.output


def test_a_server_that_never_answers_times_out(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    try:
        cfg = StacImageryConfig(url=f"http://127.0.0.1:{silent.getsockname()[1]}", bbox=(-3.0, 6.0, -2.9, 6.1),
                                timeout_s=1, retries=0, cache_dir=tmp_path / "cache")
        t0 = time.perf_counter()
        with pytest.raises(ImageryError, match="no answer from the STAC API"):
            open_imagery(cfg).check_bands(2019)
        assert time.perf_counter() - t0 < 10
    finally:
        silent.close()


def test_a_missing_asset_names_the_scene_the_asset_and_the_address(stac, tmp_path, caplog):
    """An asset the server answers 404 for stops the composite with one line naming the scene (item id), the
    asset key and its address, without the query string of a signed address (its token is in neither the
    error nor the warnings and errors logged)."""
    import logging

    from typer.testing import CliRunner

    from minemap.cli import app
    from minemap.imagery.remote import public_url

    assert public_url("https://user:pw@data.example.com:8443/a/b.tif?sig=SECRET&se=2030#x") == \
        "https://data.example.com:8443/a/b.tif"
    assert public_url("s3://bucket/key.tif?X-Amz-Signature=SECRET") == "s3://bucket/key.tif"
    assert public_url("/vsicurl/https://h/x.tif?token=SECRET") == "/vsicurl/https://h/x.tif"
    for item in stac.items:  # signed addresses, as Planetary Computer's or pre-signed S3 links
        for asset in item["assets"].values():
            asset["href"] += "?token=SECRET&se=2030-01-01"
    (stac.root / "S2_20190510_nir.tif").unlink()
    src = open_imagery(_cfg(stac, tmp_path))
    with caplog.at_level(logging.WARNING), pytest.raises(ImageryError) as e:  # what a user's log shows
        src.read(2019, src.grid(2019))
    msg = str(e.value)
    assert f"sentinel-2-l2a scene S2_20190510, asset 'nir': cannot read {stac.url}/data/S2_20190510_nir.tif " in msg
    assert "404" in msg and "\n" not in msg
    assert "SECRET" not in msg and "token" not in msg and "SECRET" not in caplog.text
    assert not list((tmp_path / "cache").rglob("*.tif"))  # nothing half-made is cached
    cfg = _cfg(stac, tmp_path)
    r = CliRunner().invoke(app, ["imagery", "fetch", "--years", "2019", "--url", stac.url, "--aoi",
                                 ",".join(map(str, cfg.bbox)), "--months", "1-9", "--cache", str(tmp_path / "c2")])
    assert r.exit_code == 2 and "scene S2_20190510, asset 'nir'" in r.output and "SECRET" not in r.output
    assert "Traceback" not in r.output


def test_messages_name_the_api_without_its_secrets():
    """A STAC URL that carries a token or credentials is named without them in messages (and so in errors)."""
    from minemap.imagery import describe

    cfg = StacImageryConfig(url="https://user:pw@stac.example.org/v1?token=SECRET#x", bbox=(-3.0, 6.0, -2.9, 6.1))
    assert describe(cfg) == "https://stac.example.org/v1"
    with pytest.raises(ImageryError) as e:
        open_imagery(cfg, bands=["red", "swir9"])
    assert "SECRET" not in str(e.value) and "pw" not in str(e.value) and "stac.example.org" in str(e.value)


def test_clear_median_is_numpys_nanmedian():
    """The composite's median of the clear observations equals ``np.nanmedian`` (odd and even counts, pixels
    with none), without its warning per empty pixel."""
    import warnings

    from minemap.imagery.stac import clear_median

    rng = np.random.default_rng(3)
    for scenes in (1, 2, 3, 6):
        x = rng.integers(1, 4000, (4, scenes, 30, 40)).astype(np.float32)
        x[:, rng.random((scenes, 30, 40)) < 0.4] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = np.nanmedian(x, axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = clear_median(x)
        assert np.isnan(want).any() or scenes > 3
        np.testing.assert_array_equal(got, want)
