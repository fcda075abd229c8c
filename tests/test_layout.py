"""The code's layout: layered packages without import cycles, no private name used outside its module, small files.

Read from the source with `ast`, so function-level imports count like module-level ones: a cycle hidden behind
an import inside a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "methods", "tasks")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import of a project module, at any depth."""
    tree = ast.parse(MODULES[name].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node)
            if target.split(".")[0] not in PACKAGES:
                continue
            plain = []
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:
                    out.append((f"{target}.{a.name}", [], node.lineno))  # a submodule
                else:
                    plain.append(a.name)
            if plain:
                out.append((target, plain, node.lineno))
    return out


def _edges(name: str) -> set[str]:
    """The project modules that importing `name` runs: each import's target and the packages above it, except
    the packages that contain `name` itself (they are being imported already)."""
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    out = set()
    for target, _, _ in _imports(name):
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in MODULES and mod not in own and mod != name:
                out.add(mod)
    return out


def test_no_import_cycle() -> None:
    graph = {name: _edges(name) for name in MODULES}
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_outside_its_module() -> None:
    found = []
    for name in MODULES:
        package = name if _is_package(name) else name.rpartition(".")[0]
        for target, names, line in _imports(name):
            if target == name:
                continue
            where = f"{MODULES[name].relative_to(ROOT)}:{line}"
            private_module = [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
            target_package = target.rpartition(".")[0]
            if private_module and not (package == target_package or package.startswith(target_package + ".")):
                found.append(f"{where} imports the private module {target}")
            found += [f"{where} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("package", ["methods", "tasks"])
def test_lower_layers_import_nothing_of_benchmark(package: str) -> None:
    found = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
        for name in MODULES
        if name.split(".")[0] == package
        for target, _, line in _imports(name)
        if target.split(".")[0] == "benchmark"
    ]
    assert not found, "\n".join(found)


def test_no_file_over_the_limit() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for path in MODULES.values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, "\n".join(long)


def test_benchmark_is_grouped_by_concern() -> None:
    """`benchmark/` holds its subpackages, the entry points (the command line and the Python API) and nothing else."""
    loose = sorted(p.name for p in (ROOT / "benchmark").glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "api.py", "cli.py"]
