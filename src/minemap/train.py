"""Training: a SegFormer on the chips of :mod:`minemap.chips`, with validation, best checkpoint and resume.

Reads ``chips/index.parquet`` and the chip GeoTIFFs; writes a model directory (``weights.safetensors`` +
``model.json``, the best epoch by validation IoU) and ``train_state.pt`` beside them (last epoch, optimiser,
scheduler) so that ``resume=True`` carries on after a crash.

Loss: binary cross-entropy plus soft Dice over valid pixels (mask 255 ignored): Dice keeps small mines from
being swamped by background. Augmentation: flips, 90-degree rotations, and a photometric jitter (gain, offset,
haze towards a bright per-band level) so that hazy or differently calibrated years still segment.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.errors import RasterioError
from tqdm.auto import tqdm

from minemap._io import atomic_path
from minemap.config import ModelConfig, TrainConfig
from minemap.errors import InputError, ModelError
from minemap.metrics import best_threshold, histograms, metrics_at, quantise
from minemap.model import ModelCard, build_model, load_model, load_pretrained_encoder, save_model

log = logging.getLogger(__name__)
STATE = "train_state.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise InputError(f"device {name!r}: {e}") from None


def _read_chips(chips_dir: Path, index: gpd.GeoDataFrame) -> tuple[np.ndarray, np.ndarray]:
    images, masks = [], []
    for row in index.itertuples():
        try:
            with rasterio.open(chips_dir / row.image) as src:
                images.append(src.read().astype(np.float32))
            with rasterio.open(chips_dir / row.mask) as src:
                masks.append(src.read(1))
        except RasterioError as e:
            raise InputError(f"{chips_dir / row.image}: cannot read chip ({e})") from None
    return np.stack(images), np.stack(masks)


def band_statistics(images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-band mean, std and 99th percentile over the valid pixels of the training chips."""
    valid = masks != 255
    px = images.transpose(1, 0, 2, 3)[:, valid]  # (bands, n)
    return px.mean(1), np.maximum(px.std(1), 1e-6), np.percentile(px, 99, axis=1)


class _Augment:
    """Flips, rotations and photometric jitter on raw reflectance (before normalisation).

    Haze is modelled as a blend towards a grey-white level (path radiance, about equal in every band), with the
    level drawn around the median of the per-band 99th percentiles: it lowers contrast and lifts dark pixels,
    which is what makes a hazy year look unlike the training year.
    """

    def __init__(self, p99: np.ndarray, seed: int) -> None:
        self.haze_level = float(np.median(p99))
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) raw reflectance, y: (B, H, W); returns augmented copies."""
        g = self.gen
        out_x, out_y = [], []
        for xi, yi in zip(x, y):
            k = int(torch.randint(0, 4, (1,), generator=g))
            xi, yi = torch.rot90(xi, k, (1, 2)), torch.rot90(yi, k, (0, 1))
            if torch.rand(1, generator=g) < 0.5:
                xi, yi = xi.flip(2), yi.flip(1)
            gain = 1 + 0.15 * (2 * torch.rand(1, generator=g) - 1) + 0.05 * (2 * torch.rand(xi.shape[0], 1, 1, generator=g) - 1)
            xi = xi * gain
            if torch.rand(1, generator=g) < 0.5:
                alpha = 0.5 * torch.rand(1, generator=g)
                level = self.haze_level * (0.5 + 0.6 * torch.rand(1, generator=g)) * (
                    1 + 0.1 * (2 * torch.rand(xi.shape[0], 1, 1, generator=g) - 1))
                xi = (1 - alpha) * xi + alpha * level
            out_x.append(xi)
            out_y.append(yi)
        return torch.stack(out_x), torch.stack(out_y)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """BCE + soft Dice on pixels whose target is 0 or 1 (255 ignored). logits, target: (B, H, W)."""
    valid = target != 255
    t = (target == 1).float()
    bce = F.binary_cross_entropy_with_logits(logits[valid], t[valid]) if valid.any() else logits.sum() * 0
    p = torch.sigmoid(logits) * valid
    inter = (p * t).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + (t * valid).sum() + 1)
    return bce + dice_weight * dice


def forward_probability(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits upsampled to the input size: (B, H, W)."""
    logits = model(pixel_values=x).logits
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


