"""The package's layout holds: no import cycle, no import inside a function to dodge one, and the ground floor
(formats/, lattice, errors, _io, geo) imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import minemap

ROOT = Path(minemap.__file__).parent
GROUND = {"minemap", "minemap._io", "minemap.errors", "minemap.geo", "minemap.lattice"}
# the CLI imports each command's stage when the command runs, so that `minemap --help` starts fast
LAZY_ALLOWED = {"minemap.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(minemap modules imported at module level, outside ``if TYPE_CHECKING``; (line, module) of those imported
    inside a function)."""
    tree = ast.parse(path.read_text())
    top, inner = set(), []

    def names(node) -> list[str]:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from minemap.x import y`: y may be a module of its own (a sub-package's member)
            return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        return []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = [n for n in names(child) if n == "minemap" or n.startswith("minemap.")]
                if in_function:
                    inner.extend((child.lineno, n) for n in found[:1])
                else:
                    top.update(found)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return top, inner


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {n for n in _imports(p)[0] if n in mods and n != m} for m, p in mods.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def walk(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if n == "minemap":  # the package's __init__ holds only the version and the errors
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                walk(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_import_inside_functions():
    found = [f"{m}:{line} imports {n}" for m, p in _modules().items() if m not in LAZY_ALLOWED
             for line, n in _imports(p)[1]]
    assert not found, found


def test_the_ground_floor_imports_nothing_above_it():
    graph = _graph()
    ground = {m for m in graph if m in GROUND or m.startswith("minemap.formats")}
    above = {m: sorted(n for n in graph[m] if n not in ground) for m in ground}
    assert not any(above.values()), {m: v for m, v in above.items() if v}


def test_the_checks_see_a_cycle_and_a_lazy_import(tmp_path):
    """The checks above can fail: a module that imports inside a function is found."""
    p = tmp_path / "m.py"
    p.write_text("import os\n\ndef f():\n    from minemap.errors import InputError\n    return InputError\n")
    top, inner = _imports(p)
    assert top == set() and inner == [(4, "minemap.errors")]
