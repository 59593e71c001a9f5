"""Training chips at the imagery's native resolution, with spatially separated train/val/test splits.

The grid of the training year is cut into square blocks; every block goes wholly to one split, and chips lie
inside one block with a one-pixel margin, so no chip of one split overlaps or touches a chip of another. Chips
intersecting a label are positives; background chips are drawn from the rest. Masks are rasterised from the
polygons on the chip's own grid (no interpolation; holes stay holes); pixels without imagery are 255 (ignored).

Writes, atomically as one folder::

    chips/images/<chip_id>.tif   float32, the source's bands, with band descriptions
    chips/masks/<chip_id>.tif    uint8: 0 background, 1 mining, 255 ignore
    chips/index.parquet          GeoParquet (EPSG:4326): chip_id, split, year, image, mask, block,
                                 positive_fraction, valid_fraction, geometry (the chip's footprint)
    chips/meta.json              bands, CRS, pixel size, ground sample distance, chip size, labels fingerprint
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.features import rasterize
from tqdm.auto import tqdm

from minemap._io import atomic_path, write_json
from minemap.config import ChipConfig
from minemap.errors import InputError
from minemap.geo import WGS84, ground_sample_distance_m
from minemap.imagery import Grid, ImagerySource

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
MARGIN_PX = 1


def labels_fingerprint(labels: gpd.GeoDataFrame) -> str:
    """sha256 of the labels' sorted geometries: identifies the training data in a model card."""
    wkb = sorted(shapely.to_wkb(shapely.normalize(np.asarray(labels.geometry.values)), hex=True))
    return hashlib.sha256("".join(wkb).encode()).hexdigest()


def assign_splits(block_ids: np.ndarray, positive_blocks: set, cfg: ChipConfig) -> dict:
    """Map each block to a split. Blocks with positives are shared out first so that val and test get some."""
    rng = np.random.default_rng(cfg.seed)
    out: dict = {}
    blocks = sorted(set(map(tuple, block_ids)))
    pos = [b for b in blocks if b in positive_blocks]
    neg = [b for b in blocks if b not in positive_blocks]
    rng.shuffle(pos)
    n_val = int(round(cfg.val_fraction * len(pos)))
    n_test = int(round(cfg.test_fraction * len(pos)))
    if len(pos) >= 3:  # each split needs at least one positive block to be of use
        n_val = max(n_val, 1 if cfg.val_fraction > 0 else 0)
        n_test = max(n_test, 1 if cfg.test_fraction > 0 else 0)
    for i, b in enumerate(pos):
        out[b] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    draws = rng.uniform(size=len(neg))
    for b, u in zip(neg, draws):
        out[b] = "val" if u < cfg.val_fraction else "test" if u < cfg.val_fraction + cfg.test_fraction else "train"
    return out


