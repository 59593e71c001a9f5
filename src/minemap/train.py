"""Training: a SegFormer on the chips of :mod:`minemap.chips`, until validation stops improving.

Reads one or more chips folders (``index.parquet`` + chip GeoTIFFs: the chips, and the hard negatives of
:func:`minemap.chips.hard_negative_chips`); writes a model directory (``weights.safetensors`` + ``model.json``,
the best epoch by validation F1) and ``train_state.pt`` beside them (last epoch, optimiser, learning rate,
early-stopping counters) so that ``resume=True`` carries on after a crash.

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
  (:data:`minemap.chips.MISSED`) are ignored in every chip, so a mine the labels miss neither teaches the
  model that it is background nor counts against it in validation, calibration or test.
- After training: the best epoch's logits on the validation chips fit a calibration (scale and bias of the
  logit, Platt), the threshold is chosen by F1 on calibrated validation probabilities, and the test chips give
  metrics and the expected calibration error. The card records the per-epoch validation curve.
"""

from __future__ import annotations

import logging
import warnings
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

from minemap._io import atomic_path
from minemap.chips import MISSED, read_meta, split_summary
from minemap.config import ModelConfig, TrainConfig
from minemap.errors import InputError, ModelError
from minemap.geo import WGS84
from minemap.metrics import best_threshold, fit_platt, histograms, metrics_at, reliability
from minemap.rasters import quantise
from minemap.model import (ModelCard, build_model, forward_logits, load_model, load_pretrained_encoder,
                           resolve_device, resolve_precision, save_model)

log = logging.getLogger(__name__)
STATE = "train_state.pt"
CALIBRATION_PIXELS = 2_000_000
MIN_DELTA = 0.002  # a gain in validation F1 smaller than this is noise, not progress
CLOUD_FACTOR = 1.5  # brighter than this x the training chips' 99.9th percentile in every band: a cloud
REVIEWED_REPEAT = 4  # chips over detections a reviewer rejected are seen this many times an epoch


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


