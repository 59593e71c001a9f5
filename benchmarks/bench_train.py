"""Training against its floor, and memory against the number of chips (issue 21's baseline).

Prints, from one run (figures as ratios, since machines are noisy):

1. throughput: chips a second of the `train` stage over its epochs (reading the chips, augmenting, the
   optimiser's steps, validating, saving), and of its epochs' loops alone (reading, augmenting, steps: the
   training's own throughput, as the stage logs it), against the floor: the bare forward + backward + optimiser step of the
   same model, batch size and precision on tensors already in memory, for as many chips. Goal (issue 21) >= 0.8.
2. memory: peak RSS of `train` (one epoch) on N chips and on 10 N chips (default 2,000 and 20,000), each in a
   fresh process. Goal <= 1.2: memory must not grow with the label set (training streams its chips from disk).

The chips folders are synthetic (random digital numbers, a square mine in half the chips), written as minemap
writes chips (uint16, deflate) without blocks, so that training reads chips (the path of a large, worldwide label set).
Writes ``benchmarks/results/train-<date>-<commit>.json``.
Run: `make bench` or `.venv/bin/python benchmarks/bench_train.py [--chips 200] [--size 64] [--epochs 2]
[--loader-workers 1] [--no-memory]` (``--no-memory``: the throughput alone, for comparing settings in one sitting).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
import torch
from affine import Affine
from rasterio.crs import CRS

from minemap.chips.writing import _write_chip
from minemap.config import ModelConfig, TrainConfig
from minemap.lattice import Grid
from minemap.model import build_model, forward_logits, resolve_device, resolve_precision
from minemap.train import _loader_workers, segmentation_loss, train
from results_file import write_results

BANDS = ["red", "green", "blue", "nir"]
GOALS = {"throughput_vs_floor": 0.8, "rss_ratio": 1.2}


def write_chips(dest: Path, n: int, size: int, seed: int = 0) -> Path:
    """A chips folder of ``n`` chips of ``size`` px (70 % train, 15 % val, 15 % test)."""
    rng = np.random.default_rng(seed)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "masks").mkdir(exist_ok=True)
    res = 4.77
    rows = []
    for i in range(n):
        t = Affine(res, 0, 500_000 + i * size * res, 0, -res, 600_000)
        x = rng.normal(1000, 150, (4, size, size)).astype(np.float32)
        y = np.zeros((size, size), np.uint8)
        if i % 2 == 0:
            a, b = sorted(rng.integers(0, size, 2))
            y[a:b + 1, a:b + 1] = 1
            x[:, y == 1] += 600
        split = "train" if i % 20 < 14 else "val" if i % 20 < 17 else "test"
        grid = Grid(CRS.from_epsg(32630), t, size, size)  # written as minemap writes chips (digital numbers)
        _write_chip(dest / "images" / f"{i}.tif", np.rint(x), grid, BANDS)
        _write_chip(dest / "masks" / f"{i}.tif", y[None], grid, ["mask"])
        rows.append({"chip_id": str(i), "split": split, "kind": "positive" if y.any() else "background",
                     "image": f"images/{i}.tif", "mask": f"masks/{i}.tif", "positive_pixels": int(y.sum()),
                     "geometry": shapely.box(*rasterio.transform.array_bounds(size, size, t))})
    gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:32630").to_crs(4326).to_parquet(dest / "index.parquet")
    (dest / "meta.json").write_text(json.dumps({
        "year": 2020, "bands": BANDS, "crs": "EPSG:32630", "pixel_size": [res, res], "gsd_m": res,
        "chip_size": size, "block_size": size * 4, "labels_fingerprint": "synthetic"}))
    return dest


class _EpochLog(logging.Handler):
    """The training's epochs as it logs them: (windows, seconds of reading and steps) each."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rows: list[tuple[int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("epoch ") and "windows in" in str(record.msg):
            self.rows.append((int(record.args[-3]), float(record.args[-2])))


