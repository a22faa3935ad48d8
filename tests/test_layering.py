"""The package boundaries of docs/design.md, checked on the import statements.

protocol/ is sans-IO: it must not import anything that reaches files,
sockets, clocks or event loops. The daemons and the agent meet only over
HTTP and in protocol/'s formats, so none imports another. No two modules
import each other, however indirectly, and only a daemon's command builds it.
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


# --- inside the packages: no cycles, and only the command builds a daemon ----------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, known: set[str]) -> set[str]:
    """Our modules ``path`` imports, anywhere in it (``TYPE_CHECKING`` and in functions too).

    ``from a.b import c`` is the module ``a.b.c`` when that is one of ours, else ``a.b``.
    """
    name = _module_name(path)
    package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per dot past the first
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return (found & known) - {name}


def _import_graph() -> dict[str, set[str]]:
    """Which of our modules each module of ours imports."""
    paths = [path for package in ALLOWED for path in _files(package)]
    known = {_module_name(path) for path in paths}
    return {_module_name(path): _imported_modules(path, known) for path in paths}


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle between two modules, ``TYPE_CHECKING`` and in-function imports
    included: each module can be read, built and tested from the ones it imports."""
    graph = _import_graph()
    assert "mastertarget.daemon" in graph["mastertarget.cli"]  # the graph sees imports
    assert "agent.capture.window" in graph["agent.capture.replication"]
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_the_cycle_check_finds_a_cycle() -> None:
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter({"a": {"b"}, "b": {"c"}, "c": {"a"}}).static_order())


@pytest.mark.parametrize("daemon", ["processserver", "mastertarget"])
def test_only_the_command_builds_the_daemon(daemon: str) -> None:
    """Handlers, the shipper and the appliers get what they use, never the daemon object."""
    graph = _import_graph()
    importers = {name for name, imported in graph.items() if f"{daemon}.daemon" in imported}
    assert importers == {f"{daemon}.cli"}
