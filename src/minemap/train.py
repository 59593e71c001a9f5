"""Training: a SegFormer on the chips of :mod:`minemap.chips`, until validation stops improving.

Reads one or more chips folders (``index.parquet`` + chip GeoTIFFs + the blocks written whole: the chips, and the
hard negatives of :func:`minemap.chips.hard_negative_chips`), streamed from disk (:mod:`minemap.trainset`: memory
does not grow with the number of chips); writes a model directory (``weights.safetensors`` + ``model.json``) and
``train_state.pt`` beside them (weights, optimiser, learning rate, early-stopping counters, and the place in
the epoch), saved after every epoch and every ``train.checkpoint_steps`` steps, so that ``resume=True``
carries on after a crash where it stopped, and ends where an uninterrupted training would have.

- What training sees: each epoch draws its windows anywhere inside the training blocks (as many as there are
  positive and background chips: those windows each hold a labelled pixel drawn at random, these lie anywhere,
  at a place drawn anew every epoch), beside the chips cut as they are (hard negatives, detections a reviewer
  rejected). A chips folder without blocks (another layout, an older minemap) trains on its chips.
- What judges it: the validation blocks mapped wall to wall (every pixel, not a handful of chips around
  mines); with fewer than ``train.min_val_pixels`` labelled pixels there, a chip or two would choose the epoch,
  so training runs a fixed schedule and keeps the last weights, as it does wherever ``train.stopping = "fixed"``
  (the default) asks for it. The card says which (``selection``).
- Loss: binary cross-entropy plus soft Dice over valid pixels (mask 255 ignored: no imagery, and the band along
  label outlines): Dice keeps small mines from being swamped by background.
- Augmentation: flips, 90-degree rotations, and a photometric jitter (gain per chip and band, patchy haze
  towards a bright per-band level, cloud shadows) so that hazy, shadowed or differently calibrated years still
  segment.
- Schedule: a warm-up over the first epoch, then a constant rate that halves every ``patience`` epochs of the
  fixed schedule; with early stopping, it halves whenever validation F1 has not improved for ``patience // 2``
  epochs, and training stops after ``patience`` epochs without improvement, or at ``epochs``. Validation F1 is
  taken at its best threshold, so model selection does not depend on calibration.
- Arithmetic: bfloat16 autocast of the forward passes where the device computes it natively, float16 with a
  scaled loss on older GPUs (``train.precision``, see :func:`minemap.model.resolve_precision`); the loss, weights
  and optimiser stay float32. On a GPU the network runs channels-last (``train.channels_last``), optionally
  compiled (``train.compile``), with ``train.loader_workers`` processes reading ahead.
- Several GPUs (or CPU processes) of one machine: run under ``torchrun`` (``torchrun --nproc-per-node N -m
  minemap train ...``): each process takes its share of every epoch's items (DistributedDataParallel), the
  first judges, saves and calibrates; the model and its card are those of one process.
- Pixels of detections that hard-negative mining judged possible missed mines
  (:data:`minemap.formats.chips.MISSED`) are ignored in every chip and block, so a mine the labels miss neither teaches
  the model that it is background nor counts against it in validation, calibration or test.
- After training: the kept weights' logits on the validation blocks fit a calibration (scale and bias of the
  logit, Platt), the threshold is half the best F1 on calibrated validation probabilities, and the test blocks give
  metrics and the calibration errors. The card records the per-epoch validation curve.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from minemap._io import atomic_path, check_output_dir, mark_output_dir
from minemap.config import HardNegativeConfig, ModelConfig, TrainConfig
from minemap.errors import InputError, MinemapError, ModelError
from minemap.formats.chips import possible_missed_mines, read_index, read_meta, split_summary
from minemap.formats.rasters import quantise
from minemap.formats.run import STATE
from minemap.metrics import best_threshold, fit_platt, histograms, metrics_at, operating_threshold, reliability
from minemap.model import (PRECISION_NAMES, ModelCard, build_model, forward_logits, load_model,
                           load_pretrained_encoder, resolve_device, resolve_precision, save_model)
from minemap.trainset import (REVIEWED_REPEAT, Augment, Blocks, HeldOut, Piece, WindowDataset, block_pieces,
                              chip_pieces, scan)

log = logging.getLogger(__name__)
CALIBRATION_PIXELS = 2_000_000
MIN_DELTA = 0.002  # a gain in validation F1 smaller than this is noise, not progress
CLOUD_FACTOR = 1.5  # brighter than this x the training chips' 99.9th percentile in every band: a cloud


def _ema(decay: float):
    """Moving-average update of a group of tensors with the decay ramped up over the first steps, min(decay,
    (1 + n) / (10 + n)) at the n-th: a short training is not dragged back to its random initial weights. Floating
    tensors are updated in place all at once (one pass of each operation over the group, not one per tensor),
    with the arithmetic of ``averaged + (current - averaged) * (1 - d)``; counters (integer buffers) as before."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        if averaged[0].is_floating_point():
            step = torch._foreach_sub(current, averaged)
            torch._foreach_mul_(step, 1 - d)
            torch._foreach_add_(averaged, step)
        else:
            for a, c in zip(averaged, current):
                a.copy_(a + (c - a) * (1 - d))
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