def floor_seconds(n_chips: int, size: int, cfg: TrainConfig) -> float:
    """The bare forward + backward + step over ``n_chips`` chips in batches, tensors in memory, in the
    configured precision."""
    device = resolve_device(cfg.device)
    amp = resolve_precision(cfg.precision, device)
    torch.manual_seed(0)
    model = build_model(ModelConfig().encoder, len(BANDS)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    x = torch.randn(cfg.batch_size, len(BANDS), size, size, device=device)
    y = (torch.rand(cfg.batch_size, size, size, device=device) > 0.5).long()
    steps = -(-n_chips // cfg.batch_size)
    for _ in range(2):  # warm-up
        loss = segmentation_loss(forward_logits(model, x, amp), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = segmentation_loss(forward_logits(model, x, amp), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def peak_rss_mb(chips: Path, out: Path, threads: int) -> float:
    """Peak RSS (MB) of a fresh process training one epoch on ``chips``."""
    code = ("import resource, sys, torch; torch.set_num_threads(int(sys.argv[3])); "
            "from minemap.config import TrainConfig; from minemap.train import train; "
            "train(sys.argv[1], sys.argv[2], TrainConfig(epochs=1), progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", code, str(chips), str(out), str(threads)], capture_output=True,
                         text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chips", type=int, default=2000, help="N: the memory case compares N and 10 N chips")
    ap.add_argument("--size", type=int, default=64, help="chip side in pixels")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="throughput only (the memory case takes minutes)")
    ap.add_argument("--loader-workers", type=int, default=None,
                    help="train.loader_workers (default: the training's own choice for the device)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(epochs=args.epochs, patience=args.epochs + 1, loader_workers=args.loader_workers)
    workers = _loader_workers(cfg, resolve_device(cfg.device))
    with tempfile.TemporaryDirectory(prefix="minemap-bench-train-") as tmp:
        tmp = Path(tmp)
        small = write_chips(tmp / "small", args.chips, args.size)
        n_train = int(round(args.chips * 0.7))
        epochs = _EpochLog()
        logging.getLogger("minemap.train").addHandler(epochs)
        logging.getLogger("minemap.train").setLevel(logging.INFO)
        t0 = time.perf_counter()
        card = train(small, tmp / "model", cfg, progress=False)
        stage = time.perf_counter() - t0
        logging.getLogger("minemap.train").removeHandler(epochs)
        windows, loop = sum(e[0] for e in epochs.rows), sum(e[1] for e in epochs.rows)
        floor = floor_seconds(n_train * args.epochs, args.size, cfg)
        ratio = floor / stage
        fp32 = floor_seconds(n_train * args.epochs, args.size, cfg.model_copy(update={"precision": "fp32"}))
        print(f"precision: the bare step in {card.precision} {fp32 / floor:.2f} x as fast as in fp32", flush=True)
        print(f"throughput: train {n_train * args.epochs / stage:.1f} chips/s over {args.epochs} epochs of "
              f"{n_train} chips ({args.size} px, batch {cfg.batch_size}, {card.precision}, "
              f"{workers} loader processes); floor (bare forward + "
              f"backward + step) {n_train * args.epochs / floor:.1f} chips/s; stage / floor {ratio:.2f} "
              f"(goal >= {GOALS['throughput_vs_floor']})", flush=True)
        print(f"  of which the epochs' reading and steps: {windows} windows in {loop:.1f} s, {windows / loop:.1f} a "
              f"second: {windows / loop / (n_train * args.epochs / floor):.2f} of the floor (the rest of the stage: "
              f"scanning the chips, validating each epoch, calibrating and testing, "
              f"{stage - loop:.1f} s)", flush=True)
        rss_small = rss_large = None
        if not args.no_memory:
            large = write_chips(tmp / "large", 10 * args.chips, args.size, seed=1)
            rss_small = peak_rss_mb(small, tmp / "m1", args.threads)
            rss_large = peak_rss_mb(large, tmp / "m2", args.threads)
            print(f"memory: peak RSS {rss_small:.0f} MB on {args.chips} chips, {rss_large:.0f} MB on "
                  f"{10 * args.chips}: ratio {rss_large / rss_small:.2f} (goal <= {GOALS['rss_ratio']})", flush=True)
    dest = write_results("train", args.threads, {
        "device": str(resolve_device(cfg.device)), "precision": card.precision, "chip_px": args.size,
        "chips": args.chips, "epochs": args.epochs, "batch_size": cfg.batch_size, "goals": GOALS,
        "loader_workers": workers,
        "stage_chips_per_s": n_train * args.epochs / stage, "floor_chips_per_s": n_train * args.epochs / floor,
        "stage_vs_floor": ratio, "loop_windows_per_s": windows / loop,
        "loop_vs_floor": windows / loop / (n_train * args.epochs / floor), "floor_fp32_chips_per_s": n_train * args.epochs / fp32,
        "precision_speed_up": fp32 / floor,
        "peak_rss_mb": {str(args.chips): rss_small, str(10 * args.chips): rss_large} if rss_small else None,
        "rss_ratio": rss_large / rss_small if rss_small else None})
    print(f"results -> {dest}")


if __name__ == "__main__":
    main()
