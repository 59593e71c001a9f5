"""A STAC API on the loopback interface, for tests: a landing page, ``/search`` (GET and POST, with bbox, datetime
and collection filters, paged two items a page), and the items' assets (COGs the test wrote) served with HTTP
range requests, as GDAL reads them. It counts requests and can answer the next searches with 429 (Retry-After)
or 503 first."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.warp import transform_bounds

PAGE = 2


@dataclass
class Scene:
    """One item: its date, bands (name -> (h, w) uint16 array), SCL (uint8) and extra properties."""

    item_id: str
    date: str
    bands: dict[str, np.ndarray]
    scl: np.ndarray
    properties: dict = field(default_factory=dict)
    crs: str | None = None  # the scene's own CRS and grid, where not the server's (scenes in several UTM zones)
    transform: Affine | None = None


class StacServer:
    def __init__(self, root: Path, crs: str, transform: Affine, collection: str = "sentinel-2-l2a") -> None:
        self.root, self.crs, self.transform, self.collection = Path(root), crs, transform, collection
        self.items: list[dict] = []
        self.requests: list[str] = []
        self.fail_next: list[tuple[int, dict]] = []  # (status, headers) answered to the next searches
        self.root.mkdir(parents=True, exist_ok=True)
        handler = type("Handler", (_Handler,), {"api": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, scene: Scene) -> None:
        assets = {}
        crs, transform = scene.crs or self.crs, scene.transform or self.transform
        for name, data in [*scene.bands.items(), ("scl", scene.scl)]:
            path = self.root / f"{scene.item_id}_{name}.tif"
            _write_cog(path, data, crs, transform)
            assets[name] = {"href": f"{self.url}/data/{path.name}", "roles": ["data"],
                            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                            "proj:shape": list(data.shape), "proj:transform": list(transform)[:6],
                            "raster:bands": [{"data_type": str(data.dtype), "nodata": 0}]}
        h, w = scene.scl.shape
        left, top = transform.c, transform.f
        right, bottom = left + w * transform.a, top + h * transform.e
        bbox = transform_bounds(crs, "EPSG:4326", left, bottom, right, top, densify_pts=21)  # west > east: across 180
        self.items.append({
            "type": "Feature", "stac_version": "1.0.0", "id": scene.item_id, "collection": self.collection,
            "stac_extensions": ["https://stac-extensions.github.io/projection/v1.1.0/schema.json",
                                "https://stac-extensions.github.io/raster/v1.1.0/schema.json"],
            "geometry": shapely.geometry.mapping(_box(bbox)), "bbox": list(bbox),
            "properties": {"datetime": f"{scene.date}T10:30:00Z", "proj:epsg": int(crs.split(":")[1]),
                           **scene.properties},
            "links": [], "assets": assets})

    def landing(self) -> dict:
        u = self.url
        return {"type": "Catalog", "stac_version": "1.0.0", "id": "loopback", "description": "a test STAC API",
                "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                               "https://api.stacspec.org/v1.0.0/item-search",
                               "https://api.stacspec.org/v1.0.0/item-search#query"],
                "links": [{"rel": "self", "href": f"{u}/", "type": "application/json"},
                          {"rel": "root", "href": f"{u}/", "type": "application/json"},
                          {"rel": "search", "href": f"{u}/search", "type": "application/geo+json", "method": "GET"},
                          {"rel": "search", "href": f"{u}/search", "type": "application/geo+json",
                           "method": "POST"}]}

    def search(self, params: dict, method: str) -> dict:
        hits = [it for it in self.items if _matches(it, params)]
        page = int(params.get("page", 1))
        features = hits[(page - 1) * PAGE: page * PAGE]
        links = []
        if page * PAGE < len(hits):
            if method == "POST":
                links.append({"rel": "next", "href": f"{self.url}/search", "method": "POST",
                              "body": {"page": page + 1}, "merge": True})
            else:
                query = "&".join(f"{k}={v}" for k, v in {**params, "page": page + 1}.items())
                links.append({"rel": "next", "href": f"{self.url}/search?{query}"})
        return {"type": "FeatureCollection", "features": features, "links": links}


VEGETATION = (500, 800, 400, 3000)  # red, green, blue, nir of the places' ground
MINE = (2600, 2100, 1600, 2500)  # and of their mines


def serve_places(server: StacServer, geoms, year: int, res: float, margin_m: float, rng: np.random.Generator,
                 crs_of=None, prefix: str = "S2") -> None:
    """One clear scene of ``year`` at each polygon of ``geoms`` (EPSG:4326): vegetation, the polygon as bare
    mine soil rasterised on the scene's own grid of ``res`` m, reaching ``margin_m`` around it, in the polygon's
    UTM zone or ``crs_of(k, lon, lat)`` (places on every continent, as the literature's mines lie)."""
    import math

    import geopandas as gpd
    from rasterio import features
    from minemap.imagery.stac import utm_crs

    for k, geom in enumerate(geoms):
        w, s, e, n = geom.bounds
        lon, lat = (w + e) / 2, (s + n) / 2
        crs = crs_of(k, lon, lat) if crs_of else utm_crs(lon, lat).to_string()
        left, bottom, right, top = transform_bounds("EPSG:4326", crs, w, s, e, n, densify_pts=21)
        x0 = math.floor((left - margin_m) / res) * res
        y0 = math.ceil((top + margin_m) / res) * res
        width = int(math.ceil((right + margin_m - x0) / res))
        height = int(math.ceil((y0 - (bottom - margin_m)) / res))
        transform = Affine(res, 0, x0, 0, -res, y0)
        local = gpd.GeoSeries([geom], crs="EPSG:4326").to_crs(crs).iloc[0]
        mine = features.rasterize([(local, 1)], (height, width), transform=transform).astype(bool)
        bands = {}
        for i, name in enumerate(("red", "green", "blue", "nir")):
            band = VEGETATION[i] + rng.normal(0, 40, (height, width))
            band[mine] = MINE[i] + rng.normal(0, 40, int(mine.sum()))
            bands[name] = np.clip(band, 1, None).astype(np.uint16)
        scl = np.where(mine, 5, 4).astype(np.uint8)
        server.add(Scene(f"{prefix}_{k:03d}_{year}0615", f"{year}-06-15", bands, scl, crs=crs, transform=transform))


def _matches(item: dict, params: dict) -> bool:
    collections = params.get("collections")
    if isinstance(collections, str):
        collections = collections.split(",")
    if collections and item["collection"] not in collections:
        return False
    bbox = params.get("bbox")
    if isinstance(bbox, str):
        bbox = [float(v) for v in bbox.split(",")]
    if bbox and not shapely.intersects(_box(bbox), _box(item["bbox"])):
        return False
    if params.get("datetime"):
        start, _, end = params["datetime"].partition("/")
        when = dt.datetime.fromisoformat(item["properties"]["datetime"].replace("Z", "+00:00"))
        lo = dt.datetime.fromisoformat(start.replace("Z", "+00:00")) if start not in ("", "..") else None
        hi = dt.datetime.fromisoformat(end.replace("Z", "+00:00")) if end not in ("", "..") else None
        if (lo and when < lo) or (hi and when > hi):
            return False
    return True


def _box(bbox) -> shapely.Geometry:
    """A STAC bbox as a shape: one whose west lies east of its east crosses the antimeridian (two parts)."""
    w, s, e, n = bbox[:4]
    if w > e:
        return shapely.union(shapely.box(w, s, 180, n), shapely.box(-180, s, e, n))
    return shapely.box(w, s, e, n)


def _write_cog(path: Path, data: np.ndarray, crs: str, transform: Affine) -> None:
    profile = dict(driver="COG", width=data.shape[1], height=data.shape[0], count=1, dtype=data.dtype, crs=crs,
                   transform=transform, nodata=0, blocksize=128, compress="deflate", overviews="none")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


class _Handler(BaseHTTPRequestHandler):
    api: StacServer

    def log_message(self, *args) -> None:  # quiet; requests are counted instead
        pass

    def _json(self, obj: dict, status: int = 200, headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _search(self, params: dict) -> None:
        self.api.requests.append(f"{self.command} /search")
        if self.api.fail_next:
            status, headers = self.api.fail_next.pop(0)
            return self._json({"code": "Busy", "description": "try later"}, status, headers)
        self._json(self.api.search(params, self.command))

    def do_GET(self) -> None:
        u = urlparse(self.path)
        if u.path in ("", "/"):
            self.api.requests.append("GET /")
            return self._json(self.api.landing())
        if u.path == "/search":
            return self._search({k: v[0] for k, v in parse_qs(u.query).items()})
        if u.path.startswith("/data/"):
            return self._file(u.path[len("/data/"):])
        self._json({"code": "NotFound"}, 404)

    def do_HEAD(self) -> None:
        u = urlparse(self.path)
        if u.path.startswith("/data/"):
            return self._file(u.path[len("/data/"):], head=True)
        self.send_response(404)
        self.end_headers()

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(n) or b"{}")
        if urlparse(self.path).path == "/search":
            return self._search(body)
        self._json({"code": "NotFound"}, 404)

    def _file(self, name: str, head: bool = False) -> None:
        path = self.api.root / Path(name).name
        if not path.is_file():
            self.send_response(404)
            self.end_headers()
            return
        self.api.requests.append(f"{self.command} /data/{path.name}")
        data = path.read_bytes()
        size = len(data)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return
            chunk = data[start:end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            chunk = data
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if not head:
            self.wfile.write(chunk)
