"""Small I/O helpers shared by the stages: atomic writes, output folders, hashing, JSON.

Output folders (chips, models, the MMSegmentation layout) are written whole into a temporary folder beside their
destination and swapped in when complete. minemap never replaces or deletes what it did not write: each output
folder carries a marker, :data:`MARKER` (JSON: ``kind``, ``version``, and the ``files`` it wrote at its top level),
and an existing folder is replaced only when it is empty, or carries the marker of the same kind and holds
nothing else at its top level than the files the marker names (and those its kind adds later, such as a model's
``train_state.pt``). A folder written by a minemap older than the marker is recognised by its own files instead:
chips by ``index.parquet`` and ``meta.json`` (with a ``chip_size``), a model by ``model.json`` (with an
``encoder``), and nothing else but the names such a folder holds; an MMSegmentation layout is never recognised
without the marker (it looks just like a user's own dataset). Anything else raises :class:`OutputError`, naming
the folder and what it holds, before any work is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from minemap import __version__
from minemap.errors import OutputError

log = logging.getLogger(__name__)

try:  # POSIX: a writer holds a lock on its folder's marker, so that a live write is never taken for a stale one
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale temporary folders are left for the user to remove
    fcntl = None

MARKER = ".minemap-output"
# per kind: (the files an output of an older minemap, without the marker, must hold to be recognised, or None
# where it never is; every name such a folder may hold at its top level, those written after the swap included)
KINDS: dict[str, tuple[frozenset[str] | None, frozenset[str]]] = {
    "chips": (frozenset({"index.parquet", "meta.json"}),
              frozenset({"index.parquet", "meta.json", "blocks.parquet", "possible_missed_mines.parquet", "images",
                         "masks", "blocks", "mmseg", "tiles", "tiles.parquet"})),
    "model": (frozenset({"model.json"}), frozenset({"model.json", "weights.safetensors", "train_state.pt"})),
    "mmseg": (None, frozenset({"img_dir", "ann_dir"})),
}
LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})  # written by file browsers, not by a person
_TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{8}\.(?:tmp.*|old)", re.DOTALL)  # names atomic_path gives its temporaries


def is_temporary(name: str) -> bool:
    """Whether ``name`` is that of a temporary :func:`atomic_path` writes (a file or folder being written, or an
    old folder being dropped), which no reader must take for an output."""
    return temporary_of(name) is not None


def temporary_of(name: str) -> str | None:
    """The name of the output whose temporary ``name`` is (see :func:`is_temporary`), or None."""
    m = _TEMPORARY.fullmatch(name)
    return m.group(1) if m else None


def outputs(folder: Path, pattern: str) -> list[Path]:
    """The files of ``folder`` matching ``pattern``, sorted, without hidden names: a glob alone also matches the
    temporaries of files being written (``.<name>.<hex>.tmp<suffix>``), or left behind by a worker killed
    mid-write. An empty list where ``folder`` does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))


