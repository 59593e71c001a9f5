"""Prediction: per (tile, year), sliding-window SegFormer inference written as probability COGs.

Inference windows (384 px by default, larger than the training chips) lie on a lattice anchored at the CRS's
origin and overlap a little (32 px by default), blended with linear ramps; a tile runs the windows
of that lattice that overlap it, reading the pixels they cover, so a pixel is blended from the same windows in
every tiling: tiles agree exactly with one pass over their union, and neither windows nor tiles leave
seams. Output per unit::

    probabilities/<year>/<tile_id>.tif   COG, uint8 = round(P(mining) x 250), nodata 255 where no imagery

A manifest (``probabilities/manifest.jsonl``) records finished units with the model's fingerprint, each once its
file is there (a worker's word is not taken for it: on a cluster, a worker may write where the client cannot
see); a rerun skips them unless ``overwrite``. Tiles of another tiling or area are removed before a run, so that
vectorising never mixes two tilings; only files this tool wrote (tile-named, and in the manifest or marked as
probability rasters) are ever removed. Paths sent to workers are absolute, and workers key what they keep
loaded (the model, the normalisations) by path and content, so a model retrained in place is used at once.
Imagery whose bands or ground sample distance differ from the model card's is refused before anything is
written. With ``normalise_years``, each year other than the model's training year is first brought to that
year's reflectance (:mod:`minemap.radiometry`, ``probabilities/radiometry/``).
With ``mask_clouds``, opaque clouds (brighter in every band than anything in the training chips,
:func:`cloud_mask`) are nodata, and so, for sources that do not mask clouds themselves (``masks_clouds``
false: local files, Planet basemaps), are thin clouds and cloud shadows found in each year's own pixels by their
signature (:mod:`minemap.masks`: white and above the clear-sky line, casting a shadow; dimmed alike beside a
cloud). No year is compared with another: land that changed between years, a new mine above all, stays
observed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import rasterio
import shapely
import torch
from scipy.ndimage import binary_dilation

from minemap._io import file_sha256, stable_hash, temporary_of, write_json
from minemap.aoi import aoi_in
from minemap.config import PredictConfig
from minemap.errors import ExecutionError, ImageryError, ModelError
from minemap.execution import map_units
from minemap.geo import ground_sample_distance_m
from minemap.grid import TILE_FILE, Tile, make_tiles
from minemap.lattice import pixel_offset, window_origins
from minemap.imagery import ImagerySource, Resampled, describe, open_imagery
from minemap.manifest import Manifest
from minemap.masks import CONTEXT_PX, needed_for, obscured_mask
from minemap import radiometry as rad
from minemap.formats.rasters import NODATA, quantise, write_cog
from minemap.model import ModelCard, forward_logits, load_model, read_card, resolve_device, resolve_precision
from minemap.formats.run import CARD, WEIGHTS

log = logging.getLogger(__name__)
GSD_TOLERANCE = 0.25
DEFAULT_WINDOW = 384  # inference window side when not set: larger than the training chips, so fewer windows
# overlap, and on CPU mit-b0 runs about 1.2 x faster per pixel at 384 px than at 256 px (768 px and more: slower)
DEFAULT_OVERLAP = 32  # pixels shared by neighbouring windows, blended with linear ramps
EMPTY = ":no-imagery"  # appended to a unit's fingerprint in the manifest: done, and nothing to write
PROBABILITY_BAND = "P(mining) x 250"  # the band description :func:`minemap.formats.rasters.write_cog` gives a tile
MAX_STATES = 2  # models (with their sources) kept loaded per process: workers outlive runs
MASKS = "signature-masks-1"  # the method of the thin cloud and shadow masks, in the fingerprints of units using it


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
                           f"trained at {card.gsd_m:.2f} m (more than {GSD_TOLERANCE:.0%} apart; set "
                           f"predict.resample = true to read it at the model's pixel size)")


def blend_weights(size: int, ramp: int | None = None) -> np.ndarray:
    """2-D blending weight of a window: 1 in the middle, falling linearly over ``ramp`` pixels to each edge (the
    overlap of neighbouring windows), so a pixel near one window's edge is taken mostly from its neighbour, whose
    middle it lies in. Weights of overlapping windows sum to one where their ramps meet; blending divides by the
    sum anyway. ``ramp`` None: half the window (a tent)."""
    ramp = max(1, size // 2 if ramp is None else ramp)
    i = np.arange(size) + 0.5
    w = np.minimum(1.0, np.minimum(i, size - i) / ramp)
    return np.outer(w, w).astype(np.float32)


def window_layout(card: ModelCard, cfg: PredictConfig) -> tuple[int, int]:
    """(window side, stride) of inference: ``cfg.window_size`` or the default, at least the training chip."""
    window = max(cfg.window_size or DEFAULT_WINDOW, card.chip_size)
    overlap = DEFAULT_OVERLAP if cfg.window_overlap is None else int(round(window * cfg.window_overlap))
    return window, max(1, window - overlap)


@torch.no_grad()
def window_probability(model, card: ModelCard, xb: torch.Tensor, tta: bool = False,
                       precision: torch.dtype | None = None) -> torch.Tensor:
    """Calibrated P(mining) of a batch of normalised windows (B, C, H, W) -> (B, H, W); with ``tta`` the mean
    over the four flips of each window (test-time augmentation, four times the work); ``precision`` as in
    :func:`minemap.model.forward_logits`."""
    probs = [card.calibrate(forward_logits(model, xb, precision))]
    if tta:
        for dims in ((-1,), (-2,), (-2, -1)):  # (B, C, H, W) in, (B, H, W) out: the last two are H and W in both
            probs.append(card.calibrate(forward_logits(model, xb.flip(dims), precision)).flip(dims))
    return sum(probs) / len(probs)


def predict_array(model, card: ModelCard, pixels: np.ndarray, valid: np.ndarray, overlap: float = 0.5,
                  batch_size: int = 16, device: torch.device | str = "cpu", tta: bool = False,
                  window: int | None = None, precision: torch.dtype | None = None) -> np.ndarray:
    """Calibrated P(mining) for every pixel of ``pixels`` (bands, h, w) by blended sliding windows of ``window``
    pixels (default the training chip) overlapping by ``overlap`` of a window; (h, w)."""
    window = window or card.chip_size
    stride = max(1, window - int(round(window * overlap)))
    _, h, w = pixels.shape
    rows, cols = window_origins(0, h, window, stride), window_origins(0, w, window, stride)
    return _blend_clipped(model, card, pixels, valid, rows, cols, window, stride, batch_size, device, tta, precision)


def _blend_clipped(model, card, pixels, valid, rows, cols, window, stride, batch_size, device, tta,
                   precision=None) -> np.ndarray:
    """``blend_windows`` over an array whose windows may reach past its edges (padded with no data)."""
    c, h, w = pixels.shape
    r0, c0 = rows[0], cols[0]
    ph, pw = rows[-1] + window - r0, cols[-1] + window - c0
    x = np.zeros((c, ph, pw), np.float32)
    v = np.zeros((ph, pw), bool)
    x[:, -r0:-r0 + h, -c0:-c0 + w] = pixels
    v[-r0:-r0 + h, -c0:-c0 + w] = valid
    out = blend_windows(model, card, x, v, [r - r0 for r in rows], [q - c0 for q in cols], window, window - stride,
                        batch_size, device, tta, precision)
    return out[-r0:-r0 + h, -c0:-c0 + w]


def blend_windows(model, card: ModelCard, pixels: np.ndarray, valid: np.ndarray, rows: list[int], cols: list[int],
                  window: int, ramp: int, batch_size: int = 16, device: torch.device | str = "cpu",
                  tta: bool = False, precision: torch.dtype | None = None) -> np.ndarray:
    """Calibrated P(mining) over ``pixels`` (bands, h, w) from the windows at ``rows`` x ``cols`` (origins in the
    array, each window inside it), blended with :func:`blend_weights`; pixels under no window are 0."""
    c, h, w = pixels.shape
    mean = np.asarray(card.band_mean, np.float32)[:, None, None]
    std = np.asarray(card.band_std, np.float32)[:, None, None]
    x = pixels.astype(np.float32, copy=True)  # normalised in place: one copy of a large read, not three
    x -= mean
    x /= std
    np.copyto(x, 0.0, where=~valid[None])  # no data is 0 after normalising, whatever the source filled it with
    weight = blend_weights(window, ramp if ramp > 0 else None)
    acc = np.zeros((h, w), np.float32)
    wsum = np.zeros((h, w), np.float32)
    # windows over no imagery at all (past the imagery's edge, over a nodata gap) are not run: they would only
    # blend into pixels that are nodata anyway
    origins = [(r, q) for r in rows for q in cols if valid[r:r + window, q:q + window].any()]
    for i in range(0, len(origins), batch_size):
        batch = origins[i:i + batch_size]
        xb = torch.from_numpy(np.stack([x[:, r:r + window, q:q + window] for r, q in batch])).to(device)
        prob = window_probability(model, card, xb, tta, precision).float().cpu().numpy()
        for (r, q), p in zip(batch, prob):
            acc[r:r + window, q:q + window] += p * weight
            wsum[r:r + window, q:q + window] += weight
    return acc / np.maximum(wsum, 1e-12)


def cloud_mask(pixels: np.ndarray, card: ModelCard, grow_px: int = 2) -> np.ndarray:
    """Pixels brighter in every band than anything in the training chips (``card.cloud_level``): opaque cloud,
    grown by ``grow_px`` to take in its soft edge. No observation of the ground, so nodata, not 'no mine'."""
    if not card.cloud_level:
        return np.zeros(pixels.shape[1:], bool)
    cloud = (pixels >= np.asarray(card.cloud_level, np.float32)[:, None, None]).all(0)
    return binary_dilation(cloud, iterations=grow_px) if cloud.any() and grow_px else cloud


# -- worker state: a model is loaded once per process and content ----------------------------------------
class _Context(NamedTuple):
    """What a unit needs loaded on its worker: the model (absolute path and content fingerprint) and the source.

    Workers outlive runs, so what they keep is keyed by the model's content, not its path: a model retrained
    into the same folder, or its card edited, is another context and is loaded afresh."""
    model_dir: str
    model_fp: str
    imagery: Any
    bands: list[str] | None
    device: str
    factor: float | None

    @property
    def key(self) -> str:
        return stable_hash([self.model_dir, self.model_fp, repr(self.imagery), self.bands, self.device, self.factor])


_STATES: OrderedDict[str, dict] = OrderedDict()
_STATES_LOCK = threading.Lock()


def model_fingerprint(model_dir: Path | str) -> str:
    """The content of a model directory: its weights and its card (calibration, cloud level, bands)."""
    model_dir = Path(model_dir)
    try:
        return stable_hash([file_sha256(model_dir / WEIGHTS), file_sha256(model_dir / CARD)])
    except FileNotFoundError:
        raise ModelError(f"{model_dir}: model not found on this machine (workers must see it at the same "
                         "path, e.g. on shared storage)") from None


def _model_stat(model_dir: Path) -> list:
    return [(s.st_ino, s.st_size, s.st_mtime_ns) for s in ((model_dir / f).stat() for f in (WEIGHTS, CARD))]


def _load_state(ctx: _Context) -> dict:
    """The model and source of ``ctx``, loaded; the model's files must still be the ones the run fingerprinted
    (its manifest records that fingerprint as what the tiles were made by)."""
    model_dir = Path(ctx.model_dir)
    changed = ModelError(f"{model_dir}: the model changed while this prediction ran (its files differ from "
                         "those it started with); run predict again")
    if model_fingerprint(model_dir) != ctx.model_fp:
        raise changed
    before = _model_stat(model_dir)
    dev = resolve_device(ctx.device)
    model, card = load_model(model_dir, dev)
    if _model_stat(model_dir) != before:  # replaced while it was read
        raise changed
    source = open_imagery(ctx.imagery, ctx.bands, resampling="bilinear" if ctx.factor else "nearest")
    return dict(model_dir=ctx.model_dir, model_fp=ctx.model_fp, model=model, card=card, device=dev,
                source=Resampled(source, ctx.factor) if ctx.factor else source)


def _state(ctx: _Context) -> dict:
    """The loaded state of ``ctx`` in this process, loading it once (threads of a worker wait for one load).
    A state of an older content of the same model is dropped; at most :data:`MAX_STATES` are kept."""
    key = ctx.key
    state = _STATES.get(key)
    if state is not None:
        return state
    with _STATES_LOCK:
        state = _STATES.get(key)
        if state is None:
            state = _load_state(ctx)
            for k, v in list(_STATES.items()):  # an older content of that model: never used again
                if v["model_dir"] == ctx.model_dir and v["model_fp"] != ctx.model_fp:
                    del _STATES[k]
            _STATES[key] = state
            while len(_STATES) > MAX_STATES:
                _STATES.popitem(last=False)
        return state


def open_for_model(imagery, bands: list[str] | None, card: ModelCard, resample: bool = False, where: str = "",
                   years: list[int] | None = None) -> tuple[ImagerySource, float | None, list[str] | None]:
    """The source as the model needs it, the resampling factor applied (None: none) and the bands asked of it.

    A remote source whose bands include the model's, under their names, gives those, in the model's order. Imagery
    at another ground sample distance than the model's is refused unless ``resample``, then read onto a grid of
    the model's pixel size (bilinear)."""
    source = open_imagery(imagery, bands)
    remote = getattr(imagery, "source", "local") != "local"
    if remote and bands is None and list(source.band_names) != list(card.bands) \
            and set(card.bands) <= set(source.band_names):
        bands = list(card.bands)
        source = open_imagery(imagery, bands)
    years = [y for y in (years or source.years()) if y in source.years()]
    if not resample or not years:
        return source, None, bands
    g = source.grid(years[0])
    gsd = ground_sample_distance_m(g.crs, g.transform, g.width, g.height)
    if abs(gsd - card.gsd_m) <= 0.02 * card.gsd_m:
        return source, None, bands
    factor = card.gsd_m / gsd
    log.info("%simagery at %.2f m is resampled to the model's %.2f m", where, gsd, card.gsd_m)
    return Resampled(open_imagery(imagery, bands, resampling="bilinear"), factor), factor, bands


