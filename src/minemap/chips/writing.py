"""Writing chips and blocks: masks rasterised on each chip's own grid, images and masks as GeoTIFFs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import rasterio
import shapely
from rasterio.features import rasterize
from tqdm.auto import tqdm

from minemap.config import ChipConfig
from minemap.errors import ImageryError
from minemap.formats.chips import IGNORE
from minemap.geo import units_per_metre
from minemap.imagery import ImagerySource
from minemap.lattice import Grid
from minemap import masks

log = logging.getLogger(__name__)


def chip_mask(cgrid: Grid, labels: np.ndarray, valid: np.ndarray, ignore_border_m: float,
              ignore: np.ndarray | None = None) -> np.ndarray:
    """uint8 mask of a chip: 1 inside ``labels``, 255 along their outlines, over ``ignore`` and without imagery.

    ``labels`` and ``ignore`` are polygons in the chip's CRS that intersect it. The outline band is
    ``ignore_border_m`` wide in ground metres (half inside, half outside), pixel centres inside it are ignored.
    """
    shape = (cgrid.height, cgrid.width)
    mask = np.zeros(shape, dtype=np.uint8)
    if len(labels):
        mask = rasterize([(g, 1) for g in labels], out_shape=shape, transform=cgrid.transform, dtype=np.uint8)
        if ignore_border_m > 0:
            cx, cy = cgrid.transform @ (cgrid.width / 2, cgrid.height / 2)
            half = ignore_border_m / 2 * float(units_per_metre(cgrid.crs, cx, cy)[0])
            band = shapely.buffer(shapely.boundary(shapely.union_all(labels)), half)  # touching labels: one outline
            edge = rasterize([(band, 1)], out_shape=shape, transform=cgrid.transform, dtype=np.uint8)
            mask[edge > 0] = IGNORE
    if ignore is not None and len(ignore):
        off = rasterize([(g, 1) for g in ignore], out_shape=shape, transform=cgrid.transform, dtype=np.uint8)
        mask[(off > 0) & (mask != 1)] = IGNORE
    mask[~valid] = IGNORE
    return mask


class _Outlines:
    """Labels and outlines to ignore, indexed once, for the masks of many chips or blocks (:func:`chip_mask`)."""

    def __init__(self, geoms: np.ndarray, ignore: np.ndarray | None, cfg: ChipConfig) -> None:
        self.geoms, self.ignore, self.band_m = geoms, ignore, cfg.ignore_border_m
        self.tree = shapely.STRtree(geoms)
        self.ignore_tree = shapely.STRtree(ignore) if ignore is not None and len(ignore) else None

    def mask(self, cgrid: Grid, box: shapely.Geometry, valid: np.ndarray) -> np.ndarray:
        near = self.geoms[self.tree.query(box, predicate="intersects")]
        off = self.ignore[self.ignore_tree.query(box, predicate="intersects")] if self.ignore_tree is not None \
            else None
        return chip_mask(cgrid, near, valid, self.band_m, off)


def _write_chip(path: Path, data: np.ndarray, grid: Grid, names: list[str]) -> None:
    """A chip's or block's raster: float32 bands as uint16 where that keeps every value (the digital numbers of
    Planet, Sentinel-2 and most folders: half the bytes, twice as fast to write), deflate at its fastest level."""
    if data.dtype == np.float32 and data.size and data.min() >= 0 and data.max() <= 65535 \
            and np.array_equal(data, np.floor(data)):
        data = data.astype(np.uint16)
    profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=data.shape[0], dtype=data.dtype,
                   crs=grid.crs, transform=grid.transform, compress="deflate", zlevel=1)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = tuple(names)


def _write_chips(tmp: Path, source: ImagerySource, year: int, grid: Grid, pos: np.ndarray, blk: np.ndarray,
                 boxes: np.ndarray, chosen: np.ndarray, kinds: np.ndarray, splits: dict, geoms: np.ndarray,
                 cfg: ChipConfig, ignore: np.ndarray | None = None, desc: str = "chips",
                 progress: bool = True) -> list[dict]:
    """Read, mask and write the ``chosen`` chips into ``tmp/images`` and ``tmp/masks``; their index rows."""
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    (tmp / "masks").mkdir(exist_ok=True)
    outlines = _Outlines(geoms, ignore, cfg)
    chip = cfg.chip_size
    rows = []
    for i, kind in tqdm(list(zip(chosen, kinds)), desc=f"{desc} {year}", unit="chip", leave=False,
                        disable=not progress):
        c, r = (int(v) for v in pos[i])
        cgrid = grid.window(c, r, chip, chip)
        pixels, valid = source.read(year, cgrid)
        if valid.mean() < 0.5:
            continue
        mask = outlines.mask(cgrid, boxes[i], valid)
        chip_id = f"{year}_{c:06d}_{r:06d}" + ("_reviewed" if kind == "reviewed_negative" else "")
        _write_chip(tmp / "images" / f"{chip_id}.tif", pixels, cgrid, source.band_names)
        _write_chip(tmp / "masks" / f"{chip_id}.tif", mask[None], cgrid, ["mask"])
        rows.append({
            "chip_id": chip_id, "split": splits.get(tuple(blk[i]), "train"), "kind": str(kind), "year": year,
            "image": f"images/{chip_id}.tif", "mask": f"masks/{chip_id}.tif",
            "block": f"{blk[i][0]}_{blk[i][1]}", "col": c, "row": r,
            "positive_fraction": float((mask == 1).mean()), "valid_fraction": float(valid.mean()),
            "positive_pixels": int((mask == 1).sum()), "geometry": boxes[i],
        })
    return rows


def _block_window(grid: Grid, bx: int, by: int, block: int, cfg: ChipConfig) -> tuple[Grid, tuple] | None:
    """The raster of block (``bx``, ``by``): its grid (the block and ``cfg.block_halo`` pixels of imagery around
    it, default a quarter chip and at least 32, as far as the grid reaches) and the block's place in it (row,
    column, height, width); None for a block too small to hold a chip."""
    halo = max(32, cfg.chip_size // 4) if cfg.block_halo is None else cfg.block_halo
    c, r = bx * block, by * block
    w, h = min(block, grid.width - c), min(block, grid.height - r)
    if min(w, h) < cfg.chip_size:
        return None
    c0, r0 = max(c - halo, 0), max(r - halo, 0)
    c1, r1 = min(c + w + halo, grid.width), min(r + h + halo, grid.height)
    return grid.window(c0, r0, c1 - c0, r1 - r0), (r - r0, c - c0, h, w)


def _write_block(tmp: Path, name: str, source: ImagerySource, bgrid: Grid, core: tuple, pixels: np.ndarray,
                 valid: np.ndarray, outlines: _Outlines, obscured: bool = False,
                 before: tuple[np.ndarray, np.ndarray] | None = None) -> dict | None:
    """Mask and write one block's raster (see :func:`_write_blocks`) as ``tmp/blocks/<name>``; its row, or None
    where the block is mostly without imagery. ``before``: the labels' year's pixels and valid mask over the
    same grid, for a block of another year (changed ground left out)."""
    r, c, h, w = core
    inside = (slice(r, r + h), slice(c, c + w))
    if valid[inside].mean() < 0.2:
        return None
    if obscured and masks.needed_for(source):
        valid = valid & ~masks.obscured_mask(pixels, valid, source.band_names)
    mask = outlines.mask(bgrid, shapely.box(*bgrid.bounds), valid)
    if before is not None:
        change = masks.changed_since(before[0], pixels, valid & before[1], source.band_names)
        if change is not None:
            lost, gained = change
            mask[((mask == 0) & lost) | ((mask == 1) & gained)] = IGNORE
    keep = np.full(mask.shape, IGNORE, np.uint8)
    keep[inside] = mask[inside]
    _write_chip(tmp / "blocks" / f"{name}.tif", pixels, bgrid, source.band_names)
    _write_chip(tmp / "blocks" / f"{name}_mask.tif", keep[None], bgrid, ["mask"])
    return {"image": f"blocks/{name}.tif", "mask": f"blocks/{name}_mask.tif",
            "positive_pixels": int((keep == 1).sum()), "core_row": r, "core_col": c, "core_height": h,
            "core_width": w}


def _write_blocks(tmp: Path, source: ImagerySource, year: int, grid: Grid, keys: set[tuple[int, int]], block: int,
                  geoms: np.ndarray, cfg: ChipConfig, ignore: np.ndarray | None = None,
                  progress: bool = True) -> dict[tuple[int, int], dict]:
    """Write each block of ``keys`` whole (image and mask, as a chip's) into ``tmp/blocks``, so that training
    draws its windows anywhere inside the training blocks and validates on the validation blocks wall to wall;
    returns their paths, labelled pixels and where the block lies in its raster (``core_row``, ``core_col``,
    ``core_height``, ``core_width``).

    Each raster holds ``cfg.block_halo`` pixels of imagery around its block (:func:`_block_window`), their mask
    255: a training window may reach across the block's edge, so the model sees a field or a pit that the edge
    cuts as a scene shows it (not cut off where a window ends), and a validation block is mapped with the context
    a scene gives it, while no pixel of a neighbouring block, which may be another split's, is ever learnt or
    scored. Blocks too small to hold a chip, or mostly without imagery, are left out."""
    (tmp / "blocks").mkdir(parents=True, exist_ok=True)
    outlines = _Outlines(geoms, ignore, cfg)
    out = {}
    for bx, by in tqdm(sorted(keys), desc=f"blocks {year}", unit="block", leave=False, disable=not progress):
        place = _block_window(grid, bx, by, block, cfg)
        if place is None:
            continue
        bgrid, core = place
        row = _write_block(tmp, f"{year}_{bx:05d}_{by:05d}", source, bgrid, core, *source.read(year, bgrid),
                           outlines)
        if row is not None:
            out[(bx, by)] = row
    return out


def _write_other_years(tmp: Path, source: ImagerySource, since: int, years: list[int], grid: Grid,
                       keys: set[tuple[int, int]], block: int, geoms: np.ndarray, cfg: ChipConfig,
                       ignore: np.ndarray | None = None, progress: bool = True
                       ) -> tuple[dict[int, dict[tuple[int, int], dict]], dict[str, str]]:
    """The blocks of ``keys`` (training and validation) written again from the imagery of each of ``years``, as
    :func:`_write_blocks` writes those of the labels' year ``since``; returns the rows per year and, for a year
    the source has no imagery of (a remote source offers every year, a STAC API may hold no scene), why.

    Block by block, year by year: each block's imagery of the labels' year is read once and dropped before the
    next block, so memory holds one block's years whatever the tile's size. A year whose first read fails is
    left out from then on (its blocks written so far dropped).

    Two things are left out of each block's loss (and score): the year's thin clouds and shadows found in its own
    pixels (:func:`minemap.masks.obscured_mask`, for a source that does not mask clouds itself), as the mapping
    leaves them out: a label drawn on another year's imagery must not teach that a cloud over a mine is a mine;
    and the ground that changed since the labels' year (:func:`minemap.masks.changed_since`), where the labels
    say nothing about this year's ground: vegetation lost outside the labels (a pit that grew, a new one: no
    background to learn) and gained inside them (a pit grown over: no mine)."""
    (tmp / "blocks").mkdir(parents=True, exist_ok=True)
    outlines = _Outlines(geoms, ignore, cfg)
    shown: dict[int, dict[tuple[int, int], dict]] = {y: {} for y in years if y != since}
    unseen: dict[str, str] = {}
    for bx, by in tqdm(sorted(keys), desc=f"blocks of {len(shown)} other years", unit="block", leave=False,
                       disable=not progress or not shown):
        place = _block_window(grid, bx, by, block, cfg)
        if place is None or not shown:
            continue
        bgrid, core = place
        before = None
        for y in list(shown):
            try:
                pixels, valid = source.read(y, bgrid)
            except ImageryError as e:  # no scenes that year: the other years go on
                log.warning("chips.other_years: %s", e)
                unseen[str(y)] = str(e)
                for row in shown.pop(y).values():
                    for f in (row["image"], row["mask"]):
                        (tmp / f).unlink(missing_ok=True)
                continue
            if before is None:
                before = source.read(since, bgrid)
            row = _write_block(tmp, f"{y}_{bx:05d}_{by:05d}", source, bgrid, core, pixels, valid, outlines,
                               obscured=True, before=before)
            if row is not None:
                shown[y][(bx, by)] = row
    return shown, unseen
