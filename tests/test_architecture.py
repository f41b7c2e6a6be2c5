"""The layer contract: core ← models ← recorder ← replay ← (inspection, rca, circuits) ←
server ← report ← scenarios ← cli (the offline report is made from the server's data
functions; the demo scenario writes a report). Nothing imports upward, and the project's modules form
no import cycle, counting imports inside functions too (a function-local import that breaks
a cycle is still a cycle). Imports under ``if TYPE_CHECKING:`` only name types and are
exempt from the cycle rule, not from the layer rule."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).parents[1] / "src" / "model_forensics"
LAYERS = {
    "core": 0,
    "models": 1,
    "recorder": 2,
    "replay": 3,
    "inspection": 4,
    "rca": 4,
    "circuits": 4,
    "server": 5,
    "report": 6,
    "scenarios": 7,
    "cli": 8,
    "__init__": 9,
    "__main__": 9,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported project module, type-checking only) for every import in a file."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for child in node.body for n in ast.walk(child)}
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            if name.startswith("model_forensics"):
                found.append((_resolve(name), id(node) in typing_only))
    return found


def _resolve(name: str) -> str:
    """The project module a dotted import name refers to (drop attribute names)."""
    parts = name.split(".")
    while len(parts) > 1:
        candidate = PACKAGE.parent.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts = parts[:-1]
    return "model_forensics"


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[top]


def _graph() -> tuple[nx.DiGraph, list[tuple[str, str]]]:
    graph = nx.DiGraph()
    upward = []
    for path in PACKAGE.rglob("*.py"):
        source = _module_name(path)
        graph.add_node(source)
        for target, typing_only in _imports(path):
            if target == source or target == "model_forensics":
                continue
            if _layer(target) > _layer(source) or (
                _layer(target) == _layer(source) and target.split(".")[1] != source.split(".")[1] and _layer(source) < 7
            ):
                upward.append((source, target))
            if not typing_only and not source.startswith(target + "."):
                graph.add_edge(source, target)
    return graph, upward


def test_nothing_imports_upward() -> None:
    _, upward = _graph()
    assert upward == [], "imports against the layer order (or between sibling packages): " + ", ".join(
        f"{a} → {b}" for a, b in sorted(set(upward))
    )


def test_the_project_modules_form_no_import_cycle() -> None:
    graph, _ = _graph()
    cycles = [c for c in nx.simple_cycles(graph) if len(c) > 1]
    assert cycles == [], "import cycles: " + "; ".join(" → ".join(c) for c in sorted(cycles)[:10])


def test_only_one_module_registers_torch_module_hooks() -> None:
    hits = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "register_forward_hook" in path.read_text() or "register_forward_pre_hook" in path.read_text()
    )
    # replay/standalone_fix.py is the one exception, on purpose: it is copied verbatim into an
    # exported fix (`fix export`) and must run where model-forensics is not installed, so it
    # cannot import the hooks API (tests/replay/test_export.py checks it imports only torch).
    assert hits == ["models/hooks.py", "replay/standalone_fix.py"]
