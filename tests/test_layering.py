"""The package boundaries of DESIGN.md, checked on the import statements.

protocol/ is sans-IO: it must not import anything that reaches files,
sockets, clocks or event loops. The daemons and the agent meet only over
HTTP and in protocol/'s formats, so none imports another.
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
