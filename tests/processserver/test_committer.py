"""Group commit: concurrent requests share fsyncs; a failed group fails everyone in it."""

from __future__ import annotations

import asyncio
import errno
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from processserver.cache import Cache
from processserver.committer import GroupCommitter
from processserver.positions import DiskPosition, PositionStore
from protocol.hrl import HrlSealer, SealedHrl
from protocol.keyring import KeyRing
from protocol.records import Write
from protocol.sequencing import StreamPosition
from runtime.errors import DurabilityError

KEYRING = KeyRing({1: os.urandom(32)}, 1)
DISKS = ("a", "b", "c")


def _sealed(disk: str, seq: int) -> SealedHrl:
    return HrlSealer(KEYRING).seal_records(
        [Write(seq * 512, os.urandom(2000))], disk_id=disk, generation=1, first_seq=seq,
        first_capture_ns=1, last_capture_ns=1, receive_ns=1, salt=os.urandom(32),
    )  # fmt: skip


def _position(seq: int) -> DiskPosition:
    return DiskPosition(StreamPosition(1, seq), 0, False)


@pytest.fixture
def parts(tmp_path: Path):  # type: ignore[no-untyped-def]
    cache = Cache(tmp_path / "cache", high_bytes=10**9, low_bytes=10**8)
    for disk in DISKS:
        cache.scan(disk)
    store = PositionStore(tmp_path / "positions.db")
    executor = ThreadPoolExecutor(max_workers=2)
    yield cache, store, executor
    executor.shutdown()
    store.close()


async def test_concurrent_commits_share_groups(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cache, store, executor = parts
    committer = GroupCommitter(cache, store, executor)

    async def stream(disk: str) -> None:
        for seq in range(1, 11):  # one disk's batches in order, as its lock makes them
            cached = await committer.commit(_sealed(disk, seq), _position(seq))
            assert cached.path.exists()

    await asyncio.gather(*(stream(d) for d in DISKS))
    assert committer.files == 30
    assert committer.groups < 30  # the disks' requests shared groups
    reopened = PositionStore(tmp_path / "positions.db")
    assert {d: reopened.get(d).acked for d in DISKS} == dict.fromkeys(DISKS, StreamPosition(1, 10))
    reopened.close()
    assert len(Cache(tmp_path / "cache", high_bytes=10**9, low_bytes=10**8).scan("a").files) == 10


async def test_a_failed_group_fails_every_request_in_it(
    parts,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    cache, store, executor = parts
    committer = GroupCommitter(cache, store, executor)
    real_fsync = os.fsync
    failing = True

    def fsync(fd: int) -> None:
        if failing:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    results = await asyncio.gather(
        *(committer.commit(_sealed(d, 1), _position(1)) for d in DISKS), return_exceptions=True
    )
    assert all(isinstance(r, DurabilityError) for r in results)
    assert store.get("a").acked == StreamPosition(0, 0)  # nothing moved
    failing = False
    cached = await committer.commit(_sealed("a", 1), _position(1))  # the resend works
    assert cached.path.exists()
    assert store.get("a").acked == StreamPosition(1, 1)
    assert cache.bytes == cached.size
