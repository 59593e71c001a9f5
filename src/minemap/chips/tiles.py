"""Chips from anywhere: labels on every continent (the literature's mining polygons), cut tile by tile, each tile
in its own CRS, with the spatial splits balanced across tiles and regions.

1. **Tiles.** Each label goes to the cell of a global lattice of ``tile_deg`` degrees (EPSG:4326, cells
   ``x{i}_y{j}`` counted from longitude -180 eastwards and latitude 90 southwards: the same ground in every run)
   that holds the centre of its bounds. A tile's area is the box around its labels grown by ``background_reach
   + 1`` blocks (the labelled ground and a block beyond), clipped at the antimeridian and the poles; tiles whose
   areas overlap are merged (named by their first cell), so that no ground is cut twice and no chip of one tile
   touches another tile's. The areas, not whole cells, are fetched: a cell of one degree is 11,000 pixels a side
   at 10 m, a mine's surroundings a few hundred.
2. **Survey.** A tile's imagery is the source over its area (:func:`minemap.imagery.for_area`): a STAC source
   composites in the UTM zone of the area's centre, Planet quads and local folders keep their own grid. Its grid
   and blocks are surveyed without reading a pixel. The block size is the configured one, else the largest of
   4 and 2 chips (then one chip with its overlap, then one chip) that gives enough labelled blocks over all tiles
   (:func:`minemap.chips.splits.enough_blocks`).
3. **Splits.** Tiles are grouped into regions, cells of :data:`REGION_DEG` degrees (continent-sized); a region
   with fewer labelled blocks than it takes to give each split one joins the nearest region. The labelled blocks
   of each region are shared out to the splits as one area's are (:func:`minemap.chips.splits.assign_splits`:
   largest first, each to the split furthest below its target share of labelled pixels), so every region is in
   every split. Land-cover balancing (``chips.balance_cover``) is not done here: it would fetch every tile's
   pixels before the first cut.
4. **Cut.** Each tile is a unit of work (:func:`minemap.execution.map_units`: in this process, ``workers`` local
   processes or a Dask cluster, with a progress bar in places a second): its imagery read a block at a time
   into memory (:class:`minemap.imagery.BlockCache`) and its chips and blocks cut into ``tiles/<tile>/``, a
   chips folder of its own written whole, then a record ``tiles/<tile>.json`` with the fingerprint of
   everything the tile was cut from. A rerun skips the tiles whose record matches, so a run killed after hours
   resumes where it stopped. A tile that cannot give chips (no imagery over it, every chip mostly nodata) is
   recorded with the reason and left out; the others go on.
5. **The whole.** ``index.parquet``, ``blocks.parquet`` (footprints in EPSG:4326, a ``tile`` column) and
   ``meta.json`` at the top name every tile's chips (their ids prefixed by the tile's) and blocks by paths
   relative to the folder, so training (:mod:`minemap.train`) and the MMSegmentation layout read the folder as
   any other; ``tiles.parquet`` (GeoParquet, EPSG:4326) is the manifest of tiles: id, CRS (``grid_crs``), area,
   labels, chips and labelled pixels per split, region, seconds, and the reason a tile gave none.
   ``other_years.parquet`` names the training blocks each tile cut again from other years' imagery
   (``chips.other_years``: a list as given; a number N the years the source offers up to N after the labels',
   which for a remote source, offering every year, means N more composites per tile's blocks).
   ``meta.json`` is written last: a folder without it is not yet a chips folder.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from minemap._io import atomic_path, mark_output_dir, read_json, stable_hash, write_json
from minemap.chips import checked_other_years, cut, labels_fingerprint, survey
from minemap.chips.splits import _split_targets, assign_splits, block_sizes, enough_blocks
from minemap.config import ChipConfig
from minemap.errors import InputError, MinemapError
from minemap.execution import map_units
from minemap.formats.chips import CHIPS_FORMAT, OTHER_YEARS, SPLITS, split_summary
from minemap.geo import WGS84, ground_sample_distance_m
from minemap.imagery import BlockCache, for_area, open_imagery

log = logging.getLogger(__name__)

REGION_DEG = 30.0  # side of a region (continent-sized) whose labelled blocks are shared out to every split
METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class TileArea:
    """A tile of labels: its id (its first lattice cell), area (west, south, east, north in degrees) and the
    positions of its labels in the label table."""

    tile_id: str
    bbox: tuple[float, float, float, float]
    members: tuple[int, ...]

    @property
    def centre(self) -> tuple[float, float]:
        w, s, e, n = self.bbox
        return (w + e) / 2, (s + n) / 2


def group_labels(labels: gpd.GeoDataFrame, tile_deg: float, margin_m: float) -> list[TileArea]:
    """Labels grouped into tiles of the global lattice of ``tile_deg`` degrees, each tile's area grown by
    ``margin_m`` metres and overlapping areas merged (see the module docstring)."""
    geoms = np.asarray(labels.to_crs(WGS84).geometry.values)
    b = shapely.bounds(geoms)
    wide = np.flatnonzero(b[:, 2] - b[:, 0] > 180)
    if len(wide):
        raise InputError(f"label {int(wide[0])} spans {b[wide[0], 2] - b[wide[0], 0]:.0f} degrees of longitude "
                         "(it crosses the antimeridian): split it into one polygon either side of it")
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    i = np.floor((cx + 180) / tile_deg).astype(np.int64)
    j = np.floor((90 - cy) / tile_deg).astype(np.int64)
    cells: dict[tuple[int, int], list[int]] = {}
    for k, key in enumerate(zip(i.tolist(), j.tolist())):
        cells.setdefault(key, []).append(k)
    # (first cell, members, box); cells taken row by row from the north-west, so ids do not depend on label order
    groups = []
    for (ci, cj), members in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = np.array(members)
        groups.append((f"x{ci}_y{cj}", list(members), _grown((b[m, 0].min(), b[m, 1].min(), b[m, 2].max(),
                                                              b[m, 3].max()), margin_m)))
    while True:  # merge tiles whose areas overlap, until none do
        boxes = np.array([shapely.box(*g[2]) for g in groups])
        left, right = shapely.STRtree(boxes).query(boxes, predicate="intersects")
        pairs = [(a, c) for a, c in zip(left.tolist(), right.tolist()) if a < c]
        if not pairs:
            break
        parent = list(range(len(groups)))

        def root(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, c in pairs:
            ra, rc = root(a), root(c)
            if ra != rc:
                parent[max(ra, rc)] = min(ra, rc)
        merged: dict[int, tuple] = {}
        for k, g in enumerate(groups):
            r = root(k)
            if r not in merged:
                merged[r] = (g[0], list(g[1]), g[2])
            else:
                tid, mem, box = merged[r]
                merged[r] = (tid, mem + g[1], (min(box[0], g[2][0]), min(box[1], g[2][1]), max(box[2], g[2][2]),
                                               max(box[3], g[2][3])))
        groups = [merged[r] for r in sorted(merged)]
    return [TileArea(tid, tuple(float(v) for v in box), tuple(sorted(mem))) for tid, mem, box in groups]


def _grown(box: tuple, margin_m: float) -> tuple[float, float, float, float]:
    """``box`` (degrees) grown by ``margin_m`` metres on every side, clipped at the antimeridian and the poles."""
    w, s, e, n = box
    dy = margin_m / METRES_PER_DEGREE
    dx = dy / max(math.cos(math.radians(min(max(abs(s), abs(n)) + dy, 89.0))), 0.01)
    return max(-180.0, w - dx), max(-90.0, s - dy), min(180.0, e + dx), min(90.0, n + dy)


def regions(tiles: list[TileArea], labelled_blocks: list[int], need: int) -> list[int]:
    """A region number for each tile: its cell of :data:`REGION_DEG` degrees, regions holding fewer than
    ``need`` labelled blocks merged into the nearest (by the great-circle distance of their centres) until none
    is, or one is left."""
    cells = [(math.floor((lon + 180) / REGION_DEG), math.floor((90 - lat) / REGION_DEG))
             for lon, lat in (t.centre for t in tiles)]
    names = sorted(set(cells), key=lambda c: (c[1], c[0]))
    region = [names.index(c) for c in cells]
    xyz = np.array([_unit(*t.centre) for t in tiles]).reshape(-1, 3)
    while True:
        present = sorted(set(region))
        count = {r: sum(n for n, x in zip(labelled_blocks, region) if x == r) for r in present}
        small = [r for r in present if count[r] < need]
        if not small or len(present) == 1:
            break
        r = min(small, key=lambda x: (count[x], x))
        at = np.array(region)
        centre = {x: xyz[at == x].mean(0) for x in present}
        nearest = max((x for x in present if x != r), key=lambda x: (float(centre[r] @ centre[x]), -x))
        region = [nearest if x == r else x for x in region]
    present = sorted(set(region))
    return [present.index(x) for x in region]


def _unit(lon: float, lat: float) -> tuple[float, float, float]:
    lo, la = math.radians(lon), math.radians(lat)
    return math.cos(la) * math.cos(lo), math.cos(la) * math.sin(lo), math.sin(la)


def make_tiled_chips(labels: gpd.GeoDataFrame, imagery: Any, year: int, dest: Path, cfg: ChipConfig,
                     tile_deg: float = 1.0, bands: list[str] | None = None, workers: int = 1,
                     scheduler: str | None = None, progress: bool = True,
                     labels_path: Path | None = None, other_years: list[int] | None = None) -> gpd.GeoDataFrame:
    """Cut chips of ``year`` for ``labels`` anywhere on Earth into ``dest``, tile by tile (module docstring).
    ``imagery``: a source's description (a local folder, or a STAC or Planet config: its ``bbox`` and ``crs``
    are replaced by each tile's); ``other_years``: each tile's training blocks cut again from these years'
    imagery (default: :func:`minemap.chips.shown_years` over the years the source offers). Returns the whole
    index (EPSG:4326)."""
    where = f"{labels_path}: " if labels_path else ""
    dest = Path(dest).absolute()
    if not len(labels):
        raise InputError(f"{where}no labels")
    mark_output_dir(dest, "chips")
    for name in ("meta.json", "images", "masks", "blocks"):  # a folder that is not whole is not a chips folder
        path = dest / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    labels = labels.to_crs(WGS84).reset_index(drop=True)
    tiles, surveys, block = _survey_tiles(labels, imagery, year, cfg, tile_deg, bands, where)
    splits, region = _assign(tiles, surveys, cfg)
    shown = checked_other_years(cfg, year, open_imagery(for_area(imagery, tiles[0].bbox), bands).years(), other_years)
    units = []
    for t, sv, r in zip(tiles, surveys, region):
        if isinstance(sv, str):
            continue
        tile_splits = {(bx, by): s for (tid, bx, by), s in splits.items() if tid == t.tile_id}
        own = labels.iloc[list(t.members)]
        key = stable_hash([CHIPS_FORMAT, _describe(for_area(imagery, t.bbox)), bands, year, cfg.model_dump(),
                           block, sorted(tile_splits.items()), labels_fingerprint(own), shown])
        units.append({"tile_id": t.tile_id, "imagery": imagery, "bbox": t.bbox, "bands": bands, "year": year,
                      "other_years": shown,
                      "labels": own, "cfg": cfg, "survey": sv, "splits": tile_splits, "dest": str(dest),
                      "key": key, "region": r})
    records = {t.tile_id: {"tile_id": t.tile_id, "status": sv, "labels": len(t.members)}
               for t, sv in zip(tiles, surveys) if isinstance(sv, str)}
    todo = []
    for u in units:
        rec, _ = read_json(dest / "tiles" / f"{u['tile_id']}.json")
        if rec and rec.get("key") == u["key"] and (rec.get("chips", 0) == 0 or (dest / "tiles" / u["tile_id"]).is_dir()):
            records[u["tile_id"]] = rec
        else:
            todo.append(u)
    if len(todo) < len(units):
        log.info("chips: %d of %d tiles already cut, resuming", len(units) - len(todo), len(units))
    (dest / "tiles").mkdir(exist_ok=True)
    for rec in map_units(cut_tile, todo, workers=workers, scheduler=scheduler, progress=progress,
                         desc=f"chips {year}", sizes=[len(u["labels"]) for u in todo], size_unit="place"):
        records[rec["tile_id"]] = rec
    _drop_stale(dest, {u["tile_id"] for u in units})
    return _write_whole(dest, tiles, records, region, labels, year, cfg, block, tile_deg, where)


def _describe(desc: Any) -> Any:
    return desc.model_dump(mode="json") if hasattr(desc, "model_dump") else str(desc)


def _survey_tiles(labels: gpd.GeoDataFrame, imagery: Any, year: int, cfg: ChipConfig, tile_deg: float,
                  bands: list[str] | None, where: str):
    """The tiles and each one's survey (or why it has none) at the block size chosen over all of them."""
    first = labels.geometry.iloc[0].bounds
    probe = open_imagery(for_area(imagery, _grown(first, 1000.0)), bands).grid(year)
    gsd = ground_sample_distance_m(probe.crs, probe.transform, probe.width, probe.height)
    sizes = block_sizes(cfg, largest=4)
    for size in sizes:
        margin = ((cfg.background_reach or 0) + 1) * size * gsd
        tiles = group_labels(labels, tile_deg, margin)
        surveys: list = []
        for t in tiles:
            try:
                source = open_imagery(for_area(imagery, t.bbox), bands)
                surveys.append(survey(labels.iloc[list(t.members)], source, year, cfg, block=size))
            except MinemapError as e:
                surveys.append(f"no chips: {e}")
        w = np.array([v for sv in surveys if not isinstance(sv, str) for v in sv.weights.values()])
        if len(w) and (enough_blocks(w, cfg) or size == sizes[-1]):
            break
    if not len(w):
        reasons = sorted({sv for sv in surveys if isinstance(sv, str)})
        raise InputError(f"{where}no tile of the {len(labels)} labels has imagery to cut chips from"
                         + (f" ({reasons[0]})" if reasons else ""))
    log.info("chips: %d labels in %d tiles, blocks of %d px", len(labels), len(tiles), size)
    return tiles, surveys, size


