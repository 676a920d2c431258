"""The shape of the package, read from the source (ast), not by importing it:
the CLI dispatcher is a leaf, library modules do not import click, no import cycles
(lazy imports inside functions and the CLI's lazily loaded commands count too)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mlx_openelm": ROOT / "mlx_openelm", "mlx_openelm.tokenizer": ROOT / "mlx_openelm" / "tokenizer",
            "mlx_openelm.convert": ROOT / "convert", "mlx_openelm.bench": ROOT / "bench",
            "mlx_openelm.tuning": ROOT / "mlx_openelm" / "tuning", "mlx_openelm.serve": ROOT / "mlx_openelm" / "serve",
            "mlx_openelm.folder": ROOT / "mlx_openelm" / "folder",
            "mlx_openelm.constrain": ROOT / "mlx_openelm" / "constrain",
            "mlx_openelm.evaluation": ROOT / "mlx_openelm" / "evaluation"}


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
    """Nothing but `blas`, a leaf that imports no MLX, for `--version`'s BLAS line."""
    imports = imported_names("mlx_openelm.cli", MODULES["mlx_openelm.cli"])
    assert {m for m in imports if m == "mlx_openelm" or m.startswith("mlx_openelm.")} <= {
        "mlx_openelm.blas", "mlx_openelm.blas.describe"}


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


def _package_edges(edges: dict[str, set[str]], source: str, target: str) -> list[tuple[str, str]]:
    inside = lambda module, package: module == package or module.startswith(package + ".")
    return sorted((a, b) for a, targets in edges.items() if inside(a, source) for b in targets if inside(b, target))


# The capabilities built on the core depend only downward: on the core, never on each other (what
# both need, such as writing and installing a model folder, lives in the core: `mlx_openelm.folder`).
CAPABILITIES = ("mlx_openelm.convert", "mlx_openelm.tuning")


@pytest.mark.parametrize("source, target", [(a, b) for a in CAPABILITIES for b in CAPABILITIES if a != b])
def test_convert_and_tuning_do_not_import_each_other(source, target):
    assert _package_edges(project_edges(), source, target) == []


def test_package_edges_sees_a_module_of_one_package_importing_another():
    edges = {"mlx_openelm.tuning.fuse": {"mlx_openelm.convert.writing", "mlx_openelm.folder.writing"},
             "mlx_openelm.convert": {"mlx_openelm.convert.pipeline"}}
    assert _package_edges(edges, "mlx_openelm.tuning", "mlx_openelm.convert") == [
        ("mlx_openelm.tuning.fuse", "mlx_openelm.convert.writing")]
    assert _package_edges(edges, "mlx_openelm.convert", "mlx_openelm.tuning") == []


def test_what_both_share_imports_neither():
    shared = [name for name in MODULES if name.startswith("mlx_openelm.folder")] + [
        "mlx_openelm.quantizers", "mlx_openelm.signals"]
    edges = {name: targets for name, targets in project_edges().items() if name in shared}
    assert [edge for package in CAPABILITIES for edge in _package_edges(edges, "mlx_openelm", package)] == []


@pytest.mark.parametrize("edges, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set()}, None),
])
def test_find_cycle(edges, cycle):
    assert find_cycle(edges) == cycle


# --- size limits (the founders' standard: no module over ~400 lines, no function over ~60) ---

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # code lines: the signature and body, not the docstring
# A function may exceed the limit only if it is named here with the reason, and a comment in
# the function says the same. Keep this empty unless splitting would make the code harder to read.
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}


def function_lengths(path: Path) -> dict[str, int]:
    """`qualified name -> lines` for every function in a module, docstrings not counted."""
    lengths = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                body = child.body
                if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                        and isinstance(body[0].value.value, str):
                    lines -= body[0].end_lineno - body[0].lineno + 1
                lengths[name] = lines
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text(), str(path)), "")
    return lengths


def test_function_lengths_count_code_not_docstrings(tmp_path):
    source = 'def f():\n    """Doc\n    string."""\n    x = 1\n    return x\n\n' \
             'class C:\n    def g(self):\n        def inner():\n            pass\n        return 1\n'
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert function_lengths(path) == {"f": 3, "C.g": 4, "C.g.inner": 2}


