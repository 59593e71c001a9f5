"""Synthetic multi-year scenes with known truth, for the demo, the tests and the benchmarks.

A scene is a patch of tropical landscape (forest, fields, a river, roads, a village) in EPSG:3857 at the
Planet/NICFI pixel size (4.777 m at the equator, ~4.75 m on the ground here), 4-band uint16 reflectance
(R, G, B, NIR, x 10,000). Mines are bare soil with turbid ponds; they grow, some appear or vanish, one has an
island of forest (a hole); one year is hazy. Written:

- ``imagery/<year>/quad_<row>_<col>.tif``: the scene of each year cut into quads, like NICFI's layout;
- ``labels_<train_year>.gpkg``: noisy training labels (jittered outlines, one mine missing);
- ``truth.gpkg``: the true mine polygons of every year (column ``year``), EPSG:4326.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import rasterize
from scipy.ndimage import gaussian_filter

from minemap._io import atomic_path
from minemap.geo import WGS84

NICFI_RES_M = 4.777314267823516  # Web Mercator metres per pixel of a zoom-15 Planet basemap quad
BANDS = ("red", "green", "blue", "nir")
# typical surface reflectance x 10,000 (R, G, B, NIR)
FOREST = np.array([350, 600, 380, 3000], np.float32)
FIELD = np.array([750, 850, 550, 2200], np.float32)
SOIL = np.array([2100, 1750, 1250, 2300], np.float32)
POND = np.array([1000, 1150, 900, 600], np.float32)
WATER = np.array([300, 450, 500, 250], np.float32)
ROAD = np.array([1450, 1400, 1350, 1750], np.float32)
ROOF = np.array([2300, 2300, 2350, 2450], np.float32)
HAZE = np.array([2100, 2150, 2250, 2300], np.float32)


@dataclass(frozen=True)
class Scene:
    """Paths of a written synthetic scene."""

    root: Path
    imagery: Path
    labels: Path
    truth: Path
    years: tuple[int, ...]
    train_year: int


@dataclass(frozen=True)
class _Mine:
    cx: float
    cy: float
    radius: float
    harmonics: np.ndarray  # (k, 2) amplitude and phase of shape harmonics
    first: int
    last: int
    growth: float  # radius factor per year
    hole: bool


def _mine_polygon(m: _Mine, year: int, year0: int) -> shapely.Polygon:
    r = m.radius * m.growth ** (year - year0)
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    k = np.arange(1, len(m.harmonics) + 1)[:, None]
    rr = r * (1 + (m.harmonics[:, :1] * np.cos(k * t + m.harmonics[:, 1:])).sum(0))
    shell = np.column_stack([m.cx + rr * np.cos(t), m.cy + rr * np.sin(t)])
    holes = []
    if m.hole:
        ht = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        holes = [np.column_stack([m.cx + 0.3 * r * np.cos(ht), m.cy + 0.3 * r * np.sin(ht)])]
    return shapely.make_valid(shapely.Polygon(shell, holes))


def _plan_mines(rng: np.random.Generator, size: int, years: list[int], n: int) -> list[_Mine]:
    mines: list[_Mine] = []
    y0, y1 = years[0], years[-1]
    tries = 0
    while len(mines) < n and tries < 5000:
        tries += 1
        radius = rng.uniform(0.018, 0.05) * size
        cx, cy = rng.uniform(radius * 1.6, size - radius * 1.6, 2)
        if any(np.hypot(cx - o.cx, cy - o.cy) < 1.5 * (radius + o.radius) + 10 for o in mines):
            continue
        kind = len(mines) % 5
        first, last = y0, y1
        if kind == 3 and len(years) >= 3:
            first = years[1]  # appears after the first year
        elif kind == 4 and len(years) >= 3:
            last = years[-2]  # vanishes before the last year (abandoned and revegetated)
        harmonics = np.column_stack([rng.uniform(0, 0.18, 3), rng.uniform(0, 2 * np.pi, 3)])
        mines.append(_Mine(cx, cy, radius, harmonics, first, last, rng.uniform(1.0, 1.25), hole=len(mines) == 1))
    return mines


def _smooth(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    f = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return f / (f.std() + 1e-9)


def _landscape(rng: np.random.Generator, size: int) -> np.ndarray:
    """Static background (4, size, size) float32: forest, fields, a river, roads, a village."""
    img = FOREST[:, None, None] * (1 + 0.12 * _smooth(rng, size, 12))[None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(6):  # fields: rectangles of cleared land
        x0, y0 = rng.uniform(0, size * 0.9, 2)
        w, h = rng.uniform(0.04, 0.12, 2) * size
        m = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
        img[:, m] = FIELD[:, None] * rng.uniform(0.9, 1.1)
    # a meandering river
    path = size * (0.5 + 0.25 * np.sin(xx / size * 2 * np.pi * rng.uniform(0.6, 1.2) + rng.uniform(0, 6)))
    river = np.abs(yy - path) < 4 + 2 * _smooth(rng, size, 30)
    img[:, river] = WATER[:, None]
    for _ in range(3):  # straight roads, 2-3 px wide
        a, b = rng.uniform(0, size, 2)
        d = np.abs((yy - a) - (b - a) / size * xx) / np.hypot(1, (b - a) / size)
        img[:, d < rng.uniform(1.0, 1.6)] = ROAD[:, None]
    vx, vy = rng.uniform(0.15, 0.85, 2) * size  # a village: small roofs
    for _ in range(40):
        x0, y0 = vx + rng.normal(0, 18), vy + rng.normal(0, 18)
        s = rng.uniform(2, 5)
        m = (np.abs(xx - x0) < s) & (np.abs(yy - y0) < s)
        img[:, m] = ROOF[:, None] * rng.uniform(0.85, 1.1)
    return img


def _draw_mines(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    img = img.copy()
    size = img.shape[-1]
    soil = SOIL[:, None, None] * (1 + 0.10 * _smooth(rng, size, 3))[None]
    ponds = (_smooth(rng, size, 5) > 1.3) & mask
    img[:, mask] = soil[:, mask]
    img[:, ponds] = POND[:, None]
    return img


def make_scene(
    root: Path | str,
    years: tuple[int, ...] | list[int] = (2019, 2020, 2021),
    train_year: int | None = None,
    size: int = 1024,
    quads: int = 2,
    n_mines: int = 16,
    hazy_year: int | None = -1,
    lon: float = -1.95,
    lat: float = 6.25,
    seed: int = 0,
) -> Scene:
    """Write a synthetic scene under ``root`` and return its paths.

    ``size`` pixels square, cut into ``quads`` x ``quads`` GeoTIFFs per year; centred on (lon, lat), by default
    in Ghana's gold-mining belt. ``hazy_year=-1`` makes the last year hazy; ``None`` makes none hazy.
    """
    root = Path(root)
    years = sorted(int(y) for y in years)
    train_year = years[0] if train_year is None else train_year
    hazy = years[-1] if hazy_year == -1 else hazy_year
    rng = np.random.default_rng(seed)
    from pyproj import Transformer

    to_merc = Transformer.from_crs(WGS84, "EPSG:3857", always_xy=True)
    cx, cy = to_merc.transform(lon, lat)
    half = size * NICFI_RES_M / 2
    transform = Affine(NICFI_RES_M, 0, cx - half, 0, -NICFI_RES_M, cy + half)
    base = _landscape(rng, size)
    mines = _plan_mines(rng, size, years, n_mines)
    to_ll = Transformer.from_crs("EPSG:3857", WGS84, always_xy=True)

    def pixel_to_ll(geoms: np.ndarray) -> np.ndarray:
        def f(xy: np.ndarray) -> np.ndarray:
            x, y = transform @ (xy[:, 0], xy[:, 1])
            return np.column_stack(to_ll.transform(x, y))

        return shapely.transform(geoms, f)

    truth_rows = []
    for year in years:
        present = [m for m in mines if m.first <= year <= m.last]
        px = np.array([_mine_polygon(m, year, years[0]) for m in present], dtype=object)
        merc = shapely.transform(px, lambda xy: np.column_stack(transform @ (xy[:, 0], xy[:, 1])))
        mask = rasterize([(g, 1) for g in merc], out_shape=(size, size), transform=transform, dtype=np.uint8) > 0
        img = _draw_mines(rng, base, mask)
        img *= (1 + 0.05 * rng.uniform(-1, 1, 4).astype(np.float32))[:, None, None]  # sensor/season drift
        img[3] *= 1 + 0.04 * _smooth(rng, size, 40)  # phenology
        if year == hazy:
            alpha = np.clip(0.22 + 0.08 * _smooth(rng, size, 60), 0.05, 0.4)
            img = (1 - alpha) * img + alpha * HAZE[:, None, None]
        img *= 1 + 0.03 * rng.standard_normal(img.shape).astype(np.float32)
        data = np.clip(img, 1, 10000).astype(np.uint16)
        _write_quads(root / "imagery" / str(year), data, transform, quads)
        for m, g in zip(present, pixel_to_ll(px)):
            truth_rows.append({"year": year, "mine": mines.index(m), "geometry": g})
        if year == train_year:
            _write_noisy_labels(rng, root / f"labels_{train_year}.gpkg", px[1:], pixel_to_ll)
    truth = gpd.GeoDataFrame(truth_rows, geometry="geometry", crs=WGS84)
    with atomic_path(root / "truth.gpkg") as tmp:
        truth.to_file(tmp, driver="GPKG", layer="truth")
    return Scene(root, root / "imagery", root / f"labels_{train_year}.gpkg", root / "truth.gpkg",
                 tuple(years), train_year)


def _write_noisy_labels(rng: np.random.Generator, dest: Path, px: np.ndarray, to_ll) -> None:
    """Labels as a digitiser draws them: outlines off by a few pixels, simplified, slightly shifted.

    The first mine is left out by the caller (a mine the literature missed)."""
    noisy = shapely.buffer(px, rng.uniform(-1.5, 2.0, len(px)))
    noisy = shapely.simplify(noisy, 1.5)
    shifts = rng.uniform(-1.5, 1.5, (len(px), 2))
    noisy = np.array([shapely.affinity.translate(g, *s) for g, s in zip(noisy, shifts)], dtype=object)
    gdf = gpd.GeoDataFrame({"id": np.arange(len(px))}, geometry=to_ll(noisy), crs=WGS84)
    with atomic_path(dest) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="labels")


def _write_quads(folder: Path, data: np.ndarray, transform: Affine, quads: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    size = data.shape[-1]
    step = int(np.ceil(size / quads))
    for r in range(quads):
        for c in range(quads):
            block = data[:, r * step:(r + 1) * step, c * step:(c + 1) * step]
            if block.size == 0:
                continue
            t = transform @ Affine.translation(c * step, r * step)
            profile = dict(driver="GTiff", width=block.shape[2], height=block.shape[1], count=block.shape[0],
                           dtype="uint16", crs="EPSG:3857", transform=t, nodata=0, tiled=True,
                           blockxsize=256, blockysize=256, compress="deflate")
            with atomic_path(folder / f"quad_{r}_{c}.tif") as tmp:
                with rasterio.open(tmp, "w", **profile) as dst:
                    dst.write(block)
                    dst.descriptions = BANDS[: block.shape[0]]
