"""Consistency groups end to end: two machines (vm01 with two disks, db01 with
one), each with its own agent config, captures and ``blockrepl agent group``,
one process server and one master target. Writes with a causal order across
the machines, group rounds at an interval and on demand, a coordinator killed
mid-round, a member that stops answering, and the group recovered at its
points with ``mastertarget recover --group``."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from protocol.limits import MiB
from tests.conftest import Deployment, group_certificates, require_binary
from tests.e2e.capture import CaptureProcess, require_capture_peers
from tests.e2e.conftest import BLOCKREPL, START_TIMEOUT_S, Site, build_site, make_source, start
from tests.faults.daemons import RUNNING, ChildProcess, free_port

SIZE = 16 * MiB
GROUP = "erp"
COORDINATOR = "vm01"
MACHINES = {"vm01": ("vm01-d0", "vm01-d1"), "db01": ("db01-d0",)}
DISKS = [disk for disks in MACHINES.values() for disk in disks]
MASTERTARGET = Path(sys.executable).parent / "mastertarget"
#: Seconds a write may take while a round is stuck: the barrier (0.5 s), and
#: qemu-io starting and connecting on a loaded machine. The captures'
#: hold_max_s is 10 s: a write faster than this was released by the group's
#: own bound.
RESUMED_WITHIN_S = 3.0


@dataclass
class GroupAgent(ChildProcess):
    """One machine's ``blockrepl agent group``; none outlives its test."""

    config: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        RUNNING.append(self)

    def start(self, wait_port: int) -> None:
        with self.log.open("ab") as log, self.log.with_suffix(".out").open("wb") as out:
            self.proc = subprocess.Popen(
                [str(BLOCKREPL), "agent", "group", "--config", str(self.config), "--json"],
                stdout=out, stderr=log, env={**os.environ, **self.env},
            )  # fmt: skip
        _wait_port(wait_port, self)

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, self.log.read_text()[-3000:]
        report: dict[str, Any] = json.loads(self.log.with_suffix(".out").read_text())
        return report


@dataclass
class Machine:
    name: str
    site: Site
    captures: dict[str, CaptureProcess]
    group_port: int
    metrics_port: int
    agent: GroupAgent

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return str(answer.read().decode())


def _wait_port(port: int, agent: GroupAgent) -> None:
    import socket  # noqa: PLC0415 - only here

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert agent.proc is not None
        if agent.proc.poll() is not None:
            break
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"blockrepl agent group did not start:\n{agent.log.read_text()[-3000:]}")


def _agent_config(
    site: Site, machine: str, ports: dict[str, int], metrics_port: int,
    group: dict[str, object], tags: dict[str, object],
) -> tuple[Path, Path]:  # fmt: skip
    """This machine's own agent config and state folder."""
    pki = site.deployment.pki
    state = site.root / f"state-{machine}"
    lines = [
        f'process_servers = ["https://127.0.0.1:{site.ps_ports[0]}"]',
        f'state_dir = "{state}"', "request_timeout_s = 30", "give_up_after_s = 60",
        "[tls]", f'ca_file = "{pki / "ca.pem"}"',
        f'cert_file = "{pki / f"machine-{machine}.pem"}"',
        f'key_file = "{pki / f"machine-{machine}.key"}"',
        "[sync]", f"region_bytes = {4 * MiB}",
        "[capture]", "hold_max_s = 10",
        "[tags]", *(f"{key} = {json.dumps(value)}" for key, value in tags.items()),
        "[metrics]", f"port = {metrics_port}",
        "[logging]", 'level = "info"',
        "[group]", f'id = "{GROUP}"', f'machine = "{machine}"', f'coordinator = "{COORDINATOR}"',
        *(f"{key} = {json.dumps(value)}" for key, value in group.items()),
        "[group.tls]", f'ca_file = "{pki / "ca.pem"}"',
        f'cert_file = "{pki / f"group-{machine}.pem"}"',
        f'key_file = "{pki / f"group-{machine}.key"}"',
    ]  # fmt: skip
    for member, port in ports.items():
        lines += ["[[group.members]]", f'machine = "{member}"', f'address = "127.0.0.1:{port}"']
    for disk in MACHINES[machine]:
        lines += ["[[disks]]", f'id = "{disk}"']
    path = site.root / f"agent-{machine}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, state


