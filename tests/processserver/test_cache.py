"""The process server's cache: group commit, start-up checks, watermarks."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from processserver.cache import Cache
from protocol.filenames import hrl_file_name
from protocol.hrl import HrlSealer, SealedHrl
from protocol.keyring import KeyRing
from protocol.records import Write
from runtime.errors import DurabilityError

KEYRING = KeyRing({1: os.urandom(32)}, 1)


def _sealed(disk: str, first: int, size: int = 1000) -> SealedHrl:
    return HrlSealer(KEYRING).seal_records(
        [Write(first * 4096, os.urandom(size))], disk_id=disk, generation=1, first_seq=first,
        first_capture_ns=1, last_capture_ns=1, receive_ns=1, salt=os.urandom(32),
    )  # fmt: skip


def _cache(tmp_path: Path, high: int = 10**9, low: int = 10**8) -> Cache:
    cache = Cache(tmp_path, high_bytes=high, low_bytes=low)
    for disk in ("a", "b"):
        cache.scan(disk)
    return cache


def test_group_commit_stores_every_file_privately(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    group = [_sealed("a", 1), _sealed("b", 1), _sealed("a", 2)]
    stored = cache.store_group(group)
    assert [(f.disk_id, f.first_seq) for f in stored] == [("a", 1), ("b", 1), ("a", 2)]
    for cached, sealed in zip(stored, group, strict=True):
        assert cached.path.read_bytes() == sealed.to_bytes()
        assert stat.S_IMODE(cached.path.stat().st_mode) == 0o600
    assert cache.bytes == sum(len(s.to_bytes()) for s in group)
    cache.remove(stored[0])
    assert not stored[0].path.exists()
    assert cache.bytes == sum(len(s.to_bytes()) for s in group[1:])


def test_scan_lists_good_files_in_order_and_quarantines_the_rest(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    stored = cache.store_group([_sealed("a", n) for n in (3, 1, 2, 4, 5)])
    by_seq = {f.first_seq: f.path for f in stored}
    with by_seq[2].open("r+b") as torn:  # a torn write: the tail is missing
        torn.truncate(300)
    data = bytearray(by_seq[4].read_bytes())
    data[100] ^= 0x01  # a bit flip in the header
    by_seq[4].write_bytes(bytes(data))
    by_seq[5].rename(by_seq[5].with_name(hrl_file_name(1, 9, 9)))  # name and header disagree
    (by_seq[1].parent / ".x.hrl.tmp-0123456789abcdef").write_bytes(b"left by a crash")
    fresh = Cache(tmp_path, high_bytes=10**9, low_bytes=10**8)
    result = fresh.scan("a")
    assert [f.first_seq for f in result.files] == [1, 3]
    reasons = sorted(reason.split(":")[0] for _, reason in result.quarantined)
    assert reasons == ["checksum-mismatch", "header names disk a generation 1 seqs 5..5",
                       "truncated or extended"]  # fmt: skip
    for moved, _ in result.quarantined:
        assert moved.exists()
        assert moved.with_name(moved.name + ".reason").exists()
    assert not list(by_seq[1].parent.glob(".*tmp-*"))
    assert fresh.bytes == sum(f.size for f in result.files)


def test_watermarks_have_hysteresis(tmp_path: Path) -> None:
    one = len(_sealed("a", 1).to_bytes())
    cache = _cache(tmp_path, high=3 * one, low=2 * one)
    files = cache.store_group([_sealed("a", n) for n in (1, 2)])
    assert not cache.full
    files += cache.store_group([_sealed("a", 3)])
    assert cache.full
    cache.remove(files[0])  # 2 files: between the marks, still full
    assert cache.full
    cache.remove(files[1])  # 1 file: under the low mark
    assert not cache.full


def test_a_failed_fsync_fails_the_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _cache(tmp_path)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(DurabilityError):
        cache.store_group([_sealed("a", 1)])
    assert cache.bytes == 0
    assert list((tmp_path / "disks" / "a").iterdir()) == []
