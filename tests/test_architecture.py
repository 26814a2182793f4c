"""The package's import graph: no circle, and no arrow from a lower layer up to a higher one.

Layers, lowest first (docs/architecture.md): shared helpers and DTensor layout; state formats;
the update maths; the unfused paths; the kernels; dispatch; the optimizer; tools and
experiments. Every ``import``/``from ... import`` in src/adoptim counts, including those inside
functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# module prefix -> layer (the longest matching prefix wins)
LAYERS = {
    "adoptim._utils": 0,
    "adoptim._extras": 0,
    "adoptim.rng": 0,
    "adoptim.schedule": 0,
    "adoptim.distributed": 0,
    "adoptim.formats": 1,
    "adoptim.update": 2,
    "adoptim.paths": 3,
    "adoptim.kernels": 4,
    "adoptim.functional": 5,
    "adoptim.convert": 6,
    "adoptim.optimizer": 6,
    "adoptim.release": 6,
    "adoptim": 7,  # the package root re-exports the public API
    "adoptim.tools": 8,
    "adoptim.experiments": 8,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def import_graph() -> dict[str, set[str]]:
    """{module: modules of adoptim it imports}, from the source."""
    modules = {_module_name(p): p for p in SRC.joinpath("adoptim").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` depends on pkg.mod; `from mod import name` on mod
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("adoptim"):
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_no_import_circle():
    graph = import_graph()
    # a package's __init__ importing its own modules is not a circle of logic
    graph = {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in graph.items()}
    assert _cycles(graph) == []


def test_no_import_from_a_higher_layer():
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in import_graph().items()
        for d in deps
        if _layer(d) > _layer(m) and not m.startswith(d + ".") and d != "adoptim"
    ]
    root_imports = [
        m for m, deps in import_graph().items() if "adoptim" in deps and _layer(m) < 7
    ]
    assert upward == []
    assert root_imports == [], "only tools and experiments may import the package root"


def test_the_checks_can_fail():
    """The cycle finder and the layer rule find a planted circle and a planted upward import."""
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert _layer("adoptim.formats.blockwise8") < _layer("adoptim.kernels.cpu.launch")
