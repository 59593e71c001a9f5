"""A chips folder (``minemap chips``, and the hard negatives' ``chips/``)::

    images/<chip_id>.tif, masks/<chip_id>.tif   a chip's bands (uint16 where that keeps every value, else
                                                float32) and mask (0, 1, 255 = ignored)
    blocks/                                     the blocks of the grid that hold chips, whole (image and mask)
    index.parquet                               a row per chip: chip_id, split, kind, image, mask, positive_pixels,
                                                col, row, footprint (EPSG:4326)
    blocks.parquet                              a row per block: bx, by, split, label_pixels, labelled_ground,
                                                image, mask, positive_pixels, footprint (the grid's CRS)
    other_years.parquet                         (chips.other_years) a row per training or validation block cut
                                                from another year's imagery: year, bx, by, split, image, mask,
                                                positive_pixels, core_*
    meta.json                                   year, bands, CRS, pixel size, chip and block sizes, splits, ...
    possible_missed_mines.parquet               (hard negatives) detections that no chip teaches
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from minemap.errors import InputError
from minemap.geo import WGS84
from minemap.lattice import Grid, pixel_boxes


SPLITS = ("train", "val", "test")


IGNORE = 255


MISSED = "possible_missed_mines.parquet"  # beside hard-negative chips: pixels no chip teaches


OTHER_YEARS = "other_years.parquet"  # the training and validation blocks cut from other years' imagery
OTHER_YEARS_SPLITS = ("train", "val")  # the splits whose blocks are cut again from other years' imagery


def split_summary(index: pd.DataFrame) -> dict[str, dict]:
    """Per split: chips, positive chips, positive (mining) pixels, and chips of each kind."""
    out = {}
    for s in SPLITS:
        part = index[index.split == s]
        out[s] = {"chips": int(len(part)), "positive_chips": int((part.positive_pixels > 0).sum()),
                  "positive_pixels": int(part.positive_pixels.sum()),
                  "by_kind": {str(k): int(v) for k, v in part.kind.value_counts().items()}}
    return out


CHIPS_FORMAT = 6  # bumped when the chips folder's files change, so that a resumed run cuts them again


def write_blocks(dest: Path, splits: dict[tuple[int, int], str], weights: dict[tuple[int, int], float], grid: Grid,
                 block: int, rasters: dict[tuple[int, int], dict] | None = None,
                 ground: set[tuple[int, int]] | None = None) -> None:
    """``blocks.parquet``: each block's column and row, split, labelled pixels, whether it is labelled ground
    (:func:`minemap.chips.splits.labelled_ground`; every block where ``ground`` is None) and footprint (the grid's CRS, clipped to the
    grid), and where :func:`minemap.chips.writing._write_blocks` wrote it whole, its image and mask (else empty)
    and the block's place in them (``core_row``, ``core_col``: pixels of halo above and left of it,
    ``core_height``, ``core_width``)."""
    keys = sorted(splits)
    rasters = rasters or {}
    bx = np.array([b[0] for b in keys], np.int64)
    by = np.array([b[1] for b in keys], np.int64)
    boxes = pixel_boxes(grid, bx * block, by * block, block, block, clip=True)
    gpd.GeoDataFrame({"bx": bx, "by": by, "split": [splits[b] for b in keys],
                      "label_pixels": [weights.get(b, 0.0) for b in keys],
                      "labelled_ground": [ground is None or b in ground for b in keys],
                      "image": [rasters.get(b, {}).get("image") for b in keys],
                      "mask": [rasters.get(b, {}).get("mask") for b in keys],
                      "positive_pixels": [rasters.get(b, {}).get("positive_pixels", 0) for b in keys],
                      # where the block lies in its raster (which holds a halo of imagery around it)
                      **{k: [rasters.get(b, {}).get(k, 0) for b in keys]
                         for k in ("core_row", "core_col", "core_height", "core_width")}},
                     geometry=boxes, crs=grid.crs).to_parquet(dest)


def write_other_years(dest: Path, rasters: dict[int, dict[tuple[int, int], dict]],
                      splits: dict[tuple[int, int], str]) -> None:
    """``other_years.parquet``: a row per training or validation block written from another year's imagery
    (``rasters``: per year, what :func:`minemap.chips.writing._write_other_years` returned), with its split."""
    rows = [{"year": int(y), "bx": int(b[0]), "by": int(b[1]), "split": splits.get(b, "train"), **v}
            for y, blocks in sorted(rasters.items()) for b, v in sorted(blocks.items())]
    columns = ["year", "bx", "by", "split", "image", "mask", "positive_pixels", "core_row", "core_col",
               "core_height", "core_width"]
    pd.DataFrame(rows, columns=columns).to_parquet(dest)


def split_blocks(chips_dir: Path) -> gpd.GeoDataFrame:
    """The blocks of a chips folder with their split and footprint (the training grid's CRS)."""
    path = Path(chips_dir) / "blocks.parquet"
    try:
        blocks = gpd.read_parquet(path)
    except (ValueError, OSError) as e:  # a folder cut by an older minemap holds no footprints
        raise InputError(f"{path}: no block footprints ({e}); cut the chips again") from None
    return blocks[["split", "geometry"]]


def read_meta(chips_dir: Path) -> dict:
    path = Path(chips_dir) / "meta.json"
    if not path.is_file() or not (Path(chips_dir) / "index.parquet").is_file():
        raise InputError(f"{chips_dir}: not a chips folder (index.parquet or meta.json missing)")
    return json.loads(path.read_text())


def read_index(chips_dirs: list[Path]) -> pd.DataFrame:
    """The chips of every folder, with the folder each lies in (column ``root``)."""
    frames = []
    for d in chips_dirs:
        read_meta(d)
        frame = pd.DataFrame(gpd.read_parquet(Path(d) / "index.parquet").drop(columns="geometry"))
        missing = {"chip_id", "split", "kind", "image", "mask", "positive_pixels"} - set(frame.columns)
        if missing and len(frame):
            raise InputError(f"{Path(d) / 'index.parquet'}: lacks columns {sorted(missing)} (made by an older "
                             "minemap?): cut the chips again")
        frames.append(frame.assign(root=str(d)))
    return pd.concat(frames, ignore_index=True)


def possible_missed_mines(chips_dirs: list[Path]) -> gpd.GeoDataFrame | None:
    """Detections that hard-negative mining judged to be mines the labels may miss (EPSG:4326), if any."""
    frames = [gpd.read_parquet(Path(d) / MISSED) for d in chips_dirs if (Path(d) / MISSED).is_file()]
    frames = [f for f in frames if len(f)]
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=WGS84) if frames else None
