"""The agent's journal: what goes in comes out exactly, or not at all."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import xxhash

from agent.errors import JournalError, SourceChangedError
from agent.journal import EntryKind, Journal, decode_source_entry, encode, encode_source_entry
from agent.source import SourceDisk
from protocol.batch import BatchDecoder, encode_batch
from protocol.records import Record, StreamFlags, Write, Zero

DISK = "vm01-d0"


def _records(rng: random.Random, source: bytes | None = None) -> list[Record]:
    """Writes of the source's bytes at their offsets (or random ones), and a zero."""
    records: list[Record] = []
    for _ in range(3):
        offset = rng.randrange(0, 1 << 20)
        length = rng.randint(1, 100_000)
        data = source[offset : offset + length] if source is not None else rng.randbytes(length)
        records.append(Write(offset, data))
    records.append(Zero(rng.randrange(0, 1 << 20), 4096))
    return records


def _expected(first: int, records: list[Record], flags: StreamFlags) -> bytes:
    return encode_batch(
        disk_id=DISK, generation=1, first_seq=first, records=records, first_capture_ns=5,
        last_capture_ns=6, flags=flags,
    )  # fmt: skip


def _append(
    journal: Journal, first: int, records: list[Record], kind: EntryKind,
    flags: StreamFlags = StreamFlags.RESYNC,
) -> None:  # fmt: skip
    batch = encode(
        disk_id=DISK, generation=journal.generation, first_seq=first, records=records,
        first_capture_ns=5, last_capture_ns=6, flags=flags,
    )  # fmt: skip
    journal.append(batch, kind)


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(3).randbytes(2 << 20)
    path = tmp_path / "source.raw"
    path.write_bytes(data)
    return path, data


def test_both_kinds_come_back_exactly_as_sent(tmp_path: Path, source: tuple[Path, bytes]) -> None:
    path, data = source
    rng = random.Random(1)
    inline, by_source = _records(rng), _records(rng, data)
    journal = Journal(tmp_path / "j", generation=1, trimmed_seq=0)
    _append(journal, 1, inline, EntryKind.INLINE, StreamFlags(0))
    _append(journal, 5, by_source, EntryKind.SOURCE)
    entry_sizes = [entry.path.stat().st_size for entry in journal.entries]
    assert entry_sizes[1] < 300  # the source's bytes are not copied
    reopened = Journal(tmp_path / "j", generation=1, trimmed_seq=0)
    assert reopened.end_seq == 8
    with SourceDisk(path) as disk:
        sent = [b"".join(bytes(p) for p in reopened.load(e, disk)) for e in reopened.entries]
    assert sent == [
        _expected(1, inline, StreamFlags(0)),
        _expected(5, by_source, StreamFlags.RESYNC),
    ]
    decoder = BatchDecoder(expected_disk_id=DISK)
    decoder.feed(b"".join(sent))
    decoder.feed_eof()
    assert [b.records for b in decoder.events()] == [tuple(inline), tuple(by_source)]


