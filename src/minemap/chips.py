"""Training chips at the imagery's native resolution, with spatially separated train/val/test splits.

The grid of the training year is cut into square blocks; every block goes wholly to one split, and chips lie
inside one block with a one-pixel margin, so no chip of one split overlaps or touches a chip of another.

- Block size: unless the config fixes it, the largest of 8, 4, 2 and 1.5 chips (or one chip plus its margins)
  that gives at least ``min_positive_blocks`` blocks holding labels, none with more than a quarter of all labelled
  pixels: a district with a dozen mines gets small blocks, a continent large ones.
- Splits: blocks holding labels are shared out to reach the target shares of *labelled pixels* (largest blocks
  first, each to the split furthest below its target), so the train split always gets the largest share.
  The scene's surfaces are balanced too (``balance_cover``): every block's land cover is sampled at low
  resolution and grouped by spectra (k-means); labelled blocks are then moved or swapped between splits while
  that brings each group's shares nearer the targets (labelled-pixel shares kept within a tolerance), and
  blocks without labels go each to the split whose surfaces it brings nearest the targets. A surface that
  only validation holds (a few fields, a sand bar) would be one the model never learns as background, and
  one that fools every epoch after the first on validation.
- Chips intersecting a label are positives; background chips are drawn from the rest of each split's blocks
  (so that validation and test measure false alarms too) so that they cover the scene's variety: candidates
  are grouped by their coarse spectra (k-means) and drawn evenly from each group.
- Masks are rasterised from the polygons on the chip's own grid (no interpolation; holes stay holes). Pixels
  without imagery and a band of ``ignore_border_m`` along label outlines (digitised outlines are metres off)
  are 255 (ignored by the loss).
- Hard negatives (:func:`hard_negative_chips`): after a first fit, chips where the model fires away from the
  labels, placed in the same blocks, so the split guarantee holds for them too.

Writes, atomically as one folder::

    chips/images/<chip_id>.tif   float32, the source's bands, with band descriptions
    chips/masks/<chip_id>.tif    uint8: 0 background, 1 mining, 255 ignore
    chips/index.parquet          GeoParquet (EPSG:4326): chip_id, split, kind (positive, background,
                                 hard_negative), year, image, mask, block, col and row (of the chip's first pixel
                                 in the year's grid), positive_fraction, valid_fraction, geometry (footprint)
    chips/blocks/<year>_<bx>_<by>.tif, ..._mask.tif   every block holding a chip, whole (training draws its
                                 windows anywhere inside the training blocks and validates on the validation
                                 blocks wall to wall)
    chips/blocks.parquet         GeoParquet (the grid's CRS): block column/row, split, labelled pixels, footprint
                                 (evaluation scores the test blocks) and image/mask of every block with chips
    chips/meta.json              bands, CRS, pixel size, ground sample distance, chip and block size, labels
                                 fingerprint, and per split: chips, positive chips, positive pixels, kinds
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from affine import Affine
from rasterio.features import rasterize
from scipy.cluster.vq import kmeans2
from tqdm.auto import tqdm

from minemap._io import atomic_path, write_json
from minemap.config import ChipConfig, HardNegativeConfig
from minemap.errors import InputError
from minemap.formats.chips import IGNORE, MISSED, SPLITS, read_meta, split_summary, write_blocks
from minemap.geo import WGS84, ground_sample_distance_m, units_per_metre
from minemap.imagery import ImagerySource
from minemap.lattice import Grid, neighbours, pixel_boxes
from minemap.formats.rasters import zonal_mean

if TYPE_CHECKING:
    from minemap.review import TrainingVerdicts

log = logging.getLogger(__name__)
MARGIN_PX = 1
MAX_BLOCK_SHARE = 0.25  # an automatic block size keeps any one block below this share of the labelled pixels
REVIEWED_CHIPS = 4  # at most this many chips over one detection a reviewer rejected (a large one)


def labels_fingerprint(labels: gpd.GeoDataFrame) -> str:
    """sha256 of the labels' sorted geometries: identifies the training data in a model card."""
    wkb = sorted(shapely.to_wkb(shapely.normalize(np.asarray(labels.geometry.values)), hex=True))
    return hashlib.sha256("".join(wkb).encode()).hexdigest()


# -- blocks and splits --------------------------------------------------------------------------------------

