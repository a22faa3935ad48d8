"""A recovery site for end-to-end tests: a real master target and real process
servers as processes on loopback (tests/faults/daemons.py), and an agent
config pointing at them. The agent runs as ``blockrepl agent sync``, the
console script an operator runs."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Deployment, require_binary
from tests.faults.conftest import _no_daemon_outlives_its_test  # noqa: F401 - autouse here too
from tests.faults.daemons import Daemon, free_port
from tests.mastertarget.conftest import write_config
from tests.processserver.test_api import write_ps_config

DISK = "vm01-d0"
#: The installed console scripts, beside the interpreter running the tests.
BLOCKREPL = Path(sys.executable).parent / "blockrepl"
MASTERTARGET = Path(sys.executable).parent / "mastertarget"
#: Seconds a daemon may take to open its port.
START_TIMEOUT_S = 30.0


def wait_listening(port: int, daemon: Daemon) -> None:
    """Until something accepts TCP connections on ``port``; fail with the log if never."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            break
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"{daemon.module} did not start:\n{daemon.log.read_text()[-3000:]}")


@dataclass
class Site:
    """The master target, the process servers, and the agent's config."""

    deployment: Deployment
    root: Path
    size: int
    mt_port: int
    mt: Daemon
    ps_ports: list[int]
    process_servers: list[Daemon]
    agent_config: Path
    state_dir: Path
    target: Path
    #: every disk's target, by disk id
    targets: dict[str, Path] = field(default_factory=dict)
    context: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        self.context = self.deployment.client_tls("ps01")

    def mt_state(self, disk: str = DISK) -> dict[str, Any]:
        """The master target's state of the disk (docs/api.md)."""
        url = f"https://127.0.0.1:{self.mt_port}/v1/disks/{disk}/state"
        with urllib.request.urlopen(url, context=self.context, timeout=10) as answer:
            state: dict[str, Any] = json.loads(answer.read())
            return state

    def ps_state(self, index: int = 0) -> dict[str, Any]:
        """A process server's state of the disk, as the agent's machine sees it."""
        url = f"https://127.0.0.1:{self.ps_ports[index]}/v1/disks/{DISK}/state"
        context = self.deployment.client_tls("vm01")
        with urllib.request.urlopen(url, context=context, timeout=10) as answer:
            state: dict[str, Any] = json.loads(answer.read())
            return state

    def wait_applied(
        self, generation: int, seq: int, timeout: float = 60.0, disk: str = DISK
    ) -> dict[str, Any]:
        """Until the master target has applied ``seq`` of ``generation``; its state then."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.mt_state(disk)
            applied = (state["applied_generation"], state["applied_seq"])
            if applied >= (generation, seq):
                return state
            assert time.monotonic() < deadline, f"not applied after {timeout} s: {state}"
            time.sleep(0.05)

    def sync_command(self, source: Path, *extra: str) -> list[str]:
        return [
            str(BLOCKREPL), "agent", "sync", "--config", str(self.agent_config), "--disk", DISK,
            "--source", str(source), "--json", *extra,
        ]  # fmt: skip

    def sync(self, source: Path, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``blockrepl agent sync --json`` to the end; its JSON answer."""
        result = subprocess.run(
            self.sync_command(source), capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    def points(self, disk: str = DISK, *, limit: int | None = None) -> list[dict[str, Any]]:
        """``mastertarget points --json``: the disk's listed points, newest first."""
        more = ["--limit", str(limit)] if limit is not None else []
        result = subprocess.run(
            [str(MASTERTARGET), "points", "--config", str(self.mt.config), "--disk", disk,
             "--json", *more],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        points: list[dict[str, Any]] = json.loads(result.stdout)["points"]
        return points

    def recover(self, point: str, output: Path, disk: str = DISK) -> dict[str, Any]:
        """``mastertarget recover``: the disk as it was at ``point``, into ``output``;
        its JSON answer (the point it chose)."""
        result = subprocess.run(
            [str(MASTERTARGET), "recover", "--config", str(self.mt.config), "--disk", disk,
             "--point", point, "--output", str(output), "--json"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"recover at {point}: {result.stderr}"
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def assert_identical(self, source: Path, target: Path | None = None) -> None:
        """``qemu-img compare`` of the source and the target says identical."""
        qemu_img = require_binary("qemu-img")
        target = target or self.target
        result = subprocess.run(
            [qemu_img, "compare", "-f", "raw", "-F", "raw", str(source), str(target)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


def build_site(
    deployment: Deployment,
    root: Path,
    *,
    size: int,
    process_servers: int = 1,
    sync: dict[str, int] | None = None,
    mt_url_of: dict[int, str] | None = None,
    disks: tuple[str, ...] = (DISK,),
    agent_tables: dict[str, dict[str, object]] | None = None,
) -> Site:
    """Write the configs of a site; start nothing.

    Args:
        mt_url_of: the master target URL a process server (by index) uses, to
            put a proxy between them.
        disks: the machine's disks (vm01 may write vm01-d0 and vm01-d1).
        agent_tables: more tables of the agent's config (``{"capture": {...}}``).
    """
    mt_root = root / "mt"
    mt_root.mkdir(parents=True)
    mt_port = free_port()
    targets = {disk: mt_root / f"{disk}.raw" for disk in disks}
    mt_conf = write_config(
        deployment, mt_root,
        [{"id": disk, "target": targets[disk], "create": True, "size_bytes": size}
         for disk in disks],
    )  # fmt: skip
    with mt_conf.open("a") as extra:
        extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {mt_port}\n')
        extra.write(f"[metrics]\nport = {free_port()}\n")
    mt = Daemon(mt_conf, root / "mt.log")
    ps_ports, daemons = [], []
    for index in range(process_servers):
        ps_root = root / f"ps{index}"
        ps_root.mkdir()
        port = free_port()
        conf = write_ps_config(deployment, ps_root, port=port, host='"127.0.0.1"')
        url = (mt_url_of or {}).get(index, f"https://127.0.0.1:{mt_port}")
        conf.write_text(
            conf.read_text().replace("https://127.0.0.1:9", url)
            + f"[metrics]\nport = {free_port()}\n"
        )
        ps_ports.append(port)
        daemons.append(Daemon(conf, root / f"ps{index}.log", module="processserver.cli"))
    state_dir = root / "agent-state"
    pki = deployment.pki
    urls = ", ".join(f'"https://127.0.0.1:{port}"' for port in ps_ports)
    lines = [
        f"process_servers = [{urls}]",
        f'state_dir = "{state_dir}"',
        "request_timeout_s = 30",
        "give_up_after_s = 60",
        "[tls]",
        f'ca_file = "{pki / "ca.pem"}"',
        f'cert_file = "{pki / "machine-vm01.pem"}"',
        f'key_file = "{pki / "machine-vm01.key"}"',
        "[sync]",
        *(f"{key} = {value}" for key, value in (sync or {}).items()),
        "[logging]",
        'level = "info"',
    ]
    for table, values in (agent_tables or {}).items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    for disk in disks:
        lines += ["[[disks]]", f'id = "{disk}"']
    agent_config = root / "agent.toml"
    agent_config.write_text("\n".join(lines) + "\n")
    return Site(
        deployment, root, size, mt_port, mt, ps_ports, daemons, agent_config, state_dir,
        targets[disks[0]], targets,
    )  # fmt: skip


def _toml(value: object) -> str:
    """A TOML value: strings quoted, lists of them as arrays."""
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def start(site: Site) -> None:
    """Start the master target and every process server, and wait for their ports."""
    site.mt.start()
    for daemon in site.process_servers:
        daemon.start()
    wait_listening(site.mt_port, site.mt)
    for port, daemon in zip(site.ps_ports, site.process_servers, strict=True):
        wait_listening(port, daemon)


def make_source(path: Path, size: int, extents: list[tuple[int, bytes]]) -> None:
    """A sparse raw image of ``size`` bytes holding ``extents`` (offset, data); holes elsewhere."""
    with path.open("wb") as image:
        image.truncate(size)
        for offset, data in extents:
            image.seek(offset)
            image.write(data)
