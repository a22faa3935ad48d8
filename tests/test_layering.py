"""The package boundaries of DESIGN.md, checked on the import statements.

protocol/ is sans-IO: it must not import anything that reaches files,
sockets, clocks or event loops. The daemons and the agent meet only over
HTTP and in protocol/'s formats, so none imports another. Inside the process
server, modules import each other without a cycle, and only its command
builds the daemon.
"""

from __future__ import annotations

import ast
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


# --- inside a daemon: no cycles, and only the command builds the daemon ------------------

#: Packages whose modules import each other without a cycle, ``if TYPE_CHECKING:``
#: imports included: each module can be read, built and tested from the ones it
#: imports, without the whole.
ACYCLIC = ("processserver",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _inner_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` imports, anywhere in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                steps = package.split(".")
                base = ".".join([*steps[: len(steps) - node.level + 1], *filter(None, [base])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found & modules


def _import_graph(package: str) -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in _files(package)}
    modules = set(paths) - {package}  # the package's __init__ holds no code to cycle through
    return {name: _inner_imports(paths[name], modules) - {name} for name in sorted(modules)}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as the modules along it, or [] when there is none."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str]:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return []
        for target in sorted(graph[name]):
            if cycle := visit(target, [*path, name]):
                return cycle
        done.add(name)
        return []

    for name in graph:
        if cycle := visit(name, []):
            return cycle
    return []


@pytest.mark.parametrize("package", ACYCLIC)
def test_modules_import_each_other_without_a_cycle(package: str) -> None:
    graph = _import_graph(package)
    assert len(graph) > 1, f"{package}/ has no modules to check"
    assert _cycle(graph) == []


def test_only_the_command_imports_the_process_server_daemon() -> None:
    importers = {
        name for name, imported in _import_graph("processserver").items()
        if "processserver.daemon" in imported
    }  # fmt: skip
    assert importers == {"processserver.cli"}
