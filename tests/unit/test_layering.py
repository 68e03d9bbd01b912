"""The layers of DESIGN.md, checked on the source: who may import whom, and what the pure cores may touch.

- ``collectives/`` imports neither ``peer`` nor ``recovery`` (it knows nothing of models or membership);
- ``recovery/`` does not import ``peer``;
- ``peer/core/`` (the pure protocol) touches no sockets, threads or clock: no ``socket``, ``zmq``,
  ``threading``, ``selectors``, ``time``, ``asyncio`` or ``subprocess`` import;
- no package module imports ``examples`` or ``tests``;
- no import circle among the package modules: neither through module-level imports (which run at import
  time) nor through function-local ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("collectives", "recovery", "peer")
IO_MODULES = {"socket", "zmq", "threading", "selectors", "time", "asyncio", "subprocess", "multiprocessing"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute module names imported by ``path`` (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_name(path).split(".")
                base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def sources(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("pkg,banned", [("collectives", {"peer", "recovery", "examples", "tests"}),
                                        ("recovery", {"peer", "examples", "tests"}),
                                        ("peer", {"examples", "tests"})])
def test_package_does_not_import_upwards(pkg: str, banned: set[str]) -> None:
    bad = [(module_name(p), m) for p in sources(pkg) for m in imports(p) if top(m) in banned]
    assert not bad, f"{pkg} imports a layer above it: {bad}"


def test_pure_cores_touch_no_sockets_threads_or_clock() -> None:
    files = sources("peer/core")
    assert files, "peer/core/ is missing"
    bad = [(module_name(p), m) for p in files for m in imports(p) if top(m) in IO_MODULES]
    assert not bad, f"peer/core must stay free of I/O (the driver passes time in): {bad}"


def _assert_no_circle(top_level_only: bool) -> None:
    mods = {module_name(p): p for pkg in PACKAGES for p in sources(pkg)}
    graph = {name: {m for m in imports(p, top_level_only=top_level_only) if m in mods and m != name}
             for name, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_no_import_circle() -> None:
    _assert_no_circle(top_level_only=True)


def test_no_import_circle_even_through_function_local_imports() -> None:
    """A lazy import may defer a heavy module (matplotlib, the simulation behind a CLI flag); it must not
    hide a circle (two modules that each need the other are one concept, or share a third)."""
    _assert_no_circle(top_level_only=False)


def test_the_import_parser_sees_every_form(tmp_path: Path) -> None:
    """The checker itself: plain, from-, aliased and function-local imports are all seen."""
    f = tmp_path / "m.py"
    f.write_text("import os.path as p\nfrom peer.swarm import Swarm\ndef f():\n    import zmq\n")
    assert {"os.path", "peer.swarm", "peer.swarm.Swarm", "zmq"} <= imports(f)
    assert "zmq" not in imports(f, top_level_only=True)
