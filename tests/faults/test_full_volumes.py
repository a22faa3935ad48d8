"""A full cache volume: back-pressure, no partial file, nothing lost.

The process server runs with its cache on a small tmpfs of its own (a
private mount namespace, so root only) that fills long before its high mark,
while the master target is down. Writes then fail with ENOSPC: the agent
must get 503 with Retry-After (and send again later), no torn or temporary
file may stay visible, and every batch answered 200 must survive. When the
master target comes, the cache drains, batches are taken again, and the
target equals the source.
"""

from __future__ import annotations

import asyncio
import os
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
from protocol.records import Record, Write
from protocol.sequencing import StreamPosition
from tests.conftest import Deployment, assert_image_holds, require_binary
from tests.faults.daemons import Daemon, free_port, small_volume_wrapper
from tests.mastertarget.conftest import apply_to_model, write_config
from tests.processserver.test_api import _body, write_ps_config

DISK = "vm01-d0"
SIZE = 16 * MiB
#: The cache volume: a few dozen 1 MiB files, far below the cache's marks.
VOLUME_BYTES = 24 * MiB
#: Seconds the whole fill, drain and refill may take.
TIMEOUT_S = 120.0


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    async with session.post(url, data=body) as response:
        return response.status, await response.json(), response.headers.get("Retry-After", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="a private tmpfs needs root (unshare --mount)")
