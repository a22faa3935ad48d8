"""run_daemon and systemd's notification protocol, with a real notification socket.

A small daemon runs in a child process with ``NOTIFY_SOCKET`` pointing at a
datagram socket the test binds, as systemd would; the test sends it SIGHUP
and SIGTERM and reads what it told "systemd".
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.service import watchdog_interval_s

#: The child: start takes a moment (a SIGHUP may land in it), each reload
#: appends to a file, a reload of "boom" raises, close appends "closed";
#: with $CRASH, a vital task dies on a bug once started.
DAEMON = """
import asyncio, os, sys
from pathlib import Path
from runtime.service import run_daemon, vital

trace = Path(sys.argv[1])

def note(text):
    with trace.open("a") as f:
        f.write(text + "\\n")

async def start():
    note("starting")
    await asyncio.sleep(float(sys.argv[2]))
    note("started")
    if os.environ.get("CRASH"):
        vital(asyncio.create_task(crash(), name="apply-d0"))
    return trace

async def crash():
    await asyncio.sleep(0.1)
    raise ValueError("a bug in a task")

async def reload(handle):
    note("reload")
    if Path(str(handle) + ".boom").exists():
        raise RuntimeError("a bug in reload")

async def close(handle):
    note("closed")

run_daemon(start, close, reload)
"""

DEADLINE_S = 20.0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(DEADLINE_S)
    yield sock
    sock.close()


def spawn(tmp_path: Path, sock: socket.socket, start_s: float, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(tmp_path / "trace"), str(start_s)],
        env={**os.environ, "NOTIFY_SOCKET": sock.getsockname(), **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def next_message(sock: socket.socket, *, skip_watchdog: bool = True) -> str:
    while True:
        message = sock.recv(4096).decode()
        if not (skip_watchdog and message == "WATCHDOG=1"):
            return message


def wait_for_trace(path: Path, line: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while line not in (path.read_text().splitlines() if path.exists() else []):
        assert time.monotonic() < deadline, f"no {line!r} in the trace"
        time.sleep(0.02)


def test_ready_reload_and_stop_are_told_to_systemd(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    proc = spawn(tmp_path, notify_socket, 0.0)
    try:
        assert next_message(notify_socket) == "READY=1"
        proc.send_signal(signal.SIGHUP)
        reloading = next_message(notify_socket).split("\n")
        assert reloading[0] == "RELOADING=1"
        assert reloading[1].startswith("MONOTONIC_USEC=")
        assert int(reloading[1].split("=")[1]) <= time.monotonic_ns() // 1000
        assert next_message(notify_socket) == "READY=1"
        proc.send_signal(signal.SIGTERM)
        assert next_message(notify_socket) == "STOPPING=1"
        output, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    trace = (tmp_path / "trace").read_text().split()
    assert trace == ["starting", "started", "reload", "closed"]


def test_a_sighup_during_start_is_served_once_ready_and_does_not_kill(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    proc = spawn(tmp_path, notify_socket, 1.0)
    try:
        wait_for_trace(tmp_path / "trace", "starting")
        for _ in range(3):  # a burst: one reload
            proc.send_signal(signal.SIGHUP)
        assert next_message(notify_socket) == "READY=1"
        assert next_message(notify_socket).startswith("RELOADING=1")
        assert next_message(notify_socket) == "READY=1"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert (tmp_path / "trace").read_text().split() == ["starting", "started", "reload", "closed"]


def test_a_failing_reload_keeps_the_daemon_running(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    (tmp_path / "trace.boom").touch()
    proc = spawn(tmp_path, notify_socket, 0.0)
    try:
        assert next_message(notify_socket) == "READY=1"
        proc.send_signal(signal.SIGHUP)
        assert next_message(notify_socket).startswith("RELOADING=1")
        assert next_message(notify_socket) == "READY=1"
        proc.send_signal(signal.SIGHUP)  # the reloader still serves
        assert next_message(notify_socket).startswith("RELOADING=1")
        assert next_message(notify_socket) == "READY=1"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "the reload failed; the daemon keeps running as before" in output
    assert "RuntimeError: a bug in reload" in output


def test_the_watchdog_is_pinged(tmp_path: Path, notify_socket: socket.socket) -> None:
    proc = spawn(tmp_path, notify_socket, 0.0, WATCHDOG_USEC="200000")
    try:
        assert next_message(notify_socket) == "READY=1"
        for _ in range(3):
            assert next_message(notify_socket, skip_watchdog=False) == "WATCHDOG=1"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=DEADLINE_S)
    finally:
        proc.kill()
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("200000", None, 0.1),  # half of WatchdogSec=, as sd_watchdog_enabled(3) advises
        ("200000", "self", 0.1),
        ("200000", "1", None),  # set for another process: a child must not ping
        ("0", None, None),
        ("", None, None),
        ("abc", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, expected: float | None
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert watchdog_interval_s() == expected


def test_a_child_does_not_ping_for_another_process(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    proc = spawn(tmp_path, notify_socket, 0.0, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    try:
        assert next_message(notify_socket, skip_watchdog=False) == "READY=1"
        proc.send_signal(signal.SIGTERM)
        assert next_message(notify_socket, skip_watchdog=False) == "STOPPING=1"
        proc.communicate(timeout=DEADLINE_S)
    finally:
        proc.kill()
    assert proc.returncode == 0


def test_a_vital_task_that_dies_stops_the_daemon_with_a_failure(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """Systemd restarts it (Restart=on-failure); running on would leave a disk stalled."""
    proc = spawn(tmp_path, notify_socket, 0.0, CRASH="1")
    try:
        assert next_message(notify_socket) == "READY=1"
        assert next_message(notify_socket) == "STOPPING=1"
        output, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        proc.kill()
    assert proc.returncode == 70, output
    assert "task apply-d0 stopped on an unexpected error" in output
    assert "ValueError: a bug in a task" in output
    assert (tmp_path / "trace").read_text().split() == ["starting", "started", "closed"]
