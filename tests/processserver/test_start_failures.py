"""A process server whose start fails, at any of its steps, leaves nothing behind.

Each case breaks one thing the start needs, in the order the start needs
them — the cache folder, the key file, the position database, a disk's cache
folder, the client certificate toward the master target, the server
certificate, the data port, the metrics port — so that the start gets that
far with everything made before it: the executor's threads, the database,
the recovered streams, the session to the master target, the shipping
tasks, the data listener. The start must raise, and the test's process must
then hold the same threads, asyncio tasks and file descriptors as before it,
and no client session may be left to be found unclosed by the garbage
collector (aiohttp reports one to the event loop's exception handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from processserver import config as ps_config
from processserver.daemon import ProcessServer
from runtime.errors import ConfigError, DurabilityError, KeyFileError, TlsSetupError
from tests.conftest import Deployment

from .test_api import write_ps_config


@dataclass
class Setup:
    """One case's process server: its config file and cache folder, the ports it is
    given (0 lets the kernel choose), and what the case holds while it starts."""

    config: Path
    cache: Path
    held: contextlib.ExitStack
    data_port: int = 0
    metrics_port: int = 0

    def edit(self, old: str, new: str) -> None:
        text = self.config.read_text()
        assert old in text, old
        self.config.write_text(text.replace(old, new, 1))

    def take_port(self, host: str) -> int:
        """A port on ``host`` that a socket of the case listens on."""
        sock = self.held.enter_context(socket.socket())
        sock.bind((host, 0))
        sock.listen()
        return int(sock.getsockname()[1])


def _cache_dir_a_file(setup: Setup) -> None:
    setup.cache.write_text("not a folder\n")


def _key_file_garbage(setup: Setup) -> None:
    keys = setup.config.parent / "keys.toml"
    keys.write_text("these are no keys\n")
    keys.chmod(0o600)
    setup.edit("key_file = ", f'key_file = "{keys}"\n# was: key_file = ')


def _positions_garbage(setup: Setup) -> None:
    setup.cache.mkdir(mode=0o700)
    (setup.cache / "positions.db").write_bytes(b"not a database, " * 512)


def _disk_folder_a_file(setup: Setup) -> None:
    # The second disk: the first one's stream is recovered by then.
    (setup.cache / "disks").mkdir(parents=True, mode=0o700)
    (setup.cache / "disks" / "vm01-d1").write_text("not a folder\n")


def _client_certificate_missing(setup: Setup) -> None:
    setup.edit("machine-ps01.pem", "no-such-certificate.pem")


def _server_certificate_missing(setup: Setup) -> None:
    setup.edit('/processserver.pem"', '/no-such-certificate.pem"')


def _data_port_taken(setup: Setup) -> None:
    setup.data_port = setup.take_port("0.0.0.0")  # the address the data port binds


def _metrics_port_taken(setup: Setup) -> None:
    setup.metrics_port = setup.take_port("127.0.0.1")


CASES: list[tuple[str, Callable[[Setup], None], type[BaseException]]] = [
    ("cache-folder", _cache_dir_a_file, OSError),
    ("key-file", _key_file_garbage, KeyFileError),
    ("position-database", _positions_garbage, DurabilityError),
    ("disk-cache-folder", _disk_folder_a_file, OSError),
    ("client-certificate", _client_certificate_missing, TlsSetupError),
    ("server-certificate", _server_certificate_missing, TlsSetupError),
    ("data-port", _data_port_taken, OSError),
    ("metrics-port", _metrics_port_taken, ConfigError),
]


@dataclass(frozen=True)
class Held:
    """What the test's process holds: threads, asyncio tasks, file descriptors."""

    threads: frozenset[threading.Thread]
    tasks: frozenset[asyncio.Task[object]]
    #: descriptor number → what it is open on
    fds: dict[int, str]

    @classmethod
    def now(cls) -> Held:
        fds = {}
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
                fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        return cls(frozenset(threading.enumerate()), frozenset(tasks), fds)  # type: ignore[arg-type]

    def left_since(self, before: Held) -> dict[str, object]:
        """What is held now and was not ``before``."""
        left = {
            "threads": sorted(t.name for t in self.threads - before.threads),
            "tasks": sorted(t.get_name() for t in self.tasks - before.tasks),
            "fds": sorted(
                f"{fd} -> {target}" for fd, target in self.fds.items()
                if before.fds.get(fd) != target
            ),
        }  # fmt: skip
        return {kind: found for kind, found in left.items() if found}


async def test_a_start_that_fails_at_any_step_leaves_nothing_behind(
    deployment: Deployment, tmp_path: Path
) -> None:
    def config_for(name: str) -> Path:
        (tmp_path / name).mkdir()
        return write_ps_config(deployment, tmp_path / name)

    # A whole start and stop first: what a first start makes once for the
    # process (what the event loop keeps for itself) is then there before every case.
    good = await ProcessServer.start(ps_config.load(config_for("good")), data_port=0,
                                     metrics_port=0)  # fmt: skip
    await good.close()
    leaks: dict[str, dict[str, object]] = {}
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    for name, breaker, expected in CASES:
        config = config_for(name)
        with contextlib.ExitStack() as held:
            setup = Setup(config, config.parent / "cache", held)
            breaker(setup)
            before = Held.now()
            with pytest.raises(expected) as raised:
                await ProcessServer.start(ps_config.load(config), data_port=setup.data_port,
                                          metrics_port=setup.metrics_port)  # fmt: skip
            after = Held.now()
        del raised  # its traceback holds the frames of the failed start
        gc.collect()  # what only the failed start referred to goes, and says if it was open
        left = after.left_since(before)
        if reported:
            left["unclosed"], reported[:] = list(reported), []
        if left:
            leaks[name] = left
    loop.set_exception_handler(None)
    assert leaks == {}, "a failed start left these behind"