def _group_site(
    deployment: Deployment, tmp_path: Path, *, group: dict[str, object] | None = None,
    tags: dict[str, object] | None = None, member_env: dict[str, str] | None = None,
) -> dict[str, Machine]:  # fmt: skip
    """The site, both machines' captures settled, db01's group agent running.

    ``{url}`` in a ``tags`` value is the NBD export of the machine's first disk.
    """
    require_capture_peers()
    group_certificates(deployment.pki, *MACHINES)
    site = build_site(deployment, tmp_path, size=SIZE, disks=tuple(DISKS))
    with site.mt.config.open("a") as mt_config:
        mt_config.write(f'[[groups]]\nid = "{GROUP}"\ndisks = {json.dumps(DISKS)}\n')
    ports = {machine: free_port() for machine in MACHINES}
    settings = {"crash_interval_s": 0, "app_interval_s": 0, **(group or {})}
    machines: dict[str, Machine] = {}
    for index, machine in enumerate(MACHINES):
        metrics_port = free_port()
        nbd = {disk: free_port() for disk in MACHINES[machine]}
        url = f"nbd://127.0.0.1:{nbd[MACHINES[machine][0]]}"
        own_tags = json.loads(json.dumps(tags or {}).replace("{url}", url))
        config, state = _agent_config(site, machine, ports, metrics_port, settings, own_tags)
        own = dataclasses.replace(site, agent_config=config, state_dir=state)
        captures = {}
        for disk in MACHINES[machine]:
            source = tmp_path / f"{disk}.raw"
            make_source(source, SIZE, [(index * MiB, bytes([index + 1]) * MiB)])
            captures[disk] = CaptureProcess(own, source, disk, port=nbd[disk])
        agent = GroupAgent(config, tmp_path / f"group-{machine}.log",
                           env=(member_env or {}) if machine != COORDINATOR else {})  # fmt: skip
        machines[machine] = Machine(machine, own, captures, ports[machine], metrics_port, agent)
    start(site)
    for machine in machines.values():
        for capture in machine.captures.values():
            capture.start()
    for machine in machines.values():
        for capture in machine.captures.values():
            capture.settle()
    member = machines["db01"]
    member.agent.start(member.group_port)
    return machines


