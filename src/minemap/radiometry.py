"""Relative radiometric normalisation: bring each year's reflectance to the training year's before prediction.

A model sees one year in training; other years differ by haze, another sensor calibration or season. Both
methods compare a year with the training year on the same ground, over the pixels that stayed the same
(pseudo-invariant pixels: those that changed, such as mines, clouds, shadows or new fields, are dropped as
outliers of a robust fit):

- ``global``: one gain and offset per band and year, mapping the year's quantiles onto the training year's.
  Right for a uniform shift (calibration, season); wrong for patchy haze, which a single gain cannot undo.
- ``local``: gain and offset *fields* per band, on cells of ``cell_px`` (32) pixels of the year's grid (grids
  wider than 4096 pixels are read at a coarser step, and cells hold at least 8 x 8 of those reads): in each cell
  the gain is the ratio of the two years' spreads (inter-quartile ranges of 3 x 3 means, so that sensor noise,
  which grows with brightness, does not inflate a hazy year's spread) and the offset matches the medians; the
  fields are smoothed over neighbouring cells and interpolated bilinearly at every pixel. Haze that thins
  from one valley to the next is undone where it is. Interpolation is at absolute pixel positions, so tiles
  agree with one pass over the whole grid.

Written by predict as ``probabilities/radiometry/<year>.npz`` (with ``radiometry.json``, a summary).

Neither is the default (``predict.normalise_years = "off"``). Measured on a fresh draw of scenes (the same
models, years mapped with and without it; README, "Years unlike the training year"), both lowered the hazy
years: haze that thickens and thins within a cell widens the hazy year's spread there, so the gain comes out
too low (a laterite pit at 2,073 in the training year's red, 2,139 under haze, 1,410 after ``local``, 786 after
``global``), while the model, trained with haze, gain and shadow augmentation, maps the hazy year as it is.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
from affine import Affine
from scipy.ndimage import gaussian_filter, uniform_filter

from minemap._io import atomic_path
from minemap.errors import ImageryError
from minemap.imagery import ImagerySource
from minemap.lattice import Grid

log = logging.getLogger(__name__)
QUANTILES = (10, 30, 50, 70, 90)  # matched between a year and the training year
MIN_PIXELS = 1000
GAIN_RANGE = (0.5, 3.0)  # a local gain outside this is a cell that changed, not haze
CACHE_SIZE = 8  # normalisations kept loaded per process (a year each; long-lived workers serve many runs)


def _quantile_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per band (rows), gain and offset mapping x onto y through matched quantiles, refitted without outliers
    (pixels more than 3 robust deviations off in any band); returns gain, offset and the inlier mask."""
    keep = np.ones(x.shape[1], bool)
    for _ in range(5):
        # quantiles, unlike moments, are barely moved by patchy haze or by the pixels that changed
        qx, qy = np.percentile(x[:, keep], QUANTILES, axis=1), np.percentile(y[:, keep], QUANTILES, axis=1)
        dx = qx - qx.mean(0)
        gain = (dx * (qy - qy.mean(0))).sum(0) / np.maximum((dx ** 2).sum(0), 1e-9)
        offset = qy.mean(0) - gain * qx.mean(0)
        resid = y - (gain[:, None] * x + offset[:, None])
        med = np.median(resid[:, keep], 1)
        mad = 1.4826 * np.median(np.abs(resid[:, keep] - med[:, None]), 1) + 1e-9
        new_keep = (np.abs(resid - med[:, None]) / mad[:, None] < 3).all(0)
        if new_keep.sum() < MIN_PIXELS or (new_keep == keep).all():
            break
        keep = new_keep
    return gain, offset, keep


def fit_global(source: ImagerySource, year: int, ref_year: int, windows: int = 25,
               size: int = 256) -> dict | None:
    """One gain and offset per band bringing ``year`` to ``ref_year``, from ``windows`` windows spread over the
    reference grid; None where the two years share too few pixels."""
    ref = source.grid(ref_year)
    n = int(np.ceil(np.sqrt(windows)))
    w, h = min(size, ref.width), min(size, ref.height)
    grids = [ref.window(int(c), int(r), w, h) for r in np.linspace(0, ref.height - h, n).astype(int)
             for c in np.linspace(0, ref.width - w, n).astype(int)]
    xs, ys = [], []
    for g in grids:
        rp, rv = source.read(ref_year, g)
        px, v = source.read(year, g)
        both = v & rv
        xs.append(px[:, both])
        ys.append(rp[:, both])
    x, y = np.concatenate(xs, 1).astype(np.float64), np.concatenate(ys, 1).astype(np.float64)
    if x.shape[1] < MIN_PIXELS:
        return None
    gain, offset, keep = _quantile_fit(x, y)
    return {"mode": "global", "gain": gain.astype(np.float32), "offset": offset.astype(np.float32),
            "invariant_share": float(keep.mean())}


