"""Planet basemaps against an imitation of the API on the loopback interface: the least cloudy mosaic per quad,
the key only in the environment and a header, resumable downloads, retries, and errors in one line."""

import json
import logging

import numpy as np
import pytest
from rasterio.warp import transform_bounds

from minemap.imagery.planet import PlanetImageryConfig
from minemap.errors import ImageryError
from minemap.imagery import open_imagery
from minemap.imagery.planet import strip_key

from planet_server import RES, Mosaic, PlanetServer

KEY = "pl-secret-0123456789"
SIZE = 128
X0, Y0 = round(-217000 / RES) * RES, round(703000 / RES) * RES
QUADS = ("L15-0000E-0000N", "L15-0001E-0000N")


def _quad(value, cloudy=0.0, seed=0):
    rng = np.random.default_rng(seed)
    data = np.zeros((5, SIZE, SIZE), np.uint16)
    for b in range(4):
        data[b] = value + 100 * b
    data[4] = 255
    if cloudy:
        cloud = rng.random((SIZE, SIZE)) < cloudy
        data[:4, cloud] = 6000
    data[:, :, :8] = 0  # a strip without data: alpha 0
    return data


@pytest.fixture
def planet(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_API_KEY", KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = PlanetServer(tmp_path / "quads", KEY, (X0, Y0))
    yield server
    server.close()


def _cfg(planet, tmp_path, **over):
    bbox = transform_bounds("EPSG:3857", "EPSG:4326", X0 + 10, Y0 - SIZE * RES + 10, X0 + 2 * SIZE * RES - 10, Y0 - 10)
    data = {"source": "planet", "api_url": planet.url, "bbox": bbox, "cache_dir": tmp_path / "cache",
            "mosaics": {2021: ["nicfi_2021-06", "nicfi_2021-11"]}, "retries": 3, "timeout_s": 10} | over
    return PlanetImageryConfig.model_validate(data)


def test_least_cloudy_mosaic_by_scene_metadata(planet, tmp_path):
    planet.add(Mosaic("nicfi_2021-06", {q: _quad(1000) for q in QUADS}, cloud=40.0))
    planet.add(Mosaic("nicfi_2021-11", {q: _quad(2000) for q in QUADS}, cloud=5.0))
    src = open_imagery(_cfg(planet, tmp_path))
    src.check_bands(2021)
    grid = src.grid(2021)
    assert grid.crs.to_epsg() == 3857 and grid.res[0] == pytest.approx(RES)
    px, valid = src.read(2021, grid)
    assert valid.mean() > 0.9 and not valid.all()  # the quads' strips without data stay nodata
    assert np.array_equal(px[:, valid][0], np.full(valid.sum(), 2000.0))  # November: the less cloudy
    record = json.loads((src.root / "2021" / f"{QUADS[0]}.json").read_text())
    assert record["mosaic"] == "nicfi_2021-11" and "metadata" in record["chosen_by"]
    assert record["candidates"] == ["nicfi_2021-06", "nicfi_2021-11"]
    n = len(planet.requests)
    again = open_imagery(_cfg(planet, tmp_path))
    again.check_bands(2021)
    again.read(2021, grid)
    assert len(planet.requests) == n  # a rerun reads the cache: no request at all


def test_least_cloudy_by_pixels_without_metadata(planet, tmp_path):
    planet.add(Mosaic("nicfi_2021-06", {q: _quad(1500) for q in QUADS}))
    planet.add(Mosaic("nicfi_2021-11", {q: _quad(2000, cloudy=0.3) for q in QUADS}))
    src = open_imagery(_cfg(planet, tmp_path))
    px, valid = src.read(2021, src.grid(2021))
    assert np.all(px[0][valid] == 1500)
    record = json.loads((src.root / "2021" / f"{QUADS[1]}.json").read_text())
    assert record["mosaic"] == "nicfi_2021-06" and "pixels" in record["chosen_by"]
    assert not list((src.root / "2021").glob("*.part"))


def test_the_key_never_leaks(planet, tmp_path, caplog):
    planet.add(Mosaic("nicfi_2021-06", {q: _quad(1000) for q in QUADS}, cloud=10.0))
    with caplog.at_level(logging.DEBUG):
        src = open_imagery(_cfg(planet, tmp_path, mosaics={2021: ["nicfi_2021-06"]}))
        src.read(2021, src.grid(2021))
    assert all(KEY not in r for r in planet.requests)  # links carrying api_key were stripped before use
    assert all(h.get("Authorization") == f"api-key {KEY}" for h in planet.headers_seen)
    assert KEY not in caplog.text
    for f in (tmp_path / "cache").rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    assert strip_key(f"https://x/q?a=1&api_key={KEY}") == "https://x/q?a=1"


def test_downloads_resume_after_a_dropped_connection_and_a_429(planet, tmp_path):
    planet.add(Mosaic("nicfi_2021-06", {q: _quad(1000) for q in QUADS}, cloud=10.0))
    planet.throttle_next = 1
    planet.drop_next_download = True
    src = open_imagery(_cfg(planet, tmp_path, mosaics={2021: ["nicfi_2021-06"]}))
    px, valid = src.read(2021, src.grid(2021))
    assert np.all(px[0][valid] == 1000)
    downloads = [r for r in planet.requests if r.endswith("/full") or "/full?" in r]
    assert len(downloads) == 3  # one dropped halfway, resumed with a range request; one whole
    assert any("Range" in h for h in planet.headers_seen)


def test_bad_keys_and_missing_mosaics_fail_in_one_line(planet, tmp_path, monkeypatch):
    planet.add(Mosaic("nicfi_2021-06", {q: _quad(1000) for q in QUADS}, cloud=10.0))
    with pytest.raises(ImageryError, match="none of the mosaics of 2019 exists"):
        open_imagery(_cfg(planet, tmp_path)).check_bands(2019)
    monkeypatch.setenv("PL_API_KEY", "wrong-key")
    with pytest.raises(ImageryError, match=r"refused the key \(HTTP 401\): set PL_API_KEY") as e:
        open_imagery(_cfg(planet, tmp_path)).check_bands(2021)
    assert "wrong-key" not in str(e.value) and "\n" not in str(e.value)
    monkeypatch.delenv("PL_API_KEY")
    with pytest.raises(ImageryError, match="PL_API_KEY is not set"):
        open_imagery(_cfg(planet, tmp_path)).check_bands(2021)
    monkeypatch.setenv("PL_API_KEY", KEY)
    with pytest.raises(ImageryError, match="no answer from the Planet API"):
        open_imagery(_cfg(planet, tmp_path, api_url="http://127.0.0.1:9/basemaps/v1", retries=0)).check_bands(2021)


def test_run_maps_with_planet_basemaps(planet, tmp_path, tiny_run):
    import tomli_w
    from typer.testing import CliRunner

    from minemap.cli import app

    for year, value in ((2019, 900), (2021, 1100)):
        planet.add(Mosaic(f"nicfi_{year}-11", {q: _quad(value, seed=year) for q in QUADS}, cloud=5.0))
    imagery = _cfg(planet, tmp_path, mosaics={2019: ["nicfi_2019-11"], 2021: ["nicfi_2021-11"]})
    (tmp_path / "run.toml").write_text(tomli_w.dumps({
        "years": "2019,2021", "out": "out", "imagery": imagery.model_dump(mode="json", exclude_none=True),
        "model": {"path": str(tiny_run[0].out / "model")}, "accept_weak_model": True,
        "predict": {"tile_size": 128}}))
    r = CliRunner().invoke(app, ["run", str(tmp_path / "run.toml")])
    assert r.exit_code == 0, r.output
    for year in (2019, 2021):
        assert list((tmp_path / "out" / "probabilities" / str(year)).glob("*.tif"))
    record = (tmp_path / "out" / "probabilities" / "imagery.json").read_text()
    assert '"source": "planet"' in record and KEY not in record


def test_cli_fetch_fills_the_planet_cache(planet, tmp_path):
    from typer.testing import CliRunner

    from minemap.cli import app

    planet.add(Mosaic("nicfi_2021-06", {q: _quad(1000) for q in QUADS}, cloud=30.0))
    planet.add(Mosaic("nicfi_2021-11", {q: _quad(2000) for q in QUADS}, cloud=5.0))
    cfg = _cfg(planet, tmp_path)
    args = ["imagery", "fetch", "--source", "planet", "--url", planet.url, "--aoi", ",".join(map(str, cfg.bbox)),
            "--years", "2021", "--cache", str(tmp_path / "cache")]
    r = CliRunner().invoke(app, args + ["--months", "6-11"])
    assert r.exit_code == 2 and "none of the mosaics of 2021 exists" in r.output  # the template's names
    import tomli_w

    (tmp_path / "p.toml").write_text(tomli_w.dumps({"imagery": cfg.model_dump(mode="json", exclude_none=True)}))
    r = CliRunner().invoke(app, ["imagery", "fetch", str(tmp_path / "p.toml"), "--years", "2021"])
    assert r.exit_code == 0, r.output
    assert "2 composites (2 fetched" in r.output.replace("\n", " ") and KEY not in r.output
    records = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("L15-*.json")]
    assert len(records) == 2 and {r["mosaic"] for r in records} == {"nicfi_2021-11"}


