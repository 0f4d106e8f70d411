"""The import rule of the README's layout, read from the source (AST): no cycles, and each layer imports
only the layers above it."""

import ast
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.fast

LAYERS = {  # layer: the layers it may import
    "hycam": set(),  # the method
    "hycam.data": set(),
    "hycam.baselines": {"hycam"},
    "hycam.train": {"hycam", "hycam.baselines", "hycam.data"},
    "hycam.evaluation": {"hycam", "hycam.baselines", "hycam.data"},
    "hycam.study": {"hycam", "hycam.baselines", "hycam.data", "hycam.train", "hycam.evaluation"},
    "main": {"hycam", "hycam.train"},
    "scripts": set(LAYERS_ALL := ("hycam", "hycam.data", "hycam.baselines", "hycam.train", "hycam.evaluation",
                                  "hycam.study")),
}


def modules() -> dict[str, Path]:
    """Every module of the package, main.py and scripts/, by dotted name."""
    found = {"main": REPO / "main.py"}
    for path in sorted((REPO / "hycam").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found |= {f"scripts.{path.stem}": path for path in sorted((REPO / "scripts").glob("*.py"))}
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (function-level imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            # `from pkg import sub` imports the submodule; `from pkg import function`, the package
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    if name.startswith("scripts."):  # a script runs with scripts/ on sys.path: `import x` may be scripts/x.py
        targets |= {f"scripts.{t}" for t in targets}
    return {t for t in targets if t in known and t != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer(module: str) -> str:
    if module == "main" or module.startswith("scripts."):
        return module.split(".")[0]
    return max((key for key in LAYERS if module == key or module.startswith(key + ".")), key=len)


def test_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, cycles


def test_each_layer_imports_only_the_layers_above_it():
    wrong = [f"{source} imports {target}" for source, targets in graph().items() for target in sorted(targets)
             if layer(target) != layer(source) and layer(target) not in LAYERS[layer(source)]]
    assert not wrong, wrong


def test_the_graph_sees_imports():
    edges = graph()  # a parser that found nothing would pass the two tests above
    assert "hycam.train" in {layer(t) for t in edges["main"]}
    assert any(layer(t) == "hycam" for t in edges["hycam.baselines.methods"])
