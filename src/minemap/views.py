"""Views of a run's rasters: its probability tiles (and, where local, its imagery) read around a place, mosaicked
for a map overlay, and drawn with outlines. Used by the report and by review sheets."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.merge import merge
from rasterio.windows import Window

from minemap._io import read_json
from minemap.errors import MinemapError
from minemap.formats.rasters import LEVELS, NODATA
from minemap.formats.run import RunFolder
from minemap.geo import WGS84
from minemap.imagery import open_imagery
from minemap.lattice import Grid

log = logging.getLogger(__name__)


MAX_OVERLAY_PIXELS = 2048 * 2048  # a larger probability raster is read at a coarser resolution for the overlay


SAMPLE_TILES = 2  # views of places drawn at random from the last year's tiles, beside the largest mines and errors


WINDOW_PX = 160  # side of the side-by-side views, in imagery pixels


def _plt():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """A matplotlib figure as an inline PNG (data URI), closed."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(w: float = 7.0, h: float = 3.2):
    return _plt().subplots(figsize=(w, h))


class Rasters:
    """The run's probability tiles (and, where local, its imagery) read over windows in EPSG:4326 terms."""

    def __init__(self, run_dir: Path) -> None:
        folder = RunFolder(run_dir)
        self.prob_dir = folder.probabilities
        self.imagery = None
        desc = read_json(folder.imagery_record)[0] or {}
        source = desc.get("source", {})
        if source.get("source") == "local" and Path(source.get("path", "")).is_dir():
            try:
                self.imagery = open_imagery(Path(source["path"]), desc.get("bands"))
            except (MinemapError, OSError, RasterioError) as e:  # the imagery moved or changed: views without it
                log.warning("imagery at %s: %s; the report shows probabilities and polygons only", source["path"], e)

    def tiles(self, year: int) -> list[Path]:
        folder = self.prob_dir / str(year)
        return sorted(folder.glob("*.tif")) if folder.is_dir() else []

    def window(self, year: int, centre: shapely.Point, side: int = WINDOW_PX):
        """(rgb or None, probability, grid) around ``centre`` (EPSG:4326), or None where no tile holds it."""
        for path in self.tiles(year):
            with rasterio.open(path) as src:
                x, y = gpd.GeoSeries([centre], crs=WGS84).to_crs(src.crs).iloc[0].coords[0]
                row, col = src.index(x, y)
                if not (0 <= row < src.height and 0 <= col < src.width):
                    continue
                r0, c0 = max(0, row - side // 2), max(0, col - side // 2)
                win = Window(c0, r0, min(side, src.width - c0), min(side, src.height - r0))
                q = src.read(1, window=win)
                grid = Grid(src.crs, src.window_transform(win), int(win.width), int(win.height))
            prob = np.where(q == NODATA, np.nan, q / LEVELS)
            rgb = None
            if self.imagery is not None:
                try:
                    pixels, valid = self.imagery.read(year, grid)
                    rgb = _stretch(pixels, valid)
                except (MinemapError, OSError, RasterioError) as e:  # a year missing, a file gone or damaged
                    log.warning("imagery of %d could not be read for the report: %s", year, e)
            return rgb, prob, grid
        return None

    def sample_places(self, year: int, n: int = SAMPLE_TILES, seed: int = 0) -> list[shapely.Point]:
        """``n`` places (EPSG:4326) drawn at random, reproducibly, from ``year``'s tiles: a tile each where there
        are enough, uniformly within it, wherever the mines are or not."""
        tiles = self.tiles(year)
        rng = np.random.default_rng(seed)
        out = []
        for i in sorted(rng.choice(len(tiles), size=min(n, len(tiles)), replace=False)) if tiles else []:
            with rasterio.open(tiles[i]) as src:
                b = src.bounds
                x, y = rng.uniform(b.left, b.right), rng.uniform(b.bottom, b.top)
                out.append(gpd.GeoSeries([shapely.Point(x, y)], crs=src.crs).to_crs(WGS84).iloc[0])
        return out

    def overlay(self, year: int) -> tuple[np.ndarray, list[list[float]]] | None:
        """The year's probabilities mosaicked (at most :data:`MAX_OVERLAY_PIXELS`) as RGBA, and the bounds in
        EPSG:4326 ([[south, west], [north, east]]), or None without tiles or with tiles in several CRSs."""
        tiles = self.tiles(year)
        if not tiles:
            return None
        srcs = [rasterio.open(p) for p in tiles]
        try:
            if len({s.crs.to_string() for s in srcs}) > 1:
                return None
            w = sum(s.width for s in srcs)
            h = sum(s.height for s in srcs)
            scale = max(1.0, np.sqrt(w * h / MAX_OVERLAY_PIXELS))
            res = (srcs[0].res[0] * scale, srcs[0].res[1] * scale)
            mosaic, transform = merge(srcs, res=res, nodata=NODATA, resampling=Resampling.nearest)
            crs = srcs[0].crs
        finally:
            for s in srcs:
                s.close()
        q = mosaic[0]
        if crs.to_epsg() != 4326:  # Leaflet lays an image between two corners of latitude and longitude
            from rasterio.warp import calculate_default_transform, reproject

            h0, w0 = q.shape
            left, top = transform.c, transform.f
            right, bottom = left + transform.a * w0, top + transform.e * h0
            dst_t, dw, dh = calculate_default_transform(crs, WGS84, w0, h0, left, bottom, right, top)
            out = np.full((dh, dw), NODATA, np.uint8)
            reproject(q, out, src_transform=transform, src_crs=crs, dst_transform=dst_t, dst_crs=WGS84,
                      src_nodata=NODATA, dst_nodata=NODATA, resampling=Resampling.nearest)
            q, transform = out, dst_t
        import matplotlib

        rgba = (matplotlib.colormaps["magma"](q / LEVELS) * 255).astype(np.uint8)
        rgba[..., 3] = np.where(q == NODATA, 0, np.clip(q / LEVELS * 255 * 1.2, 40, 220)).astype(np.uint8)
        west, north = transform.c, transform.f
        east, south = west + transform.a * q.shape[1], north + transform.e * q.shape[0]
        return rgba, [[south, west], [north, east]]


def _stretch(pixels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A natural-colour picture (bands red, green, blue first) stretched between the 2nd and 98th percentiles."""
    rgb = pixels[:3].astype(np.float32).transpose(1, 2, 0)
    vals = rgb[valid] if valid.any() else rgb.reshape(-1, 3)
    lo, hi = np.percentile(vals, 2, axis=0), np.percentile(vals, 98, axis=0)
    out = np.clip((rgb - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    out[~valid] = 1.0
    return out


def _extent(grid) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) of a north-up grid, as matplotlib's ``imshow`` takes it."""
    t = grid.transform
    return t.c, t.c + t.a * grid.width, t.f + t.e * grid.height, t.f


def _draw_outlines(ax, geoms: gpd.GeoSeries, crs, extent, colour: str) -> None:
    """The exteriors of polygons (any CRS) drawn in ``crs``, clipped to ``extent``."""
    box = shapely.box(extent[0], extent[2], extent[1], extent[3])
    for g in geoms.to_crs(crs).intersection(box):
        for part in getattr(g, "geoms", [g]):
            if isinstance(part, shapely.Polygon) and not part.is_empty:
                ax.plot(*part.exterior.xy, color=colour, lw=1.2)


def plot_views(rasters: Rasters, cases: list[tuple[str, int, shapely.Geometry]], panel: gpd.GeoDataFrame,
               reference: gpd.GeoDataFrame | None) -> str | None:
    """A row per case (title, year, geometry): image, calibrated probability, and the outlines (mines in red,
    the reference in cyan) over the image, side by side."""
    rows = []
    for title, year, geom in cases:
        got = rasters.window(year, shapely.point_on_surface(geom))
        if got is not None:
            rows.append((title, year, *got))
    if not rows:
        return None
    fig, axes = _plt().subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for (title, year, rgb, prob, grid), (a_img, a_prob, a_poly) in zip(rows, axes):
        extent = _extent(grid)
        base = rgb if rgb is not None else np.nan_to_num(prob)
        a_img.imshow(base, extent=extent, cmap=None if rgb is not None else "gray")
        a_img.set_title(f"{title}: image {year}" if rgb is not None else f"{title}: no imagery", fontsize=9)
        a_prob.imshow(prob, extent=extent, cmap="magma", vmin=0, vmax=1)
        a_prob.set_title("probability", fontsize=9)
        a_poly.imshow(base, extent=extent, cmap=None if rgb is not None else "gray")
        for gdf, colour in ((panel[panel.year == year], "red"),
                            (reference[reference.year == year] if reference is not None else None, "cyan")):
            if gdf is not None and len(gdf):
                _draw_outlines(a_poly, gdf.geometry, grid.crs, extent, colour)
        a_poly.set_title("mines (red), reference (cyan)", fontsize=9)
        for a in (a_img, a_prob, a_poly):
            a.set_xlim(extent[0], extent[1])
            a.set_ylim(extent[2], extent[3])
            a.set_xticks([])
            a.set_yticks([])
    return _png(fig)


def plot_outline(rasters: Rasters, year: int, geom: shapely.Geometry, side: int = WINDOW_PX) -> bytes | None:
    """A PNG of the image (or, without imagery, the probabilities) around ``geom`` (EPSG:4326) with its outline
    in red, or None where no probability raster of ``year`` holds it."""
    got = rasters.window(year, shapely.point_on_surface(geom), side)
    if got is None:
        return None
    rgb, prob, grid = got
    extent = _extent(grid)
    fig, ax = _figure(3.2, 3.2)
    ax.imshow(rgb if rgb is not None else np.nan_to_num(prob), extent=extent,
              cmap=None if rgb is not None else "magma")
    _draw_outlines(ax, gpd.GeoSeries([geom], crs=WGS84), grid.crs, extent, "red")
    ax.set(xlim=extent[:2], ylim=extent[2:], xticks=[], yticks=[])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()
