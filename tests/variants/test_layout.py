"""The layout of `variants/`: rooms by role, import arrows only downward, no circles.

Rooms, top to bottom (docs/architecture.md): the registry and the routing rules
(`variants/__init__.py`, `variants/<rule>.py`), `parallel/`, `contract/`, `compute/`. Every
import of every module counts, those inside functions included, so no circle can hide in a
function body.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "variants"
ROOMS = ("rules", "parallel", "contract", "compute")  # top to bottom


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """The room of a `variants` module: its subpackage, or "rules" at the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ROOMS) else "rules"


def imports(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module `module` imports, anywhere in its source (absolute names)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from variants.compute import megablocks`: a module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found


def graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> modules it imports, for sources {module: (source, is_package)}."""
    known = set(sources)
    return {m: imports(m, src, pkg, known) for m, (src, pkg) in sources.items()}


def variants_sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(), p.name == "__init__.py") for p in ROOT.rglob("*.py")}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of the directed graph `edges` (as a path back to its start), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def problems(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """What breaks the layout: module circles, room circles, upward arrows, moe_bench imports."""
    edges = graph(sources)
    inner = {m: {t for t in ts if t in edges and t != m} for m, ts in edges.items()}
    found = []
    if path := cycle(inner):
        found.append("module circle: " + " -> ".join(path))
    rooms: dict[str, set[str]] = {}
    for m, targets in inner.items():
        for t in targets:
            if room(t) != room(m):
                rooms.setdefault(room(m), set()).add(room(t))
                if ROOMS.index(room(t)) < ROOMS.index(room(m)):
                    found.append(f"upward arrow: {m} ({room(m)}) imports {t} ({room(t)})")
    if path := cycle(rooms):
        found.append("room circle: " + " -> ".join(path))
    for m, targets in edges.items():
        found += [f"{m} imports {t}" for t in targets if t.split(".")[0] == "moe_bench"]
    return found


def test_every_module_lives_in_a_known_room() -> None:
    sources = variants_sources()
    assert {room(m) for m in sources} == set(ROOMS)
    assert room("variants.contract.config") == "contract" and room("variants.switch") == "rules"


def test_no_circle_no_upward_arrow_and_no_moe_bench() -> None:
    assert problems(variants_sources()) == []


def test_the_rooms_import_only_downward() -> None:
    edges = graph(variants_sources())
    arrows = {(room(m), room(t)) for m, ts in edges.items() for t in ts if t in edges}
    assert ("contract", "compute") in arrows and ("parallel", "contract") in arrows
    assert not {(a, b) for a, b in arrows if ROOMS.index(b) < ROOMS.index(a)}


@pytest.mark.parametrize(
    ("module", "line", "reported"),
    [
        # compute reaching up into the contract: contract <-> compute, at the top of a module
        ("variants.compute.backends", "from ..contract.config import MoEConfig", "upward arrow"),
        # the same, hidden inside a function body
        (
            "variants.compute.experts",
            "def f():\n    from variants.contract import layer\n",
            "room circle",
        ),
        ("variants.contract.routing", "from ..parallel import expert_parallel", "upward arrow"),
        ("variants.compute.dispatch", "from .backends import BACKENDS", "module circle"),
        ("variants.contract.config", "import moe_bench.schema", "imports moe_bench"),
    ],
)
def test_an_added_upward_import_is_reported(module: str, line: str, reported: str) -> None:
    sources = variants_sources()
    source, is_package = sources[module]
    sources[module] = (source + "\n" + line + "\n", is_package)
    assert any(reported in p for p in problems(sources)), problems(sources)
