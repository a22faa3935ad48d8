"""The agent's journal: every batch of a disk's stream, on the source side,
until the master target holds it durably.

A batch is written to the journal (crash-safe: temp file, fsync, rename,
directory fsync) before it is sent, so a seq names one content forever:
after a crash, a refused request or a move to another process server, the
agent sends exactly what it sent before. Entries are removed only up to the
seq that the master target has received (the process server's
``shipped_seq``), so a process server that dies with files in its cache
loses nothing. One file per batch, named by its place in the stream::

    STATE_DIR/journal/DISK/GGGGGGGGGGGGGGGGGGGG-FFFFFFFFFFFFFFFFFFFF-LLLLLLLLLLLLLLLLLLLL.brb
                           generation           first seq            last seq

Two kinds of entry (docs/protocol.md, "Agent journal"):

- ``.brb`` — the batch exactly as sent (docs/protocol.md, "Batches"); what
  live capture writes, as its data exists nowhere else.
- ``.brs`` — a batch whose WRITE data stays on the source: the 144-byte
  batch header, the record table, and an XXH3-64 of both. What a sync
  writes: its data is the source itself. Loading one reads the source at
  the table's offsets and checks the payload's XXH3-128 against the header,
  so the batch sent again is exactly the batch sent before, or the load
  fails with :class:`~agent.errors.SourceChangedError`.
"""

from __future__ import annotations

import enum
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import xxhash

from agent.errors import JournalError, SourceChangedError
from agent.source import SourceDisk
from protocol.batch import (
    BATCH_HEADER,
    BatchHeader,
    EncodedBatch,
    check_payload,
    check_whole_batch,
    lay_out_batch,
    unpack_header,
)
from protocol.errors import ChecksumMismatchError, ProtocolError
from protocol.records import Buffer, Write, decode_records
from runtime.crashsafe import fsync_dir, remove_stale_temps, write_file_atomic

#: Entry files hold replicated data in clear: the service user's alone.
ENTRY_MODE: Final = 0o600
ENTRY_NAME: Final = re.compile(r"(\d{20})-(\d{20})-(\d{20})\.(brb|brs)")
#: The trailer of a ``.brs`` entry: XXH3-64 of header and table, little-endian.
SOURCE_TRAILER: Final = struct.Struct("<Q")


class EntryKind(enum.Enum):
    #: the whole batch is in the file
    INLINE = "brb"
    #: the WRITE data is read from the source when the batch is sent
    SOURCE = "brs"


@dataclass(frozen=True, slots=True, order=True)
class JournalEntry:
    """One batch in the journal."""

    generation: int
    first_seq: int
    last_seq: int
    kind: EntryKind
    path: Path
    size: int


#: Batches are laid out by protocol/batch.py; the journal stores them as they
#: are sent (``.brb``) or without their WRITE data (``.brs``).
encode: Final = lay_out_batch


def encode_source_entry(header: BatchHeader, table: bytes) -> bytes:
    """The bytes of a ``.brs`` entry: ``header[144] || table || xxh3_64(header || table)``."""
    body = header.pack() + table
    return body + SOURCE_TRAILER.pack(xxhash.xxh3_64_intdigest(body))


def decode_source_entry(data: bytes, *, what: str) -> tuple[BatchHeader, bytes]:
    """Check and split a ``.brs`` entry.

    Raises:
        JournalError: torn, altered, or its table does not fit its header.
    """
    if len(data) < BATCH_HEADER.size + SOURCE_TRAILER.size:
        raise JournalError(f"{what}: expected at least {BATCH_HEADER.size + 8} bytes, found "
                           f"{len(data)}")  # fmt: skip
    body, trailer = data[: -SOURCE_TRAILER.size], data[-SOURCE_TRAILER.size :]
    (stored,) = SOURCE_TRAILER.unpack(trailer)
    actual = xxhash.xxh3_64_intdigest(body)
    if stored != actual:
        raise JournalError(f"{what}: checksum must be {stored:016x}, found {actual:016x}")
    try:
        header = unpack_header(body)
    except ProtocolError as exc:
        raise JournalError(f"{what}: {exc.message}") from exc
    table = body[BATCH_HEADER.size :]
    if len(table) != header.payload_len - header.data_len:
        raise JournalError(
            f"{what}: its header needs a table of {header.payload_len - header.data_len} "
            f"bytes, found {len(table)}"
        )
    return header, table


def entry_name(generation: int, first_seq: int, last_seq: int, kind: EntryKind) -> str:
    return f"{generation:020d}-{first_seq:020d}-{last_seq:020d}.{kind.value}"


