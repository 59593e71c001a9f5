"""Where a benchmark's figures go: ``benchmarks/results/<name>-<date>-<commit>.json``, with the commit (``+dirty``
where tracked files differ from it), the date, the machine, its CPU (:func:`cpu`) and the thread count beside
the figures."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def commit() -> str:
    """The checkout's short commit, ``+dirty`` where tracked files differ from it; "unknown" outside git."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu() -> dict:
    """The CPU's model and the instruction sets that change a float's rounding: runs repeat bit for bit on one
    machine, while a host with another vector width (AVX2 against AVX-512) or native bfloat16 computes the same
    training with other roundings, which a training amplifies; so figures are compared within one machine."""
    model = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    out = {"model": model or platform.processor(), "cores": os.cpu_count(),
           "vector_flags": sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        pass
    return out


def write_results(name: str, threads: int, figures: dict) -> Path:
    """Write ``figures`` with the run's provenance; returns the file."""
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc)
    rev = commit()
    dest, n = RESULTS / f"{name}-{stamp:%Y%m%d-%H%M}-{rev}.json", 1
    while dest.exists():  # two runs in one minute: the second beside the first, never over it
        n += 1
        dest = RESULTS / f"{name}-{stamp:%Y%m%d-%H%M}-{rev}-{n}.json"
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(json.dumps({
        "benchmark": f"bench_{name}", "date": stamp.isoformat(timespec="seconds"), "commit": rev,
        "machine": platform.platform(), "processor": platform.processor(), "cpu": cpu(), "threads": threads,
        **figures,
    }, indent=1, default=str))
    tmp.replace(dest)
    return dest
