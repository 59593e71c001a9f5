"""Runs per-unit tasks (a unit is a (tile, year)) serially or in local worker processes.

Each worker process runs ``initializer(*initargs)`` once (e.g. to load the model) and then many units; results
come back in completion order with a progress bar.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from tqdm.auto import tqdm

U = TypeVar("U")


def map_units(func: Callable[[U], Any], units: Iterable[U], workers: int = 1,
              initializer: Callable[..., None] | None = None, initargs: tuple = (),
              desc: str = "", progress: bool = True) -> Iterator[Any]:
    """Yield ``func(unit)`` for every unit; ``workers > 1`` uses that many local processes."""
    units = list(units)
    if not units:
        return
    bar = tqdm(total=len(units), desc=desc, unit="unit", disable=not progress, leave=False)
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for u in units:
            yield func(u)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                                 initargs=(workers, initializer, initargs)) as pool:
            futures = [pool.submit(func, u) for u in units]
            for f in as_completed(futures):
                yield f.result()
                bar.update()
    bar.close()


def _init_worker(workers: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    # share the cores between worker processes instead of oversubscribing them
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if initializer is not None:
        initializer(*initargs)
