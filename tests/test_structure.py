"""The shape of the house, read from the source with ``ast`` (nothing is imported).

- No import circles among deploykit's modules (function-level imports count: they run too).
- No module takes another module's private names (``from x import _y`` or ``x._y``).
- No function over 80 lines outside the Triton kernels (their bodies are one GPU program each).
- No symlinks in the source tree: every import path is a file on disk.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder on disk -> import prefix (pyproject's package-dir).
SOURCES = {"deploykit": "deploykit", "calib": "deploykit.calib",
           "recipes": "deploykit.recipes", "plugins": "deploykit.plugins"}
MAX_FUNCTION_LINES = 80
KERNEL_FILES = {"triton_kernel.py"}


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for folder, prefix in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_symlink():
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    modules["cli"] = ROOT / "cli.py"          # the top-level shim over deploykit.cli
    return modules


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    base = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, name taken from it or None, line)`` for every import in ``module``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[tuple[str, str | None, int]] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    found.append((alias.name, None, node.lineno))
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            if source not in MODULES:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:
                    found.append((sub, None, node.lineno))
                    aliases[alias.asname or alias.name] = sub
                else:
                    found.append((source, alias.name, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            found.append((aliases[node.value.id], node.attr, node.lineno))
    return found


def _private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")


def _graph() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in _imports(m) if target != m} for m in MODULES}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_the_reader_sees_the_whole_house():
    # A reader that found nothing would pass every check below.
    assert {"deploykit.pipeline", "deploykit.quantize", "deploykit.calib.calibrators",
            "deploykit.recipes.attention"} <= set(MODULES)
    assert sum(len(v) for v in _graph().values()) > 100


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    circles = _circles(_graph())
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_module_takes_another_modules_private_names():
    taken = [f"{MODULES[m].relative_to(ROOT)}:{line}: {target}.{name}"
             for m in MODULES for target, name, line in _imports(m)
             if target != m and _private(name)]
    assert not taken, "private names taken across modules:\n" + "\n".join(taken)


def test_no_function_over_80_lines():
    long = []
    for module, path in MODULES.items():
        if path.name in KERNEL_FILES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


@pytest.mark.parametrize("folder", [*SOURCES, "tests", "bench"])
def test_no_symlinks_in_the_source_tree(folder):
    links = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if p.is_symlink()]
    assert not links, f"symlinks (import paths must match the disk): {links}"


# The floors of docs/design.md ("Layers"), top to bottom: a module imports only modules on its
# own floor or below. A new module must be given a floor here (and in the picture).
FLOORS = [
    ["cli", "deploykit.cli"],
    ["deploykit.pipeline"],
    ["deploykit.study"],
    ["deploykit.stages"],
    ["deploykit.context", "deploykit.package"],
    ["deploykit.recipe", "deploykit.bundle_gpu"],
    ["deploykit.study_report"],
    ["deploykit.outliers"],
    ["deploykit.report"],
    ["deploykit.verify", "deploykit.bench", "deploykit.doctor"],
    ["deploykit.quantize", "deploykit.train", "deploykit.compression"],
    ["deploykit.export"],
    ["deploykit.runners"],
    ["deploykit.engine"],
    ["deploykit.targets"],
    ["deploykit.sparsity"],
    ["deploykit.data"],
    ["deploykit.models"],
    ["deploykit.recipes", "deploykit.feeds"],
    ["deploykit.plugins", "deploykit.calib", "deploykit.onnx_utils", "deploykit.runfolder", "deploykit.timing",
     "deploykit.progress", "deploykit._compat", "deploykit"],
    ["deploykit.errors", "deploykit.io", "deploykit.acceptance", "deploykit.metrics", "deploykit.presets",
     "deploykit.probes", "deploykit.threads"],
]


def _floor(module: str) -> int | None:
    found = None, -1
    for number, floor in enumerate(FLOORS):
        for prefix in floor:
            # "deploykit" (the package __init__) is a floor of its own, not a prefix of every module
            inside = module.startswith(prefix + ".") and prefix != "deploykit"
            if (module == prefix or inside) and len(prefix) > found[1]:
                found = number, len(prefix)
    return found[0]


def test_every_module_has_a_floor():
    assert not [m for m in MODULES if _floor(m) is None], "give these a floor in FLOORS and docs/design.md"


def test_imports_only_point_down_the_floors():
    up = [f"{MODULES[m].relative_to(ROOT)}: {m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
          for m, targets in _graph().items() for t in targets
          if _floor(m) is not None and _floor(t) is not None and _floor(t) < _floor(m)]
    assert not up, "imports up the floors:\n" + "\n".join(up)


def test_the_floor_check_sees_an_upward_import():
    assert _floor("deploykit.quantize.tune") > _floor("deploykit.verify")     # tune -> verify would be up
    assert _floor("deploykit.package.write") == _floor("deploykit.package")
    assert _floor("deploykit.something_new") is None                         # must be placed
