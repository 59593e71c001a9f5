"""Runs per-unit tasks (a unit is a (tile, year)) serially, in local worker processes, or on a Dask cluster.

- serial (default): in this process, ``initializer(*initargs)`` once, then every unit;
- ``workers=N``: N local processes, each running the initializer once (e.g. to load the model) and then many
  units, with the cores shared between them;
- ``scheduler="tcp://host:8786"``: an existing dask.distributed cluster (started by the user: ``dask scheduler``
  and ``dask worker`` by hand, dask-jobqueue on SLURM, Kubernetes). Each worker process runs the initializer
  once per set of ``initargs`` (the model is loaded once per worker, whatever the number of units it runs);
  ``func``, the initializer and the units travel by pickle, so they must be importable functions and plain data
  (an imagery source travels as its description and is opened on the worker). A unit whose worker dies is
  run again elsewhere, up to ``retries`` times; after that the run stops with :class:`ExecutionError`.
  Every call submits its units under keys of its own (a fresh run token and the unit's number): the scheduler
  gives one result to every client that submits the same key, so keys shared between runs (two halves of an
  area mapped at once with the same model) would hand one run the other's results. Paths in units and
  ``initargs`` must be absolute: workers run in folders of their own, on other machines too.

Results come back in completion order, with a progress bar: units done, and with ``sizes`` (e.g. km2 per unit)
the rate and the time left in those units.
"""

from __future__ import annotations

import json
import os
import sys
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from minemap._io import stable_hash
from minemap.errors import ExecutionError, InputError, MinemapError

U = TypeVar("U")
CONNECT_TIMEOUT_S = 20


def map_units(func: Callable[[U], Any], units: Iterable[U], workers: int = 1,
              initializer: Callable[..., None] | None = None, initargs: tuple = (),
              desc: str = "", progress: bool = True, scheduler: str | None = None, retries: int = 2,
              sizes: Sequence[float] | None = None, size_unit: str = "unit") -> Iterator[Any]:
    """Yield ``func(unit)`` for every unit; see the module docstring for ``workers`` and ``scheduler``.
    ``sizes``: how much each unit weighs for the progress bar (rate and ETA in ``size_unit``)."""
    units = list(units)
    if not units:
        return
    weight = list(sizes) if sizes is not None else [1.0] * len(units)
    fmt = None if sizes is None else ("{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} {unit} "
                                      "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
    bar = tqdm(total=sum(weight), desc=desc, unit=size_unit if sizes is not None else "unit", bar_format=fmt,
               disable=not progress, leave=False, dynamic_ncols=True)
    done = 0

    def tick(i: int) -> None:
        nonlocal done
        done += 1
        bar.update(weight[i])
        if sizes is not None:
            bar.set_postfix_str(f"{done}/{len(units)} tiles", refresh=False)

    try:
        if scheduler:
            yield from _on_cluster(func, units, initializer, initargs, scheduler, retries, tick)
        elif workers <= 1:
            if initializer is not None:
                initializer(*initargs)
            for i, u in enumerate(units):
                yield func(u)
                tick(i)
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                                     initargs=(workers, initializer, initargs)) as pool:
                futures = {pool.submit(func, u): i for i, u in enumerate(units)}
                for f in as_completed(futures):
                    yield f.result()
                    tick(futures[f])
    finally:
        bar.close()