def _assign(tiles: list[TileArea], surveys: list, cfg: ChipConfig) -> tuple[dict, list[int]]:
    """Every block of every surveyed tile to a split, region by region; and each tile's region."""
    targets = _split_targets(cfg)
    smallest = min((v for v in targets.values() if v > 0), default=1.0)
    need = max(3, math.ceil(1 / smallest))
    labelled = [0 if isinstance(sv, str) else len(sv.weights) for sv in surveys]
    region = regions(tiles, labelled, need)
    splits: dict = {}
    for r in sorted(set(region)):
        weights, others = {}, []
        for t, sv, x in zip(tiles, surveys, region):
            if x != r or isinstance(sv, str):
                continue
            weights.update({(t.tile_id, *b): w for b, w in sv.weights.items()})
            others += [(t.tile_id, *b) for b in sorted(sv.blocks - set(sv.weights))]
        if weights:
            splits.update(assign_splits(weights, others, cfg))
    return splits, region


def cut_tile(unit: dict) -> dict:
    """Cut one tile (a unit of :func:`make_tiled_chips`) into ``<dest>/tiles/<tile>/``; its record, also written
    to ``<dest>/tiles/<tile>.json``."""
    start = time.perf_counter()
    dest = Path(unit["dest"]) / "tiles"
    rec: dict = {"tile_id": unit["tile_id"], "key": unit["key"], "labels": len(unit["labels"]), "chips": 0}
    try:
        source = open_imagery(for_area(unit["imagery"], unit["bbox"]), unit["bands"])
        sv = unit["survey"]  # surveyed once, before the splits were assigned
        source = BlockCache(source, unit["year"], sv.grid, sv.block)  # each block read once, then cut from memory
        index = cut(unit["labels"], sv, source, unit["year"], dest / unit["tile_id"], unit["cfg"], unit["splits"],
                    every_split=False, progress=False, extra_meta={"tile": unit["tile_id"], "bbox": list(unit["bbox"])},
                    other_years=unit["other_years"])
        summary = split_summary(index)
        rec.update(status="cut", grid_crs=sv.grid.crs.to_string(), width=sv.grid.width, height=sv.grid.height,
                   chips=int(len(index)), **{f"{s}_chips": summary[s]["chips"] for s in SPLITS},
                   **{f"{s}_positive_pixels": summary[s]["positive_pixels"] for s in SPLITS})
    except MinemapError as e:  # no imagery there, every chip mostly nodata: the tile is left out, the rest go on
        rec.update(status=f"no chips: {e}")
        log.warning("tile %s: %s", unit["tile_id"], e)
    rec["seconds"] = round(time.perf_counter() - start, 3)
    write_json(dest / f"{unit['tile_id']}.json", rec)
    return rec


