"""Imports run one way: each package of ddtool imports only the packages below it in the flow
docs/architecture.md draws (and the ground modules everyone may use), never one above, not
even inside a function."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bottom to top, as docs/architecture.md's flow line says
FLOORS = ("data", "networks", "augment", "experts", "matching", "storage", "evaluation", "methods", "run", "cli")
# one-module utilities with no ddtool imports but each other's: usable from every floor
GROUND = {"errors", "seeding", "paths", "files", "device", "distributed", "durations", "memory", "training"}
TOP = {"__init__", "__main__"}  # the Python API and `python -m ddtool`, above everything


def package_of(module: str) -> str:
    """ddtool.methods.trajectory -> "methods"; ddtool -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def ddtool_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of ddtool in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("ddtool"):
            if node.module == "ddtool":  # `from ddtool import x`: x is a module, or a name of the API
                found += [(node.lineno, f"ddtool.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("ddtool.")]
    return found


def rank(package: str) -> float:
    if package in GROUND:
        return -1
    if package in TOP:
        return len(FLOORS)
    return FLOORS.index(package)


def test_no_import_runs_up_a_floor():
    upward = []
    for path in sorted((ROOT / "ddtool").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        source = package_of(module)
        assert source in GROUND | TOP or source in FLOORS, f"{module}: a package the flow does not place"
        for line, imported in ddtool_imports(path):
            target = package_of(imported)
            if target == "__version__" or target == source:
                continue
            assert target in GROUND | TOP or target in FLOORS, f"{path}:{line} imports {imported}, placed nowhere"
            if source in GROUND and target not in GROUND or rank(target) >= rank(source) and source not in GROUND:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {source} imports {imported}")
    assert not upward, "imports that run up the flow:\n" + "\n".join(upward)


def test_the_architecture_page_draws_the_flow_the_imports_keep():
    text = (ROOT / "docs" / "architecture.md").read_text()
    line = re.search(r"^data -> .*$", text, re.MULTILINE)
    assert line is not None and line.group(0).split(" -> ") == list(FLOORS)