def _histograms(held: HeldOut, model, mean, std, device, size: int, precision=None,
                calibrate=None) -> dict[int | None, tuple[np.ndarray, np.ndarray]]:
    """Histograms of the held-out split's probabilities (sigmoid of the logits, or ``calibrate`` of them) over
    its mine and other pixels, streamed a piece at a time: per year of imagery (None: the labels' year; blocks
    cut again from other years' imagery under theirs)."""
    out: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}
    years = [p.year for p in held.pieces] if held.kind_ == "blocks" else None
    for i, (z, t) in enumerate(held.stream(model, mean, std, device, size, precision)):
        p = calibrate(z) if calibrate is not None else 1 / (1 + np.exp(-z))
        hp, hn = histograms(quantise(p), t)
        year = years[i] if years is not None else None
        pos, neg = out.get(year, (0, 0))
        out[year] = (pos + hp, neg + hn)
    return out


def _pooled(hists: dict) -> tuple[np.ndarray, np.ndarray]:
    """The histograms of every year summed: one threshold maps them all."""
    pos = sum(h[0] for h in hists.values())
    neg = sum(h[1] for h in hists.values())
    return pos, neg


def _by_year(hists: dict, threshold: float, labels_year: int | None) -> dict[str, dict]:
    """Metrics of each year's histograms at one ``threshold`` (the labels' year named by ``labels_year``)."""
    return {str(labels_year if y is None else y): metrics_at(*h, threshold)
            for y, h in sorted(hists.items(), key=lambda kv: -1 if kv[0] is None else kv[0])}


def _best_f1(held: HeldOut, model, mean, std, device, size: int, precision=None,
             labels_year: int | None = None) -> dict:
    """Metrics at the threshold of best F1 over every year's validation pixels pooled (a monotone calibration
    would give the same F1), with each year's at that threshold (``by_year``) where there are several."""
    hists = _histograms(held, model, mean, std, device, size, precision)
    threshold, row = best_threshold(*_pooled(hists))
    if len(hists) > 1:
        row = {**row, "by_year": _by_year(hists, threshold, labels_year)}
    return row


@dataclass
class _Data:
    """What a training reads, as pieces on disk: the training blocks (windows are drawn inside them) and the
    chips taught as cut (hard negatives, reviewed detections), the held-out validation and test, the band
    statistics of the training pixels, and how many pixels of possible missed mines were left out."""

    blocks: Blocks | None
    fixed: pd.DataFrame
    fixed_pieces: list[Piece]
    n_positive: int
    n_other: int
    val: HeldOut
    test: HeldOut
    stats: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    missed: object
    cleaned: int
    cleaned_val: int
    other_years: list[int]  # years whose imagery of the training blocks is taught too (chips.other_years)


