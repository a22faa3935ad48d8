"""A captured disk's NBD export: nbdkit and the capture plugin, as the agent's child.

nbdkit runs with ``--exit-with-parent`` (it does not outlive the agent) on a
loopback address only — NBD has no authentication. Its plugin gets one end
of a socketpair made here (``fd=N``, so nothing on the file system reaches
it), says hello with the geometry it sees, and nbdkit writes its pid file
once it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import socket
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from agent.capture.link import PluginLink
from agent.capture.plugin.dirtymap import Geometry
from agent.errors import CaptureError
from runtime.errors import InvalidArgumentError

log = logging.getLogger("blockrepl.agent.capture")

T = TypeVar("T")

#: The plugin nbdkit runs (in its own Python, so it is given by path).
PLUGIN: Final = Path(__file__).resolve().parent / "plugin" / "nbdkit_plugin.py"
#: Seconds nbdkit has after SIGTERM to finish the requests in flight; then it
#: is killed (the unit's TimeoutStopSec= of 60 s leaves room for the rest).
NBDKIT_STOP_TIMEOUT_S: Final = 20.0
#: How often the start looks for nbdkit's pid file (written once nbdkit listens).
PIDFILE_POLL_S: Final = 0.02


@dataclass(frozen=True, slots=True)
class Listen:
    """The NBD export's address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> Listen:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6), on a loopback address.

    Raises:
        InvalidArgumentError: naming what was expected.
    """
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    shape = f"--listen: expected HOST:PORT on a loopback address, found {text!r}"
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidArgumentError(shape)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidArgumentError(shape) from None
    if not address.is_loopback:
        raise InvalidArgumentError(
            f"--listen: {host} is not a loopback address: NBD has no authentication, and "
            "anyone who reaches the export can write the disk"
        )
    return Listen(host, int(port))


def find_nbdkit(configured: Path | None) -> str:
    """The nbdkit program: ``capture.nbdkit``, or nbdkit on the PATH.

    Raises:
        CaptureError: there is none.
    """
    if configured is not None:
        if not os.access(configured, os.X_OK):
            raise CaptureError(f"capture.nbdkit: {configured} is not an executable program")
        return str(configured)
    found = shutil.which("nbdkit")
    if found is None:
        raise CaptureError(
            "nbdkit is not installed (or not on the PATH): install Debian's nbdkit and "
            "nbdkit-plugin-python, or set capture.nbdkit"
        )
    return found


class NbdkitExport:
    """nbdkit serving one disk: :meth:`start`, then :meth:`stop`, :meth:`close_link` and
    :meth:`remove_pidfile` (also after a start that failed part way).

    Args:
        program: the nbdkit program.
        listen: the export's address.
        pidfile: where nbdkit writes its pid once it listens.
        start_timeout_s: how long nbdkit may take to say hello, and to listen.
        disk_id: the disk, for the log.
    """

    def __init__(
        self, program: str, listen: Listen, pidfile: Path, start_timeout_s: float, disk_id: str
    ) -> None:
        self._program = program
        self._listen = listen
        self._pidfile = pidfile
        self._timeout_s = start_timeout_s
        self._disk_id = disk_id
        self._process: asyncio.subprocess.Process | None = None
        #: the capture socket, once nbdkit's plugin holds the other end
        self.link: PluginLink | None = None

    async def start(self, source: Path, map_file: Path, geometry: Geometry) -> PluginLink:
        """Start nbdkit on ``source`` and return the capture socket once it listens.

        Raises:
            CaptureError: nbdkit exited, took too long, or its plugin sees another geometry.
        """
        with contextlib.suppress(FileNotFoundError):
            self._pidfile.unlink()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            self._process = await asyncio.create_subprocess_exec(
                self._program,
                "--foreground",
                "--exit-with-parent",
                f"--pidfile={self._pidfile}",
                f"--ipaddr={self._listen.host}",
                f"--port={self._listen.port}",
                "python",
                str(PLUGIN),
                f"source={source}",
                f"map={map_file}",
                f"fd={theirs.fileno()}",
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            )
        self.link = link = await PluginLink.open(mine)
        hello = await self._before_exit(link.hello(self._timeout_s), "said hello")
        if (hello.region_bytes, hello.disk_bytes) != (geometry.region_bytes, geometry.disk_bytes):
            raise CaptureError(
                f"the capture plugin sees regions of {hello.region_bytes} bytes on a disk of "
                f"{hello.disk_bytes}, the agent {geometry.region_bytes} on {geometry.disk_bytes}"
            )
        await self._before_exit(
            asyncio.wait_for(self._pidfile_written(), self._timeout_s), "listened"
        )
        return link

    async def wait(self) -> int:
        """Until nbdkit exits; its exit status."""
        assert self._process is not None
        return await self._process.wait()

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after :data:`NBDKIT_STOP_TIMEOUT_S`; the exit status
        (None if nbdkit was never started)."""
        process = self._process
        if process is None:
            return None
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), NBDKIT_STOP_TIMEOUT_S)
            except TimeoutError:
                log.error(
                    "disk %s: nbdkit did not stop within %g s of SIGTERM; killed",
                    self._disk_id,
                    NBDKIT_STOP_TIMEOUT_S,
                )
                process.kill()
                await process.wait()
        return process.returncode

    def close_link(self) -> None:
        if self.link is not None:
            self.link.close()

    def remove_pidfile(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._pidfile.unlink()

    async def _pidfile_written(self) -> None:
        while not self._pidfile.exists():
            await asyncio.sleep(PIDFILE_POLL_S)

    async def _before_exit(self, step: Awaitable[T], what: str) -> T:
        assert self._process is not None
        work = asyncio.ensure_future(step)
        exited = asyncio.ensure_future(self._process.wait())
        try:
            await asyncio.wait({work, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if not work.done():
            work.cancel()
            raise CaptureError(
                f"nbdkit exited with status {self._process.returncode} before it {what} (its "
                "messages are above); is nbdkit-plugin-python installed?"
            )
        try:
            return work.result()
        except TimeoutError:
            raise CaptureError(f"nbdkit has not {what} after {self._timeout_s:g} s") from None