def block_weights(grid: Grid, geoms: np.ndarray, block: int) -> dict[tuple[int, int], float]:
    """Labelled pixels (label area / pixel area) in each block of ``block`` px that holds any; geoms in grid CRS."""
    nx, ny = -(-grid.width // block), -(-grid.height // block)
    bx, by = np.meshgrid(np.arange(nx), np.arange(ny))
    bx, by = bx.ravel(), by.ravel()
    boxes = pixel_boxes(grid, bx * block, by * block, block, block, clip=True)
    ib, ig = shapely.STRtree(boxes).query(geoms, predicate="intersects")[::-1]
    area = shapely.area(shapely.intersection(boxes[ib], geoms[ig])) / (grid.res[0] * grid.res[1])
    total = np.bincount(ib, weights=area, minlength=len(boxes))
    return {(int(bx[i]), int(by[i])): float(total[i]) for i in np.flatnonzero(total > 0)}


def choose_block_size(grid: Grid, geoms: np.ndarray, cfg: ChipConfig
                      ) -> tuple[int, dict, np.ndarray, np.ndarray]:
    """The configured block size, or the largest candidate with enough labelled blocks; its block weights
    (labelled pixels of the blocks that hold labels and at least one chip) and its candidate chips
    (:func:`chip_positions`)."""
    chip, stride = cfg.chip_size, cfg.stride or cfg.chip_size // 2
    if cfg.block_size:
        sizes = [cfg.block_size]
    else:  # down to blocks of 2 x 2 overlapping chips, then of one chip
        sizes = [8 * chip, 4 * chip, 2 * chip, chip + stride + 2 * MARGIN_PX, chip + 2 * MARGIN_PX]
    weights: dict = {}
    for size in sizes:
        pos, blk = chip_positions(grid, cfg, size)
        with_chips = set(map(tuple, blk))
        weights = {b: w for b, w in block_weights(grid, geoms, size).items() if b in with_chips}
        w = np.array(list(weights.values()))
        if len(w) >= cfg.min_positive_blocks and w.max() <= MAX_BLOCK_SHARE * w.sum():
            break
    return size, weights, pos, blk


def _split_targets(cfg: ChipConfig) -> dict[str, float]:
    return {"train": 1 - cfg.val_fraction - cfg.test_fraction, "val": cfg.val_fraction, "test": cfg.test_fraction}


def assign_splits(weights: dict[tuple[int, int], float], other_blocks: list[tuple[int, int]],
                  cfg: ChipConfig, cover: dict[tuple[int, int], np.ndarray] | None = None
                  ) -> dict[tuple[int, int], str]:
    """Map each block to a split.

    Blocks holding labels (``weights``: labelled pixels per block) are taken largest first, each to the split
    furthest below its target share of labelled pixels; a little seeded noise in the order lets seeds differ
    without moving the shares. The largest block goes to train, so train always gets the largest share.

    ``cover`` (:func:`block_cover`: per block, its sampled pixels in each land-cover group) balances the
    scene's surfaces too: labelled blocks are then moved or swapped between splits while that brings every
    group's shares nearer the targets without taking the labelled-pixel shares further than
    ``COVER_TOLERANCE`` from theirs, and blocks without labels go, in random order, each to the split whose
    surfaces it brings nearest the targets. Without it, blocks without labels go to splits at random in the
    target proportions. A surface that only validation sees is one the model never learnt as background.
    """
    rng = np.random.default_rng(cfg.seed)
    targets = _split_targets(cfg)
    blocks = sorted(weights)
    w = np.array([weights[b] for b in blocks])
    order = np.argsort(-w * np.exp(0.25 * rng.standard_normal(len(w))), kind="stable")
    total = w.sum()
    have = dict.fromkeys(SPLITS, 0.0)
    out: dict[tuple[int, int], str] = {}
    for i in order:
        split = max((s for s in SPLITS if targets[s] > 0 or s == "train"),
                    key=lambda s: (targets[s] * total - have[s], s == "train"))
        out[blocks[i]] = split
        have[split] += w[i]
    draws = rng.uniform(size=len(other_blocks))
    # a split with a target but no labelled block takes train's smallest one (train keeps its largest)
    for split in (x for x in SPLITS if x != "train" and targets[x] > 0):
        if split not in out.values():
            spare = sorted((b for b, v in out.items() if v == "train"), key=lambda b: weights[b])
            if len(spare) > 1:
                out[spare[0]] = split
    if cover:
        _balance_cover(out, weights, cover, targets, rng)
    free = [b for b in sorted(other_blocks) if not cover or b not in cover]
    for b, u in zip(free, draws):
        out[b] = "val" if u < cfg.val_fraction else "test" if u < cfg.val_fraction + cfg.test_fraction else "train"
    if cover:
        _place_by_cover(out, [b for b in sorted(other_blocks) if b in cover], cover, targets, rng)
    return out


COVER_TOLERANCE = 0.03  # cover balancing keeps each split's labelled-pixel share this near its target
MIN_GROUP_SHARE = 0.005  # land-cover groups smaller than this share of the sampled pixels are not balanced


def _cover_shares(cover: dict | None, splits: dict) -> dict[str, list[float]] | None:
    """Per split, its share of each land-cover group's sampled pixels (for meta.json)."""
    if not cover:
        return None
    every = np.stack(list(cover.values())).sum(0)
    out = {}
    for s in SPLITS:
        held = sum((h for b, h in cover.items() if splits.get(b) == s), np.zeros_like(every))
        out[s] = np.round(held / np.maximum(every, 1e-9), 3).tolist()
    return out


def _cover_cost(held: np.ndarray, totals: np.ndarray, t: np.ndarray) -> float:
    """Mean squared gap between each split's share of each land-cover group and its target share."""
    return float((((held / totals) - t[:, None]) ** 2).mean())


def _balance_cover(out: dict, weights: dict, cover: dict, targets: dict, rng: np.random.Generator) -> None:
    """Move or swap labelled blocks between splits (in place) while that lowers the cover cost and keeps the
    labelled-pixel shares within tolerance (train the largest, no split with a target left without a block)."""
    splits = [s for s in SPLITS if targets[s] > 0 or s == "train"]
    t = np.array([targets[s] for s in splits])
    blocks = [b for b in sorted(out) if b in weights and b in cover]
    if len(blocks) < 2:
        return
    w = np.array([weights[b] for b in blocks])
    h = np.stack([cover[b] for b in blocks]).astype(np.float64)
    every = np.stack(list(cover.values())).sum(0)
    groups = h.sum(0) >= MIN_GROUP_SHARE * every.sum()
    if not groups.any():
        return
    h = h[:, groups]
    a = np.array([splits.index(out[b]) for b in blocks])
    S = len(splits)
    # only the labelled blocks' surfaces here: the unlabelled blocks are placed afterwards to fill the gaps
    totals = np.maximum(h.sum(0), 1e-9)
    held = np.zeros((S, h.shape[1]))
    np.add.at(held, a, h)
    pos = np.bincount(a, weights=w, minlength=S) / w.sum()
    count = np.bincount(a, minlength=S)
    room = np.maximum(COVER_TOLERANCE, np.abs(pos - t))  # no labelled-pixel share strays further than this
    cost = _cover_cost(held, totals, t)
    share = w / w.sum()
    for _ in range(20):
        improved = False
        for i in rng.permutation(len(blocks)):
            best = None
            # moves of block i to another split, and swaps with a sample of blocks elsewhere
            for j in [-1, *rng.permutation(len(blocks))[:40]]:
                for s in (range(S) if j < 0 else [a[j]]):
                    if s == a[i]:
                        continue
                    dh = h[i] - (h[j] if j >= 0 else 0)
                    dw = share[i] - (share[j] if j >= 0 else 0)
                    held[a[i]] -= dh
                    held[s] += dh
                    c = _cover_cost(held, totals, t)
                    held[a[i]] += dh
                    held[s] -= dh
                    if c >= cost - 1e-12 or (best is not None and c >= best[0]):
                        continue
                    p2 = pos.copy()
                    p2[a[i]] -= dw
                    p2[s] += dw
                    n2 = count.copy()
                    if j < 0:
                        n2[a[i]] -= 1
                        n2[s] += 1
                    if np.all(np.abs(p2 - t) <= room + 1e-12) and p2[0] >= p2.max() and np.all(n2[t > 0] > 0):
                        best = (c, s, j, dh, p2, n2)
            if best is not None:
                cost, s, j, dh, pos, count = best
                held[a[i]] -= dh
                held[s] += dh
                if j >= 0:
                    a[j] = a[i]
                a[i] = s
                improved = True
        if not improved:
            break
    for b, k in zip(blocks, a):
        out[b] = splits[k]


def _place_by_cover(out: dict, others: list, cover: dict, targets: dict, rng: np.random.Generator) -> None:
    """Send each unlabelled block (in random order) to the split whose land-cover shares it brings nearest the
    targets, counting the blocks already placed (in place)."""
    if not others:
        return
    splits = [s for s in SPLITS if targets[s] > 0 or s == "train"]
    t = np.array([targets[s] for s in splits])
    every = np.stack(list(cover.values())).sum(0).astype(np.float64)
    groups = every >= MIN_GROUP_SHARE * every.sum()
    totals = np.maximum(every[groups], 1e-9)
    held = np.zeros((len(splits), int(groups.sum())))
    for b, s in out.items():
        if b in cover and s in splits:
            held[splits.index(s)] += cover[b][groups]
    for k in rng.permutation(len(others)):
        b = others[k]
        h = cover[b][groups]
        costs = []
        for s in range(len(splits)):
            held[s] += h
            costs.append(_cover_cost(held, totals, t))
            held[s] -= h
        s = int(np.argmin(costs))
        held[s] += h
        out[b] = splits[s]


MAX_COVER_BLOCKS = 4000  # blocks whose land cover is sampled (the labelled ones first)
COVER_SAMPLES = 16  # a block's land cover is read on a COVER_SAMPLES x COVER_SAMPLES grid of pixels


def block_cover(source: ImagerySource, year: int, grid: Grid, blocks: list[tuple[int, int]], block: int,
                groups: int, rng: np.random.Generator, first: list[tuple[int, int]] | None = None
                ) -> dict[tuple[int, int], np.ndarray]:
    """The land cover of each block: how many of its sampled pixels fall in each of ``groups`` groups of
    similar spectra (k-means over the log band values of every block's sample; ``COVER_SAMPLES`` squared
    pixels a block, read at low resolution). ``first`` (the labelled blocks) are always sampled; of the rest, at
    most ``MAX_COVER_BLOCKS`` in all. Blocks with no valid pixel are left out."""
    every = set(blocks)
    first = [b for b in (first or []) if b in every]
    rest = sorted(every - set(first))
    room = max(0, MAX_COVER_BLOCKS - len(first))
    if len(rest) > room:
        rest = [rest[i] for i in np.sort(rng.choice(len(rest), room, replace=False))]
    todo = sorted(first) + rest
    samples, owners, sampled = [], [], []
    for bx, by in todo:
        c0, r0 = bx * block, by * block
        w, h = min(block, grid.width - c0), min(block, grid.height - r0)
        step = max(1, max(w, h) // COVER_SAMPLES)
        nw, nh = max(1, w // step), max(1, h // step)
        g = grid.window(int(c0), int(r0), nw * step, nh * step)
        px, valid = source.read(year, Grid(g.crs, g.transform @ Affine.scale(step), nw, nh))
        v = px[:, valid].T
        if len(v):
            samples.append(np.log1p(np.abs(v.astype(np.float64))))
            owners.append(np.full(len(v), len(owners)))
            sampled.append((bx, by))
    if not samples:
        return {}
    x = np.concatenate(samples)
    owner = np.concatenate(owners)
    k = max(1, int(min(groups, len(np.unique(x.round(4), axis=0)))))
    label = np.zeros(len(x), np.int64)
    if k > 1:
        z = (x - x.mean(0)) / np.maximum(x.std(0), 1e-9)
        with warnings.catch_warnings():  # a group left empty by k-means only means fewer groups
            warnings.simplefilter("ignore")
            _, label = kmeans2(z, k, minit="++", seed=rng, iter=20)
    hist = np.zeros((len(owners), k))
    np.add.at(hist, (owner, label), 1)
    return {b: hist[i] for i, b in enumerate(sampled)}


def chip_positions(grid: Grid, cfg: ChipConfig, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left (col, row) of every candidate chip, and the (block col, block row) each lies in."""
    chip = cfg.chip_size
    # small blocks (few labels) step by a quarter chip: where labels are scarce, more views of each
    stride = cfg.stride or (chip // 2 if block >= 4 * chip else chip // 4)
    if block - 2 * MARGIN_PX < chip:
        raise InputError(f"chips.block_size {block} must exceed chip_size {chip} by {2 * MARGIN_PX} pixels")
    offsets = np.arange(MARGIN_PX, block - MARGIN_PX - chip + 1, stride)
    bx, by = np.meshgrid(np.arange(0, grid.width, block), np.arange(0, grid.height, block))
    ox, oy = np.meshgrid(offsets, offsets)
    c = (bx.ravel()[:, None] + ox.ravel()[None]).ravel()
    r = (by.ravel()[:, None] + oy.ravel()[None]).ravel()
    keep = (c + chip <= grid.width) & (r + chip <= grid.height)
    pos = np.column_stack([c, r])[keep].astype(np.int64)
    return pos, pos // block


def _chip_boxes(grid: Grid, pos: np.ndarray, chip: int) -> np.ndarray:
    return pixel_boxes(grid, pos[:, 0], pos[:, 1], chip, chip)


# -- background chips that cover the scene's variety --------------------------------------------------------

def _coarse_features(source: ImagerySource, year: int, grid: Grid, pos: np.ndarray, chip: int) -> np.ndarray:
    """Per candidate chip: valid share, and per band the mean and spread of a read at 1/16 resolution."""
    step = max(1, chip // 16)
    n = chip // step
    feats = []
    for c, r in pos:
        g = grid.window(int(c), int(r), chip, chip)
        coarse = Grid(g.crs, g.transform @ Affine.scale(step), n, n)
        px, valid = source.read(year, coarse)
        if valid.sum() < 2:
            feats.append([0.0] + [0.0] * (2 * px.shape[0]))
            continue
        v = px[:, valid]
        feats.append([valid.mean(), *np.log1p(np.abs(v.mean(1))), *np.log1p(v.std(1))])
    return np.asarray(feats, dtype=np.float64)


def select_background(source: ImagerySource, year: int, grid: Grid, pos: np.ndarray, candidates: np.ndarray,
                      n: int, cfg: ChipConfig, rng: np.random.Generator) -> np.ndarray:
    """``n`` of the ``candidates`` (indices into ``pos``) drawn evenly from groups of similar coarse spectra."""
    if n <= 0 or len(candidates) == 0:
        return np.zeros(0, np.int64)
    pool = rng.choice(candidates, min(len(candidates), max(10 * n, 200), cfg.max_background_pool), replace=False)
    feats = _coarse_features(source, year, grid, pos[pool], cfg.chip_size)
    ok = feats[:, 0] >= 0.5
    pool, feats = pool[ok], feats[ok, 1:]
    if len(pool) <= n:
        return np.sort(pool)
    k = int(min(cfg.background_groups, n, len(np.unique(feats.round(6), axis=0))))
    if k <= 1:
        return np.sort(rng.choice(pool, n, replace=False))
    z = (feats - feats.mean(0)) / np.maximum(feats.std(0), 1e-9)
    with warnings.catch_warnings():  # a group left empty by k-means only means fewer groups
        warnings.simplefilter("ignore")
        _, group = kmeans2(z, k, minit="++", seed=rng, iter=20)
    # round-robin over the groups, in random order inside each, so rare surfaces get as many chips as common ones
    queues = [list(rng.permutation(pool[group == g])) for g in range(k)]
    queues = [q for q in queues if q]
    chosen: list[int] = []
    while len(chosen) < n:
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop())
    return np.sort(np.asarray(chosen, np.int64))


# -- masks and files ----------------------------------------------------------------------------------------

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
    profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=data.shape[0], dtype=data.dtype,
                   crs=grid.crs, transform=grid.transform, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = tuple(names)


def _write_chips(tmp: Path, source: ImagerySource, year: int, grid: Grid, pos: np.ndarray, blk: np.ndarray,
                 boxes: np.ndarray, chosen: np.ndarray, kinds: np.ndarray, splits: dict, geoms: np.ndarray,
                 cfg: ChipConfig, ignore: np.ndarray | None = None, desc: str = "chips") -> list[dict]:
    """Read, mask and write the ``chosen`` chips into ``tmp/images`` and ``tmp/masks``; their index rows."""
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    (tmp / "masks").mkdir(exist_ok=True)
    outlines = _Outlines(geoms, ignore, cfg)
    chip = cfg.chip_size
    rows = []
    for i, kind in tqdm(list(zip(chosen, kinds)), desc=f"{desc} {year}", unit="chip", leave=False):
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



def _labels_in_grid(labels: gpd.GeoDataFrame, grid: Grid, year: int, labels_path: Path | None) -> np.ndarray:
    geoms = np.asarray(labels.to_crs(grid.crs).geometry.values)
    inside = shapely.intersects(geoms, shapely.box(*grid.bounds))
    if not inside.any():
        where = f"{labels_path}: " if labels_path else ""
        ll = gpd.GeoSeries([shapely.box(*grid.bounds)], crs=grid.crs).to_crs(WGS84).total_bounds.round(4)
        raise InputError(f"{where}none of the {len(geoms)} labels lies within the {year} imagery "
                         f"(lon/lat bounds {ll.tolist()})")
    return geoms[inside]


def make_chips(labels: gpd.GeoDataFrame, source: ImagerySource, year: int, dest: Path, cfg: ChipConfig,
               labels_path: Path | None = None, reviewed: TrainingVerdicts | None = None) -> gpd.GeoDataFrame:
    """Stage ``chips``: cut training chips of ``year`` around ``labels`` into the folder ``dest``.

    ``reviewed``: reviewers' verdicts on ``year`` (minemap.review). Each detection they rejected gets chips over
    it (kind ``reviewed_negative``, up to :data:`REVIEWED_CHIPS` for a large one, even where another chip holds
    the place), taught as background and seen :data:`minemap.train.REVIEWED_REPEAT` times an epoch; the outlines
    they were unsure of are ignored (255) in every chip."""
    where = f"{labels_path}: " if labels_path else ""
    grid = source.grid(year)
    geoms = _labels_in_grid(labels, grid, year, labels_path)
    chip = cfg.chip_size
    block, weights, pos, blk = choose_block_size(grid, geoms, cfg)
    if len(pos) == 0:
        raise InputError(f"the {year} imagery ({grid.width} x {grid.height} px) is smaller than one chip ({chip} px)")
    targets = _split_targets(cfg)
    all_blocks = {tuple(b) for b in map(tuple, blk)}
    cover = block_cover(source, year, grid, sorted(all_blocks), block, cfg.background_groups,
                        np.random.default_rng(cfg.seed + 2), first=sorted(weights)) if cfg.balance_cover else None
    splits = assign_splits(weights, sorted(all_blocks - set(weights)), cfg, cover)
    empty = [x for x in SPLITS if targets[x] > 0 and x not in {splits[b] for b in weights}]
    if empty:
        gsd = ground_sample_distance_m(grid.crs, grid.transform, grid.width, grid.height)
        raise InputError(
            f"{where}the {len(geoms)} labels fall in {len(weights)} block(s) of {block} px ({block * gsd:.0f} m), "
            f"too few to split into train/val/test without overlap (the {', '.join(empty)} split gets none): add "
            "labels over a wider area, use smaller chips (chips.chip_size), or set chips.val_fraction and "
            "chips.test_fraction to 0")
    ground = labelled_ground(all_blocks, set(weights), cfg.background_reach)
    boxes = _chip_boxes(grid, pos, chip)
    hit, _ = shapely.STRtree(geoms).query(boxes, predicate="intersects")
    positive = np.zeros(len(pos), dtype=bool)
    positive[hit] = True
    rng = np.random.default_rng(cfg.seed + 1)
    # background for each split from its own blocks, so that validation and test measure false alarms too
    chip_split = np.array([splits[tuple(b)] for b in blk])
    on_ground = np.array([tuple(b) in ground for b in blk], bool)
    background = [np.zeros(0, np.int64)]
    for s in SPLITS:
        if targets[s] > 0 and cfg.background_per_positive > 0:
            n_bg = max(2, int(round(cfg.background_per_positive * (positive & (chip_split == s)).sum())))
            background.append(select_background(source, year, grid, pos,
                                                np.flatnonzero(~positive & (chip_split == s) & on_ground),
                                                n_bg, cfg, rng))
    background = np.concatenate(background)
    chosen = np.concatenate([np.flatnonzero(positive), background])
    rejected, unsure = (_in_grid(g, grid) for g in ((reviewed.rejected, reviewed.unsure) if reviewed else ([], [])))
    # chips of their own, even where a positive or background chip holds the place: a person's verdict on a place
    # the model got wrong is worth more than one more look at it among the others (training repeats them)
    negative = np.asarray(chips_over(rejected, boxes, per_outline=REVIEWED_CHIPS, edges=True), np.int64)
    chosen = np.concatenate([chosen, negative])
    kinds = np.array(["positive"] * int(positive.sum()) + ["background"] * len(background)
                     + ["reviewed_negative"] * len(negative))

    with atomic_path(Path(dest), kind="chips") as tmp:
        rows = _write_chips(tmp, source, year, grid, pos, blk, boxes, chosen, kinds, splits, geoms, cfg,
                            ignore=unsure)
        rasters = _write_blocks(tmp, source, year, grid, {tuple(b) for b in blk[chosen]}, block, geoms, cfg,
                                ignore=unsure)
        if not rows:
            raise InputError(f"{where}no chip of the {year} imagery under the labels has enough valid pixels")
        index = gpd.GeoDataFrame(rows, geometry="geometry", crs=grid.crs).to_crs(WGS84)
        summary = split_summary(index)
        for s in SPLITS:
            if targets[s] > 0 and summary[s]["positive_pixels"] == 0:
                raise InputError(f"{where}no labelled pixel with imagery falls in the {s} split (labels in "
                                 f"{len(weights)} blocks of {block} px): add labels over a wider area or set "
                                 f"chips.{s}_fraction to 0")
        index.to_parquet(tmp / "index.parquet")
        write_blocks(tmp / "blocks.parquet", splits, weights, grid, block, rasters, ground)
        write_json(tmp / "meta.json", {
            "year": year, "bands": list(source.band_names), "crs": grid.crs.to_string(),
            "pixel_size": list(grid.res), "gsd_m": ground_sample_distance_m(grid.crs, grid.transform,
                                                                           grid.width, grid.height),
            "chip_size": chip, "block_size": block, "block_size_from": "config" if cfg.block_size else "labels",
            "blocks_with_labels": len(weights), "labels_fingerprint": labels_fingerprint(labels),
            "labelled_ground": {"reach_blocks": cfg.background_reach, "blocks": len(ground),
                                "blocks_left_out": len(all_blocks) - len(ground)},
            "ignore_border_m": cfg.ignore_border_m, "splits": summary,
            "land_cover_shares": _cover_shares(cover, splits),
            "review": {"not_mine_outlines": len(rejected), "reviewed_negative_chips": int(len(negative)),
                       "unsure_outlines_ignored": len(unsure)},
        })
    total = sum(v["positive_pixels"] for v in summary.values()) or 1
    log.info("chips: block %d px, %s; positive pixel shares %s", block, {s: v["chips"] for s, v in summary.items()},
             {s: round(v["positive_pixels"] / total, 3) for s, v in summary.items()})
    return index


def labelled_ground(blocks: set[tuple[int, int]], labelled: set[tuple[int, int]], reach: int | None
                    ) -> set[tuple[int, int]]:
    """The blocks within ``reach`` blocks (rows, columns or diagonals) of one holding a label: where the labels
    are taken to be complete, so that unlabelled ground may teach background. Every block where ``reach`` is
    None. Labels from the literature cover some places and not others: a block far from every label may hold a
    mine nobody drew, and taught as background it would teach the model to miss such mines."""
    if reach is None:
        return set(blocks)
    return neighbours(blocks, labelled, reach)



def _write_blocks(tmp: Path, source: ImagerySource, year: int, grid: Grid, keys: set[tuple[int, int]], block: int,
                  geoms: np.ndarray, cfg: ChipConfig, ignore: np.ndarray | None = None) -> dict[tuple[int, int], dict]:
    """Write each block of ``keys`` whole (image and mask, as a chip's) into ``tmp/blocks``, so that training
    draws its windows anywhere inside the training blocks and validates on the validation blocks wall to wall;
    returns their paths and labelled pixels. Blocks too small to hold a chip, or mostly without imagery, are
    left out."""
    (tmp / "blocks").mkdir(parents=True, exist_ok=True)
    outlines = _Outlines(geoms, ignore, cfg)
    out = {}
    for bx, by in tqdm(sorted(keys), desc=f"blocks {year}", unit="block", leave=False):
        c, r = bx * block, by * block
        w, h = min(block, grid.width - c), min(block, grid.height - r)
        if min(w, h) < cfg.chip_size:
            continue
        bgrid = grid.window(c, r, w, h)
        pixels, valid = source.read(year, bgrid)
        if valid.mean() < 0.2:
            continue
        mask = outlines.mask(bgrid, shapely.box(*bgrid.bounds), valid)
        name = f"{year}_{bx:05d}_{by:05d}"
        _write_chip(tmp / "blocks" / f"{name}.tif", pixels, bgrid, source.band_names)
        _write_chip(tmp / "blocks" / f"{name}_mask.tif", mask[None], bgrid, ["mask"])
        out[(bx, by)] = {"image": f"blocks/{name}.tif", "mask": f"blocks/{name}_mask.tif",
                         "positive_pixels": int((mask == 1).sum())}
    return out



def _in_grid(outlines, grid: Grid) -> np.ndarray:
    """EPSG:4326 outlines in the grid's CRS."""
    return np.asarray(gpd.GeoSeries(list(outlines), crs=WGS84).to_crs(grid.crs).values)


def chips_over(outlines: np.ndarray, boxes: np.ndarray, per_outline: int = 1, most: int | None = None,
               edges: bool = False) -> list[int]:
    """Candidate chips (indices into ``boxes``) over ``outlines``, largest outline first: for each, the chip
    holding a point inside it, centred on that point as near as the grid allows (``edges``: where no candidate
    holds the point, between the last candidates of two blocks, the one holding most of the outline), then (up to
    ``per_outline`` chips) the same for what those chips leave of it; at most ``most`` chips in all."""
    chosen: list[int] = []
    if len(outlines) == 0 or len(boxes) == 0 or most == 0:
        return chosen
    centres = shapely.centroid(boxes)
    tree = shapely.STRtree(boxes)
    for outline in outlines[np.argsort(-shapely.area(outlines), kind="stable")]:
        left = outline
        for _ in range(per_outline):
            point = shapely.point_on_surface(left)
            cand = tree.query(point, predicate="within")
            if len(cand):
                best = int(cand[np.argmin(shapely.distance(centres[cand], point))])
            else:
                cand = tree.query(left, predicate="intersects") if edges else cand
                if len(cand) == 0:
                    break
                best = int(cand[np.argmax(shapely.area(shapely.intersection(boxes[cand], left)))])
            if best not in chosen:
                chosen.append(best)
                if most is not None and len(chosen) >= most:
                    return chosen
            left = shapely.difference(left, boxes[best])
            if shapely.is_empty(left) or shapely.area(left) < 1e-3 * shapely.area(outline):
                break
    return chosen


# -- hard negatives -----------------------------------------------------------------------------------------

def hard_negative_chips(detections: gpd.GeoDataFrame, labels: gpd.GeoDataFrame, source: ImagerySource,
                        chips_dir: Path, dest: Path, cfg: ChipConfig, hn: HardNegativeConfig,
                        level: float | None = None, prob_paths: list[Path] | None = None,
                        reviewed: TrainingVerdicts | None = None) -> gpd.GeoDataFrame:
    """Chips where a first model fires away from the labels, written to ``dest`` like a chips folder.

    ``detections``: that model's polygons of the training year (EPSG:4326, column ``mean_probability``), cut at
    the calibrated probability ``level`` (recorded; see ``hn.search_level``).
    A detection counts as a false alarm where it lies further than ``hn.buffer_m`` from every label (outlines
    are metres off and mines grow); its part within that distance is ignored (255), not taught. Labels from the
    literature miss mines, so a detection the model is as sure of as it is of the labelled mines (mean
    probability at least the median of the detections on labels, or ``hn.max_probability`` if lower) is not
    taught as background either: it may be a mine nobody drew. Such detections are written
    to ``dest/possible_missed_mines.parquet``; training ignores their pixels in every chip, background and
    validation chips included, so a missed mine neither teaches the model nor counts against it. At most
    ``hn.per_positive`` x the positive chips are added, largest false alarms first, each placed in the blocks
    of ``chips_dir`` so that splits stay apart.

    ``reviewed``: reviewers' verdicts on the training year (minemap.review). No detection meeting one they
    rejected counts as a possible missed mine, whatever the model's confidence, nor gets a chip here: the
    training chips hold chips of their own over it (see :func:`make_chips`). Outlines they were unsure of are
    ignored in every chip, like possible missed mines.
    """
    meta = read_meta(chips_dir)
    year = int(meta["year"])
    grid = source.grid(year)
    block = int(meta["block_size"])
    blocks = pd.read_parquet(Path(chips_dir) / "blocks.parquet")
    index = gpd.read_parquet(Path(chips_dir) / "index.parquet")
    geoms = _labels_in_grid(labels, grid, year, None)
    lc = shapely.centroid(geoms)
    near = shapely.union_all(shapely.buffer(geoms, hn.buffer_m * units_per_metre(grid.crs, shapely.get_x(lc),
                                                                                 shapely.get_y(lc))))
    dgeoms = np.asarray(detections.to_crs(grid.crs).geometry.values)
    false = shapely.difference(dgeoms, near)
    keep = ~shapely.is_empty(false)
    prob = detections["mean_probability"].to_numpy()
    on_label = np.zeros(len(dgeoms), bool)
    on_label[shapely.STRtree(geoms).query(dgeoms, predicate="intersects")[0]] = True
    sure_level = min(hn.max_probability, float(np.median(prob[on_label]))) if on_label.any() \
        else hn.max_probability
    # a detection that reaches a label is judged on its part away from the labels: the labelled mine's
    # confidence must not vouch for a field that touches it
    judged = prob.copy()
    joined = np.flatnonzero(on_label & keep)
    if prob_paths and len(joined):
        part = zonal_mean(prob_paths, false[joined], grid.crs)
        judged[joined] = np.where(np.isfinite(part), part, prob[joined])
    sure = judged >= sure_level
    rejected = unsure = np.empty(0, dtype=object)
    if reviewed is not None:
        rejected, unsure = _in_grid(reviewed.rejected, grid), _in_grid(reviewed.unsure, grid)
        if len(rejected):  # a reviewer said no: no detection meeting it is a possible missed mine
            sure[shapely.STRtree(dgeoms).query(rejected, predicate="intersects")[1]] = False
    taught = false[keep & ~sure]
    missed_geoms = np.where(on_label, false, dgeoms)[keep & sure]  # a labelled mine is taught as such already
    ignored = np.concatenate([missed_geoms, shapely.intersection(dgeoms[~sure], near), unsure])
    ignored = ignored[~shapely.is_empty(ignored)]
    n_max = int(round(hn.per_positive * (index.kind == "positive").sum()))
    stats = {"detections": int(len(dgeoms)), "false_alarms": int(len(taught)),
             "ignored_as_possible_missed_mines": int((keep & sure).sum()),
             "reviewed_not_mine": int(len(rejected)), "reviewed_unsure": int(len(unsure)), "chips": 0}
    policy = {"buffer_m": hn.buffer_m, "search_level": level, "sure_level": round(sure_level, 4), "rule": (
        f"false alarms are the first model's detections{'' if level is None else f' at probability {level:g}'} further than {hn.buffer_m:g} m from every label and "
        f"less sure than {sure_level:.2f} (the median of its mean probability on labelled mines, capped at "
        f"{hn.max_probability:g}; a detection that reaches a label is judged on its part beyond that distance); "
        f"surer detections away from labels may be mines the labels miss: their pixels are ignored (255) in "
        f"every chip, as is the part of any detection within {hn.buffer_m:g} m of a label")}
    missed = gpd.GeoDataFrame(
        {"mean_probability": np.concatenate([judged[keep & sure], np.full(len(unsure), np.nan)])},
        geometry=np.concatenate([missed_geoms, unsure]), crs=grid.crs).to_crs(WGS84)
    pos, blk = chip_positions(grid, cfg, block)
    boxes = _chip_boxes(grid, pos, cfg.chip_size)
    # largest false alarms first, one chip each; those a reviewer rejected have chips among the training chips
    if len(rejected):
        reviewed_alarm = np.zeros(len(taught), bool)
        reviewed_alarm[shapely.STRtree(taught).query(rejected, predicate="intersects")[1]] = True
        taught = taught[~reviewed_alarm]
    # false alarms are taught only on labelled ground: elsewhere a detection may be a mine nobody drew
    allowed = boxes
    if "labelled_ground" in blocks:
        ground = {(int(r.bx), int(r.by)) for r in blocks.itertuples() if r.labelled_ground}
        allowed = np.where([tuple(b) in ground for b in blk], boxes, None)
    chosen = chips_over(taught, allowed, per_outline=1, most=n_max)
    splits = {(int(r.bx), int(r.by)): r.split for r in blocks.itertuples()}
    with atomic_path(Path(dest), kind="chips") as tmp:
        rows = []
        if chosen:
            sel = np.asarray(chosen, np.int64)
            rows = _write_chips(tmp, source, year, grid, pos, blk, boxes, sel,
                                np.array(["hard_negative"] * len(sel)), splits, geoms, cfg, ignore=ignored,
                                desc="hard negatives")
        hard = gpd.GeoDataFrame(rows, geometry="geometry", crs=grid.crs) if rows else gpd.GeoDataFrame(
            {k: [] for k in index.columns if k != "geometry"}, geometry=[], crs=grid.crs)
        hard = hard.to_crs(WGS84)
        hard.to_parquet(tmp / "index.parquet")
        missed.to_parquet(tmp / MISSED)
        stats["chips"] = int(len(hard))
        write_json(tmp / "meta.json", {**meta, "kind": "hard_negatives", "hard_negatives": {**stats, **policy},
                                       "splits": split_summary(hard)})
    log.info("hard negatives: %s", stats)
    return hard