def _read_data(dirs: list[Path], index: pd.DataFrame, meta: dict, cfg: TrainConfig) -> _Data:
    """Index the training material and scan it once (:func:`minemap.trainset.scan`): no pixel is kept."""
    tr, va, te = (index[index.split == s] for s in ("train", "val", "test"))
    if len(tr) == 0:
        raise InputError(f"{dirs[0] / 'index.parquet'}: no training chips")
    missed = possible_missed_mines(dirs)
    # the training blocks whole: each epoch draws its windows anywhere inside them, in place of the fixed grid
    # of positive and background chips; chips of other kinds (hard negatives, reviewed detections) stay as cut
    blocks = block_pieces(dirs[0], "train", tr[tr.root == str(dirs[0])])
    drawn = tr.kind.isin(["positive", "background"]).to_numpy() if blocks is not None else np.zeros(len(tr), bool)
    fixed = tr[~drawn]
    fixed_pieces = chip_pieces(fixed)
    n_positive, n_other = int((tr.kind[drawn] == "positive").sum()), int((tr.kind[drawn] == "background").sum())
    if blocks is not None:
        blocks.weighting, blocks.other_share = cfg.positive_windows, cfg.other_years_share
        n_positive, n_other = epoch_windows(n_positive, n_other, cfg.epoch_windows)
        cleaned, stats = scan(blocks.pieces, missed, stats=True, cells=True)
        cleaned += scan(fixed_pieces, missed)[0]
    else:
        cleaned, stats = scan(fixed_pieces, missed, stats=True)
    val, cleaned_va = _held(dirs[0], "val", va, missed)
    if cfg.validation_years == "labels":  # the blocks cut again from other years' imagery left out
        val = HeldOut([p for p in val.pieces if p.year is None], val.kind_, val.ignore)
    test, _ = _held(dirs[0], "test", te, missed)
    if not val:
        log.warning("no validation blocks or chips: model selection and threshold use the training chips")
        val = HeldOut(blocks.pieces, "blocks", missed) if blocks is not None else HeldOut(fixed_pieces, "chips", missed)
    other_years = sorted(int(y) for y in meta.get("other_years", {})) if blocks is not None else []
    return _Data(blocks, fixed, fixed_pieces, n_positive, n_other, val, test, stats.result(), missed,
                 cleaned, cleaned_va, other_years)


def _selection(data: _Data, early: bool, patience: int, max_epochs: int, min_val_pixels: int,
               processes: int = 1, chosen: bool = False) -> dict:
    """The card's account of how the model was chosen: what it trained on, the validation, the rule."""
    n_windows = data.n_positive + data.n_other
    val_years = sorted({p.year for p in data.val.pieces if p.year is not None})
    return {
        "training": (f"{n_windows} windows drawn anywhere inside the training blocks each epoch "
                     f"({data.n_positive} holding a label; random place, flips, rotations)"
                     + (f", the same blocks also from the imagery of {', '.join(map(str, data.other_years))} "
                        "(the same labels)" if data.other_years else "")
                     + (f" and {len(data.fixed)} chips" if len(data.fixed) else "")
                     if data.blocks is not None else "the training chips"),
        "validation": data.val.kind + (f", in the labels' year and again in {', '.join(map(str, val_years))} "
                                       "(changed ground left out); chosen on all of them pooled"
                                       if val_years else ""),
        "validation_positive_pixels": data.val.positive_pixels,
        "rule": (f"early stopping on validation F1 (patience {patience})" if early else
                 f"a fixed schedule of {max_epochs} epochs (the rate halved every {patience}), the last weights "
                 + ("kept (train.stopping = fixed)" if chosen else
                    f"kept: the validation holds {data.val.positive_pixels} labelled pixels, fewer than "
                    f"{min_val_pixels}, too few to choose an epoch by")),
        "test": data.test.kind if data.test else "none",
        "processes": processes,
    }