@torch.no_grad()
def _predict_chips(model, images: torch.Tensor, mean, std, device, batch: int = 16) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = ((images[i:i + batch] - mean) / std).to(device)
        out.append(torch.sigmoid(forward_probability(model, x)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + tuple(images.shape[-2:]), np.float32)


def _split_histograms(probs: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = masks != 255
    return histograms(quantise(probs[valid]), masks[valid] == 1)


def train(chips_dir: Path, model_dir: Path, cfg: TrainConfig | None = None, model_cfg: ModelConfig | None = None,
          resume: bool = False, progress: bool = True) -> ModelCard:
    """Stage ``train``: fit a SegFormer on ``chips_dir`` and write the best model to ``model_dir``."""
    cfg = cfg or TrainConfig()
    model_cfg = model_cfg or ModelConfig()
    chips_dir, model_dir = Path(chips_dir), Path(model_dir)
    index_path, meta_path = chips_dir / "index.parquet", chips_dir / "meta.json"
    if not index_path.is_file() or not meta_path.is_file():
        raise InputError(f"{chips_dir}: not a chips folder (index.parquet or meta.json missing)")
    index = gpd.read_parquet(index_path)
    meta = json.loads(meta_path.read_text())
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = resolve_device(cfg.device)

    tr = index[index.split == "train"]
    va = index[index.split == "val"]
    te = index[index.split == "test"]
    if len(tr) == 0:
        raise InputError(f"{index_path}: no training chips")
    if len(va) == 0:
        log.warning("no validation chips: model selection and threshold use the training chips")
        va = tr
    x_tr, y_tr = _read_chips(chips_dir, tr)
    x_va, y_va = _read_chips(chips_dir, va)
    mean_np, std_np, p99 = band_statistics(x_tr, y_tr)
    mean = torch.as_tensor(mean_np, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(std_np, dtype=torch.float32)[:, None, None]

    card = ModelCard(
        encoder=model_cfg.encoder, bands=meta["bands"], band_mean=mean_np.tolist(), band_std=std_np.tolist(),
        gsd_m=meta["gsd_m"], pixel_size=meta["pixel_size"], crs=meta["crs"], chip_size=meta["chip_size"],
        train_year=meta.get("year"), labels_fingerprint=meta.get("labels_fingerprint"),
        pretrained=model_cfg.pretrained,
    )
    model = build_model(model_cfg.encoder, len(card.bands))
    if model_cfg.pretrained:
        load_pretrained_encoder(model, model_cfg.pretrained)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / total) ** 0.9)
    augment = _Augment(p99, cfg.seed)
    start_epoch, best_iou, best_epoch = 0, -1.0, None
    state_path = model_dir / STATE
    if resume and state_path.is_file():
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=False)
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            augment.gen.set_state(st["augment_rng"])
            torch.set_rng_state(st["torch_rng"])
        except Exception as e:  # a truncated or foreign file
            raise ModelError(f"{state_path}: cannot resume from this training state ({e})") from None
        start_epoch, best_iou, best_epoch = st["epoch"] + 1, st["best_iou"], st["best_epoch"]
        log.info("resuming at epoch %d (best val IoU %.3f)", start_epoch + 1, best_iou)

    xt, yt = torch.as_tensor(x_tr), torch.as_tensor(y_tr.astype(np.int64))
    xv = torch.as_tensor(x_va)
    bar = tqdm(range(start_epoch, cfg.epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(xt))
        losses = []
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb, yb = augment(xt[idx], yt[idx])
            xb = ((xb - mean) / std).to(device)
            loss = segmentation_loss(forward_probability(model, xb), yb.to(device), cfg.dice_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        probs = _predict_chips(model, xv, mean, std, device)
        val = metrics_at(*_split_histograms(probs, y_va), 0.5)
        if val["iou"] > best_iou:
            best_iou, best_epoch = val["iou"], epoch + 1
            card.epochs_trained, card.best_epoch, card.val_metrics = epoch + 1, best_epoch, val
            save_model(model, card, model_dir)
        _save_state(state_path, model, opt, sched, augment, epoch, best_iou, best_epoch)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_iou=f"{val['iou']:.3f}", best=f"{best_iou:.3f}")
        log.info("epoch %d: loss %.4f, val IoU %.3f", epoch + 1, np.mean(losses), val["iou"])

    model, card = load_model(model_dir, device)
    card.epochs_trained = cfg.epochs
    card.threshold, card.val_metrics = best_threshold(*_split_histograms(_predict_chips(model, xv, mean, std, device), y_va))
    if len(te):
        x_te, y_te = _read_chips(chips_dir, te)
        probs = _predict_chips(model, torch.as_tensor(x_te), mean, std, device)
        card.test_metrics = metrics_at(*_split_histograms(probs, y_te), card.threshold)
    save_model(model, card, model_dir)
    return card


def _save_state(path: Path, model, opt, sched, augment: _Augment, epoch: int, best_iou: float, best_epoch) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "augment_rng": augment.gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "epoch": epoch, "best_iou": best_iou, "best_epoch": best_epoch}, tmp)
