"""An imitation of Planet's basemaps API on the loopback interface, for tests: mosaics by name, their quads over a
bbox (paged, the next link carrying an ``api_key`` the client must strip), the quads' contributing scenes with
cloud metadata (optional), and quad downloads with range requests. It checks the key in the Authorization header
(401 otherwise), records every request line, and can answer 429 (Retry-After) or drop a download halfway."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import rasterio
from affine import Affine
from rasterio.warp import transform_bounds

RES = 40075016.685578488 / (256 * 2 ** 15)


@dataclass
class Mosaic:
    name: str
    quads: dict[str, np.ndarray]  # quad id -> (5, h, w) uint16: four bands and alpha
    cloud: float | None = None  # scene metadata (cloud and haze percent), None: the API gives none
    mosaic_id: str = ""
    files: dict[str, Path] = field(default_factory=dict)


class PlanetServer:
    def __init__(self, root: Path, key: str, origin: tuple[float, float]) -> None:
        self.root, self.key, self.origin = Path(root), key, origin
        self.root.mkdir(parents=True, exist_ok=True)
        self.mosaics: dict[str, Mosaic] = {}
        self.requests: list[str] = []
        self.headers_seen: list[dict] = []
        self.throttle_next = 0  # answer this many next requests with 429, Retry-After: 1
        self.drop_next_download = False
        handler = type("Handler", (_Handler,), {"api": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/basemaps/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def quad_transform(self, col: int, size: int) -> Affine:
        x0, y0 = self.origin
        return Affine(RES, 0, x0 + col * size * RES, 0, -RES, y0)

    def add(self, mosaic: Mosaic) -> None:
        mosaic.mosaic_id = f"m{len(self.mosaics)}"
        for qid, data in mosaic.quads.items():
            col = int(qid.split("-")[1].rstrip("E"))
            path = self.root / f"{mosaic.mosaic_id}_{qid}.tif"
            with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=5,
                               dtype="uint16", crs="EPSG:3857", transform=self.quad_transform(col, data.shape[2]),
                               tiled=True, blockxsize=64, blockysize=64) as dst:
                dst.write(data)
            mosaic.files[qid] = path
        self.mosaics[mosaic.name] = mosaic

    def quad_bbox(self, qid: str, size: int) -> list[float]:
        col = int(qid.split("-")[1].rstrip("E"))
        t = self.quad_transform(col, size)
        return list(transform_bounds("EPSG:3857", "EPSG:4326", t.c, t.f - size * RES, t.c + size * RES, t.f))

    def quad_json(self, m: Mosaic, qid: str) -> dict:
        base = f"{self.url}/mosaics/{m.mosaic_id}/quads/{qid}"
        links = {"download": f"{base}/full?api_key={self.key}"}
        if m.cloud is not None:
            links["items"] = f"{base}/items"
        return {"id": qid, "bbox": self.quad_bbox(qid, m.quads[qid].shape[2]), "_links": links}


class _Handler(BaseHTTPRequestHandler):
    api: PlanetServer

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def do_GET(self) -> None:
        api = self.api
        api.requests.append(self.path)
        api.headers_seen.append(dict(self.headers))
        if self.headers.get("Authorization") != f"api-key {api.key}":
            return self._json({"message": "Unauthorized"}, 401)
        if api.throttle_next:
            api.throttle_next -= 1
            return self._send(429, b'{"message": "slow down"}', headers={"Retry-After": "1"})
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        path = u.path.removeprefix("/basemaps/v1")
        if path == "/mosaics":
            m = api.mosaics.get(q.get("name__is", ""))
            return self._json({"mosaics": [{"id": m.mosaic_id, "name": m.name}] if m else []})
        m = re.fullmatch(r"/mosaics/(\w+)/quads", path)
        if m:
            mos = next(x for x in api.mosaics.values() if x.mosaic_id == m.group(1))
            ids = sorted(mos.quads)
            page = int(q.get("page", 1))
            out = {"items": [api.quad_json(mos, qid) for qid in ids[page - 1:page]], "_links": {}}
            if page < len(ids):
                out["_links"]["_next"] = f"{api.url}/mosaics/{mos.mosaic_id}/quads?page={page + 1}&api_key={api.key}"
            return self._json(out)
        m = re.fullmatch(r"/mosaics/(\w+)/quads/([\w-]+)/items", path)
        if m:
            mos = next(x for x in api.mosaics.values() if x.mosaic_id == m.group(1))
            return self._json({"items": [{"properties": {"cloud_percent": mos.cloud, "heavy_haze_percent": mos.cloud}}]})
        m = re.fullmatch(r"/mosaics/(\w+)/quads/([\w-]+)/full", path)
        if m:
            mos = next(x for x in api.mosaics.values() if x.mosaic_id == m.group(1))
            data = mos.files[m.group(2)].read_bytes()
            start = 0
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if rng:
                start = int(rng.group(1))
                if start >= len(data):
                    return self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
            body = data[start:]
            self.send_response(206 if rng else 200)
            self.send_header("Content-Type", "image/tiff")
            self.send_header("Content-Length", str(len(body)))
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if api.drop_next_download:
                api.drop_next_download = False
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)
            return
        self._json({"message": "not found"}, 404)
