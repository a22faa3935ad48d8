"""The package boundaries of DESIGN.md, checked on the import statements.

protocol/ is sans-IO: it must not import anything that reaches files,
sockets, clocks or event loops. The daemons and the agent meet only over
HTTP and in protocol/'s formats, so none imports another.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Top-level modules that do I/O, read clocks or run event loops.
IO_MODULES = {
    "asyncio", "socket", "ssl", "os", "io", "pathlib", "time", "datetime", "shutil",
    "subprocess", "threading", "select", "selectors", "tempfile", "aiohttp", "uvloop",
    "logging", "random", "secrets", "sqlite3", "urllib", "http", "runtime",
}  # fmt: skip

ALLOWED = {
    "protocol": {"protocol"},
    "runtime": {"protocol", "runtime"},
    "processserver": {"protocol", "runtime", "processserver"},
    "mastertarget": {"protocol", "runtime", "mastertarget"},
    "agent": {"protocol", "runtime", "agent"},
}
OURS = set(ALLOWED) | {"benchmarks", "tests"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_protocol_does_no_io() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & IO_MODULES)
        for path in _files("protocol")
        if _imports(path) & IO_MODULES
    }
    assert offenders == {}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_design_allows(package: str) -> None:
    assert _files(package), f"{package}/ has no modules"
    offenders = {
        str(path.relative_to(ROOT)): sorted((_imports(path) & OURS) - ALLOWED[package])
        for path in _files(package)
        if (_imports(path) & OURS) - ALLOWED[package]
    }
    assert offenders == {}


def _module_graph(package: str) -> dict[str, set[str]]:
    """Which modules of ``package`` each of its modules imports, ``TYPE_CHECKING`` ones too."""
    modules = {}
    for path in _files(package):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                graph[name].update(named & modules.keys())
    return graph


def test_no_import_cycle_between_master_target_modules() -> None:
    """The handlers (server.py, admin.py) are given what they use as typed app
    keys and never import the daemon that builds them; no two modules of
    mastertarget/ import each other, even only for type checking."""
    graph = _module_graph("mastertarget")
    assert "mastertarget.daemon" in graph["mastertarget.cli"]  # the graph sees imports
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
