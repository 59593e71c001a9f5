"""The report: a self-contained page (no network), its plots and map, refusals, and a real browser opening it."""

import base64
import io
import os
import re
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from typer.testing import CliRunner

from minemap.cli import app
from minemap.errors import InputError
from minemap.report import REPORT, report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def page(tiny_run, tmp_path_factory):
    cfg, _ = tiny_run
    return cfg, (cfg.out / REPORT)


def test_run_writes_a_self_contained_report(page):
    cfg, path = page
    assert path.is_file()
    text = path.read_text()
    # nothing is fetched from a network: no script, style sheet or image from an address
    assert not re.findall(r"""<(?:script|link|img|iframe)[^>]*(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)
    assert not re.findall(r"""url\(\s*["']?(?:https?:)?//""", text)  # (links to click, like Leaflet's credit, are fine)
    assert "@import" not in text and "url(images/" not in text  # nor a style sheet or icon beside the page
    assert "L.map(" in text  # Leaflet inlined, and a map made with it
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(pngs) >= 4  # area by country, change, metrics, curves (and views)
    from PIL import Image

    for b64 in pngs:
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("L"), dtype=float)
        assert img.shape[0] > 100 and img.std() > 5  # a drawn plot, not an empty canvas
    for year in (2019, 2020, 2021):
        assert f"mines {year}" in text  # one layer a year in the layer control
    assert "probability 2021" in text  # the last year's probabilities as an overlay
    assert "F1 95 % interval" in text and "Look closer" in text  # accuracy with intervals; side-by-side views


def test_sample_tiles_are_drawn_reproducibly_from_the_years_tiles(page):
    import rasterio

    from minemap.report import SAMPLE_TILES, Rasters

    cfg, _ = page
    rasters = Rasters(cfg.out)
    places = rasters.sample_places(2021)
    assert len(places) == SAMPLE_TILES and places == rasters.sample_places(2021)  # the same places each time
    assert places != rasters.sample_places(2021, seed=1)
    for p in places:
        inside = []
        for t in rasters.tiles(2021):
            with rasterio.open(t) as src:
                x, y = gpd.GeoSeries([p], crs="EPSG:4326").to_crs(src.crs).iloc[0].coords[0]
                b = src.bounds
                inside.append(b.left <= x <= b.right and b.bottom <= y <= b.top)
        assert any(inside)
        assert rasters.window(2021, p) is not None  # a view can be drawn there
    assert Rasters(cfg.out).sample_places(1999) == []


def test_report_command_and_refusals(page, tmp_path):
    cfg, _ = page
    runner = CliRunner()
    dest = tmp_path / "r.html"
    r = runner.invoke(app, ["report", str(cfg.out), "--out", str(dest)])
    assert r.exit_code == 0 and dest.is_file(), r.output
    r = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no panel here" in r.output and len(r.output.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    import geopandas as gpd

    from minemap.panel import PANEL_COLUMNS

    gpd.GeoDataFrame({c: [] for c in PANEL_COLUMNS[:-1]}, geometry=[], crs="EPSG:4326").to_parquet(
        empty / "panel.parquet")
    with pytest.raises(InputError, match="holds no years"):
        report(empty)
    assert not (empty / REPORT).exists()


def _browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.skipif((not CHROMIUM or not CHROMEDRIVER) and not os.environ.get("MINEMAP_REQUIRE_BROWSER"),
                    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
def test_report_in_a_real_browser(page, tmp_path):
    """Headless Chromium opens the page from disk with the network unused: no JavaScript error, the map's layers
    exist, the year control changes what is shown, and the screenshot is not blank."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    cfg, path = page
    driver = _browser(tmp_path)
    try:
        driver.get(path.resolve().as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        assert driver.execute_script("return typeof L === 'object' && typeof L.map === 'function'")
        labels = driver.find_elements(By.CSS_SELECTOR, ".leaflet-control-layers-overlays label")
        names = [lab.text.strip() for lab in labels]
        assert {"mines 2019", "mines 2020", "mines 2021", "probability 2021"} <= set(names), names

        def shown() -> int:  # polygons drawn on the map now
            return len(driver.find_elements(By.CSS_SELECTOR, ".leaflet-overlay-pane path.leaflet-interactive"))

        only_last = shown()
        assert only_last > 0  # the last year is shown at first
        box = labels[names.index("mines 2019")].find_element(By.TAG_NAME, "input")
        box.click()  # tick 2019: its mines are drawn too
        both = shown()
        assert both > only_last
        labels[names.index("mines 2021")].find_element(By.TAG_NAME, "input").click()  # untick 2021
        assert 0 < shown() < both
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L"), dtype=float)
        assert shot.std() > 10 and (shot < 128).mean() > 0.01  # drawn text, plots and map, not a blank page
        (tmp_path / "report.png").write_bytes(driver.get_screenshot_as_png())
    finally:
        driver.quit()


def test_a_large_panel_shows_each_years_largest_mines(monkeypatch):
    import geopandas as gpd
    from shapely.geometry import box

    import minemap.report as rep

    monkeypatch.setattr(rep, "MAX_MAP_POLYGONS", 6)
    rows = [{"mine_id": f"m{y}{i}", "year": y, "country": "Ghana", "first_year": y, "area_km2": float(i),
             "mean_probability": 0.9} for y in (2019, 2020, 2021) for i in range(1, 6)]
    panel = gpd.GeoDataFrame(rows, geometry=[box(i, 0, i + 0.5, 0.5) for y in range(3) for i in range(1, 6)],
                             crs="EPSG:4326")
    page = rep.build_map(panel).get_root().render()
    # two a year (6 over 3 years), the two largest: areas 5 and 4, never 3
    for y in (2019, 2020, 2021):
        assert f'"m{y}5"' in page and f'"m{y}4"' in page and f'"m{y}3"' not in page
