"""Training chips at the imagery's native resolution, with spatially separated train/val/test splits.

The stages :func:`make_chips` (here) and :func:`~minemap.chips.sampling.hard_negative_chips`; block sizes and
splits in :mod:`~minemap.chips.splits`, background and hard-negative sampling in :mod:`~minemap.chips.sampling`,
masks and files in :mod:`~minemap.chips.writing`; the folder's format in :mod:`minemap.formats.chips`.

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

    chips/images/<chip_id>.tif   the source's bands (uint16 where lossless, else float32), with band descriptions
    chips/masks/<chip_id>.tif    uint8: 0 background, 1 mining, 255 ignore
    chips/index.parquet          GeoParquet (EPSG:4326): chip_id, split, kind (positive, background,
                                 hard_negative), year, image, mask, block, col and row (of the chip's first pixel
                                 in the year's grid), positive_fraction, valid_fraction, geometry (footprint)
    chips/blocks/<year>_<bx>_<by>.tif, ..._mask.tif   every block of the labelled ground or holding a chip,
                                 whole, with chips.block_halo px of imagery around it (mask 255 there): training
                                 draws its windows anywhere over the training blocks and validates on the
                                 validation blocks wall to wall
    chips/blocks.parquet         GeoParquet (the grid's CRS): block column/row, split, labelled pixels, footprint
                                 (evaluation scores the test blocks), image/mask of every block written and the
                                 block's place in them (core_row, core_col, core_height, core_width)
    chips/meta.json              bands, CRS, pixel size, ground sample distance, chip and block size, labels
                                 fingerprint, and per split: chips, positive chips, positive pixels, kinds
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import geopandas as gpd
import numpy as np
import shapely

from minemap._io import atomic_path, write_json
from minemap.config import ChipConfig
from minemap.errors import InputError
from minemap.formats.chips import (OTHER_YEARS, OTHER_YEARS_SPLITS, SPLITS, split_summary, write_blocks,
                                   write_other_years)
from minemap.geo import WGS84, ground_sample_distance_m
from minemap.imagery import ImagerySource
from minemap.lattice import Grid
from minemap.chips.sampling import _in_grid, chips_over, hard_negative_chips, select_background
from minemap.chips.splits import (_chip_boxes, _cover_shares, _labels_in_grid, _split_targets, assign_splits,
                                  block_cover, block_weights, chip_positions, choose_block_size, labelled_ground)
from minemap.chips.writing import _write_blocks, _write_chips, _write_other_years

if TYPE_CHECKING:
    from minemap.review import TrainingVerdicts

__all__ = ["Survey", "cut", "hard_negative_chips", "labels_fingerprint", "make_chips", "survey"]

log = logging.getLogger(__name__)
REVIEWED_CHIPS = 4  # at most this many chips over one detection a reviewer rejected (a large one)


def labels_fingerprint(labels: gpd.GeoDataFrame) -> str:
    """sha256 of the labels' sorted geometries: identifies the training data in a model card."""
    wkb = sorted(shapely.to_wkb(shapely.normalize(np.asarray(labels.geometry.values)), hex=True))
    return hashlib.sha256("".join(wkb).encode()).hexdigest()


@dataclass
class Survey:
    """Where chips can go in one grid, before any pixel is read: the labels in the grid's CRS, the block size,
    the labelled pixels of each block holding labels (``weights``), every candidate chip's top-left pixel
    (``pos``) and its block (``blk``)."""

    grid: Grid
    geoms: np.ndarray
    block: int
    weights: dict
    pos: np.ndarray
    blk: np.ndarray

    @property
    def blocks(self) -> set[tuple[int, int]]:
        return {(int(b[0]), int(b[1])) for b in self.blk}


def survey(labels: gpd.GeoDataFrame, source: ImagerySource, year: int, cfg: ChipConfig,
           labels_path: Path | None = None, block: int | None = None) -> Survey:
    """The grid of ``year``, the labels in it and its blocks: of ``block`` px, else of the configured or
    automatic size (:func:`~minemap.chips.splits.choose_block_size`). Reads no pixel."""
    grid = source.grid(year)
    geoms = _labels_in_grid(labels, grid, year, labels_path)
    if block is None:
        block, weights, pos, blk = choose_block_size(grid, geoms, cfg)
    else:
        pos, blk = chip_positions(grid, cfg, block)
        with_chips = set(map(tuple, blk))
        weights = {b: w for b, w in block_weights(grid, geoms, block).items() if b in with_chips}
    if len(pos) == 0:
        raise InputError(f"the {year} imagery ({grid.width} x {grid.height} px) is smaller than one chip "
                         f"({cfg.chip_size} px)")
    return Survey(grid, geoms, block, weights, pos, blk)


