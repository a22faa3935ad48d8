"""Shared test helpers and the test deployment (a CA, certificates, a key ring).

Tests that drive a real peer (openssl, qemu-img, prometheus, ...) call
:func:`require_binary`: outside CI a missing peer skips the test with the
reason, under ``CI=true`` it fails it, because CI must prove everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from agent.pki import init_ca, issue_machine
from protocol.keyring import KeyRing
from runtime.config import TlsFiles
from runtime.keyfile import write_new_keyring
from runtime.tls import client_context


def missing_peer(message: str) -> NoReturn:
    """Skip the test because a peer is missing, or fail it under CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_binary(name: str) -> str:
    """The path of an installed program, or skip (fail under CI) when missing."""
    path = shutil.which(name)
    if path is None:
        missing_peer(f"{name} is not installed (./scripts/test installs it when run as root)")
    return path


#: Seconds qemu-img may take to compare or check the test disks (MiB to a few hundred MiB).
QEMU_IMG_TIMEOUT_S = 120


def assert_image_holds(image: Path, expected: bytes, *, fmt: str = "raw", note: str = "") -> None:
    """Prove with ``qemu-img compare`` (a tool nobody here wrote) that the disk
    ``image`` reads as ``expected``; a VMDK must also pass ``qemu-img check``.

    The expected bytes are written beside the image as a raw reference.

    Args:
        fmt: the image's format (``raw`` or ``vmdk``).
        note: added to the failure message (a log's tail, the figures of a run).
    """
    with _GUARD.test_side():
        _assert_image_holds(image, expected, fmt=fmt, note=note)