def _group_tag(machines: dict[str, Machine], name: str, *extra: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    coordinator = machines[COORDINATOR]
    return subprocess.run(
        [str(BLOCKREPL), "agent", "group-tag", "--config", str(coordinator.site.agent_config),
         "--name", name, "--json", *extra],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def _mastertarget(machines: dict[str, Machine], *args: str) -> dict[str, Any]:
    site = machines[COORDINATOR].site
    result = subprocess.run(
        [str(MASTERTARGET), *args[:1], "--config", str(site.mt.config), *args[1:], "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def _settle(machines: dict[str, Machine]) -> None:
    for machine in machines.values():
        for capture in machine.captures.values():
            capture.settle()


def _recover(machines: dict[str, Machine], point: str, directory: Path) -> dict[str, bytes]:
    """The group recovered at ``point`` into ``directory``; each disk's bytes."""
    _mastertarget(machines, "recover", "--group", GROUP, "--point", point,
                  "--output-dir", str(directory))  # fmt: skip
    return {disk: (directory / f"{disk}.raw").read_bytes() for disk in DISKS}


def _timed_write(capture: CaptureProcess, pattern: int) -> float:
    started = time.monotonic()
    capture.qemu_io(f"write -P {pattern} {12 * MiB} 4k")
    return time.monotonic() - started


class CausalWriter:
    """vm01 writes n, and once that write is acknowledged db01 writes n: B's
    write depends on A's. And A writes n+1 only after B's n is acknowledged."""

    def __init__(self, a: CaptureProcess, b: CaptureProcess) -> None:
        self.clients = [self._client(a), self._client(b)]
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _client(capture: CaptureProcess) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [require_binary("qemu-io"), "-f", "raw", "-t", "none", capture.url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1,
        )  # fmt: skip

    def start(self) -> None:
        self._thread.start()

    def _write(self, client: subprocess.Popen[str], pattern: int) -> None:
        assert client.stdin is not None
        assert client.stdout is not None
        client.stdin.write(f"write -P {pattern} {8 * MiB - 4096} 4096\n")
        client.stdin.flush()
        while "wrote" not in (line := client.stdout.readline()):  # the acknowledgement
            assert line, "qemu-io ended"

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set() and n < 250:
            n += 1
            for client in self.clients:
                self._write(client, n)
            self.count = n
            time.sleep(0.03)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        for client in self.clients:
            assert client.stdin is not None
            client.stdin.write("quit\n")
            client.stdin.close()
            client.wait(timeout=30)


async def test_group_points_keep_the_causal_order_across_machines(
    deployment: Deployment, tmp_path: Path
) -> None:
    qemu_io = require_binary("qemu-io")
    machines = _group_site(
        deployment, tmp_path, group={"crash_interval_s": 1},
        tags={"quiesce": [f"{qemu_io} -f raw -t none {{url}} -c 'write -P 0xaa 9M 4k'"],
              "unquiesce": [f"{qemu_io} -f raw -t none {{url}} -c 'write -P 0xbb 9M 4k'"]},
    )  # fmt: skip
    vm01, db01 = machines["vm01"], machines["db01"]
    writer = CausalWriter(vm01.captures["vm01-d0"], db01.captures["db01-d0"])
    writer.start()
    vm01.agent.start(vm01.metrics_port)  # the coordinator: rounds every second
    time.sleep(6)
    coordinated = vm01.agent.stop()
    writer.stop()
    assert writer.count > 20
    assert coordinated["committed"] >= 3, vm01.agent.log.read_text()[-3000:]
    metrics = db01.metrics()
    assert 'blockrepl_agent_group_member_rounds_total{group="erp",result="committed"}' in metrics
    assert "blockrepl_agent_group_barrier_hold_seconds_count" in metrics

    app = _group_tag(machines, "app-1", "--app")
    assert app.returncode == 0, app.stderr
    assert json.loads(app.stdout)["kind"] == "app"
    _settle(machines)

    listing = _mastertarget(machines, "points", "--group", GROUP)
    names = [p["name"] for p in listing["points"]]
    assert names[0] == "app-1"
    assert len(names) >= coordinated["committed"] + 1
    seen = set()
    for index, point in enumerate(listing["points"][1:]):
        disks = _recover(machines, f"tag:{point['name']}", tmp_path / f"at-{index}")
        a = disks["vm01-d0"][8 * MiB - 1]
        b = disks["db01-d0"][8 * MiB - 1]
        # B's write n is never there without A's n, nor A's n+1 without B's n.
        assert a - 1 <= b <= a, (point["name"], a, b)
        seen.add(a)
    assert len(seen) >= 2  # the rounds fell between different writes

    # The app point: each machine's quiesce write is in, its unquiesce write not.
    at_app = _recover(machines, "latest-app", tmp_path / "app")
    for machine in machines.values():
        first = MACHINES[machine.name][0]
        assert at_app[first][9 * MiB : 9 * MiB + 4096] == b"\xaa" * 4096
        with machine.captures[first].source.open("rb") as now:
            now.seek(9 * MiB)
            assert now.read(4096) == b"\xbb" * 4096
    final = _group_tag(machines, "final")
    assert final.returncode == 0, final.stderr
    _settle(machines)
    _mastertarget(machines, "recover", "--group", GROUP, "--point", "tag:final",
                  "--output-dir", str(tmp_path / "final"))  # fmt: skip
    for machine in machines.values():
        for disk, capture in machine.captures.items():
            machine.site.assert_identical(capture.source, tmp_path / "final" / f"{disk}.raw")


async def test_a_coordinator_killed_mid_round_leaves_no_writes_held(
    deployment: Deployment, tmp_path: Path
) -> None:
    machines = _group_site(deployment, tmp_path)
    vm01, db01 = machines["vm01"], machines["db01"]
    killed = _group_tag(machines, "doomed", env={"BLOCKREPL_CRASH_AT": "group-held:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Every disk of both machines was held when the coordinator died.
    assert _timed_write(db01.captures["db01-d0"], 7) < RESUMED_WITHIN_S
    assert _timed_write(vm01.captures["vm01-d1"], 7) < RESUMED_WITHIN_S
    deadline = time.monotonic() + 10
    aborted = 'blockrepl_agent_group_member_rounds_total{group="erp",result="aborted"} 1.0'
    while aborted not in db01.metrics():
        assert time.monotonic() < deadline, db01.agent.log.read_text()[-3000:]
        time.sleep(0.1)
    after = _group_tag(machines, "after")
    assert after.returncode == 0, after.stderr
    _settle(machines)
    assert [p["name"] for p in _mastertarget(machines, "points", "--group", GROUP)["points"]] == [
        "after"
    ]
    for disk in DISKS:  # killed before any tag: no disk has one
        points = _mastertarget(machines, "points", "--disk", disk)["points"]
        assert "doomed" not in {p["name"] for p in points}


async def test_a_member_that_stops_answering_aborts_the_round_within_the_bound(
    deployment: Deployment, tmp_path: Path
) -> None:
    machines = _group_site(
        deployment, tmp_path, group={"connect_timeout_s": 1},
        member_env={"BLOCKREPL_CRASH_AT": "member-held:1:stop"},
    )  # fmt: skip
    vm01, db01 = machines["vm01"], machines["db01"]
    started = time.monotonic()
    stalled = _group_tag(machines, "stalled")
    assert time.monotonic() - started < 10
    assert stalled.returncode == 75, stalled.stderr
    assert "aborted (barrier-timeout): db01 did not answer hold within 0.500 s" in stalled.stderr
    assert db01.agent.proc is not None
    stat = Path(f"/proc/{db01.agent.proc.pid}/stat").read_text()
    assert stat.split(")")[1].split()[0] == "T"  # db01's agent is stopped, holding its disk
    assert _timed_write(db01.captures["db01-d0"], 8) < RESUMED_WITHIN_S  # the capture released
    assert _timed_write(vm01.captures["vm01-d0"], 8) < RESUMED_WITHIN_S

    # Stopped before a round: it cannot even be reached; nothing is held.
    db01.agent.proc.send_signal(signal.SIGCONT)
    time.sleep(0.5)
    db01.agent.proc.send_signal(signal.SIGSTOP)
    unreachable = _group_tag(machines, "unreachable")
    assert unreachable.returncode == 75, unreachable.stderr
    assert "cannot be reached" in unreachable.stderr
    db01.agent.proc.send_signal(signal.SIGCONT)
    time.sleep(0.5)  # it ends the rounds it missed

    after = _group_tag(machines, "after")
    assert after.returncode == 0, after.stderr
    _settle(machines)
    names = [p["name"] for p in _mastertarget(machines, "points", "--group", GROUP)["points"]]
    assert names == ["after"]


async def test_a_group_with_a_disk_of_another_master_target_is_refused(
    deployment: Deployment, tmp_path: Path
) -> None:
    """db01 replicates to another master target: this one cannot form a common point."""
    site = build_site(deployment, tmp_path, size=SIZE, disks=MACHINES["vm01"])
    with site.mt.config.open("a") as mt_config:
        mt_config.write(f'[[groups]]\nid = "{GROUP}"\ndisks = {json.dumps(DISKS)}\n')
    site.mt.start()
    assert site.mt.proc is not None
    assert site.mt.proc.wait(timeout=60) != 0
    why = "disk 'db01-d0' is not protected by this master target"
    assert why in site.mt.log.read_text()
    listed = subprocess.run(
        [str(MASTERTARGET), "points", "--config", str(site.mt.config), "--group", GROUP],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert listed.returncode != 0
    assert why in listed.stderr
    assert "common point in time" in listed.stderr