def _restore(state_path: Path, run_key: str | None, model, avg, opt, scaler) -> dict | None:
    """The progress of a training saved under ``run_key`` at ``state_path``, its weights, optimiser and random
    state put back; None (and no state file left) where there is none to resume."""
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
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
    except Exception as e:
        raise ModelError(f"{state_path}: cannot resume from this training state ({e})") from None
    return saved["progress"]


def _epoch_items(data: _Data, fixed_order: np.ndarray, seed: int, epoch: int, size: int, rank: int = 0,
                 world: int = 1) -> list[tuple[int, tuple]]:
    """The epoch's items in the order they are taught, each with its place in the epoch: ("c", chip) or ("w",
    block, row, col). Drawn from the seed and the epoch alone, so that a resumed training draws what an
    uninterrupted one would have; with ``world`` processes, this one's share (every ``world``-th, from
    ``rank``; the list padded with its first items to a multiple of ``world``, so every process takes as many
    steps)."""
    rng = np.random.default_rng([seed, epoch])
    items = [("c", int(i)) for i in fixed_order]
    if data.blocks is not None:
        items += [("w", *w) for w in data.blocks.windows(rng, data.n_positive, data.n_other, size)]
    order = rng.permutation(len(items))
    placed = [(k, items[i]) for k, i in enumerate(order)]
    if world > 1:
        placed += placed[:(-len(placed)) % world]
        placed = placed[rank::world]
    return placed


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


class _Ranks:
    """The processes of one training: one (rank 0 of 1), or those ``torchrun`` started (its environment names
    them): the first judges, saves and calibrates; what it decides is shared with the others."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device, self.started = device, False
        if self.world > 1:
            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
                self.started = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, value):
        """The first process's ``value``, in every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wait(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Wait for every process, and end the process group this training started."""
        self.wait()
        if self.started:
            dist.destroy_process_group()


def _batches(loader: DataLoader):
    """The loader's batches; a user error raised in a loader process (a chip file gone or broken since the scan)
    comes back as the same one-line error, not wrapped in that process's traceback."""
    try:
        yield from loader
    except MinemapError as e:
        raise type(e)(worker_message(str(e))) from None


def worker_message(text: str) -> str:
    """The error's own line from a DataLoader's re-raised message ("Caught InputError in DataLoader worker
    process 0. Original Traceback ... minemap.errors.InputError: <message>"); other text as it is."""
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.loader_workers is not None:
        return cfg.loader_workers
    return 0 if device.type == "cpu" else min(8, max((os.cpu_count() or 1) - 1, 0))


