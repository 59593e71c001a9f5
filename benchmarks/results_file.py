"""Where a benchmark's figures go: ``benchmarks/results/<name>-<date>-<commit>.json``, with the commit (``+dirty``
where tracked files differ from it), the date, the machine and the thread count beside the figures."""

from __future__ import annotations

import json
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
        "machine": platform.platform(), "processor": platform.processor(), "threads": threads, **figures,
    }, indent=1, default=str))
    tmp.replace(dest)
    return dest