async def test_a_full_cache_volume_is_back_pressure_and_loses_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    require_binary("unshare")
    mt_port, ps_port = free_port(), free_port()
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    mt_root.mkdir()
    (ps_root / "cache").mkdir(parents=True)
    ps_conf = write_ps_config(
        deployment, ps_root, port=ps_port, cache_high_bytes=512 * MiB, cache_low_bytes=448 * MiB
    )
    ps_conf.write_text(
        ps_conf.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
        + f"[metrics]\nport = {free_port()}\n"
    )
    daemon = Daemon(
        ps_conf, tmp_path / "ps.log", module="processserver.cli",
        wrapper=small_volume_wrapper((ps_root / "cache", VOLUME_BYTES)),
    )  # fmt: skip
    daemon.start()
    url = f"https://127.0.0.1:{ps_port}/v1/disks/{DISK}/batches"
    model = bytearray(SIZE)
    rng = random.Random(5)
    seq, refusals = 1, 0
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
    mt: MasterTarget | None = None
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(100):  # wait for the daemon to listen
                try:
                    await _post(session, url, b"")
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            # Incompressible batches until the volume is full.
            while True:
                records: list[Record] = [Write(rng.randrange(SIZE // MiB) * MiB, os.urandom(MiB))]
                status, answer, retry_after = await _post(session, url, _body(DISK, seq, records))
                if status == 503:
                    assert answer["error"] == "durability", answer
                    assert "No space left" in answer["message"] or "ENOSPC" in answer["message"]
                    assert int(retry_after) > 0
                    refusals += 1
                    break
                assert status == 200, answer
                apply_to_model(model, records)
                seq += 1
                assert seq < 100, "the volume never filled"
            acked = seq - 1
            # It keeps answering, and what it acknowledged is whole on the volume.
            async with session.get(url.replace("/batches", "/state")) as response:
                state = await response.json()
            assert (response.status, state["acked_seq"]) == (200, acked)
            # The volume as the daemon sees it, inside its mount namespace.
            assert daemon.proc is not None
            volume = Path(f"/proc/{daemon.proc.pid}/root") / (ps_root / "cache").relative_to("/")
            cache_files = [p for p in volume.rglob("*") if p.is_file()]
            assert not [p for p in cache_files if ".tmp" in p.name], cache_files
            hrl = sorted(p for p in cache_files if p.suffix == ".hrl")
            assert len(hrl) == acked
            for path in hrl:
                open_hrl(path.read_bytes(), deployment.keyring)  # verifies every byte

            # The master target comes: the cache drains and batches are taken again.
            mt_conf = write_config(
                deployment, mt_root,
                [{"id": DISK, "target": mt_root / "t.raw", "create": True, "size_bytes": SIZE}],
            )  # fmt: skip
            with mt_conf.open("a") as extra:
                extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {mt_port}\n')
            mt = await MasterTarget.start(mt_config.load(mt_conf), metrics_port=0)
            deadline = asyncio.get_running_loop().time() + TIMEOUT_S
            for _ in range(5):
                records = [Write(rng.randrange(SIZE // MiB) * MiB, os.urandom(MiB))]
                while True:
                    status, answer, retry_after = await _post(
                        session, url, _body(DISK, seq, records)
                    )
                    if status == 200:
                        break
                    assert status == 503, answer
                    refusals += 1
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.2)  # shorter than Retry-After: the test is in a hurry
                apply_to_model(model, records)
                seq += 1
            await asyncio.wait_for(
                mt.replicas[DISK].wait_applied(StreamPosition(1, seq - 1)), TIMEOUT_S
            )
    finally:
        daemon.kill_if_running()
        if mt is not None:
            await mt.close()
    assert_image_holds(mt_root / "t.raw", bytes(model))
    print(f"\n{acked} batches acked before the volume was full, {refusals} refusals, "
          f"{seq - 1} batches in all, 0 lost")  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="a private tmpfs needs root (unshare --mount)")
async def test_full_inbox_and_retention_volumes_stall_the_master_target_not_the_data(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The master target's inbox and retention volumes are small tmpfs of
    their own: its inbox fills (ENOSPC before its quota: 503 to the process
    server, which retries) and its journal fills the retention volume (the
    disk pauses, the oldest points go early, it resumes). Every batch ends
    applied, and the target equals the source."""
    require_binary("unshare")
    mt_port = free_port()
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    (mt_root / "cache").mkdir(parents=True)
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
        wrapper=small_volume_wrapper(
            (mt_root / "cache", VOLUME_BYTES), (mt_root / "retention", VOLUME_BYTES)
        ),
    )  # fmt: skip
    daemon.start()
    ps_root.mkdir()
    ps_conf = write_ps_config(deployment, ps_root)
    ps_conf.write_text(
        ps_conf.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
    )
    ps = await ProcessServer.start(ps_config.load(ps_conf), data_port=0, metrics_port=0)
    model = bytearray(SIZE)
    rng = random.Random(6)
    batches = 60  # 60 MiB of incompressible writes through 24 MiB volumes
    try:
        connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"https://127.0.0.1:{ps.port}/v1/disks/{DISK}/batches"
            for seq in range(1, batches + 1):
                records: list[Record] = [Write(rng.randrange(SIZE // MiB) * MiB, os.urandom(MiB))]
                status, answer, _ = await _post(session, url, _body(DISK, seq, records))
                assert status == 200, answer
                apply_to_model(model, records)
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while ps.disks[DISK].position.shipped_seq < batches:
            assert asyncio.get_running_loop().time() < deadline, ps.disks[DISK].position
            await asyncio.sleep(0.2)
        retries = ps.metrics.registry.get_sample_value(
            "blockrepl_processserver_ship_retries_total", {"disk": DISK}
        )
    finally:
        await ps.close()
    try:
        # Applied in full: the master target's own view, through its admin socket.
        admin = aiohttp.UnixConnector(path=str(mt_root / "admin.sock"))
        async with aiohttp.ClientSession(connector=admin) as session:
            while True:
                async with session.get(f"http://mt/v1/disks/{DISK}/points?limit=1") as response:
                    points = await response.json()
                newest = points["points"][0]["seq"] if points["points"] else 0
                if newest >= batches:
                    break
                assert asyncio.get_running_loop().time() < deadline, points
                await asyncio.sleep(0.2)
        assert points["window"]["points"] < batches  # the oldest went early, for room
    finally:
        assert daemon.stop() == 0
    log = (tmp_path / "mt.log").read_text()
    assert "No space left on device" in log
    assert_image_holds(mt_root / "t.raw", bytes(model))
    print(f"\n{batches} batches through full volumes, {retries:g} ship retries, "
          f"{points['window']['points']} points kept, 0 lost")  # fmt: skip
