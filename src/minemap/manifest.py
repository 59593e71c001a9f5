"""Manifest of finished units of work in a run directory, so that a rerun resumes.

An append-only log, one JSON line per event::

    {"key": "2019/E0012N0034", "fp": "<fingerprint of the inputs it was made from>"}
    {"forget": "stage:"}            every key with this prefix is no longer finished

Recording a finished unit appends one line (flushed to the operating system before ``mark`` returns), so it costs
the same at 10 units and at 500,000; a JSON file rewritten after every unit costs time in proportion to the
units already done, quadratic over a run. A run killed mid-write leaves at most a torn last line, which reading
skips: that unit is simply done again. The log is compacted (rewritten to one line per key, atomically) when it
is opened holding many more lines than keys.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from minemap._io import atomic_path

COMPACT_SLACK = 10_000  # lines beyond twice the keys before the log is rewritten on opening


class Manifest:
    def __init__(self, path: Path, read_only: bool = False) -> None:
        """The manifest at ``path``; ``read_only``: never rewritten here (a long file is otherwise compacted)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, str] = {}
        self._torn_end = False  # the file ends in a torn line: the next record starts on a new line
        lines = 0
        if self.path.is_file():
            with open(self.path, "rb") as f:
                for raw in f:
                    lines += 1
                    try:
                        rec = json.loads(raw)
                    except ValueError:  # a line torn by a crash: that unit is done again
                        continue
                    if not isinstance(rec, dict):
                        continue
                    if isinstance(rec.get("forget"), str):
                        self._drop(rec["forget"])
                    elif isinstance(rec.get("key"), str) and isinstance(rec.get("fp"), str):
                        self._data[rec["key"]] = rec["fp"]
                self._torn_end = f.tell() > 0 and not raw.endswith(b"\n")
            if lines > 2 * len(self._data) + COMPACT_SLACK and not read_only:
                self._rewrite()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is recorded, with any fingerprint: what a run made, current or not (its files are its
        own to replace or remove)."""
        return key in self._data

    def items(self) -> list[tuple[str, str]]:
        """(key, fingerprint) of every finished unit."""
        return list(self._data.items())

    def done(self, key: str, fingerprint: str) -> bool:
        return self._data.get(key) == fingerprint

    def mark(self, key: str, fingerprint: str) -> None:
        with self._lock:
            self._data[key] = fingerprint
            self._append({"key": key, "fp": fingerprint})

    def forget(self, prefix: str = "") -> None:
        """Every key starting with ``prefix`` (all of them by default) is no longer finished."""
        with self._lock:
            self._drop(prefix)
            if prefix:
                self._append({"forget": prefix})
            else:
                self._rewrite()

    def _drop(self, prefix: str) -> None:
        self._data = {k: v for k, v in self._data.items() if not k.startswith(prefix)} if prefix else {}

    def _append(self, rec: dict) -> None:
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._torn_end:  # start a fresh line rather than extend the torn one
            line, self._torn_end = b"\n" + line, False
        with open(self.path, "ab") as f:
            f.write(line)

    def _rewrite(self) -> None:
        with atomic_path(self.path) as tmp:
            with open(tmp, "wb") as f:
                for k, v in self._data.items():
                    f.write((json.dumps({"key": k, "fp": v}, separators=(",", ":")) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        self._torn_end = False