def _assert_image_holds(image: Path, expected: bytes, *, fmt: str, note: str) -> None:
    qemu_img = require_binary("qemu-img")
    reference = image.with_name(f"{image.name}.expected")
    reference.write_bytes(expected)
    result = subprocess.run(
        [qemu_img, "compare", "-f", fmt, "-F", "raw", str(image), str(reference)],
        capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + note
    if fmt == "vmdk":
        check = subprocess.run(
            [qemu_img, "check", "-f", "vmdk", str(image)],
            capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_S, check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr


def require_root(why: str) -> None:
    """Skip (fail under CI) unless the tests run as root, as ./scripts/test does in CI."""
    if os.geteuid() != 0:
        message = f"not root: {why}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@dataclass(frozen=True)
class Deployment:
    pki: Path
    other_pki: Path
    key_file: Path
    keyring: KeyRing

    def client_tls(self, machine: str = "ps01", *, pki: Path | None = None) -> ssl.SSLContext:
        base = pki or self.pki
        return client_context(
            TlsFiles(
                ca_file=self.pki / "ca.pem",
                cert_file=base / f"machine-{machine}.pem",
                key_file=base / f"machine-{machine}.key",
            )
        )


def group_certificates(pki: Path, *machines: str) -> None:
    """Each machine's certificate for the consistency group port, made once."""
    for machine in machines:
        if not (pki / f"group-{machine}.pem").exists():
            issue_machine(pki, machine, group=True)


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    root = tmp_path_factory.mktemp("deployment")
    pki, other = root / "pki", root / "other-pki"
    init_ca(pki)
    for machine in ("ps01", "intruder", "vm01", "db01"):
        issue_machine(pki, machine)
    init_ca(other)
    issue_machine(other, "ps01")
    key_file = root / "data-keys.toml"
    keyring = write_new_keyring(key_file)
    return Deployment(pki, other, key_file, keyring)


#: Extra server names the shared PKI's ``init_ca`` gets: one DNS name, one IPv4 address.
EXTRA_SERVER_NAMES = ("ps.example.net", "192.0.2.10")


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with both server certificates (valid for :data:`EXTRA_SERVER_NAMES`
    too) and a certificate for machine vm01; shared read-only by the TLS and
    PKI tests."""
    directory = tmp_path_factory.mktemp("shared-pki") / "pki"
    init_ca(directory, EXTRA_SERVER_NAMES)
    issue_machine(directory, "vm01")
    return directory


@pytest.fixture(scope="session")
def other_pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA that also has a machine called vm01."""
    directory = tmp_path_factory.mktemp("other-shared-pki") / "pki"
    init_ca(directory)
    issue_machine(directory, "vm01")
    return directory


# --- the event loop never blocks ---------------------------------------------------------

#: The longest a callback may hold the event loop of a test: a daemon that
#: blocks its loop for longer stalls every connection it serves.
SLOW_CALLBACK_S = 0.1


class _LoopHoldGuard:
    """Times every callback an event loop runs while a daemon runs in the test's process.

    The time counted is the time the callback held its thread: asyncio's own
    debug check (``slow_callback_duration``) takes the wall clock, which also
    counts the time the thread waited for a core while other processes ran,
    and on two busy cores fails tests at random. This one subtracts that wait
    (the thread's ``run_delay`` in /proc/thread-self/schedstat), so what it
    counts is the callback's own work and every blocking call it made (an
    fsync, a sqlite commit, a read, a subprocess waited for). Garbage
    collections are left out too: their length is that of the whole test
    process's heap (Hypothesis, earlier tests), not the daemon's. So is the
    test's own checking (:meth:`test_side`), which runs in the test's task.
    """

    def __init__(self) -> None:
        self.seen: list[str] = []
        #: the daemons started in this process and not closed yet
        self.running: set[int] = set()
        self._local = threading.local()
        self._run = asyncio.events.Handle._run
        guard = self

        def timed_run(handle: asyncio.Handle) -> None:
            if not guard.running:
                guard._run(handle)
                return
            began, waited, left_out = time.monotonic(), guard._run_delay_s(), guard._left_out_s()
            guard._run(handle)
            held = time.monotonic() - began - (guard._run_delay_s() - waited)
            held -= guard._left_out_s() - left_out
            if held > SLOW_CALLBACK_S:
                what = asyncio.base_events._format_handle(handle)  # type: ignore[attr-defined]
                guard.seen.append(f"{what} held the loop {held:.3f} s")

        self.timed_run = timed_run
        gc.callbacks.append(self._time_collection)

    @contextlib.contextmanager
    def test_side(self) -> Iterator[None]:
        """Leave out the time of the test's own checking (a qemu-img run by
        :func:`assert_image_holds` between two awaits): it is not the daemon's."""
        began = time.monotonic()
        try:
            yield
        finally:
            self._local.left_out_s = self._left_out_s() + time.monotonic() - began

    def _time_collection(self, phase: str, _: dict[str, int]) -> None:
        if phase == "start":
            self._local.gc_began = time.monotonic()
        elif (began := getattr(self._local, "gc_began", None)) is not None:
            self._local.left_out_s = self._left_out_s() + time.monotonic() - began

    def _left_out_s(self) -> float:
        """Seconds this thread spent collecting garbage or checking for the test so far."""
        return float(getattr(self._local, "left_out_s", 0.0))

    def _run_delay_s(self) -> float:
        fd = getattr(self._local, "fd", None)
        if fd is None:
            fd = self._local.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9


_GUARD = _LoopHoldGuard()
#: What runs a daemon inside the test's process, started and closed by these
#: methods: while one runs, the test's event loop is the daemon's.
_IN_PROCESS_DAEMONS = (
    ("processserver.daemon", "ProcessServer"),
    ("mastertarget.daemon", "MasterTarget"),
    ("agent.group.service", "GroupService"),
)


@pytest.fixture(autouse=True)
def _loop_never_blocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail a test in which a callback held the event loop too long while a daemon ran in it."""
    for module_name, class_name in _IN_PROCESS_DAEMONS:
        cls = getattr(importlib.import_module(module_name), class_name)

        async def started(*args: Any, __start: Any = cls.start, **kwargs: Any) -> Any:
            daemon = await __start(*args, **kwargs)
            _GUARD.running.add(id(daemon))
            return daemon

        async def closed(daemon: Any, *args: Any, __close: Any = cls.close, **kwargs: Any) -> Any:
            _GUARD.running.discard(id(daemon))
            return await __close(daemon, *args, **kwargs)

        monkeypatch.setattr(cls, "start", started)
        monkeypatch.setattr(cls, "close", closed)
    monkeypatch.setattr(asyncio.events.Handle, "_run", _GUARD.timed_run)
    _GUARD.seen.clear()
    _GUARD.running.clear()
    yield
    _GUARD.running.clear()
    assert not _GUARD.seen, "callbacks held the event loop:\n" + "\n".join(_GUARD.seen)
