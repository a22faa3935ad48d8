"""Ingest: batches placed in order, sealed into HRL files, acknowledged once durable."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from processserver.cache import Cache
from processserver.committer import GroupCommitter
from processserver.ingest import DiskIngest, Sealers
from processserver.positions import DiskPosition, PositionStore
from protocol.batch import Batch, BatchDecoder, encode_batch
from protocol.hrl import open_hrl
from protocol.keyring import KeyRing
from protocol.records import NO_FLAGS, Record, StreamFlags, Write, Zero
from protocol.sequencing import Fit, StreamPosition

KEYRING = KeyRing({7: os.urandom(32)}, 7)


def _batch(
    generation: int, first: int, records: list[Record], flags: StreamFlags = NO_FLAGS
) -> Batch:
    body = encode_batch(
        disk_id="d", generation=generation, first_seq=first, records=records,
        first_capture_ns=5, last_capture_ns=6, flags=flags,
    )  # fmt: skip
    decoder = BatchDecoder(expected_disk_id="d")
    decoder.feed(body)
    (batch,) = decoder.events()
    return batch


@pytest.fixture
def ingest(tmp_path: Path):  # type: ignore[no-untyped-def]
    cache = Cache(tmp_path / "cache", high_bytes=10**9, low_bytes=10**8)
    cache.scan("d")
    store = PositionStore(tmp_path / "positions.db")
    executor = ThreadPoolExecutor(max_workers=2)
    disk = DiskIngest(
        "d", DiskPosition(StreamPosition(0, 0), 0, False), sealers=Sealers(KEYRING, 1),
        committer=GroupCommitter(cache, store, executor), executor=executor,
    )  # fmt: skip
    yield disk, cache, store
    executor.shutdown()
    store.close()


async def test_batches_are_placed_sealed_and_acknowledged(ingest) -> None:  # type: ignore[no-untyped-def]
    disk, cache, store = ingest
    first: list[Record] = [Write(0, b"a" * 5000), Zero(8192, 4096)]
    async with disk.lock:
        verdict = await disk.take(_batch(1, 1, first))
        assert (verdict.admission.fit, verdict.acked) == (Fit.NEXT, StreamPosition(1, 2))
        again = await disk.take(_batch(1, 1, first))
        assert (again.admission.fit, again.acked) == (Fit.DUPLICATE, StreamPosition(1, 2))
        gap = await disk.take(_batch(1, 9, [Write(0, b"x")]))
        assert (gap.admission.fit, gap.admission.expected_seq) == (Fit.GAP, 3)
        resync = StreamFlags.RESYNC
        await disk.take(_batch(2, 1, [Write(0, b"new generation")], resync))
        stale = await disk.take(_batch(1, 3, [Write(0, b"late")]))
        assert (stale.admission.fit, stale.admission.generation) == (Fit.STALE, 2)
    files = cache.scan("d").files
    assert [(f.generation, f.first_seq, f.last_seq) for f in files] == [(1, 1, 2), (2, 1, 1)]
    opened = open_hrl(files[0].path.read_bytes(), KEYRING)
    assert opened.records == tuple(first)
    assert open_hrl(files[1].path.read_bytes(), KEYRING).header.flags == StreamFlags.RESYNC
    assert store.get("d").acked == StreamPosition(2, 1)
