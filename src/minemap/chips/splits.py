"""Blocks and splits: the block size chosen from the labels, blocks shared out to train, validation and test by
labelled pixels and land cover, the labelled ground, and where chips lie inside blocks."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
from affine import Affine
from scipy.cluster.vq import kmeans2

from minemap.config import ChipConfig
from minemap.errors import InputError
from minemap.formats.chips import SPLITS
from minemap.geo import WGS84
from minemap.imagery import ImagerySource
from minemap.lattice import Grid, neighbours, pixel_boxes

log = logging.getLogger(__name__)


MARGIN_PX = 1


MAX_BLOCK_SHARE = 0.25  # an automatic block size keeps any one block below this share of the labelled pixels


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


def block_sizes(cfg: ChipConfig, largest: int = 8) -> list[int]:
    """The block sizes to try, largest first: the configured one, else ``largest`` chips and halvings down to
    2 x 2 overlapping chips, then one chip (each with its margins)."""
    chip, stride = cfg.chip_size, cfg.stride or cfg.chip_size // 2
    if cfg.block_size:
        return [cfg.block_size]
    sizes, n = [], largest
    while n >= 2:
        sizes.append(n * chip)
        n //= 2
    return sizes + [chip + stride + 2 * MARGIN_PX, chip + 2 * MARGIN_PX]


def enough_blocks(w: np.ndarray, cfg: ChipConfig) -> bool:
    """Whether blocks holding ``w`` labelled pixels each can be split: at least ``min_positive_blocks`` of them,
    none with more than :data:`MAX_BLOCK_SHARE` of all."""
    return len(w) >= cfg.min_positive_blocks and w.max() <= MAX_BLOCK_SHARE * w.sum()


def choose_block_size(grid: Grid, geoms: np.ndarray, cfg: ChipConfig
                      ) -> tuple[int, dict, np.ndarray, np.ndarray]:
    """The configured block size, or the largest candidate (:func:`block_sizes`) with enough labelled blocks
    (:func:`enough_blocks`); its block weights (labelled pixels of the blocks that hold labels and at least one
    chip) and its candidate chips (:func:`chip_positions`)."""
    weights: dict = {}
    for size in block_sizes(cfg):
        pos, blk = chip_positions(grid, cfg, size)
        with_chips = set(map(tuple, blk))
        weights = {b: w for b, w in block_weights(grid, geoms, size).items() if b in with_chips}
        if enough_blocks(np.array(list(weights.values())), cfg):
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


def labelled_ground(blocks: set[tuple[int, int]], labelled: set[tuple[int, int]], reach: int | None
                    ) -> set[tuple[int, int]]:
    """The blocks within ``reach`` blocks (rows, columns or diagonals) of one holding a label: where the labels
    are taken to be complete, so that unlabelled ground may teach background. Every block where ``reach`` is
    None. Labels from the literature cover some places and not others: a block far from every label may hold a
    mine nobody drew, and taught as background it would teach the model to miss such mines."""
    if reach is None:
        return set(blocks)
    return neighbours(blocks, labelled, reach)


def _labels_in_grid(labels: gpd.GeoDataFrame, grid: Grid, year: int, labels_path: Path | None) -> np.ndarray:
    geoms = np.asarray(labels.to_crs(grid.crs).geometry.values)
    inside = shapely.intersects(geoms, shapely.box(*grid.bounds))
    if not inside.any():
        where = f"{labels_path}: " if labels_path else ""
        ll = gpd.GeoSeries([shapely.box(*grid.bounds)], crs=grid.crs).to_crs(WGS84).total_bounds.round(4)
        raise InputError(f"{where}none of the {len(geoms)} labels lies within the {year} imagery "
                         f"(lon/lat bounds {ll.tolist()})")
    return geoms[inside]
