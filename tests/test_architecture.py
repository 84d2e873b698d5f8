"""The package's shape: imports point one way, no private name crosses a module, nothing imports gradio.

Read with ``ast`` (nothing is imported), so the test also covers imports inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cellhub"
#: modules allowed over the size aim (~500 lines), with the reason
LARGE_OK = {
    "cellhub.smears": "one algorithm (crop-to-smear matching) with its cache; splitting it scatters the matcher",
    "cellhub.models": "the registry: SmallCNN, its timm entry point and one builder per architecture",
    "cellhub.svm": "SVMClassifier: libsvm's maths re-implemented in numpy beside the scikit-learn fit",
    "cellhub.hub": "save, load and push, each with the error messages a user needs",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    mods = set(_modules())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            names = [a.name for a in node.names]
            # `from . import x` / `from .data import sources`: x may itself be a module
            submods = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            if submods:
                out += [(m, [], node.lineno) for m in submods]
                names = [n for n in names if f"{target}.{n}" not in mods]
            if names or not submods:
                out.append((target, names, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _names, _line in _imports(m, path):
            if target in mods and target != m:
                graph[m].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_imported_across_modules():
    mods = _modules()
    bad = []
    for m, path in mods.items():
        for target, names, line in _imports(m, path):
            if not target.startswith("cellhub"):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {n} from {target}")
    assert bad == []


def test_library_never_imports_gradio():
    offenders = [f"{m}:{line}" for m, path in _modules().items() for target, _n, line in _imports(m, path)
                 if target.split(".")[0] == "gradio"]
    assert offenders == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_size(module):
    lines = len(_modules()[module].read_text().splitlines())
    if module in LARGE_OK:
        assert lines < 800, f"{module}: {lines} lines"
    else:
        assert lines <= 520, f"{module} has {lines} lines; split it by concept (aim: ~500)"


def test_function_size():
    long = []
    for m, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 85:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert long == [], "split these functions (aim: ~80 lines)"
