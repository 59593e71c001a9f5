"""Accuracy of the default `run` on varied synthetic scenes: F1 per scene and year, calibration error, time.

No setting is changed per scene: every scene runs `minemap run` with the defaults (only labels, imagery, years,
output and the reference are given). The scenes use seeds that the demo (0) and the tests never use, and cover
another CRS (UTM, EPSG:4326), several files a year with nodata edges, bare fields / sand / laterite roads that
are not mines, a hazy year, a year with clouds and their shadows, noisy labels (missing mines, outlines metres
off), few labels (a dozen mines) and chip/train seeds other than the default.

Prints one row per scene (pixel F1 per year, expected calibration error of the calibrated probabilities on the
test chips and against the truth, best epoch, wall time) and the minimum and median F1 over every scene and
year. Run: `make bench` or `.venv/bin/python benchmarks/bench_accuracy.py [--size 1536] [--only plain,utm]`;
`--set predict.normalise_years=off` (repeatable) measures one setting changed on every scene.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minemap.config import load_config
from minemap.pipeline import run
from minemap.synthetic import make_scene

YEARS = (2019, 2020, 2021)  # the last one hazy unless a scene says otherwise
SCENES: dict[str, dict] = {
    "plain": dict(seed=101),
    "utm-edges": dict(seed=102, crs="EPSG:32630", nodata_edges=True),
    "wgs84": dict(seed=103, crs="EPSG:4326"),
    "confusers": dict(seed=104, confusers=True),
    "clouds": dict(seed=105, cloudy_year=2020),
    "noisy-labels": dict(seed=106, missing_labels=3, label_offset_m=10.0),
    "few-labels": dict(seed=107, n_mines=12),
    "hard-seed1": dict(seed=108, crs="EPSG:32630", nodata_edges=True, confusers=True, run_seed=1),
    "hard-seed2": dict(seed=109, confusers=True, cloudy_year=2020, run_seed=2),
}


def run_scene(name: str, spec: dict, size: int, root: Path, settings: dict | None = None) -> dict:
    spec = dict(spec)
    run_seed = spec.pop("run_seed", None)
    scene = make_scene(root / name / "scene", years=YEARS, size=size, **spec)
    over = {"chips.seed": run_seed, "train.seed": run_seed} if run_seed is not None else {}
    over.update(settings or {})
    cfg = load_config(None, labels=[str(scene.labels)], imagery=str(scene.imagery), train_year=YEARS[0],
                      years=list(YEARS), out=str(root / name / "run"), reference=str(scene.truth),
                      accept_weak_model=True, **over)
    t0 = time.perf_counter()
    res = run(cfg, progress=False)
    wall = time.perf_counter() - t0
    card = json.loads((res.model_dir / "model.json").read_text())
    years = res.metrics_data["years"]
    return {
        "scene": name, "wall_s": wall,
        "f1": {int(y): m["pixel"]["f1"] for y, m in years.items()},
        "ece_test": card.get("test_metrics", {}).get("calibration", {}).get("ece"),
        "ece_truth": max(m.get("calibration", {}).get("ece", float("nan")) for m in years.values()),
        "val_f1": card["val_metrics"].get("f1"), "best_epoch": card.get("best_epoch"),
        "epochs": card.get("epochs_trained"),
        "hard_negatives": sum(v.get("by_kind", {}).get("hard_negative", 0) for v in card.get("splits", {}).values()),
        "stages": res.seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1536, help="scene side in pixels")
    ap.add_argument("--only", default="", help="comma-separated scene names (default: all)")
    ap.add_argument("--keep", type=Path, default=None, help="keep scenes and runs in this folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting changed for every scene, to measure it, e.g. predict.normalise_years=off or "
                         "predict.tta=true (repeatable)")
    args = ap.parse_args()
    settings = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    torch.set_num_threads(args.threads)
    names = [n for n in (args.only.split(",") if args.only else SCENES)]
    unknown = set(names) - set(SCENES)
    if unknown:
        raise SystemExit(f"unknown scenes {sorted(unknown)}; choose from {', '.join(SCENES)}")
    with tempfile.TemporaryDirectory(prefix="minemap-bench-") as tmp:
        root = args.keep or Path(tmp)
        rows = []
        for name in names:
            r = run_scene(name, SCENES[name], args.size, root, settings)
            rows.append(r)
            f1s = " ".join(f"{r['f1'].get(y, float('nan')):.3f}" for y in YEARS)
            print(f"{name:13s} F1 {f1s}  ECE test {r['ece_test']:.3f} truth {r['ece_truth']:.3f}  "
                  f"val F1 {r['val_f1']:.3f}  best epoch {r['best_epoch']}/{r['epochs']}  "
                  f"hard neg {r['hard_negatives']}  {r['wall_s']:.0f} s", flush=True)
            print("              " + ", ".join(f"{k} {v:.0f} s" for k, v in r["stages"].items()), flush=True)
    all_f1 = [f for r in rows for f in r["f1"].values()]
    changed = ", ".join(f"{k}={v}" for k, v in settings.items()) or "default settings"
    print(f"\n{len(rows)} scenes x {len(YEARS)} years, {args.size} px, {changed}, {args.threads} threads")
    print(f"pixel F1: min {min(all_f1):.3f}, median {statistics.median(all_f1):.3f}")
    print(f"ECE on test chips: max {max(r['ece_test'] for r in rows):.3f}; against the truth: max "
          f"{max(r['ece_truth'] for r in rows):.3f}")
    print(f"wall time per scene: median {statistics.median(r['wall_s'] for r in rows):.0f} s, "
          f"max {max(r['wall_s'] for r in rows):.0f} s")


if __name__ == "__main__":
    main()
