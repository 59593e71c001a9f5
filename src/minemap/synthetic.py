"""Synthetic multi-year scenes with known truth, for the demo, the tests and the benchmarks.

A scene is a patch of tropical landscape (forest, fields, a river, roads, a village) in EPSG:3857 at the
Planet/NICFI pixel size (4.777 m at the equator, ~4.75 m on the ground here), 4-band uint16 reflectance
(R, G, B, NIR, x 10,000). Mines are bare soil with turbid ponds; they grow, some appear or vanish, one has an
island of forest (a hole); one year is hazy. Written:

- ``imagery/<year>/quad_<row>_<col>.tif``: the scene of each year cut into quads, like NICFI's layout;
- ``labels_<train_year>.gpkg``: noisy training labels (jittered outlines, by default one mine missing);
- ``truth.gpkg``: the true mine polygons of every year (column ``year``), EPSG:4326.

Options of :func:`make_scene` make harder scenes for the benchmarks; each is off by default, and the default
scene is the same, file for file, whatever options exist (each option draws from its own random generator):

- ``crs``: write the imagery in another CRS (UTM, EPSG:4326, ...), warped from EPSG:3857 at the same ground
  pixel size, with nodata (0) outside the warped footprint;
- ``nodata_edges``: ragged strips of nodata along the outer borders of the quads, like real scene footprints;
- ``confusers``: bare ground that is not a mine: tilled fields, sand bars along the river, laterite roads;
- ``cloudy_year``: scattered cumulus clouds and their shadows in one year (valid pixels, not nodata);
- ``missing_labels``, ``label_offset_m``: how many mines the labels miss, and a systematic shift of each label.
"""

from __future__ import annotations

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
from scipy.ndimage import binary_dilation, gaussian_filter, gaussian_filter1d

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
SAND = np.array([1900, 1700, 1300, 2100], np.float32)
LATERITE = np.array([1700, 1450, 1100, 2000], np.float32)
CLOUD = np.array([6000, 6000, 6200, 6500], np.float32)
# the options' own random streams, np.random.default_rng([seed, stream]): turning an option on never changes
# the draws of the default scene, nor those of another option
_CONFUSERS, _CLOUDS, _EDGES, _LABELS = 1, 2, 3, 4


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


