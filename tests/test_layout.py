"""The package's layout holds: no import cycles between modules, and docs/ARCHITECTURE.md's table is the tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
PACKAGE = CHECKOUT / "evaluator"


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        if "_home" in path.parts:
            continue
        parts = path.relative_to(CHECKOUT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The evaluator modules `path` imports when it is imported (lazy imports in functions and
    TYPE_CHECKING blocks are deliberate and left out); `from package import module` is the module."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found |= submodules or ({node.module} & modules)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & modules
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph[module]):
            if imported in path:
                found.append(path[path.index(imported) :] + [imported])
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    # A package's own __init__ imports its modules; a module importing a sibling through the package
    # name (`from evaluator.sandbox import memory_image`) is counted as importing the sibling.
    return {name: top_level_imports(path, names) - {name, "evaluator"} for name, path in files.items()}


def test_no_module_imports_in_a_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_the_architecture_table_names_every_module_and_nothing_that_is_gone():
    table = (CHECKOUT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"^\| `(evaluator/[^`]+)`", table, re.M))
    files = {path.relative_to(CHECKOUT).as_posix() for path in module_files().values()}
    # A row may stand for a whole folder (`evaluator/dataset/`).
    covered = {file for file in files if file in named or any(n.endswith("/") and file.startswith(n) for n in named)}
    assert sorted(files - covered) == []
    assert sorted(n for n in named if not (CHECKOUT / n).exists()) == []