def _init_predict(ctx: _Context) -> None:
    _state(ctx)  # load the model before the first unit (units load it themselves where it is not loaded)


def _predict_unit(unit: tuple[int, Tile, str, PredictConfig, tuple[str, str] | None, _Context]
                  ) -> tuple[int, str, bool]:
    """One (tile, year): ``dest`` written (True), or removed where the tile has no imagery (False).
    ``radiometry``: (path, content key) of the year's normalisation, or None."""
    year, tile, dest, cfg, radiometry, ctx = unit
    state = _state(ctx)
    model, card, source, device = state["model"], state["card"], state["source"], state["device"]
    parent = source.grid(year)
    window, stride = window_layout(card, cfg)
    # the windows of the global lattice over the tile, and the pixels they cover (read with no data past the
    # imagery's edge): whatever the tiling, a pixel is blended from the same windows
    gx, gy = pixel_offset(parent)
    rows = window_origins(gy + tile.row_off, tile.height, window, stride)
    cols = window_origins(gx + tile.col_off, tile.width, window, stride)
    r0, c0 = rows[0] - gy, cols[0] - gx  # the read region's origin in the parent grid
    h, w = rows[-1] + window - rows[0], cols[-1] + window - cols[0]
    # clouds and shadows found by their signature are judged with CONTEXT_PX of ground around the windows: an
    # object cut by the region's edge, its shadow's ground out of sight, would be judged on half of itself
    m = CONTEXT_PX if cfg.mask_clouds and needed_for(source) else 0
    pixels, valid = source.read(year, parent.window(c0 - m, r0 - m, w + 2 * m, h + 2 * m))
    inner = (slice(tile.row_off - r0 + m, tile.row_off - r0 + m + tile.height),
             slice(tile.col_off - c0 + m, tile.col_off - c0 + m + tile.width))
    if not valid[inner].any():  # no imagery over the tile: nothing to write or vectorise
        Path(dest).unlink(missing_ok=True)
        return year, tile.tile_id, False
    if radiometry is not None:
        pixels = rad.apply(pixels, rad.load_cached(*radiometry), c0 - m, r0 - m)
    if m:  # thin clouds and shadows, by their own signature (opaque ones too: they show where shadows lie)
        obscured = obscured_mask(pixels, valid, card.bands)[m:m + h, m:m + w]
        pixels, valid = pixels[:, m:m + h, m:m + w], valid[m:m + h, m:m + w]
        inner = tuple(slice(sl.start - m, sl.stop - m) for sl in inner)
    if cfg.mask_clouds:  # after normalising: the cloud level is in the training year's units
        hidden = cloud_mask(pixels, card)
        if m:
            hidden |= obscured
        valid &= ~hidden
    batch = max(1, cfg.batch_size * card.chip_size ** 2 // window ** 2)  # batch_size counts training chips
    prob = blend_windows(model, card, pixels, valid, [r - rows[0] for r in rows], [q - cols[0] for q in cols],
                         window, window - stride, batch, device, cfg.tta, resolve_precision(cfg.precision, device))
    out = quantise(prob[inner])
    out[~valid[inner]] = NODATA
    write_cog(Path(dest), out, tile.grid(parent))
    return year, tile.tile_id, True


def predict(model_dir: Path, imagery, years: list[int], out_dir: Path, cfg: PredictConfig | None = None,
            bands: list[str] | None = None, workers: int = 1, overwrite: bool = False,
            progress: bool = True, aoi: shapely.Geometry | None = None, scheduler: str | None = None) -> list[Path]:
    """Stage ``predict``: probability COGs for every (tile, year) under ``out_dir/<year>/``. ``imagery``: a
    source description (see :func:`minemap.imagery.open_imagery`) or a local path. ``aoi`` (EPSG:4326, see
    :mod:`minemap.aoi`): only the tiles of the global grid that touch it. ``workers`` local processes or a Dask
    ``scheduler`` address run the units (see :mod:`minemap.execution`). Tiles with no valid imagery are
    skipped (no file); ``out_dir/tiles.json`` counts, per year, the tiles in the area, predicted and skipped.
    Returns the probability COGs written or already there.

    Paths may be relative to this process's folder: they are made absolute here, before any unit is built,
    since workers run in folders of their own (on other machines too), where a relative path names another
    place or none."""
    cfg = cfg or PredictConfig()
    where = f"{describe(imagery)}: "
    model_dir, out_dir, imagery = absolute_path(model_dir), absolute_path(out_dir), absolute_imagery(imagery)
    card = read_card(model_dir)
    load_model(model_dir, "cpu")  # corrupt or mismatched weights: one error here, before any unit is sent anywhere
    source, factor, bands = open_for_model(imagery, bands, card, cfg.resample, where, years)
    for year in years:
        check_compatible(card, source, year, where=where)
    write_json(out_dir / "imagery.json", {
        "source": imagery.model_dump(mode="json") if hasattr(imagery, "model_dump") else {"path": str(imagery)},
        "bands": list(source.band_names),
        "resampled": None if factor is None else {"factor": factor, "to_gsd_m": card.gsd_m, "method": "bilinear"}})
    radiometry = {}
    if cfg.normalise_years != "off" and card.train_year not in source.years():
        log.warning("%sno imagery of the model's training year %s: years are not normalised to it", where,
                    card.train_year)
    fitted = rad.year_radiometry(source, years, card.train_year, cfg.normalise_years)
    for year, r in fitted.items():  # sent with its content key: a worker's cache tells a rewritten file apart
        radiometry[year] = (str(rad.save(r, out_dir / "radiometry" / f"{year}.npz")), rad.content_key(r))
    if fitted:
        write_json(out_dir / "radiometry.json", {str(y): rad.summary(r) for y, r in fitted.items()})
    # a unit is done when made by these weights and card (calibration, cloud level), settings and radiometry
    weights_sha, card_sha = file_sha256(model_dir / WEIGHTS), file_sha256(model_dir / CARD)
    ctx = _Context(str(model_dir), stable_hash([weights_sha, card_sha]), imagery, bands, cfg.device, factor)
    model_key = [weights_sha, card_sha, factor,
                 window_layout(card, cfg),  # the layout in effect (defaults included), not the raw settings
                 cfg.tta, cfg.precision, cfg.mask_clouds, {y: rad.content_key(r) for y, r in fitted.items()}]
    def grid_key(g) -> list:  # tiles are named by position: a new grid or tile size is another tiling
        return [g.crs.to_wkt(), list(g.transform)[:6], g.width, g.height, cfg.tile_size]

    masks = MASKS if cfg.mask_clouds and needed_for(source) else None
    fingerprints = {y: stable_hash([model_key, source.fingerprint(y), grid_key(source.grid(y)), masks])
                    for y in years}
    manifest = Manifest(out_dir / "manifest.jsonl")
    units, outputs, counts, foreign = [], {}, {}, []
    for year in years:
        grid = source.grid(year)
        area = None
        if aoi is not None:
            area = aoi_in(aoi, grid.crs, grid.bounds)
            if area is None:
                log.warning("%sthe area of interest misses the imagery of %s", where, year)
        tiles = make_tiles(grid, cfg.tile_size, area) if aoi is None or area is not None else []
        counts[year] = {"tiles": len(tiles), "predicted": 0, "no_imagery": 0}
        names = {f"{t.tile_id}.tif" for t in tiles}
        folder = out_dir / str(year)
        for stale in (sorted(folder.glob("*.tif")) if folder.is_dir() else []):
            if stale.name in names:
                continue
            if _written_here(stale, year, manifest):  # a tile of another tiling or area: vectorised with these
                stale.unlink(missing_ok=True)
            else:  # never delete what this tool did not write (imagery, a user's rasters)
                foreign.append(stale)
        for tile in tiles:
            dest = out_dir / str(year) / f"{tile.tile_id}.tif"
            key = f"{year}/{tile.tile_id}"
            if not overwrite and manifest.done(key, fingerprints[year]) and dest.is_file():
                outputs[key] = dest
                counts[year]["predicted"] += 1
            elif not overwrite and manifest.done(key, fingerprints[year] + EMPTY):
                counts[year]["no_imagery"] += 1
            else:
                units.append((year, tile, str(dest), cfg, radiometry.get(year), ctx))
    if foreign:
        log.warning("%s: %d file(s) not written by minemap left as they are (%s%s); vectorize reads every .tif "
                    "of a year's folder: keep other rasters out of the probabilities' folders", out_dir,
                    len(foreign), ", ".join(str(p.relative_to(out_dir)) for p in foreign[:3]),
                    ", ..." if len(foreign) > 3 else "")
    if aoi is not None and not any(c["tiles"] for c in counts.values()):
        raise ImageryError(f"{where}the area of interest {_describe_area(aoi)} misses the imagery of every year "
                           f"({', '.join(map(str, years))})")
    total = sum(c["tiles"] for c in counts.values())
    if units and len(units) < total:
        log.info("predict: %d of %d units already done", total - len(units), total)
    km2 = {y: ground_sample_distance_m(g.crs, g.transform, g.width, g.height) ** 2 / 1e6
           for y, g in ((y, source.grid(y)) for y in years)}
    sizes = [u[1].width * u[1].height * km2[u[0]] for u in units]
    pending = {f"{u[0]}/{u[1].tile_id}": u for u in units}
    try:
        for year, tile_id, wrote in map_units(_predict_unit, units, workers, _init_predict, (ctx,),
                                              desc="predict", progress=progress, scheduler=scheduler, sizes=sizes,
                                              size_unit="km²"):
            key = f"{year}/{tile_id}"
            unit = pending.pop(key, None)
            if unit is None:
                raise ExecutionError(f"unit {key}: a result this run did not ask for, or got twice (is another "
                                     "run sharing its task names?)")
            if wrote:  # recorded done only once its file is where this run reads it from
                outputs[key] = _check_written(key, Path(unit[2]), unit[1])
            manifest.mark(key, fingerprints[year] + ("" if wrote else EMPTY))
            counts[year]["predicted" if wrote else "no_imagery"] += 1
    finally:
        _STATES.pop(ctx.key, None)  # loaded here by a serial run: not kept past it
    if pending:
        raise ExecutionError(f"unit {next(iter(pending))}: no result came back ({len(pending)} unit(s) missing)")
    write_json(out_dir / "tiles.json", {str(y): c for y, c in counts.items()})
    for y, c in counts.items():
        if c["no_imagery"]:
            log.info("predict %s: %d of %d tiles have no valid imagery, skipped", y, c["no_imagery"], c["tiles"])
    return sorted(outputs.values())


def absolute_path(path: Path | str) -> Path:
    """``path`` made absolute against this process's folder, ``~`` and ``..`` folded; symlinks are kept (the
    name a shared mount has is the one other machines know)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def absolute_imagery(imagery):
    """An imagery description whose paths (a local folder, a cache folder) are absolute: it travels to workers
    that run in other folders. A bare path becomes an absolute :class:`~pathlib.Path`."""
    if isinstance(imagery, (str, Path)):
        return absolute_path(imagery)
    update = {k: absolute_path(getattr(imagery, k)) for k in ("path", "cache_dir")
              if getattr(imagery, k, None) is not None}
    return imagery.model_copy(update=update) if update and hasattr(imagery, "model_copy") else imagery


def _written_here(path: Path, year: int, manifest: Manifest) -> bool:
    """Whether ``path`` in a year's folder is a file this tool wrote: named like a tile and recorded in the
    manifest, or named like a tile and marked as a probability raster (a unit killed before it was recorded),
    or the temporary file of a write killed half-way. Nothing else is ever deleted."""
    of = temporary_of(path.name)  # a tile's write killed half-way
    if of is not None:
        return bool(TILE_FILE.fullmatch(of))
    if not TILE_FILE.fullmatch(path.name):
        return False
    if f"{year}/{path.stem}" in manifest:
        return True
    try:
        with rasterio.open(path) as src:
            return (src.count == 1 and src.dtypes[0] == "uint8" and src.nodata == NODATA
                    and src.descriptions[0] == PROBABILITY_BAND)
    except rasterio.errors.RasterioError:
        return False


def _check_written(key: str, dest: Path, tile: Tile) -> Path:
    """``dest``, which a worker reported written for unit ``key``; :class:`ExecutionError` unless it is there, opens
    and has the tile's size (a worker on another machine, or in another folder, may write where this process
    does not read)."""
    if not dest.is_file():
        raise ExecutionError(f"unit {key}: its worker reported {dest} written, but it is not there (workers must "
                             "write to the same folder: on other machines, shared storage at the same path)")
    try:
        with rasterio.open(dest) as src:
            size = (src.width, src.height)
    except rasterio.errors.RasterioError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExecutionError(f"unit {key}: {dest} cannot be read ({msg})") from None
    if size != (tile.width, tile.height):
        raise ExecutionError(f"unit {key}: {dest} is {size[0]} x {size[1]} px, the tile {tile.width} x "
                             f"{tile.height}")
    return dest


def _describe_area(aoi: shapely.Geometry) -> str:
    w, s, e, n = aoi.bounds
    return f"({w:.3f}, {s:.3f}, {e:.3f}, {n:.3f})"
