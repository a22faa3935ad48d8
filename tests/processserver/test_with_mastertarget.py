"""The process server and the master target together, both real, over TLS on
loopback: batches from two machines arrive applied and identical; with the
master target down the cache fills to 503 and drains after it returns."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import aiohttp
import xxhash

from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.limits import MiB
from protocol.records import Record, Write
from protocol.sequencing import StreamPosition
from tests.conftest import Deployment, assert_image_holds
from tests.faults.daemons import free_port
from tests.faults.pausable_proxy import PausableProxy
from tests.mastertarget.conftest import apply_to_model, random_workload, write_config

from .test_api import Agent, _body, write_ps_config

SIZE = 8 * MiB


async def _mastertarget(deployment: Deployment, root: Path, port: int) -> MasterTarget:
    config = write_config(
        deployment, root,
        [{"id": d, "target": root / f"{d}.raw", "create": True, "size_bytes": SIZE}
         for d in ("vm01-d0", "db01-d0")],
    )  # fmt: skip
    with config.open("a") as extra:
        extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {port}\n')
    return await MasterTarget.start(mt_config.load(config), metrics_port=0)


def _ps_config(deployment: Deployment, root: Path, mt_port: int, **extra: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = write_ps_config(deployment, root, **extra)
    path.write_text(
        path.read_text().replace(
            'url = "https://127.0.0.1:9"', f'url = "https://127.0.0.1:{mt_port}"'
        )
    )
    return path


async def test_batches_from_two_machines_arrive_applied_and_identical(
    deployment: Deployment, tmp_path: Path
) -> None:
    mt_port = free_port()
    mt = await _mastertarget(deployment, tmp_path / "mt", mt_port)
    ps = await ProcessServer.start(
        ps_config.load(_ps_config(deployment, tmp_path / "ps", mt_port)), data_port=0,
        metrics_port=0,
    )  # fmt: skip
    models = {d: bytearray(SIZE) for d in ("vm01-d0", "db01-d0")}
    try:
        for machine, disk in (("vm01", "vm01-d0"), ("db01", "db01-d0")):
            connector = aiohttp.TCPConnector(ssl=deployment.client_tls(machine))
            async with aiohttp.ClientSession(connector=connector) as session:
                agent = Agent(session, ps.port)
                rng = random.Random(disk)
                seq = 1
                for _ in range(15):
                    records: list[Record] = random_workload(rng, SIZE, 4, max_len=80_000)
                    status, answer = await agent.post(disk, _body(disk, seq, records))
                    assert status == 200, answer
                    apply_to_model(models[disk], records)
                    seq += len(records)
            await asyncio.wait_for(mt.replicas[disk].wait_applied(StreamPosition(1, seq - 1)), 30)
        for _ in range(100):  # the shipper deletes a file right after the 200
            if ps.cache.bytes == 0:
                break
            await asyncio.sleep(0.02)
        assert ps.cache.bytes == 0
        # The agent's view of the target, through the process server.
        connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"https://127.0.0.1:{ps.port}/v1/disks/vm01-d0/checksums?chunk={MiB}"
            async with session.get(url) as response:
                assert response.status == 200
                digests = await response.read()
        image = (tmp_path / "mt" / "vm01-d0.raw").read_bytes()
        assert digests == b"".join(
            xxhash.xxh3_128_digest(image[i : i + MiB]) for i in range(0, SIZE, MiB)
        )
    finally:
        await ps.close()
        await mt.close()
    for disk, model in models.items():
        assert_image_holds(tmp_path / "mt" / f"{disk}.raw", bytes(model))


async def test_master_target_down_fills_the_cache_then_everything_drains(
    deployment: Deployment, tmp_path: Path
) -> None:
    mt_port = free_port()
    config = _ps_config(
        deployment, tmp_path / "ps", mt_port, cache_high_bytes=34 * MiB, cache_low_bytes=32 * MiB
    )
    ps = await ProcessServer.start(ps_config.load(config), data_port=0, metrics_port=0)
    model = bytearray(SIZE)
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            agent = Agent(session, ps.port)
            seq, refused = 1, 0
            while refused == 0:  # no master target: the cache only grows
                chunk: list[Record] = random_workload(random.Random(seq), SIZE, 2, max_len=100_000)
                chunk.append(Write(0, os.urandom(4 * MiB)))  # incompressible: fills the cache fast
                status, answer = await agent.post("vm01-d0", _body("vm01-d0", seq, chunk))
                if status == 503:
                    assert answer["error"] == "cache-full"
                    refused += 1
                    break
                assert status == 200, answer
                apply_to_model(model, chunk)
                seq += len(chunk)
            assert ps.cache.bytes >= 34 * MiB
            mt = await _mastertarget(deployment, tmp_path / "mt", mt_port)
            try:
                await asyncio.wait_for(
                    mt.replicas["vm01-d0"].wait_applied(StreamPosition(1, seq - 1)), 60
                )
            finally:
                await mt.close()
    finally:
        await ps.close()
    assert_image_holds(tmp_path / "mt" / "vm01-d0.raw", bytes(model))


async def test_a_process_server_takes_the_stream_where_the_master_target_holds_it(
    deployment: Deployment, tmp_path: Path
) -> None:
    """An agent moves from one process server to another and sends again from
    what the master target holds: the second one, which never saw the disk,
    takes the stream from there; without the master target it cannot."""
    mt_port = free_port()
    mt = await _mastertarget(deployment, tmp_path / "mt", mt_port)
    first = await ProcessServer.start(
        ps_config.load(_ps_config(deployment, tmp_path / "ps1", mt_port)), data_port=0,
        metrics_port=0,
    )  # fmt: skip
    second = await ProcessServer.start(
        ps_config.load(_ps_config(deployment, tmp_path / "ps2", mt_port)), data_port=0,
        metrics_port=0,
    )  # fmt: skip
    cut_off = await ProcessServer.start(
        ps_config.load(_ps_config(deployment, tmp_path / "ps3", free_port())), data_port=0,
        metrics_port=0,
    )  # fmt: skip
    rng = random.Random(5)
    batches = [(1 + 3 * n, random_workload(rng, SIZE, 3, max_len=50_000)) for n in range(6)]
    model = bytearray(SIZE)
    try:
        connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
        async with aiohttp.ClientSession(connector=connector) as session:
            for seq, records in batches[:4]:
                status, answer = await Agent(session, first.port).post(
                    "vm01-d0", _body("vm01-d0", seq, records)
                )
                assert status == 200, answer
            await asyncio.wait_for(mt.replicas["vm01-d0"].wait_applied(StreamPosition(1, 12)), 30)
            elsewhere = Agent(session, second.port)
            # Seqs the master target holds are duplicates there too...
            status, answer = await elsewhere.post("vm01-d0", _body("vm01-d0", *batches[2]))
            assert (status, answer["acked_seq"]) == (200, 12), answer
            assert (await elsewhere.state("vm01-d0"))["shipped_seq"] == 12
            # ...and the next ones are taken and shipped.
            for seq, records in batches[4:]:
                status, answer = await elsewhere.post("vm01-d0", _body("vm01-d0", seq, records))
                assert (status, answer["acked_seq"]) == (200, seq + 2), answer
            status, answer = await Agent(session, cut_off.port).post(
                "vm01-d0", _body("vm01-d0", *batches[4])
            )
            assert (status, answer["error"], answer["expected_seq"]) == (409, "gap", 1)
        await asyncio.wait_for(mt.replicas["vm01-d0"].wait_applied(StreamPosition(1, 18)), 30)
    finally:
        for ps in (first, second, cut_off):
            await ps.close()
        await mt.close()
    for _, records in batches:
        apply_to_model(model, records)
    assert_image_holds(tmp_path / "mt" / "vm01-d0.raw", bytes(model))


async def test_a_resumed_stream_takes_the_master_targets_position_before_any_batch(
    deployment: Deployment, tmp_path: Path
) -> None:
    """An agent that moved sends again from what it knows the master target
    holds, merging its batches along other lines than the first time. With
    ``resume=1`` a process server that saw none of the stream takes the master
    target's position first and refuses the merged batch as an overlap; without
    it, it caches a file the master target can never place, and the disk
    needs a resync."""
    mt_port = free_port()
    mt = await _mastertarget(deployment, tmp_path / "mt", mt_port)
    servers = [
        await ProcessServer.start(
            ps_config.load(_ps_config(deployment, tmp_path / f"ps{n}", mt_port)), data_port=0,
            metrics_port=0,
        )
        for n in range(3)
    ]  # fmt: skip
    rng = random.Random(9)
    records = random_workload(rng, SIZE, 18, max_len=20_000)
    model = bytearray(SIZE)
    try:
        connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
        async with aiohttp.ClientSession(connector=connector) as session:
            first, moved_to, unaware = (Agent(session, ps.port) for ps in servers)
            for seq in (1, 4, 7, 10):
                status, answer = await first.post(
                    "vm01-d0", _body("vm01-d0", seq, records[seq - 1 : seq + 2])
                )
                assert status == 200, answer
            await asyncio.wait_for(mt.replicas["vm01-d0"].wait_applied(StreamPosition(1, 12)), 30)

            status, answer = await moved_to.post(
                "vm01-d0", _body("vm01-d0", 1, records[:15]), "resume=yes"
            )
            assert (status, answer["error"]) == (400, "malformed"), answer
            assert "query parameter resume must be 0 or 1" in answer["message"]
            status, answer = await moved_to.post(
                "vm01-d0", _body("vm01-d0", 1, records[:15]), "resume=1"
            )
            assert (status, answer["error"], answer["expected_seq"]) == (409, "overlap", 13), answer
            status, answer = await moved_to.post("vm01-d0", _body("vm01-d0", 13, records[12:15]))
            assert (status, answer["acked_seq"]) == (200, 15), answer
            await asyncio.wait_for(mt.replicas["vm01-d0"].wait_applied(StreamPosition(1, 15)), 30)
            assert (await moved_to.state("vm01-d0"))["resync_required"] is False

            status, answer = await unaware.post("vm01-d0", _body("vm01-d0", 1, records[:18]))
            assert (status, answer["acked_seq"]) == (200, 18), "taken as the next batch"
            deadline = asyncio.get_running_loop().time() + 30
            while not (await unaware.state("vm01-d0"))["resync_required"]:
                assert asyncio.get_running_loop().time() < deadline, "no resync after 30 s"
                await asyncio.sleep(0.05)
    finally:
        for ps in servers:
            await ps.close()
        await mt.close()
    apply_to_model(model, records[:15])
    assert_image_holds(tmp_path / "mt" / "vm01-d0.raw", bytes(model))


async def test_a_state_request_waits_for_the_master_target_to_hold_a_seq(
    deployment: Deployment, tmp_path: Path
) -> None:
    """``?shipped=N&wait_s=S``: answered the moment seq N is shipped, not at a poll;
    after S at most when it is not; at once when it already is."""
    mt_port = free_port()
    mt = await _mastertarget(deployment, tmp_path / "mt", mt_port)
    link = PausableProxy(mt_port)
    await link.start()
    ps = await ProcessServer.start(
        ps_config.load(_ps_config(deployment, tmp_path / "ps", link.port)), data_port=0,
        metrics_port=0,
    )  # fmt: skip
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
    base = f"https://127.0.0.1:{ps.port}/v1/disks/vm01-d0/state"
    try:
        async with aiohttp.ClientSession(connector=connector) as session:

            async def state(query: str) -> tuple[int, dict[str, object]]:
                async with session.get(f"{base}?{query}") as response:
                    return response.status, await response.json()

            link.pause()
            status, answer = await Agent(session, ps.port).post(
                "vm01-d0", _body("vm01-d0", 1, [Write(0, b"x" * 4096)])
            )
            assert status == 200, answer
            # Not shipped: the answer waits its bound, then says so.
            assert (await state("shipped=1&wait_s=0.3"))[1]["shipped_seq"] == 0
            waiting = asyncio.ensure_future(state("shipped=1&wait_s=5"))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            started = asyncio.get_running_loop().time()
            link.resume()
            status, answer = await asyncio.wait_for(waiting, 10)
            assert (status, answer["shipped_seq"]) == (200, 1)
            assert asyncio.get_running_loop().time() - started < 4  # woken, not timed out
            # Already shipped: at once. Bad values: refused, naming the parameter.
            assert (await asyncio.wait_for(state("shipped=1&wait_s=5"), 2))[1]["shipped_seq"] == 1
            refused = (
                ("shipped=x&wait_s=1", "shipped"), ("shipped=1&wait_s=60", "wait_s"),
                ("shipped=1&wait_s=nan", "wait_s"), ("shipped=-1", "shipped"),
            )  # fmt: skip
            for query, name in refused:
                status, answer = await state(query)
                assert (status, answer["error"]) == (400, "malformed"), answer
                assert f"query parameter {name}" in str(answer["message"])
    finally:
        await ps.close()
        await link.close()
        await mt.close()