def _smooth_fill(field: np.ndarray, fill: float, sigma: float = 1.0) -> np.ndarray:
    """Gaussian smoothing of a 2-D field with NaN cells left out (normalised convolution); empty cells get
    ``fill``."""
    ok = np.isfinite(field)
    num = gaussian_filter(np.where(ok, field, 0.0), sigma, mode="nearest")
    den = gaussian_filter(ok.astype(np.float64), sigma, mode="nearest")
    out = np.where(den > 1e-3, num / np.maximum(den, 1e-12), fill)
    return out


def _box_mean(a: np.ndarray, valid: np.ndarray, size: int = 3) -> np.ndarray:
    """Mean of each band over a ``size`` x ``size`` window, over valid pixels only (bands, h, w; float64)."""
    w = uniform_filter(valid.astype(np.float64), size, mode="nearest")
    out = np.stack([uniform_filter(np.where(valid, b, 0.0).astype(np.float64), size, mode="nearest") for b in a])
    return out / np.maximum(w, 1e-9)[None]


def fit_local(source: ImagerySource, year: int, ref_year: int, cell_px: int = 32,
              max_side: int = 4096) -> dict | None:
    """Gain and offset fields (bands, rows, cols of cells of ``cell_px`` pixels of ``year``'s grid) bringing
    ``year`` to ``ref_year``; None where the two years share too few pixels.

    Both years are read on a coarse copy of the year's grid (every ``step``-th pixel, at most ``max_side`` a
    side), pixels that changed are dropped by a global robust fit, then each cell's quartiles give its gain
    (ratio of inter-quartile ranges of 3 x 3 means) and offset (matched medians)."""
    grid = source.grid(year)
    step = max(1, int(np.ceil(max(grid.width, grid.height) / max_side)))
    cell_px = max(cell_px, 8 * step)  # a cell holds at least 8 x 8 coarse pixels
    cell_px -= cell_px % step
    k = cell_px // step  # coarse pixels per cell side
    ny, nx = -(-grid.height // cell_px), -(-grid.width // cell_px)
    coarse = Grid(grid.crs, grid.transform @ Affine.scale(step), nx * k, ny * k)
    px, v = source.read(year, coarse)
    rp, rv = source.read(ref_year, coarse)
    both = v & rv
    if both.sum() < MIN_PIXELS:
        return None
    x, y = px[:, both].astype(np.float64), rp[:, both].astype(np.float64)
    g_gain, g_offset, keep = _quantile_fit(x, y)
    stable = np.zeros_like(both)
    stable[both] = keep
    bands = px.shape[0]
    gain = np.full((bands, ny, nx), np.nan)
    offset = np.full((bands, ny, nx), np.nan)

    def cells(a: np.ndarray) -> np.ndarray:  # (bands, ny*k, nx*k) -> (bands, ny, nx, k*k), NaN where unstable
        a = np.where(stable[None], a, np.nan).reshape(bands, ny, k, nx, k)
        return a.transpose(0, 1, 3, 2, 4).reshape(bands, ny, nx, k * k)

    # spreads are measured on a 3 x 3 mean of each year: sensor noise grows with brightness, so a hazy year's
    # raw spread is inflated by its own noise and its gain would come out too low (mines too dark after it)
    cx, cy = cells(_box_mean(px, both)), cells(_box_mean(rp, both))
    enough = np.isfinite(cx[0]).sum(-1) >= max(16, k * k // 4)
    with warnings.catch_warnings():  # cells without stable pixels are NaN, filled below
        warnings.simplefilter("ignore", RuntimeWarning)
        qx = np.nanpercentile(cx, (25, 50, 75), axis=-1)  # (3, bands, ny, nx)
        qy = np.nanpercentile(cy, (25, 50, 75), axis=-1)
        g = (qy[2] - qy[0]) / (qx[2] - qx[0])
    g = np.where(enough[None] & (g >= GAIN_RANGE[0]) & (g <= GAIN_RANGE[1]), g, np.nan)
    for b in range(bands):
        ok = np.isfinite(g[b])
        if not ok.any():
            gain[b], offset[b] = g_gain[b], g_offset[b]
            continue
        gain[b] = _smooth_fill(g[b], float(g_gain[b]))
        # the offset follows the smoothed gain, so that the smoothed medians still match
        med_x = _smooth_fill(np.where(ok, qx[1][b], np.nan), float(np.median(qx[1][b][ok])))
        med_y = _smooth_fill(np.where(ok, qy[1][b], np.nan), float(np.median(qy[1][b][ok])))
        offset[b] = med_y - gain[b] * med_x
    return {"mode": "local", "cell_px": cell_px, "gain": gain.astype(np.float32),
            "offset": offset.astype(np.float32), "invariant_share": float(keep.mean())}


def year_radiometry(source: ImagerySource, years: list[int], ref_year: int | None,
                    mode: str = "local") -> dict[int, dict]:
    """Per year other than ``ref_year``, the normalisation of ``mode`` (``global`` or ``local``); nothing where
    ``ref_year`` is unknown or absent from the source, or a year shares too few pixels with it."""
    if mode == "off" or ref_year is None or ref_year not in source.years():
        return {}
    out = {}
    for year in years:
        if year == ref_year:
            continue
        fit = fit_global(source, year, ref_year) if mode == "global" else fit_local(source, year, ref_year)
        if fit is None:
            log.warning("radiometry %d: too few pixels shared with %d; left as it is", year, ref_year)
            continue
        out[year] = {**fit, "reference_year": ref_year}
        log.info("radiometry %d -> %d (%s): median gain %s", year, ref_year, mode,
                 np.round(np.median(fit["gain"].reshape(len(fit["gain"]), -1), 1), 3).tolist())
    return out


def summary(rad: dict) -> dict:
    """What ``radiometry.json`` says of one year: mode, reference year, share of invariant pixels, and the
    range of gains and offsets per band."""
    g, o = np.asarray(rad["gain"]), np.asarray(rad["offset"])
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    return {"mode": rad["mode"], "reference_year": rad["reference_year"],
            "invariant_share": round(rad["invariant_share"], 4),
            "gain_min": np.round(flat(g).min(1), 4).tolist(), "gain_max": np.round(flat(g).max(1), 4).tolist(),
            "offset_min": np.round(flat(o).min(1), 2).tolist(), "offset_max": np.round(flat(o).max(1), 2).tolist()}


def content_key(rad: dict) -> str:
    """A hash of the gains and offsets (the file's bytes carry a time stamp, its content does not)."""
    h = hashlib.sha256()
    for k in ("gain", "offset"):
        h.update(np.ascontiguousarray(rad[k], np.float32).tobytes())
    return h.hexdigest()[:16]


def save(rad: dict, dest: Path) -> Path:
    with atomic_path(Path(dest)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in rad.items()})
    return Path(dest)


def load(path: Path) -> dict:
    with np.load(path) as z:
        return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}