def _drop_stale(dest: Path, current: set[str]) -> None:
    """Remove the tile folders and records of an earlier cut that this one has no tile for."""
    for path in (dest / "tiles").iterdir():
        tid = path.name[:-5] if path.name.endswith(".json") else path.name
        if tid not in current and not path.name.startswith("."):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _write_whole(dest: Path, tiles: list[TileArea], records: dict, region: list[int], labels: gpd.GeoDataFrame,
                 year: int, cfg: ChipConfig, block: int, tile_deg: float, where: str) -> gpd.GeoDataFrame:
    """The top-level index, blocks, tile manifest and meta of the tiled folder (meta last)."""
    indexes, blocks, metas, shown = [], [], [], []
    for t in tiles:
        rec = records.get(t.tile_id, {})
        if not rec.get("chips"):
            continue
        folder = dest / "tiles" / t.tile_id
        prefix = f"tiles/{t.tile_id}/"
        index = gpd.read_parquet(folder / "index.parquet")
        index[["image", "mask"]] = prefix + index[["image", "mask"]]
        index["chip_id"] = f"{t.tile_id}_" + index["chip_id"]  # unique over the tiles (the MMSegmentation layout)
        indexes.append(index.assign(tile=t.tile_id))
        b = gpd.read_parquet(folder / "blocks.parquet").to_crs(WGS84)
        for col in ("image", "mask"):
            b[col] = [None if pd.isna(v) else prefix + v for v in b[col]]
        blocks.append(b.assign(tile=t.tile_id))
        metas.append(read_json(folder / "meta.json")[0])
        if (folder / OTHER_YEARS).is_file():
            o = pd.read_parquet(folder / OTHER_YEARS)
            shown.append(o.assign(image=prefix + o["image"], mask=prefix + o["mask"], tile=t.tile_id))
    if not indexes:
        reasons = sorted({str(r.get("status")) for r in records.values()})
        raise InputError(f"{where}no tile gave chips" + (f" ({reasons[0]})" if reasons else ""))
    index = gpd.GeoDataFrame(pd.concat(indexes, ignore_index=True), crs=WGS84)
    table = gpd.GeoDataFrame(pd.concat(blocks, ignore_index=True), crs=WGS84)
    manifest = gpd.GeoDataFrame(
        [{**{k: v for k, v in records.get(t.tile_id, {}).items() if k != "key"}, "tile_id": t.tile_id,
          "region": r, "west": t.bbox[0], "south": t.bbox[1], "east": t.bbox[2], "north": t.bbox[3]}
         for t, r in zip(tiles, region)], geometry=[shapely.box(*t.bbox) for t in tiles], crs=WGS84)
    other = pd.concat(shown, ignore_index=True) if shown else None
    (dest / OTHER_YEARS).unlink(missing_ok=True)
    for name, frame in (("index.parquet", index), ("blocks.parquet", table), ("tiles.parquet", manifest),
                        (OTHER_YEARS, other)):
        if frame is not None:
            with atomic_path(dest / name) as tmp:
                frame.to_parquet(tmp)
    summary = split_summary(index)
    gsd = [m["gsd_m"] for m in metas]
    cut_tiles = manifest[manifest.status == "cut"]
    write_json(dest / "meta.json", {
        "year": year, "layout": "tiles", "bands": metas[0]["bands"],
        "crs": "per tile (tiles.parquet): " + ", ".join(sorted({m["crs"] for m in metas})),
        "pixel_size": metas[0]["pixel_size"], "gsd_m": float(np.median(gsd)), "chip_size": cfg.chip_size,
        "block_size": block, "block_size_from": "config" if cfg.block_size else "labels",
        "tile_deg": tile_deg, "tiles": len(tiles), "tiles_cut": int(len(cut_tiles)),
        "tiles_without_chips": {str(r["tile_id"]): str(r["status"]) for _, r in manifest.iterrows()
                                if r["status"] != "cut"},
        "regions": int(len(set(region))),
        "regions_in_split": {s: int(cut_tiles[cut_tiles[f"{s}_positive_pixels"] > 0].region.nunique())
                             for s in SPLITS},
        "blocks_with_labels": int(sum(m["blocks_with_labels"] for m in metas)),
        "labels_fingerprint": labels_fingerprint(labels), "ignore_border_m": cfg.ignore_border_m,
        "splits": summary,
        "other_years": {} if other is None else {
            str(y): {"blocks": int(len(g)), "positive_pixels": int(g.positive_pixels.sum())}
            for y, g in other.groupby("year")},
    })
    total = sum(v["positive_pixels"] for v in summary.values()) or 1
    log.info("chips: %d tiles, %s chips; positive pixel shares %s", len(cut_tiles),
             {s: v["chips"] for s, v in summary.items()},
             {s: round(v["positive_pixels"] / total, 3) for s, v in summary.items()})
    return index
