"""Sentinel-2 L2A (or another STAC collection with a scene classification band) as yearly cloud-masked median
composites, found through a STAC API (pystac-client) and read with odc-stac.

For a year and a cache tile, the collection's items over the tile whose date falls in ``months`` are loaded onto
the tile's grid (reflectance bilinear, the classification nearest); pixels whose scene class is in
``mask_classes`` are dropped; reflectance is harmonised across the processing-baseline change of January 2022
(baseline 04.00 and later add 1,000 to L2A digital numbers, unless the item says the catalogue removed it); and
the median of the clear observations is taken per band, with the count of clear observations as a last band.
Pixels with no clear observation are nodata (0), never a reflectance of zero.

Cache tiles lie on a fixed lattice of the source's CRS (``tile_px`` pixels of ``resolution_m``, from the CRS
origin), so areas that overlap share them. A composite is a COG at ``cache_dir/<key>/<year>/<tile>.tif`` with a
JSON record beside it (the items used, clear share); ``key`` hashes everything its pixels depend on (API,
collection, assets, masked classes, months, resolution, CRS, ...). A cached composite is never fetched again,
and it is written under a temporary name and renamed when complete, so an interrupted download leaves nothing
that is used.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import warnings
from functools import cached_property
from pathlib import Path
from typing import Literal

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
from minemap.imagery.remote import cache_root, check_months, month_spec, public_url, retry_policy
from minemap.lattice import Grid, Lattice, area_grid
from minemap.imagery.local import file_info, read_files
from minemap.formats.rasters import write_cog


def clear_median(stack: np.ndarray) -> np.ndarray:
    """The median over axis 1 of ``stack`` (bands, time, h, w) of the values that are not NaN (NaN where none),
    as ``np.nanmedian`` gives, from one sort: ``np.nanmedian`` over a short axis takes a masked-array path that
    warns once per all-NaN pixel, which made it most of a composite's time."""
    ordered = np.sort(stack, axis=1)  # NaN last
    n = (~np.isnan(ordered[:1])).sum(axis=1, keepdims=True)  # clear observations, the same in every band
    lo = np.broadcast_to(np.maximum((n - 1) // 2, 0), (stack.shape[0], 1, *stack.shape[2:]))
    hi = np.broadcast_to(np.maximum(n // 2, 0), lo.shape)
    med = (np.take_along_axis(ordered, lo, axis=1) + np.take_along_axis(ordered, hi, axis=1))[:, 0] / 2
    med[np.broadcast_to(n[:, 0] == 0, med.shape)] = np.nan
    return med


class StacImageryConfig(Section):
    """Yearly cloud-masked median composites of a STAC collection with a scene classification band (Sentinel-2
    L2A by default), cached on disk; see :mod:`minemap.imagery.stac`."""

    source: Literal["stac"] = "stac"
    url: str = Field(description="root of the STAC API, e.g. https://earth-search.aws.element84.com/v1")
    collection: str = "sentinel-2-l2a"
    bbox: tuple[float, float, float, float] = Field(description="the area: west, south, east, north (EPSG:4326)")
    assets: dict[str, str] = Field({"red": "red", "green": "green", "blue": "blue", "nir": "nir"},
                                   description="band name -> the collection's asset key, in band order (catalogues "
                                               "name assets differently, e.g. B04 for red)")
    scl_asset: str = Field("scl", description="asset of the scene classification (SCL)")
    mask_classes: list[int] = Field([0, 1, 3, 8, 9, 10], description="SCL classes left out of the composite: no "
                                                                     "data, saturated, cloud shadow, cloud medium "
                                                                     "and high probability, thin cirrus")
    months: list[int] = Field(list(range(1, 13)), description="months whose scenes enter a year's composite, e.g. "
                                                              "[6, 7, 8, 9, 10, 11] or '6-11'")
    max_cloud_cover: float | None = Field(None, ge=0, le=100, description="skip scenes cloudier than this (%)")
    resolution_m: float = Field(10.0, gt=0)
    crs: str | None = Field(None, description="a projected CRS; default the UTM zone of the area's centre")
    harmonise: bool = Field(True, description="undo the +1000 offset of processing baseline 04.00 and later, "
                                              "unless the item says it is removed, so years compare")
    tile_px: int = Field(512, ge=64, description="side of a cached composite tile in pixels")
    cache_dir: Path | None = Field(None, description="default: $MINEMAP_CACHE or ~/.cache/minemap")
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(5, ge=0, description="retries with backoff on 429 (honouring Retry-After), 5xx and "
                                              "time-outs")

    _months = field_validator("months", mode="before")(classmethod(lambda cls, v: month_spec(v)))
    _month_range = field_validator("months")(classmethod(lambda cls, v: check_months(v)))

    _area = field_validator("bbox")(classmethod(lambda cls, v: check_bbox(v)))


log = logging.getLogger(__name__)
FIRST_YEAR = 2015  # Sentinel-2A's launch


def boa_offset(properties: dict) -> int:
    """What to add to an item's L2A digital numbers to bring them to the scale before baseline 04.00: -1000 for
    baseline 04.00 and later, unless the item says the offset is already removed; else 0."""
    applied = properties.get("earthsearch:boa_offset_applied", properties.get("sentinel:boa_offset_applied"))
    if applied:
        return 0
    try:
        baseline = float(properties.get("s2:processing_baseline", "0"))
    except (TypeError, ValueError):
        baseline = 0.0
    return -1000 if baseline >= 4.0 else 0


def _public_text(text: str) -> str:
    """``text`` (a library's error message) with every URL in it made :func:`public_url`."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+", lambda m: public_url(m.group(0)), text)


class _FailedReads(logging.Filter):
    """Catches the address odc-stac logs when it fails to read an asset (the error it raises names none), and
    keeps that record out of the logs: the address may carry a token; the error minemap raises names the
    scene, the asset and the address without its query."""

    def __init__(self) -> None:
        super().__init__()
        self.uris: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Failed to load") and record.args:
            self.uris.append(str(record.args[0]))
            return False
        return True


def utm_crs(lon: float, lat: float) -> CRS:
    zone = int((lon + 180) // 6) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


class StacImagery:
    """Yearly composites of a STAC collection over ``cfg.bbox``; see the module docstring."""

    masks_clouds = True  # scenes' pixels of the masked scene classes (clouds, cirrus, shadows) never enter

    def __init__(self, cfg: StacImageryConfig, bands: list[str] | None = None) -> None:
        self.cfg = cfg
        if bands:
            unknown = [b for b in bands if b not in cfg.assets]
            if unknown:
                raise ImageryError(f"{public_url(cfg.url)}: bands {unknown} are not among the source's ({', '.join(cfg.assets)}); "
                                   "name them in imagery.assets")
        self.band_names = list(bands) if bands else list(cfg.assets)
        w, s, e, n = cfg.bbox
        self.crs = CRS.from_user_input(cfg.crs) if cfg.crs else utm_crs((w + e) / 2, (s + n) / 2)
        if self.crs.is_geographic:
            raise ImageryError(f"imagery.crs {cfg.crs}: composites need a projected CRS (metres), e.g. a UTM zone")
        self.res = cfg.resolution_m / self.crs.axis_info[0].unit_conversion_factor
        self.key = stable_hash([cfg.url.rstrip("/"), cfg.collection, [cfg.assets[b] for b in self.band_names],
                                cfg.scl_asset, sorted(cfg.mask_classes), cfg.months, cfg.max_cloud_cover, self.res,
                                self.crs.to_wkt(), cfg.harmonise, cfg.tile_px])
        self.root = cache_root(cfg.cache_dir) / f"stac-{self.key}"
        self._items: dict[tuple, list] = {}
        self.fetched: list[dict] = []  # the composites built by this process (for reports)

    # -- the protocol ----------------------------------------------------------------------------------------
    def years(self) -> list[int]:
        return list(range(FIRST_YEAR, dt.date.today().year + 1))

    @cached_property
    def _grid(self) -> Grid:
        return area_grid(self.cfg.bbox, self.crs, self.res)

    def grid(self, year: int) -> Grid:
        return self._grid

    def fingerprint(self, year: int) -> str:
        return stable_hash([self.key, self._year_dir(year)])

    def _year_dir(self, year: int) -> str:
        """A year's cache folder: the year once its months are over; before that, a composite as of today,
        rebuilt the next day (scenes keep arriving)."""
        today = dt.date.today()
        over = year < today.year or (year == today.year and max(self.cfg.months) < today.month)
        return str(year) if over else f"{year}-asof-{today.isoformat()}"

    def check_bands(self, year: int) -> None:
        """Raise unless the year has scenes over the area and they carry every asset named (nothing to check, and
        no request, where the year's composites of the whole area are cached)."""
        if all(self.tile_path(year, t).is_file() for t in self.tiles_over(self._grid)):
            return
        items = self._search(year)
        if not items:
            raise ImageryError(f"{public_url(self.cfg.url)}: no {self.cfg.collection} scenes for {year} over bbox "
                               f"{list(self.cfg.bbox)} in months {self._months_text()} (is the collection right?)")
        wanted = [self.cfg.assets[b] for b in self.band_names] + [self.cfg.scl_asset]
        missing = [a for a in wanted if a not in items[0].assets]
        if missing:
            raise ImageryError(f"{public_url(self.cfg.url)}: {self.cfg.collection} items have no asset {missing[0]!r} (they "
                               f"have {', '.join(sorted(items[0].assets))}); set imagery.assets / imagery.scl_asset")

    def read(self, year: int, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        inside = set(self.tiles_over(self._grid))  # the area's tiles only: never download past its bbox
        paths = [self.composite(year, t) for t in self.tiles_over(grid) if t in inside]
        if not paths:
            return (np.zeros((len(self.band_names), grid.height, grid.width), np.float32),
                    np.zeros((grid.height, grid.width), bool))
        return read_files([file_info(p) for p in paths], grid, len(self.band_names),
                          rasterio.enums.Resampling.bilinear)

    def fetch(self, years: list[int], progress: bool = True) -> list[dict]:
        """Fill the cache for ``years`` over the whole area ahead of a run: one record per tile and year (scenes,
        clear share, bytes, and whether it was already cached)."""
        from tqdm.auto import tqdm

        for year in years:
            self.check_bands(year)
        tiles = self.tiles_over(self._grid)
        records = []
        for year, tile in tqdm([(y, t) for y in years for t in tiles], desc="composites", unit="tile",
                               disable=not progress):
            path = self.tile_path(year, tile)
            cached = path.is_file()
            self.composite(year, tile)
            records.append({**read_record(path), "bytes": path.stat().st_size, "cached": cached})
        return records

    # -- composites ------------------------------------------------------------------------------------------
    @property
    def lattice(self) -> Lattice:
        """The cache tiles: cells of ``tile_px`` pixels from the CRS origin."""
        return Lattice(self.cfg.tile_px * self.res)

    def tiles_over(self, grid: Grid) -> list[tuple[int, int]]:
        """Lattice tiles (column, row indices from the CRS origin) that ``grid`` touches."""
        bounds = grid.bounds if grid.crs == self.crs else \
            transform_bounds(grid.crs, self.crs, *grid.bounds, densify_pts=21)
        return self.lattice.cells_over(bounds)

    def tile_grid(self, tile: tuple[int, int]) -> Grid:
        return self.lattice.cell_grid(*tile, self.res, self.crs)

    def tile_path(self, year: int, tile: tuple[int, int]) -> Path:
        c, r = tile
        return self.root / self._year_dir(year) / f"{Lattice.cell_id(c, r)}.tif"

    def composite(self, year: int, tile: tuple[int, int]) -> Path:
        """The cached composite of ``tile`` and ``year``, built (and cached) first if need be."""
        path = self.tile_path(year, tile)
        if path.is_file():
            return path
        grid = self.tile_grid(tile)
        # the scenes over the whole tile, not only over this area: areas that overlap share cached tiles
        bounds = transform_bounds(self.crs, "EPSG:4326", *grid.bounds, densify_pts=21)
        box = shapely.box(*bounds)
        items = [it for it in self._search(year, bounds)
                 if shapely.intersects(shapely.geometry.shape(it.geometry), box)]
        data, count = self._median(items, grid)
        inside = count[self._area_window(grid)]  # the tile's part within the area
        record = {"year": year, "tile": path.stem, "scenes": len(items), "items": [it.id for it in items],
                  "clear_share": round(float((inside > 0).mean()), 4) if inside.size else 0.0,
                  "median_clear_observations": float(np.median(inside[inside > 0])) if (inside > 0).any() else 0.0}
        write_json(path.with_suffix(".json"), record)
        write_cog(path, np.concatenate([data, np.minimum(count, 65535).astype(np.uint16)[None]]), grid, nodata=0,
                  descriptions=(*self.band_names, "clear_observations"))
        record["bytes"] = path.stat().st_size
        self.fetched.append(record)
        log.info("composite %d %s: %d scenes, %.0f %% clear", year, path.stem, len(items),
                 100 * record["clear_share"])
        return path

    def _area_window(self, grid: Grid) -> tuple[slice, slice]:
        """Rows and columns of ``grid`` (a tile, on the same lattice) inside the area's grid."""
        area = self._grid
        c0 = int(round((area.transform.c - grid.transform.c) / self.res))
        r0 = int(round((grid.transform.f - area.transform.f) / self.res))
        return (slice(max(r0, 0), max(min(r0 + area.height, grid.height), 0)),
                slice(max(c0, 0), max(min(c0 + area.width, grid.width), 0)))

    def _median(self, items: list, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        """Per-band median of the clear observations (uint16, 0 where none) and their count (h, w)."""
        import odc.stac
        from odc.geo.geobox import GeoBox

        bands = [self.cfg.assets[b] for b in self.band_names]
        h, w = grid.height, grid.width
        stacks, clear_any = [], np.zeros((h, w), np.int32)
        groups: dict[int, list] = {}
        for it in items:
            groups.setdefault(boa_offset(it.properties) if self.cfg.harmonise else 0, []).append(it)
        geobox = GeoBox((h, w), grid.transform, grid.crs)
        odc.stac.configure_rio(cloud_defaults=True, GDAL_HTTP_MAX_RETRY=str(self.cfg.retries),
                               GDAL_HTTP_RETRY_DELAY="1", GDAL_HTTP_TIMEOUT=str(int(self.cfg.timeout_s)))
        odc_log = logging.getLogger("odc.loader._rio")
        for offset, group in sorted(groups.items()):
            failed = _FailedReads()
            odc_log.addFilter(failed)
            try:
                ds = odc.stac.load(
                    group, bands=[*bands, self.cfg.scl_asset], geobox=geobox, groupby="solar_day", chunks=None,
                    resampling={**{b: "bilinear" for b in bands}, self.cfg.scl_asset: "nearest"},
                    dtype={**{b: "uint16" for b in bands}, self.cfg.scl_asset: "uint8"}, nodata=0,
                    use_overviews=False)
            except Exception as e:  # rasterio, GDAL or HTTP errors from deep inside odc-stac
                raise self._read_error(e, group, [*bands, self.cfg.scl_asset], failed.uris) from None
            finally:
                odc_log.removeFilter(failed)
            scl = ds[self.cfg.scl_asset].values
            refl = np.stack([ds[b].values for b in bands])  # (bands, time, h, w)
            clear = (scl != 0) & ~np.isin(scl, self.cfg.mask_classes) & (refl > 0).all(0)
            vals = np.maximum(refl.astype(np.float32) + offset, 1.0)
            vals[:, ~clear] = np.nan
            stacks.append(vals)
            clear_any += clear.sum(0)
        if not stacks:
            return np.zeros((len(bands), h, w), np.uint16), clear_any
        med = clear_median(np.concatenate(stacks, axis=1))
        out = np.where(clear_any[None] > 0, np.rint(np.nan_to_num(med, nan=0.0)), 0)
        return np.clip(out, 0, 65535).astype(np.uint16), clear_any

    def _read_error(self, e: Exception, items: list, keys: list[str], uris: list[str]) -> ImageryError:
        """One line naming the scene (item id), the asset key and the address (without its query: it may hold a
        token) of an asset that could not be read, e.g. one the server answers 404 for; where odc-stac did not
        say which, the scenes' error alone."""
        detail = _public_text(str(e).splitlines()[0][:200]) if str(e) else ""
        said = [*uris, *re.findall(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+", str(e))]
        for uri in said:
            for it in items:
                for key in keys:
                    asset = it.assets.get(key)
                    if asset is not None and public_url(asset.href) == public_url(uri):
                        return ImageryError(f"{public_url(self.cfg.url)}: {self.cfg.collection} scene {it.id}, asset {key!r}: "
                                            f"cannot read {public_url(asset.href)} ({type(e).__name__}: {detail})")
        return ImageryError(f"{public_url(self.cfg.url)}: cannot read {self.cfg.collection} scenes "
                            f"{', '.join(it.id for it in items)} ({type(e).__name__}: {detail})")

    def _client(self):
        import pystac_client
        from pystac_client.stac_api_io import StacApiIO

        io = StacApiIO(max_retries=retry_policy(self.cfg.retries), timeout=self.cfg.timeout_s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # catalogues that omit optional links or conformance classes
            return pystac_client.Client.open(self.cfg.url, stac_io=io, timeout=self.cfg.timeout_s)

    def _search(self, year: int, bbox: tuple[float, ...] | None = None) -> list:
        """The items of ``year`` over ``bbox`` (default the area; one search, paged), in the chosen months."""
        bbox = tuple(self.cfg.bbox if bbox is None else bbox)
        if (year, bbox) in self._items:
            return self._items[(year, bbox)]
        import requests
        from pystac_client.exceptions import APIError

        query = {"eo:cloud_cover": {"lt": self.cfg.max_cloud_cover}} if self.cfg.max_cloud_cover is not None else None
        try:
            search = self._client().search(collections=[self.cfg.collection], bbox=list(bbox),
                                           datetime=f"{year}-01-01/{year}-12-31", query=query)
            items = [it for it in search.items() if it.datetime is None or it.datetime.month in self.cfg.months]
        except APIError as e:
            cause = e.__cause__ or e.__context__
            if isinstance(cause, requests.RequestException) or "Max retries exceeded" in str(e):
                raise ImageryError(f"{public_url(self.cfg.url)}: no answer from the STAC API (connection failed or timed "
                                   f"out after {self.cfg.retries} retries)") from None
            status = getattr(e, "status_code", None)
            detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise ImageryError(f"{public_url(self.cfg.url)}: the STAC API refused the search"
                               f"{f' (HTTP {status})' if status else ''}: {detail}") from None
        except requests.RequestException as e:
            raise ImageryError(f"{public_url(self.cfg.url)}: no answer from the STAC API ({type(e).__name__})") from None
        except (ValueError, KeyError, TypeError) as e:  # not JSON, or not STAC
            raise ImageryError(f"{public_url(self.cfg.url)}: not a STAC API answer ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
        items.sort(key=lambda it: (it.datetime or dt.datetime.min.replace(tzinfo=dt.timezone.utc), it.id))
        self._items[(year, bbox)] = items
        return items

    def _months_text(self) -> str:
        m = self.cfg.months
        return "all" if len(m) == 12 else ",".join(map(str, m))


def read_record(path: Path) -> dict:
    return json.loads(Path(path).with_suffix(".json").read_text())
