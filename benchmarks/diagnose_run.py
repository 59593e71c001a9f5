"""Where a run's errors lie, block by block: a diagnosis of a run kept by `bench_accuracy.py --keep DIR`.

For one year, against the scene's truth (``truth.gpkg``, with a ``year`` column), the run's probability rasters at
its threshold give per block of the spatial split: mine pixels found (tp), false alarms (fp), mines missed (fn),
with the block's split and whether it is labelled ground; then the totals per split. Where the scene has its true
clouds of the year (``clouds_<year>.tif``, written by ``make_scene`` for a cloudy year), also the mine pixels the
run left unobserved and those of them under no true cloud, per block, and over the whole scene the run's mask
against the true clouds and shadows. With ``--fit``, the run's
models (the first fit and the final one) are also applied to the blocks the training wrote (``chips/blocks/``)
and scored against the masks they were taught: how well a model fits its own training blocks, beside the
held-out ones. Counts are pixels; figures are printed and written to
``benchmarks/results/diagnosis-<date>-<commit>.json``.

Run: `.venv/bin/python benchmarks/diagnose_run.py DIR/run-<seed> DIR/scene-<seed> [--year 2019] [--fit]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import torch
from rasterio.features import rasterize
from rasterio.merge import merge
from rasterio.warp import Resampling, reproject

from minemap.formats.rasters import LEVELS, NODATA
from minemap.model import load_model
from minemap.predict import predict_array
from results_file import write_results


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / max(2 * tp + fp + fn, 1)


def run_map(run: Path, scene: Path, year: int):
    """The run's probability rasters of ``year`` merged (levels, NODATA where unobserved), their transform and
    CRS, the scene's true mines of that year on that grid, and its true clouds there (:func:`true_clouds`, None
    where the scene has none)."""
    files = sorted((run / "probabilities" / str(year)).glob("*.tif"))
    if not files:
        raise SystemExit(f"{run}: no probability rasters for {year}")
    sources = [rasterio.open(f) for f in files]
    q, transform = merge(sources, nodata=NODATA)
    crs = sources[0].crs
    for s in sources:
        s.close()
    q = q[0]
    truth = gpd.read_file(scene / "truth.gpkg")
    truth = truth[truth["year"] == year] if "year" in truth.columns else truth
    mine = rasterize(((g, 1) for g in truth.to_crs(crs).geometry), out_shape=q.shape, transform=transform,
                     dtype=np.uint8) > 0
    return q, transform, crs, mine, true_clouds(scene, year, q.shape, transform, crs)


def scene_blocks(run: Path, mapped) -> pd.DataFrame:
    """Per block: tp, fp, fn of the run's map (:func:`run_map`) at its threshold, against the truth; where the
    scene has its true clouds of that year (``clouds_<year>.tif``), also the block's mine pixels left unobserved
    (``fn_unobserved``) and those of them under no true cloud or shadow (``fn_masked_clear``)."""
    threshold = json.loads((run / "threshold.json").read_text())["threshold"]
    q, transform, crs, mine, hidden = mapped
    found = (q != NODATA) & (q >= np.rint(threshold * LEVELS))
    blocks = gpd.read_parquet(run / "chips" / "blocks.parquet").to_crs(crs)
    rows = []
    for b in blocks.itertuples():
        inside = rasterize([(b.geometry, 1)], out_shape=q.shape, transform=transform, dtype=np.uint8) > 0
        row = {"bx": int(b.bx), "by": int(b.by), "split": b.split, "labelled_ground": bool(b.labelled_ground),
               "tp": int((found & mine & inside).sum()), "fp": int((found & ~mine & inside).sum()),
               "fn": int((~found & mine & inside).sum())}
        if hidden is not None:
            lost = mine & inside & (q == NODATA)
            row.update(fn_unobserved=int(lost.sum()), fn_masked_clear=int((lost & (hidden == 0)).sum()))
        rows.append(row)
    return pd.DataFrame(rows)


def true_clouds(scene: Path, year: int, shape, transform, crs) -> np.ndarray | None:
    """The scene's true clouds (1) and shadows (2) of ``year`` on the given grid, or None where it has none."""
    path = scene / f"clouds_{year}.tif"
    if not path.is_file():
        return None
    out = np.zeros(shape, np.uint8)
    with rasterio.open(path) as src:
        reproject(src.read(1), out, src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
                  dst_crs=crs, resampling=Resampling.nearest)
    return out


