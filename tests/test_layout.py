"""The package's shape: no import cycles, dependencies pointing one way between its parts, every
module saying on its first line what it is for, and no module or function past its size budget."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "vreason_batch"

# A part may import its own modules and those of the parts ranked below it, never above.
# config.py is read by every part; it imports only the decoding modes' registry (engine/modes.py).
RANK = {"io": 0, "engine": 1, "evaluation": 2, "job": 3, "bench": 4, "cli": 5}
SHARED = {"vreason_batch", "vreason_batch.config"}
CONFIG_MAY_IMPORT = {"vreason_batch.engine.modes"}
NO_RAY = ("engine", "io", "evaluation")  # Ray is the job's business
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes under `if TYPE_CHECKING:` (annotations only: not imported at run time)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(package modules, top-level third-party names) that module `name` imports at run time,
    lazy imports inside functions included."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours, theirs = set(), set()

    def add(target: str) -> None:
        if target.split(".")[0] == "vreason_batch":
            while target not in MODULES:  # `from x import name` where name is not a module
                target = target.rpartition(".")[0]
            ours.add(target)
        else:
            theirs.add(target.split(".")[0])

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    ours.discard(name)
    return ours, theirs


GRAPH = {name: _imports(name)[0] for name in MODULES}


def _part(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and name not in SHARED else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_parts_exist():
    assert {"engine", "io", "job", "evaluation", "bench"} <= {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    top = {p.stem for p in PKG.glob("*.py")}
    assert top == {"__init__", "cli", "config"}, f"only cli.py and config.py live at the top: {top}"


def test_no_import_cycle_inside_the_package():
    assert _cycles(GRAPH) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dependencies_point_down():
    upward = []
    for name, targets in GRAPH.items():
        if name == "vreason_batch.config":
            upward += [(name, t) for t in targets - CONFIG_MAY_IMPORT - SHARED]
            continue
        part = _part(name)
        for target in targets:
            other = _part(target)
            if part and other and RANK[other] > RANK[part]:
                upward.append((name, target))
    assert upward == [], "a part imports one above it"


@pytest.mark.parametrize("part", NO_RAY)
def test_no_ray_below_the_job(part):
    using = [n for n in MODULES if _part(n) == part and "ray" in _imports(n)[1]]
    assert using == []


def test_every_module_says_what_it_is_for():
    missing = []
    for name, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        lines = doc.splitlines() if doc else []
        # one summary line (PEP 257): the first line alone, then a blank line or nothing
        if not lines or not lines[0].strip() or (len(lines) > 1 and lines[1].strip()):
            missing.append(name)
    assert missing == []


def test_modules_and_functions_within_their_size():
    long_modules = {n: c for n, p in MODULES.items() if (c := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    long_functions = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions[f"{name}.{node.name}"] = length
    assert long_modules == {} and long_functions == {}
