"""Task functions for the Dask tests: importable by worker processes (tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path

LOADED: list[int] = []


def load(tag: int) -> None:
    LOADED.append(tag)


def square(unit: tuple[str, int]) -> tuple[int, int, int]:
    """(unit's number, its square, how many times this process ran the initializer)."""
    _, i = unit
    return i, i * i, len(LOADED)


def die_once(unit: tuple[str, int]) -> int:
    """Kills its worker process the first time unit 1 runs; later runs succeed."""
    flags, i = unit
    flag = Path(flags) / f"died-{i}"
    if i == 1 and not flag.exists():
        flag.touch()
        os._exit(1)
    return i * i


def always_die(unit: tuple[str, int]) -> int:
    os._exit(1)
