"""Clouds and cloud shadows, found in one year's pixels by their own signature.

Where a cloud, thin or opaque, or a cloud's shadow hides the ground, prediction must say "no observation"
(nodata), not "no mine". Comparing the year with another one would find clouds, but it finds every change of the
land too, and mines are exactly where land changes (forest turns into bare soil, soil into ponds): such a
comparison masks the very pixels the map is about. This module looks at one year alone, at the pixels' spectra
and their context in the tile:

- **Clouds** add white light: they lift blue as much as red, so the haze-optimised transform
  ``HOT = blue - 0.5 x red`` (Zhang, Guindon & Cihlar 2002) rises above the clear-sky line on which vegetation,
  reddish and bare soil, laterite, sand and water all lie (their blue is about half their red plus a small
  constant). HOT is measured against the tile's own clear-sky level (a low percentile per block of 64 px,
  capped by the tile's lower quartile so that blocks full of cloud do not lift it): a haze over the whole tile
  lifts that level with it and is no cloud (haze is radiometric normalisation's business), while a cloud
  standing out from its surroundings is. A cloud pixel is HOT_CORE above the line (3 x 3 mean; a third of an
  opaque cloud over any ground), white (blue at least WHITE x red), not water-like (near infrared at least
  NIR_RED x red) and at least BRIGHTER times as bright in its dimmest visible band as the clear ground around
  it. Grey and white ground (roofs, roads, grey tailings, kaolin, white sand) can pass that test too, so:
- **a cloud casts a shadow.** Shadows dim every band, near infrared included, by about one factor, so they keep
  the colour (band ratios) of the ground they fall on: each pixel is compared with the clear pixels of the tile
  that have its colour (bins of log band ratios), and a shadow is much darker than its colour's median, while
  water and ponds, dark by nature, are as bright as other water. Under a haze, whose light a shadow does not
  dim, a shadow is bluer than its ground; it is then also found as darker than the ground around it (a block's
  median) in every band, by about one factor, which water and ponds (brighter than forest in blue or green)
  and forest beside bright ground (far darker in the visible than in the near infrared) are not. All
  shadows lie beside their clouds, shifted by one offset (the sun's): it is searched up to MAX_SHIFT_PX away,
  at a coarse resolution (the shift of the candidates, weighted by their HOT so that thick clouds lead, that
  lands on the darkest ground), then refined to the pixel. Each candidate object (8-connected) is kept only if
  its ground at that offset is dark, or cannot be seen (on other candidates, no data, off the tile) and the
  object is thick (HOT twice HOT_CORE above the line, as bright as only a thick cloud is). If no offset makes the
  candidates' ground darker than the tile's, only thick objects are kept, without shadows. What lies farther
  than THICK_REACH from an object's thick part is judged again on its own, so that kaolin or sand touching a
  cloud is not masked with it.
- **Shadows** are the dark pixels within the kept clouds, grown a little and shifted by the offset.

Both are grown by ``grow_px`` (1 px) to take in soft edges: the cloud test holds where a third of the light is
the cloud's, and on the synthetic clouds' soft edges one pixel more reaches where ~15 % is; two pixels would
also mask 2-3 % of the clear mine pixels beside clouds. Pure numpy/scipy, vectorised: a 4096 x 4096 tile costs
3-5 s on two CPU cores. Pixels are reflectance x 10,000 (or the training year's units after radiometric
normalisation), with bands named as ``card.bands`` / ``source.band_names``: red and blue are needed, green and
near infrared are used when present; without red or blue nothing is masked (logged once). The mask is found in
each unit's read region (a tile and the margin its windows reach): near a tile's edge, where the context
differs, two tilings may disagree on a cloud whose shadow only one of them sees. Prediction therefore reads
CONTEXT_PX more on every side for this mask alone: without it, a white-sand mine cut by the top of a unit's
region (a tile one window high along a scene's edge), its ground at the sun's offset out of sight, was taken for
a cloud in one tile and mapped as a mine in the tile beside it (a fresh benchmark scene, 2026-12-07).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt, label
from scipy.signal import fftconvolve

log = logging.getLogger(__name__)

ALIASES = {"red": ("red", "r", "b04"), "green": ("green", "g", "b03"), "blue": ("blue", "b", "b02"),
           "nir": ("nir", "nir08", "b08", "b8a")}
BLOCK_PX = 64  # blocks of the clear-sky levels
HOT_CORE = 1000.0  # a cloud: HOT this far above the clear-sky line (x 10,000); an opaque cloud is ~OPAQUE_HOT
OPAQUE_HOT = 3000.0
WHITE = 0.75  # a cloud's blue is at least this share of its red (bare soil: ~0.6)
NIR_RED = 0.9  # ... its near infrared at least this share of its red (water: far less)
BRIGHTER = 1.8  # ... its dimmest visible band this many times the clear ground's around it
THICK = 2.0  # a thick cloud: HOT this many times HOT_CORE above the line; ...
THICK_REACH = 10  # ... its thinner parts lie within this many px of its thick part
MIN_OBJECT = 12  # px: smaller candidate objects are noise on bright ground
DARK = 0.85  # a shadow: at most this share of the brightness of the clear pixels of its colour ...
SHADOWED = 0.35  # a cloud casts a shadow: at least this share of its ground at the sun's offset is DARK ...
UNSEEN = 0.1  # ... unless less than this share of its area (or 10 px) of that ground is clear: not checked
MIN_MATCH = 0.15  # the candidates' ground at the best offset is this much darker than the tile's on average
LOCAL_DIM = 1.0  # ... or, no band brighter than this share of the ground's around it, DARK of its brightness
LOCAL_FLAT = 1.6  # ... and its bands dimmed about alike (the largest share at most this times the smallest)
RATIO_BIN = 0.2  # width of the bins of log band ratios that make the colour classes
MAX_SHIFT_PX = 60  # the farthest a shadow lies from its cloud
COARSE_PX = 384  # the offset is searched on a grid of about this many blocks a side, then refined
CONTEXT_PX = 2 * BLOCK_PX  # ground read around a region for this mask alone: beyond the farthest shadow
_warned: set = set()


@dataclass
class Obscured:
    """What hides the ground in a tile: ``cloud`` and ``shadow`` (h, w) bool, grown; ``offset`` (dy, dx), the
    shadows' shift from their clouds in pixels, None where none was found."""

    cloud: np.ndarray
    shadow: np.ndarray
    offset: tuple[int, int] | None = None

    @property
    def mask(self) -> np.ndarray:
        return self.cloud | self.shadow


