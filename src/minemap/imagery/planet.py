"""Planet basemaps (the API the NICFI mosaics were served from): per year and quad, the least cloudy of the
year's mosaics, downloaded once and cached.

For a year, the candidate mosaics are ``mosaics[year]`` or the monthly names of ``mosaic_template``. Per quad
(Planet's fixed 4096 x 4096 px tiles of EPSG:3857), the mosaic chosen is the one whose contributing scenes are
least cloudy by their metadata (mean of ``cloud_percent`` and ``heavy_haze_percent``, as the study did), where the
API gives it; else the one whose own pixels look least cloudy (share of pixels bright in every visible band, or
without data). The choice is recorded per quad and year beside the cached quad (``<quad>.json``).

The API key comes from the environment (``PL_API_KEY``) only and travels in the Authorization header: it never
appears in a stored URL, a log line, an error message or an output (links the API returns are stripped of any
``api_key`` parameter before use). It goes only to the configured API's own host (same scheme, host and port as
``api_url``; for Planet's API also to its download host, :data:`KEY_HOSTS`): a link the API returns that names
another host (a signed asset URL, or a response that would send the key elsewhere) is fetched without it, and so
is a redirect to another host. Quad ids become file names and are refused unless they are plain ones
(:func:`safe_quad_id`).

Downloads resume where they stopped, in this process or a later one: each quad of each mosaic is written to a
partial file of its own, ``.<quad>.<mosaic hash>.part`` beside the cached quads, continued with an HTTP range
request from its size. A process holds an exclusive lock on the partial file while it writes and converts it; a
second one fetching the same quad at once writes a name of its own instead (not resumable, removed when done). A
quad is checked, rewritten as a 4-band COG (nodata 0 where the quad's alpha is 0) and renamed into the cache only
when complete, and its partial file removed. Requests are retried with backoff on 429 (honouring Retry-After),
5xx, dropped connections and time-outs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import numpy as np
import rasterio
import shapely
from pyproj import CRS
from rasterio.warp import transform_bounds
from pydantic import Field, field_validator

from minemap.settings import Section
from minemap._io import stable_hash, write_json
from minemap.errors import ImageryError
from minemap.geo import check_bbox
from minemap.imagery.remote import cache_root, check_months, month_spec, retry_policy
from minemap.lattice import Grid, area_grid
from minemap.imagery.local import file_info, read_files
from minemap.formats.rasters import write_cog

try:  # POSIX: a partial download is locked by the process writing it
    import fcntl
except ImportError:  # pragma: no cover - Windows: partial downloads are not shared between processes
    fcntl = None


class PlanetImageryConfig(Section):
    """Planet basemap quads (the API the NICFI mosaics were served from), the least cloudy of a year's mosaics
    per quad, cached on disk; the key comes from ``PL_API_KEY`` only. See :mod:`minemap.imagery.planet`."""

    source: Literal["planet"] = "planet"
    api_url: str = "https://api.planet.com/basemaps/v1"
    bbox: tuple[float, float, float, float] = Field(description="the area: west, south, east, north (EPSG:4326)")
    mosaics: dict[int, list[str]] = Field({}, description="per year, the mosaics to choose from, e.g. {2021 = "
                                                          "['planet_medres_normalized_analytic_2021-11_mosaic']}")
    mosaic_template: str = Field("planet_medres_normalized_analytic_{year}-{month:02d}_mosaic",
                                 description="names of a year's monthly mosaics, for years not in ``mosaics``")
    months: list[int] = Field([6, 7, 8, 9, 10, 11], description="months of the template's mosaics, e.g. '6-11'")
    bands: list[str] = Field(["blue", "green", "red", "nir"], description="the quads' bands, in file order "
                                                                        "(PlanetScope analytic: B, G, R, NIR, "
                                                                        "then alpha)")
    cache_dir: Path | None = Field(None, description="default: $MINEMAP_CACHE or ~/.cache/minemap")
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(5, ge=0)

    _months = field_validator("months", mode="before")(classmethod(lambda cls, v: month_spec(v)))
    _month_range = field_validator("months")(classmethod(lambda cls, v: check_months(v)))

    _area = field_validator("bbox")(classmethod(lambda cls, v: check_bbox(v)))


log = logging.getLogger(__name__)
KEY_ENV = "PL_API_KEY"
# hosts besides the API's own that get the key, by the API's origin: Planet serves quad downloads from
# link.planet.com (which needs the key, and redirects to a signed URL, fetched without it)
KEY_HOSTS = {("https", "api.planet.com", 443): frozenset({("https", "link.planet.com", 443)})}
QUAD_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")  # ids become file names: no separator, no leading dot
CHUNK = 1 << 16
QUAD_RES = 40075016.685578488 / (256 * 2 ** 15)  # a zoom-15 basemap pixel, ~4.777 m
CLOUD_LEVEL = 2500  # a quad pixel brighter than this in every visible band (reflectance x 10,000) looks cloudy


def origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port of ``url`` (the port the scheme implies where none is given), in lower case."""
    u = urlparse(url)
    scheme = u.scheme.lower()
    try:
        port = u.port
    except ValueError:  # not a number
        return scheme, "", -1
    return scheme, (u.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def safe_quad_id(quad_id, api_url: str) -> str:
    """``quad_id`` if it is a plain file name (letters, digits, ``_``, ``.``, ``-``; no leading dot, no ``..``; at
    most 100 characters), else :class:`ImageryError`: quad ids come from the API and become file names."""
    if not isinstance(quad_id, str) or not QUAD_ID.fullmatch(quad_id) or ".." in quad_id:
        shown = repr(quad_id)
        shown = shown[:60] + "..." if len(shown) > 60 else shown
        raise ImageryError(f"{api_url}: the API named a quad {shown}, which is not a safe file name (letters, "
                           "digits, '_', '.', '-' only, no leading dot, no '..', at most 100 characters)")
    return quad_id


def strip_key(url: str) -> str:
    """``url`` without an ``api_key`` query parameter."""
    u = urlparse(url)
    query = [(k, v) for k, v in parse_qsl(u.query, keep_blank_values=True) if k.lower() != "api_key"]
    return urlunparse(u._replace(query=urlencode(query)))


class PlanetImagery:
    """Quads of Planet basemaps over ``cfg.bbox``; see the module docstring."""

    masks_clouds = False  # the least cloudy mosaic is chosen, but its pixels are not masked (no UDM2 is read)

    def __init__(self, cfg: PlanetImageryConfig, bands: list[str] | None = None) -> None:
        self.cfg = cfg
        unknown = [b for b in bands or [] if b not in cfg.bands]
        if unknown:
            raise ImageryError(f"{cfg.api_url}: basemap quads hold bands {cfg.bands}; {unknown} are not among them")
        self.band_names = list(bands) if bands else list(cfg.bands)  # any of the quads' bands, in any order
        self._order = [cfg.bands.index(b) for b in self.band_names]
        self.key = stable_hash([cfg.api_url.rstrip("/"), {str(k): v for k, v in sorted(cfg.mosaics.items())},
                                cfg.mosaic_template, cfg.months, cfg.bands])
        self.root = cache_root(cfg.cache_dir) / f"planet-{self.key}"
        self._mosaics: dict[str, dict] = {}
        self._quads: dict[str, dict[str, dict]] = {}
        self.fetched: list[dict] = []

    # -- the protocol ----------------------------------------------------------------------------------------
    def years(self) -> list[int]:
        return sorted(set(self.cfg.mosaics) | set(range(2015, 2031)))

    def names(self, year: int) -> list[str]:
        if year in self.cfg.mosaics:
            return list(self.cfg.mosaics[year])
        return [self.cfg.mosaic_template.format(year=year, month=m) for m in self.cfg.months]

    @cached_property
    def _grid(self) -> Grid:
        return area_grid(self.cfg.bbox, CRS.from_epsg(3857), QUAD_RES)

    def grid(self, year: int) -> Grid:
        return self._grid

    def fingerprint(self, year: int) -> str:
        return stable_hash([self.key, year])

    def check_bands(self, year: int) -> None:
        """Raise unless at least one of the year's mosaics exists and has quads over the area."""
        if self._all_cached(year):
            return
        found = [name for name in self.names(year) if self._mosaic(name, required=False)]
        if not found:
            raise ImageryError(f"{self.cfg.api_url}: none of the mosaics of {year} exists "
                               f"({', '.join(self.names(year)[:3])}{', ...' if len(self.names(year)) > 3 else ''})")
        if not any(self._quad_list(name) for name in found):
            raise ImageryError(f"{self.cfg.api_url}: the mosaics of {year} have no quads over bbox "
                               f"{list(self.cfg.bbox)}")

    def read(self, year: int, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        box = shapely.box(*transform_bounds(grid.crs, "EPSG:4326", *grid.bounds, densify_pts=21))
        paths = [self.quad(year, q) for q in self.quads_over(year, box)]
        pixels, valid = read_files([file_info(p) for p in paths], grid, len(self.cfg.bands))
        return pixels[self._order], valid

    def fetch(self, years: list[int], progress: bool = True) -> list[dict]:
        """Fill the cache for ``years`` over the whole area ahead of a run: one record per quad and year (the
        mosaic chosen, its cloud score, bytes, and whether it was already cached)."""
        from tqdm.auto import tqdm

        for year in years:
            self.check_bands(year)
        box = shapely.box(*self.cfg.bbox)
        todo = [(y, q) for y in years for q in self.quads_over(y, box)]
        records = []
        for year, q in tqdm(todo, desc="quads", unit="quad", disable=not progress):
            path = self.root / str(year) / f"{q}.tif"
            cached = path.is_file()
            self.quad(year, q)
            records.append({**json.loads(path.with_suffix(".json").read_text()), "bytes": path.stat().st_size,
                            "cached": cached})
        return records

    # -- quads -----------------------------------------------------------------------------------------------
    def _quads_record(self, year: int) -> Path:
        """The list of the year's quads over this area (areas share the quads, not the list)."""
        return self.root / str(year) / f"quads-{stable_hash([round(v, 7) for v in self.cfg.bbox])}.json"

    def _all_cached(self, year: int) -> bool:
        record = self._quads_record(year)
        if not record.is_file():
            return False
        ids = [safe_quad_id(q, self.cfg.api_url) for q in json.loads(record.read_text())]
        return all((self.root / str(year) / f"{q}.tif").is_file() for q in ids)

    def quads_over(self, year: int, box: shapely.Geometry) -> list[str]:
        """Ids of the year's quads (in any of its mosaics) that touch ``box`` (EPSG:4326)."""
        record = self._quads_record(year)
        if record.is_file():
            ids = [safe_quad_id(q, self.cfg.api_url) for q in json.loads(record.read_text())]
            bboxes = {q: json.loads((self.root / str(year) / f"{q}.json").read_text())["bbox"]
                      for q in ids if (self.root / str(year) / f"{q}.json").is_file()}
            if len(bboxes) == len(ids):
                return [q for q, b in bboxes.items() if shapely.intersects(shapely.box(*b), box)]
        quads: dict[str, list] = {}
        for name in self.names(year):
            if self._mosaic(name, required=False):
                for q in self._quad_list(name).values():
                    quads[q["id"]] = q["bbox"]
        write_json(record, sorted(quads))
        return [q for q, b in quads.items() if shapely.intersects(shapely.box(*b), box)]

    def quad(self, year: int, quad_id: str) -> Path:
        """The cached quad of ``year`` (the least cloudy of its mosaics), downloaded first if need be."""
        quad_id = safe_quad_id(quad_id, self.cfg.api_url)
        path = self.root / str(year) / f"{quad_id}.tif"
        if path.is_file():
            return path
        candidates = [(name, self._quad_list(name)[quad_id]) for name in self.names(year)
                      if self._mosaic(name, required=False) and quad_id in self._quad_list(name)]
        if not candidates:
            raise ImageryError(f"{self.cfg.api_url}: no mosaic of {year} has quad {quad_id}")
        scored = [(self._metadata_cloud(name, q), name, q) for name, q in candidates]

        def part_of(name: str) -> Path:  # one per quad and mosaic, the same in every process: a rerun resumes it
            return held.enter_context(_partial(path.with_name(f".{quad_id}.{stable_hash(name)[:8]}.part")))

        with contextlib.ExitStack() as held:  # the partial files stay locked until converted or dropped
            if all(s is not None for s, _, _ in scored):
                how = "scene metadata (mean of cloud and heavy haze percent)"
                score, name, q = min(scored, key=lambda t: t[0])
                part = self._download(name, q, part_of(name))
            else:
                how = "the quad's pixels (share bright in every visible band or without data)"
                best = None
                for _, name, q in scored:
                    part = self._download(name, q, part_of(name))
                    s = _pixel_cloud(part, self.cfg.bands)
                    if best is None or s < best[0]:
                        if best is not None:
                            best[3].unlink(missing_ok=True)
                        best = (s, name, q, part)
                    else:
                        part.unlink(missing_ok=True)
                score, name, q, part = best
            record = {"year": year, "quad": quad_id, "mosaic": name, "cloud_score": round(float(score), 3),
                      "chosen_by": how, "candidates": [n for n, _ in candidates], "bbox": q["bbox"]}
            write_json(path.with_suffix(".json"), record)
            _write_quad(part, path, len(self.cfg.bands))
            part.unlink(missing_ok=True)
        record["bytes"] = path.stat().st_size
        self.fetched.append(record)
        return path

    # -- the API ---------------------------------------------------------------------------------------------
    @cached_property
    def _auth(self) -> dict[str, str]:
        """The header that carries the key: given per request, to the API's host only (never a session's)."""
        key = os.environ.get(KEY_ENV, "").strip()
        if not key:
            raise ImageryError(f"{KEY_ENV} is not set: Planet basemaps need an API key in the environment "
                               f"(export {KEY_ENV}=...)")
        return {"Authorization": f"api-key {key}"}

    @cached_property
    def _session(self):
        import requests
        from requests.adapters import HTTPAdapter

        self._auth  # noqa: B018 - no request at all without a key
        s = requests.Session()
        s.trust_env = True
        retry = retry_policy(self.cfg.retries)
        s.mount("http://", HTTPAdapter(max_retries=retry))
        s.mount("https://", HTTPAdapter(max_retries=retry))
        return s

    def _keyed(self, url: str) -> bool:
        """Whether ``url`` is on a host that gets the key: the configured API's (see :data:`KEY_HOSTS`)."""
        api = origin(self.cfg.api_url)
        return origin(url) in {api} | KEY_HOSTS.get(api, frozenset())

    def _headers(self, url: str) -> dict:
        auth = self._auth  # raises where the key is not set, wherever the request goes
        return dict(auth) if self._keyed(url) else {}

    def _get(self, url: str, **kw):
        import requests

        url = strip_key(url)
        try:
            r = self._session.get(url, headers=self._headers(url), timeout=self.cfg.timeout_s, **kw)
        except requests.RequestException as e:
            raise ImageryError(f"{self.cfg.api_url}: no answer from the Planet API ({type(e).__name__})") from None
        if r.status_code in (401, 403) and self._keyed(url):
            raise ImageryError(f"{self.cfg.api_url}: the Planet API refused the key (HTTP {r.status_code}): set "
                               f"{KEY_ENV} to a key with access to these basemaps")
        return r

    def _json(self, url: str, **params) -> dict:
        r = self._get(url, params=params or None)
        if r.status_code != 200:
            raise ImageryError(f"{self.cfg.api_url}: the Planet API answered HTTP {r.status_code} to "
                               f"{urlparse(strip_key(r.url)).path}")
        try:
            return r.json()
        except ValueError:
            raise ImageryError(f"{self.cfg.api_url}: the Planet API answered with something other than JSON") from None

    def _mosaic(self, name: str, required: bool = True) -> dict | None:
        if name not in self._mosaics:
            found = self._json(f"{self.cfg.api_url.rstrip('/')}/mosaics", name__is=name).get("mosaics", [])
            self._mosaics[name] = found[0] if found else {}
        if not self._mosaics[name] and required:
            raise ImageryError(f"{self.cfg.api_url}: no mosaic named {name}")
        return self._mosaics[name] or None

    def _quad_list(self, name: str) -> dict[str, dict]:
        """The mosaic's quads over the area, by id (paged)."""
        if name not in self._quads:
            mosaic = self._mosaic(name)
            url = f"{self.cfg.api_url.rstrip('/')}/mosaics/{mosaic['id']}/quads"
            page = self._json(url, bbox=",".join(map(str, self.cfg.bbox)), minimal="true")
            quads = {}
            while True:
                for q in page.get("items", []):
                    quads[safe_quad_id(q.get("id"), self.cfg.api_url)] = q
                nxt = page.get("_links", {}).get("_next")
                if not nxt:
                    break
                page = self._json(nxt)
            self._quads[name] = quads
        return self._quads[name]

    def _metadata_cloud(self, name: str, quad: dict) -> float | None:
        """Mean cloud and heavy-haze percent of the quad's contributing scenes, or None if the API gives none."""
        link = quad.get("_links", {}).get("items")
        if not link:
            return None
        r = self._get(link)
        try:
            items = r.json().get("items", []) if r.status_code == 200 else None
        except ValueError:
            items = None
        if items is None:
            return None
        values = []
        for item in items:
            props = item.get("properties", item)
            cp, hp = props.get("cloud_percent"), props.get("heavy_haze_percent")
            if cp is not None:
                values.append((float(cp) + float(hp or 0)) / 2)
        return float(np.mean(values)) if values else None

    def _download(self, name: str, quad: dict, part: Path) -> Path:
        """The quad's GeoTIFF into ``part``, resuming a partial one; retried on dropped connections."""
        import requests

        link = quad.get("_links", {}).get("download")
        if not link:
            raise ImageryError(f"{self.cfg.api_url}: quad {quad['id']} of {name} has no download link")
        link = strip_key(link)
        keyed = self._keyed(link)
        part.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(self.cfg.retries + 1):
            have = part.stat().st_size if part.exists() else 0
            try:
                headers = self._headers(link)
                if have:
                    headers["Range"] = f"bytes={have}-"
                r = self._session.get(link, headers=headers, stream=True, timeout=self.cfg.timeout_s)
                with r:
                    if r.status_code in (401, 403) and keyed:
                        raise ImageryError(f"{self.cfg.api_url}: the Planet API refused the key (HTTP "
                                           f"{r.status_code}): set {KEY_ENV} to a key with access to these basemaps")
                    if r.status_code in (401, 403):
                        raise ImageryError(f"{self.cfg.api_url}: quad {quad['id']} of {name}: HTTP {r.status_code} "
                                           f"from {urlparse(link).hostname}, which its download link names (it "
                                           "gets no key: not the API's host)")
                    span = r.headers.get("Content-Range", "")
                    if r.status_code == 416:
                        if have and span.rpartition("/")[2] == str(have):
                            return part  # whole already: a run stopped between its download and its conversion
                        os.truncate(part, 0)  # not a prefix of this file: start again (in the same, locked file)
                        raise requests.ConnectionError("range not satisfiable")
                    if r.status_code not in (200, 206):
                        raise ImageryError(f"{self.cfg.api_url}: quad {quad['id']} of {name}: HTTP {r.status_code}")
                    if r.status_code == 206 and not span.startswith(f"bytes {have}-"):
                        os.truncate(part, 0)  # another range than the one asked for: start again
                        raise requests.ConnectionError("unexpected range")
                    total = span.rpartition("/")[2] if r.status_code == 206 else r.headers.get("Content-Length", "")
                    with open(part, "ab" if r.status_code == 206 else "wb") as f:
                        for chunk in r.iter_content(CHUNK):
                            f.write(chunk)
                if total.isdigit() and part.stat().st_size < int(total):
                    raise requests.ConnectionError("the connection closed before the end")
                return part
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout):
                if attempt == self.cfg.retries:
                    raise ImageryError(f"{self.cfg.api_url}: the download of quad {quad['id']} of {name} kept "
                                       f"failing ({self.cfg.retries + 1} tries); rerun to resume it") from None
                log.info("quad %s of %s: connection lost at %d bytes, resuming", quad["id"], name,
                         part.stat().st_size if part.exists() else 0)
                time.sleep(min(0.5 * 2 ** attempt, 10))
        return part


@contextlib.contextmanager
def _partial(path: Path) -> Iterator[Path]:
    """The partial download ``path``, locked for this process while the block runs (left in place, to be resumed,
    where the block fails). Where another process holds it (fetching the same quad at once), a name of this
    process's own instead, removed after the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield path
        return
    f = open(path, "ab")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # still the file at ``path``: its owner may have finished (and removed it) between our opening and locking
        ours = path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except OSError:
        ours = False
    if ours:
        try:
            yield path
        finally:
            f.close()
        return
    f.close()
    own = path.with_name(f"{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    log.info("%s is being downloaded by another process: this one writes %s", path.name, own.name)
    try:
        yield own
    finally:
        own.unlink(missing_ok=True)


def _pixel_cloud(path: Path, bands: list[str]) -> float:
    """Share of a quad's pixels that look cloudy (bright in every visible band) or have no data."""
    try:
        with rasterio.open(path) as src:
            step = max(1, src.width // 512)
            data = src.read(out_shape=(src.count, src.height // step, src.width // step))
    except rasterio.errors.RasterioError as e:
        path.unlink(missing_ok=True)
        raise ImageryError(f"{path.name}: the downloaded quad is not a readable GeoTIFF ({e}); rerun to fetch it "
                           "again") from None
    n = len(bands)
    valid = data[-1] > 0 if data.shape[0] > n else (data[:n] > 0).any(0)
    visible = [i for i, b in enumerate(bands) if b in ("red", "green", "blue")] or list(range(min(3, n)))
    bright = (data[visible] >= CLOUD_LEVEL).all(0)
    return float((bright | ~valid).mean())


def _write_quad(part: Path, dest: Path, n: int) -> None:
    """A downloaded quad as an ``n``-band uint16 COG, nodata 0 where its alpha (band n + 1) is 0."""
    try:
        with rasterio.open(part) as src:
            data = src.read()
            grid = Grid(src.crs, src.transform, src.width, src.height)
    except rasterio.errors.RasterioError as e:
        part.unlink(missing_ok=True)  # a rerun fetches it whole again
        raise ImageryError(f"{dest.name}: the downloaded quad is not a readable GeoTIFF ({e}); rerun to fetch "
                           "it again") from None
    if data.shape[0] < n:
        raise ImageryError(f"{dest.name}: the quad has {data.shape[0]} bands, {n} expected")
    bands = np.maximum(data[:n].astype(np.uint16), 1)
    valid = data[-1] > 0 if data.shape[0] > n else (data[:n] > 0).any(0)  # the alpha band comes last
    bands[:, ~valid] = 0
    write_cog(dest, bands, grid, nodata=0, blocksize=512)