def train(chips_dirs: Path | list[Path], model_dir: Path, cfg: TrainConfig | None = None,
          model_cfg: ModelConfig | None = None, resume: bool = False, progress: bool = True,
          init_from: Path | None = None, epochs: int | None = None, patience: int | None = None,
          run_key: str | None = None, review: dict | None = None, keep_within: float | None = None) -> ModelCard:
    """Stage ``train``: fit a SegFormer on the chips and write the best model to ``model_dir``.

    ``init_from``: a model directory to fine-tune (its weights and band normalisation are kept, the learning
    rate is a third of ``cfg.learning_rate``, without warm-up; the given model counts as epoch 0, so a fine-tune
    whose validation F1 falls more than ``keep_within`` below it keeps it; None: ``hard_negatives.keep_within``'s
    default, 0: a fine-tune must beat it); ``epochs`` and ``patience`` override ``cfg``'s. ``run_key``
    identifies the settings: ``resume`` continues only a state saved under the same key (at the step it was
    saved, inside an epoch or after it), and a training that does not resume starts by removing any older
    state. ``review``: the counts of reviewers' verdicts the chips were made with, recorded in the card.

    In steps: index and scan the data (:func:`_read_data`); build the model and its card; restore a saved state
    (:func:`_restore`); each epoch, draw its items (:func:`_epoch_items`), stream them through a ``DataLoader``
    into the optimiser's steps, validate the averaged weights and keep them or not (:func:`_choose`); then
    calibrate and test the kept ones.
    """
    cfg = cfg or TrainConfig()
    model_cfg = model_cfg or ModelConfig()
    keep_within = HardNegativeConfig().keep_within if keep_within is None else keep_within
    dirs = [Path(d) for d in ([chips_dirs] if isinstance(chips_dirs, (str, Path)) else chips_dirs)]
    model_dir = Path(model_dir)
    ranks = _Ranks(resolve_device(cfg.device))
    device = ranks.device
    if ranks.main:
        check_output_dir(model_dir, "model")  # a folder of the user's is refused now, not after the first epoch
    meta = read_meta(dirs[0])
    index = read_index(dirs)
    max_epochs = epochs or cfg.epochs
    patience = patience or cfg.patience
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    amp = resolve_precision(cfg.precision, device)
    size = meta["chip_size"]
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"

    # 1. the data, indexed and scanned (no pixel is kept in memory)
    data = _read_data(dirs, index, meta, cfg)
    val, test, blocks = data.val, data.test, data.blocks
    # early stopping needs a validation that a chip or two cannot sway; with fewer labelled pixels than
    # train.min_val_pixels the model is trained on a fixed schedule and the last (averaged) weights kept, as it is
    # where train.stopping asks for it (a fine-tune still stops early, guarded by keep_within, where it can)
    enough = val.positive_pixels >= cfg.min_val_pixels
    chosen_fixed = cfg.stopping == "fixed" and init_from is None
    early = enough and not chosen_fixed
    # a fine-tune whose training and validation chips are those of the given model, unchanged, has nothing new to
    # learn from nor a new judge: it only recalibrates. A possible missed mine in the validation chips is news:
    # the first fit was chosen by a validation that counted it as a false alarm (a model that learnt to see it
    # lost to an earlier, undertrained one), so training goes on, judged without it
    news = (index[index.split == "train"].kind == "hard_negative").any() or data.cleaned > 0 or data.cleaned_val > 0
    mean_np, std_np, p99, p999 = data.stats

    # 2. the model and its card
    if init_from is not None:
        model, base = load_model(init_from, "cpu")
        encoder, head, decoder_channels = base.encoder, base.head, base.decoder_channels
        mean_np, std_np = np.asarray(base.band_mean, np.float32), np.asarray(base.band_std, np.float32)
    else:
        encoder, head, decoder_channels = model_cfg.encoder, model_cfg.head, None
        model = build_model(encoder, len(meta["bands"]), head)
        if model_cfg.pretrained:
            load_pretrained_encoder(model, model_cfg.pretrained)
    mean = torch.as_tensor(mean_np, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(std_np, dtype=torch.float32)[:, None, None]
    card = ModelCard(
        encoder=encoder, head=head, decoder_channels=decoder_channels, bands=meta["bands"],
        band_mean=mean_np.tolist(), band_std=std_np.tolist(),
        gsd_m=meta["gsd_m"], pixel_size=meta["pixel_size"], crs=meta["crs"], chip_size=meta["chip_size"],
        train_year=meta.get("year"), labels_fingerprint=meta.get("labels_fingerprint"),
        pretrained=str(model_cfg.pretrained) if model_cfg.pretrained else None, splits=split_summary(index),
        cloud_level=(CLOUD_FACTOR * p999).round(1).tolist() if init_from is None else base.cloud_level,
        hard_negatives=next((m["hard_negatives"] for m in map(read_meta, dirs[1:]) if "hard_negatives" in m), {}),
        precision=PRECISION_NAMES[amp], review=review or {},
        selection=_selection(data, early, patience, max_epochs, cfg.min_val_pixels, ranks.world,
                             chosen=enough and chosen_fixed),
    )
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # the weights validated and saved: an exponential moving average over steps (Polyak averaging), whose
    # validation curve is far steadier than the last step's, so early stopping and model choice rest on signal
    avg = AveragedModel(model, multi_avg_fn=_ema(cfg.ema_decay), use_buffers=True) if cfg.ema_decay > 0 else None
    base_lr = cfg.learning_rate / 3 if init_from is not None else cfg.learning_rate
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=cfg.weight_decay, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    step_model = DistributedDataParallel(model) if ranks.world > 1 else model
    if cfg.compile:
        step_model = torch.compile(step_model)
    per_epoch = len(data.fixed) + (data.n_positive + data.n_other if blocks is not None else 0)
    steps_per_epoch = -(-(-(-per_epoch // ranks.world)) // cfg.batch_size)
    warmup = steps_per_epoch if init_from is None else 0  # one epoch of steps
    augment = Augment(float(np.median(p99)), crop_size(cfg, meta["chip_size"]))

    # 3. a saved state of this very training, if asked to resume
    state_path = model_dir / STATE
    saved = _restore(state_path, run_key, model, avg, opt, scaler) if resume else None
    if saved is None:
        if ranks.main:
            state_path.unlink(missing_ok=True)  # an older training's state must never be resumed by this one
        st = {"epoch": -1, "best_f1": -1.0, "best_epoch": None, "lr": base_lr, "bad": 0, "since_cut": 0,
              "curve": [], "step": 0, "batch": 0, "losses": []}
    else:
        st = {"batch": 0, "losses": [], **saved}
        log.info("resuming at epoch %d%s (best val F1 %.3f)", st["epoch"] + 2,
                 f", step {st['batch'] + 1} of {steps_per_epoch}" if st["batch"] else "", st["best_f1"])
    st["key"] = run_key
    card.stopped = "training in progress"  # until calibrated: the card on disk is not final before then

    def save_state() -> None:
        if ranks.main:
            mark_output_dir(model_dir, "model")  # a state saved before the first model still marks the folder
            _save_state(state_path, model, opt, st, avg, scaler)

    # each fixed chip once an epoch, those over detections a reviewer rejected REVIEWED_REPEAT times; then as
    # many windows drawn inside the training blocks as there were positive and background chips
    fixed_order = np.repeat(np.arange(len(data.fixed)), np.where(data.fixed.kind.to_numpy() == "reviewed_negative",
                                                                 REVIEWED_REPEAT, 1))
    if avg is not None and saved is None:
        avg.update_parameters(model)  # the average starts from the initial (or given) weights
    judged = avg.module if avg is not None else model

    def judge(m) -> dict:
        v = _best_f1(val, m, mean, std, device, size, amp, meta.get("year")) if ranks.main else None
        return ranks.share(v)

    if init_from is not None and st["best_epoch"] is None:
        # the model to improve on is the one given: a fine-tune that does worse by more than keep_within keeps it
        # (epoch 0); its first epoch within that margin is kept, and each better one after it
        st["given_f1"] = judge(model)["f1"]
        st["best_f1"] = st["given_f1"] - keep_within
        st["best_epoch"] = card.best_epoch = 0
        if ranks.main:
            save_model(model, card, model_dir)
        if not news:
            log.info("fine-tune: no new training chips or pixels; the given model is kept and recalibrated")
            max_epochs = 0
    if init_from is not None and "given_f1" in st:
        card.selection = {**card.selection, "fine_tune": (
            f"the given model is epoch 0 (validation F1 {st['given_f1']:.4f}); the fine-tune's first epoch within "
            f"{keep_within:g} of it is kept, and each better one after it")}

    # 4. the epochs, streamed: a DataLoader reads, augments and normalises the epoch's items (in
    # train.loader_workers processes) ahead of the optimiser's steps
    workers = _loader_workers(cfg, device)
    if ranks.world > 1:
        log.info("process %d of %d: %d steps an epoch", ranks.rank + 1, ranks.world, steps_per_epoch)
    bar = tqdm(range(st["epoch"] + 1, max_epochs), desc="train", unit="epoch", disable=not progress or not ranks.main,
               leave=False)
    for epoch in bar:
        if early and st["bad"] >= patience:
            break
        model.train()
        placed = _epoch_items(data, fixed_order, cfg.seed, epoch, size, ranks.rank, ranks.world)
        dataset = WindowDataset(placed[st["batch"] * cfg.batch_size:], blocks, data.fixed_pieces, size,
                                data.missed, augment, mean_np, std_np, cfg.seed, epoch)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed),
                            persistent_workers=False)
        started, trained = time.perf_counter(), 0
        for xb, yb in _batches(loader):
            trained += len(xb)
            for group in opt.param_groups:
                group["lr"] = st["lr"] * min(1.0, (st["step"] + 1) / warmup) if warmup else st["lr"]
            xb = xb.to(device, non_blocking=True)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            loss = segmentation_loss(forward_logits(step_model, xb, amp), yb.to(device, non_blocking=True),
                                     cfg.dice_weight)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if avg is not None:
                avg.update_parameters(model)
            st["step"] += 1
            st["batch"] += 1
            st["losses"].append(float(loss.detach()))
            if st["step"] % cfg.checkpoint_steps == 0:
                save_state()
        losses, st["batch"], st["losses"] = st["losses"], 0, []
        stepped = time.perf_counter()
        v = judge(judged)
        st["curve"].append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 5), "lr": st["lr"],
                            "val_f1": round(v["f1"], 5), "val_iou": round(v["iou"], 5),
                            "val_threshold": v["threshold"],
                            **({"val_f1_by_year": {y: round(m["f1"], 5) for y, m in v["by_year"].items()}}
                               if "by_year" in v else {})})
        if _choose(st, v, epoch, early, patience):
            card.epochs_trained = card.best_epoch = epoch + 1
            if ranks.main:
                save_model(judged, card, model_dir)
        st["epoch"] = epoch
        save_state()
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_f1=f"{v['f1']:.3f}", best=f"{st['best_f1']:.3f}")
        log.info("epoch %d: loss %.4f, val F1 %.3f (best %.3f at epoch %s), lr %.2g; %d windows in %.2f s of "
                 "reading and steps, %.2f s of validating and saving", epoch + 1, np.mean(losses), v["f1"],
                 st["best_f1"], st["best_epoch"], st["lr"], trained, stepped - started, time.perf_counter() - stepped)
    if st["best_epoch"] is None:
        raise ModelError(f"{model_dir}: training ran no epoch (epochs {max_epochs})")
    ranks.wait()
    if not ranks.main:  # the first process calibrates, tests and writes the card
        ranks.close()
        return load_model(model_dir, "cpu")[1]

    # 5. the kept weights, calibrated and tested
    model, _ = load_model(model_dir, device)
    card.epochs_trained, card.best_epoch = st["epoch"] + 1, st["best_epoch"]
    card.stopped = (f"early: no better validation F1 for {patience} epochs" if early and st["bad"] >= patience
                    else "nothing new to fine-tune on" if max_epochs == 0 else f"at the cap of {max_epochs} epochs")
    card.val_curve = st["curve"]
    _calibrate_and_test(model, card, val, test, mean, std, device, size, amp, meta.get("year"))
    save_model(model, card, model_dir)
    ranks.close()
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