def band_index(band_names, name: str) -> int | None:
    """Index of the band ``name`` (red, green, blue, nir, or a usual alias) in ``band_names``, or None."""
    names = [str(b).lower() for b in band_names]
    for alias in ALIASES[name]:
        if alias in names:
            return names.index(alias)
    return None


def needed_for(source) -> bool:
    """Whether clouds and shadows in ``source``'s pixels must be found here: it does not mask them itself
    (``masks_clouds`` false: local files, Planet basemaps; a STAC source leaves masked scene classes out)."""
    return not getattr(source, "masks_clouds", False)


def obscured_mask(pixels: np.ndarray, valid: np.ndarray, band_names, grow_px: int = 1) -> np.ndarray:
    """Pixels of one year's ``pixels`` (bands, h, w) hidden by a cloud or a cloud's shadow: (h, w) bool; see
    :func:`find_obscured`."""
    return find_obscured(pixels, valid, band_names, grow_px).mask


def find_obscured(pixels: np.ndarray, valid: np.ndarray, band_names, grow_px: int = 1) -> Obscured:
    """Clouds and their shadows in one year's ``pixels`` (bands, h, w) where ``valid`` (h, w), by their own
    signature (see the module docstring), each grown by ``grow_px``; ``band_names`` name the bands."""
    h, w = pixels.shape[1:]
    none = Obscured(np.zeros((h, w), bool), np.zeros((h, w), bool))
    if not np.issubdtype(pixels.dtype, np.floating):
        pixels = pixels.astype(np.float32)
    idx = {b: band_index(band_names, b) for b in ("red", "green", "blue", "nir")}
    if idx["red"] is None or idx["blue"] is None:
        key = tuple(band_names)
        if key not in _warned:
            _warned.add(key)
            log.warning("bands %s lack red or blue: clouds and cloud shadows are not masked", list(band_names))
        return none
    bands = [pixels[i] for i in idx.values() if i is not None]  # red first
    valid = valid & np.logical_and.reduce([np.isfinite(b) for b in bands])
    if valid.sum() < 64:
        return none
    red, blue = pixels[idx["red"]], pixels[idx["blue"]]
    vis = [pixels[idx[b]] for b in ("red", "green", "blue") if idx[b] is not None]
    nir = pixels[idx["nir"]] if idx["nir"] is not None else None
    core, height = _candidates(red, blue, vis, nir, valid)
    if not core.any():
        return none
    clear = valid & ~_grow(core, 2)  # the clear ground: colours' and surroundings' yardstick
    ratio = _darkness(bands, clear)
    weight = np.where(core, np.clip(height / OPAQUE_HOT, 0, 1), 0).astype(np.float32)
    offset, shadows = _sun_offset(weight, np.clip(1 - ratio, 0, 1) * clear, clear)
    del weight
    if not shadows:  # no shift of the candidates lands on shadows: only thick clouds are kept, without shadows
        offset = None
    cloud = _verified(core, height, ratio, valid & ~_grow(core, 1), offset)
    cloud_grown = _grow(cloud, grow_px)
    if offset is None or not cloud.any():
        return Obscured(cloud_grown, none.shadow, offset)
    shadow = _shift(_grow(cloud, grow_px + 1), *offset) & valid & ~cloud_grown & (ratio <= DARK)
    return Obscured(cloud_grown, _grow(shadow, grow_px), offset)