class Journal:
    """The journal of one disk.

    Opening it removes what a crash left (temp files, entries at or below
    the trimmed position, entries of other generations) and checks that the
    rest continue the stream without a gap.

    Args:
        directory: the disk's journal folder (created if missing).
        generation: the stream's generation.
        trimmed_seq: the last seq known to be held by the master target.

    Raises:
        JournalError: a file that is not an entry, or entries that leave a
            gap or overlap: the journal cannot be trusted to resend exactly.
        DurabilityError: the folder cannot be listed or cleaned.
    """

    def __init__(self, directory: Path, *, generation: int, trimmed_seq: int) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_temps(directory)
        self.generation = generation
        self.entries: list[JournalEntry] = []
        stale: list[Path] = []
        for path in sorted(directory.iterdir()):
            match = ENTRY_NAME.fullmatch(path.name)
            if match is None:
                raise JournalError(
                    f"journal {directory} holds {path.name}, which is not a journal entry; "
                    "expected only GEN-FIRST-LAST.brb/.brs files"
                )
            gen, first, last = (int(g) for g in match.groups()[:3])
            if gen != generation or last <= trimmed_seq:
                stale.append(path)
                continue
            kind = EntryKind(match.group(4))
            self.entries.append(JournalEntry(gen, first, last, kind, path, path.stat().st_size))
        self._remove(stale)
        expected = trimmed_seq + 1
        for entry in self.entries:
            if entry.first_seq > expected or entry.last_seq < entry.first_seq:
                raise JournalError(
                    f"journal {directory}: expected seq {expected} of generation {generation} "
                    f"next, found {entry.path.name}"
                )
            expected = entry.last_seq + 1

    @property
    def end_seq(self) -> int | None:
        """The last seq in the journal, or None when it is empty."""
        return self.entries[-1].last_seq if self.entries else None

    @property
    def bytes(self) -> int:
        return sum(entry.size for entry in self.entries)

    def append(self, batch: EncodedBatch, kind: EntryKind) -> JournalEntry:
        """Write one batch durably; it must continue the journal.

        Raises:
            JournalError: it is of another generation or does not come next.
            DurabilityError: the write failed; the entry does not exist.
        """
        h = batch.header
        if h.generation != self.generation or (
            self.entries and h.first_seq != self.entries[-1].last_seq + 1
        ):
            raise JournalError(
                f"journal {self.directory}: batch {h.generation}/{h.first_seq} does not continue "
                f"generation {self.generation} at seq {(self.end_seq or 0) + 1}"
            )
        path = self.directory / entry_name(h.generation, h.first_seq, h.last_seq, kind)
        if kind is EntryKind.INLINE:
            write_file_atomic(path, batch.segments, mode=ENTRY_MODE)
            size = batch.wire_bytes
        else:
            content = encode_source_entry(h, batch.table)
            write_file_atomic(path, content, mode=ENTRY_MODE)
            size = len(content)
        entry = JournalEntry(h.generation, h.first_seq, h.last_seq, kind, path, size)
        self.entries.append(entry)
        return entry

    def load(self, entry: JournalEntry, source: SourceDisk | None) -> list[Buffer]:
        """The batch of ``entry`` as sent before: its header, then its payload.

        Raises:
            JournalError: the file is missing, torn or altered.
            SourceChangedError: a ``.brs`` entry's data no longer reads as it did.
        """
        what = f"journal entry {entry.path}"
        try:
            data = entry.path.read_bytes()
        except OSError as exc:
            raise JournalError(f"cannot read {what}: {exc.strerror or exc}") from exc
        if entry.kind is EntryKind.INLINE:
            return [_check_inline(data, entry, what)]
        header, table = decode_source_entry(data, what=what)
        _check_place(header, entry, what)
        if source is None:
            raise JournalError(f"{what} refers to the source disk, which is not open")
        payload = bytearray(header.payload_len)
        payload[header.data_len :] = table
        try:
            records = decode_records(payload, header.record_count, header.data_len, what=what)
        except ProtocolError as exc:
            raise JournalError(f"{what}: {exc.message}") from exc
        for record in records:
            if isinstance(record, Write):
                source.read_into(record.offset, memoryview(record.data))
        try:
            check_payload(header, payload)
        except ChecksumMismatchError:
            raise SourceChangedError(
                f"seqs {entry.first_seq}..{entry.last_seq} of generation {entry.generation} must "
                f"be sent again, but source {source.path} no longer reads as it did when they "
                "were sent: the source changed during the sync"
            ) from None
        return [header.pack(), payload]

    def trim(self, generation: int, seq: int) -> int:
        """Remove every entry the master target holds: up to ``seq`` of ``generation``.

        The caller records the trimmed position durably first: an entry whose
        removal a crash undoes is then removed again at the next open.

        Returns:
            The number of entries removed.
        """
        if generation != self.generation:
            return 0
        gone = [entry for entry in self.entries if entry.last_seq <= seq]
        self.entries = self.entries[len(gone) :]
        self._remove([entry.path for entry in gone])
        return len(gone)

    def _remove(self, paths: list[Path]) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise JournalError(f"cannot remove journal entry {path}: {exc.strerror}") from exc
        if paths:
            fsync_dir(self.directory)


def _check_inline(data: bytes, entry: JournalEntry, what: str) -> bytes:
    try:
        header = check_whole_batch(data)
    except ProtocolError as exc:
        raise JournalError(f"{what}: {exc.message}") from exc
    _check_place(header, entry, what)
    return data


def _check_place(header: BatchHeader, entry: JournalEntry, what: str) -> None:
    found = (header.generation, header.first_seq, header.last_seq)
    if found != (entry.generation, entry.first_seq, entry.last_seq):
        raise JournalError(
            f"{what}: its name says generation {entry.generation} seqs "
            f"{entry.first_seq}..{entry.last_seq}, its header {found[0]} {found[1]}..{found[2]}"
        )
