"""The layout of `moe_bench/`: rooms by role, import arrows only downward, no circles.

Rooms, top to bottom (docs/architecture.md): the entry points (the package's facade, the Hydra
app and its callbacks), the runner, the tasks (with their registry, the rank launcher and the
benchmark layers), the torch side (job record, components, recorder, model, data, timing), the
report (torch-free stages, claims included), and the base (schema, identity, reading results,
locks, where the configs are). Every import counts, those inside functions too; the graph
code is the one the `variants` layout test uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.variants.test_layout import cycle, graph

ROOT = Path(__file__).resolve().parents[2] / "moe_bench"
ROOMS = ("entry", "runner", "tasks", "torch", "report", "base")  # top to bottom
ENTRY = {"moe_bench", "moe_bench.__main__", "moe_bench.callbacks"}
TASKS = {"moe_bench.registry", "moe_bench.launch"}
BASE = {"moe_bench.schema", "moe_bench.identity", "moe_bench.results", "moe_bench.rows",
        "moe_bench.query",
        "moe_bench.locks", "moe_bench.paths"}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    if module in ENTRY or module.endswith(".__main__"):
        return "entry"
    if module == "moe_bench.runner":
        return "runner"
    if module in TASKS or module.startswith(("moe_bench.tasks", "moe_bench.bench")):
        return "tasks"
    if module.startswith("moe_bench.report"):
        return "report"
    return "base" if module in BASE else "torch"


def sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(), p.name == "__init__.py") for p in ROOT.rglob("*.py")}


def problems(found: dict[str, tuple[str, bool]]) -> list[str]:
    """Module circles, room circles and upward arrows of the moe_bench import graph."""
    edges = graph(found)
    inner = {m: {t for t in ts if t in edges and t != m} for m, ts in edges.items()}
    out = []
    if path := cycle(inner):
        out.append("module circle: " + " -> ".join(path))
    rooms: dict[str, set[str]] = {}
    for m, targets in inner.items():
        for t in targets:
            a, b = room(m), room(t)
            if a == b:
                continue
            rooms.setdefault(a, set()).add(b)
            if ROOMS.index(b) < ROOMS.index(a):
                out.append(f"upward arrow: {m} ({a}) imports {t} ({b})")
    if path := cycle(rooms):
        out.append("room circle: " + " -> ".join(path))
    return out


def test_no_circle_and_no_upward_arrow() -> None:
    assert problems(sources()) == []


def test_the_report_and_the_base_import_no_torch_side_module() -> None:
    edges = graph(sources())
    low = [m for m in edges if room(m) in ("report", "base")]
    assert low, "no report or base module found"
    for m in low:
        heavy = {t.split(".")[0] for t in edges[m]} & {"torch", "variants"}
        assert not heavy, f"{m} imports {heavy}"


@pytest.mark.parametrize(
    ("module", "line", "reported"),
    [
        ("moe_bench.report.frames", "from moe_bench import config", "upward arrow"),
        ("moe_bench.results", "def f():\n    from moe_bench.report import load\n", "upward"),
        ("moe_bench.schema", "from moe_bench import identity", "module circle"),
    ],
)
def test_an_added_upward_import_is_reported(module: str, line: str, reported: str) -> None:
    found = sources()
    source, is_package = found[module]
    if reported == "module circle":  # identity importing schema back closes a circle
        ident, pkg = found["moe_bench.identity"]
        found["moe_bench.identity"] = (ident + "\nfrom moe_bench import schema\n", pkg)
    found[module] = (source + "\n" + line + "\n", is_package)
    assert any(reported in p for p in problems(found)), problems(found)