def shown_years(cfg: ChipConfig, year: int, have: list[int]) -> list[int]:
    """The years besides ``year`` (the labels') whose imagery of the training blocks training sees
    (:attr:`ChipConfig.other_years`): a list as given, a number N the years of ``have`` up to N after ``year``."""
    if isinstance(cfg.other_years, int):
        return [int(y) for y in sorted(have) if year < y <= year + cfg.other_years]
    return sorted({int(y) for y in cfg.other_years} - {year})


def checked_other_years(cfg: ChipConfig, year: int, have: list[int], given: list[int] | None = None) -> list[int]:
    """The other years a cut shows training: ``given``, else :func:`shown_years` over ``have`` (the years the
    source offers); an InputError names those the source does not offer."""
    shown = shown_years(cfg, year, have) if given is None else sorted({int(y) for y in given} - {year})
    missing = sorted(set(shown) - set(have))
    if missing:
        raise InputError(f"chips.other_years: no imagery for year(s) {', '.join(map(str, missing))} "
                         f"(years found: {', '.join(map(str, have))})")
    return shown


def make_chips(labels: gpd.GeoDataFrame, source: ImagerySource, year: int, dest: Path, cfg: ChipConfig,
               labels_path: Path | None = None, reviewed: TrainingVerdicts | None = None,
               other_years: list[int] | None = None) -> gpd.GeoDataFrame:
    """Stage ``chips``: cut training chips of ``year`` around ``labels`` into the folder ``dest``, and the training
    blocks again from the imagery of ``other_years`` (default: :func:`shown_years`).

    ``reviewed``: reviewers' verdicts on ``year`` (minemap.review). Each detection they rejected gets chips over
    it (kind ``reviewed_negative``, up to :data:`REVIEWED_CHIPS` for a large one, even where another chip holds
    the place), taught as background and seen :data:`minemap.trainset.REVIEWED_REPEAT` times an epoch; the outlines
    they were unsure of are ignored (255) in every chip. Labels anywhere on Earth, cut tile by tile each in
    its own CRS: :func:`minemap.chips.tiles.make_tiled_chips`."""
    where = f"{labels_path}: " if labels_path else ""
    other_years = checked_other_years(cfg, year, source.years(), other_years)
    sv = survey(labels, source, year, cfg, labels_path)
    grid, block = sv.grid, sv.block
    targets = _split_targets(cfg)
    all_blocks = sv.blocks
    cover = block_cover(source, year, grid, sorted(all_blocks), block, cfg.background_groups,
                        np.random.default_rng(cfg.seed + 2), first=sorted(sv.weights)) if cfg.balance_cover else None
    splits = assign_splits(sv.weights, sorted(all_blocks - set(sv.weights)), cfg, cover)
    empty = [x for x in SPLITS if targets[x] > 0 and x not in {splits[b] for b in sv.weights}]
    if empty:
        gsd = ground_sample_distance_m(grid.crs, grid.transform, grid.width, grid.height)
        raise InputError(
            f"{where}the {len(sv.geoms)} labels fall in {len(sv.weights)} block(s) of {block} px ({block * gsd:.0f} m), "
            f"too few to split into train/val/test without overlap (the {', '.join(empty)} split gets none): add "
            "labels over a wider area, use smaller chips (chips.chip_size), or set chips.val_fraction and "
            "chips.test_fraction to 0")
    index = cut(labels, sv, source, year, dest, cfg, splits, labels_path=labels_path, reviewed=reviewed,
                extra_meta={"land_cover_shares": _cover_shares(cover, splits)}, other_years=other_years)
    summary = split_summary(index)
    total = sum(v["positive_pixels"] for v in summary.values()) or 1
    log.info("chips: block %d px, %s; positive pixel shares %s", block, {s: v["chips"] for s, v in summary.items()},
             {s: round(v["positive_pixels"] / total, 3) for s, v in summary.items()})
    return index


