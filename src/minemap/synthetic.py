"""Synthetic multi-year scenes with known truth, for the demo, the tests and the benchmarks.

A scene is a patch of tropical landscape (forest, fields, a river, roads, a village) in EPSG:3857 at the
Planet/NICFI pixel size (4.777 m at the equator, ~4.75 m on the ground here), 4-band uint16 reflectance
(R, G, B, NIR, x 10,000). Mines are bare soil with turbid ponds; they grow, some appear or vanish, one has an
island of forest (a hole); one year is hazy. Written:

- ``imagery/<year>/quad_<row>_<col>.tif``: the scene of each year cut into quads, like NICFI's layout;
- ``labels_<train_year>.gpkg``: noisy training labels (jittered outlines, by default one mine missing);
- ``truth.gpkg``: the true mine polygons of every year (column ``year``), EPSG:4326;
- ``labelled_area.gpkg``: one polygon, EPSG:4326, the part of the scene where labels were drawn (the scene's
  footprint, or its western half), so that an evaluation can score labelled and never-labelled ground apart.
- ``clouds_<year>.tif`` (a scene with a cloudy year): what hides the ground that year, on the imagery's grid:
  1 where a cloud's opacity exceeds :data:`CLOUD_TRUTH`, 2 where its shadow dims the ground by more than
  :data:`SHADOW_TRUTH`, 0 elsewhere; so that a cloud mask can be scored (``benchmarks/diagnose_run.py``).

Options of :func:`make_scene` make harder scenes for the benchmarks; each is off by default, and the default
scene is the same, file for file, whatever options exist (each option draws from its own random generator,
``np.random.default_rng([seed, stream])``):

- ``crs``: write the imagery in another CRS (UTM, EPSG:4326, ...), warped from EPSG:3857 at the same ground
  pixel size, with nodata (0) outside the warped footprint;
- ``gsd_m``: the ground pixel size: 4.77 (NICFI's Web Mercator pixel, the default) or any other, e.g. 10
  (Sentinel-2); mines and landscape keep their size in metres, so at 10 m a mine covers fewer pixels;
- ``nodata_edges``: ragged strips of nodata along the outer borders of the quads, like real scene footprints;
- ``confusers``: bare ground that is not a mine: tilled fields, sand bars along the river, laterite roads;
- ``mine_soil``: the colour of mine soil: ``"laterite"`` (red, the default), ``"grey"`` tailings, ``"white"``
  kaolin/sand, or ``"mixed"`` (each mine one of these); ``pond_colours``: each mine's ponds their own turbid
  colour (brown-orange, green, grey-blue), not one;
- ``dredging``: a share of the mines (``True``: a third) become river dredging sites: strings of ponds and
  sand/gravel spoil heaps along the river channel, growing along it year by year, in the truth as mines;
- ``seasonal``: land that changes and is no mine: fields green one year and ploughed or dry the next, forest
  whose NIR and colour vary with the season, patches of newly cleared land appearing in later years;
- ``cloudy_year``: scattered cumulus clouds and their shadows in one year (valid pixels, not nodata);
- ``missing_labels``, ``missing_share``, ``label_offset_m``: how many mines the labels miss (the first ones, and
  a random share), and a systematic shift of each label; ``label_extent="west"``: labels only in the western
  half of the scene (``labelled_area.gpkg`` says so), to measure mapping where no one drew a mine.

A family of scenes, for a benchmark that cannot be tuned to a few fixed scenes: :func:`draw_scene_spec` draws,
from a seed alone, the keyword arguments of :func:`make_scene` (all but ``years`` and ``size``):

- place: one of :data:`REGIONS` (Ghana, Peru's Madre de Dios, Indonesia's Kalimantan, DR Congo's Ituri/Kivu,
  Brazil's Tapajós in Pará), equally likely, lon/lat uniform in its box;
- ground pixel: 4.77 m (60 %; EPSG:3857, or EPSG:4326 one time in six) or 10 m (40 %; the region's UTM zone,
  or EPSG:4326 one time in six); 1, 2 or 3 quads a side, equally likely;
- mines: 8-40 (uniform); soil laterite, grey, white or mixed (equally likely); ponds of varying colour 3 in 4;
  pits only (40 %), pits and dredging sites (40 %, a share of 0.2-0.5 dredging) or dredging only (20 %);
- imagery: a hazy year (none 50 %, the last 30 %, the second last 20 %); a cloudy year (none 60 %, the last or
  the second last 20 % each); seasonal vegetation 60 %; confusers 60 %; nodata edges 40 %;
- labels: a share of missed mines uniform in 0-0.2 (``missing_labels`` 0); labels only in the west 1 in 4;
  outlines offset by 0-10 m (uniform).

Same seed, same spec, same scene: the dict records the seed (``seed``), which is also the scene's seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.warp import Resampling, calculate_default_transform, reproject
from scipy.ndimage import binary_dilation, gaussian_filter, gaussian_filter1d, zoom

from minemap._io import atomic_path
from minemap.geo import WGS84

NICFI_RES_M = 4.777314267823516  # Web Mercator metres per pixel of a zoom-15 Planet basemap quad
NICFI_GSD_M = 4.77  # the ``gsd_m`` that means NICFI's pixel: NICFI_RES_M in EPSG:3857 (~4.75 m on the ground)
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
CLOUD_TRUTH = 0.15  # clouds_<year>.tif: a cloud where its opacity exceeds this, ...
SHADOW_TRUTH = 0.05  # ... a shadow where it dims the ground by more than this
SAND = np.array([1900, 1700, 1300, 2100], np.float32)
LATERITE = np.array([1700, 1450, 1100, 2000], np.float32)
CLOUD = np.array([6000, 6000, 6200, 6500], np.float32)
# mine soils: red laterite (SOIL), grey tailings, white kaolin or quartz sand
GREY_TAILINGS = np.array([1800, 1800, 1750, 1950], np.float32)
WHITE_KAOLIN = np.array([3200, 3100, 2800, 3300], np.float32)
MINE_SOILS = {"laterite": SOIL, "grey": GREY_TAILINGS, "white": WHITE_KAOLIN}
# ponds of mines: the default's grey-green, brownish-orange turbid water, an orange clay slurry, a green pond
TURBID = np.array([1500, 1250, 850, 950], np.float32)
SLURRY = np.array([1900, 1450, 950, 1350], np.float32)
GREEN_POND = np.array([450, 800, 520, 600], np.float32)
POND_TONES = (POND, TURBID, SLURRY, GREEN_POND)
SPOIL = np.array([2050, 1900, 1550, 2300], np.float32)  # dredging spoil: washed sand and gravel
# seasonal land: green crop, ploughed soil, dry stubble, freshly cleared land
CROP = np.array([500, 850, 450, 3500], np.float32)
PLOUGHED = np.array([1500, 1250, 950, 1900], np.float32)
STUBBLE = np.array([1350, 1250, 900, 2300], np.float32)
CLEARED = np.array([1650, 1350, 1000, 1800], np.float32)
# the options' own random streams, np.random.default_rng([seed, stream]): turning an option on never changes
# the draws of the default scene, nor those of another option
_CONFUSERS, _CLOUDS, _EDGES, _LABELS, _SOILS, _DREDGING, _SEASONAL, _MISSING, _SPEC, _PONDS = range(1, 11)
# mining regions of the family: (lon min, lon max, lat min, lat max)
REGIONS = {
    "ghana": (-2.6, -1.4, 5.3, 6.9),  # Ashanti / Western: galamsey on the Pra, Ankobra, Offin
    "madre_de_dios": (-70.6, -69.4, -13.3, -12.4),  # Peru: alluvial gold along the Madre de Dios and Inambari
    "kalimantan": (111.5, 116.0, -2.5, 1.0),  # Indonesia: gold and zircon sand mining
    "dr_congo": (27.0, 30.0, -3.5, 2.5),  # Ituri, South Kivu: artisanal gold
    "para": (-57.5, -55.0, -7.5, -4.5),  # Brazil: Tapajós garimpos
}
MINE_SOIL_CHOICES = ("laterite", "grey", "white", "mixed")
LABEL_EXTENTS = ("all", "west")


@dataclass(frozen=True)
class Scene:
    """Paths of a written synthetic scene."""

    root: Path
    imagery: Path
    labels: Path
    truth: Path
    years: tuple[int, ...]
    train_year: int
    labelled_area: Path | None = None  # where labels were drawn (EPSG:4326, one polygon)


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
    # a dredging site: the blobs (each a _Mine, with its own first year) whose union is the site, and which are
    # ponds (the others are spoil heaps)
    blobs: tuple = ()
    ponds: tuple = ()


def _mine_polygon(m: _Mine, year: int, year0: int) -> shapely.Polygon:
    if m.blobs:
        parts = [_mine_polygon(b, year, year0) for b in m.blobs if b.first <= year <= b.last]
        return shapely.make_valid(shapely.union_all(parts)) if parts else shapely.Polygon()
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


def _plan_mines(rng: np.random.Generator, size: int, years: list[int], n: int, scale: float = 1.0) -> list[_Mine]:
    """``n`` mines at random places, apart from each other; ``scale``: pixels per NICFI pixel (mines keep their
    size in metres). Where 5000 tries do not place them all (many mines in a small scene), the spacing is
    relaxed in two steps before giving up."""
    mines: list[_Mine] = []
    y0, y1 = years[0], years[-1]

    def place(factor: float, gap: float) -> None:
        radius = rng.uniform(0.018, 0.05) * size * scale
        cx, cy = rng.uniform(radius * 1.6, size - radius * 1.6, 2)
        if any(np.hypot(cx - o.cx, cy - o.cy) < factor * (radius + o.radius) + gap for o in mines):
            return
        kind = len(mines) % 5
        first, last = y0, y1
        if kind == 3 and len(years) >= 3:
            first = years[1]  # appears after the first year
        elif kind == 4 and len(years) >= 3:
            last = years[-2]  # vanishes before the last year (abandoned and revegetated)
        harmonics = np.column_stack([rng.uniform(0, 0.18, 3), rng.uniform(0, 2 * np.pi, 3)])
        mines.append(_Mine(cx, cy, radius, harmonics, first, last, rng.uniform(1.0, 1.25), hole=len(mines) == 1))

    for factor, gap in ((1.5, 10 * scale), (1.25, 6 * scale), (1.05, 3 * scale)):
        tries = 0
        while len(mines) < n and tries < 5000:
            tries += 1
            place(factor, gap)
    return mines


def _smooth(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    f = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return f / (f.std() + 1e-9)


def _coarse(rng: np.random.Generator, size: int, cells: int = 12) -> np.ndarray:
    """A smooth field (size, size) of unit spread, cheap at any size: noise on a coarse grid, interpolated
    bilinearly to a quarter of the size, then repeated (steps of 4 px, invisible in a field this smooth)."""
    quarter = -(-size // 4)
    f = zoom(rng.standard_normal((cells, cells)).astype(np.float32), quarter / cells, order=1, grid_mode=True,
             mode="nearest")
    f = np.pad(f, ((0, max(quarter - f.shape[0], 0)), (0, max(quarter - f.shape[1], 0))), mode="edge")
    f = np.repeat(np.repeat(f[:quarter, :quarter], 4, 0), 4, 1)[:size, :size]
    return f / (f.std() + 1e-9)


def _landscape(rng: np.random.Generator, size: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Static background (4, size, size) float32: forest, fields, a river, roads, a village; and the river mask.
    ``scale``: pixels per NICFI pixel (features keep their size in metres)."""
    img = FOREST[:, None, None] * (1 + 0.12 * _smooth(rng, size, 12 * scale))[None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(6):  # fields: rectangles of cleared land
        x0, y0 = rng.uniform(0, size * 0.9, 2)
        w, h = rng.uniform(0.04, 0.12, 2) * size * scale
        m = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
        img[:, m] = FIELD[:, None] * rng.uniform(0.9, 1.1)
    # a meandering river
    path = size * (0.5 + 0.25 * np.sin(xx / size * 2 * np.pi * rng.uniform(0.6, 1.2) + rng.uniform(0, 6)))
    river = np.abs(yy - path) < (4 + 2 * _smooth(rng, size, 30 * scale)) * scale
    img[:, river] = WATER[:, None]
    for _ in range(3):  # straight roads, 2-3 px wide (at least a pixel at coarser pixels)
        a, b = rng.uniform(0, size, 2)
        d = np.abs((yy - a) - (b - a) / size * xx) / np.hypot(1, (b - a) / size)
        img[:, d < max(rng.uniform(1.0, 1.6) * scale, 0.75)] = ROAD[:, None]
    vx, vy = rng.uniform(0.15, 0.85, 2) * size  # a village: small roofs
    for _ in range(40):
        x0, y0 = vx + rng.normal(0, 18 * scale), vy + rng.normal(0, 18 * scale)
        s = rng.uniform(2, 5) * scale
        m = (np.abs(xx - x0) < s) & (np.abs(yy - y0) < s)
        img[:, m] = ROOF[:, None] * rng.uniform(0.85, 1.1)
    return img, river


def _window(size: int, cx: float, cy: float, r: float) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """The pixels within ``r`` of (cx, cy), clipped to the scene: row and column slices, and their centres'
    offsets from (cx, cy) (column vector dy, row vector dx), so that shapes are drawn on a small window only."""
    r0, r1 = int(max(cy - r, 0)), int(min(np.ceil(cy + r) + 1, size))
    c0, c1 = int(max(cx - r, 0)), int(min(np.ceil(cx + r) + 1, size))
    # a shape wholly off the scene (a puff around a cloud near the edge): an empty window, not a negative end
    # that a slice would read from the far side
    r1, c1 = max(r1, r0), max(c1, c0)
    dy = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5 - cx
    return slice(r0, r1), slice(c0, c1), dy, dx




def _footprints(mines: list[_Mine], years: list[int], size: int, buffer: float) -> np.ndarray:
    """Pixels within ``buffer`` px of any year's mine (pixel coordinates: the identity transform puts pixel
    (row, col) at (col + 0.5, row + 0.5))."""
    shapes = [shapely.buffer(_mine_polygon(m, y, years[0]), buffer) for m in mines for y in years
              if m.first <= y <= m.last]
    shapes = [g for g in shapes if not g.is_empty]
    if not shapes:
        return np.zeros((size, size), bool)
    return rasterize([(g, 1) for g in shapes], out_shape=(size, size), transform=Affine.identity(),
                     dtype=np.uint8) > 0


def _add_confusers(rng: np.random.Generator, base: np.ndarray, river: np.ndarray, mines: list[_Mine],
                   years: list[int], scale: float = 1.0) -> np.ndarray:
    """Bare ground that is not a mine, drawn into the static background: tilled fields with a soil-like spectrum,
    sand bars along the river, wide laterite roads. All are kept a few pixels off every year's mine footprint, so
    no confuser touches a mine and the truth stays the mines alone."""
    img = base.copy()
    size = img.shape[-1]
    keep_off = _footprints(mines, years, size, 6 * scale)
    blocked = keep_off | river
    # (a) tilled fields: rotated rectangles of bare soil, a little darker than mine soil in the visible, with the
    # NIR of crop residue above it, and the stripes of plough rows
    n_fields, placed, tries = rng.integers(4, 9), 0, 0
    side_max = min(120.0, size / 4)
    while placed < n_fields and tries < 400:
        tries += 1
        w, h = rng.uniform(30, max(side_max, 31), 2) * scale
        theta = rng.uniform(0, np.pi) if rng.uniform() < 0.6 else 0.0
        cx, cy = rng.uniform(0, size, 2)
        rows, cols, dy, dx = _window(size, cx, cy, np.hypot(w, h) / 2)
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        m = (np.abs(u) < w / 2) & (np.abs(v) < h / 2)
        if m.sum() < 0.5 * w * h or (m & blocked[rows, cols]).any():  # mostly off the scene, or on a mine/river
            continue
        tone = SOIL * rng.uniform(0.85, 1.0, 4).astype(np.float32)
        tone[3] = rng.uniform(2500, 2700)
        texture = 1 + 0.05 * np.sin(2 * np.pi * v / max(rng.uniform(3, 6) * scale, 2.0))  # plough rows
        win = img[:, rows, cols]
        win[:, m] = (tone[:, None, None] * texture[None])[:, m]
        img[:, rows, cols] = win
        placed += 1
    # (b) one or two laterite roads, 5-7 px wide, gently curving across the scene
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for _ in range(rng.integers(1, 3)):
        px, py = rng.uniform(0.2, 0.8, 2) * size
        theta = rng.uniform(0, np.pi)
        along = (xx - px) * np.cos(theta) + (yy - py) * np.sin(theta)
        across = -(xx - px) * np.sin(theta) + (yy - py) * np.cos(theta)
        bend = rng.uniform(5, 20) * scale * np.sin(2 * np.pi * along / (size * rng.uniform(0.5, 1.0))
                                                   + rng.uniform(0, 6))
        road = (np.abs(across - bend) < rng.uniform(5, 7) * scale / 2) & ~keep_off
        img[:, road] = (LATERITE * rng.uniform(0.95, 1.05))[:, None]
    # (c) sand bars: small patches elongated along the river, centred on its banks
    bank = binary_dilation(river, iterations=2) & ~river & ~keep_off
    ys, xs = np.nonzero(bank)
    if len(ys):
        # the river's local direction, from the gradient of the blurred river mask (it points into the water)
        blurred = gaussian_filter(river.astype(np.float32), 3)
        gy, gx = np.gradient(blurred)
        n_bars = max(2, int(round(rng.integers(5, 10) * size / 1024)))
        for i in rng.choice(len(ys), min(n_bars, len(ys)), replace=False):
            ny, nx = gy[ys[i], xs[i]], gx[ys[i], xs[i]]
            norm = np.hypot(ny, nx)
            if norm < 1e-6:
                continue
            ny, nx = ny / norm, nx / norm
            a, b = rng.uniform(8, 25) * scale, rng.uniform(2.5, 5) * scale  # semi-axes along and across the river
            cx, cy = xs[i] + 0.5 - 0.3 * b * nx, ys[i] + 0.5 - 0.3 * b * ny  # a little onto the bank
            rows, cols, dy, dx = _window(size, cx, cy, a)
            u = -dx * ny + dy * nx  # along the river
            v = dx * nx + dy * ny  # across it
            m = ((u / a) ** 2 + (v / b) ** 2 < 1) & ~keep_off[rows, cols]
            win = img[:, rows, cols]
            win[:, m] = (SAND * rng.uniform(0.95, 1.05))[:, None]
            img[:, rows, cols] = win
    return img


def _cumulus(rng: np.random.Generator, size: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scattered cumulus: cloud opacity (size, size) in [0, 1] with soft edges, covering 5-15 % of the scene in
    blobs of 10-60 px (at NICFI's pixel); the shadows' factor on the ground (the same blobs shifted by one
    offset, the sun's, of 15-30 px, dimming to 0.4-0.6); and the clouds' brightness (4, size, size)."""
    cover = rng.uniform(0.05, 0.15) * size * size
    hard = np.zeros((size, size), bool)
    covered = 0
    while covered < cover:
        # one cloud: a main puff and a few smaller ones around its rim, a cauliflower outline
        r = rng.uniform(5, 30) * scale
        cx, cy = rng.uniform(0, size, 2)
        k = rng.integers(2, 7)
        reach, angle = r * rng.uniform(0.4, 1.0, k), rng.uniform(0, 2 * np.pi, k)
        puffs = [(cx, cy, r)] + list(zip(cx + reach * np.cos(angle), cy + reach * np.sin(angle),
                                         r * rng.uniform(0.3, 0.7, k)))
        for x, y, rad in puffs:
            rows, cols, dy, dx = _window(size, x, y, rad)
            before = hard[rows, cols].sum()
            hard[rows, cols] |= dx ** 2 + dy ** 2 < rad ** 2
            covered += hard[rows, cols].sum() - before
    alpha = gaussian_filter(hard.astype(np.float32), 2.0 * scale)  # soft edges
    shadow = np.zeros_like(alpha)
    dist, azimuth = rng.uniform(15, 30) * scale, rng.uniform(0, 2 * np.pi)
    sy, sx = int(round(dist * np.sin(azimuth))), int(round(dist * np.cos(azimuth)))
    # shadow[y + sy, x + sx] = alpha[y, x], without wrapping around the scene's edges
    shadow[max(sy, 0):size + min(sy, 0), max(sx, 0):size + min(sx, 0)] = \
        alpha[max(-sy, 0):size + min(-sy, 0), max(-sx, 0):size + min(-sx, 0)]
    darken = 1 - rng.uniform(0.4, 0.6) * shadow
    bright = CLOUD[:, None, None] * (1 + 0.03 * _smooth(rng, size, 3 * scale))[None]
    return alpha, darken, bright


def _target_grid(transform: Affine, size: int, crs: CRS, lon: float, lat: float,
                 ground_m: float) -> tuple[Affine, int, int]:
    """The grid that covers the EPSG:3857 scene in ``crs`` with pixels of the same ground size: ``ground_m``
    metres in a projected CRS (converted to its units), or the degrees that span it at (lon, lat) in a geographic
    one, east-west and north-south apart, so the pixels stay about square on the ground."""
    if crs.is_geographic:
        from pyproj import Geod

        geod = Geod(ellps="WGS84")
        east, _, _ = geod.fwd(lon, lat, 90, ground_m)
        _, north, _ = geod.fwd(lon, lat, 0, ground_m)
        res = (east - lon, north - lat)
    else:
        res = (ground_m / crs.linear_units_factor[1],) * 2
    left, top = transform.c, transform.f
    right, bottom = left + size * transform.a, top + size * transform.e
    return calculate_default_transform("EPSG:3857", crs, size, size, left, bottom, right, top, resolution=res)




def _river_line(river: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The river's centre line, one point per column (it meanders across the scene from west to east): the
    centre row of each column's water (interpolated over columns with none), the half width across the
    channel, and which columns hold water."""
    size = river.shape[1]
    count = river.sum(0)
    has = count > 0
    cols = np.arange(size)
    if not has.any():
        return np.full(size, size / 2.0), np.zeros(size), has
    rows = np.arange(river.shape[0], dtype=np.float64)[:, None] + 0.5
    centre = (river * rows).sum(0) / np.maximum(count, 1)
    centre = np.interp(cols, cols[has], centre[has])
    slope = np.gradient(gaussian_filter1d(centre, 5))
    return centre, count / 2 / np.hypot(1, slope), has


def _reach(m: _Mine, n_years: int) -> float:
    """How far from its centre a mine (or a blob) may reach in its last year."""
    return m.radius * m.growth ** max(n_years - 1, 0) * (1 + float(np.abs(m.harmonics[:, 0]).sum()))


def _plan_dredging(rng: np.random.Generator, mines: list[_Mine], river: np.ndarray, years: list[int],
                   share: float, scale: float = 1.0) -> list[_Mine]:
    """Turn ``share`` of the mines into river dredging sites: a string of 3-8 blobs along the river channel,
    on either bank or in the channel itself, overlapping one another: ponds and spoil heaps, each an irregular
    outline a quarter to a half of the replaced mine's radius. More than half of the blobs are worked in the
    site's first year, one more each year after. A site that finds no place along the river clear of the other
    mines stays a pit. The mine keeps its index (its id in the truth), its first and last year."""
    if not mines or share <= 0:
        return mines
    size = river.shape[1]
    n_sites = min(len(mines), max(1, int(round(share * len(mines)))))
    # the mine with a hole stays a pit unless every mine becomes a dredging site
    candidates = [i for i in range(len(mines)) if i != 1 or n_sites == len(mines)]
    chosen = sorted(int(i) for i in rng.choice(candidates, min(n_sites, len(candidates)), replace=False))
    centre, half_width, has = _river_line(river)
    if not has.any():
        return mines
    cols = np.arange(size, dtype=np.float64)
    slope = np.gradient(gaussian_filter1d(centre, 5))
    norm = np.hypot(1, slope)
    normal = np.column_stack([-slope / norm, 1 / norm])  # (x, y) across the river
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(1, np.diff(centre)))])  # arc length along the centre line
    n_years = len(years)
    occupied = [(m.cx, m.cy, _reach(m, n_years)) for i, m in enumerate(mines) if i not in chosen]
    out = list(mines)
    for i in chosen:
        m = mines[i]
        first_idx = years.index(m.first)
        for _ in range(100):
            k = int(rng.integers(3, 9))
            radii = np.maximum(m.radius * rng.uniform(0.25, 0.5, k), 2.5 * max(scale, 0.5))
            growth = rng.uniform(1.0, 1.06)
            start = arc[int(rng.choice(np.flatnonzero(has)))]
            direction = 1 if rng.uniform() < 0.5 else -1
            steps = np.concatenate([[0.0], (radii[:-1] + radii[1:]) * rng.uniform(0.7, 1.0, k - 1)])
            pos = start + direction * np.cumsum(steps)
            sides = rng.choice([-1.0, 0.0, 1.0], k, p=[0.4, 0.2, 0.4])
            harmonics = np.stack([np.column_stack([rng.uniform(0, 0.22, 4), rng.uniform(0, 2 * np.pi, 4)])
                                  for _ in range(k)])
            pond_first = rng.uniform() < 0.5
            flips = rng.uniform(size=k) < 0.2
            if pos.min() < arc[0] or pos.max() > arc[-1]:
                continue
            x = np.interp(pos, arc, cols)
            xi = np.clip(np.round(x).astype(int), 0, size - 1)
            off = sides * (half_width[xi] + 0.6 * radii)
            bx = x + 0.5 + off * normal[xi, 0]
            by = np.interp(x, cols, centre) + off * normal[xi, 1]
            reach = radii * growth ** max(n_years - 1, 0) * (1 + np.abs(harmonics[:, :, 0]).sum(1))
            inside = ((bx > reach) & (bx < size - reach) & (by > reach) & (by < size - reach)).all()
            clear = all(np.hypot(bx[j] - ox, by[j] - oy) > reach[j] + r_o + 8 * scale
                        for j in range(k) for ox, oy, r_o in occupied)
            if not (inside and clear):
                continue
            k0 = int(math.ceil(0.6 * k))
            blobs = []
            for j in range(k):
                idx = first_idx + max(0, j - k0 + 1)  # the string grows along the river, a blob a year
                since = years[idx] if idx < n_years else years[-1] + 1
                blobs.append(_Mine(float(bx[j]), float(by[j]), float(radii[j]), harmonics[j], since, m.last,
                                   growth, hole=False))
            ponds = tuple(bool(((j % 2 == 0) == pond_first) != flips[j]) for j in range(k))
            occupied += [(b.cx, b.cy, reach[j]) for j, b in enumerate(blobs)]
            out[i] = _Mine(float(bx.mean()), float(by.mean()), float(np.hypot(bx - bx.mean(), by - by.mean()).max()
                                                                     + radii.max()),
                           np.zeros((0, 2)), m.first, m.last, 1.0, hole=False, blobs=tuple(blobs), ponds=ponds)
            break
    return out


@dataclass
class _Season:
    forest: np.ndarray  # (years, 2): NIR factor and visible factor of forest per year
    forest_field: list  # per year, (size, size) smooth variation of that factor
    forest_mask: np.ndarray  # 1.0 on forest, 0.0 elsewhere
    fields: list  # (rows, cols, mask, tones per year (years, 4), plough texture)
    patches: list  # (rows, cols, mask, tones per year or None before it appears, texture)


def _plan_seasonal(rng: np.random.Generator, base: np.ndarray, river: np.ndarray, mines: list[_Mine],
                   years: list[int], scale: float = 1.0) -> _Season:
    """Land that changes between years and is no mine: 6-11 fields (per 1024 px square, 3 at least) that are
    green, ploughed or dry, changing most years (from green to bare or dry, and mostly back); forest whose NIR
    (x 0.85-1.12) and visible (x 0.9-1.25) vary by year, unevenly; 2-5 patches (per 1024 px square, 1 at least)
    of newly cleared land appearing in a later year (then cropped, ploughed or dry). All are kept a few pixels
    off every year's mine footprint and off the river."""
    size = base.shape[-1]
    n_years = len(years)
    blocked = _footprints(mines, years, size, 6 * scale) | river
    forest = np.column_stack([rng.uniform(0.85, 1.12, n_years), rng.uniform(0.9, 1.25, n_years)])
    forest_field = [1 + 0.05 * _coarse(rng, size) for _ in years]
    forest_mask = ((base[3] > 2400) & (base[0] < 600)).astype(np.float32)
    area = (size / 1024) ** 2
    fields = []
    n_fields, tries = max(3, int(round(rng.integers(6, 12) * area))), 0
    states = (CROP, PLOUGHED, STUBBLE)
    while len(fields) < n_fields and tries < 60 * n_fields:
        tries += 1
        w, h = rng.uniform(20, 65, 2) * scale
        theta = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(0, size, 2)
        rows, cols, dy, dx = _window(size, cx, cy, np.hypot(w, h) / 2)
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        m = (np.abs(u) < w / 2) & (np.abs(v) < h / 2)
        if m.sum() < 0.5 * w * h or (m & blocked[rows, cols]).any():
            continue
        seq = [int(rng.integers(3))]  # crop, ploughed, stubble: green one year, bare or dry the next
        for _ in years[1:]:
            change, bare, to_crop = rng.uniform(size=3)
            if change >= 0.85:
                seq.append(seq[-1])
            elif seq[-1] == 0:
                seq.append(1 if bare < 0.5 else 2)
            else:
                seq.append(0 if to_crop < 0.75 else 3 - seq[-1])
        tones = np.stack([states[s] for s in seq]) * rng.uniform(0.9, 1.1, (n_years, 4)).astype(np.float32)
        texture = 1 + 0.06 * np.sin(2 * np.pi * v / max(rng.uniform(3, 6) * scale, 2.0))
        fields.append((rows, cols, m, tones, texture))
        blocked[rows, cols] |= m
    patches = []
    if n_years >= 2:
        n_patches, tries = max(1, int(round(rng.integers(2, 6) * area))), 0
        while len(patches) < n_patches and tries < 60 * n_patches:
            tries += 1
            r = rng.uniform(10, 30) * scale
            cx, cy = rng.uniform(0, size, 2)
            harm = np.column_stack([rng.uniform(0, 0.2, 3), rng.uniform(0, 2 * np.pi, 3)])
            since = int(rng.integers(1, n_years))
            later = rng.choice(3, n_years)
            rows, cols, dy, dx = _window(size, cx, cy, 1.7 * r)
            t = np.arctan2(dy, dx)
            rr = r * (1 + sum(a * np.cos((k + 1) * t + p) for k, (a, p) in enumerate(harm)))
            m = np.hypot(dx, dy) < rr
            if m.sum() < 0.5 * np.pi * r * r or (m & blocked[rows, cols]).any():
                continue
            tones = [None if j < since else CLEARED * rng.uniform(0.85, 1.05) if j == since
                     else states[later[j]] * rng.uniform(0.9, 1.1) for j in range(n_years)]
            noise = gaussian_filter(rng.standard_normal(m.shape).astype(np.float32), max(1.5 * scale, 0.7))
            texture = 1 + 0.08 * noise / (noise.std() + 1e-9)
            patches.append((rows, cols, m, tones, texture))
            blocked[rows, cols] |= m
    return _Season(forest, forest_field, forest_mask, fields, patches)


def _season_year(season: _Season, base: np.ndarray, j: int) -> np.ndarray:
    """The background of year index ``j``: forest of that season, fields and cleared patches in their state."""
    img = base.copy()
    nir_f, vis_f = season.forest[j]
    f = season.forest_field[j] * season.forest_mask  # 0 off the forest
    img[3] *= 1 + nir_f * f - season.forest_mask  # nir_f * field on the forest, 1 elsewhere
    img[:3] *= (1 + (vis_f - 1) * f)[None]
    for rows, cols, m, tones, texture in season.fields:
        win = img[:, rows, cols]
        win[:, m] = (tones[j][:, None, None] * texture[None])[:, m]
        img[:, rows, cols] = win
    for rows, cols, m, tones, texture in season.patches:
        if tones[j] is None:
            continue
        win = img[:, rows, cols]
        win[:, m] = (tones[j][:, None, None] * texture[None])[:, m]
        img[:, rows, cols] = win
    return img


@dataclass
class _Looks:
    """How each mine looks, by mine index + 1 (row 0 unused): soil and pond colours, spoil of dredging sites."""

    soils: np.ndarray | None  # (n + 1, 4), or None: the default soil
    ponds: np.ndarray | None  # (n + 1, 4), or None: the default pond colour
    spoil: np.ndarray  # (n + 1, 4): the spoil heaps of dredging sites
    dredge_ponds: np.ndarray  # (n + 1, 4): the ponds of dredging sites


def _plan_looks(mines: list[_Mine], mine_soil: str, pond_colours: bool, seed: int) -> _Looks | None:
    n = len(mines)
    dredging = any(m.blobs for m in mines)
    if mine_soil == "laterite" and not pond_colours and not dredging:
        return None
    soils = ponds = None
    if mine_soil != "laterite":
        rng = np.random.default_rng([seed, _SOILS])
        kinds = rng.integers(3, size=n) if mine_soil == "mixed" else np.full(n, 0)
        base = [MINE_SOILS[("laterite", "grey", "white")[k]] if mine_soil == "mixed" else MINE_SOILS[mine_soil]
                for k in kinds]
        soils = np.zeros((n + 1, 4), np.float32)
        soils[1:] = np.array(base) * rng.uniform(0.95, 1.05, (n, 4))
    if pond_colours:  # a mix of two pond colours per mine
        rng = np.random.default_rng([seed, _PONDS])
        a, b = rng.integers(len(POND_TONES), size=(2, n))
        w = rng.uniform(0, 1, (n, 1))
        ponds = np.zeros((n + 1, 4), np.float32)
        ponds[1:] = (w * np.array(POND_TONES)[a] + (1 - w) * np.array(POND_TONES)[b]) * rng.uniform(0.9, 1.1, (n, 1))
    rng = np.random.default_rng([seed, _DREDGING, 1])
    spoil = np.zeros((n + 1, 4), np.float32)
    spoil[1:] = SPOIL * rng.uniform(0.9, 1.1, (n, 1))
    if soils is not None:  # the spoil takes some of the site's soil colour
        spoil[1:] = 0.6 * spoil[1:] + 0.4 * soils[1:]
    dredge_ponds = np.zeros((n + 1, 4), np.float32)
    w = rng.uniform(0, 1, (n, 1))
    dredge_ponds[1:] = w * TURBID + (1 - w) * SLURRY
    if ponds is not None:
        dredge_ponds[1:] = ponds[1:]
    return _Looks(soils, ponds, spoil, dredge_ponds)


def _draw_mines(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, scale: float = 1.0,
                ids: np.ndarray | None = None, looks: _Looks | None = None,
                dredge: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Paint the mines (``mask``) on a copy of ``img``: textured soil and ponds. With ``looks``, each mine (``ids``:
    mine index + 1 per pixel) takes its own soil and pond colour, and dredging sites (``dredge``: the sites'
    pixels and their ponds' pixels, by mine index + 1) are spoil heaps and turbid ponds."""
    img = img.copy()
    size = img.shape[-1]
    tex = 1 + 0.10 * _smooth(rng, size, 3 * scale)
    soil = SOIL[:, None, None] * tex[None]
    ponds = (_smooth(rng, size, 5 * scale) > 1.3) & mask
    img[:, mask] = soil[:, mask]
    img[:, ponds] = POND[:, None]
    if looks is None or ids is None:
        return img
    if looks.soils is not None:
        bare = mask & ~ponds & (ids > 0)
        img[:, bare] = looks.soils[ids[bare]].T * tex[bare]
    if looks.ponds is not None:
        wet = ponds & (ids > 0)
        img[:, wet] = looks.ponds[ids[wet]].T * (1 + 0.3 * (tex[wet] - 1))
    if dredge is not None:
        site, site_ponds = dredge
        heap = (site > 0) & (site_ponds == 0)
        img[:, heap] = looks.spoil[site[heap]].T * (1 + 1.5 * (tex[heap] - 1))  # rough gravel
        wet = site_ponds > 0
        img[:, wet] = looks.dredge_ponds[site_ponds[wet]].T * (1 + 0.3 * (tex[wet] - 1))
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
    *,
    crs: str = "EPSG:3857",
    gsd_m: float = NICFI_GSD_M,
    nodata_edges: bool = False,
    confusers: bool = False,
    cloudy_year: int | None = None,
    mine_soil: str = "laterite",
    pond_colours: bool = False,
    dredging: bool | float = False,
    seasonal: bool = False,
    missing_labels: int = 1,
    missing_share: float = 0.0,
    label_offset_m: float = 0.0,
    label_extent: str = "all",
) -> Scene:
    """Write a synthetic scene under ``root`` and return its paths.

    ``size`` pixels square, cut into ``quads`` x ``quads`` GeoTIFFs per year; centred on (lon, lat), by default
    in Ghana's gold-mining belt. ``hazy_year=-1`` makes the last year hazy (``-2`` the second last, ...; a
    year is that year); ``None`` makes none hazy.

    Harder scenes (the defaults give the scene above, file for file):

    - ``crs``: the CRS of the imagery files. The scene is drawn in EPSG:3857 and, for another CRS, each year is
      warped (nearest neighbour) to it at the same ground pixel size (~4.75 m, or its degrees in EPSG:4326)
      before being cut into quads; pixels outside the warped footprint are nodata (0).
    - ``gsd_m``: the ground pixel size in metres. 4.77 (within 0.01) is NICFI's pixel, 4.777 m in EPSG:3857;
      any other size, e.g. 10 (Sentinel-2), is the size on the ground at ``lat`` (its EPSG:3857 pixel is larger
      by 1 / cos(lat); with a UTM ``crs`` the files' pixels are ``gsd_m`` metres). Mines, fields, rivers, roads,
      clouds and label noise keep their size in metres: at 10 m a mine covers ~(4.75 / 10)^2 of the pixels.
    - ``nodata_edges``: each quad gets ragged nodata strips, 5-40 px deep, along one or two of its borders on the
      outside of the mosaic (never along the seams between quads).
    - ``confusers``: tilled bare fields, sand bars on the river banks and wide laterite roads, which look bare
      like mines but are not in the truth and never touch a mine.
    - ``cloudy_year``: that year (``-1``: the last, ``-2``: the second last) gets cumulus clouds and their
      shadows; they are valid pixels.
    - ``mine_soil``: ``"laterite"`` (red), ``"grey"`` (tailings, ~1800, 1800, 1750, 1950), ``"white"`` (kaolin
      or sand, ~3200, 3100, 2800, 3300) or ``"mixed"`` (each mine one of the three); each mine's tone varies by
      +-5 % per band. ``pond_colours``: each mine's ponds a mix of two of grey-green, brownish-orange turbid,
      orange slurry and green water.
    - ``dredging``: ``True`` turns a third of the mines into river dredging sites (a number in (0, 1]: that
      share): strings of ponds and sand/gravel spoil heaps along the river, on its banks and in its channel,
      growing along it by a blob a year; in the truth as mines (a site may be a MultiPolygon).
    - ``seasonal``: fields green one year and ploughed or dry the next, forest NIR and colour varying by year,
      patches of cleared land (new fields) appearing in later years: land changes that are not mines.
    - ``missing_labels``: how many mines of the training year (the first ones) the labels leave out;
      ``missing_share``: the labels also leave out this share of the training year's mines (rounded), at random.
    - ``label_offset_m``: each label is also shifted by this many metres on the ground, in a random direction.
    - ``label_extent``: ``"all"``, or ``"west"``: labels only for the mines whose label's centre lies in the
      western half of the scene; ``labelled_area.gpkg`` is then that half (else the whole scene's footprint).
    """
    root = Path(root)
    years = sorted(int(y) for y in years)
    train_year = years[0] if train_year is None else train_year
    hazy, cloudy = _year_of(hazy_year, years, "hazy_year"), _year_of(cloudy_year, years, "cloudy_year")
    if missing_labels < 0:
        raise ValueError(f"missing_labels must be >= 0, got {missing_labels}")
    if not 0 <= missing_share <= 1:
        raise ValueError(f"missing_share must be in [0, 1], got {missing_share}")
    if mine_soil not in MINE_SOIL_CHOICES:
        raise ValueError(f"mine_soil must be one of {MINE_SOIL_CHOICES}, got {mine_soil!r}")
    if label_extent not in LABEL_EXTENTS:
        raise ValueError(f"label_extent must be one of {LABEL_EXTENTS}, got {label_extent!r}")
    if not gsd_m > 0:
        raise ValueError(f"gsd_m must be > 0, got {gsd_m}")
    dredge_share = (1 / 3 if dredging else 0.0) if isinstance(dredging, bool) else float(dredging)
    if not 0 <= dredge_share <= 1:
        raise ValueError(f"dredging must be a bool or a share in [0, 1], got {dredging}")
    rng = np.random.default_rng(seed)
    from pyproj import Transformer

    to_merc = Transformer.from_crs(WGS84, "EPSG:3857", always_xy=True)
    cx, cy = to_merc.transform(lon, lat)
    # Mercator stretches ground distances by 1 / cos(lat)
    res = NICFI_RES_M if abs(gsd_m - NICFI_GSD_M) <= 0.01 else gsd_m / np.cos(np.radians(lat))
    scale = NICFI_RES_M / res  # pixels per NICFI pixel: 1.0 by default, ~0.475 at 10 m
    half = size * res / 2
    transform = Affine(res, 0, cx - half, 0, -res, cy + half)
    ground_m = res * np.cos(np.radians(lat))
    base, river = _landscape(rng, size, scale)
    mines = _plan_mines(rng, size, years, n_mines, scale)
    if dredge_share > 0:
        mines = _plan_dredging(np.random.default_rng([seed, _DREDGING]), mines, river, years, dredge_share, scale)
    if confusers:
        base = _add_confusers(np.random.default_rng([seed, _CONFUSERS]), base, river, mines, years, scale)
    season = (_plan_seasonal(np.random.default_rng([seed, _SEASONAL]), base, river, mines, years, scale)
              if seasonal else None)
    looks = _plan_looks(mines, mine_soil, pond_colours, seed)
    clouds = _cumulus(np.random.default_rng([seed, _CLOUDS]), size, scale) if cloudy in years else None
    dst_crs = CRS.from_user_input(crs)
    warp = dst_crs != CRS.from_epsg(3857)
    if warp:
        dst_transform, dst_w, dst_h = _target_grid(transform, size, dst_crs, lon, lat, ground_m)
    edge_rng = np.random.default_rng([seed, _EDGES]) if nodata_edges else None
    to_ll = Transformer.from_crs("EPSG:3857", WGS84, always_xy=True)

    def pixel_to_ll(geoms: np.ndarray) -> np.ndarray:
        def f(xy: np.ndarray) -> np.ndarray:
            x, y = transform @ (xy[:, 0], xy[:, 1])
            return np.column_stack(to_ll.transform(x, y))

        return shapely.transform(geoms, f)

    def to_merc_px(geoms: np.ndarray) -> np.ndarray:
        return shapely.transform(geoms, lambda xy: np.column_stack(transform @ (xy[:, 0], xy[:, 1])))

    def burn(shapes: list) -> np.ndarray:
        if not shapes:
            return np.zeros((size, size), np.int32)
        return rasterize(shapes, out_shape=(size, size), transform=transform, fill=0, dtype=np.int32)

    out_transform = dst_transform if warp else transform

    def onto_output(a: np.ndarray) -> np.ndarray:
        """``a`` (..., size, size) on the written grid: warped where the scene is (0 is no data)."""
        if not warp:
            return a
        warped = np.zeros((*a.shape[:-2], dst_h, dst_w), a.dtype)
        reproject(a, warped, src_transform=transform, src_crs="EPSG:3857", src_nodata=0,
                  dst_transform=dst_transform, dst_crs=dst_crs, dst_nodata=0, resampling=Resampling.nearest)
        return warped

    truth_rows = []
    for j, year in enumerate(years):
        present = [m for m in mines if m.first <= year <= m.last]
        px = np.array([_mine_polygon(m, year, years[0]) for m in present], dtype=object)
        merc = to_merc_px(px)
        mask = rasterize([(g, 1) for g in merc], out_shape=(size, size), transform=transform, dtype=np.uint8) > 0
        ids = dredge = None
        if looks is not None:  # which mine each pixel belongs to (index + 1), and the dredging sites' ponds
            ids = burn([(g, mines.index(m) + 1) for m, g in zip(present, merc)])
            if any(m.blobs for m in present):
                wet = [(b, mines.index(m) + 1) for m in present for b, pond in zip(m.blobs, m.ponds)
                       if pond and b.first <= year <= b.last]
                wet_merc = to_merc_px(np.array([_mine_polygon(b, year, years[0]) for b, _ in wet], dtype=object))
                site = burn([(g, mines.index(m) + 1) for m, g in zip(present, merc) if m.blobs])
                dredge = (site, burn([(g, i) for (_, i), g in zip(wet, wet_merc)]) * (site > 0))
        year_base = _season_year(season, base, j) if season is not None else base
        img = _draw_mines(rng, year_base, mask, scale, ids, looks, dredge)
        img *= (1 + 0.05 * rng.uniform(-1, 1, 4).astype(np.float32))[:, None, None]  # sensor/season drift
        img[3] *= 1 + 0.04 * _smooth(rng, size, 40 * scale)  # phenology
        cloudy_now = clouds is not None and year == cloudy
        if cloudy_now:
            img *= clouds[1][None]  # cloud shadows darken the ground, under any haze
        if year == hazy:
            alpha = np.clip(0.22 + 0.08 * _smooth(rng, size, 60 * scale), 0.05, 0.4)
            img = (1 - alpha) * img + alpha * HAZE[:, None, None]
        if cloudy_now:
            img = (1 - clouds[0]) * img + clouds[0] * clouds[2]  # the clouds above it all
        img *= 1 + 0.03 * rng.standard_normal(img.shape).astype(np.float32)
        data = np.clip(img, 1, 10000).astype(np.uint16)
        data = onto_output(data)
        _write_quads(root / "imagery" / str(year), data, out_transform, quads, crs=dst_crs.to_string(),
                     edge_rng=edge_rng)
        if cloudy_now:  # the truth of what hides the ground: 1 cloud, 2 shadow (on the imagery's grid)
            hidden = onto_output(np.where(clouds[0] > CLOUD_TRUTH, 1, np.where(clouds[1] < 1 - SHADOW_TRUTH, 2, 0))
                                 .astype(np.uint8))
            with atomic_path(root / f"clouds_{year}.tif") as tmp, rasterio.open(
                    tmp, "w", driver="GTiff", width=hidden.shape[1], height=hidden.shape[0], count=1, dtype="uint8",
                    crs=dst_crs, transform=out_transform, compress="deflate") as dst:
                dst.write(hidden, 1)
        for m, g in zip(present, pixel_to_ll(px)):
            truth_rows.append({"year": year, "mine": mines.index(m), "geometry": g})
        if year == train_year:
            _write_noisy_labels(rng, np.random.default_rng([seed, _LABELS]), root / f"labels_{train_year}.gpkg", px,
                                pixel_to_ll, missing=missing_labels, offset_px=label_offset_m / ground_m,
                                scale=scale, share=missing_share, share_rng=np.random.default_rng([seed, _MISSING]),
                                west_of=size / 2 if label_extent == "west" else None)
    truth = gpd.GeoDataFrame(truth_rows, geometry="geometry", crs=WGS84)
    with atomic_path(root / "truth.gpkg") as tmp:
        truth.to_file(tmp, driver="GPKG", layer="truth")
    # where labels were drawn: the scene's footprint, or its western half (edges densified: curved in EPSG:4326)
    width = size / 2 if label_extent == "west" else size
    area = shapely.segmentize(shapely.box(0, 0, width, size), size / 32)
    labelled = gpd.GeoDataFrame({"extent": [label_extent]}, geometry=pixel_to_ll(np.array([area], dtype=object)),
                                crs=WGS84)
    with atomic_path(root / "labelled_area.gpkg") as tmp:
        labelled.to_file(tmp, driver="GPKG", layer="labelled_area")
    return Scene(root, root / "imagery", root / f"labels_{train_year}.gpkg", root / "truth.gpkg",
                 tuple(years), train_year, root / "labelled_area.gpkg")


def _year_of(year: int | None, years: list[int], name: str) -> int | None:
    """A year given as itself, or as a negative index into ``years`` (-1: the last)."""
    if year is None or year >= 0:
        return year
    if -year > len(years):
        raise ValueError(f"{name}={year} but the scene has {len(years)} years")
    return years[year]


def _write_noisy_labels(rng: np.random.Generator, own_rng: np.random.Generator, dest: Path, px: np.ndarray, to_ll,
                        missing: int = 1, offset_px: float = 0.0, scale: float = 1.0, share: float = 0.0,
                        share_rng: np.random.Generator | None = None, west_of: float | None = None) -> None:
    """Labels as a digitiser draws them: outlines off by a few pixels, simplified, slightly shifted.

    The first ``missing`` mines are left out (mines the literature missed), and ``share`` of all of them (rounded)
    at random among the rest (drawn from ``share_rng``); ``offset_px`` shifts each label further by that many
    pixels in a random direction (a systematic error, e.g. labels drawn on another basemap); ``scale``: pixels per
    NICFI pixel (the noise keeps its size in metres); ``west_of``: only labels whose centre lies west of that
    pixel column are kept (the rest of the scene was never labelled)."""
    # the scene's generator draws the noise of every mine but the first, always, so the later years' imagery does
    # not depend on the label options; the first mine's noise and the offsets come from the labels' own generator
    n_all = len(px)
    n_rest = max(len(px) - 1, 0)
    grow = rng.uniform(-1.5, 2.0, n_rest)
    shifts = rng.uniform(-1.5, 1.5, (n_rest, 2))
    if len(px):
        grow = np.concatenate([own_rng.uniform(-1.5, 2.0, 1), grow])
        shifts = np.concatenate([own_rng.uniform(-1.5, 1.5, (1, 2)), shifts])
    px, grow, shifts = px[missing:], grow[missing:] * scale, shifts[missing:] * scale
    if offset_px:
        angle = own_rng.uniform(0, 2 * np.pi, len(px))
        shifts = shifts + offset_px * np.column_stack([np.cos(angle), np.sin(angle)])
    noisy = shapely.buffer(px, grow)
    noisy = shapely.simplify(noisy, 1.5 * scale)
    noisy = np.array([shapely.affinity.translate(g, *s) for g, s in zip(noisy, shifts)], dtype=object)
    keep = np.ones(len(noisy), bool)
    if share > 0 and len(noisy):
        n_drop = min(int(round(share * n_all)), len(noisy))
        keep[(share_rng or np.random.default_rng()).choice(len(noisy), n_drop, replace=False)] = False
    if west_of is not None and len(noisy):
        keep &= shapely.get_x(shapely.centroid(noisy)) < west_of
    noisy = noisy[keep]
    gdf = gpd.GeoDataFrame({"id": np.arange(len(noisy))}, geometry=to_ll(noisy), crs=WGS84)
    with atomic_path(dest) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="labels")


def draw_scene_spec(seed: int) -> dict:
    """Keyword arguments of :func:`make_scene` (all but ``years`` and ``size``) drawn from the family of scenes
    that the module's docstring describes, from ``seed`` alone; ``seed`` is in the dict, as the scene's seed."""
    rng = np.random.default_rng([int(seed), _SPEC])
    region = list(REGIONS)[int(rng.integers(len(REGIONS)))]
    lon0, lon1, lat0, lat1 = REGIONS[region]
    lon, lat = round(float(rng.uniform(lon0, lon1)), 4), round(float(rng.uniform(lat0, lat1)), 4)
    gsd = NICFI_GSD_M if rng.uniform() < 0.6 else 10.0
    if rng.uniform() < 1 / 6:
        crs = "EPSG:4326"
    elif gsd == NICFI_GSD_M:
        crs = "EPSG:3857"
    else:
        zone = int((lon + 180) // 6) + 1
        crs = f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"
    layout = rng.uniform()
    dredging = False if layout < 0.4 else round(float(rng.uniform(0.2, 0.5)), 2) if layout < 0.8 else 1.0
    return dict(
        seed=int(seed),
        lon=lon,
        lat=lat,
        gsd_m=gsd,
        crs=crs,
        quads=int(rng.integers(1, 4)),
        n_mines=int(rng.integers(8, 41)),
        mine_soil=str(rng.choice(MINE_SOIL_CHOICES)),
        pond_colours=bool(rng.uniform() < 0.75),
        dredging=dredging,
        hazy_year=[None, -1, -2][int(rng.choice(3, p=[0.5, 0.3, 0.2]))],
        cloudy_year=[None, -1, -2][int(rng.choice(3, p=[0.6, 0.2, 0.2]))],
        seasonal=bool(rng.uniform() < 0.6),
        confusers=bool(rng.uniform() < 0.6),
        nodata_edges=bool(rng.uniform() < 0.4),
        missing_labels=0,
        missing_share=round(float(rng.uniform(0, 0.2)), 3),
        label_extent="west" if rng.uniform() < 0.25 else "all",
        label_offset_m=round(float(rng.uniform(0, 10)), 1),
    )


def _nodata_strip(rng: np.random.Generator, block: np.ndarray, side: str) -> None:
    """Set a ragged strip along one border of ``block`` (bands, rows, cols) to nodata, in place: 5-40 px deep,
    slanting from one end to the other like a scene footprint at an angle to the grid, with a wobble and a
    pixel of jitter."""
    rows, cols = block.shape[1:]
    along, across = (cols, rows) if side in ("top", "bottom") else (rows, cols)
    t = np.linspace(0, 1, along)
    a, b = rng.uniform(5, 40, 2)
    wobble = gaussian_filter1d(rng.standard_normal(along), 8)
    depth = a + (b - a) * t + 2 * wobble / (wobble.std() + 1e-9) + rng.integers(-1, 2, along)
    depth = np.clip(depth, 5, min(40, across // 3))
    d = np.arange(across)
    if side in ("bottom", "right"):
        d = d[::-1]  # distance from the border
    strip = d[:, None] < depth[None, :]  # (across, along)
    block[:, strip if side in ("top", "bottom") else strip.T] = 0


def _write_quads(folder: Path, data: np.ndarray, transform: Affine, quads: int, crs: str = "EPSG:3857",
                 edge_rng: np.random.Generator | None = None) -> None:
    """Cut ``data`` into ``quads`` x ``quads`` GeoTIFFs; with ``edge_rng``, each quad gets nodata strips along one
    or two of its borders that are outer borders of the mosaic."""
    folder.mkdir(parents=True, exist_ok=True)
    height, width = data.shape[1:]
    step_r, step_c = int(np.ceil(height / quads)), int(np.ceil(width / quads))
    for r in range(quads):
        for c in range(quads):
            block = data[:, r * step_r:(r + 1) * step_r, c * step_c:(c + 1) * step_c]
            if block.size == 0:
                continue
            outer = [side for side, on in (("top", r == 0), ("bottom", (r + 1) * step_r >= height),
                                           ("left", c == 0), ("right", (c + 1) * step_c >= width)) if on]
            if edge_rng is not None and outer:
                block = block.copy()
                for side in edge_rng.choice(outer, min(len(outer), edge_rng.integers(1, 3)), replace=False):
                    _nodata_strip(edge_rng, block, str(side))
            t = transform @ Affine.translation(c * step_c, r * step_r)
            profile = dict(driver="GTiff", width=block.shape[2], height=block.shape[1], count=block.shape[0],
                           dtype="uint16", crs=crs, transform=t, nodata=0, tiled=True,
                           blockxsize=256, blockysize=256, compress="deflate")
            with atomic_path(folder / f"quad_{r}_{c}.tif") as tmp:
                with rasterio.open(tmp, "w", **profile) as dst:
                    dst.write(block)
                    dst.descriptions = BANDS[: block.shape[0]]