def _read_chips(index: pd.DataFrame, ignore: gpd.GeoDataFrame | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Images and masks of the chips; background pixels under ``ignore`` polygons become 255 (and are counted)."""
    images, masks, ignored = [], [], 0
    with warnings.catch_warnings():  # chips of the MMSegmentation layout may be PNGs, with no place on Earth
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for row in index.itertuples():
            root = Path(row.root)
            try:
                with rasterio.open(root / row.image) as src:
                    images.append(src.read().astype(np.float32))
                    transform, crs, shape, bounds = src.transform, src.crs, (src.height, src.width), src.bounds
                with rasterio.open(root / row.mask) as src:
                    masks.append(src.read(1))
            except RasterioError as e:
                raise InputError(f"{root / row.image}: cannot read chip ({e})") from None
            if ignore is not None:
                near = ignore.to_crs(crs).cx[bounds.left:bounds.right, bounds.bottom:bounds.top]
                if len(near):
                    off = rasterize(((g, 1) for g in near.geometry), out_shape=shape, transform=transform, dtype=np.uint8)
                    hit = (off > 0) & (masks[-1] == 0)
                    masks[-1][hit] = 255
                    ignored += int(hit.sum())
    return np.stack(images), np.stack(masks), ignored


def band_statistics(images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-band mean, std, 99th and 99.9th percentile over the valid pixels of the training chips."""
    valid = masks != 255
    px = images.transpose(1, 0, 2, 3)[:, valid]  # (bands, n)
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


def _split_histograms(probs: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = masks != 255
    return histograms(quantise(probs[valid]), masks[valid] == 1)


def _best_f1(logits: np.ndarray, masks: np.ndarray) -> dict:
    """Metrics at the threshold of best F1 (a monotone calibration would give the same F1)."""
    return best_threshold(*_split_histograms(1 / (1 + np.exp(-logits)), masks))[1]


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
    """
    cfg = cfg or TrainConfig()
    model_cfg = model_cfg or ModelConfig()
    dirs = [Path(d) for d in ([chips_dirs] if isinstance(chips_dirs, (str, Path)) else chips_dirs)]
    model_dir = Path(model_dir)
    meta = read_meta(dirs[0])
    index = read_index(dirs)
    max_epochs = epochs or cfg.epochs
    patience = patience or cfg.patience
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = resolve_device(cfg.device)
    amp = resolve_precision(cfg.precision, device)

    tr, va, te = (index[index.split == s] for s in ("train", "val", "test"))
    if len(tr) == 0:
        raise InputError(f"{dirs[0] / 'index.parquet'}: no training chips")
    if len(va) == 0:
        log.warning("no validation chips: model selection and threshold use the training chips")
        va = tr
    missed = possible_missed_mines(dirs)
    x_tr, y_tr, cleaned = _read_chips(tr, missed)
    x_va, y_va, cleaned_va = _read_chips(va, missed)
    # a fine-tune whose training and validation chips are those of the given model, unchanged, has nothing new to
    # learn from nor a new judge: it only recalibrates. A possible missed mine in the validation chips is news:
    # the first fit was chosen by a validation that counted it as a false alarm (a model that learnt to see it
    # lost to an earlier, undertrained one), so training goes on, judged without it
    news = (tr.kind == "hard_negative").any() or cleaned > 0 or cleaned_va > 0
    mean_np, std_np, p99, p999 = band_statistics(x_tr, y_tr)
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
        pretrained=model_cfg.pretrained, splits=split_summary(index),
        cloud_level=(CLOUD_FACTOR * p999).round(1).tolist() if init_from is None else base.cloud_level,
        hard_negatives=next((m["hard_negatives"] for m in map(read_meta, dirs[1:]) if "hard_negatives" in m), {}),
        precision="bf16" if amp is not None else "fp32", review=review or {},
    )
    model.to(device)
    # the weights validated and saved: an exponential moving average over steps (Polyak averaging), whose
    # validation curve is far steadier than the last step's, so early stopping and model choice rest on signal
    avg = AveragedModel(model, avg_fn=_ema(cfg.ema_decay), use_buffers=True) if cfg.ema_decay > 0 else None
    base_lr = cfg.learning_rate / 3 if init_from is not None else cfg.learning_rate
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=cfg.weight_decay)
    warmup = -(-len(tr) // cfg.batch_size) if init_from is None else 0  # one epoch of steps
    augment = _Augment(p99, cfg.seed, crop_size(cfg, meta["chip_size"]))
    st = {"epoch": -1, "best_f1": -1.0, "best_epoch": None, "lr": base_lr, "bad": 0, "since_cut": 0,
          "curve": [], "step": 0}
    state_path = model_dir / STATE
    saved = None
    if resume and state_path.is_file():
        try:
            saved = torch.load(state_path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file
            raise ModelError(f"{state_path}: cannot resume from this training state ({e})") from None
        if saved.get("progress", {}).get("key") != run_key:
            log.info("%s was saved by a training with other settings: starting afresh", state_path)
            saved = None
    if saved is None:
        state_path.unlink(missing_ok=True)  # an older training's state must never be resumed by this one
    else:
        try:
            model.load_state_dict(saved["model"])
            if avg is not None:
                avg.load_state_dict(saved["average"])
            opt.load_state_dict(saved["optimizer"])
            augment.gen.set_state(saved["augment_rng"])
            torch.set_rng_state(saved["torch_rng"])
        except Exception as e:
            raise ModelError(f"{state_path}: cannot resume from this training state ({e})") from None
        st = saved["progress"]
        log.info("resuming at epoch %d (best val F1 %.3f)", st["epoch"] + 2, st["best_f1"])
    st["key"] = run_key
    card.stopped = "training in progress"  # until calibrated: the card on disk is not final before then

    xt, yt = torch.as_tensor(x_tr), torch.as_tensor(y_tr.astype(np.int64))
    # each chip once an epoch, those over detections a reviewer rejected REVIEWED_REPEAT times
    epoch_order = torch.as_tensor(np.repeat(np.arange(len(tr)), np.where(tr.kind.to_numpy() == "reviewed_negative",
                                                                        REVIEWED_REPEAT, 1)))
    xv = torch.as_tensor(x_va)
    if avg is not None and saved is None:
        avg.update_parameters(model)  # the average starts from the initial (or given) weights
    judged = avg.module if avg is not None else model
    if init_from is not None and st["best_epoch"] is None:
        # the model to improve on is the one given: a fine-tune that does no better keeps it (epoch 0)
        st["best_f1"] = _best_f1(_chip_logits(model, xv, mean, std, device, precision=amp), y_va)["f1"]
        st["best_epoch"] = card.best_epoch = 0
        save_model(model, card, model_dir)
        if not news:
            log.info("fine-tune: no new training chips or pixels; the given model is kept and recalibrated")
            max_epochs = 0
    bar = tqdm(range(st["epoch"] + 1, max_epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        if st["bad"] >= patience:
            break
        model.train()
        perm = epoch_order[torch.randperm(len(epoch_order))]
        losses = []
        for i in range(0, len(perm), cfg.batch_size):
            for group in opt.param_groups:
                group["lr"] = st["lr"] * min(1.0, (st["step"] + 1) / warmup) if warmup else st["lr"]
            idx = perm[i:i + cfg.batch_size]
            xb, yb = augment(xt[idx], yt[idx])
            xb = ((xb - mean) / std).to(device)
            loss = segmentation_loss(forward_logits(model, xb, amp), yb.to(device), cfg.dice_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if avg is not None:
                avg.update_parameters(model)
            st["step"] += 1
            losses.append(float(loss.detach()))
        val = _best_f1(_chip_logits(judged, xv, mean, std, device, precision=amp), y_va)
        st["curve"].append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 5), "lr": st["lr"],
                            "val_f1": round(val["f1"], 5), "val_iou": round(val["iou"], 5),
                            "val_threshold": val["threshold"]})
        if val["f1"] > st["best_f1"] + MIN_DELTA:
            st.update(best_f1=val["f1"], best_epoch=epoch + 1, bad=0, since_cut=0)
            card.epochs_trained = card.best_epoch = epoch + 1
            save_model(judged, card, model_dir)
        else:
            st["bad"] += 1
            st["since_cut"] += 1
            if st["since_cut"] >= max(1, patience // 2):  # a plateau: halve the rate
                st["lr"] /= 2
                st["since_cut"] = 0
        st["epoch"] = epoch
        _save_state(state_path, model, opt, augment, st, avg)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_f1=f"{val['f1']:.3f}", best=f"{st['best_f1']:.3f}")
        log.info("epoch %d: loss %.4f, val F1 %.3f (best %.3f at epoch %s), lr %.2g", epoch + 1, np.mean(losses),
                 val["f1"], st["best_f1"], st["best_epoch"], st["lr"])
    if st["best_epoch"] is None:
        raise ModelError(f"{model_dir}: training ran no epoch (epochs {max_epochs})")

    model, _ = load_model(model_dir, device)
    card.epochs_trained, card.best_epoch = st["epoch"] + 1, st["best_epoch"]
    card.stopped = (f"early: no better validation F1 for {patience} epochs" if st["bad"] >= patience
                    else "nothing new to fine-tune on" if max_epochs == 0 else f"at the cap of {max_epochs} epochs")
    card.val_curve = st["curve"]
    _calibrate_and_test(model, card, (x_va, y_va), te, mean, std, device, missed, amp)
    save_model(model, card, model_dir)
    return card


def _calibrate_and_test(model, card: ModelCard, val: tuple[np.ndarray, np.ndarray], te: pd.DataFrame,
                        mean, std, device, missed: gpd.GeoDataFrame | None, precision: torch.dtype | None = None) -> None:
    """Fit the calibration and the threshold on validation chips; test metrics and calibration error."""
    x_va, y_va = val
    logits = _chip_logits(model, torch.as_tensor(x_va), mean, std, device, precision=precision)
    valid = y_va != 255
    z, t = logits[valid], y_va[valid] == 1
    if len(z) > CALIBRATION_PIXELS:  # a fixed random subset: two parameters need no more
        pick = np.random.default_rng(0).choice(len(z), CALIBRATION_PIXELS, replace=False)
        z, t = z[pick], t[pick]
    scale, bias = fit_platt(z, t)
    card.calibration = {"method": "platt", "scale": scale, "bias": bias}
    hv = _split_histograms(card.calibrate(logits), y_va)
    card.threshold, card.val_metrics = best_threshold(*hv)
    card.val_metrics["calibration"] = reliability(*hv)
    if len(te):
        x_te, y_te, _ = _read_chips(te, missed)
        ht = _split_histograms(card.calibrate(_chip_logits(model, torch.as_tensor(x_te), mean, std, device,
                                                                  precision=precision)), y_te)
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
