"""The house rules that a reader relies on, checked on the source: no import circles, and the rooms keep to
themselves (the sandbox imports nothing of the worker's)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("botworker", "sandbox")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, anywhere in the file (function-level imports count too; imports for
    type checkers only do not: they never run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a module: the longest known prefix
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_sandbox_imports_nothing_of_the_worker() -> None:
    for name, targets in graph().items():
        if name.startswith("sandbox"):
            assert not [t for t in targets if t.startswith("botworker")], name


def test_the_supervisor_knows_workers_not_tools() -> None:
    """It forks and watches workers, tells systemd how they are and serves their metrics: the application (tools,
    the LLM, the sandbox) is the worker's business."""
    allowed = {"botworker.worker", "botworker.config", "botworker.queue", "botworker.errors", "botworker.logs"}
    allowed |= {"botworker.notify", "botworker.metrics"}
    assert graph()["botworker.supervisor"] <= allowed


def test_only_the_metrics_module_imports_prometheus_client() -> None:
    """It picks its multi-process mode from the environment at import: one module decides when that happens."""
    for name, path in modules().items():
        if name != "botworker.metrics":
            assert "prometheus_client" not in path.read_text(), name


def test_redis_commands_stay_in_the_queue_layer() -> None:
    """Only queue.py issues Redis commands for the fleet (the client and dev tools aside)."""
    commands = ("llen", "smembers", "hgetall", "scan_iter", ".lpush(", ".blmove(", ".lrem(", ".set(", ".delete(")
    for name in ("botworker.supervisor", "botworker.worker", "botworker.__main__", "botworker.pipeline"):
        text = modules()[name].read_text()
        assert not [c for c in commands if c in text], name
