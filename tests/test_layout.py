"""The package's shape (docs/architecture.md): layers whose imports point down only, stages that never import each
other, no import cycle, and no module, function or class past the size that asks for a split."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf"

# a package's rank: it may import its own rank and below, never above
LAYER = {
    "algorithms": 0,
    "config": 0,
    "rewards": 1,
    "data": 1,
    "tiny": 1,
    "models": 2,
    "runtime": 3,
    "generation": 3,
    "stages": 4,
    "tools": 5,
    "cli": 6,
    "__main__": 6,
}
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_CLASS_LINES = 500, 80, 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, top_level_only: bool = False) -> set[str]:
    """The project modules `name` imports (anywhere in its body, or only at module level)."""
    path = MODULES[name]
    parts = name.split(".")
    package = parts if path.name == "__init__.py" else parts[:-1]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            if not node.level:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != name and target != "rlhf":
                found.add(target)
    return found


def layer(name: str) -> str:
    return name.split(".")[1]


def test_every_package_has_a_layer():
    assert {layer(m) for m in MODULES if m != "rlhf"} <= set(LAYER)


@pytest.mark.parametrize("name", [m for m in MODULES if m != "rlhf"])
def test_imports_point_down(name):
    up = [t for t in imports(name) if LAYER[layer(t)] > LAYER[layer(name)]]
    assert not up, f"{name} imports {up}, a layer above it (docs/architecture.md)"


def test_stages_never_import_each_other():
    def stage_of(name: str) -> str | None:
        parts = name.split(".")
        return parts[2] if len(parts) > 2 and parts[1] == "stages" else None

    orchestrators = {"registry", "pipeline"}  # they reach the stages by name only
    crossings = [
        (m, t)
        for m in MODULES
        for t in imports(m)
        if stage_of(m) and stage_of(t) and stage_of(m) != stage_of(t) and stage_of(t) not in orchestrators
    ]
    assert not crossings, f"stage -> stage imports: {crossings}; move what they share down a layer"


def test_no_import_cycle():
    graph = {m: imports(m, top_level_only=True) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(nxt) :] + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_sizes():
    too_big = []
    for name, path in MODULES.items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"module {name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                length = node.end_lineno - node.lineno + 1
                is_class = isinstance(node, ast.ClassDef)
                limit, kind = (MAX_CLASS_LINES, "class") if is_class else (MAX_FUNCTION_LINES, "function")
                if length > limit:
                    too_big.append(f"{kind} {name}.{node.name}: {length} lines")
    assert not too_big, "split by concern (docs/architecture.md): " + "; ".join(too_big)


def test_the_checker_sees_a_crossing():
    """The import reader resolves relative and absolute forms alike (else the rules above would pass vacuously)."""
    assert "rlhf.stages.registry" in imports("rlhf.stages.pipeline")
    assert "rlhf.algorithms.registry" in imports("rlhf.algorithms.advantages")
