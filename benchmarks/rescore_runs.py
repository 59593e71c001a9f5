"""What a change after prediction does to the accuracy, on runs kept by `bench_accuracy.py --keep DIR`.

Training and prediction take nearly all of a benchmark's hour; the stages after them (vectorize, postprocess,
panel, evaluate) take seconds. For each kept run (``DIR/run-<seed>`` beside ``DIR/scene-<seed>``) this derives the
polygons, panel and test-block metrics again from the run's own probability rasters and threshold, twice with the
current code: once with the settings that `bench_accuracy.py` ran (``--base KEY=VALUE``, default none) and once
with the candidate (``--set KEY=VALUE``, vectorize.* or postprocess.*), and prints the test-block F1 per year of
both, scored as `bench_accuracy.py` scores them (unobserved reference counted as missed). The probability rasters
are the same on both sides, so the difference is the change alone.

Run: `.venv/bin/python benchmarks/rescore_runs.py DIR --set vectorize.fill_unobserved=true
--base vectorize.fill_unobserved=false`; results written to ``benchmarks/results/rescore-<date>-<commit>.json``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import geopandas as gpd

from minemap.config import PostprocessConfig, VectorizeConfig
from minemap.evaluate import evaluate, read_reference
from minemap.formats.chips import split_blocks
from minemap.panel import build_panel
from minemap.postprocess import postprocess
from minemap.vectorize import field_level, read_polygons, vectorize
from kept_runs import arguments, kept_runs, summarise

SECTIONS = {"vectorize": VectorizeConfig, "postprocess": PostprocessConfig}


def _configs(settings: list[tuple[str, object]]) -> dict:
    """The stages' configurations with ``settings`` (dotted keys, as `bench_accuracy.py --set` parses them)."""
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    for key, value in settings:
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise SystemExit(f"{key}: only vectorize.NAME or postprocess.NAME act after prediction")
        values[section][name] = value
    return {s: cls(**values[s]) for s, cls in SECTIONS.items()}


def score(run: Path, scene: Path, years: list[int], cfgs: dict, work: Path) -> dict:
    """Test-block F1 per year (and the share of unobserved reference an outline covers) of ``run``'s
    probabilities, taken through vectorize, postprocess and panel with ``cfgs``."""
    threshold = json.loads((run / "threshold.json").read_text())["threshold"]
    labels = gpd.read_parquet(run / "labels.parquet") if (run / "labels.parquet").is_file() else None
    paths = vectorize(run / "probabilities", years, work / "polygons", threshold, cfgs["vectorize"],
                      fields=field_level(cfgs["vectorize"], labels))
    panel = build_panel(postprocess(read_polygons(paths), cfgs["postprocess"])).panel
    reference = read_reference(scene / "truth.gpkg")
    m = evaluate(panel, reference, run / "probabilities", threshold, splits=split_blocks(run / "chips"))
    return {"f1": {int(y): v["pixel"]["f1"] for y, v in m["years"].items()},
            "unobserved": {int(y): v["unobserved"]["reference_share"] for y, v in m["years"].items()},
            "found": {int(y): v["unobserved"]["found_share"] for y, v in m["years"].items()}}


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], "vectorize.fill_unobserved=true")
    rows = []
    with tempfile.TemporaryDirectory(prefix="minemap-rescore-") as tmp:
        for seed, run, scene in kept_runs(args.keep, "threshold.json"):
            years = sorted(int(p.name) for p in (run / "probabilities").iterdir() if p.name.isdigit())
            base = score(run, scene, years, _configs(args.base), Path(tmp) / f"{seed}-base")
            cand = score(run, scene, years, _configs(args.base + args.set), Path(tmp) / f"{seed}-set")
            rows.append({"seed": seed, "base": base, "candidate": cand})
            fmt = lambda d: " / ".join(f"{d['f1'][y]:.3f}" for y in years)  # noqa: E731
            print(f"seed {seed}: F1 test blocks {fmt(base)} -> {fmt(cand)} | unobserved "
                  + " ".join(f"{base['unobserved'][y]:.1%}" for y in years) + " | of it found "
                  + " ".join(f"{cand['found'][y]:.0%}" for y in years), flush=True)
    summarise("rescore", args, rows)


if __name__ == "__main__":
    main()
