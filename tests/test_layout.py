"""The package's shape: every import points down the stages, and no module imports itself round a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import alldetect

PACKAGE = Path(alldetect.__file__).parent
# bottom to top; a module may import from its own stage and those before it
STAGES = ("__init__", "_torchvision", "errors", "precision", "choices", "formats", "data", "models", "evaluation",
          "training", "ensemble", "inference", "export", "report", "serve", "pipeline", "api", "cli")


def _module_imports() -> dict[str, set[str]]:
    """alldetect module -> the alldetect modules it imports (at any depth of the file, lazy imports too)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = parts[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    prefix = package[: len(package) - node.level + 1]
                    base = ".".join([*prefix, *([node.module] if node.module else [])])
                if base.split(".")[0] == "alldetect":
                    targets.add(base)
                    targets.update(f"{base}.{a.name}" for a in node.names)  # `from . import members`
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "alldetect")
        graph[name] = targets
    return {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}


def _stage(module: str) -> int:
    parts = module.split(".")
    return STAGES.index(parts[1] if len(parts) > 1 else "__init__")


def test_every_module_belongs_to_a_stage():
    assert all(_stage(m) >= 0 for m in _module_imports())


def test_imports_point_down_the_stages():
    upward = [f"{m} -> {t}" for m, ts in _module_imports().items() for t in ts if _stage(t) > _stage(m)]
    assert not upward, "imports from a later stage:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = _module_imports()
    cycles = sorted({" -> ".join(c) for c in (_cycle_through(graph, m) for m in graph) if c})
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A shortest import path from ``start`` back to itself, or None."""
    paths = {t: [start, t] for t in graph[start]}
    frontier = list(paths)
    while frontier:
        node = frontier.pop(0)
        if node == start:
            return paths[node]
        for nxt in graph.get(node, ()):
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                frontier.append(nxt)
    return None


def test_the_checker_sees_a_cycle():
    assert _cycle_through({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert _cycle_through({"a": {"b"}, "b": set()}, "a") is None
