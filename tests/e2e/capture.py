"""``blockrepl agent capture`` as a process, and NBD clients writing through it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.capture.plugin.dirtymap import read_map
from tests.conftest import require_binary
from tests.e2e.conftest import BLOCKREPL, DISK, START_TIMEOUT_S, Site
from tests.faults.daemons import RUNNING, ChildProcess, free_port

#: Seconds a test waits for a capture to settle (everything at the master target).
SETTLE_S = 90.0


def require_capture_peers() -> None:
    """nbdkit with its Python plugin, and qemu-io: skip (fail under CI) without them."""
    require_binary("nbdkit")
    require_binary("qemu-io")
    probe = subprocess.run(
        ["nbdkit", "python", "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        from tests.conftest import missing_peer  # noqa: PLC0415 - only when it is missing

        missing_peer(f"nbdkit-plugin-python is not installed: {probe.stderr.strip()}")


@dataclass
class CaptureProcess(ChildProcess):
    """One disk's ``blockrepl agent capture``, started and stopped by a test
    (none outlives its test: see :data:`~tests.faults.daemons.RUNNING`)."""

    site: Site
    source: Path
    disk: str = DISK
    port: int = field(default_factory=free_port)
    #: a command that runs the capture's command line (a private mount namespace)
    wrapper: tuple[str, ...] = ()
    #: runs in the child before exec (a prctl)
    preexec: Callable[[], None] | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        RUNNING.append(self)

    @property
    def log(self) -> Path:
        return self.site.root / f"capture-{self.disk}.log"

    @property
    def out(self) -> Path:
        return self.site.root / f"capture-{self.disk}.out"

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    @property
    def control(self) -> Path:
        return self.site.state_dir / "capture" / f"{self.disk}.sock"

    def command(self) -> list[str]:
        return [
            *self.wrapper, str(BLOCKREPL), "agent", "capture", "--config",
            str(self.site.agent_config), "--disk", self.disk, "--source", str(self.source),
            "--listen", f"127.0.0.1:{self.port}", "--json",
        ]  # fmt: skip

    def start(self) -> None:
        """Start it and wait until the NBD export takes connections."""
        with self.log.open("ab") as log, self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=log,
                preexec_fn=self.preexec,  # noqa: PLW1509 - a prctl only
            )  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0 and self.control.exists():
                    return
            time.sleep(0.05)
        pytest.fail(f"the capture did not start:\n{self.log.read_text()[-4000:]}")

    @property
    def map_file(self) -> Path:
        return self.site.state_dir / "capture" / f"{self.disk}.map"

    def dirty_regions(self) -> list[int]:
        """The dirty regions of the disk's dirty map, as the plugin left them."""
        return read_map(str(self.map_file))[1]

    def wait_clean(self, timeout: float = SETTLE_S) -> None:
        """Until the dirty map has no dirty region (the plugin was told all is shipped)."""
        deadline = time.monotonic() + timeout
        while self.dirty_regions():
            assert time.monotonic() < deadline, f"still dirty: {self.dirty_regions()}"
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        """The capture's status, from its control socket."""
        return self.call({"op": "status"})["status"]  # type: ignore[no-any-return]

    def call(self, request: dict[str, object]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.control))
            sock.sendall(json.dumps(request).encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                piece = sock.recv(65536)
                assert piece, "the control socket closed"
                answer += piece
        result: dict[str, Any] = json.loads(answer)
        return result

    def wait_status(
        self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = SETTLE_S
    ) -> dict[str, Any]:
        """Until ``check(status)``; the status then."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            assert self.proc.poll() is None, f"the capture ended:\n{self.log.read_text()[-4000:]}"
            status = self.status()
            if check(status):
                return status
            assert time.monotonic() < deadline, f"not {what} after {timeout} s: {status}"
            time.sleep(0.05)

    def settle(self, timeout: float = SETTLE_S) -> dict[str, Any]:
        """Until nothing is left to send or resync and the master target applied it all."""
        status = self.wait_status(
            "settled",
            lambda s: s["mode"] == "journaling" and s["pending_regions"] == 0
            and not s["window_open"] and s["journal_bytes"] == 0
            and s["shipped_seq"] == s["end_seq"],
            timeout,
        )  # fmt: skip
        self.site.wait_applied(status["generation"], status["end_seq"], timeout, disk=self.disk)
        return status

    def qemu_io(self, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run qemu-io on the export (writeback cache: FUA only with ``write -f``)."""
        result = subprocess.run(
            self._qemu_io_args(commands), capture_output=True, text=True, timeout=300, check=False
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
            assert "error" not in result.stdout.lower(), result.stdout
        return result

    def qemu_io_background(self, *commands: str) -> subprocess.Popen[str]:
        """qemu-io on the export, running while the test goes on."""
        return subprocess.Popen(
            self._qemu_io_args(commands), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip

    def _qemu_io_args(self, commands: tuple[str, ...]) -> list[str]:
        args = [require_binary("qemu-io"), "-f", "raw", "-t", "none", self.url]
        for command in commands:
            args += ["-c", command]
        return args

    def stop(self) -> tuple[int, dict[str, Any]]:
        """SIGTERM; the exit status and the JSON report."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=60)
        text = self.out.read_text()
        return status, (json.loads(text) if text.strip() else {})


def random_writes(
    rng: Any,
    size: int,
    count: int,
    *,
    zeros_every: int = 0,
    lengths: tuple[int, ...] = (512, 4096, 65536, 200 * 1024, 1024 * 1024),
) -> list[str]:
    """qemu-io commands: ``count`` writes of random patterns, ``lengths`` and 512-byte offsets."""
    commands = []
    for n in range(count):
        length = rng.choice(lengths)
        offset = rng.randrange(0, (size - length) // 512) * 512
        if zeros_every and n % zeros_every == zeros_every - 1:
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
    return commands