def _held(chips_dir: Path, split: str, chips: pd.DataFrame, missed) -> tuple[HeldOut, int]:
    """A held-out split: its blocks where the folder has them, else its chips, scanned; and the pixels of
    possible missed mines ignored in it."""
    blocks = block_pieces(chips_dir, split)
    held = HeldOut(blocks.pieces, "blocks", missed) if blocks is not None else HeldOut(chip_pieces(chips), "chips", missed)
    return held, scan(held.pieces, missed)[0]


def _calibrate_and_test(model, card: ModelCard, val: HeldOut, test: HeldOut, mean, std, device, size: int,
                        precision: torch.dtype | None = None, labels_year: int | None = None) -> None:
    """Fit the calibration on the validation blocks (or chips) of every year: at most :data:`CALIBRATION_PIXELS`
    of their logits, a fixed random share of every piece; then the threshold on their calibrated probabilities
    (a second pass), with each year's metrics there. Test metrics and calibration error on the test blocks (or
    chips)."""
    share = min(1.0, CALIBRATION_PIXELS / max(val.valid_pixels, 1))
    rng = np.random.default_rng(0)
    z, t = [], []
    for zi, ti in val.stream(model, mean, std, device, size, precision):
        keep = rng.random(len(zi)) < share if share < 1 else slice(None)
        z.append(zi[keep])
        t.append(ti[keep])
    scale, bias = fit_platt(np.concatenate(z) if z else np.zeros(0), np.concatenate(t) if t else np.zeros(0))
    del z, t
    card.calibration = {"method": "platt", "scale": scale, "bias": bias}
    hists = _histograms(val, model, mean, std, device, size, precision, card.calibrate)
    hv = _pooled(hists)
    card.threshold, card.val_metrics = operating_threshold(*hv)
    card.val_metrics["calibration"] = reliability(*hv)
    if len(hists) > 1:
        card.val_metrics["by_year"] = _by_year(hists, card.threshold, labels_year)
    if test:
        ht = _pooled(_histograms(test, model, mean, std, device, size, precision, card.calibrate))
        card.test_metrics = {**metrics_at(*ht, card.threshold), "calibration": reliability(*ht)}