def test_entries_written_by_hand_to_the_documented_layout_load(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    """docs/protocol.md, "Agent journal": a .brb is the batch as sent, a .brs
    its header, its table and an XXH3-64 of both; journals that an earlier
    agent left behind must load whatever code writes them now."""
    path, data = source
    records: list[Record] = [Write(4096, data[4096:8192]), Zero(0, 512)]
    inline = _expected(1, records, StreamFlags(0))
    by_source = _expected(3, records, StreamFlags.RESYNC)
    header_end = 144
    data_len = int.from_bytes(by_source[92:96], "little")
    head_and_table = by_source[:header_end] + by_source[header_end + data_len :]
    folder = tmp_path / "j"
    folder.mkdir()
    (folder / f"{1:020d}-{1:020d}-{2:020d}.brb").write_bytes(inline)
    (folder / f"{1:020d}-{3:020d}-{4:020d}.brs").write_bytes(
        head_and_table + xxhash.xxh3_64_intdigest(head_and_table).to_bytes(8, "little")
    )
    journal = Journal(folder, generation=1, trimmed_seq=0)
    with SourceDisk(path) as disk:
        sent = [b"".join(bytes(p) for p in journal.load(e, disk)) for e in journal.entries]
    assert sent == [inline, by_source]


def test_a_changed_source_is_refused_not_sent(tmp_path: Path, source: tuple[Path, bytes]) -> None:
    path, data = source
    journal = Journal(tmp_path / "j", generation=1, trimmed_seq=0)
    records: list[Record] = [Write(4096, data[4096:8192])]
    _append(journal, 1, records, EntryKind.SOURCE)
    with path.open("r+b") as image:
        image.seek(5000)
        image.write(b"\x00\x01")
    with SourceDisk(path) as disk, pytest.raises(SourceChangedError, match="source changed"):
        journal.load(journal.entries[0], disk)


@pytest.mark.parametrize("kind", [EntryKind.INLINE, EntryKind.SOURCE])
def test_a_damaged_entry_is_refused(
    tmp_path: Path, source: tuple[Path, bytes], kind: EntryKind
) -> None:
    path, data = source
    journal = Journal(tmp_path / "j", generation=1, trimmed_seq=0)
    _append(journal, 1, _records(random.Random(2), data), kind)
    entry = journal.entries[0]
    raw = bytearray(entry.path.read_bytes())
    for position in (3, 100, len(raw) - 20):
        damaged = bytearray(raw)
        damaged[position] ^= 0x40
        entry.path.write_bytes(bytes(damaged))
        with SourceDisk(path) as disk, pytest.raises(JournalError, match=entry.path.name):
            journal.load(entry, disk)
    entry.path.write_bytes(bytes(raw[:-1]))  # torn
    with SourceDisk(path) as disk, pytest.raises(JournalError):
        journal.load(entry, disk)


def test_opening_removes_what_is_trimmed_or_left_by_a_crash(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    journal = Journal(folder, generation=2, trimmed_seq=0)
    rng = random.Random(4)
    for first in (1, 5, 9):
        _append(journal, first, _records(rng), EntryKind.INLINE)
    old = Journal(tmp_path / "other", generation=1, trimmed_seq=0)
    _append(old, 1, _records(rng), EntryKind.INLINE)
    os.rename(old.entries[0].path, folder / old.entries[0].path.name)  # an older generation
    (folder / ".x.brb.tmp-0123456789abcdef").write_bytes(b"torn")  # a crash mid-write
    reopened = Journal(folder, generation=2, trimmed_seq=8)
    assert [(e.first_seq, e.last_seq) for e in reopened.entries] == [(9, 12)]
    assert sorted(p.name for p in folder.iterdir()) == [reopened.entries[0].path.name]
    assert reopened.trim(2, 12) == 1
    assert list(folder.iterdir()) == []
    assert reopened.end_seq is None


def test_a_gap_or_a_stranger_makes_the_journal_untrusted(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    journal = Journal(folder, generation=1, trimmed_seq=0)
    rng = random.Random(5)
    for first in (1, 5, 9):
        _append(journal, first, _records(rng), EntryKind.INLINE)
    with pytest.raises(JournalError, match="continue"):
        _append(journal, 14, _records(rng), EntryKind.INLINE)
    journal.entries[1].path.unlink()
    with pytest.raises(JournalError, match="expected seq 5 of generation 1 next"):
        Journal(folder, generation=1, trimmed_seq=0)
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(JournalError, match=r"notes\.txt"):
        Journal(folder, generation=1, trimmed_seq=0)


def test_a_source_entry_is_checked_before_it_is_trusted() -> None:
    rng = random.Random(6)
    batch = encode(
        disk_id=DISK, generation=1, first_seq=1, records=_records(rng), first_capture_ns=1,
        last_capture_ns=1,
    )  # fmt: skip
    entry = encode_source_entry(batch.header, batch.table)
    header, table = decode_source_entry(entry, what="t")
    assert (header, table) == (batch.header, batch.table)
    with pytest.raises(JournalError, match="checksum"):
        decode_source_entry(entry[:-9] + bytes([entry[-9] ^ 1]) + entry[-8:], what="t")
    with pytest.raises(JournalError, match="at least"):
        decode_source_entry(entry[:100], what="t")
