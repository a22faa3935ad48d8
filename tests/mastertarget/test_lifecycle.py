"""A master target whose start fails at any step leaves nothing behind.

Each case breaks one step of ``MasterTarget.start`` with a real bad file, a
missing one or a port in use — the cache folder, the retention volume, the
key file, the catalog, the TLS files, the first target, the second target
once the first disk applies, the second disk's inbox, the data port, the
admin socket, the metrics port — and checks that the threads, the asyncio
tasks and the open file descriptors of the process are those it had before
the start.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from tests.conftest import Deployment

from .conftest import write_config

SIZE = 2 * 2**20
#: How long a thread of a failed start may take to end after it: a thread
#: shut down without waiting ends within milliseconds; one left running never.
SETTLE_S = 3.0


@dataclass(frozen=True)
class Resources:
    threads: frozenset[str]
    tasks: frozenset[asyncio.Task[object]]
    fds: dict[int, str]

    def left_after(self, other: Resources) -> list[str]:
        """What ``self`` holds that ``other`` (taken before) did not."""
        left = [f"thread {t}" for t in sorted(self.threads - other.threads)]
        left += [f"task {t.get_name()}" for t in self.tasks - other.tasks]
        left += [f"fd {fd} -> {what}" for fd, what in self.fds.items() if other.fds.get(fd) != what]
        return left


def _resources() -> Resources:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            continue
    threads = frozenset(f"{t.name}/{t.ident}" for t in threading.enumerate())
    return Resources(threads, frozenset(asyncio.all_tasks()), fds)


async def _settled(before: Resources) -> list[str]:
    """What is still held, once what is on its way out had time to go."""
    deadline = time.monotonic() + SETTLE_S
    while (left := _resources().left_after(before)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _garbage(path: Path) -> Path:
    path.write_bytes(b"this is not what it should be\n" * 300)
    return path


def _make_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a file where a folder must be")
    return path


ANY_PORTS: dict[str, int] = {"data_port": 0, "metrics_port": 0}


def _cache_directory(root: Path, _config: Path, _taken: socket.socket) -> dict[str, int]:
    _make_file(root / "cache")
    return ANY_PORTS


def _retention_volume(root: Path, _config: Path, _taken: socket.socket) -> dict[str, int]:
    shutil.rmtree(root / "retention")
    return ANY_PORTS


def _key_file(root: Path, config: Path, _taken: socket.socket) -> dict[str, int]:
    _replace(config, "key_file", f'key_file = "{_garbage(root / "keys.toml")}"\n#')
    return ANY_PORTS


def _catalog(root: Path, _config: Path, _taken: socket.socket) -> dict[str, int]:
    _garbage(root / "retention" / "state.db")
    return ANY_PORTS


def _tls_files(root: Path, config: Path, _taken: socket.socket) -> dict[str, int]:
    _replace(config, "cert_file = ", f'cert_file = "{_garbage(root / "cert.pem")}"\n#')
    return ANY_PORTS


def _first_target(_root: Path, config: Path, _taken: socket.socket) -> dict[str, int]:
    _replace(config, "create = true", "create = false")
    return ANY_PORTS


def _second_target(root: Path, config: Path, _taken: socket.socket) -> dict[str, int]:
    target = f'target = "{root / "d1.raw"}"\n'
    _replace(config, target + "create = true", target + "create = false")
    return ANY_PORTS


def _second_inbox(root: Path, _config: Path, _taken: socket.socket) -> dict[str, int]:
    _make_file(root / "cache" / "inbox" / "d1")
    return ANY_PORTS


def _data_port(_root: Path, _config: Path, taken: socket.socket) -> dict[str, int]:
    return {"data_port": taken.getsockname()[1], "metrics_port": 0}


def _admin_socket(root: Path, config: Path, _taken: socket.socket) -> dict[str, int]:
    socket_path = _make_file(root / "run") / "a.sock"
    _replace(config, "admin_socket = ", f'admin_socket = "{socket_path}"\n#')
    return ANY_PORTS


def _metrics_port(_root: Path, _config: Path, taken: socket.socket) -> dict[str, int]:
    return {"data_port": 0, "metrics_port": taken.getsockname()[1]}


#: Each step of a start, in order, how it is broken, and what the error says.
CASES: dict[str, tuple[Callable[[Path, Path, socket.socket], dict[str, int]], str]] = {
    "cache-directory": (_cache_directory, r"File exists"),
    "retention-volume": (_retention_volume, r"retention directory .* does not exist"),
    "key-file": (_key_file, r"keys\.toml"),
    "catalog": (_catalog, r"state database .*state\.db"),
    "tls-files": (_tls_files, r"cert\.pem"),
    "first-target": (_first_target, r"d0\.raw"),
    "second-target-after-the-first-applies": (_second_target, r"d1\.raw"),
    "second-inbox": (_second_inbox, r"File exists|Not a directory"),
    "data-port": (_data_port, r"address already in use"),
    "admin-socket": (_admin_socket, r"File exists|Not a directory"),
    "metrics-port": (_metrics_port, r"cannot listen for metrics"),
}


def _config(deployment: Deployment, root: Path) -> Path:
    root.mkdir()
    disks = [
        {"id": d, "target": root / f"{d}.raw", "create": True, "size_bytes": SIZE}
        for d in ("d0", "d1")
    ]
    return write_config(deployment, root, disks)


async def test_a_failed_start_at_any_step_leaves_nothing_behind(
    deployment: Deployment, tmp_path: Path
) -> None:
    # Once whole: whatever a first start makes for good (the loop guard's
    # descriptor, caches) is part of the baseline, and the check sees a
    # daemon that started and stopped leave nothing either.
    warm = await MasterTarget.start(
        mt_config.load(_config(deployment, tmp_path / "warm")), data_port=0, metrics_port=0
    )
    await warm.close()
    taken = _listening()
    try:
        first = _resources()
        assert first.threads
        assert first.fds
        failures: dict[str, list[str]] = {}
        for name, (breaker, expected) in CASES.items():
            root = tmp_path / name
            ports = breaker(root, _config(deployment, root), taken)
            config = mt_config.load(root / "mastertarget.toml")
            before = _resources()
            with pytest.raises(Exception) as caught:  # each step fails its own way
                await MasterTarget.start(config, **ports)
            message = getattr(caught.value, "message", None) or str(caught.value)
            assert re.search(expected, message, re.IGNORECASE), f"{name}: {message}"
            if left := await _settled(before):
                failures[name] = left
            assert not (root / "admin.sock").exists(), f"{name}: the admin socket was left"
        assert failures == {}
        assert await _settled(first) == []
    finally:
        taken.close()