_CACHE: OrderedDict[tuple[str, str], dict] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def load_cached(path: Path | str, key: str) -> dict:
    """The normalisation at ``path`` whose :func:`content_key` is ``key``, loaded once per process.

    Cached by path *and* content: a worker that outlives a run sees the same path rewritten by the next run
    into that folder (new imagery, another mode), and a cache by path alone would apply the old gains. A file
    whose content is not ``key`` (rewritten since the run that sent it started) is an error, not used."""
    k = (str(path), key)
    with _CACHE_LOCK:
        if k in _CACHE:
            _CACHE.move_to_end(k)
            return _CACHE[k]
    try:
        rad = load(Path(path))
    except FileNotFoundError:
        raise ImageryError(f"{path}: radiometry file not found on this machine (workers must see the output "
                           "folder at the same path)") from None
    if content_key(rad) != key:
        raise ImageryError(f"{path}: radiometry file changed since this prediction started (another run writing "
                           "into the same folder?); run predict again")
    with _CACHE_LOCK:
        _CACHE[k] = rad
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return rad


def _axis_weights(start: int, n: int, cell_px: int, cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pixels start..start+n-1, the lower cell index, the upper one and the weight of the upper (bilinear
    interpolation between cell centres, constant beyond the outer centres)."""
    pos = np.clip((np.arange(start, start + n) + 0.5) / cell_px - 0.5, 0, cells - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, cells - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def apply(pixels: np.ndarray, rad: dict, col_off: int = 0, row_off: int = 0) -> np.ndarray:
    """``pixels`` (bands, h, w), whose top-left pixel is (col_off, row_off) of the year's grid, normalised."""
    gain, offset = np.asarray(rad["gain"], np.float32), np.asarray(rad["offset"], np.float32)
    if rad["mode"] == "global":
        return pixels * gain[:, None, None] + offset[:, None, None]
    _, h, w = pixels.shape
    cell = int(rad["cell_px"])
    r0, r1, tr = _axis_weights(row_off, h, cell, gain.shape[1])
    c0, c1, tc = _axis_weights(col_off, w, cell, gain.shape[2])
    tr, tc = tr[:, None], tc[None, :]

    def at(f: np.ndarray) -> np.ndarray:
        return ((1 - tr) * ((1 - tc) * f[np.ix_(r0, c0)] + tc * f[np.ix_(r0, c1)])
                + tr * ((1 - tc) * f[np.ix_(r1, c0)] + tc * f[np.ix_(r1, c1)]))

    return np.stack([pixels[b] * at(gain[b]) + at(offset[b]) for b in range(len(pixels))])