def _landscape(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Static background (4, size, size) float32: forest, fields, a river, roads, a village; and the river mask."""
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
    return img, river


def _window(size: int, cx: float, cy: float, r: float) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """The pixels within ``r`` of (cx, cy), clipped to the scene: row and column slices, and their centres'
    offsets from (cx, cy) (column vector dy, row vector dx), so that shapes are drawn on a small window only."""
    r0, r1 = int(max(cy - r, 0)), int(min(np.ceil(cy + r) + 1, size))
    c0, c1 = int(max(cx - r, 0)), int(min(np.ceil(cx + r) + 1, size))
    dy = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5 - cx
    return slice(r0, r1), slice(c0, c1), dy, dx


def _add_confusers(rng: np.random.Generator, base: np.ndarray, river: np.ndarray, mines: list[_Mine],
                   years: list[int]) -> np.ndarray:
    """Bare ground that is not a mine, drawn into the static background: tilled fields with a soil-like spectrum,
    sand bars along the river, wide laterite roads. All are kept a few pixels off every year's mine footprint, so
    no confuser touches a mine and the truth stays the mines alone."""
    img = base.copy()
    size = img.shape[-1]
    footprints = [shapely.buffer(_mine_polygon(m, y, years[0]), 6) for m in mines for y in years
                  if m.first <= y <= m.last]
    keep_off = np.zeros((size, size), bool)
    if footprints:  # pixel coordinates: the identity transform puts pixel (row, col) at (col + 0.5, row + 0.5)
        keep_off = rasterize([(g, 1) for g in footprints], out_shape=(size, size), transform=Affine.identity(),
                             dtype=np.uint8) > 0
    blocked = keep_off | river
    # (a) tilled fields: rotated rectangles of bare soil, a little darker than mine soil in the visible, with the
    # NIR of crop residue above it, and the stripes of plough rows
    n_fields, placed, tries = rng.integers(4, 9), 0, 0
    side_max = min(120.0, size / 4)
    while placed < n_fields and tries < 400:
        tries += 1
        w, h = rng.uniform(30, max(side_max, 31), 2)
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
        texture = 1 + 0.05 * np.sin(2 * np.pi * v / rng.uniform(3, 6))  # plough rows along the field's u axis
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
        bend = rng.uniform(5, 20) * np.sin(2 * np.pi * along / (size * rng.uniform(0.5, 1.0)) + rng.uniform(0, 6))
        road = (np.abs(across - bend) < rng.uniform(5, 7) / 2) & ~keep_off
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
            a, b = rng.uniform(8, 25), rng.uniform(2.5, 5)  # semi-axes along and across the river
            cx, cy = xs[i] + 0.5 - 0.3 * b * nx, ys[i] + 0.5 - 0.3 * b * ny  # a little onto the bank
            rows, cols, dy, dx = _window(size, cx, cy, a)
            u = -dx * ny + dy * nx  # along the river
            v = dx * nx + dy * ny  # across it
            m = ((u / a) ** 2 + (v / b) ** 2 < 1) & ~keep_off[rows, cols]
            win = img[:, rows, cols]
            win[:, m] = (SAND * rng.uniform(0.95, 1.05))[:, None]
            img[:, rows, cols] = win
    return img


def _cumulus(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scattered cumulus: cloud opacity (size, size) in [0, 1] with soft edges, covering 5-15 % of the scene in
    blobs of 10-60 px; the shadows' factor on the ground (the same blobs shifted by one offset, the sun's, of
    15-30 px, dimming to 0.4-0.6); and the clouds' brightness (4, size, size), a little uneven."""
    cover = rng.uniform(0.05, 0.15) * size * size
    hard = np.zeros((size, size), bool)
    covered = 0
    while covered < cover:
        # one cloud: a main puff and a few smaller ones around its rim, a cauliflower outline
        r = rng.uniform(5, 30)
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
    alpha = gaussian_filter(hard.astype(np.float32), 2.0)  # soft edges
    shadow = np.zeros_like(alpha)
    dist, azimuth = rng.uniform(15, 30), rng.uniform(0, 2 * np.pi)
    sy, sx = int(round(dist * np.sin(azimuth))), int(round(dist * np.cos(azimuth)))
    # shadow[y + sy, x + sx] = alpha[y, x], without wrapping around the scene's edges
    shadow[max(sy, 0):size + min(sy, 0), max(sx, 0):size + min(sx, 0)] = \
        alpha[max(-sy, 0):size + min(-sy, 0), max(-sx, 0):size + min(-sx, 0)]
    darken = 1 - rng.uniform(0.4, 0.6) * shadow
    bright = CLOUD[:, None, None] * (1 + 0.03 * _smooth(rng, size, 3))[None]
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
    *,
    crs: str = "EPSG:3857",
    nodata_edges: bool = False,
    confusers: bool = False,
    cloudy_year: int | None = None,
    missing_labels: int = 1,
    label_offset_m: float = 0.0,
) -> Scene:
    """Write a synthetic scene under ``root`` and return its paths.

    ``size`` pixels square, cut into ``quads`` x ``quads`` GeoTIFFs per year; centred on (lon, lat), by default
    in Ghana's gold-mining belt. ``hazy_year=-1`` makes the last year hazy; ``None`` makes none hazy.

    Harder scenes (the defaults give the scene above, file for file):

    - ``crs``: the CRS of the imagery files. The scene is drawn in EPSG:3857 and, for another CRS, each year is
      warped (nearest neighbour) to it at the same ground pixel size (~4.75 m, or its degrees in EPSG:4326)
      before being cut into quads; pixels outside the warped footprint are nodata (0).
    - ``nodata_edges``: each quad gets ragged nodata strips, 5-40 px deep, along one or two of its borders on the
      outside of the mosaic (never along the seams between quads).
    - ``confusers``: tilled bare fields, sand bars on the river banks and wide laterite roads, which look bare
      like mines but are not in the truth and never touch a mine.
    - ``cloudy_year``: that year (``-1``: the last) gets cumulus clouds and their shadows; they are valid pixels.
    - ``missing_labels``: how many mines of the training year (the first ones) the labels leave out.
    - ``label_offset_m``: each label is also shifted by this many metres on the ground, in a random direction.
    """
    root = Path(root)
    years = sorted(int(y) for y in years)
    train_year = years[0] if train_year is None else train_year
    hazy = years[-1] if hazy_year == -1 else hazy_year
    cloudy = years[-1] if cloudy_year == -1 else cloudy_year
    if missing_labels < 0:
        raise ValueError(f"missing_labels must be >= 0, got {missing_labels}")
    rng = np.random.default_rng(seed)
    from pyproj import Transformer

    to_merc = Transformer.from_crs(WGS84, "EPSG:3857", always_xy=True)
    cx, cy = to_merc.transform(lon, lat)
    half = size * NICFI_RES_M / 2
    transform = Affine(NICFI_RES_M, 0, cx - half, 0, -NICFI_RES_M, cy + half)
    ground_m = NICFI_RES_M * np.cos(np.radians(lat))  # Mercator stretches ground distances by 1 / cos(lat)
    base, river = _landscape(rng, size)
    mines = _plan_mines(rng, size, years, n_mines)
    if confusers:
        base = _add_confusers(np.random.default_rng([seed, _CONFUSERS]), base, river, mines, years)
    clouds = _cumulus(np.random.default_rng([seed, _CLOUDS]), size) if cloudy in years else None
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

    truth_rows = []
    for year in years:
        present = [m for m in mines if m.first <= year <= m.last]
        px = np.array([_mine_polygon(m, year, years[0]) for m in present], dtype=object)
        merc = shapely.transform(px, lambda xy: np.column_stack(transform @ (xy[:, 0], xy[:, 1])))
        mask = rasterize([(g, 1) for g in merc], out_shape=(size, size), transform=transform, dtype=np.uint8) > 0
        img = _draw_mines(rng, base, mask)
        img *= (1 + 0.05 * rng.uniform(-1, 1, 4).astype(np.float32))[:, None, None]  # sensor/season drift
        img[3] *= 1 + 0.04 * _smooth(rng, size, 40)  # phenology
        cloudy_now = clouds is not None and year == cloudy
        if cloudy_now:
            img *= clouds[1][None]  # cloud shadows darken the ground, under any haze
        if year == hazy:
            alpha = np.clip(0.22 + 0.08 * _smooth(rng, size, 60), 0.05, 0.4)
            img = (1 - alpha) * img + alpha * HAZE[:, None, None]
        if cloudy_now:
            img = (1 - clouds[0]) * img + clouds[0] * clouds[2]  # the clouds above it all
        img *= 1 + 0.03 * rng.standard_normal(img.shape).astype(np.float32)
        data = np.clip(img, 1, 10000).astype(np.uint16)
        out_transform = transform
        if warp:
            warped = np.zeros((data.shape[0], dst_h, dst_w), np.uint16)
            reproject(data, warped, src_transform=transform, src_crs="EPSG:3857", src_nodata=0,
                      dst_transform=dst_transform, dst_crs=dst_crs, dst_nodata=0, resampling=Resampling.nearest)
            data, out_transform = warped, dst_transform
        _write_quads(root / "imagery" / str(year), data, out_transform, quads, crs=dst_crs.to_string(),
                     edge_rng=edge_rng)
        for m, g in zip(present, pixel_to_ll(px)):
            truth_rows.append({"year": year, "mine": mines.index(m), "geometry": g})
        if year == train_year:
            _write_noisy_labels(rng, np.random.default_rng([seed, _LABELS]), root / f"labels_{train_year}.gpkg", px,
                                pixel_to_ll, missing=missing_labels, offset_px=label_offset_m / ground_m)
    truth = gpd.GeoDataFrame(truth_rows, geometry="geometry", crs=WGS84)
    with atomic_path(root / "truth.gpkg") as tmp:
        truth.to_file(tmp, driver="GPKG", layer="truth")
    return Scene(root, root / "imagery", root / f"labels_{train_year}.gpkg", root / "truth.gpkg",
                 tuple(years), train_year)


