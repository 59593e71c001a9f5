"""Bookkeeping at scale: the cost of recording finished (tile, year) units and of resuming from them.

Records 100,000 units in the run manifest (an append-only log), as a run over the tropics does, and prints the
time per unit over the first and the last 10,000 (constant cost: their ratio stays near 1), the time to resume
(read the log and check every unit), and, for contrast, what rewriting one JSON file per finished unit (the
earlier manifest) costs per unit at 1,000 and at 4,000 units done.

Run: `.venv/bin/python benchmarks/bench_manifest.py [--units 100000]` (or `make bench`).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

from minemap._io import write_json
from minemap.manifest import Manifest
from results_file import write_results


def fingerprint(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=100_000)
    args = ap.parse_args()
    n, chunk = args.units, min(10_000, args.units // 2)
    keys = [f"{2016 + i % 9}/E{(i // 9) % 720:04d}N{(i // 9) // 720:04d}" for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="minemap-bench-") as tmp:
        m = Manifest(Path(tmp) / "manifest.jsonl")
        times = []
        t_all = time.perf_counter()
        for i, k in enumerate(keys):
            t0 = time.perf_counter()
            m.mark(k, fingerprint(i))
            times.append(time.perf_counter() - t0)
        total = time.perf_counter() - t_all
        first, last = sum(times[:chunk]) / chunk, sum(times[-chunk:]) / chunk
        t0 = time.perf_counter()
        resumed = Manifest(Path(tmp) / "manifest.jsonl")
        todo = [k for i, k in enumerate(keys) if not resumed.done(k, fingerprint(i))]
        t_resume = time.perf_counter() - t0
        assert not todo
        size = (Path(tmp) / "manifest.jsonl").stat().st_size

        old = {}
        per_unit_old = {}
        for target in (1_000, 4_000):
            while len(old) < target - 50:
                old[keys[len(old)]] = fingerprint(len(old))
            t0 = time.perf_counter()
            for j in range(50):  # the old manifest: the whole dict rewritten (atomically) after every unit
                i = len(old)
                old[keys[i]] = fingerprint(i)
                write_json(Path(tmp) / "old.json", old)
            per_unit_old[target] = (time.perf_counter() - t0) / 50
    print(f"record {n:,} units: {total:.1f} s in all; per unit {first * 1e6:.0f} us over the first {chunk:,}, "
          f"{last * 1e6:.0f} us over the last {chunk:,} (ratio {last / first:.2f}); log {size / 1e6:.1f} MB")
    print(f"resume from {n:,} units (read the log, check every unit): {t_resume:.2f} s")
    print(f"for contrast, one JSON file rewritten per unit: {per_unit_old[1_000] * 1e6:.0f} us per unit at 1,000 "
          f"done, {per_unit_old[4_000] * 1e6:.0f} us at 4,000 (x{per_unit_old[4_000] / per_unit_old[1_000]:.1f}); "
          f"extrapolated, {per_unit_old[4_000] * n / 4_000 * n / 2 / 3600:.1f} h to record {n:,}")
    print("results:", write_results("manifest", 1, {
        "units": n, "record_s": round(total, 3), "per_unit_first_us": round(first * 1e6, 1),
        "per_unit_last_us": round(last * 1e6, 1), "resume_s": round(t_resume, 3), "log_mb": round(size / 1e6, 2),
        "json_rewrite_per_unit_us": {str(k): round(v * 1e6, 1) for k, v in per_unit_old.items()},
        "json_rewrite_extrapolated_h": round(per_unit_old[4_000] * n / 4_000 * n / 2 / 3600, 2)}))


if __name__ == "__main__":
    main()
