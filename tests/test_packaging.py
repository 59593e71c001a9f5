"""What the package imports is what it declares, and what it declares is locked."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str], str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in reqs}  # noqa: E731
    return (names(project["dependencies"]), names(project["optional-dependencies"]["dev"]),
            project["requires-python"])


def _imported(folder: Path) -> set[str]:
    """Top-level modules imported anywhere in the files of ``folder`` (inside functions too), less the standard
    library, the folder's own modules and minemap itself."""
    out = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
    local = {p.stem for p in folder.rglob("*.py")}  # the tests' own helper modules
    return out - set(sys.stdlib_module_names) - local - {"minemap", "__future__"}


def test_every_import_is_declared_and_locked():
    runtime, dev, python = _declared()
    dists = packages_distributions()
    for folder, allowed in ((ROOT / "src" / "minemap", runtime), (ROOT / "tests", runtime | dev)):
        for module in sorted(_imported(folder)):
            providers = {_norm(d) for d in dists.get(module, [])}
            assert providers, f"{module} (imported in {folder.name}) is not installed"
            assert providers & allowed, f"{module} (imported in {folder.name}) comes from {providers}: undeclared"
    # a runtime dependency only the tests use belongs to the dev extra
    used = {_norm(d) for m in _imported(ROOT / "src" / "minemap") for d in dists.get(m, [])}
    assert "tomli-w" not in runtime and "tomli-w" in dev
    assert not {"requests", "urllib3", "branca", "odc-geo"} - (runtime & used)
    # tomllib is imported: Python 3.11 at least
    assert python.startswith(">=3.11")
    locked = {_norm(line.split("==")[0]) for line in (ROOT / "requirements.lock").read_text().splitlines()
              if line and not line.startswith("#")}
    assert (runtime | dev) - {"torch"} <= locked, (runtime | dev) - {"torch"} - locked
    assert "torch" not in locked  # the build is the user's choice (Makefile TORCH_SPEC)
