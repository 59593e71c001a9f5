"""What `rescore_runs.py` and `refit_runs.py` share: the runs kept by `bench_accuracy.py --keep DIR`, the
command line that names them and the settings compared, and the summary of both sides written as results."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench_accuracy import _setting
from results_file import write_results


def arguments(description: str, example: str, redo: list[str] | None = None) -> argparse.Namespace:
    """``keep`` (the folder), ``set`` (the candidate's settings) and ``base`` (the kept runs' settings); with
    ``redo`` (the stages it may name), ``--redo STAGE``: the candidate redoes that stage on, with the code as it
    is now (None where not given)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("keep", type=Path, help="a folder of bench_accuracy.py --keep (run-<seed>, scene-<seed>)")
    ap.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                    help=f"the candidate's setting (repeatable), e.g. {example}")
    ap.add_argument("--base", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                    help="the settings the kept runs ran with, where the defaults have changed since")
    if redo:
        ap.add_argument("--redo", choices=redo, help="the candidate redoes this stage and every one after it with "
                                                     "the current code (a change of code, not of settings)")
    args = ap.parse_args()
    if not redo:
        args.redo = None
    if not args.set and not args.base and not args.redo:
        ap.error("nothing to compare: give --set KEY=VALUE" + (" or --redo STAGE" if redo else ""))
    return args


def kept_runs(keep: Path, needs: str) -> list[tuple[int, Path, Path]]:
    """(seed, run, scene) of each ``keep/run-<seed>`` holding ``needs`` beside ``keep/scene-<seed>``, by seed."""
    found = []
    for run in keep.glob("run-*"):
        seed = run.name[4:]
        if seed.isdigit() and (run / needs).is_file() and (keep / f"scene-{seed}").is_dir():
            found.append((int(seed), run, keep / f"scene-{seed}"))
    if not found:
        raise SystemExit(f"{keep}: no kept runs (run-<seed> with {needs} beside scene-<seed>)")
    return sorted(found)


def summarise(kind: str, args: argparse.Namespace, rows: list[dict], threads: int = 1) -> Path:
    """Print min, median and mean test-block F1 of the base and the candidate over every scene-year of ``rows``
    (each with ``base`` and ``candidate``, their ``f1`` by year) and write them, with the rows, as ``kind``."""
    before = [f for r in rows for f in r["base"]["f1"].values()]
    after = [f for r in rows for f in r["candidate"]["f1"].values()]
    summary = {"min_f1": [min(before), min(after)],
               "median_f1": [statistics.median(before), statistics.median(after)],
               "mean_f1": [statistics.mean(before), statistics.mean(after)]}
    for k, (a, b) in summary.items():
        print(f"  {k:10s} {a:.3f} -> {b:.3f}")
    dest = write_results(kind, threads, {"keep": str(args.keep), "seeds": [r["seed"] for r in rows],
                                         "base": [f"{k}={v}" for k, v in args.base],
                                         "candidate": [f"{k}={v}" for k, v in args.set],
                                         "redo": args.redo,
                                         "summary": summary, "scenes": rows})
    print(f"results -> {dest}")
    return dest
