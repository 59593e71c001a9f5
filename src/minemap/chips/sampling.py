"""Sampling: background chips that cover the scene's variety, chips over outlines (hard negatives, reviewed
detections), and the hard-negative stage."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine
from scipy.cluster.vq import kmeans2

from minemap._io import atomic_path, write_json
from minemap.config import ChipConfig, HardNegativeConfig
from minemap.formats.chips import MISSED, read_meta, split_summary
from minemap.formats.rasters import zonal_mean
from minemap.geo import LABEL_RECT_QUANTILE, WGS84, shape_level, shaped_like_fields, units_per_metre
from minemap.imagery import ImagerySource
from minemap.lattice import Grid
from minemap.chips.splits import _chip_boxes, _labels_in_grid, chip_positions
from minemap.chips.writing import _write_chips

if TYPE_CHECKING:
    from minemap.review import TrainingVerdicts

log = logging.getLogger(__name__)


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


def _cap_missed(sure: np.ndarray, keep: np.ndarray, judged: np.ndarray, parts: np.ndarray, labels: np.ndarray,
                blocks: pd.DataFrame, share: float | None) -> tuple[np.ndarray, int]:
    """``sure`` with the possible missed mines (``sure & keep``) on labelled ground beyond ``share`` x the labels'
    area unmarked.

    Labels miss mines, but not most of them: where a first model is as sure of more ground away from the labels
    than that, the surplus is likelier a confusion (bright fields, sand bars) than mines nobody drew, and
    ignoring it would keep the confusion from ever being taught. The surest detections fill the allowance
    first; a detection counts with the whole area of ``parts`` (its part away from the labels) if that part
    reaches labelled ground (``blocks.labelled_ground``; every block where the column is absent). Returns the
    new mask and how many detections were unmarked."""
    if share is None or not (sure & keep).any():
        return sure, 0
    on_ground = np.ones(len(parts), bool)
    if "labelled_ground" in blocks and "geometry" in blocks:
        footprints = shapely.from_wkb(blocks["geometry"][blocks["labelled_ground"].to_numpy(bool)])
        on_ground = shapely.intersects(parts, shapely.union_all(footprints))
    cand = np.flatnonzero(sure & keep & on_ground)
    if len(cand) == 0:
        return sure, 0
    allowance = share * float(shapely.area(shapely.union_all(labels))) if len(labels) else 0.0
    order = cand[np.argsort(-judged[cand], kind="stable")]
    beyond = order[np.cumsum(shapely.area(parts[order])) > allowance * (1 + 1e-9)]
    out = sure.copy()
    out[beyond] = False
    return out, int(len(beyond))


def _rectangles(sure: np.ndarray, keep: np.ndarray, parts: np.ndarray, labels: np.ndarray, grid: Grid,
                level: float) -> tuple[np.ndarray, float | None, int]:
    """``sure`` with the possible missed mines (``sure & keep``) shaped unlike any mine unmarked: their part away
    from the labels fills more than ``level`` of its enclosing rectangle, and more than
    :data:`~minemap.geo.LABEL_RECT_QUANTILE` of the labels' outlines do (so labels that are rectangles themselves,
    quarries drawn as boxes, keep their like spared; :func:`~minemap.geo.shape_level`). A model sure of a bright
    rectangular field it was never told about would otherwise keep the confusion for good. Detections under
    :data:`~minemap.geo.SHAPE_MIN_PIXELS` pixels are not judged (a few pixels are square whatever they show).
    Returns the new mask, the rectangularity level used (None: off, ``level`` 1) and how many detections were
    unmarked."""
    used = shape_level(level, labels)
    if used is None:
        return sure, None, 0
    cand = np.flatnonzero(sure & keep)
    if len(cand) == 0:
        return sure, used, 0
    shaped = cand[shaped_like_fields(parts[cand], used, grid.res[0] * grid.res[1])]
    out = sure.copy()
    out[shaped] = False
    return out, used, int(len(shaped))


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
    validation chips included, so a missed mine neither teaches the model nor counts against it. One shaped like
    no mine, a rectangle (``hn.max_rectangularity``, see :func:`_rectangles`), is taught as a false alarm. On
    labelled ground they may cover at most ``hn.max_missed_share`` x the labelled area (the surest first, see
    :func:`_cap_missed`); the rest are taught as false alarms. At most
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
    parts = np.where(on_label, false, dgeoms)  # what a possible missed mine would be: its part off the labels
    sure, rect_level, rectangles = _rectangles(sure, keep, parts, geoms, grid, hn.max_rectangularity)
    sure, capped = _cap_missed(sure, keep, judged, parts, geoms, blocks, hn.max_missed_share)
    taught = false[keep & ~sure]
    missed_geoms = parts[keep & sure]  # a labelled mine is taught as such already
    ignored = np.concatenate([missed_geoms, shapely.intersection(dgeoms[~sure], near), unsure])
    ignored = ignored[~shapely.is_empty(ignored)]
    n_max = int(round(hn.per_positive * (index.kind == "positive").sum()))
    stats = {"detections": int(len(dgeoms)), "false_alarms": int(len(taught)),
             "ignored_as_possible_missed_mines": int((keep & sure).sum()),
             "taught_as_rectangles": rectangles, "taught_beyond_missed_share": capped,
             "reviewed_not_mine": int(len(rejected)), "reviewed_unsure": int(len(unsure)), "chips": 0}
    policy = {"buffer_m": hn.buffer_m, "search_level": level, "sure_level": round(sure_level, 4),
              "rectangularity_level": None if rect_level is None else round(rect_level, 4), "rule": (
        f"false alarms are the first model's detections{'' if level is None else f' at probability {level:g}'} further than {hn.buffer_m:g} m from every label and "
        f"less sure than {sure_level:.2f} (the median of its mean probability on labelled mines, capped at "
        f"{hn.max_probability:g}; a detection that reaches a label is judged on its part beyond that distance); "
        f"surer detections away from labels may be mines the labels miss: their pixels are ignored (255) in "
        f"every chip, as is the part of any detection within {hn.buffer_m:g} m of a label"
        + ("" if rect_level is None else
           f"; those whose part away from the labels fills more than {rect_level:.3f} of its enclosing rectangle "
           f"(fields, clearings; at least {hn.max_rectangularity:g} and above {LABEL_RECT_QUANTILE:.0%} of the "
           f"labels) are taught as false alarms")
        + ("" if hn.max_missed_share is None else
           f"; on labelled ground they cover at most {hn.max_missed_share:g} x the labelled area, the surest "
           f"first, and the rest are taught as false alarms"))}
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