# -- partial downloads shared between processes; the key only to the API's host; quad ids as file names ---------
def _downloads(planet, since=0):
    return [(r, h) for r, h in zip(planet.requests[since:], planet.headers_seen[since:]) if "/full" in r]


def test_a_partial_download_is_resumed_by_another_process(planet, tmp_path):
    import os
    import subprocess
    import sys

    planet.add(Mosaic("nicfi_2021-06", {q: _quad(1000) for q in QUADS}, cloud=10.0))
    cfg = _cfg(planet, tmp_path, mosaics={2021: ["nicfi_2021-06"]}, retries=0)
    planet.drop_next_download = True
    src = open_imagery(cfg)
    with pytest.raises(ImageryError, match="kept failing .*rerun to resume it"):
        src.quad(2021, QUADS[0])
    parts = list((src.root / "2021").glob("*.part"))
    whole = planet.mosaics["nicfi_2021-06"].files[QUADS[0]].stat().st_size
    assert len(parts) == 1 and parts[0].name.startswith(f".{QUADS[0]}.") and 0 < parts[0].stat().st_size < whole
    have, n = parts[0].stat().st_size, len(planet.requests)
    script = ("import sys; from minemap.imagery.planet import PlanetImageryConfig; from minemap.imagery import open_imagery; "
              "open_imagery(PlanetImageryConfig.model_validate_json(sys.argv[1])).quad(2021, sys.argv[2])")
    r = subprocess.run([sys.executable, "-c", script, cfg.model_dump_json(), QUADS[0]], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert [h.get("Range") for _, h in _downloads(planet, n)] == [f"bytes={have}-"]  # the rest only
    assert (src.root / "2021" / f"{QUADS[0]}.tif").is_file() and not list((src.root / "2021").glob("*.part"))

    # a run that died between a whole download and its conversion: the part is taken as it is
    part = parts[0].with_name(parts[0].name.replace(QUADS[0], QUADS[1]))
    part.write_bytes(planet.mosaics["nicfi_2021-06"].files[QUADS[1]].read_bytes())
    size, n = part.stat().st_size, len(planet.requests)
    px, valid = open_imagery(cfg).read(2021, src.grid(2021))
    assert np.all(px[0][valid] == 1000) and valid.mean() > 0.9
    assert [h.get("Range") for _, h in _downloads(planet, n)] == [f"bytes={size}-"]  # answered 416: nothing to add
    assert not part.exists()


def test_a_part_another_process_is_writing_is_left_to_it(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    from minemap.imagery.planet import _partial

    part = tmp_path / ".L15-0000E-0000N.0123abcd.part"
    part.write_bytes(b"half")
    with open(part, "ab") as other:  # held by another writer (a lock of another open file, as another process's)
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with _partial(part) as p:
            assert p != part and p.parent == part.parent and p.name.startswith(".L15-0000E-0000N.0123abcd.")
            p.write_bytes(b"mine")
        assert not p.exists() and part.read_bytes() == b"half"
    with _partial(part) as p:
        assert p == part


class _Elsewhere:
    """Another host (another port of the loopback interface) that serves the quads and their scenes, and records
    the headers of every request it gets."""

    def __init__(self, planet: PlanetServer) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.headers: list[dict] = []
        seen, mosaics = self.headers, planet.mosaics

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                seen.append(dict(self.headers))
                if self.path.startswith("/items"):
                    body = json.dumps({"items": [{"properties": {"cloud_percent": 3.0}}]}).encode()
                else:
                    m, qid = self.path.split("?")[0].split("/")[-2:]
                    body = mosaics[m].files[qid].read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_key_goes_to_the_api_host_only(planet, tmp_path):
    from minemap.imagery.planet import PlanetImagery

    planet.add(Mosaic("nicfi_2021-06", {q: _quad(1000) for q in QUADS}, cloud=10.0))
    other = _Elsewhere(planet)
    api_json = planet.quad_json

    def links_elsewhere(m, qid):  # what a compromised API (or one serving signed asset URLs) would answer
        q = api_json(m, qid)
        q["_links"] = {"download": f"{other.url}/quads/{m.name}/{qid}?api_key={KEY}", "items": f"{other.url}/items"}
        return q

    planet.quad_json = links_elsewhere
    try:
        src = open_imagery(_cfg(planet, tmp_path, mosaics={2021: ["nicfi_2021-06"]}))
        px, valid = src.read(2021, src.grid(2021))
    finally:
        other.close()
    assert np.all(px[0][valid] == 1000)
    assert len(other.headers) == 4  # two quads: their scenes and their downloads, from the other host
    assert all("Authorization" not in h and KEY not in json.dumps(h) for h in other.headers)
    assert all(h.get("Authorization") == f"api-key {KEY}" for h in planet.headers_seen)  # the API's host: the key

    api = PlanetImagery(_cfg(planet, tmp_path, api_url="https://api.planet.com/basemaps/v1"))
    assert api._keyed("https://api.planet.com/basemaps/v1/mosaics?x=1") and api._keyed("https://API.planet.com:443/q")
    assert api._keyed("https://link.planet.com/basemaps/v1/mosaics/m/quads/q/full")  # Planet's download host
    for url in ("http://api.planet.com/basemaps/v1", "https://api.planet.com:8443/basemaps/v1",
                "https://api.planet.com.evil.example/basemaps/v1", "https://evil.example/?h=api.planet.com",
                "https://storage.googleapis.com/signed?sig=1", "https://user@evil.example/"):
        assert not api._keyed(url), url
    local = PlanetImagery(_cfg(planet, tmp_path))
    assert local._keyed(planet.url + "/mosaics") and not local._keyed(other.url + "/quads")
    assert not local._keyed("https://link.planet.com/basemaps/v1/mosaics")  # Planet's hosts go with Planet's API


def test_unsafe_quad_ids_are_refused(planet, tmp_path):
    from minemap.imagery.planet import safe_quad_id

    planet.add(Mosaic("nicfi_2021-06", {q: _quad(1000) for q in QUADS}, cloud=10.0))
    api_json = planet.quad_json
    planet.quad_json = lambda m, qid: {**api_json(m, qid), "id": "../../etc/x"} if qid == QUADS[1] else api_json(m, qid)
    src = open_imagery(_cfg(planet, tmp_path, mosaics={2021: ["nicfi_2021-06"]}))
    with pytest.raises(ImageryError) as e:
        src.check_bands(2021)
    assert "the API named a quad '../../etc/x', which is not a safe file name" in str(e.value)
    assert "\n" not in str(e.value) and str(e.value).startswith(planet.url)
    assert not (tmp_path / "etc").exists() and not list((tmp_path / "cache").rglob("x*"))
    for bad in ("../x", ".hidden", "a..b", "a/b", "a\\b", "x" * 101, "", "a\nb", "C:x", None):
        with pytest.raises(ImageryError, match="not a safe file name") as e:
            safe_quad_id(bad, "https://api")
        assert "\n" not in str(e.value) and len(str(e.value)) < 300
    for good in ("L15-0000E-0000N", "708-1052", "1234_56.v2"):
        assert safe_quad_id(good, "https://api") == good
