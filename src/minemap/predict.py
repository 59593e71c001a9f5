"""Prediction: per (tile, year), sliding-window SegFormer inference written as probability COGs.

Each tile is read with a halo of half a window around it, windows overlap by ``window_overlap`` and are blended
with a squared-sine weight (which sums to one under half-window overlap), so neither windows nor tiles leave
seams. Output per unit::

    probabilities/<year>/<tile_id>.tif   COG, uint8 = round(P(mining) x 250), nodata 255 where no imagery

A manifest (``probabilities/manifest.json``) records finished units with the model's fingerprint; a rerun
skips them unless ``overwrite``. Imagery whose bands or ground sample distance differ from the model card's
is refused before anything is written. Each year other than the model's training year is first brought to
that year's reflectance (:func:`year_radiometry`, ``probabilities/radiometry.json``) unless
``normalise_years`` is off.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from minemap._io import file_sha256, stable_hash, write_json
from minemap.config import PredictConfig
from minemap.errors import ImageryError
from minemap.execution import map_units
from minemap.geo import ground_sample_distance_m
from minemap.grid import Tile, make_tiles
from minemap.imagery import Grid, ImagerySource, open_imagery
from minemap.manifest import Manifest
from minemap.rasters import NODATA, quantise, write_cog
from minemap.model import WEIGHTS, ModelCard, forward_logits, load_model, read_card, resolve_device

log = logging.getLogger(__name__)
GSD_TOLERANCE = 0.25
QUANTILES = (10, 30, 50, 70, 90)  # matched between a year and the training year


def check_compatible(card: ModelCard, source: ImagerySource, year: int, where: str = "") -> None:
    """Refuse imagery whose bands or ground sample distance do not match the model card."""
    if list(source.band_names) != list(card.bands):
        raise ImageryError(f"{where}imagery bands {list(source.band_names)} do not match the model's "
                           f"{card.bands} (names and order must agree)")
    source.check_bands(year)
    g = source.grid(year)
    gsd = ground_sample_distance_m(g.crs, g.transform, g.width, g.height)
    if abs(gsd - card.gsd_m) > GSD_TOLERANCE * card.gsd_m:
        raise ImageryError(f"{where}imagery of {year} has a ground sample distance of {gsd:.2f} m, the model was "
                           f"trained at {card.gsd_m:.2f} m (more than {GSD_TOLERANCE:.0%} apart)")


def blend_weights(size: int) -> np.ndarray:
    """2-D squared-sine window: sums to 1 when windows overlap by half."""
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return np.outer(w, w).astype(np.float32)


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    s = list(range(0, length - window + 1, stride))
    if s[-1] != length - window:
        s.append(length - window)
    return s


@torch.no_grad()
def predict_array(model, card: ModelCard, pixels: np.ndarray, valid: np.ndarray, overlap: float = 0.5,
                  batch_size: int = 16, device: torch.device | str = "cpu") -> np.ndarray:
    """Calibrated P(mining) for every pixel of ``pixels`` (bands, h, w) by blended sliding windows; (h, w)."""
    window = card.chip_size
    c, h, w = pixels.shape
    ph, pw = max(h, window), max(w, window)
    x = np.zeros((c, ph, pw), np.float32)
    mean = np.asarray(card.band_mean, np.float32)[:, None, None]
    std = np.asarray(card.band_std, np.float32)[:, None, None]
    x[:, :h, :w] = np.where(valid[None], (pixels - mean) / std, 0.0)
    stride = max(1, int(round(window * (1 - overlap))))
    weight = blend_weights(window)
    acc = np.zeros((ph, pw), np.float32)
    wsum = np.zeros((ph, pw), np.float32)
    origins = [(r, q) for r in _starts(ph, window, stride) for q in _starts(pw, window, stride)]
    for i in range(0, len(origins), batch_size):
        batch = origins[i:i + batch_size]
        xb = torch.from_numpy(np.stack([x[:, r:r + window, q:q + window] for r, q in batch])).to(device)
        prob = card.calibrate(forward_logits(model, xb)).float().cpu().numpy()
        for (r, q), p in zip(batch, prob):
            acc[r:r + window, q:q + window] += p * weight
            wsum[r:r + window, q:q + window] += weight
    return (acc / np.maximum(wsum, 1e-12))[:h, :w]


def year_radiometry(source: ImagerySource, years: list[int], ref_year: int | None, windows: int = 25,
                    size: int = 256) -> dict[int, dict]:
    """Per year, a per-band gain and offset that bring its reflectance to ``ref_year``'s (the training year).

    Relative radiometric normalisation on pseudo-invariant pixels: ``windows`` windows spread over the reference
    grid are read in both years; pixels that changed (mines, clouds, shadows, new fields) are dropped as
    outliers of a robust fit, and each band's gain and offset map the rest's quantiles onto the training year's
    (least squares through matched quantiles: unlike a regression of pixel pairs it is not flattened by patchy
    haze or noise in the year being corrected). Haze, another
    sensor calibration or season then look as in the training year. Years without overlap with ``ref_year``,
    or ``ref_year`` absent, are left as they are.
    """
    if ref_year is None or ref_year not in source.years():
        return {}
    ref = source.grid(ref_year)
    n = int(np.ceil(np.sqrt(windows)))
    w, h = min(size, ref.width), min(size, ref.height)
    cols = np.linspace(0, ref.width - w, n).astype(int)
    rows = np.linspace(0, ref.height - h, n).astype(int)
    grids = [ref.window(int(c), int(r), w, h) for r in rows for c in cols]
    ref_px = [source.read(ref_year, g) for g in grids]
    out = {}
    for year in years:
        if year == ref_year:
            continue
        xs, ys = [], []
        for g, (rp, rv) in zip(grids, ref_px):
            px, v = source.read(year, g)
            both = v & rv
            xs.append(px[:, both])
            ys.append(rp[:, both])
        x, y = np.concatenate(xs, 1).astype(np.float64), np.concatenate(ys, 1).astype(np.float64)
        if x.shape[1] < 1000:
            log.warning("radiometry %d: too few pixels shared with %d; left as it is", year, ref_year)
            continue
        keep = np.ones(x.shape[1], bool)
        for _ in range(5):
            # quantiles, unlike moments, are barely moved by patchy haze or by the pixels that changed
            qx, qy = np.percentile(x[:, keep], QUANTILES, axis=1), np.percentile(y[:, keep], QUANTILES, axis=1)
            gain = ((qx - qx.mean(0)) * (qy - qy.mean(0))).sum(0) / np.maximum(((qx - qx.mean(0)) ** 2).sum(0), 1e-9)
            offset = qy.mean(0) - gain * qx.mean(0)
            resid = y - (gain[:, None] * x + offset[:, None])
            med = np.median(resid[:, keep], 1)
            mad = 1.4826 * np.median(np.abs(resid[:, keep] - med[:, None]), 1) + 1e-9
            new_keep = (np.abs(resid - med[:, None]) / mad[:, None] < 3).all(0)
            if new_keep.sum() < 1000 or (new_keep == keep).all():
                break
            keep = new_keep
        out[year] = {"gain": [round(float(v), 6) for v in gain], "offset": [round(float(v), 4) for v in offset],
                     "reference_year": ref_year, "invariant_share": round(float(keep.mean()), 4)}
        log.info("radiometry %d -> %d: gain %s, offset %s", year, ref_year, out[year]["gain"], out[year]["offset"])
    return out


def apply_radiometry(pixels: np.ndarray, radiometry: dict) -> np.ndarray:
    gain = np.asarray(radiometry["gain"], np.float32)[:, None, None]
    offset = np.asarray(radiometry["offset"], np.float32)[:, None, None]
    return pixels * gain + offset


# -- worker state: the model is loaded once per process ----------------------------------------------------
_WORKER: dict = {}


def _init_predict(model_dir: str, imagery: str, bands: list[str] | None, device: str) -> None:
    dev = resolve_device(device)
    model, card = load_model(Path(model_dir), dev)
    _WORKER.update(model=model, card=card, device=dev, source=open_imagery(imagery, bands))


def _predict_unit(unit: tuple[int, Tile, str, float, int, dict | None]) -> tuple[int, str]:
    year, tile, dest, overlap, batch_size, radiometry = unit
    model, card, source = _WORKER["model"], _WORKER["card"], _WORKER["source"]
    parent = source.grid(year)
    halo = card.chip_size // 2
    pixels, valid = source.read(year, tile.grid(parent, halo))
    if radiometry is not None:
        pixels = apply_radiometry(pixels, radiometry)
    prob = predict_array(model, card, pixels, valid, overlap, batch_size, _WORKER["device"])
    inner = (slice(halo, halo + tile.height), slice(halo, halo + tile.width))
    out = quantise(prob[inner])
    out[~valid[inner]] = NODATA
    write_cog(Path(dest), out, tile.grid(parent))
    return year, tile.tile_id


def predict(model_dir: Path, imagery: Path, years: list[int], out_dir: Path, cfg: PredictConfig | None = None,
            bands: list[str] | None = None, workers: int = 1, overwrite: bool = False,
            progress: bool = True) -> list[Path]:
    """Stage ``predict``: probability COGs for every (tile, year) under ``out_dir/<year>/``."""
    cfg = cfg or PredictConfig()
    out_dir = Path(out_dir)
    card = read_card(model_dir)
    source = open_imagery(imagery, bands)
    for year in years:
        check_compatible(card, source, year, where=f"{imagery}: ")
    radiometry = year_radiometry(source, years, card.train_year) if cfg.normalise_years else {}
    if radiometry:
        write_json(out_dir / "radiometry.json", {str(y): r for y, r in radiometry.items()})
    fingerprint = stable_hash([file_sha256(Path(model_dir) / WEIGHTS), radiometry])
    manifest = Manifest(out_dir / "manifest.json")
    units, outputs = [], []
    for year in years:
        for tile in make_tiles(source.grid(year), cfg.tile_size):
            dest = out_dir / str(year) / f"{tile.tile_id}.tif"
            outputs.append(dest)
            key = f"{year}/{tile.tile_id}"
            if not overwrite and manifest.done(key, fingerprint) and dest.is_file():
                continue
            units.append((year, tile, str(dest), cfg.window_overlap, cfg.batch_size, radiometry.get(year)))
    if len(units) < len(outputs):
        log.info("predict: %d of %d units already done", len(outputs) - len(units), len(outputs))
    for year, tile_id in map_units(_predict_unit, units, workers, _init_predict,
                                   (str(model_dir), str(imagery), bands, cfg.device), desc="predict",
                                   progress=progress):
        manifest.mark(f"{year}/{tile_id}", fingerprint)
    _WORKER.clear()
    return outputs