def weak_model_error(card: ModelCard, floor: float, model_dir: Path, min_pixels: int = 0) -> ModelError | None:
    """The error that stops a run whose model is below the validation floor, or None (also for a model without
    validation figures, such as an imported one: nothing to judge it by).

    A validation with fewer than ``min_pixels`` labelled pixels (``train.min_val_pixels``, the same bound that
    keeps it from choosing an epoch) is too small to judge a model by alone: one block of hard ground sways it
    (a fresh benchmark scene: validation F1 0.26 on 3,099 pixels, test blocks 0.76). There the floor judges the
    validation and test blocks pooled, and where those together are still too few it warns and does not stop.
    """
    if "f1" not in card.val_metrics:
        return None
    f1 = float(card.val_metrics["f1"])
    if f1 >= floor:
        return None
    what = "validation F1"
    n_val = card.selection.get("validation_positive_pixels")
    if n_val is not None and n_val < min_pixels:
        parts = [m for m in (card.val_metrics, card.test_metrics) if all(k in m for k in ("tp", "fp", "fn"))]
        tp, fp, fn = (sum(int(m[k]) for m in parts) for k in ("tp", "fp", "fn"))
        if tp + fn < min_pixels:
            log.warning("%s: validation F1 %.3f is below the floor %.2f, but the validation and test blocks hold "
                        "%d labelled pixels, fewer than train.min_val_pixels (%d): too few to judge the model by, "
                        "so the run goes on; check its maps", Path(model_dir) / "model.json", f1, floor,
                        tp + fn, min_pixels)
            return None
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        if f1 >= floor:
            return None
        what = f"F1 of the validation and test blocks pooled (the validation's {n_val} labelled pixels alone too few)"
    return ModelError(
        f"{Path(model_dir) / 'model.json'}: {what} {f1:.3f} is below the floor {floor:.2f} (best epoch "
        f"{card.best_epoch}, {card.splits.get('train', {}).get('positive_chips', '?')} positive training chips): "
        "add or check labels, or pass --accept-weak-model to map with it anyway")


def _save_state(path: Path, model, opt, progress: dict, avg=None, scaler=None) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "average": avg.state_dict() if avg is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                    "torch_rng": torch.get_rng_state(), "progress": progress}, tmp)


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
