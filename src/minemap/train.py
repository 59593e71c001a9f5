"""Training: a SegFormer on the chips of :mod:`minemap.chips`, until validation stops improving.

Reads one or more chips folders (``index.parquet`` + chip GeoTIFFs + the blocks written whole: the chips, and the
hard negatives of :func:`minemap.chips.hard_negative_chips`); writes a model directory (``weights.safetensors`` +
``model.json``) and ``train_state.pt`` beside them (last epoch, optimiser, learning rate, early-stopping
counters) so that ``resume=True`` carries on after a crash.

- What training sees: each epoch draws its windows anywhere inside the training blocks (as many as there are
  positive and background chips: those windows each hold a labelled pixel drawn at random, these lie anywhere,
  at a place drawn anew every epoch), beside the chips cut as they are (hard negatives, detections a reviewer
  rejected). A chips folder without blocks (another layout, an older minemap) trains on its chips.
- What judges it: the validation blocks mapped wall to wall (every pixel, not a handful of chips around
  mines); with fewer than ``train.min_val_pixels`` labelled pixels there, a chip or two would choose the epoch,
  so training runs a fixed schedule and keeps the last weights. The card says which (``selection``).
- Loss: binary cross-entropy plus soft Dice over valid pixels (mask 255 ignored: no imagery, and the band along
  label outlines): Dice keeps small mines from being swamped by background.
- Augmentation: flips, 90-degree rotations, and a photometric jitter (gain per chip and band, patchy haze
  towards a bright per-band level, cloud shadows) so that hazy, shadowed or differently calibrated years still
  segment.
- Schedule: a warm-up over the first epoch, then a constant rate that halves whenever validation F1 has not
  improved for ``patience // 2`` epochs; training stops after ``patience`` epochs without improvement, or at
  ``epochs``. Validation F1 is taken at its best threshold, so model selection does not depend on calibration.
- Arithmetic: bfloat16 autocast of the forward passes where the device computes it natively
  (``train.precision``, see :func:`minemap.model.resolve_precision`); the loss, weights and optimiser stay float32.
- Pixels of detections that hard-negative mining judged possible missed mines
  (:data:`minemap.formats.chips.MISSED`) are ignored in every chip and block, so a mine the labels miss neither teaches
  the model that it is background nor counts against it in validation, calibration or test.
- After training: the kept weights' logits on the validation blocks fit a calibration (scale and bias of the
  logit, Platt), the threshold is chosen by F1 on calibrated validation probabilities, and the test blocks give
  metrics and the calibration errors. The card records the per-epoch validation curve.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.features import rasterize
from tqdm.auto import tqdm

from minemap._io import atomic_path, check_output_dir
from minemap.formats.chips import possible_missed_mines, read_index, read_meta, split_summary
from minemap.config import ModelConfig, TrainConfig
from minemap.errors import InputError, ModelError
from minemap.formats.run import STATE
from minemap.metrics import best_threshold, fit_platt, histograms, metrics_at, reliability
from minemap.formats.rasters import quantise
from minemap.model import (ModelCard, build_model, forward_logits, load_model, load_pretrained_encoder,
                           resolve_device, resolve_precision, save_model)

log = logging.getLogger(__name__)
CALIBRATION_PIXELS = 2_000_000
MIN_DELTA = 0.002  # a gain in validation F1 smaller than this is noise, not progress
CLOUD_FACTOR = 1.5  # brighter than this x the training chips' 99.9th percentile in every band: a cloud
REVIEWED_REPEAT = 4  # chips over detections a reviewer rejected are seen this many times an epoch



def _ignore_missed(mask: np.ndarray, transform, crs, bounds, ignore: gpd.GeoDataFrame | None) -> int:
    """Background pixels of ``mask`` under ``ignore`` polygons become 255, in place; returns how many."""
    if ignore is None:
        return 0
    near = ignore.to_crs(crs).cx[bounds.left:bounds.right, bounds.bottom:bounds.top]
    if not len(near):
        return 0
    off = rasterize(((g, 1) for g in near.geometry), out_shape=mask.shape, transform=transform, dtype=np.uint8)
    hit = (off > 0) & (mask == 0)
    mask[hit] = 255
    return int(hit.sum())


def _read_pair(image: Path, mask: Path, ignore: gpd.GeoDataFrame | None) -> tuple[np.ndarray, np.ndarray, int]:
    """An image (float32) and its mask, the possible missed mines under ``ignore`` set to 255 (and counted)."""
    try:
        with rasterio.open(image) as src:
            x = src.read().astype(np.float32)
            transform, crs, bounds = src.transform, src.crs, src.bounds
        with rasterio.open(mask) as src:
            y = src.read(1)
    except RasterioError as e:
        raise InputError(f"{image}: cannot read chip ({e})") from None
    return x, y, _ignore_missed(y, transform, crs, bounds, ignore)


def _read_chips(index: pd.DataFrame, ignore: gpd.GeoDataFrame | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Images and masks of the chips; background pixels under ``ignore`` polygons become 255 (and are counted)."""
    images, masks, ignored = [], [], 0
    with warnings.catch_warnings():  # chips of the MMSegmentation layout may be PNGs, with no place on Earth
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for row in index.itertuples():
            x, y, n = _read_pair(Path(row.root) / row.image, Path(row.root) / row.mask, ignore)
            images.append(x)
            masks.append(y)
            ignored += n
    return np.stack(images), np.stack(masks), ignored