@contextlib.contextmanager
def atomic_path(dest: Path, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.

    A crash leaves the previous ``dest`` (or none), never a half-written one. For a file, or a new folder. An
    output folder passes its ``kind`` (one of :data:`KINDS`): the temporary folder then exists already, carries
    the marker, and replaces an existing ``dest`` only where minemap wrote that (see the module docstring; else
    :class:`OutputError`, raised before the block runs). Without a ``kind``, a folder replaces an existing one only
    where that holds nothing the new one does not (each of its names is written anew), else :class:`OutputError`.
    """
    dest = Path(dest)
    if kind is not None:
        with _output_folder(dest, kind) as tmp:
            yield tmp
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp{dest.suffix}")
    try:
        yield tmp
        if tmp.is_dir() and dest.is_dir():
            kept = {p.name for p in dest.iterdir() if p.name not in LITTER and not is_temporary(p.name)}
            lost = kept - {p.name for p in tmp.iterdir()}
            if lost:
                raise OutputError(f"{dest}: holds files this output would not write anew ({_list(lost)}); move them "
                                  "away, or give an empty or new folder")
            _swap(tmp, dest)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def check_output_dir(dest: Path, kind: str) -> None:
    """Raise :class:`OutputError` unless ``dest`` may become a ``kind`` output folder: it does not exist, is
    empty, or is one minemap wrote (see the module docstring). Stages call it through :func:`atomic_path`; a
    long one may call it first, so that a wrong folder fails before the work rather than after."""
    dest = Path(dest)
    if kind not in KINDS:
        raise ValueError(f"unknown kind of output folder {kind!r}")
    if not dest.exists():
        if dest.is_symlink():
            raise OutputError(f"{dest}: a link to nothing; give an empty or new folder")
        return
    if not dest.is_dir():
        raise OutputError(f"{dest}: exists and is not a folder; give an empty or new folder")
    try:
        names = {p.name for p in dest.iterdir()}
    except OSError as e:
        raise OutputError(f"{dest}: cannot list this folder ({e.strerror}); give an empty or new folder") from None
    names = {n for n in names if n not in LITTER and n != MARKER and not is_temporary(n)}
    if not names:
        return
    required, allowed = KINDS[kind]
    marker = _read_marker(dest)
    if marker is not None:
        if marker.get("kind") != kind:
            raise OutputError(f"{dest}: holds minemap's {_show(str(marker.get('kind')))} output, not {kind}; give an "
                              "empty or new folder")
        allowed = allowed | {str(n) for n in marker.get("files", []) if isinstance(n, str)}
    elif required is None or not required <= names or not _legacy(dest, kind):
        raise OutputError(f"{dest}: not a minemap output folder (holds {_list(names)}); give an empty or new folder")
    foreign = names - allowed
    if foreign:
        raise OutputError(f"{dest}: holds files minemap did not write ({_list(foreign)}); move them away, or give "
                          "an empty or new folder")


def mark_output_dir(dest: Path, kind: str) -> None:
    """Make ``dest`` a ``kind`` output folder before its first atomic write, for a stage that saves a file into
    it as it goes (a training's state before its first model): checked (:func:`check_output_dir`), created and
    marked. Later atomic writes of the folder keep the files its kind allows."""
    dest = Path(dest)
    check_output_dir(dest, kind)
    dest.mkdir(parents=True, exist_ok=True)
    if _read_marker(dest) is None:
        write_json(dest / MARKER, {"kind": kind, "version": __version__, "files": []})


@contextlib.contextmanager
def _output_folder(dest: Path, kind: str) -> Iterator[Path]:
    """:func:`atomic_path` for an output folder: checked, written beside, marked, then swapped in."""
    if dest.name in ("", ".."):  # "." or "..": the folder by its own name, to write beside it
        dest = dest.resolve()
    check_output_dir(dest, kind)
    if dest.is_symlink():  # replace the folder it points to, not the link
        dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dest)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp{dest.suffix}")
    tmp.mkdir()
    marker = _hold_marker(tmp / MARKER)
    try:
        _write_marker(marker, {"kind": kind, "version": __version__, "complete": False})
        yield tmp
        files = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
        _write_marker(marker, {"kind": kind, "version": __version__, "files": files})
        check_output_dir(dest, kind)  # again: a long write leaves time to put a file there
        try:
            _swap(tmp, dest)
        except OSError as e:  # a mount point, a folder in use, no permission: the old folder stays as it was
            raise OutputError(f"{dest}: cannot put the new folder in place ({e.strerror or e}); give an empty or "
                              "new folder") from None
    finally:
        marker.close()
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap(tmp: Path, dest: Path) -> None:
    """Put the folder ``tmp`` at ``dest``; drop the folder that was there."""
    if not dest.is_dir():
        os.replace(tmp, dest)
        return
    if _exchange(tmp, dest):  # one step: there is a folder at ``dest`` at every moment
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now at tmp
        return
    # two steps: the old folder aside first (a crash between leaves it there, under a hidden name with its marker,
    # and no folder at dest: the next write cleans it up)
    old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or the
    file system cannot (then nothing moved)."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _clean_stale(dest: Path) -> None:
    """Remove the temporary and old folders of ``dest`` that a killed writer left: only those that carry the
    marker and whose marker no live writer holds locked."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.[0-9a-f]{{8}}\.(?:tmp.*|old)", re.DOTALL)
    try:
        siblings = [p for p in dest.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return
    for p in siblings:
        if p.is_dir() and not p.is_symlink() and _abandoned(p / MARKER):
            shutil.rmtree(p, ignore_errors=True)


def _abandoned(marker: Path) -> bool:
    if fcntl is None or not marker.is_file():
        return False
    try:
        with open(marker, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True  # the lock goes with the file's closing
    except OSError:  # held: a live writer's
        return False


def _hold_marker(path: Path) -> IO[str]:
    f = open(path, "w", encoding="utf-8")
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without locks: none can take it for abandoned either
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # held until the folder is swapped in or dropped
    return f


def _write_marker(f: IO[str], obj: dict) -> None:
    f.seek(0)
    f.truncate()
    f.write(json.dumps(obj) + "\n")
    f.flush()


def _read_marker(folder: Path) -> dict | None:
    try:
        obj = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _legacy(folder: Path, kind: str) -> bool:
    """Whether ``folder`` is a ``kind`` output of a minemap older than the marker, by what its files hold."""
    name, key = {"chips": ("meta.json", "chip_size"), "model": ("model.json", "encoder")}[kind]
    try:
        obj = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and key in obj


def _show(name: str) -> str:
    return name if name.isprintable() else repr(name)


def _list(names: set[str], most: int = 3) -> str:
    shown = sorted(names)[:most]
    return ", ".join(map(_show, shown)) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def write_json(dest: Path, obj: Any) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """A record a stage wrote: (the JSON object at ``path``, None); (None, None) where there is no such file;
    (None, why) where the file is there but cannot be read (unreadable, not JSON, not an object), logged, so that
    a reader (the dataset card, the report) can say so instead of leaving a section out as if the run had none."""
    path = Path(path)
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
    else:
        if isinstance(data, dict):
            return data, None
        why = f"not a JSON object but a {type(data).__name__}"
    log.warning("%s: cannot be read (%s)", path, why)
    return None, why


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """Short hash of a JSON-serialisable object, stable across runs and machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
