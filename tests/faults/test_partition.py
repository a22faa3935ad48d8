"""A network partition between the process server and the master target.

Each daemon runs in a network namespace of its own (root only), joined by a
veth pair; the agent stand-in runs beside the process server. In the middle
of the stream the link goes down for a few seconds — packets vanish, nothing
is refused — and comes back. The process server keeps acknowledging into its
cache, its shipper gives up on the silent link and retries, and at the end
the target equals the source.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from agent.pki import init_ca, issue_machine
from protocol.limits import MiB
from protocol.records import Record
from tests.conftest import Deployment, assert_image_holds, require_binary
from tests.faults.daemons import Daemon, free_port
from tests.mastertarget.conftest import apply_to_model, random_workload, write_config
from tests.processserver.test_api import _body, write_ps_config

DISK = "vm01-d0"
SIZE = 8 * MiB
BATCHES = 80
PS_ADDR, MT_ADDR = "10.231.7.1", "10.231.7.2"
#: Seconds the link stays down: longer than the shipper's read timeout.
PARTITION_S = 4.0
TIMEOUT_S = 120.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=30, capture_output=True)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str, str]]:
    """Two network namespaces joined by a veth pair; the name of the PS-side link."""
    require_binary("ip")
    suffix = f"{os.getpid() % 10000}"
    ps_ns, mt_ns, link = f"brps{suffix}", f"brmt{suffix}", f"brv{suffix}"
    _ip("netns", "add", ps_ns)
    _ip("netns", "add", mt_ns)
    try:
        _ip("link", "add", f"{link}a", "type", "veth", "peer", "name", f"{link}b")
        _ip("link", "set", f"{link}a", "netns", ps_ns)
        _ip("link", "set", f"{link}b", "netns", mt_ns)
        for ns, dev, addr in ((ps_ns, f"{link}a", PS_ADDR), (mt_ns, f"{link}b", MT_ADDR)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ps_ns, mt_ns, f"{link}a"
    finally:
        subprocess.run(["ip", "netns", "del", ps_ns], check=False, timeout=30)
        subprocess.run(["ip", "netns", "del", mt_ns], check=False, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
async def test_a_partition_between_the_daemons_loses_nothing(
    deployment: Deployment, tmp_path: Path, namespaces: tuple[str, str, str]
) -> None:
    ps_ns, mt_ns, ps_link = namespaces
    pki = tmp_path / "pki"
    init_ca(pki, [MT_ADDR])
    for machine in ("ps01", "vm01"):
        issue_machine(pki, machine)
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    mt_root.mkdir()
    ps_root.mkdir()
    mt_conf = write_config(
        deployment, mt_root,
        [{"id": DISK, "target": mt_root / "t.raw", "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    mt_conf.write_text(
        mt_conf.read_text().replace(str(deployment.pki), str(pki))
        + f'[listen]\nhost = "{MT_ADDR}"\nport = 9444\n[metrics]\nport = {free_port()}\n'
    )
    ps_port = 9443
    ps_conf = write_ps_config(deployment, ps_root, port=ps_port)
    ps_conf.write_text(
        ps_conf.read_text()
        .replace(str(deployment.pki), str(pki))
        .replace(
            'url = "https://127.0.0.1:9"',
            f'url = "https://{MT_ADDR}:9444"\nread_timeout_s = 2\nconnect_timeout_s = 2\n'
            "transfer_timeout_s = 10",
        )
        + f"[metrics]\nport = {free_port()}\n"
    )
    mt = Daemon(mt_conf, tmp_path / "mt.log", module="mastertarget.cli",
                wrapper=("ip", "netns", "exec", mt_ns))  # fmt: skip
    ps = Daemon(ps_conf, tmp_path / "ps.log", module="processserver.cli",
                wrapper=("ip", "netns", "exec", ps_ns))  # fmt: skip
    rng = random.Random(31)
    model = bytearray(SIZE)
    batch_dir = tmp_path / "batches"
    batch_dir.mkdir()
    seq = 1
    for _ in range(BATCHES):
        records: list[Record] = random_workload(rng, SIZE, 2, max_len=80_000)
        (batch_dir / f"{seq}.brb").write_bytes(_body(DISK, seq, records))
        apply_to_model(model, records)
        seq += len(records)
    last = seq - 1
    mt.start()
    ps.start()
    agent = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ps_ns, sys.executable, "-m", "tests.faults.netns_agent",
        f"https://127.0.0.1:{ps_port}/v1/disks/{DISK}", str(batch_dir), str(pki / "ca.pem"),
        str(pki / "machine-vm01.pem"), str(pki / "machine-vm01.key"),
        stdout=asyncio.subprocess.PIPE, cwd=str(Path(__file__).resolve().parents[2]),
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    admin = aiohttp.UnixConnector(path=str(mt_root / "admin.sock"))
    try:
        async with aiohttp.ClientSession(connector=admin) as session:

            async def newest() -> int:
                try:
                    async with session.get(f"http://mt/v1/disks/{DISK}/points?limit=1") as answer:
                        points = (await answer.json())["points"]
                except (aiohttp.ClientError, OSError):
                    return 0  # not listening yet
                return int(points[0]["seq"]) if points else 0

            while await newest() == 0:  # the first files went through
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            _ip("-n", ps_ns, "link", "set", ps_link, "down")
            assert await newest() < last, "the stream ended before the partition"
            await asyncio.sleep(PARTITION_S)
            during = await newest()
            _ip("-n", ps_ns, "link", "set", ps_link, "up")
            out, _ = await asyncio.wait_for(agent.communicate(), TIMEOUT_S)
            assert agent.returncode == 0
            assert int(out.decode().strip()) == last
            while await newest() != last:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
    finally:
        if agent.returncode is None:
            agent.kill()
        ps.kill_if_running()
        mt.kill_if_running()
    log = (tmp_path / "ps.log").read_text()
    assert_image_holds(mt_root / "t.raw", bytes(model), note=log[-2000:])
    print(f"\npartition of {PARTITION_S:g} s: the master target held seq {during} of {last} "
          "when the link came back; 0 lost")  # fmt: skip
