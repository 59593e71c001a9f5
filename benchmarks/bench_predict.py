"""Prediction throughput and memory: pixels per second for one (tile, year), and peak RSS.

Prints the figures; writes nothing outside a temporary folder. Run: `make bench` or
`.venv/bin/python benchmarks/bench_predict.py [--size 1024] [--tile 512]`.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from minemap.config import PredictConfig
from minemap.imagery import open_imagery
from minemap.model import ModelCard, build_model, save_model
from minemap.predict import predict
from minemap.synthetic import make_scene


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--chip", type=int, default=128)
    ap.add_argument("--encoder", default="mit-b0")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scene = make_scene(tmp / "scene", years=(2020,), size=args.size)
        src = open_imagery(scene.imagery)
        g = src.grid(2020)
        card = ModelCard(encoder=args.encoder, bands=src.band_names, band_mean=[1000.0] * 4, band_std=[800.0] * 4,
                         gsd_m=4.75, pixel_size=list(g.res), crs="EPSG:3857", chip_size=args.chip)
        save_model(build_model(args.encoder, 4), card, tmp / "model")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        predict(tmp / "model", scene.imagery, [2020], tmp / "probs",
                PredictConfig(tile_size=args.tile, device=device), progress=False)
        dt = time.perf_counter() - t0
        px = args.size * args.size
        km2 = px * 4.75 ** 2 / 1e6
        print(f"predict {args.encoder} chip {args.chip} tile {args.tile} on {device}, torch threads "
              f"{torch.get_num_threads()}: {px / dt / 1e6:.2f} Mpx/s, {km2 / dt:.1f} km2/s at 4.75 m "
              f"({dt:.1f} s for {args.size}x{args.size} px)")
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
