"""What a change from the fine-tune on does to the accuracy, on runs kept by `bench_accuracy.py --keep DIR`.

The first fit takes most of a benchmark scene's 10-15 minutes; the fine-tune, prediction and the stages after it
take about two. For each kept run (``DIR/run-<seed>`` beside ``DIR/scene-<seed>``) this copies the run twice and
runs `minemap run` on each copy with the current code, as `bench_accuracy.py` does: once with the settings the
kept runs ran with (``--base KEY=VALUE``, default none) and once with the candidate (``--set KEY=VALUE``). Each
stage whose inputs and settings are unchanged is skipped (the run's manifest), so the first fit and the hard
negatives are the kept run's on both sides and the difference is the change alone; a setting that reaches an
earlier stage, or code that changed it since the run was kept, redoes that stage (the output says which stages
ran). Prints the test-block F1 per year of both sides (unobserved reference counted as missed, as
`bench_accuracy.py` scores it) and writes ``benchmarks/results/refit-<date>-<commit>.json``.

A change of code, not of a setting, is measured with ``--redo STAGE``: the candidate's copy forgets that stage and
every one after it (their manifest entries, and the tiles prediction and hard-negative mining resume from), so
they run again with the current code, while the base side reruns only what the current code's stage keys ask
(a setting added since the run was kept changes its stage's key: the stages run are printed).

Run: `.venv/bin/python benchmarks/refit_runs.py DIR --set hard_negatives.keep_within=0.01
--base hard_negatives.keep_within=0`, or `.venv/bin/python benchmarks/refit_runs.py DIR --redo predict`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench_accuracy import YEARS, _f1
from kept_runs import arguments, kept_runs, summarise
from minemap.config import load_config
from minemap.pipeline import STAGES, run

# the folders of the stages that resume unit by unit: forgetting the stage alone would reuse their units
RESUMED = {"hard_negatives": ("hard_negatives",), "predict": ("probabilities",)}


class _Stages(logging.Handler):
    """The stages a run did, from the pipeline's log (those skipped say "up to date")."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.done: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if ": done in " in text:
            self.done.append(text.split(":")[0])


def forget(work: Path, stage: str) -> list[str]:
    """The run in ``work`` made to redo ``stage`` and every stage after it: returns their names."""
    names = [s.name for s in STAGES]
    later = names[names.index(stage):]
    manifest = work / "manifest.jsonl"
    lines = [ln for ln in manifest.read_text().splitlines()
             if json.loads(ln)["key"].split(":", 1)[-1] not in later]
    manifest.write_text("".join(f"{ln}\n" for ln in lines))
    for name in later:
        for folder in RESUMED.get(name, ()):
            shutil.rmtree(work / folder, ignore_errors=True)
    return later


def refit(kept: Path, scene: Path, settings: dict, work: Path, redo: str | None = None) -> dict:
    """``kept`` copied to ``work`` and run there with ``settings`` (``redo``: from that stage on, whatever the
    manifest says): its test-block F1 per year and what ran."""
    shutil.copytree(kept, work)
    if redo:
        forget(work, redo)
    cfg = load_config(None, labels=[str(next(scene.glob("labels_*.gpkg")))], imagery=str(scene / "imagery"),
                      train_year=YEARS[0], years=list(YEARS), out=str(work), reference=str(scene / "truth.gpkg"),
                      accept_weak_model=True, **settings)
    stages = _Stages()
    logger = logging.getLogger("minemap.pipeline")
    logger.addHandler(stages)
    level = logger.level
    logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        res = run(cfg, progress=False)
    finally:
        logger.removeHandler(stages)
        logger.setLevel(level)
    card = json.loads((work / "model" / "model.json").read_text())
    return {"f1": _f1(res.metrics_data), "stages_run": stages.done, "wall_s": round(time.perf_counter() - t0, 1),
            "best_epoch": card.get("best_epoch"), "val_curve": [c["val_f1"] for c in card.get("val_curve", [])]}


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], "hard_negatives.keep_within=0.01",
                     redo=[s.name for s in STAGES if s.name not in ("labels", "chips")])
    threads = 2
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="minemap-refit-") as tmp:
        for seed, kept, scene in kept_runs(args.keep, "model/model.json"):
            base = refit(kept, scene, dict(args.base), Path(tmp) / f"{seed}-base")
            cand = refit(kept, scene, dict(args.base + args.set), Path(tmp) / f"{seed}-set", args.redo)
            rows.append({"seed": seed, "base": base, "candidate": cand})
            fmt = lambda d: " / ".join(f"{d['f1'][y]:.3f}" for y in YEARS)  # noqa: E731
            print(f"seed {seed}: F1 test blocks {fmt(base)} -> {fmt(cand)} | fine-tune kept epoch "
                  f"{base['best_epoch']} -> {cand['best_epoch']} | stages run: {', '.join(base['stages_run'])} / "
                  f"{', '.join(cand['stages_run'])}", flush=True)
    summarise("refit", args, rows, threads)


if __name__ == "__main__":
    main()