def test_no_module_is_over_the_line_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_is_over_the_line_limit_unless_allowed():
    long = {f"{module}.{function}": n for module, path in MODULES.items()
            for function, n in function_lengths(path).items() if n > MAX_FUNCTION_LINES}
    assert set(long) <= set(LONG_FUNCTIONS_ALLOWED), long
    # an allow-list entry for a function that is short again must go
    assert set(LONG_FUNCTIONS_ALLOWED) <= set(long), set(LONG_FUNCTIONS_ALLOWED) - set(long)


# --- docs/architecture.md's layout table names every module, and only modules that exist ---

ARCHITECTURE = ROOT / "docs" / "architecture.md"

# A subpackage before its parent: a row's first cell is matched against these in order.
FOLDERS = {"mlx_openelm/tokenizer/": ROOT / "mlx_openelm" / "tokenizer",
           "mlx_openelm/tuning/": ROOT / "mlx_openelm" / "tuning", "mlx_openelm/serve/": ROOT / "mlx_openelm" / "serve",
           "mlx_openelm/folder/": ROOT / "mlx_openelm" / "folder",
           "mlx_openelm/constrain/": ROOT / "mlx_openelm" / "constrain",
           "mlx_openelm/evaluation/": ROOT / "mlx_openelm" / "evaluation",
           "mlx_openelm/": ROOT / "mlx_openelm",
           "convert/": ROOT / "convert", "bench/": ROOT / "bench"}


def layout_table_modules(page: str) -> set[str]:
    """`folder/name.py` for every module the Layout table names: a row's first cell
    says the folder (`mlx_openelm/model.py` or `convert/ → ...`); bare `name.py` in the row
    belong to that folder."""
    section = page.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        first = row.split("|")[1]
        folder = next((f for f in FOLDERS if f"`{f}" in first), None)
        if folder is None:
            continue
        for name in re.findall(r"`(?:[\w/]*/)?(\w+\.py)`", row):
            named.add(folder + name)
    return named


def test_layout_parser_reads_folders_from_the_first_cell():
    table = ("\n## Layout\n\n| path | what |\n|---|---|\n"
             "| `mlx_openelm/a.py`, `b.py` | x `c.py` |\n| `convert/` → `mlx_openelm.convert` | `d.py` |\n"
             "| `tests/` | `e.py` |\n\n## Next\n| `bench/x.py` | |\n")
    assert layout_table_modules(table) == {"mlx_openelm/a.py", "mlx_openelm/b.py", "mlx_openelm/c.py",
                                           "convert/d.py"}


def test_layout_table_names_exactly_the_modules_in_the_tree():
    tree = {prefix + path.name for prefix, folder in FOLDERS.items() for path in folder.glob("*.py")}
    listed = layout_table_modules(ARCHITECTURE.read_text())
    assert sorted(tree - listed) == [], "modules missing from docs/architecture.md's Layout table"
    assert sorted(listed - tree) == [], "docs/architecture.md's Layout table names modules that do not exist"


def test_layout_table_names_every_top_level_entry():
    """Every tracked top-level folder and file (but README.md itself and dotfiles) has a row."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    top = {line.split("/")[0] + ("/" if "/" in line else "") for line in tracked.stdout.splitlines()}
    top = {name for name in top if name != "README.md" and not name.startswith(".")}
    table = ARCHITECTURE.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    first_cells = " ".join(row.split("|")[1] for row in table.splitlines() if row.startswith("| `"))
    assert sorted(name for name in top if f"`{name}" not in first_cells) == []


# --- tests and scripts share support code through modules made for it ---

def test_no_test_module_imports_another():
    """Shared fixtures live in conftest.py, shared helpers in support modules (synthetic.py,
    serving.py, ...): a test module importing another runs that module's imports and skips too."""
    found = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        names = imported_names(path.stem, path)
        found.update({path.name: sorted(n for n in names if n.split(".")[0].startswith("test_"))})
    assert {name: imports for name, imports in found.items() if imports} == {}


def test_scripts_reach_the_test_support_through_scripts_support():
    """No script edits sys.path; `from support import trained, synthetic` loads tests/'s own files."""
    import subprocess
    import sys

    assert sorted(p.name for p in (ROOT / "scripts").glob("*.py") if "sys.path" in p.read_text()) == []
    code = "import support, sys; print(support.trained.__file__, support.synthetic.__file__); import conftest"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "scripts", capture_output=True, text=True,
                          timeout=60)
    trained, synthetic = proc.stdout.split()
    assert (Path(trained), Path(synthetic)) == (ROOT / "tests" / "trained.py", ROOT / "tests" / "synthetic.py")
    assert "No module named 'conftest'" in proc.stderr  # nothing else in tests/ became importable
