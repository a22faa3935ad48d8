"""A disk's stream: batches placed in order, sealed into HRL files, acknowledged
once durable; every other move of its position durable before it is relied on."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from processserver.cache import Cache
from processserver.committer import GroupCommitter
from processserver.metrics import ProcessServerMetrics
from processserver.positions import DiskPosition, PositionStore
from processserver.sealers import Sealers
from processserver.stream import DiskStream, StreamParts
from protocol.batch import Batch, BatchDecoder, encode_batch
from protocol.hrl import open_hrl
from protocol.keyring import KeyRing
from protocol.records import NO_FLAGS, Record, StreamFlags, Write, Zero
from protocol.sequencing import Fit, StreamPosition

KEYRING = KeyRing({7: os.urandom(32)}, 7)
DISK = "d"


def _batch(
    generation: int, first: int, records: list[Record], flags: StreamFlags = NO_FLAGS
) -> Batch:
    body = encode_batch(
        disk_id=DISK, generation=generation, first_seq=first, records=records,
        first_capture_ns=5, last_capture_ns=6, flags=flags,
    )  # fmt: skip
    decoder = BatchDecoder(expected_disk_id=DISK)
    decoder.feed(body)
    (batch,) = decoder.events()
    return batch


def _parts(root: Path, executor: ThreadPoolExecutor) -> StreamParts:
    cache = Cache(root / "cache", high_bytes=10**9, low_bytes=10**8)
    store = PositionStore(root / "positions.db")
    return StreamParts(
        cache, store, GroupCommitter(cache, store, executor), Sealers(KEYRING, 1), executor,
        ProcessServerMetrics(CollectorRegistry()),
    )  # fmt: skip


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[StreamParts]:
    executor = ThreadPoolExecutor(max_workers=2)
    parts = _parts(tmp_path, executor)
    yield parts
    executor.shutdown()
    parts.positions.close()


async def test_batches_are_placed_sealed_and_acknowledged(parts: StreamParts) -> None:
    stream = await DiskStream.recover(DISK, parts)
    first: list[Record] = [Write(0, b"a" * 5000), Zero(8192, 4096)]
    async with stream.request_lock:
        verdict = await stream.take(_batch(1, 1, first))
        assert (verdict.admission.fit, verdict.acked) == (Fit.NEXT, StreamPosition(1, 2))
        again = await stream.take(_batch(1, 1, first))
        assert (again.admission.fit, again.acked) == (Fit.DUPLICATE, StreamPosition(1, 2))
        gap = await stream.take(_batch(1, 9, [Write(0, b"x")]))
        assert (gap.admission.fit, gap.admission.expected_seq) == (Fit.GAP, 3)
        resync = StreamFlags.RESYNC
        await stream.take(_batch(2, 1, [Write(0, b"new generation")], resync))
        stale = await stream.take(_batch(1, 3, [Write(0, b"late")]))
        assert (stale.admission.fit, stale.admission.generation) == (Fit.STALE, 2)
    files = parts.cache.scan(DISK).files
    assert [(f.generation, f.first_seq, f.last_seq) for f in files] == [(1, 1, 2), (2, 1, 1)]
    assert [f.path for f in stream.cached] == [f.path for f in files]
    opened = open_hrl(files[0].path.read_bytes(), KEYRING)
    assert opened.records == tuple(first)
    assert open_hrl(files[1].path.read_bytes(), KEYRING).header.flags == StreamFlags.RESYNC
    assert parts.positions.get(DISK).acked == StreamPosition(2, 1)
    sealed = parts.metrics.registry.get_sample_value(
        "blockrepl_processserver_sealed_bytes_total", {"disk": DISK}
    )
    assert sealed == sum(f.size for f in files)


async def test_shipped_files_go_and_moves_that_matter_are_durable(parts: StreamParts) -> None:
    stream = await DiskStream.recover(DISK, parts)
    async with stream.request_lock:
        for seq in (1, 2, 3):
            await stream.take(_batch(1, seq, [Write(0, b"s" * 100)]))
    head = await stream.next_to_ship()
    await stream.shipped([head])
    assert not head.path.exists()
    assert (stream.position.shipped_seq, len(stream.cached)) == (1, 2)
    await stream.drop_held(1)
    assert (stream.position.shipped_seq, len(stream.cached)) == (2, 1)
    await stream.require_resync()
    assert parts.positions.get(DISK).resync_required
    async with stream.request_lock:
        assert not await stream.follow(StreamPosition(1, 9)), "files are cached: not taken"
        await stream.drop_held(1)
        assert not await stream.follow(StreamPosition(1, 3)), "not past what is held here"
        assert await stream.follow(StreamPosition(1, 9))
    assert parts.positions.get(DISK) == DiskPosition(StreamPosition(1, 9), 9, False)
    async with stream.request_lock:
        await stream.start_generation(4)
    assert parts.positions.get(DISK) == DiskPosition(StreamPosition(4, 0), 0, False)
    assert stream.position == parts.positions.get(DISK)


async def test_files_of_an_older_generation_shipped_move_no_seq_of_the_new_one(
    parts: StreamParts,
) -> None:
    """The agent started generation 2 while files of generation 1 wait in the cache:
    when those reach the master target (or are dropped), ``shipped_seq`` of
    generation 2 stays where it is. The agent trims its generation-2 journal
    up to ``shipped_seq``; a seq of generation 1 there would trim batches the
    master target does not hold."""
    stream = await DiskStream.recover(DISK, parts)
    async with stream.request_lock:
        for seq in (1, 2, 3):
            await stream.take(_batch(1, seq, [Write(0, b"o" * 100)]))
        await stream.start_generation(2)
        await stream.take(_batch(2, 1, [Write(0, b"n" * 100)], StreamFlags.RESYNC))
    await stream.shipped([await stream.next_to_ship()])  # generation 1, seq 1
    await stream.drop_older(2)  # generation 1, seqs 2 and 3
    assert stream.position == DiskPosition(StreamPosition(2, 1), 0, False)
    await stream.wait_shipped(1, 0.05)
    assert stream.position.shipped_seq == 0, "the long poll must not answer early either"
    await stream.shipped([await stream.next_to_ship()])  # generation 2, seq 1
    assert stream.position == DiskPosition(StreamPosition(2, 1), 1, False)


async def test_a_restart_takes_the_later_of_database_and_cache_and_quarantine_needs_a_resync(
    parts: StreamParts,
) -> None:
    stream = await DiskStream.recover(DISK, parts)
    async with stream.request_lock:
        for seq in (1, 2):
            await stream.take(_batch(1, seq, [Write(0, b"r" * 100)]))
    parts.positions.put({DISK: DiskPosition(StreamPosition(1, 1), 0, False)})  # a lost commit
    assert (await DiskStream.recover(DISK, parts)).position.acked == StreamPosition(1, 2)
    torn = stream.cached[0].path
    torn.write_bytes(torn.read_bytes()[:-1])
    again = await DiskStream.recover(DISK, parts)
    assert again.position == DiskPosition(StreamPosition(1, 2), 0, True)
    assert parts.positions.get(DISK).resync_required, "the resync must survive a restart"
    assert [f.first_seq for f in again.cached] == [2]


async def test_a_resync_marked_while_a_batch_is_written_survives_in_the_database(
    tmp_path: Path,
) -> None:
    """The shipper marks the disk resync-required while a request's batch is being
    sealed and committed: the database must end with both, never the batch's
    older view of the flag written over the mark (or the mark's older acked seq
    over the batch's)."""
    executor = ThreadPoolExecutor(max_workers=1)  # one thread: the order of the work is known
    parts = _parts(tmp_path, executor)
    try:
        stream = await DiskStream.recover(DISK, parts)
        release = threading.Event()
        executor.submit(release.wait)  # holds the thread until both moves are queued
        async with stream.request_lock:
            take = asyncio.create_task(stream.take(_batch(1, 1, [Write(0, b"t" * 100)])))
            for _ in range(5):
                await asyncio.sleep(0)  # the batch is queued for sealing
            mark = asyncio.create_task(stream.require_resync())
            for _ in range(5):
                await asyncio.sleep(0)  # the mark is queued (or waits its turn)
            release.set()
            await asyncio.gather(take, mark)
        assert stream.position == DiskPosition(StreamPosition(1, 1), 0, True)
        assert parts.positions.get(DISK) == stream.position
    finally:
        executor.shutdown()
        parts.positions.close()


def test_position_moves_are_pure() -> None:
    at = DiskPosition(StreamPosition(2, 10), 4, False)
    assert at.stored(StreamPosition(2, 12)) == DiskPosition(StreamPosition(2, 12), 4, False)
    assert at.shipped(2, 8) == DiskPosition(StreamPosition(2, 10), 8, False)
    assert at.shipped(1, 900) == at, "a seq of an older generation is no seq of this one"
    assert at.needing_resync().resync_required
    assert at.following(StreamPosition(2, 30), cached=True) is None
    assert at.following(StreamPosition(2, 10), cached=False) is None
    assert at.following(StreamPosition(3, 1), cached=False) == DiskPosition(
        StreamPosition(3, 1), 1, False
    )
    resyncing = at.needing_resync()
    assert resyncing.new_generation(5) == DiskPosition(StreamPosition(5, 0), 0, False)
    assert at.recovered(None, quarantined=False) == at
    assert at.recovered(StreamPosition(2, 11), quarantined=True) == DiskPosition(
        StreamPosition(2, 11), 4, True
    )
    assert at.recovered(StreamPosition(1, 99), quarantined=False) == at
