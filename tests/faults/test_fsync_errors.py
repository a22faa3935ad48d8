"""fsync fails with EIO (once, and for good) under each daemon's volumes.

After a failed fsync the kernel may have dropped the dirty pages: the data
must count as lost, never retried on the same file and carried on with
(docs/design.md, crash-safe checklist). So: the request whose group failed is not
acknowledged (503, the sender sends it again), no partial or temporary file
stays, the daemon keeps serving, and when the disk works again everything
ends applied and identical. ``BLOCKREPL_FAIL_FSYNC`` (runtime/crashpoints.py)
makes the chosen fsync fail in the real daemon.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import pytest

from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.hrl import open_hrl
from protocol.limits import MiB
from protocol.records import Record
from protocol.sequencing import StreamPosition
from runtime.crashpoints import FSYNC_ENV
from tests.conftest import Deployment, assert_image_holds
from tests.faults.daemons import Daemon, free_port
from tests.mastertarget.conftest import apply_to_model, random_workload, write_config
from tests.processserver.test_api import _body, write_ps_config

DISK = "vm01-d0"
SIZE = 8 * MiB
BATCHES = 12
TIMEOUT_S = 60.0


def _batches(seed: int) -> list[tuple[int, list[Record]]]:
    rng, seq, out = random.Random(seed), 1, []
    for _ in range(BATCHES):
        records = random_workload(rng, SIZE, 2, max_len=60_000)
        out.append((seq, records))
        seq += len(records)
    return out


def _compare(target: Path, batches: list[tuple[int, list[Record]]], tmp: Path) -> None:
    model = bytearray(SIZE)
    for _, records in batches:
        apply_to_model(model, records)
    assert_image_holds(target, bytes(model))


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with session.post(url, data=body) as response:
        return response.status, await response.json()


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
async def test_a_failed_cache_fsync_acknowledges_nothing_and_loses_nothing(
    deployment: Deployment, tmp_path: Path, persistent: bool
) -> None:
    mt_port, ps_port = free_port(), free_port()
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    mt_root.mkdir()
    ps_root.mkdir()
    ps_conf = write_ps_config(deployment, ps_root, port=ps_port)
    ps_conf.write_text(
        ps_conf.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
        + f"[metrics]\nport = {free_port()}\n"
    )
    fault = f"disks/{DISK}:5" + (":persistent" if persistent else "")
    daemon = Daemon(
        ps_conf, tmp_path / "ps.log", module="processserver.cli", env_once={FSYNC_ENV: fault}
    )
    daemon.start()
    batches = _batches(3)
    url = f"https://127.0.0.1:{ps_port}/v1/disks/{DISK}/batches"
    refused = 0
    mt: MasterTarget | None = None
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(100):  # until it listens
                try:
                    await _post(session, url, b"")
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            index = 0
            while index < len(batches):
                first, records = batches[index]
                status, answer = await _post(session, url, _body(DISK, first, records))
                if status == 200:
                    index += 1
                    continue
                assert (status, answer["error"]) == (503, "durability"), answer
                assert "fsync" in answer["message"]
                refused += 1
                async with session.get(url.replace("batches", "state")) as response:
                    state = await response.json()
                assert state["acked_seq"] == first - 1  # nothing of the failed group
                cache = ps_root / "cache" / "disks" / DISK
                assert not [p for p in cache.iterdir() if ".tmp" in p.name]
                for path in cache.glob("*.hrl"):
                    open_hrl(path.read_bytes(), deployment.keyring)
                if persistent and refused == 3:
                    # The disk stays broken: the daemon refuses, never acknowledges.
                    # It is replaced (the disk "fixed") and the stream goes on.
                    daemon.kill()
                    daemon.start()
                    await asyncio.sleep(1.0)
            assert refused == (3 if persistent else 1)
        mt_conf = write_config(
            deployment, mt_root,
            [{"id": DISK, "target": mt_root / "t.raw", "create": True, "size_bytes": SIZE}],
        )  # fmt: skip
        with mt_conf.open("a") as extra:
            extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {mt_port}\n')
        mt = await MasterTarget.start(mt_config.load(mt_conf), metrics_port=0)
        last = batches[-1][0] + len(batches[-1][1]) - 1
        await asyncio.wait_for(mt.replicas[DISK].wait_applied(StreamPosition(1, last)), TIMEOUT_S)
    finally:
        daemon.kill_if_running()
        if mt is not None:
            await mt.close()
    _compare(mt_root / "t.raw", batches, tmp_path)
    assert "fsync fault injected" in (tmp_path / "ps.log").read_text()


@pytest.mark.parametrize("volume", ["cache", "retention"])
async def test_a_failed_master_target_fsync_is_retried_whole(
    deployment: Deployment, tmp_path: Path, volume: str
) -> None:
    """The inbox (cache) fsync fails: 503 to the process server, which sends
    the file again. The journal (retention) fsync fails: the disk pauses and
    applies the whole file again. Either way the target ends identical."""
    mt_port = free_port()
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    mt_root.mkdir()
    mt_conf = write_config(
        deployment, mt_root,
        [{"id": DISK, "target": mt_root / "t.raw", "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    with mt_conf.open("a") as extra:
        extra.write(
            f'[listen]\nhost = "127.0.0.1"\nport = {mt_port}\n[metrics]\nport = {free_port()}\n'
        )
    daemon = Daemon(
        mt_conf, tmp_path / "mt.log", module="mastertarget.cli",
        env_once={FSYNC_ENV: f"{mt_root / volume}:6"},
    )  # fmt: skip
    daemon.start()
    ps_root.mkdir()
    ps_conf = write_ps_config(deployment, ps_root)
    ps_conf.write_text(
        ps_conf.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
    )
    ps = await ProcessServer.start(ps_config.load(ps_conf), data_port=0, metrics_port=0)
    batches = _batches(4)
    last = batches[-1][0] + len(batches[-1][1]) - 1
    try:
        connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"https://127.0.0.1:{ps.port}/v1/disks/{DISK}/batches"
            for first, records in batches:
                status, answer = await _post(session, url, _body(DISK, first, records))
                assert status == 200, answer
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while ps.disks[DISK].position.shipped_seq < last:
            assert asyncio.get_running_loop().time() < deadline, ps.disks[DISK].position
            await asyncio.sleep(0.2)
    finally:
        await ps.close()
    # Applied in full: ask the daemon itself through its admin socket.
    admin = aiohttp.UnixConnector(path=str(mt_root / "admin.sock"))
    try:
        async with aiohttp.ClientSession(connector=admin) as session:
            while True:
                async with session.get(f"http://mt/v1/disks/{DISK}/points?limit=1") as answer:
                    points = await answer.json()
                if points["points"] and points["points"][0]["seq"] >= last:
                    break
                assert asyncio.get_running_loop().time() < deadline, points
                await asyncio.sleep(0.2)
    finally:
        assert daemon.stop() == 0
    log = (tmp_path / "mt.log").read_text()
    assert "fsync fault injected" in log
    _compare(mt_root / "t.raw", batches, tmp_path)