def _init_worker(workers: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    # share the cores between worker processes instead of oversubscribing them; torch is not imported for work
    # that does not need it (cutting chips): a second of start-up per worker, and memory
    threads = max(1, (os.cpu_count() or 1) // workers)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # what torch takes when imported later
    if initializer is not None:
        initializer(*initargs)


SCHEDULER_FORMS = ("host:port, tcp://host:port (also tls://, ws://, wss://, ucx://; an IPv6 host in brackets, "
                   "[::1]:8786) or the path of a scheduler file (`dask scheduler --scheduler-file FILE`)")
_ADDRESS = re.compile(r"(?:(?:tcp|tls|ws|wss|ucx)://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9_.-]*):(\d{1,5})")


def scheduler_address(value: str | None, what: str = "--scheduler") -> str | None:
    """A Dask scheduler's address, its form checked before any connection is tried: an address that cannot
    be one is an error in one line at once, not a 20 s connection attempt followed by the client's 40 s
    shutdown and a traceback. A scheduler file (JSON with ``address``, as ``dask scheduler --scheduler-file``
    writes it) gives the address it holds. A well-formed address that does not answer still fails when it
    is reached (minemap.execution.connect: one line after its time-out)."""
    if value is None:
        return None
    address = value.strip()
    m = _ADDRESS.fullmatch(address)
    if m:
        if not 0 < int(m.group(1)) < 65536:
            raise InputError(f"{what} {value!r}: port {m.group(1)} is not one (1-65535)")
        return address
    path = Path(address).expanduser()
    if "://" not in address and (path.suffix.lower() == ".json" or "/" in address or path.is_file()):
        if not path.is_file():
            raise InputError(f"{what} {value!r}: no scheduler file there")
        try:
            inner = json.loads(path.read_text())["address"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{what} {value!r}: not a Dask scheduler file (JSON with an address; "
                             f"{type(e).__name__})") from None
        if not isinstance(inner, str) or not _ADDRESS.fullmatch(inner.strip()):
            raise InputError(f"{what} {value!r}: the scheduler file's address {inner!r} is not one of "
                             f"{SCHEDULER_FORMS}")
        return inner.strip()
    raise InputError(f"{what} {value!r}: not a scheduler address; expected {SCHEDULER_FORMS}")


def connect(scheduler: str):
    """A client of the Dask cluster at ``scheduler``; :class:`ExecutionError` in one line if it cannot be
    reached; an address that cannot be one is an :class:`InputError` at once (no connection attempt)."""
    if not str(scheduler).startswith("inproc://"):  # an in-process cluster's address has no host:port form
        scheduler = scheduler_address(scheduler, "scheduler")
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise ExecutionError("--scheduler needs dask.distributed: pip install distributed") from None
    try:
        return Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExecutionError(f"scheduler {scheduler}: cannot be reached ({msg}); is the cluster running and the "
                             "address right (e.g. tcp://host:8786)?") from None


# -- on a worker: the initializer runs once per process and set of initargs --------------------------------
_READY: set[str] = set()
_READY_LOCK = threading.Lock()


class _UnitError:
    """A user's error (:class:`MinemapError`) raised by a unit on a worker, sent back as the unit's result and
    raised on the client as it was. Raised on the worker, Dask would retry it like a dead worker (the same error,
    ``retries`` times more) and pickle its whole chain of causes, some of which (rasterio's) do not unpickle:
    the client would get a bare ``Exception`` in place of the one-line error."""

    def __init__(self, error: MinemapError) -> None:
        self.kind, self.args = type(error), error.args

    def rebuild(self) -> MinemapError:
        try:
            return self.kind(*self.args)
        except Exception:  # pragma: no cover - a subclass with another signature
            return MinemapError(*self.args)


def _run_on_worker(func: Callable, initializer: Callable | None, initargs: tuple, key: str, unit: Any) -> Any:
    try:
        if initializer is not None and key not in _READY:
            with _READY_LOCK:  # a worker may run several units at once in threads: load once
                if key not in _READY:
                    initializer(*initargs)
                    _READY.add(key)
        return func(unit)
    except MinemapError as e:
        return _UnitError(e)


def _on_cluster(func, units: list, initializer, initargs: tuple, scheduler: str, retries: int, tick):
    from distributed import as_completed as dask_completed
    from distributed.client import FutureCancelledError

    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover - moved between versions
        from distributed import KilledWorker

    client = connect(scheduler)
    # the initializer's key: the same function and arguments (a model's path and content fingerprint) are
    # loaded once per worker process, across runs; new arguments (a model changed in place) load again
    ready = stable_hash([getattr(func, "__qualname__", str(func)), repr(initargs)])
    prefix = task_prefix(func)
    try:
        futures = {}
        for i, u in enumerate(units):
            f = client.submit(_run_on_worker, func, initializer, initargs, ready, u, pure=False, retries=retries,
                              key=f"{prefix}-{i}")
            futures[f] = i
        with client.as_current():  # as_completed looks for the current client
            completed = dask_completed(list(futures))
        for f in completed:
            i = futures[f]
            try:
                result = f.result()
            except MinemapError:
                raise
            except (KilledWorker, FutureCancelledError) as e:
                raise ExecutionError(f"unit {_name(units[i])}: its workers died on every try ({e.__class__.__name__}"
                                     f"; retries {retries}): see the workers' logs (memory, time limits)") from None
            if isinstance(result, _UnitError):
                raise result.rebuild()
            yield result
            tick(i)
    finally:
        client.close()


def task_prefix(func: Callable) -> str:
    """``minemap-<function>-<run token>``: the Dask keys of one call's units are this and the unit's number.

    The token is new at every call, so no two runs (nor two calls of one run) share a key: the scheduler
    deduplicates by key alone, and a run whose keys matched another's in flight would be handed that run's
    results (other tiles, written elsewhere) as its own."""
    name = re.sub(r"[^A-Za-z0-9_]", "", getattr(func, "__name__", "")).strip("_") or "unit"
    return f"minemap-{name}-{uuid.uuid4().hex}"


def _name(unit: Any) -> str:
    """A readable name for a unit such as (year, Tile, ...)."""
    if isinstance(unit, tuple) and len(unit) >= 2 and hasattr(unit[1], "tile_id"):
        return f"{unit[0]}/{unit[1].tile_id}"
    return repr(unit)[:80]
