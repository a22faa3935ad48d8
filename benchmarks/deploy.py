"""A recovery site on this machine, for benchmarks: a fresh PKI and key ring,
a master target and a process server run as ``python -m MODULE serve``
processes on loopback, and how to measure them (CPU seconds, peak memory).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.pki import init_ca, issue_machine
from runtime.config import TlsFiles
from runtime.keyfile import write_new_keyring

#: Seconds a daemon may take to answer its health probe after starting.
START_TIMEOUT_S: Final = 30.0


@dataclass
class Daemon:
    """A daemon run as ``python -m MODULE serve --config FILE``."""

    module: str
    config: Path
    log: Path
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", self.module, "serve", "--config", str(self.config)],
                stdout=out, stderr=out,
            )  # fmt: skip

    def wait_healthy(self) -> None:
        """Poll ``/healthz`` until it answers; exit with the log's tail if it never does."""
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(url, timeout=1) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        tail = self.log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{self.module} did not start:\n{tail}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@dataclass(frozen=True)
class Deployment:
    """The files of one run: PKI, key ring, configs, and the two daemons."""

    root: Path
    #: each protected machine's disk, by machine id
    disks_of: Mapping[str, str]
    mt_port: int
    ps_port: int
    ps: Daemon
    mt: Daemon

    @property
    def disks(self) -> tuple[str, ...]:
        return tuple(self.disks_of.values())

    def client_tls(self, machine: str) -> TlsFiles:
        pki = self.root / "pki"
        return TlsFiles(
            ca_file=pki / "ca.pem",
            cert_file=pki / f"machine-{machine}.pem",
            key_file=pki / f"machine-{machine}.key",
        )


#: Ports handed to daemons lie below the kernel's ephemeral range (32768 and
#: up on Linux): a port from bind(0) is free only until some client's
#: outgoing connection takes it as its source port, which made a daemon
#: started a moment later fail with "address already in use".
PORTS_FROM, PORTS_TO = 20000, 32000
_START = PORTS_FROM + (os.getpid() * 97) % (PORTS_TO - PORTS_FROM)
_CANDIDATES = itertools.cycle(itertools.chain(range(_START, PORTS_TO), range(PORTS_FROM, _START)))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now, and that no client
    will take as its source port: each call of a run gets another."""
    for port in itertools.islice(_CANDIDATES, PORTS_TO - PORTS_FROM):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"expected a free port in {PORTS_FROM}..{PORTS_TO}, found none")


def _tls_table(name: str, pki: Path, cert: str) -> list[str]:
    return [
        f"[{name}]",
        f'ca_file = "{pki / "ca.pem"}"',
        f'cert_file = "{pki / cert}.pem"',
        f'key_file = "{pki / cert}.key"',
    ]


def deploy(
    root: Path,
    disks_of: Mapping[str, str],
    *,
    disk_bytes: int,
    cache_high_bytes: int,
    cache_low_bytes: int,
    targets: Mapping[str, Path] | None = None,
    retention_window_s: float | None = None,
) -> Deployment:
    """Write a PKI, a key ring and both daemons' configs under ``root``; start nothing.

    Args:
        disks_of: one disk per protected machine, by machine id.
        disk_bytes: the size of each target the master target creates.
        targets: existing target images by disk (used as they are, not created).
        retention_window_s: how long the master target keeps recovery points
            (its default, 24 hours, when None).
    """
    pki = root / "pki"
    init_ca(pki)
    issue_machine(pki, "ps01")
    for machine in disks_of:
        issue_machine(pki, machine)
    key_file = root / "data-keys.toml"
    write_new_keyring(key_file)
    mt_port, ps_port = free_port(), free_port()
    mt_metrics, ps_metrics = free_port(), free_port()
    mt_root, ps_root = root / "mt", root / "ps"
    (mt_root / "retention").mkdir(parents=True)
    ps_root.mkdir()
    mt_lines = [
        'process_servers = ["ps01"]',
        f'key_file = "{key_file}"',
        f'cache_dir = "{mt_root / "cache"}"',
        f'admin_socket = "{mt_root / "admin.sock"}"',
        *_tls_table("tls", pki, "mastertarget"),
        "[listen]",
        'host = "127.0.0.1"',
        f"port = {mt_port}",
        "[metrics]",
        f"port = {mt_metrics}",
        "[retention]",
        f'dir = "{mt_root / "retention"}"',
        "allow_shared_volume = true",
    ]
    if retention_window_s is not None:
        mt_lines.append(f"window_s = {retention_window_s}")
    for disk in disks_of.values():
        existing = (targets or {}).get(disk)
        mt_lines += ["[[disks]]", f'id = "{disk}"']
        if existing is None:
            mt_lines += [
                f'target = "{mt_root / disk}.raw"', "create = true", f"size_bytes = {disk_bytes}"
            ]  # fmt: skip
        else:
            mt_lines += [f'target = "{existing}"']
    ps_lines = [
        f'key_file = "{key_file}"',
        f'cache_dir = "{ps_root / "cache"}"',
        'host = "127.0.0.1"',
        f"port = {ps_port}",
        f"cache_high_bytes = {cache_high_bytes}",
        f"cache_low_bytes = {cache_low_bytes}",
        *_tls_table("tls", pki, "processserver"),
        "[metrics]",
        f"port = {ps_metrics}",
        "[master_target]",
        f'url = "https://127.0.0.1:{mt_port}"',
        *_tls_table("master_target.tls", pki, "machine-ps01"),
    ]
    for machine, disk in disks_of.items():
        ps_lines += ["[[machines]]", f'id = "{machine}"', f'disks = ["{disk}"]']
    mt_config, ps_config = mt_root / "mastertarget.toml", ps_root / "processserver.toml"
    mt_config.write_text("\n".join(mt_lines) + "\n")
    ps_config.write_text("\n".join(ps_lines) + "\n")
    return Deployment(
        root=root, disks_of=dict(disks_of), mt_port=mt_port, ps_port=ps_port,
        ps=Daemon("processserver.cli", ps_config, root / "ps.log", ps_metrics),
        mt=Daemon("mastertarget.cli", mt_config, root / "mt.log", mt_metrics),
    )  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of process ``pid`` (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmHWM for process {pid}")


def default_dir() -> Path:
    """A RAM-backed folder (/dev/shm) when there is one: figures of the software, not the disk."""
    shm = Path("/dev/shm")  # noqa: S108 - each run makes its own mkdtemp folder in it
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