def cloud_figures(mapped) -> dict | None:
    """The run's mask (its map, :func:`run_map`) against the scene's true clouds and shadows over the whole scene
    (issue 18's goals for a cloudy year: >= 90 % of cloud and shadow pixels masked, <= 2 % of mine pixels masked
    outside them); None where the scene has no true clouds of that year."""
    q, _, _, mine, hidden = mapped
    if hidden is None:
        return None
    seen = q != NODATA
    covered = hidden > 0
    return {"mine_px": int(mine.sum()), "mine_unobserved": round(float((mine & ~seen).sum() / max(mine.sum(), 1)), 4),
            "mine_under_true_clouds": round(float((mine & covered).sum() / max(mine.sum(), 1)), 4),
            "mine_masked_outside_true_clouds": round(float((mine & ~seen & ~covered).sum() / max(mine.sum(), 1)), 4),
            "true_cloud_and_shadow_masked": round(float((covered & ~seen).sum() / max(covered.sum(), 1)), 4)}


def model_fit(model_dir: Path, chips: Path) -> pd.DataFrame:
    """Per written block: tp, fp, fn of the model at its card's threshold against the block's own mask (labels
    as taught: 255 left out), mapped by windows of the training chip with half overlap."""
    model, card = load_model(model_dir)
    table = pd.read_parquet(chips / "blocks.parquet")
    rows = []
    with torch.inference_mode():
        for b in table[table["image"].notna()].itertuples():
            with rasterio.open(chips / b.image) as src:
                x = src.read().astype(np.float32)
            with rasterio.open(chips / b.mask) as src:
                y = src.read(1)
            found = predict_array(model, card, x, np.ones(y.shape, bool), overlap=0.5) >= card.threshold
            rows.append({"bx": int(b.bx), "by": int(b.by), "split": b.split, "tp": int((found & (y == 1)).sum()),
                         "fp": int((found & (y == 0)).sum()), "fn": int((~found & (y == 1)).sum())})
    return pd.DataFrame(rows)


def totals(frame: pd.DataFrame) -> dict:
    out = {}
    for split, part in frame.groupby("split"):
        tp, fp, fn = (int(part[k].sum()) for k in ("tp", "fp", "fn"))
        out[split] = {"tp": tp, "fp": fp, "fn": fn, "f1": round(_f1(tp, fp, fn), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("scene", type=Path)
    ap.add_argument("--year", type=int, default=None, help="default: the training year")
    ap.add_argument("--fit", action="store_true", help="also score the models on the blocks they were taught")
    a = ap.parse_args()
    for need in (a.run / "threshold.json", a.run / "chips" / "blocks.parquet", a.run / "chips" / "meta.json",
                 a.scene / "truth.gpkg"):
        if not need.is_file():
            ap.error(f"{need}: not found (give a run and a scene kept by bench_accuracy.py --keep DIR)")
    year = a.year or int(json.loads((a.run / "chips" / "meta.json").read_text())["year"])
    mapped = run_map(a.run, a.scene, year)
    frame = scene_blocks(a.run, mapped)
    print(frame.to_string(index=False))
    figures = {"run": str(a.run), "year": year, "scene_blocks": totals(frame),
               "scene_blocks_labelled_ground": totals(frame[frame.labelled_ground])}
    print(f"the run's map of {year}, per split:", figures["scene_blocks"])
    print("  labelled ground only:", figures["scene_blocks_labelled_ground"])
    clouds = cloud_figures(mapped)
    if clouds is not None:
        figures["clouds"] = clouds
        print(f"the run's mask of {year} against the scene's true clouds and shadows (whole scene):", clouds)
    if a.fit:
        for name in ("model_initial", "model"):
            if (a.run / name / "model.json").is_file():
                fit = totals(model_fit(a.run / name, a.run / "chips"))
                figures[f"fit_{name}"] = fit
                print(f"{name} on the written blocks, against the masks taught:", fit)
    print("results ->", write_results("diagnosis", torch.get_num_threads(), figures))


if __name__ == "__main__":
    main()
