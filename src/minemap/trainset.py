"""Training data, streamed from the chips folders: memory does not grow with the number of chips.

A training set of 25,000 chips of 256 px is 25 GB of float32; nothing here holds more than a batch of pixels
and a few numbers per chip or block:

- :func:`scan` reads every raster once before training (masks of every split, images of the training
  blocks or chips): valid and labelled pixels per piece, where the labelled pixels lie (counts per cell of
  :data:`CELL` px, sparse), and the band statistics (:class:`BandStats`: exact moments, percentiles from a
  sample of at most twice :data:`STATS_SAMPLE` pixels).
- :class:`Blocks` draws an epoch's windows inside the training blocks from those counts alone: a window that
  must hold a label contains a whole cell that holds one.
- :class:`WindowDataset` reads the items of an epoch (a window of a block, or a chip as cut) from their files,
  one per ``__getitem__``, augments and normalises it; a ``torch.utils.data.DataLoader`` with workers reads
  and augments ahead of the optimiser's steps. Each item's randomness comes from (seed, epoch, position in the
  epoch), so a training resumed in the middle of an epoch draws what an uninterrupted one would have, however
  many loader workers there are.
- :class:`HeldOut` streams the validation or test pieces (blocks mapped wall to wall, or chips) through a model,
  one piece or batch of chips at a time.

Pixels of possible missed mines (:data:`minemap.formats.chips.MISSED`) become 255 (ignored) as they are read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import torch
import torch.nn.functional as F
from rasterio.coords import BoundingBox
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.features import rasterize
from rasterio.windows import Window, bounds as window_bounds
from scipy import ndimage

from minemap.errors import InputError
from minemap.formats.chips import OTHER_YEARS, OTHER_YEARS_SPLITS, read_meta
from minemap.model import forward_logits

CELL = 16  # side of the cells in which labelled pixels are counted (windows holding a label contain one)
STATS_SAMPLE = 1_000_000  # pixels kept for the band percentiles (up to twice this)
REVIEWED_REPEAT = 4  # chips over detections a reviewer rejected are seen this many times an epoch


@dataclass
class Piece:
    """One image and mask pair on disk (a block written whole, or a chip), and what :func:`scan` found in it."""

    image: str
    mask: str
    height: int = 0
    width: int = 0
    valid: int = 0  # pixels that count (mask 0 or 1)
    positive: int = 0  # labelled pixels
    cells: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # flat cell ids holding a label
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # labelled pixels in each
    # each cell's share of the labelled outlines: its labelled pixels, each 1 / sqrt(pixels of its outline)
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    # a block written with a halo of imagery around it: (row, col, height, width) of the block in the raster
    core: tuple[int, int, int, int] | None = None
    year: int | None = None  # the imagery's year, for a block cut again from another year's (None: the labels')

    @property
    def block(self) -> tuple[int, int, int, int]:
        """(row, col, height, width) of the block in the raster: all of it where written without a halo."""
        return self.core or (0, 0, self.height, self.width)

    def origins(self, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Lowest and highest (row, col) of a window of ``size`` px inside the raster whose centre lies inside
        the block."""
        r, c, h, w = self.block
        lo = (max(0, r - size // 2), max(0, c - size // 2))
        hi = (min(self.height - size, r + h - 1 - size // 2), min(self.width - size, c + w - 1 - size // 2))
        return lo, (max(hi[0], lo[0]), max(hi[1], lo[1]))


def _ignore_missed(mask: np.ndarray, transform, crs, bounds, ignore: gpd.GeoDataFrame | None) -> int:
    """Background pixels of ``mask`` under ``ignore`` polygons become 255, in place; returns how many."""
    if ignore is None or crs is None:
        return 0
    near = ignore.to_crs(crs).cx[bounds.left:bounds.right, bounds.bottom:bounds.top]
    if not len(near):
        return 0
    off = rasterize(((g, 1) for g in near.geometry), out_shape=mask.shape, transform=transform, dtype=np.uint8)
    hit = (off > 0) & (mask == 0)
    mask[hit] = 255
    return int(hit.sum())


def read_pair(image: str | Path, mask: str | Path, ignore: gpd.GeoDataFrame | None = None,
              window: Window | None = None, read_image: bool = True) -> tuple[np.ndarray | None, np.ndarray, int]:
    """An image (float32, or None where not ``read_image``) and its mask, in ``window`` (default: whole), the
    possible missed mines under ``ignore`` set to 255 (and counted)."""
    try:
        # chips have no side-car files: not listing their folder at each open (thousands of chips in it) halves
        # the time of a small chip's read
        with warnings.catch_warnings(), rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # MMSegmentation layout PNGs: no place
            x = None
            if read_image:
                with rasterio.open(image) as src:
                    x = src.read(window=window).astype(np.float32)
            with rasterio.open(mask) as src:
                y = src.read(1, window=window)
                transform = src.window_transform(window) if window is not None else src.transform
                where = BoundingBox(*window_bounds(window, src.transform)) if window is not None else src.bounds
                crs = src.crs
    except RasterioError as e:
        raise InputError(f"{image}: cannot read chip ({e})") from None
    return x, y, _ignore_missed(y, transform, crs, where, ignore)


class BandStats:
    """Per-band mean and spread (exact, from sums) and 99th / 99.9th percentiles over the valid pixels of the
    pieces added: from all of them up to :data:`STATS_SAMPLE`, beyond that from every ``step``-th (the step
    doubles whenever the kept sample would exceed twice that), so memory stays bounded."""

    def __init__(self, bands: int) -> None:
        self.step, self.kept, self.n = 1, 0, 0
        self.sum, self.sq = np.zeros(bands), np.zeros(bands)
        self.sample: list[np.ndarray] = []

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        v = x[:, y != 255]
        w = v.astype(np.float64)
        self.sum += w.sum(1)
        self.sq += (w * w).sum(1)
        self.n += v.shape[1]
        self.sample.append(v[:, ::self.step].copy())  # a copy: a view would keep all of v alive
        self.kept += self.sample[-1].shape[1]
        if self.kept > 2 * STATS_SAMPLE:  # thinned piece by piece: no copy of the whole sample at once
            self.sample = [a[:, ::2].copy() for a in self.sample]
            self.kept, self.step = sum(a.shape[1] for a in self.sample), self.step * 2

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self.n == 0:
            raise InputError("training chips hold no valid pixel (every mask is 255)")
        mean = self.sum / self.n
        std = np.sqrt(np.maximum(self.sq / self.n - mean ** 2, 0))
        p99, p999 = np.percentile(np.concatenate(self.sample, axis=1), (99, 99.9), axis=1)
        return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32), p99, p999


def scan(pieces: list[Piece], ignore: gpd.GeoDataFrame | None, stats: bool = False,
         cells: bool = False) -> tuple[int, BandStats | None]:
    """Fill each piece's sizes, valid and labelled pixels (and, with ``cells``, its labelled cells: blocks that
    windows are drawn in), reading its mask (and, with ``stats``, its image, into the returned
    :class:`BandStats`); returns the pixels of possible missed mines ignored in them."""
    ignored, acc = 0, None
    for p in pieces:
        x, y, n = read_pair(p.image, p.mask, ignore, read_image=stats)
        ignored += n
        p.height, p.width = y.shape
        p.valid = int((y != 255).sum())
        p.positive = int((y == 1).sum())
        if p.positive and cells:
            parts, _ = ndimage.label(y == 1, structure=np.ones((3, 3), bool))
            r, c = np.nonzero(parts)
            flat = (r // CELL) * -(-p.width // CELL) + c // CELL
            ids, where, counts = np.unique(flat, return_inverse=True, return_counts=True)
            size = np.bincount(parts[r, c])  # pixels of each outline (as far as it lies in this piece)
            p.cells, p.counts = ids.astype(np.int32), counts.astype(np.int32)
            p.weights = np.bincount(where, 1 / np.sqrt(size[parts[r, c]]), len(ids)).astype(np.float32)
        if stats:
            acc = acc or BandStats(len(x))
            acc.add(x, y)
    return ignored, acc


class Blocks:
    """The training blocks (written whole by :mod:`minemap.chips.writing`): each epoch draws its windows anywhere
    inside them. ``keys``: each block's (tile or None, column, row of blocks); ``anchors``: (block, row, col) of
    the background chips cut inside them, around which half the windows that need no label are drawn, so the
    surfaces the chips were chosen to cover (fields, sand, roads: drawn evenly from groups of similar spectra)
    stay as frequent as they were."""

    def __init__(self, pieces: list[Piece], keys: list[tuple] | None = None,
                 anchors: list[tuple[int, int, int]] | None = None, weighting: str = "pixels",
                 own: int | None = None) -> None:
        self.pieces = pieces
        self.keys = keys or []
        self.anchors = anchors or []
        self.weighting = weighting  # how windows holding a label are drawn: see windows()
        self.other_share: float | None = None  # share of windows in other years' blocks; None: as their weight
        # the first `own` pieces are the labels' year's blocks, the rest the same blocks of other years
        self.own = len(pieces) if own is None else own

    def __len__(self) -> int:
        return len(self.pieces)

    @property
    def positive_pixels(self) -> int:
        return int(sum(p.positive for p in self.pieces))

    def windows(self, rng: np.random.Generator, n_positive: int, n_other: int, size: int) -> list[tuple[int, int, int]]:
        """(block, row, col) of ``n_positive`` windows of ``size`` px that each hold labelled pixels, and
        ``n_other`` that need none: half of them within half a window of a background chip's place, the rest
        anywhere (blocks weighted by area).

        A window holding a label contains a whole cell of :data:`CELL` px that holds one, at a random place
        around it; the cell is drawn by ``weighting``: ``pixels``, each labelled pixel alike (a mine is seen in
        proportion to its area), or ``outlines``, each outline in proportion to the square root of its area
        (its pixels spread over its cells): a dredging site a few pixels wide or a small pit is then seen a
        third as often as a pit ten times its area, not a tenth."""
        out = []
        if n_positive and self.positive_pixels:
            by_outline = self.weighting == "outlines"
            weight = self._shared(np.array([p.weights.sum() if by_outline else p.positive for p in self.pieces],
                                           float))
            for b in rng.choice(len(self), n_positive, p=weight / weight.sum()):
                p = self.pieces[b]
                w = p.weights if by_outline else p.counts
                cell = int(p.cells[rng.choice(len(p.cells), p=w / w.sum())])
                r, c = divmod(cell, -(-p.width // CELL))
                r1, c1 = min((r + 1) * CELL, p.height), min((c + 1) * CELL, p.width)
                r, c = r * CELL, c * CELL
                # a window holding the whole cell, at a random place around it, inside the raster (block and halo)
                r0 = int(rng.integers(max(0, r1 - size), min(r, p.height - size) + 1))
                c0 = int(rng.integers(max(0, c1 - size), min(c, p.width - size) + 1))
                out.append((int(b), r0, c0))
        else:
            n_other += n_positive
        near = rng.binomial(n_other, 0.5) if self.anchors else 0
        for k in rng.integers(0, max(len(self.anchors), 1), near):
            b, r, c = self.anchors[k]
            p = self.pieces[b]
            (rl, cl), (rh, ch) = p.origins(size)
            r0 = int(np.clip(r + rng.integers(-size // 2, size // 2 + 1), rl, rh))
            c0 = int(np.clip(c + rng.integers(-size // 2, size // 2 + 1), cl, ch))
            out.append((int(b), r0, c0))
        if n_other - near:
            area = self._shared(np.array([p.block[2] * p.block[3] for p in self.pieces], float))
            for b in rng.choice(len(self), n_other - near, p=area / area.sum()):
                (rl, cl), (rh, ch) = self.pieces[b].origins(size)
                out.append((int(b), int(rng.integers(rl, rh + 1)), int(rng.integers(cl, ch + 1))))
        return out

    def _shared(self, weight: np.ndarray) -> np.ndarray:
        """``weight`` (one per piece) rescaled so that the other years' blocks (the pieces after the first
        ``own``) hold ``other_share`` of it; as it is without a share, or where either side weighs nothing."""
        own, theirs = weight[:self.own].sum(), weight[self.own:].sum()
        if self.other_share is None or own == 0 or theirs == 0:
            return weight
        out = weight * (1 - self.other_share) / own
        out[self.own:] = weight[self.own:] * self.other_share / theirs
        return out


def block_pieces(chips_dir: Path, split: str, chips: pd.DataFrame | None = None) -> Blocks | None:
    """The written blocks of ``split`` (None where the folder has none: chips of another layout or an older
    minemap), with the places of the background ``chips`` inside them as anchors; not yet scanned."""
    path = Path(chips_dir) / "blocks.parquet"
    if not path.is_file():
        return None
    table = pd.read_parquet(path)
    if "image" not in table.columns:
        return None
    table = table[(table["split"] == split) & table["image"].notna()]
    if not len(table):
        return None
    core = [None] * len(table)
    if "core_row" in table.columns:  # blocks written with a halo of imagery around them
        core = [tuple(int(v) for v in t) for t in zip(table.core_row, table.core_col, table.core_height,
                                                      table.core_width)]
    pieces = [Piece(str(Path(chips_dir) / i), str(Path(chips_dir) / m), core=k)
              for i, m, k in zip(table.image, table["mask"], core)]
    # a block is named by its column and row of blocks, and in a folder of tiles (minemap.chips.tiles) by its tile
    tiles = list(table["tile"]) if "tile" in table.columns else [None] * len(table)
    keys = [(t, int(bx), int(by)) for t, bx, by in zip(tiles, table.bx, table.by)]
    anchors = []
    if chips is not None and {"col", "row"} <= set(chips.columns):
        block = int(read_meta(chips_dir)["block_size"])
        where = {k: i for i, k in enumerate(keys)}  # the labels' year's blocks (those of other years follow)
        background = chips[chips.kind == "background"]
        chip_tiles = background["tile"] if "tile" in background.columns else [None] * len(background)
        for t, c, r in zip(chip_tiles, background["col"], background["row"]):
            i = where.get((t, int(c) // block, int(r) // block))
            if i is not None:
                r0, c0 = pieces[i].core[:2] if pieces[i].core else (0, 0)  # not scanned yet: no height
                anchors.append((i, int(r) - keys[i][2] * block + r0, int(c) - keys[i][1] * block + c0))
    other = Path(chips_dir) / OTHER_YEARS
    if split in OTHER_YEARS_SPLITS and other.is_file():  # the blocks cut again from other years' imagery
        more = pd.read_parquet(other)
        # a folder cut before validation blocks were cut again holds training blocks only
        more = more[more["split"] == split] if "split" in more.columns else more[[split == "train"] * len(more)]
        pieces += [Piece(str(Path(chips_dir) / i), str(Path(chips_dir) / m), core=tuple(int(v) for v in k),
                         year=int(y))
                   for y, i, m, *k in zip(more.year, more.image, more["mask"], more.core_row, more.core_col,
                                          more.core_height, more.core_width)]
        keys += [(f"year {y}", int(bx), int(by)) for y, bx, by in zip(more.year, more.bx, more.by)]
    return Blocks(pieces, keys, anchors, own=len(table))


def chip_pieces(chips: pd.DataFrame) -> list[Piece]:
    """The chips of an index, as pieces (not yet scanned)."""
    return [Piece(str(Path(r) / i), str(Path(r) / m)) for r, i, m in zip(chips.root, chips.image, chips["mask"])]


class Augment:
    """Random crops (``crop``: side of the square), flips, rotations and photometric jitter of one item's raw
    reflectance (before normalisation), drawn from the item's own generator.

    - gain: one for the chip and one per band (another sensor calibration or season);
    - haze: a blend towards a grey-white level (path radiance, about equal in every band), with the level drawn
      around ``haze_level`` (the median of the per-band 99th percentiles) and a thickness that varies smoothly
      across the chip, as real haze is patchy: it lowers contrast and lifts dark pixels, which is what makes a
      hazy year look unlike the training year;
    - cloud shadows: soft patches darkened to 40-70 %, labels unchanged (a mine in shadow is still a mine).
    """

    def __init__(self, haze_level: float, crop: int | None = None) -> None:
        self.haze_level = float(haze_level)
        self.crop = crop

    @staticmethod
    def _field(g: torch.Generator, h: int, w: int, cells: int = 4) -> torch.Tensor:
        """A smooth random field (h, w) with zero mean and unit spread, from a coarse grid upsampled."""
        coarse = torch.randn(1, 1, cells, cells, generator=g)
        return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0, 0]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (C, H, W) raw reflectance, y: (H, W); returns augmented copies."""
        k = int(torch.randint(0, 4, (1,), generator=g))
        x, y = torch.rot90(x, k, (1, 2)), torch.rot90(y, k, (0, 1))
        if torch.rand(1, generator=g) < 0.5:
            x, y = x.flip(2), y.flip(1)
        c, h, w = x.shape
        if self.crop and self.crop < min(h, w):  # a random square: fewer pixels per step, more positions
            r0, c0 = (int(torch.randint(0, n - self.crop + 1, (1,), generator=g)) for n in (h, w))
            x, y = x[:, r0:r0 + self.crop, c0:c0 + self.crop], y[r0:r0 + self.crop, c0:c0 + self.crop]
            h = w = self.crop
        gain = 1 + 0.15 * (2 * torch.rand(1, generator=g) - 1) + 0.05 * (2 * torch.rand(c, 1, 1, generator=g) - 1)
        x = x * gain
        if torch.rand(1, generator=g) < 0.3:
            dark = 0.4 + 0.3 * torch.rand(1, generator=g)
            patch = torch.sigmoid(4 * (self._field(g, h, w) - 1.0))  # soft blobs over about a sixth of the chip
            x = x * (1 - (1 - dark) * patch)
        if torch.rand(1, generator=g) < 0.6:
            alpha = (0.45 * torch.rand(1, generator=g) + 0.1 * torch.rand(1, generator=g) * self._field(g, h, w))
            alpha = alpha.clamp(0, 0.6)
            level = self.haze_level * (0.5 + 0.6 * torch.rand(1, generator=g)) * (
                1 + 0.1 * (2 * torch.rand(c, 1, 1, generator=g) - 1))
            x = (1 - alpha) * x + alpha * level
        return x.contiguous(), y.contiguous()


def item_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of an item's augmentation: its training's seed, its epoch and its place in the epoch."""
    return int(np.random.default_rng([seed, epoch, position]).integers(2 ** 62))


class WindowDataset(torch.utils.data.Dataset):
    """Items of an epoch, each with its place in the epoch: (place, ("w", block, row, col)), a window of
    ``size`` px of a training block, or (place, ("c", chip)), a chip as cut. Each is read from its files when
    asked for, its possible missed mines ignored, augmented (``augment``, if any, from a generator seeded by
    (``seed``, ``epoch``, place)) and normalised by ``mean`` and ``std`` (float32 arrays of the bands).
    Returns (image (C, h, w) float32, mask (h, w) int64)."""

    def __init__(self, items: list[tuple[int, tuple]], blocks: Blocks | None, chips: list[Piece], size: int,
                 ignore: gpd.GeoDataFrame | None, augment: Augment | None, mean: np.ndarray, std: np.ndarray,
                 seed: int, epoch: int) -> None:
        self.items = items
        self.blocks = blocks.pieces if blocks is not None else []
        self.chips, self.size, self.ignore, self.augment = chips, size, ignore, augment
        self.mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        place, item = self.items[i]
        if item[0] == "w":
            p = self.blocks[item[1]]
            x, y, _ = read_pair(p.image, p.mask, self.ignore, Window(item[3], item[2], self.size, self.size))
        else:
            p = self.chips[item[1]]
            x, y, _ = read_pair(p.image, p.mask, self.ignore)
        x, y = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        if self.augment is not None:
            x, y = self.augment(x, y, torch.Generator().manual_seed(item_seed(self.seed, self.epoch, place)))
        return (x - self.mean) / self.std, y


def _tiles(n: int, size: int) -> list[int]:
    """Origins of windows of ``size`` covering [0, n): every ``size`` px, the last one flush with the end."""
    return sorted({*range(0, max(n - size, 0) + 1, size), max(n - size, 0)})


class HeldOut:
    """A held-out split (validation or test) as training judges it, streamed: its blocks mapped wall to wall
    where the chips folder has them, else its chips, in batches."""

    def __init__(self, pieces: list[Piece], kind: str, ignore: gpd.GeoDataFrame | None = None) -> None:
        self.pieces, self.kind_, self.ignore = pieces, kind, ignore

    @property
    def kind(self) -> str:
        return "blocks, wall to wall" if self.kind_ == "blocks" else "chips"

    @property
    def positive_pixels(self) -> int:
        return int(sum(p.positive for p in self.pieces))

    @property
    def valid_pixels(self) -> int:
        return int(sum(p.valid for p in self.pieces))

    def __bool__(self) -> bool:
        return len(self.pieces) > 0

    @torch.no_grad()
    def stream(self, model, mean, std, device, size: int, precision=None, batch: int = 16
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Logits and truth (bool) of the pixels that count (mask 0 or 1), flat, a piece (or a batch of chips)
        at a time. Blocks (with their halo, as context) are mapped by windows of ``size``; where the last window
        of a row or column overlaps the one before, the two are averaged."""
        model.eval()
        if self.kind_ == "blocks":
            for p in self.pieces:
                x, y, _ = read_pair(p.image, p.mask, self.ignore)
                _, h, w = x.shape
                origins = [(r, c) for r in _tiles(h, size) for c in _tiles(w, size)]
                acc, n = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
                for i in range(0, len(origins), batch):
                    part = origins[i:i + batch]
                    xb = torch.from_numpy(np.stack([x[:, r:r + size, c:c + size] for r, c in part]))
                    z = forward_logits(model, ((xb - mean) / std).to(device), precision).float().cpu().numpy()
                    for (r, c), zi in zip(part, z):
                        acc[r:r + size, c:c + size] += zi
                        n[r:r + size, c:c + size] += 1
                keep = y != 255
                yield (acc / np.maximum(n, 1))[keep], y[keep] == 1
        else:
            for i in range(0, len(self.pieces), batch):
                pairs = [read_pair(p.image, p.mask, self.ignore) for p in self.pieces[i:i + batch]]
                xb = torch.from_numpy(np.stack([x for x, _, _ in pairs]))
                y = np.stack([y for _, y, _ in pairs])
                z = forward_logits(model, ((xb - mean) / std).to(device), precision).float().cpu().numpy()
                keep = y != 255
                yield z[keep], y[keep] == 1