def chip_positions(grid: Grid, cfg: ChipConfig) -> tuple[np.ndarray, np.ndarray]:
    """Top-left (col, row) of every candidate chip, and the (block col, block row) each lies in."""
    chip = cfg.chip_size
    stride = cfg.stride or chip // 2
    block = cfg.block_size or 4 * chip
    if block - 2 * MARGIN_PX < chip:
        raise InputError(f"chips.block_size {block} must exceed chip_size {chip} by {2 * MARGIN_PX} pixels")
    offsets = np.arange(MARGIN_PX, block - MARGIN_PX - chip + 1, stride)
    pos, blk = [], []
    for by in range(0, grid.height, block):
        for bx in range(0, grid.width, block):
            for oy in offsets:
                for ox in offsets:
                    c, r = bx + ox, by + oy
                    if c + chip <= grid.width and r + chip <= grid.height:
                        pos.append((c, r))
                        blk.append((bx // block, by // block))
    return np.array(pos, dtype=np.int64).reshape(-1, 2), np.array(blk, dtype=np.int64).reshape(-1, 2)


def make_chips(labels: gpd.GeoDataFrame, source: ImagerySource, year: int, dest: Path, cfg: ChipConfig,
               labels_path: Path | None = None) -> gpd.GeoDataFrame:
    """Stage ``chips``: cut training chips of ``year`` around ``labels`` into the folder ``dest``."""
    grid = source.grid(year)
    lab = labels.to_crs(grid.crs)
    geoms = np.asarray(lab.geometry.values)
    inside = shapely.intersects(geoms, shapely.box(*grid.bounds))
    where = f"{labels_path}: " if labels_path else ""
    if not inside.any():
        ll = gpd.GeoSeries([shapely.box(*grid.bounds)], crs=grid.crs).to_crs(WGS84).total_bounds.round(4)
        raise InputError(f"{where}none of the {len(geoms)} labels lies within the {year} imagery "
                         f"(lon/lat bounds {ll.tolist()})")
    geoms = geoms[inside]
    chip = cfg.chip_size
    pos, blk = chip_positions(grid, cfg)
    if len(pos) == 0:
        raise InputError(f"the {year} imagery ({grid.width} x {grid.height} px) is smaller than one chip ({chip} px)")
    x0, y0 = grid.transform @ (pos[:, 0], pos[:, 1])
    x1, y1 = grid.transform @ (pos[:, 0] + chip, pos[:, 1] + chip)
    boxes = shapely.box(np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1))
    tree = shapely.STRtree(geoms)
    hit_chip, _ = tree.query(boxes, predicate="intersects")
    positive = np.zeros(len(pos), dtype=bool)
    positive[hit_chip] = True
    splits = assign_splits(blk, {tuple(b) for b in blk[positive]}, cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    neg_idx = np.flatnonzero(~positive)
    n_bg = min(len(neg_idx), int(round(cfg.background_per_positive * positive.sum())))
    chosen = np.sort(np.concatenate([np.flatnonzero(positive), rng.choice(neg_idx, n_bg, replace=False)]))

    rows = []
    with atomic_path(Path(dest)) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        for i in tqdm(chosen, desc=f"chips {year}", unit="chip", leave=False):
            c, r = (int(v) for v in pos[i])
            cgrid = grid.window(c, r, chip, chip)
            pixels, valid = source.read(year, cgrid)
            if valid.mean() < 0.5:
                continue
            near = tree.query(boxes[i], predicate="intersects")
            mask = np.zeros((chip, chip), dtype=np.uint8)
            if len(near):
                mask = rasterize([(g, 1) for g in geoms[near]], out_shape=(chip, chip),
                                 transform=cgrid.transform, dtype=np.uint8)
            mask[~valid] = 255
            chip_id = f"{year}_{c:06d}_{r:06d}"
            _write_chip(tmp / "images" / f"{chip_id}.tif", pixels, cgrid, source.band_names)
            _write_chip(tmp / "masks" / f"{chip_id}.tif", mask[None], cgrid, ["mask"])
            rows.append({
                "chip_id": chip_id, "split": splits[tuple(blk[i])], "year": year,
                "image": f"images/{chip_id}.tif", "mask": f"masks/{chip_id}.tif",
                "block": f"{blk[i][0]}_{blk[i][1]}",
                "positive_fraction": float((mask == 1).mean()), "valid_fraction": float(valid.mean()),
                "geometry": boxes[i],
            })
        if not rows:
            raise InputError(f"no chip of the {year} imagery has enough valid pixels")
        index = gpd.GeoDataFrame(rows, geometry="geometry", crs=grid.crs).to_crs(WGS84)
        index.to_parquet(tmp / "index.parquet")
        write_json(tmp / "meta.json", {
            "year": year, "bands": list(source.band_names), "crs": grid.crs.to_string(),
            "pixel_size": list(grid.res), "gsd_m": ground_sample_distance_m(grid.crs, grid.transform,
                                                                           grid.width, grid.height),
            "chip_size": chip, "labels_fingerprint": labels_fingerprint(labels),
            "counts": {s: int((index.split == s).sum()) for s in SPLITS},
            "positive_counts": {s: int(((index.split == s) & (index.positive_fraction > 0)).sum()) for s in SPLITS},
        })
    log.info("chips: %s", index.split.value_counts().to_dict())
    return index


def _write_chip(path: Path, data: np.ndarray, grid: Grid, names: list[str]) -> None:
    profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=data.shape[0], dtype=data.dtype,
                   crs=grid.crs, transform=grid.transform, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = tuple(names)
