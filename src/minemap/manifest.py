"""Manifest of finished units of work in a run directory, so that a rerun resumes.

A JSON file mapping a unit key (``"2019/r000_c001"``, ``"stage:train"``) to the fingerprint of the inputs it was
made from; rewritten atomically after every unit, so a crash loses at most the unit in flight.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from minemap._io import write_json


class Manifest:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._data: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._data = {}  # an unreadable manifest means nothing is known to be finished

    def done(self, key: str, fingerprint: str) -> bool:
        return self._data.get(key) == fingerprint

    def mark(self, key: str, fingerprint: str) -> None:
        with self._lock:
            self._data[key] = fingerprint
            write_json(self.path, self._data)

    def forget(self, prefix: str = "") -> None:
        with self._lock:
            self._data = {k: v for k, v in self._data.items() if not k.startswith(prefix)}
            write_json(self.path, self._data)
