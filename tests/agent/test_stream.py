"""The agent's stream against real process servers and a real master target
(in this process, over mutual TLS on loopback): batches arrive in order and
exactly once, the journal empties only as the master target receives, a
dead process server with files in its cache loses nothing, 503 is waited
out, and a stream another generation superseded stops."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from agent.errors import StreamBrokenError
from agent.journal import EntryKind
from agent.pool import ProcessServerPool
from agent.state import AgentState, StreamRecord
from agent.stream import ReplicationStream
from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.batch import encode_batch
from protocol.limits import MiB
from protocol.records import NO_FLAGS, Record, Tag, TagKind, Write
from protocol.sequencing import StreamPosition
from tests.conftest import Deployment
from tests.faults.daemons import free_port
from tests.faults.pausable_proxy import PausableProxy
from tests.mastertarget.conftest import apply_to_model, random_workload, write_config
from tests.processserver.test_api import write_ps_config
from tests.waiting import until

DISK = "vm01-d0"
SIZE = 8 * MiB


@dataclass
class Site:
    """Master target and process servers in this process; closed at the end."""

    deployment: Deployment
    root: Path
    mt_port: int = field(default_factory=free_port)
    mt: MasterTarget | None = None
    servers: list[ProcessServer] = field(default_factory=list)
    pools: list[ProcessServerPool] = field(default_factory=list)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4))

    async def start_mt(self) -> MasterTarget:
        root = self.root / "mt"
        root.mkdir(exist_ok=True)
        config = write_config(
            self.deployment, root,
            [{"id": DISK, "target": root / "t.raw", "create": True, "size_bytes": SIZE}],
        )  # fmt: skip
        with config.open("a") as extra:
            extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {self.mt_port}\n')
        self.mt = await MasterTarget.start(mt_config.load(config), metrics_port=0)
        return self.mt

    async def start_ps(self, mt_port: int | None = None, **extra: object) -> ProcessServer:
        root = self.root / f"ps{len(self.servers)}"
        root.mkdir()
        path = write_ps_config(self.deployment, root, **extra)
        port = self.mt_port if mt_port is None else mt_port
        path.write_text(
            path.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{port}")
        )
        ps = await ProcessServer.start(ps_config.load(path), data_port=0, metrics_port=0)
        self.servers.append(ps)
        return ps

    def pool(self, *servers: ProcessServer) -> ProcessServerPool:
        return ProcessServerPool(
            tuple(f"https://127.0.0.1:{ps.port}" for ps in servers),
            self.deployment.client_tls("vm01"),
            request_timeout_s=10, connect_timeout_s=5, give_up_after_s=60,
        )  # fmt: skip

    async def stream(self, pool: ProcessServerPool, generation: int = 1) -> ReplicationStream:
        state = AgentState(self.root / "agent")
        return await ReplicationStream.create(
            DISK, generation, state=state, pool=pool, journal_dir=self.root / "agent" / "journal",
            source=None, executor=self.executor,
        )  # fmt: skip

    def target(self) -> bytes:
        return (self.root / "mt" / "t.raw").read_bytes()


@pytest_asyncio.fixture
async def site(deployment: Deployment, tmp_path: Path) -> AsyncIterator[Site]:
    made = Site(deployment, tmp_path)
    yield made
    for pool in made.pools:
        await pool.close()
    for ps in made.servers:
        await ps.close()
    if made.mt is not None:
        await made.mt.close()
    made.executor.shutdown()


async def _append(stream: ReplicationStream, records: list[Record]) -> None:
    now = time.time_ns()
    await stream.append(
        records, flags=NO_FLAGS, first_capture_ns=now, last_capture_ns=now, kind=EntryKind.INLINE
    )


def _journal(site: Site) -> list[str]:
    return sorted(p.name for p in (site.root / "agent" / "journal").iterdir())


async def test_batches_arrive_in_order_and_the_journal_empties(site: Site) -> None:
    mt = await site.start_mt()
    ps = await site.start_ps()
    pool = site.pool(ps)
    stream = await site.stream(pool)
    stream.start()
    model, rng = bytearray(SIZE), random.Random(1)
    for _ in range(12):
        records = random_workload(rng, SIZE, 4, max_len=60_000)
        await _append(stream, records)
        apply_to_model(model, records)
    await asyncio.wait_for(stream.wait_shipped(), 30)
    assert _journal(site) == []
    assert (stream.trimmed_seq, stream.end_seq, stream.stats.batches) == (48, 48, 12)
    assert 1 <= stream.stats.wire_batches <= stream.stats.batches
    assert stream.stats.resent_bytes == 0
    await asyncio.wait_for(mt.replicas[DISK].wait_applied(StreamPosition(1, 48)), 30)
    await stream.close()
    await pool.close()
    assert site.target() == model


async def test_a_second_request_goes_behind_a_large_one_only(site: Site) -> None:
    """Two requests of the disk in flight at most (the pool's default), and a
    second only behind one of 1 MiB or more: behind a small one, what waits
    goes coalesced once it is answered. Every batch arrives once, in order."""
    mt = await site.start_mt()
    ps = await site.start_ps()
    pool = site.pool(ps)
    assert pool.in_flight_per_disk == 2
    stream = await site.stream(pool)
    stream.start()
    disk = ps.disks[DISK]
    model, rng = bytearray(SIZE), random.Random(3)

    async def commit(records: list[Record], in_flight: int) -> None:
        await _append(stream, records)
        apply_to_model(model, records)
        await until(f"{in_flight} requests open", lambda: disk.requests.open == in_flight)

    async with disk.request_lock:  # the process server takes nothing meanwhile
        await commit(random_workload(rng, SIZE, 4, max_len=60_000), 1)
        await commit(random_workload(rng, SIZE, 4, max_len=60_000), 1)
        await asyncio.sleep(0.2)
        assert (stream.stats.requests, stream.stats.most_in_flight) == (1, 1)
    await asyncio.wait_for(stream.wait_acked(), 30)
    assert stream.stats.requests == 2
    async with disk.request_lock:
        await commit([Write(0, rng.randbytes(2 * MiB))], 1)
        await commit(random_workload(rng, SIZE, 4, max_len=60_000), 2)
        await commit(random_workload(rng, SIZE, 4, max_len=60_000), 2)
        await asyncio.sleep(0.2)
        assert (stream.stats.requests, stream.stats.most_in_flight) == (4, 2)
    await asyncio.wait_for(stream.wait_shipped(), 30)
    last = stream.end_seq
    await asyncio.wait_for(mt.replicas[DISK].wait_applied(StreamPosition(1, last)), 30)
    assert site.target() == bytes(model)
    assert stream.stats.requests == 5
    assert stream.stats.resent_bytes == 0
    await stream.close()


async def test_batches_that_waited_go_as_one_and_keep_their_tags(site: Site) -> None:
    """A database's small commits, journaled while the process server was away,
    go as few merged batches; the tag among them stays a recovery point."""
    mt = await site.start_mt()
    ps = await site.start_ps()
    pool = site.pool(ps)
    stream = await site.stream(pool)
    model, rng = bytearray(SIZE), random.Random(3)
    for n in range(200):  # committed before the stream sends anything
        records = random_workload(rng, SIZE, 2, max_len=8192)
        if n == 120:
            records.append(Tag(TagKind.APP, rng.randbytes(16), "commit-120", time.time_ns()))
        await _append(stream, records)
        apply_to_model(model, records)
    stream.start()
    await asyncio.wait_for(stream.wait_shipped(), 30)
    end = stream.end_seq
    assert stream.stats.batches == 200
    assert stream.stats.wire_batches <= 2, stream.stats
    replica = mt.replicas[DISK]
    await asyncio.wait_for(replica.wait_applied(StreamPosition(1, end)), 30)
    points = await replica.history.points()
    assert [p.name for p in points if p.name] == ["commit-120"]
    assert points[-1].seq == end
    await stream.close()
    await pool.close()
    assert site.target() == model


async def test_a_dead_process_server_with_files_in_its_cache_loses_nothing(site: Site) -> None:
    mt = await site.start_mt()
    stranded = await site.start_ps(mt_port=free_port())  # it never reaches the master target
    spare = await site.start_ps()
    pool = site.pool(stranded, spare)
    stream = await site.stream(pool)
    stream.start()
    model, rng = bytearray(SIZE), random.Random(2)
    for _ in range(6):
        records = random_workload(rng, SIZE, 3, max_len=60_000)
        await _append(stream, records)
        apply_to_model(model, records)
    await asyncio.wait_for(stream.wait_acked(), 30)
    # Acknowledged, not received: the journal keeps every batch.
    assert len(_journal(site)) == 6
    # ... and the stranded process server's cache holds them, in as many files as
    # it took requests (batches that waited together came as one)
    cached = sorted((site.root / "ps0" / "cache" / "disks" / DISK).glob("*.hrl"))
    assert 1 <= len(cached) <= 6
    assert cached[-1].stem.endswith("-00000000000000000018")
    await stranded.close()
    await asyncio.wait_for(stream.wait_shipped(), 30)
    assert (pool.failovers, pool.current.url) == (1, f"https://127.0.0.1:{spare.port}")
    assert stream.stats.resent_bytes > 0
    await asyncio.wait_for(mt.replicas[DISK].wait_applied(StreamPosition(1, 18)), 30)
    await stream.close()
    await pool.close()
    assert site.target() == model


async def test_a_stream_resumed_elsewhere_sends_from_where_the_master_target_holds_it(
    site: Site,
) -> None:
    """The agent stops before it heard what the master target holds: it resumes
    on a process server that saw nothing of the disk, from the journal's start,
    merging its batches into one that starts before the master target's next
    seq and ends after it. The process server takes the master target's
    position first (``resume=1``); the overlap is sent again from there, and
    no resync is needed."""
    mt = await site.start_mt()
    link = PausableProxy(site.mt_port)
    await link.start()
    link.pause()
    first = await site.start_ps(mt_port=link.port)
    pool = site.pool(first)
    stream = await site.stream(pool)
    stream.start()
    model, rng = bytearray(SIZE), random.Random(4)
    for _ in range(4):  # one request, one cached file each
        records = random_workload(rng, SIZE, 3, max_len=30_000)
        await _append(stream, records)
        apply_to_model(model, records)
        await asyncio.wait_for(stream.wait_acked(), 30)
    await stream.close()  # nothing trimmed: nothing was shipped yet
    await pool.close()
    assert len(_journal(site)) == 4
    link.resume()
    await asyncio.wait_for(mt.replicas[DISK].wait_applied(StreamPosition(1, 12)), 30)
    await first.close()
    await link.close()

    elsewhere = await site.start_ps()
    pool = site.pool(elsewhere)
    stream = await site.stream(pool)
    records = random_workload(rng, SIZE, 3, max_len=30_000)
    await _append(stream, records)  # seqs 13..15, merged with 1..12 on the wire
    apply_to_model(model, records)
    stream.start()
    await asyncio.wait_for(stream.wait_shipped(), 30)
    await asyncio.wait_for(mt.replicas[DISK].wait_applied(StreamPosition(1, 15)), 30)
    state = await pool.current.state(DISK)
    assert (state.acked_seq, state.shipped_seq, state.resync_required) == (15, 15, False)
    await stream.close()
    await pool.close()
    assert site.target() == model


async def test_a_full_cache_is_waited_out(site: Site) -> None:
    ps = await site.start_ps(cache_high_bytes=34 * MiB, cache_low_bytes=32 * MiB)
    pool = site.pool(ps)
    stream = await site.stream(pool)
    stream.start()
    model = bytearray(SIZE)
    for n in range(4):  # 16 MiB each, incompressible, one request each: the fourth is refused
        records: list[Record] = [Write(i * 4 * MiB, os.urandom(4 * MiB)) for i in range(2)]
        records += [Write(i * 4 * MiB, os.urandom(4 * MiB)) for i in range(2)]
        records += [Write(n * 4096, os.urandom(4096))]
        await _append(stream, records)
        apply_to_model(model, records)
        if n < 3:
            await asyncio.wait_for(stream.wait_acked(), 30)
    registry = ps.metrics.registry
    deadline = time.monotonic() + 30
    while not registry.get_sample_value(
        "blockrepl_processserver_rejects_total", {"reason": "cache-full"}
    ):
        assert time.monotonic() < deadline, "the cache never filled"
        await asyncio.sleep(0.05)
    assert stream.acked_seq < stream.end_seq
    mt = await site.start_mt()  # the cache drains; the stream goes on
    await asyncio.wait_for(stream.wait_shipped(), 60)
    await asyncio.wait_for(mt.replicas[DISK].wait_applied(StreamPosition(1, 20)), 30)
    await stream.close()
    await pool.close()
    assert site.target() == model


async def test_batches_are_cut_where_the_process_server_stands(
    site: Site, deployment: Deployment
) -> None:
    mt = await site.start_mt()
    ps = await site.start_ps()
    rng = random.Random(3)
    records = random_workload(rng, SIZE, 6, max_len=60_000)
    model = bytearray(SIZE)
    apply_to_model(model, records)
    # The same records reached the process server in other batches: 1..2, 3..4.
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
    async with aiohttp.ClientSession(connector=connector) as session:
        for first in (1, 3):
            body = encode_batch(
                disk_id=DISK, generation=1, first_seq=first, records=records[first - 1 : first + 1],
                first_capture_ns=1, last_capture_ns=1,
            )  # fmt: skip
            url = f"https://127.0.0.1:{ps.port}/v1/disks/{DISK}/batches"
            async with session.post(url, data=body) as response:
                assert response.status == 200
    pool = site.pool(ps)
    state = AgentState(site.root / "agent")
    state.put_stream(DISK, StreamRecord(1, 0))  # the generation the process server is on
    stream = ReplicationStream.open(
        DISK, state=state, pool=pool, journal_dir=site.root / "agent" / "journal", source=None,
        executor=site.executor,
    )  # fmt: skip
    assert stream is not None
    await _append(stream, records[:3])
    await _append(stream, records[3:])  # 4..6: the process server holds 4 already
    stream.start()
    await asyncio.wait_for(stream.wait_shipped(), 30)
    await asyncio.wait_for(mt.replicas[DISK].wait_applied(StreamPosition(1, 6)), 30)
    await stream.close()
    await pool.close()
    assert site.target() == model


async def test_a_newer_generation_stops_the_stream(site: Site, deployment: Deployment) -> None:
    await site.start_mt()
    ps = await site.start_ps()
    pool = site.pool(ps)
    stream = await site.stream(pool, generation=1)
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"https://127.0.0.1:{ps.port}/v1/disks/{DISK}/generation"
        async with session.post(url, json={"generation": 5}) as response:
            assert response.status == 200
    stream.start()
    await _append(stream, random_workload(random.Random(4), SIZE, 2))
    with pytest.raises(StreamBrokenError, match="generation 5"):
        await asyncio.wait_for(stream.wait_shipped(), 30)
    await stream.close()
    await pool.close()
