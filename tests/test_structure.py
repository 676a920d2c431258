"""The shape of the package, read from the source (ast), not by importing it:
the CLI dispatcher is a leaf, library modules do not import click, no import cycles
(lazy imports inside functions and the CLI's lazily loaded commands count too)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mlx_openelm": ROOT / "mlx_openelm", "mlx_openelm.convert": ROOT / "convert",
            "mlx_openelm.bench": ROOT / "bench"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


MODULES = project_modules()


def _package_of(name: str, path: Path) -> str:
    return name if path.stem == "__init__" else name.rsplit(".", 1)[0]


def imported_names(name: str, path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (top level or inside functions), absolute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name, path)
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def lazy_string_imports(path: Path) -> set[str]:
    """Modules named in "module:attribute" strings (the CLI's COMMANDS table)."""
    text = path.read_text()
    return set(re.findall(r'"((?:mlx_openelm)(?:\.\w+)*):\w+"', text))


def project_edges() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        targets = imported_names(name, path) | lazy_string_imports(path)
        edges[name] = {t for t in targets if t in MODULES and t != name}
    return edges


def test_the_analysis_sees_lazy_imports():
    """Guard for the checks below: function-level and COMMANDS-string imports are edges."""
    edges = project_edges()
    assert "mlx_openelm.generate_cli" in edges["mlx_openelm.cli"]  # from the COMMANDS table
    assert "mlx_openelm.generation" in edges["mlx_openelm.generate_cli"]  # imported inside the command
    assert "mlx_openelm.cli_common" in edges["mlx_openelm.bench.cli"]


def test_cli_dispatcher_imports_nothing_from_the_project():
    imports = imported_names("mlx_openelm.cli", MODULES["mlx_openelm.cli"])
    assert not {m for m in imports if m == "mlx_openelm" or m.startswith("mlx_openelm.")}


def is_cli_module(name: str) -> bool:
    return name.endswith(("_cli", ".cli", ".cli_common"))


def test_library_modules_do_not_import_click():
    offenders = [name for name, path in MODULES.items()
                 if not is_cli_module(name) and any(m.split(".")[0] == "click" for m in imported_names(name, path))]
    assert offenders == []


def find_cycle(edges: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_among_project_modules():
    assert find_cycle(project_edges()) is None


@pytest.mark.parametrize("edges, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set()}, None),
])
def test_find_cycle(edges, cycle):
    assert find_cycle(edges) == cycle