# -- clouds ----------------------------------------------------------------------------------------------------
def _candidates(red, blue, vis, nir, valid) -> tuple[np.ndarray, np.ndarray]:
    """(candidate, height): pixels far above the clear-sky line, white, not water-like and bright against the
    tile's clear ground; and the height above the line (HOT less its clear-sky level, a 3 x 3 mean)."""
    hot = blue - 0.5 * red
    height = _box3(hot - _level(hot, valid, 10, cap=(25, 300.0)))
    del hot
    core = valid & (height >= HOT_CORE) & (blue >= WHITE * red)
    if nir is not None:
        core &= nir >= NIR_RED * red
    if core.any():
        dim = np.minimum.reduce(vis)  # a cloud lifts every visible band
        core &= dim >= BRIGHTER * _level(dim, valid, 25, cap=(40, 0.0))
    return core, height


def _verified(core: np.ndarray, height: np.ndarray, ratio: np.ndarray, clear: np.ndarray,
              offset: tuple[int, int] | None) -> np.ndarray:
    """The candidate objects (8-connected) that are clouds: those whose ground at ``offset`` is shadowed (at
    least SHADOWED of it DARK, where it is ``clear``), and those whose ground there cannot be seen (on other
    candidates, no data, off the tile) but that are thick. Of a thick object, what lies farther than THICK_REACH
    from its thick part is judged again on its own (kaolin or sand touching a cloud casts no shadow)."""
    labels, n = label(core, np.ones((3, 3), bool))
    if n == 0:
        return core
    thick_px = core & (height >= THICK * HOT_CORE)
    thick = np.bincount(labels[thick_px], minlength=n + 1) > 0
    cloud = _shadowed(labels, n, thick, ratio, clear, offset)[labels]
    far = cloud & thick[labels] & ~_near(cloud & thick_px, THICK_REACH)
    if far.any():
        labels, n = label(far, np.ones((3, 3), bool))
        cloud &= ~far | _shadowed(labels, n, np.zeros(n + 1, bool), ratio, clear, offset)[labels]
    return cloud


def _shadowed(labels: np.ndarray, n: int, thick: np.ndarray, ratio: np.ndarray, clear: np.ndarray,
              offset: tuple[int, int] | None) -> np.ndarray:
    """Per object of ``labels`` (n + 1,): whether it casts a shadow at ``offset`` or, where its ground there is
    out of sight, whether it is ``thick``; objects smaller than MIN_OBJECT are not clouds."""
    area = np.bincount(labels.ravel(), minlength=n + 1)
    if offset is None:
        keep = thick.copy()
    else:
        lab = _shift(labels, *offset)
        lab[~clear] = 0
        seen = np.bincount(lab.ravel(), minlength=n + 1)
        dark = np.bincount(lab[ratio <= DARK], minlength=n + 1)
        keep = np.where(seen >= np.maximum(UNSEEN * area, 10), dark >= SHADOWED * seen, thick)
    keep &= area >= MIN_OBJECT
    keep[0] = False
    return keep