def _write_noisy_labels(rng: np.random.Generator, own_rng: np.random.Generator, dest: Path, px: np.ndarray, to_ll,
                        missing: int = 1, offset_px: float = 0.0) -> None:
    """Labels as a digitiser draws them: outlines off by a few pixels, simplified, slightly shifted.

    The first ``missing`` mines are left out (mines the literature missed); ``offset_px`` shifts each label further
    by that many pixels in a random direction (a systematic error, e.g. labels drawn on another basemap)."""
    # the scene's generator draws the noise of every mine but the first, always, so the later years' imagery does
    # not depend on the label options; the first mine's noise and the offsets come from the labels' own generator
    n_rest = max(len(px) - 1, 0)
    grow = rng.uniform(-1.5, 2.0, n_rest)
    shifts = rng.uniform(-1.5, 1.5, (n_rest, 2))
    if len(px):
        grow = np.concatenate([own_rng.uniform(-1.5, 2.0, 1), grow])
        shifts = np.concatenate([own_rng.uniform(-1.5, 1.5, (1, 2)), shifts])
    px, grow, shifts = px[missing:], grow[missing:], shifts[missing:]
    if offset_px:
        angle = own_rng.uniform(0, 2 * np.pi, len(px))
        shifts = shifts + offset_px * np.column_stack([np.cos(angle), np.sin(angle)])
    noisy = shapely.buffer(px, grow)
    noisy = shapely.simplify(noisy, 1.5)
    noisy = np.array([shapely.affinity.translate(g, *s) for g, s in zip(noisy, shifts)], dtype=object)
    gdf = gpd.GeoDataFrame({"id": np.arange(len(px))}, geometry=to_ll(noisy), crs=WGS84)
    with atomic_path(dest) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="labels")


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
