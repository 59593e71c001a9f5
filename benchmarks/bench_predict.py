"""Prediction against its floor, memory as the area grows, and throughput per core.

Prints, from one run (figures as ratios, since machines are noisy):

1. floor: the predict stage's time on one interior tile against the fastest bare forward pass of the model over
   the area once that the device offers (non-overlapping windows, no reading, blending or writing): float32 and,
   where the device computes it natively, bfloat16 (the stage's precision there), in windows of the training
   chip and of 512 px; the fastest of these is the floor. Also the forward pass over the very windows the stage
   runs, in the stage's precision; for the default window layout and the earlier one (chip-sized windows, half
   overlapping). Goal (issue 22): floor / stage >= 0.8;
2. memory: peak RSS of a process predicting an area 16 times a base case's (each in a fresh process); goal <= 1.2;
3. throughput: km2 per second per core for mit-b0 and mit-b2 at 4.8 m and at 10 m pixels (the same pixels per
   second; the ground they cover differs), on the GPU too where one is at hand.

Writes ``benchmarks/results/predict-<date>-<commit>.json``.
Run: `make bench` or `.venv/bin/python benchmarks/bench_predict.py [--size 1536] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine

from minemap.config import PredictConfig
from minemap.grid import make_tiles
from minemap.imagery import open_imagery
from minemap.model import (PRECISION_NAMES, ModelCard, build_model, forward_logits, native_bf16, resolve_precision,
                           save_model)
from minemap.lattice import pixel_offset, window_origins
from minemap.predict import predict, window_layout
from results_file import write_results

CHIP = 256
MEM_TILE = 1024  # the memory case: tiles of this side, the base case one tile, the larger 16 of them
GSD = 4.77


def write_scene(folder: Path, size: int, seed: int = 0, origin_px: tuple[int, int] = (-41000, -146000)) -> Path:
    """A 4-band uint16 scene of ``size`` px a side in EPSG:3857 at about 4.8 m, its top-left pixel at
    ``origin_px`` whole pixels from the CRS origin (columns east, rows south), written in strips."""
    path = folder / "imagery" / "2020" / "scene.tif"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    transform = Affine(GSD, 0, origin_px[0] * GSD, 0, -GSD, -origin_px[1] * GSD)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=4, dtype="uint16",
                       crs="EPSG:3857", transform=transform, tiled=True, blockxsize=256, blockysize=256) as dst:
        for r in range(0, size, 512):
            h = min(512, size - r)
            block = rng.integers(300, 3000, size=(4, h, size), dtype=np.uint16)
            dst.write(block, window=rasterio.windows.Window(0, r, size, h))
        dst.descriptions = ("red", "green", "blue", "nir")
    return folder / "imagery"


def model_dir(folder: Path, encoder: str, imagery: Path) -> Path:
    g = open_imagery(imagery).grid(2020)
    card = ModelCard(encoder=encoder, bands=["red", "green", "blue", "nir"], band_mean=[1000.0] * 4,
                     band_std=[800.0] * 4, gsd_m=GSD, pixel_size=list(g.res), crs="EPSG:3857", chip_size=CHIP)
    return save_model(build_model(encoder, 4), card, folder / f"model-{encoder}")


@torch.no_grad()
def forward_seconds(model, n_windows: int, window: int, batch: int, device: str,
                    precision: torch.dtype | None = None) -> float:
    """Time of the bare forward pass over ``n_windows`` windows (random input: the cost does not depend on it), in
    ``precision`` (None: float32)."""
    x = torch.randn(min(batch, n_windows), 4, window, window, device=device)
    forward_logits(model, x, precision)  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n_windows:
        b = min(batch, n_windows - done)
        forward_logits(model, x[:b], precision)
        done += b
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def stage_windows(imagery: Path, cfg: PredictConfig, card: ModelCard, tiles) -> tuple[int, int]:
    """(windows the stage runs over ``tiles``, their side)."""
    grid = open_imagery(imagery).grid(2020)
    window, stride = window_layout(card, cfg)
    gx, gy = pixel_offset(grid)
    n = sum(len(window_origins(gy + t.row_off, t.height, window, stride)) *
            len(window_origins(gx + t.col_off, t.width, window, stride)) for t in tiles)
    return n, window


def floor_figures(tmp: Path, tile: int, device: str) -> dict:
    """One interior tile of the global grid (imagery all round it, as in a large area), predicted alone through
    an AOI, against the fastest forward pass over its area once."""
    margin = 1024
    k = 10  # the tile x10_y(k) of the lattice; the scene reaches ``margin`` px past it on every side
    imagery = write_scene(tmp / "floor", tile + 2 * margin, origin_px=(k * tile - margin, k * tile - margin))
    mdir = model_dir(tmp, "mit-b0", imagery)
    from minemap.aoi import parse_aoi
    from minemap.model import load_model
    from pyproj import Transformer

    model, card = load_model(mdir, device)
    grid = open_imagery(imagery).grid(2020)
    inner = [t for t in make_tiles(grid, tile) if t.width == tile and t.height == tile]
    assert len(inner) == 1, inner
    left, bottom, right, top = inner[0].grid(grid).bounds
    pad = 20 * GSD
    w, s, e, n = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform_bounds(
        left + pad, bottom + pad, right - pad, top - pad)
    aoi = parse_aoi([w, s, e, n])
    precisions = [None] + ([torch.bfloat16] if native_bf16(torch.device(device)) else [])
    floors = {}
    for precision in precisions:
        for window in (CHIP, 512):
            batch = max(1, 16 * CHIP * CHIP // (window * window))
            floors[f"{PRECISION_NAMES[precision]}, {window} px"] = forward_seconds(
                model, (tile // window) ** 2, window, batch, device, precision)
    best = min(floors, key=floors.get)
    t_floor = floors[best]
    print(f"floor: mit-b0 forward over one {tile}x{tile} px tile once: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in floors.items()) + f"; the floor is {best}")
    out = {"tile_px": tile, "floors_s": {k: round(v, 3) for k, v in floors.items()}, "floor": best,
           "floor_s": round(t_floor, 3), "layouts": {}}
    layouts = {"default (384 px windows, 32 px overlap)": PredictConfig(device=device, tile_size=tile),
               "earlier (chip-sized windows, half overlap)": PredictConfig(device=device, tile_size=tile,
                                                                            window_size=CHIP, window_overlap=0.5)}
    written_default, t_default = None, None
    for name, cfg in layouts.items():
        precision = resolve_precision(cfg.precision, torch.device(device))
        nw, window = stage_windows(imagery, cfg, card, inner)
        t_windows = forward_seconds(model, nw, window, max(1, 16 * CHIP * CHIP // (window * window)), device,
                                    precision)
        t0 = time.perf_counter()
        written = predict(mdir, imagery, [2020], tmp / f"probs-{window}", cfg, progress=False, aoi=aoi)
        t_stage = time.perf_counter() - t0
        assert len(written) == 1
        print(f"  {name}: stage {t_stage:.2f} s in {PRECISION_NAMES[precision]}; {nw} windows of {window} px "
              f"({nw * window * window / tile ** 2:.2f} x the area); floor / stage = {t_floor / t_stage:.2f} "
              f"(goal >= 0.8); forward over the same windows / stage = {t_windows / t_stage:.2f}")
        out["layouts"][name] = {"precision": PRECISION_NAMES[precision], "stage_s": round(t_stage, 3),
                                "windows": nw, "window_px": window, "floor_vs_stage": round(t_floor / t_stage, 3),
                                "same_windows_vs_stage": round(t_windows / t_stage, 3)}
        written_default = written if "default" in name else written_default
        t_default = t_stage if "default" in name else t_default
    if native_bf16(torch.device(device)):  # what bfloat16 gains and changes: the default stage in float32 too
        cfg = layouts["default (384 px windows, 32 px overlap)"].model_copy(update={"precision": "fp32"})
        t0 = time.perf_counter()
        written = predict(mdir, imagery, [2020], tmp / "probs-fp32", cfg, progress=False, aoi=aoi)
        t_fp32 = time.perf_counter() - t0
        with rasterio.open(written[0]) as a, rasterio.open(written_default[0]) as b:
            p32, p16 = a.read(1).astype(np.int16), b.read(1).astype(np.int16)
        seen = (p32 != 255) & (p16 != 255)
        diff = np.abs(p32 - p16)[seen]
        flips = ((p32 >= 125) != (p16 >= 125))[seen]
        print(f"  bfloat16: the default stage {t_fp32 / t_default:.2f} x faster than in float32; stored "
              f"probabilities (steps of 1/250) differ in {(diff > 0).mean():.2%} of pixels, by at most "
              f"{diff.max() / 250:.3f}; {flips.mean():.2e} of pixels change side of 0.5 (this benchmark's "
              f"untrained model)")
        out["bf16"] = {"stage_fp32_s": round(t_fp32, 3), "speed_up": round(t_fp32 / t_default, 3),
                       "pixels_differing": float((diff > 0).mean()), "max_difference": float(diff.max() / 250),
                       "side_of_half_changed": float(flips.mean())}
    return out


def _child_peak(size: int, tmp: Path, device: str) -> None:
    """In a fresh process: predict a scene of ``size`` px and print the peak RSS (MiB)."""
    imagery = write_scene(tmp / f"mem-{size}", size)
    mdir = model_dir(tmp / f"mem-{size}", "mit-b0", imagery)
    predict(mdir, imagery, [2020], tmp / f"mem-{size}" / "probs", PredictConfig(device=device, tile_size=MEM_TILE),
            progress=False)
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory_figures(tmp: Path, base: int, device: str, threads: int) -> dict:
    peaks = {}
    for size in (base, 4 * base):
        out = subprocess.run([sys.executable, __file__, "--child", str(size), "--tmp", str(tmp), "--device", device,
                              "--threads", str(threads)], capture_output=True, text=True, check=True)
        peaks[size] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    print(f"memory (tiles of {MEM_TILE} px): peak RSS {peaks[base]:.0f} MiB at {base}x{base} px, "
          f"{peaks[4 * base]:.0f} MiB at "
          f"{4 * base}x{4 * base} px (16 x the area): ratio {peaks[4 * base] / peaks[base]:.2f} (goal <= 1.2)")
    return {"peak_mib": {str(k): round(v) for k, v in peaks.items()}, "ratio": round(peaks[4 * base] / peaks[base], 3)}


def throughput_figures(tmp: Path, size: int, device: str, threads: int) -> dict:
    imagery = write_scene(tmp / "speed", size)
    out = {}
    for encoder in ("mit-b0", "mit-b2"):
        mdir = model_dir(tmp / "speed", encoder, imagery)
        t0 = time.perf_counter()
        predict(mdir, imagery, [2020], tmp / "speed" / f"probs-{encoder}", PredictConfig(device=device),
                progress=False)
        px_s = size * size / (time.perf_counter() - t0)
        per = f"per core ({threads} threads)" if device == "cpu" else "on the GPU"
        print(f"throughput {encoder} on {device}: {px_s / 1e6:.2f} Mpx/s; km2/s {per}: "
              f"{px_s * GSD ** 2 / 1e6 / (threads if device == 'cpu' else 1):.2f} at 4.8 m, "
              f"{px_s * 100 / 1e6 / (threads if device == 'cpu' else 1):.2f} at 10 m")
        out[encoder] = {"mpx_per_s": round(px_s / 1e6, 3), "km2_per_s_4.77m": round(px_s * GSD ** 2 / 1e6, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096, help="tile side for the floor (the default tile_size), "
                                                           "scene side for the throughput")
    ap.add_argument("--memory-base", type=int, default=MEM_TILE, help="side of the memory base case (x4 side = "
                                                                       "x16 area)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        _child_peak(args.child, args.tmp, args.device)
        return
    with tempfile.TemporaryDirectory(prefix="minemap-bench-") as tmp:
        tmp = Path(tmp)
        figures = {"device": args.device, "floor": floor_figures(tmp, args.size, args.device),
                   "memory": memory_figures(tmp, args.memory_base, args.device, args.threads),
                   "throughput": throughput_figures(tmp, args.size, args.device, args.threads)}
    print(f"results: {write_results('predict', args.threads, figures)}")


if __name__ == "__main__":
    main()