def _level(x: np.ndarray, valid: np.ndarray, q: float, cap: tuple[float, float] | None = None,
           floor: float | None = None) -> np.ndarray:
    """A smooth large-scale level of ``x`` (h, w): the ``q``-th percentile of each block of BLOCK_PX (16 x 16
    samples), at most the tile's ``cap[0]``-th percentile + ``cap[1]`` (blocks full of cloud) and at least its
    ``floor``-th percentile (blocks full of shadow), interpolated bilinearly; blocks with too little data take
    the nearest block's level."""
    h, w = x.shape
    b = BLOCK_PX
    step, k = b // 16, 16  # 16 x 16 samples a block
    nby, nbx = -(-h // b), -(-w // b)
    xs = np.full((nby * k, nbx * k), np.nan, np.float32)
    sample = x[::step, ::step]
    xs[:sample.shape[0], :sample.shape[1]] = np.where(valid[::step, ::step], sample, np.nan)
    s = xs.reshape(nby, k, nbx, k).transpose(0, 2, 1, 3).reshape(nby, nbx, -1)
    s = np.sort(s, axis=-1)  # NaN last
    n = np.isfinite(s).sum(-1)
    idx = np.clip(np.round(q / 100 * (n - 1)).astype(int), 0, s.shape[-1] - 1)
    level = np.take_along_axis(s, idx[..., None], -1)[..., 0]
    level[n < s.shape[-1] // 8] = np.nan
    finite = s[np.isfinite(s)]
    if finite.size == 0:
        return np.zeros((h, w), np.float32)
    if np.isnan(level).all():
        level[:] = np.percentile(finite, q)
    elif np.isnan(level).any():
        _, (iy, ix) = distance_transform_edt(np.isnan(level), return_indices=True)
        level = level[iy, ix]
    if cap is not None:
        level = np.minimum(level, np.percentile(finite, cap[0]) + cap[1])
    if floor is not None:
        level = np.maximum(level, np.percentile(finite, floor))
    return _bilinear(level.astype(np.float32), h, w, b)


def _bilinear(grid: np.ndarray, h: int, w: int, b: int) -> np.ndarray:
    """Values at the centres of blocks of ``b`` px (ny, nx), interpolated bilinearly to every pixel (h, w): to
    cells of b / 8 px (separably, on the small grid), each cell then filled with its value (levels vary over
    blocks, a step of an eighth of a block's difference is nothing)."""
    c = max(1, b // 8)
    hc, wc = -(-h // c), -(-w // c)

    def where(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip(((np.arange(n_out) + 0.5) * c) / b - 0.5, 0, n_in - 1)
        i0 = np.floor(pos).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), (pos - i0).astype(np.float32)

    j0, j1, g = where(wc, grid.shape[1])
    cols = grid[:, j0] * (1 - g) + grid[:, j1] * g
    i0, i1, f = where(hc, grid.shape[0])
    cells = cols[i0] * (1 - f)[:, None] + cols[i1] * f[:, None]  # (hc, wc)
    out = np.broadcast_to(cells[:, None, :, None], (hc, c, wc, c)).reshape(hc * c, wc * c)
    return out[:h, :w]


# -- shadows ---------------------------------------------------------------------------------------------------
def _darkness(bands: list[np.ndarray], clear: np.ndarray) -> np.ndarray:
    """Each pixel's brightness (sum of ``bands``) over the median brightness of the ``clear`` pixels of its
    colour: the same bins of log ratios of each band to the first, so that a shadow, which dims every band
    alike, stays in its ground's class. (h, w) float32; 1 where the colour has too few clear pixels."""
    h, w = clear.shape
    ref = np.log(np.fmax(bands[0], np.float32(1)))  # fmax: no data (NaN) is 1
    codes = np.zeros((h, w), np.int32)
    for band in bands[1:4]:  # in place: a tile's bands are large
        q = np.fmax(band, np.float32(1))
        np.log(q, out=q)
        q -= ref
        q *= np.float32(1 / RATIO_BIN)
        q += np.float32(32)
        np.floor(q, out=q)
        np.clip(q, 0, 63, out=q)
        codes *= 64
        codes += q.astype(np.int32)
    del ref, q
    bright = np.log(np.fmax(sum(bands), 1.0)).astype(np.float32)
    step = max(1, int(np.sqrt(h * w / 1_000_000)))  # about a million samples for the colours' medians
    pick = clear[::step, ::step]
    sc, sb = codes[::step, ::step][pick], bright[::step, ::step][pick]
    if sc.size == 0:
        return np.ones((h, w), np.float32)
    order = np.lexsort((sb, sc))
    sc, sb = sc[order], sb[order]
    colours, start, count = np.unique(sc, return_index=True, return_counts=True)
    lut = np.full(64 ** 3, np.inf, np.float32)  # log median brightness of each colour
    enough = count >= 20
    lut[colours[enough]] = sb[start + count // 2][enough]
    out = bright
    out -= lut[codes]
    np.exp(out, out=out)
    out[out == 0] = 1.0  # colours without a median: not dark
    # a haze adds light that a shadow does not dim, so under a haze a shadow is bluer than its ground: it is
    # also found as darker than the ground around it (a block's median, at least the tile's lower third) in
    # every band, by about one factor; water and ponds (brighter than forest in blue or green) are not, nor is
    # forest beside bright ground (far darker in the visible than in the near infrared)
    around = np.zeros((h, w), np.float32)
    low, high = np.full((h, w), np.inf, np.float32), np.zeros((h, w), np.float32)
    for band in bands:
        level = np.maximum(_level(band, clear, 50, floor=30), np.float32(1))
        r = band / level
        np.minimum(low, r, out=low)
        np.maximum(high, r, out=high)
        around += level
    local = sum(bands) / around
    np.minimum(out, local, out=out, where=(high <= LOCAL_DIM) & (high <= LOCAL_FLAT * low))
    return out


def _sun_offset(weight: np.ndarray, dark: np.ndarray, clear: np.ndarray) -> tuple[tuple[int, int] | None, bool]:
    """The shift (dy, dx) of the clouds (``weight``) that lands on the darkest ground (``dark``, where ``clear``),
    within MAX_SHIFT_PX: searched on block means at a coarse resolution (FFT cross-correlation), then refined on
    a sample of cloud pixels. Returns it, None where every shift lands mostly on clouds, no data or off the
    tile; and whether that ground is darker than the tile's by MIN_MATCH (shadows)."""
    h, w = weight.shape
    f = max(1, int(np.ceil(max(h, w) / COARSE_PX)))
    cc, dc, vc = (_block_mean(a, f) for a in (weight, dark, clear))
    base = dc.sum() / max(vc.sum(), 1e-6)
    s = int(np.ceil(MAX_SHIFT_PX / f))
    cy, cx = cc.shape[0] - 1, cc.shape[1] - 1
    kernel = cc[::-1, ::-1]  # corr[s + dy, s + dx] = sum_x weight[x] * dark[x + (dy, dx)]
    corr = fftconvolve(dc, kernel, mode="full")[cy - s:cy + s + 1, cx - s:cx + s + 1]
    seen = fftconvolve(vc, kernel, mode="full")[cy - s:cy + s + 1, cx - s:cx + s + 1]
    score = np.where(seen >= 0.3 * cc.sum(), corr / np.maximum(seen, 1e-6), -1.0)
    iy, ix = np.unravel_index(np.argmax(score), score.shape)
    if score[iy, ix] < 0:
        return None, False
    best, best_score = (int(iy - s) * f, int(ix - s) * f), float(score[iy, ix])
    if f > 1:  # refined on a sample of cloud pixels: a grid of shifts a third of a block apart, then each pixel
        ys, xs = np.nonzero(weight)
        if ys.size > 20_000:
            keep = np.random.default_rng(0).choice(ys.size, 20_000, replace=False)
            ys, xs = ys[keep], xs[keep]
        wt = weight[ys, xs]

        def darkness(dy: int, dx: int) -> float:
            y, x = ys + dy, xs + dx
            inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            y, x, wi = y[inside], x[inside], wt[inside]
            n = (wi * clear[y, x]).sum()
            return (wi * dark[y, x]).sum() / n if n >= 0.3 * wt.sum() else -1.0

        for reach, stride in ((f - 1, max(1, f // 3)), (max(1, f // 3) - 1, 1)):
            y0, x0 = best
            steps = range(-reach, reach + 1, stride)
            shifts = [(y0 + i, x0 + j) for i in steps for j in steps]
            scores = [darkness(*d) for d in shifts]
            if max(scores) >= 0:
                best, best_score = shifts[int(np.argmax(scores))], max(scores)
    return best, best_score - base >= MIN_MATCH


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape
    ny, nx = -(-h // f), -(-w // f)
    pad = np.zeros((ny * f, nx * f), np.float32)
    pad[:h, :w] = a
    return pad.reshape(ny, f, nx, f).mean((1, 3))


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[y + dy, x + dx] = a[y, x]``; zero (False) where nothing lands."""
    h, w = a.shape
    out = np.zeros_like(a)
    if abs(dy) < h and abs(dx) < w:
        out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            a[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _near(a: np.ndarray, px: int) -> np.ndarray:
    """``a`` (bool) dilated by a square of side 2 px + 1: windowed ORs along each axis, by doubling."""
    for axis in (0, 1):
        x = np.moveaxis(a, axis, 0)
        n = x.shape[0]
        out = np.concatenate([np.zeros((px,) + x.shape[1:], bool), x])  # out[i] covers x[i - px]
        span = 1
        while span < 2 * px + 1:  # out[i] = any(x[i - px: i - px + span]), span doubling, then the rest
            step = min(span, 2 * px + 1 - span)
            out[:-step] |= out[step:].copy()
            span += step
        a = np.moveaxis(out[:n], 0, axis)
    return np.ascontiguousarray(a)


def _grow(a: np.ndarray, px: int) -> np.ndarray:
    """``a`` (bool) dilated ``px`` times by the 4-neighbourhood (a diamond of radius px)."""
    a = a.copy()
    for _ in range(px if a.any() else 0):
        b = a.copy()
        a[1:] |= b[:-1]
        a[:-1] |= b[1:]
        a[:, 1:] |= b[:, :-1]
        a[:, :-1] |= b[:, 1:]
    return a


def _box3(x: np.ndarray) -> np.ndarray:
    """The 3 x 3 mean of ``x`` (edges repeated)."""
    p = np.pad(x, 1, mode="edge")
    rows = p[:-2] + p[1:-1] + p[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / np.float32(9)


__all__ = ["Obscured", "band_index", "changed_since", "find_obscured", "obscured_mask"]


# -- ground that changed since another year -----------------------------------------------------------------------
GREENNESS_CHANGE = 0.3  # NDVI moved this far beyond the scene's typical shift between the two years: changed ...
VEGETATED = 0.3  # ... from or to vegetation (NDVI at least this in the year with it)


def changed_since(before: np.ndarray, after: np.ndarray, valid: np.ndarray, band_names,
                  grow_px: int = 1) -> tuple[np.ndarray, np.ndarray] | None:
    """Where the ground lost or gained vegetation between two years' ``pixels`` (bands, h, w) of one grid, where
    ``valid`` (h, w): ``(lost, gained)``, (h, w) bool each, grown by ``grow_px``; None without red and near
    infrared bands.

    Unlike a cloud mask, this one is *meant* to find the land that changed: it tells where a label drawn on the
    ``before`` imagery no longer speaks for the ``after`` imagery (a mine that grew into forest, a new pit, a pit
    abandoned and grown over). Mines replace vegetation with soil and water, so the measure is the change of NDVI
    less its median change over the grid (a year's haze, season or sensor shifts every pixel's NDVI about alike:
    a haze of 0.2-0.3 lowers forest's by ~0.2 and varies it by a few hundredths); a change beyond
    :data:`GREENNESS_CHANGE` from or to vegetation (NDVI of at least :data:`VEGETATED` in the year that has it) is
    land change (forest to bare soil: ~0.6). Water and ponds, whose NDVI a haze raises while it lowers the
    forest's, are never vegetation, so a hazy year's river is no change."""
    r, n = band_index(band_names, "red"), band_index(band_names, "nir")
    if r is None or n is None:
        key = ("changed_since", tuple(band_names))
        if key not in _warned:
            _warned.add(key)
            log.warning("bands %s lack red or near infrared: ground that changed since the labels' year is not "
                        "left out of the other years' training", list(band_names))
        return None
    h, w = valid.shape

    def ndvi(p: np.ndarray) -> np.ndarray:
        red, nir = p[r].astype(np.float32), p[n].astype(np.float32)
        return (nir - red) / np.maximum(nir + red, np.float32(1e-6))

    was, now = ndvi(before), ndvi(after)
    d = now - was
    ok = valid & np.isfinite(d)
    if ok.sum() < 64:
        return np.zeros((h, w), bool), np.zeros((h, w), bool)
    d = _box3(np.where(ok, d - np.float32(np.median(d[ok])), 0).astype(np.float32))  # a pixel's noise is no change
    lost = ok & (d < -GREENNESS_CHANGE) & (_box3(was) >= VEGETATED)
    gained = ok & (d > GREENNESS_CHANGE) & (_box3(now) >= VEGETATED)
    return _grow(lost, grow_px), _grow(gained, grow_px)