def cut(labels: gpd.GeoDataFrame, sv: Survey, source: ImagerySource, year: int, dest: Path, cfg: ChipConfig,
        splits: dict, labels_path: Path | None = None, reviewed: TrainingVerdicts | None = None,
        every_split: bool = True, extra_meta: dict | None = None, progress: bool = True,
        other_years: list[int] = ()) -> gpd.GeoDataFrame:
    """Cut the chips and blocks of a surveyed grid whose blocks ``splits`` assigns, into the folder ``dest``
    (written whole, then swapped in); returns the index. ``every_split``: raise unless each split with a target
    gets labelled pixels (a tile of labels from anywhere need not: the splits are balanced across tiles);
    ``progress``: bars for the chips and blocks written; ``other_years``: the training blocks cut again from
    these years' imagery (``other_years.parquet``, :attr:`ChipConfig.other_years`)."""
    where = f"{labels_path}: " if labels_path else ""
    grid, block, geoms, pos, blk, weights = sv.grid, sv.block, sv.geoms, sv.pos, sv.blk, sv.weights
    chip = cfg.chip_size
    targets = _split_targets(cfg)
    all_blocks = sv.blocks
    ground = labelled_ground(all_blocks, set(weights), cfg.background_reach)
    boxes = _chip_boxes(grid, pos, chip)
    hit, _ = shapely.STRtree(geoms).query(boxes, predicate="intersects")
    positive = np.zeros(len(pos), dtype=bool)
    positive[hit] = True
    rng = np.random.default_rng(cfg.seed + 1)
    # background for each split from its own blocks, so that validation and test measure false alarms too
    chip_split = np.array([splits.get((int(b[0]), int(b[1])), "train") for b in blk])
    on_ground = np.array([tuple(b) in ground for b in blk], bool)
    background = [np.zeros(0, np.int64)]
    for x in SPLITS:
        if targets[x] > 0 and cfg.background_per_positive > 0:
            n_bg = max(2, int(round(cfg.background_per_positive * (positive & (chip_split == x)).sum())))
            background.append(select_background(source, year, grid, pos,
                                                np.flatnonzero(~positive & (chip_split == x) & on_ground),
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
                            ignore=unsure, progress=progress)
        # every block of the labelled ground, not only those a chip was cut in: training windows see all of the
        # ground where the labels are complete (its fields and roads as well as the chips' surfaces), and the
        # validation and test blocks are mapped wherever false alarms would count
        written = {tuple(int(v) for v in b) for b in blk[chosen]} | set(ground)
        rasters = _write_blocks(tmp, source, year, grid, written, block, geoms, cfg, ignore=unsure,
                                progress=progress)
        if not rows:
            raise InputError(f"{where}no chip of the {year} imagery under the labels has enough valid pixels")
        index = gpd.GeoDataFrame(rows, geometry="geometry", crs=grid.crs).to_crs(WGS84)
        summary = split_summary(index)
        for x in SPLITS:
            if every_split and targets[x] > 0 and summary[x]["positive_pixels"] == 0:
                raise InputError(f"{where}no labelled pixel with imagery falls in the {x} split (labels in "
                                 f"{len(weights)} blocks of {block} px): add labels over a wider area or set "
                                 f"chips.{x}_fraction to 0")
        index.to_parquet(tmp / "index.parquet")
        write_blocks(tmp / "blocks.parquet", splits, weights, grid, block, rasters, ground)
        # the training and validation blocks of other years: the same ground and labels under another year's
        # haze and season, taught and judged (the model maps every year, so it is chosen on every year it saw)
        shown_blocks = {k for k in rasters if splits.get(k, "train") in OTHER_YEARS_SPLITS}
        shown, unseen = _write_other_years(tmp, source, year, list(other_years), grid, shown_blocks, block, geoms, cfg,
                                           ignore=unsure, progress=progress)
        if shown:
            write_other_years(tmp / OTHER_YEARS, shown, splits)
        write_json(tmp / "meta.json", {
            "year": year, "bands": list(source.band_names), "crs": grid.crs.to_string(),
            "pixel_size": list(grid.res), "gsd_m": ground_sample_distance_m(grid.crs, grid.transform,
                                                                           grid.width, grid.height),
            "chip_size": chip, "block_size": block, "block_size_from": "config" if cfg.block_size else "labels",
            "blocks_with_labels": len(weights), "labels_fingerprint": labels_fingerprint(labels),
            "labelled_ground": {"reach_blocks": cfg.background_reach, "blocks": len(ground),
                                "blocks_left_out": len(all_blocks) - len(ground)},
            "ignore_border_m": cfg.ignore_border_m, "splits": summary,
            "other_years": {str(y): {"blocks": len(b), "positive_pixels": sum(v["positive_pixels"] for v in b.values())}
                            for y, b in shown.items()},
            **({"other_years_without_imagery": unseen} if unseen else {}),
            "review": {"not_mine_outlines": len(rejected), "reviewed_negative_chips": int(len(negative)),
                       "unsure_outlines_ignored": len(unsure)},
            **(extra_meta or {}),
        })
    return index
