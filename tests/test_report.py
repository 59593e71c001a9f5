"""The report: a self-contained page (no network), its plots and map, refusals, and a real browser opening it."""

import base64
import io
import os
import re
import shutil

import geopandas as gpd
import numpy as np
import pytest
from typer.testing import CliRunner

from minemap.cli import app
from minemap.errors import InputError
from minemap.report import report
from minemap.formats.run import REPORT

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

    from minemap.views import SAMPLE_TILES, Rasters

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

    from minemap.formats.panel import PANEL_COLUMNS

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


HOSTILE = "<img src=x onerror=alert(1)>"


def _hostile_run(tmp_path):
    """A run folder whose panel, model card and threshold file carry markup where names and numbers belong (a
    country name from a user's --countries file, hand-edited JSON)."""
    import json

    from shapely.geometry import box

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    rows = [{"mine_id": f"m{i}", "district_id": "d1", "year": y, "iso3": "GHA", "country": HOSTILE,
             "first_year": 2019, "area_km2": 0.5 + i, "mean_probability": 0.9, "provisional": False}
            for y in (2019, 2020) for i in range(2)]
    gpd.GeoDataFrame(rows, geometry=[box(-2 + i * 0.01, 6, -1.995 + i * 0.01, 6.005) for _ in (0, 1) for i in range(2)],
                     crs="EPSG:4326").to_parquet(run / "panel.parquet")
    (run / "model" / "model.json").write_text(json.dumps({"encoder": "<script>alert(2)</script>",
                                                          "train_year": "<b onmouseover=alert(3)>2019</b>",
                                                          "threshold": "<svg onload=alert(4)>"}))
    (run / "threshold.json").write_text(json.dumps({"threshold": "<iframe src=javascript:alert(5)>"}))
    return run


def test_values_from_files_are_text_in_the_page(tmp_path):
    """A country named <img src=x onerror=alert(1)> (and markup in the model card or threshold file) appears in
    report.html only escaped: the popups set their values as text (textContent), never as HTML (innerHTML),
    and the Python-built parts escape what they quote."""
    run = _hostile_run(tmp_path)
    text = report(run, progress=False).read_text()
    for raw in (HOSTILE, "<img src=x", "<script>alert(2)", "<b onmouseover", "<svg onload", "<iframe src=javascript"):
        assert raw not in text, raw
    assert "\\u003cimg src=x onerror=alert(1)\\u003e" in text  # the map's data holds the name, JSON-escaped
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text and "&lt;svg onload=alert(4)&gt;" in text
    popups = re.findall(r"\.bindPopup\(function\(layer\) \{(.*?)\n\s*\}, \{", text, re.S)
    assert len(popups) == 2  # one a year
    for js in popups:
        assert ".textContent = " in js and "innerHTML" not in js and "insertAdjacentHTML" not in js
    assert re.findall(r'"name": "mines (\d+)"|mines (\d+)', text)  # layer names stay numbers


@pytest.mark.skipif((not CHROMIUM or not CHROMEDRIVER) and not os.environ.get("MINEMAP_REQUIRE_BROWSER"),
                    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
def test_a_hostile_country_name_stays_text_in_a_real_browser(tmp_path):
    """Headless Chromium opens the page and a mine's popup: the country cell holds the name as text and no
    element was made of it."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = _hostile_run(tmp_path)
    path = report(run, progress=False)
    driver = _browser(tmp_path)
    try:
        driver.get(path.resolve().as_uri())
        opened = driver.execute_script(
            "let shown = [];"
            "for (const k of Object.keys(window)) { const g = window[k];"
            "  if (k.startsWith('geo_json_') && g instanceof L.GeoJSON) {"
            "    g.eachLayer(l => { if (l._map) shown.push(l); }); } }"
            # a click on a mine, as a user's: the event reaches the layer the popup is bound to
            "if (shown.length) { const l = shown[0];"
            "  l.fire('click', {latlng: l.getBounds().getCenter(), target: l, sourceTarget: l}, true); }"
            "return shown.length;")
        assert opened > 0
        # the popup fades in: its cells read as empty text until it is shown, so wait for it (at most 10 s)
        try:
            WebDriverWait(driver, 10).until(lambda d: HOSTILE in [c.text for c in d.find_elements(
                By.CSS_SELECTOR, ".leaflet-popup-content td")])
        except TimeoutException:
            pass
        cells = driver.find_elements(By.CSS_SELECTOR, ".leaflet-popup-content td")
        assert HOSTILE in [c.text for c in cells]  # the name, as text
        assert not driver.find_elements(By.CSS_SELECTOR, ".leaflet-popup-content img")  # no element made of it
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


def test_only_expected_failures_of_the_imagery_become_warnings(tmp_path, monkeypatch, caplog):
    """Imagery that moved or cannot be read (a minemap error, an OS or raster error) leaves the report without
    images, with a warning; any other exception is a bug and surfaces."""
    import json
    import logging

    import minemap.views
    from minemap.errors import ImageryError
    from minemap.views import Rasters

    run = tmp_path / "run"
    (run / "probabilities").mkdir(parents=True)
    (run / "probabilities" / "imagery.json").write_text(json.dumps({"source": {"source": "local",
                                                                               "path": str(tmp_path)}}))

    def moved(*a, **k):
        raise ImageryError(f"{tmp_path}: no year folders")

    monkeypatch.setattr(minemap.views, "open_imagery", moved)
    with caplog.at_level(logging.WARNING, logger="minemap"):
        assert Rasters(run).imagery is None
    assert "no year folders" in caplog.text and "probabilities and polygons only" in caplog.text

    def bug(*a, **k):
        raise TypeError("a bug in minemap")

    monkeypatch.setattr(minemap.views, "open_imagery", bug)
    with pytest.raises(TypeError, match="a bug in minemap"):
        Rasters(run)