class BlockSet:
    """Blocks of one split read whole (:func:`minemap.chips.writing._write_blocks`): training draws its windows anywhere
    inside them, validation and test map them wall to wall. ``keys``: each block's (column, row) of blocks;
    ``anchors``: (block, row, col) of the background chips cut inside them, around which half the windows that
    need no label are drawn, so the surfaces the chips were chosen to cover (fields, sand, roads: drawn evenly
    from groups of similar spectra) stay as frequent as they were."""

    def __init__(self, images: list[np.ndarray], masks: list[np.ndarray], keys: list[tuple[int, int]] | None = None,
                 anchors: list[tuple[int, int, int]] | None = None) -> None:
        self.images, self.masks = images, masks
        self.keys = keys or []
        self.anchors = anchors or []
        self.positive = [np.flatnonzero(m.ravel() == 1) for m in masks]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def positive_pixels(self) -> int:
        return int(sum(len(p) for p in self.positive))

    def windows(self, rng: np.random.Generator, n_positive: int, n_other: int, size: int) -> list[tuple[int, int, int]]:
        """(block, row, col) of ``n_positive`` windows of ``size`` px that each hold a labelled pixel drawn at
        random (blocks weighted by their labelled pixels), and ``n_other`` that need none: half of them within
        half a window of a background chip's place, the rest anywhere (blocks weighted by area)."""
        out = []
        if n_positive and self.positive_pixels:
            weight = np.array([len(p) for p in self.positive], float)
            for b in rng.choice(len(self), n_positive, p=weight / weight.sum()):
                h, w = self.masks[b].shape
                r, c = divmod(int(self.positive[b][rng.integers(len(self.positive[b]))]), w)
                # a window holding (r, c), at a random place around it, inside the block
                r0 = int(rng.integers(max(0, r - size + 1), min(r, h - size) + 1))
                c0 = int(rng.integers(max(0, c - size + 1), min(c, w - size) + 1))
                out.append((int(b), r0, c0))
        else:
            n_other += n_positive
        near = rng.binomial(n_other, 0.5) if self.anchors else 0
        for k in rng.integers(0, max(len(self.anchors), 1), near):
            b, r, c = self.anchors[k]
            h, w = self.masks[b].shape
            r0 = int(np.clip(r + rng.integers(-size // 2, size // 2 + 1), 0, h - size))
            c0 = int(np.clip(c + rng.integers(-size // 2, size // 2 + 1), 0, w - size))
            out.append((int(b), r0, c0))
        if n_other - near:
            area = np.array([m.size for m in self.masks], float)
            for b in rng.choice(len(self), n_other - near, p=area / area.sum()):
                h, w = self.masks[b].shape
                out.append((int(b), int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))))
        return out

    def cut(self, windows: list[tuple[int, int, int]], size: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([self.images[b][:, r:r + size, c:c + size] for b, r, c in windows])
        y = np.stack([self.masks[b][r:r + size, c:c + size] for b, r, c in windows])
        return x, y


def read_blocks(chips_dir: Path, split: str, ignore: gpd.GeoDataFrame | None = None,
                chips: pd.DataFrame | None = None) -> tuple[BlockSet | None, int]:
    """The written blocks of ``split`` (None where the folder has none: chips of another layout or an older
    minemap), with the places of the background ``chips`` inside them as anchors, and the pixels of possible
    missed mines set to ignore in them."""
    path = Path(chips_dir) / "blocks.parquet"
    if not path.is_file():
        return None, 0
    table = pd.read_parquet(path)
    if "image" not in table.columns:
        return None, 0
    table = table[(table["split"] == split) & table["image"].notna()]
    if not len(table):
        return None, 0
    images, masks, ignored = [], [], 0
    for row in table.itertuples():
        x, y, n = _read_pair(Path(chips_dir) / row.image, Path(chips_dir) / row.mask, ignore)
        images.append(x)
        masks.append(y)
        ignored += n
    keys = [(int(bx), int(by)) for bx, by in zip(table.bx, table.by)]
    anchors = []
    if chips is not None and {"col", "row"} <= set(chips.columns):
        block = int(read_meta(chips_dir)["block_size"])
        where = {k: i for i, k in enumerate(keys)}
        for c, r in zip(chips.loc[chips.kind == "background", "col"], chips.loc[chips.kind == "background", "row"]):
            i = where.get((int(c) // block, int(r) // block))
            if i is not None:
                anchors.append((i, int(r) - keys[i][1] * block, int(c) - keys[i][0] * block))
    return BlockSet(images, masks, keys, anchors), ignored


def band_statistics(images, masks) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-band mean, std, 99th and 99.9th percentile over the valid pixels of the training chips or blocks
    (``images``: arrays (bands, h, w) of any sizes, or one (n, bands, h, w) array; ``masks`` alike)."""
    px = np.concatenate([x[:, y != 255] for x, y in zip(images, masks)], axis=1)  # (bands, n)
    p99, p999 = np.percentile(px, (99, 99.9), axis=1)
    return px.mean(1), np.maximum(px.std(1), 1e-6), p99, p999


class _Augment:
    """Random crops (``crop``: side of the square), flips, rotations and photometric jitter on raw reflectance
    (before normalisation).

    - gain: one for the chip and one per band (another sensor calibration or season);
    - haze: a blend towards a grey-white level (path radiance, about equal in every band), with the level drawn
      around the median of the per-band 99th percentiles and a thickness that varies smoothly across the chip,
      as real haze is patchy: it lowers contrast and lifts dark pixels, which is what makes a hazy year look
      unlike the training year;
    - cloud shadows: soft patches darkened to 40-70 %, labels unchanged (a mine in shadow is still a mine).
    """

    def __init__(self, p99: np.ndarray, seed: int, crop: int | None = None) -> None:
        self.haze_level = float(np.median(p99))
        self.gen = torch.Generator().manual_seed(seed)
        self.crop = crop

    def _field(self, h: int, w: int, cells: int = 4) -> torch.Tensor:
        """A smooth random field (h, w) with zero mean and unit spread, from a coarse grid upsampled."""
        coarse = torch.randn(1, 1, cells, cells, generator=self.gen)
        return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0, 0]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) raw reflectance, y: (B, H, W); returns augmented copies."""
        g = self.gen
        out_x, out_y = [], []
        for xi, yi in zip(x, y):
            k = int(torch.randint(0, 4, (1,), generator=g))
            xi, yi = torch.rot90(xi, k, (1, 2)), torch.rot90(yi, k, (0, 1))
            if torch.rand(1, generator=g) < 0.5:
                xi, yi = xi.flip(2), yi.flip(1)
            c, h, w = xi.shape
            if self.crop and self.crop < min(h, w):  # a random square: fewer pixels per step, more positions
                r0, c0 = (int(torch.randint(0, n - self.crop + 1, (1,), generator=g)) for n in (h, w))
                xi, yi = xi[:, r0:r0 + self.crop, c0:c0 + self.crop], yi[r0:r0 + self.crop, c0:c0 + self.crop]
                h = w = self.crop
            gain = 1 + 0.15 * (2 * torch.rand(1, generator=g) - 1) + 0.05 * (2 * torch.rand(c, 1, 1, generator=g) - 1)
            xi = xi * gain
            if torch.rand(1, generator=g) < 0.3:
                dark = 0.4 + 0.3 * torch.rand(1, generator=g)
                patch = torch.sigmoid(4 * (self._field(h, w) - 1.0))  # soft blobs over about a sixth of the chip
                xi = xi * (1 - (1 - dark) * patch)
            if torch.rand(1, generator=g) < 0.6:
                alpha = (0.45 * torch.rand(1, generator=g) + 0.1 * torch.rand(1, generator=g) * self._field(h, w))
                alpha = alpha.clamp(0, 0.6)
                level = self.haze_level * (0.5 + 0.6 * torch.rand(1, generator=g)) * (
                    1 + 0.1 * (2 * torch.rand(c, 1, 1, generator=g) - 1))
                xi = (1 - alpha) * xi + alpha * level
            out_x.append(xi)
            out_y.append(yi)
        return torch.stack(out_x), torch.stack(out_y)


def _ema(decay: float):
    """Moving-average update with the decay ramped up over the first steps, min(decay, (1 + n) / (10 + n)) at the
    n-th: a short training is not dragged back to its random initial weights."""
    def update(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        return averaged + (current - averaged) * (1 - d)
    return update


def crop_size(cfg: TrainConfig, chip_size: int) -> int | None:
    """Side of the random square that training takes from each chip (None: the whole chip)."""
    if cfg.crop_size is not None:
        if cfg.crop_size % 32:
            raise InputError(f"train.crop_size {cfg.crop_size}: must be a multiple of 32")
        return cfg.crop_size if cfg.crop_size < chip_size else None
    return chip_size - 64 if chip_size >= 256 else None


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """BCE + soft Dice on pixels whose target is 0 or 1 (255 ignored). logits, target: (B, H, W)."""
    valid = target != 255
    t = (target == 1).float()
    bce = F.binary_cross_entropy_with_logits(logits[valid], t[valid]) if valid.any() else logits.sum() * 0
    p = torch.sigmoid(logits) * valid
    inter = (p * t).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + (t * valid).sum() + 1)
    return bce + dice_weight * dice



@torch.no_grad()
def _chip_logits(model, images: torch.Tensor, mean, std, device, batch: int = 16,
                 precision: torch.dtype | None = None) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = ((images[i:i + batch] - mean) / std).to(device)
        out.append(forward_logits(model, x, precision).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + tuple(images.shape[-2:]), np.float32)


def _tiles(n: int, size: int) -> list[int]:
    """Origins of windows of ``size`` covering [0, n): every ``size`` px, the last one flush with the end."""
    return sorted({*range(0, max(n - size, 0) + 1, size), max(n - size, 0)})


@torch.no_grad()
def _block_logits(model, blocks: BlockSet, mean, std, device, size: int, batch: int = 16,
                  precision: torch.dtype | None = None) -> list[np.ndarray]:
    """Logits of every pixel of each block, mapped wall to wall by windows of ``size`` (where the last window of
    a row or column overlaps the one before, the two are averaged)."""
    model.eval()
    out = []
    for x in blocks.images:
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
        out.append(acc / np.maximum(n, 1))
    return out


class _Held:
    """A held-out split as training judges it: its blocks mapped wall to wall where the chips folder has them,
    else its chips."""

    def __init__(self, blocks: BlockSet | None, chips: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.blocks, self.chips = blocks, chips

    @property
    def kind(self) -> str:
        return "blocks, wall to wall" if self.blocks is not None else "chips"

    @property
    def positive_pixels(self) -> int:
        if self.blocks is not None:
            return self.blocks.positive_pixels
        return int((self.chips[1] == 1).sum()) if self.chips is not None else 0

    def __bool__(self) -> bool:
        return self.blocks is not None or (self.chips is not None and len(self.chips[0]) > 0)

    def logits(self, model, mean, std, device, size: int, precision=None) -> tuple[np.ndarray, np.ndarray]:
        """Logits and masks of every pixel that counts (mask 0 or 1), flat."""
        if self.blocks is not None:
            z = _block_logits(model, self.blocks, mean, std, device, size, precision=precision)
            masks = self.blocks.masks
        else:
            z = _chip_logits(model, torch.as_tensor(self.chips[0]), mean, std, device, precision=precision)
            masks = self.chips[1]
        keep = [m != 255 for m in masks]
        return (np.concatenate([zi[k] for zi, k in zip(z, keep)]),
                np.concatenate([m[k] for m, k in zip(masks, keep)]) == 1)


def _best_f1(logits: np.ndarray, truth: np.ndarray) -> dict:
    """Metrics at the threshold of best F1 (a monotone calibration would give the same F1); flat arrays."""
    return best_threshold(*histograms(quantise(1 / (1 + np.exp(-logits))), truth))[1]


@dataclass
class _Data:
    """What a training reads: the training blocks (windows are drawn inside them) and the chips taught as cut
    (hard negatives, reviewed detections), the held-out validation and test, and how many pixels of possible
    missed mines were left out of them."""

    blocks: BlockSet | None
    fixed: pd.DataFrame
    x_fixed: np.ndarray
    y_fixed: np.ndarray
    n_positive: int
    n_other: int
    val: _Held
    test: _Held
    cleaned: int
    cleaned_val: int


def _read_data(dirs: list[Path], index: pd.DataFrame, meta: dict, cfg: TrainConfig) -> _Data:
    tr, va, te = (index[index.split == s] for s in ("train", "val", "test"))
    if len(tr) == 0:
        raise InputError(f"{dirs[0] / 'index.parquet'}: no training chips")
    missed = possible_missed_mines(dirs)
    size = meta["chip_size"]
    # the training blocks whole: each epoch draws its windows anywhere inside them, in place of the fixed grid
    # of positive and background chips; chips of other kinds (hard negatives, reviewed detections) stay as cut
    blocks, cleaned = read_blocks(dirs[0], "train", missed, tr[tr.root == str(dirs[0])])
    drawn = tr.kind.isin(["positive", "background"]).to_numpy() if blocks is not None else np.zeros(len(tr), bool)
    fixed = tr[~drawn]
    n_positive, n_other = int((tr.kind[drawn] == "positive").sum()), int((tr.kind[drawn] == "background").sum())
    if blocks is not None:
        n_positive, n_other = epoch_windows(n_positive, n_other, cfg.epoch_windows)
    if len(fixed):
        x_tr, y_tr, n = _read_chips(fixed, missed)
    else:
        x_tr, y_tr, n = np.zeros((0, len(meta["bands"]), size, size), np.float32), np.zeros((0, size, size), np.uint8), 0
    val, cleaned_va = _held(dirs[0], "val", va, missed)
    test, _ = _held(dirs[0], "test", te, missed)
    if not val:
        log.warning("no validation blocks or chips: model selection and threshold use the training chips")
        val = _Held(blocks, None) if blocks is not None else _Held(None, _read_chips(tr, missed)[:2])
    return _Data(blocks, fixed, x_tr, y_tr, n_positive, n_other, val, test, cleaned + n, cleaned_va)


def _selection(data: _Data, early: bool, patience: int, max_epochs: int, min_val_pixels: int) -> dict:
    """The card's account of how the model was chosen: what it trained on, the validation, the rule."""
    n_windows = data.n_positive + data.n_other
    return {
        "training": (f"{n_windows} windows drawn anywhere inside the training blocks each epoch "
                     f"({data.n_positive} holding a label; random place, flips, rotations)"
                     + (f" and {len(data.fixed)} chips" if len(data.fixed) else "")
                     if data.blocks is not None else "the training chips"),
        "validation": data.val.kind, "validation_positive_pixels": data.val.positive_pixels,
        "rule": (f"early stopping on validation F1 (patience {patience})" if early else
                 f"a fixed schedule of {max_epochs} epochs (the rate halved every {patience}), the last weights "
                 f"kept: the validation holds "
                 f"{data.val.positive_pixels} labelled pixels, fewer than {min_val_pixels}, too few to "
                 "choose an epoch by"),
        "test": data.test.kind if data.test else "none",
    }


def _restore(state_path: Path, run_key: str | None, model, avg, opt, augment: _Augment) -> dict | None:
    """The progress of a training saved under ``run_key`` at ``state_path``, its weights, optimiser and random
    states put back; None (and no state file left) where there is none to resume."""
    saved = None
    if state_path.is_file():
        try:
            saved = _load_state(state_path)
        except Exception as e:  # a truncated or foreign file
            raise ModelError(f"{state_path}: cannot resume from this training state ({e})") from None
        if saved.get("progress", {}).get("key") != run_key:
            log.info("%s was saved by a training with other settings: starting afresh", state_path)
            saved = None
    if saved is None:
        return None
    try:
        model.load_state_dict(saved["model"])
        if avg is not None:
            avg.load_state_dict(saved["average"])
        opt.load_state_dict(saved["optimizer"])
        augment.gen.set_state(saved["augment_rng"])
        torch.set_rng_state(saved["torch_rng"])
    except Exception as e:
        raise ModelError(f"{state_path}: cannot resume from this training state ({e})") from None
    return saved["progress"]


def _epoch_items(data: _Data, fixed_order: np.ndarray, seed: int, epoch: int, size: int) -> tuple[list, np.ndarray]:
    """The epoch's items, ("c", chip) or ("w", block, row, col), and their order: drawn from the seed and the
    epoch alone, so that a resumed training draws what an uninterrupted one would have."""
    rng = np.random.default_rng([seed, epoch])
    items = [("c", int(i)) for i in fixed_order]
    if data.blocks is not None:
        items += [("w", *w) for w in data.blocks.windows(rng, data.n_positive, data.n_other, size)]
    return items, rng.permutation(len(items))


def _choose(st: dict, v: dict, epoch: int, early: bool, patience: int) -> bool:
    """Update the progress ``st`` with the epoch's validation ``v``: True where these weights are kept (a fixed
    schedule keeps each epoch's, early stopping the best); the rate is halved on a schedule or a plateau."""
    if not early:  # a fixed schedule: the rate halves every `patience` epochs, the last weights kept
        st.update(best_f1=v["f1"], best_epoch=epoch + 1)
        if (epoch + 1) % patience == 0:
            st["lr"] /= 2
        return True
    if v["f1"] > st["best_f1"] + MIN_DELTA:
        st.update(best_f1=v["f1"], best_epoch=epoch + 1, bad=0, since_cut=0)
        return True
    st["bad"] += 1
    st["since_cut"] += 1
    if st["since_cut"] >= max(1, patience // 2):  # a plateau: halve the rate
        st["lr"] /= 2
        st["since_cut"] = 0
    return False


def train(chips_dirs: Path | list[Path], model_dir: Path, cfg: TrainConfig | None = None,
          model_cfg: ModelConfig | None = None, resume: bool = False, progress: bool = True,
          init_from: Path | None = None, epochs: int | None = None, patience: int | None = None,
          run_key: str | None = None, review: dict | None = None) -> ModelCard:
    """Stage ``train``: fit a SegFormer on the chips and write the best model to ``model_dir``.

    ``init_from``: a model directory to fine-tune (its weights and band normalisation are kept, the learning
    rate is a third of ``cfg.learning_rate``, without warm-up; the given model counts as epoch 0, so a fine-tune
    that does not beat it on validation keeps it); ``epochs`` and ``patience`` override ``cfg``'s. ``run_key``
    identifies the settings: ``resume`` continues only a state saved under the same key, and a training that
    does not resume starts by removing any older state. ``review``: the counts of reviewers' verdicts the chips
    were made with, recorded in the card.

    In steps: read the data (:func:`_read_data`); build the model and its card; restore a saved state
    (:func:`_restore`); each epoch, draw its windows (:func:`_epoch_items`), take the optimiser's steps,
    validate the averaged weights and keep them or not (:func:`_choose`); then calibrate and test the kept ones.
    """
    cfg = cfg or TrainConfig()
    model_cfg = model_cfg or ModelConfig()
    dirs = [Path(d) for d in ([chips_dirs] if isinstance(chips_dirs, (str, Path)) else chips_dirs)]
    model_dir = Path(model_dir)
    check_output_dir(model_dir, "model")  # a folder of the user's is refused now, not after the first epoch
    meta = read_meta(dirs[0])
    index = read_index(dirs)
    max_epochs = epochs or cfg.epochs
    patience = patience or cfg.patience
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = resolve_device(cfg.device)
    amp = resolve_precision(cfg.precision, device)
    size = meta["chip_size"]

    # 1. the data
    data = _read_data(dirs, index, meta, cfg)
    val, test, blocks = data.val, data.test, data.blocks
    # early stopping needs a validation that a chip or two cannot sway; with fewer labelled pixels than
    # train.min_val_pixels the model is trained on a fixed schedule and the last (averaged) weights kept
    early = val.positive_pixels >= cfg.min_val_pixels
    # a fine-tune whose training and validation chips are those of the given model, unchanged, has nothing new to
    # learn from nor a new judge: it only recalibrates. A possible missed mine in the validation chips is news:
    # the first fit was chosen by a validation that counted it as a false alarm (a model that learnt to see it
    # lost to an earlier, undertrained one), so training goes on, judged without it
    news = (index[index.split == "train"].kind == "hard_negative").any() or data.cleaned > 0 or data.cleaned_val > 0
    if blocks is not None:
        mean_np, std_np, p99, p999 = band_statistics(blocks.images, blocks.masks)
    else:
        mean_np, std_np, p99, p999 = band_statistics(data.x_fixed, data.y_fixed)

    # 2. the model and its card
    if init_from is not None:
        model, base = load_model(init_from, "cpu")
        encoder = base.encoder
        mean_np, std_np = np.asarray(base.band_mean, np.float32), np.asarray(base.band_std, np.float32)
    else:
        encoder = model_cfg.encoder
        model = build_model(encoder, len(meta["bands"]))
        if model_cfg.pretrained:
            load_pretrained_encoder(model, model_cfg.pretrained)
    mean = torch.as_tensor(mean_np, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(std_np, dtype=torch.float32)[:, None, None]
    card = ModelCard(
        encoder=encoder, bands=meta["bands"], band_mean=mean_np.tolist(), band_std=std_np.tolist(),
        gsd_m=meta["gsd_m"], pixel_size=meta["pixel_size"], crs=meta["crs"], chip_size=meta["chip_size"],
        train_year=meta.get("year"), labels_fingerprint=meta.get("labels_fingerprint"),
        pretrained=str(model_cfg.pretrained) if model_cfg.pretrained else None, splits=split_summary(index),
        cloud_level=(CLOUD_FACTOR * p999).round(1).tolist() if init_from is None else base.cloud_level,
        hard_negatives=next((m["hard_negatives"] for m in map(read_meta, dirs[1:]) if "hard_negatives" in m), {}),
        precision="bf16" if amp is not None else "fp32", review=review or {},
        selection=_selection(data, early, patience, max_epochs, cfg.min_val_pixels),
    )
    model.to(device)
    # the weights validated and saved: an exponential moving average over steps (Polyak averaging), whose
    # validation curve is far steadier than the last step's, so early stopping and model choice rest on signal
    avg = AveragedModel(model, avg_fn=_ema(cfg.ema_decay), use_buffers=True) if cfg.ema_decay > 0 else None
    base_lr = cfg.learning_rate / 3 if init_from is not None else cfg.learning_rate
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=cfg.weight_decay)
    per_epoch = len(data.fixed) + (data.n_positive + data.n_other if blocks is not None else 0)
    warmup = -(-per_epoch // cfg.batch_size) if init_from is None else 0  # one epoch of steps
    augment = _Augment(p99, cfg.seed, crop_size(cfg, meta["chip_size"]))

    # 3. a saved state of this very training, if asked to resume
    state_path = model_dir / STATE
    saved = _restore(state_path, run_key, model, avg, opt, augment) if resume else None
    if saved is None:
        state_path.unlink(missing_ok=True)  # an older training's state must never be resumed by this one
        st = {"epoch": -1, "best_f1": -1.0, "best_epoch": None, "lr": base_lr, "bad": 0, "since_cut": 0,
              "curve": [], "step": 0}
    else:
        st = saved
        log.info("resuming at epoch %d (best val F1 %.3f)", st["epoch"] + 2, st["best_f1"])
    st["key"] = run_key
    card.stopped = "training in progress"  # until calibrated: the card on disk is not final before then

    xt, yt = torch.as_tensor(data.x_fixed), torch.as_tensor(data.y_fixed.astype(np.int64))
    # each fixed chip once an epoch, those over detections a reviewer rejected REVIEWED_REPEAT times; then as
    # many windows drawn inside the training blocks as there were positive and background chips
    fixed_order = np.repeat(np.arange(len(data.fixed)), np.where(data.fixed.kind.to_numpy() == "reviewed_negative",
                                                                 REVIEWED_REPEAT, 1))
    if avg is not None and saved is None:
        avg.update_parameters(model)  # the average starts from the initial (or given) weights
    judged = avg.module if avg is not None else model

    def judge(m) -> dict:
        return _best_f1(*val.logits(m, mean, std, device, size, amp))

    if init_from is not None and st["best_epoch"] is None:
        # the model to improve on is the one given: a fine-tune that does no better keeps it (epoch 0)
        st["best_f1"] = judge(model)["f1"]
        st["best_epoch"] = card.best_epoch = 0
        save_model(model, card, model_dir)
        if not news:
            log.info("fine-tune: no new training chips or pixels; the given model is kept and recalibrated")
            max_epochs = 0

    # 4. the epochs
    bar = tqdm(range(st["epoch"] + 1, max_epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        if early and st["bad"] >= patience:
            break
        model.train()
        items, order = _epoch_items(data, fixed_order, cfg.seed, epoch, size)
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            for group in opt.param_groups:
                group["lr"] = st["lr"] * min(1.0, (st["step"] + 1) / warmup) if warmup else st["lr"]
            xb, yb = _batch([items[k] for k in order[i:i + cfg.batch_size]], xt, yt, blocks, size)
            xb, yb = augment(xb, yb)
            xb = ((xb - mean) / std).to(device)
            loss = segmentation_loss(forward_logits(model, xb, amp), yb.to(device), cfg.dice_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if avg is not None:
                avg.update_parameters(model)
            st["step"] += 1
            losses.append(float(loss.detach()))
        v = judge(judged)
        st["curve"].append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 5), "lr": st["lr"],
                            "val_f1": round(v["f1"], 5), "val_iou": round(v["iou"], 5),
                            "val_threshold": v["threshold"]})
        if _choose(st, v, epoch, early, patience):
            card.epochs_trained = card.best_epoch = epoch + 1
            save_model(judged, card, model_dir)
        st["epoch"] = epoch
        _save_state(state_path, model, opt, augment, st, avg)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_f1=f"{v['f1']:.3f}", best=f"{st['best_f1']:.3f}")
        log.info("epoch %d: loss %.4f, val F1 %.3f (best %.3f at epoch %s), lr %.2g", epoch + 1, np.mean(losses),
                 v["f1"], st["best_f1"], st["best_epoch"], st["lr"])
    if st["best_epoch"] is None:
        raise ModelError(f"{model_dir}: training ran no epoch (epochs {max_epochs})")

    # 5. the kept weights, calibrated and tested
    model, _ = load_model(model_dir, device)
    card.epochs_trained, card.best_epoch = st["epoch"] + 1, st["best_epoch"]
    card.stopped = (f"early: no better validation F1 for {patience} epochs" if early and st["bad"] >= patience
                    else "nothing new to fine-tune on" if max_epochs == 0 else f"at the cap of {max_epochs} epochs")
    card.val_curve = st["curve"]
    _calibrate_and_test(model, card, val, test, mean, std, device, size, amp)
    save_model(model, card, model_dir)
    return card


def epoch_windows(n_positive: int, n_other: int, least: int) -> tuple[int, int]:
    """Windows an epoch draws inside the training blocks, positives and others: as many as the chips cut, or
    ``least`` in all in the same proportion (at least one of each kind the chips had)."""
    n = n_positive + n_other
    if n == 0 or n >= least:
        return n_positive, n_other
    pos = int(round(least * n_positive / n))
    pos = min(max(pos, int(n_positive > 0)), least - int(n_other > 0))
    return pos, least - pos


def _held(chips_dir: Path, split: str, chips: pd.DataFrame, missed) -> tuple[_Held, int]:
    """A held-out split: its blocks where the folder has them, else its chips; and the possible missed mines'
    pixels ignored in it."""
    blocks, n = read_blocks(chips_dir, split, missed)
    if blocks is not None:
        return _Held(blocks, None), n
    if not len(chips):
        return _Held(None, None), 0
    x, y, n = _read_chips(chips, missed)
    return _Held(None, (x, y)), n


def _batch(items: list[tuple], xt: torch.Tensor, yt: torch.Tensor, blocks: BlockSet | None,
           size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and masks of a batch of fixed chips ("c", index) and windows ("w", block, row, col)."""
    chips = [it[1] for it in items if it[0] == "c"]
    windows = [it[1:] for it in items if it[0] == "w"]
    xs, ys = [], []
    if chips:
        xs.append(xt[chips])
        ys.append(yt[chips])
    if windows:
        x, y = blocks.cut(windows, size)
        xs.append(torch.from_numpy(x))
        ys.append(torch.from_numpy(y.astype(np.int64)))
    return torch.cat(xs), torch.cat(ys)


def _calibrate_and_test(model, card: ModelCard, val: _Held, test: _Held, mean, std, device, size: int,
                        precision: torch.dtype | None = None) -> None:
    """Fit the calibration and the threshold on the validation blocks (or chips); test metrics and calibration
    error on the test blocks (or chips)."""
    logits, truth = val.logits(model, mean, std, device, size, precision)
    z, t = logits, truth
    if len(z) > CALIBRATION_PIXELS:  # a fixed random subset: two parameters need no more
        pick = np.random.default_rng(0).choice(len(z), CALIBRATION_PIXELS, replace=False)
        z, t = z[pick], t[pick]
    scale, bias = fit_platt(z, t)
    card.calibration = {"method": "platt", "scale": scale, "bias": bias}
    hv = histograms(quantise(card.calibrate(logits)), truth)
    card.threshold, card.val_metrics = best_threshold(*hv)
    card.val_metrics["calibration"] = reliability(*hv)
    if test:
        zt, tt = test.logits(model, mean, std, device, size, precision)
        ht = histograms(quantise(card.calibrate(zt)), tt)
        card.test_metrics = {**metrics_at(*ht, card.threshold), "calibration": reliability(*ht)}


def weak_model_error(card: ModelCard, floor: float, model_dir: Path) -> ModelError | None:
    """The error that stops a run whose model is below the validation floor, or None (also for a model without
    validation figures, such as an imported one: nothing to judge it by)."""
    if "f1" not in card.val_metrics:
        return None
    f1 = float(card.val_metrics["f1"])
    if f1 >= floor:
        return None
    return ModelError(
        f"{Path(model_dir) / 'model.json'}: validation F1 {f1:.3f} is below the floor {floor:.2f} (best epoch "
        f"{card.best_epoch}, {card.splits.get('train', {}).get('positive_chips', '?')} positive training chips): "
        "add or check labels, or pass --accept-weak-model to map with it anyway")


def _save_state(path: Path, model, opt, augment: _Augment, progress: dict, avg=None) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "average": avg.state_dict() if avg is not None else None,
                    "augment_rng": augment.gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "progress": progress}, tmp)


def _load_state(path: Path) -> dict:
    """The training state :func:`_save_state` wrote, read as data (torch's weights-only unpickler: tensors, the
    RNG states' byte tensors, numbers, text, lists and dicts): a model folder may come from elsewhere, and a
    pickle may call whatever it names. Anything else is refused in one line naming what the file names."""
    import pickle
    import re

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise ValueError(f"it names {m.group(1)}, which is not plain data: refused, never run") from None
        said = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("Unsupported")]
        raise ValueError(f"not a training state ({said[0] if said else type(e).__name__})"[:200]) from None
