"""Daemons run as real processes, for fault tests."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.deploy import free_port

__all__ = ["free_port"]


def small_volume_wrapper(*volumes: tuple[Path, int]) -> tuple[str, ...]:
    """A wrapper that runs a command with each ``(folder, size_bytes)`` a tmpfs of its own.

    The mounts live in a private mount namespace (root only) and go when the
    command exits: nothing outside the test sees them. Inside, the test
    reads them through ``/proc/PID/root``.
    """
    mounts = " && ".join(
        f"mount -t tmpfs -o size={size} blockrepl-test {shlex.quote(str(folder))}"
        for folder, size in volumes
    )
    return ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            f'{mounts} && exec "$@"', "sh")  # fmt: skip


def loop_volume_wrapper(image: Path, folder: Path) -> tuple[str, ...]:
    """A wrapper that runs a command with the ext4 ``image`` mounted on ``folder``.

    In a private mount namespace (root only). ``commit=300`` keeps ext4 from
    writing its journal on a timer: the image changes only when the command
    syncs, so a copy taken while the command is stopped is exactly what a
    power cut at that instant would leave on the device.
    """
    script = 'mount -o loop,commit=300,data=writeback "$0" "$1" && shift && exec "$@"'
    return ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
            str(image), str(folder))  # fmt: skip


class ChildProcess:
    """A process a test started; registered in :data:`RUNNING` by its constructor."""

    proc: subprocess.Popen[bytes] | None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def kill_if_running(self) -> None:
        """Make sure no such process outlives its test, whatever happened."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


#: Every process a test made; the conftests' autouse fixtures kill what is left.
RUNNING: list[ChildProcess] = []


@dataclass
class Daemon(ChildProcess):
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    #: runs in the child before exec (for example to set a resource limit)
    preexec: Callable[[], None] | None = None
    #: extra environment for the next start only (for example a crash point)
    env_once: dict[str, str] | None = None
    #: the daemon's module: mastertarget.cli or processserver.cli
    module: str = "mastertarget.cli"
    #: a command that runs the daemon's command line (its arguments follow),
    #: for example to give it a private mount namespace
    wrapper: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        RUNNING.append(self)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", self.module, "serve", "--config",
                 str(self.config)],
                stdout=out, stderr=out, preexec_fn=self.preexec,  # noqa: PLW1509 - setrlimit only
                env={**os.environ, **(self.env_once or {})},
            )  # fmt: skip
        self.starts += 1
        self.env_once = None

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)
