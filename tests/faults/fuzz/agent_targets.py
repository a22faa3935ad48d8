"""Fuzz targets for what the agent reads: its journal, the capture socket and files, and
group rounds."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import replace
from functools import cache
from typing import Final

import xxhash

from agent.capture.dirty import load_map, take_marker
from agent.capture.plugin import dirtymap, wire
from agent.errors import AgentError
from agent.group.messages import RoundSpec, encode, parse_request
from agent.journal import SOURCE_TRAILER, EntryKind, Journal, JournalEntry, encode_source_entry
from agent.journal import encode as encode_journal_batch
from agent.source import SourceDisk
from protocol import headers
from protocol.batch import BATCH_HEADER
from protocol.errors import ProtocolError
from protocol.limits import MAX_BATCH_PAYLOAD, MAX_RECORDS_PER_BATCH, MiB
from protocol.records import Write, Zero
from runtime.errors import DurabilityError
from tests.faults.fuzz.harness import (
    DISK,
    RECORD_BYTES,
    Target,
    kept_and_made,
    scratch,
    scratch_file,
)
from tests.faults.fuzz.inputs import file_input, parse_file, reseal_batches

# --- agent journal entries: batches kept on the source side ---------------------------

#: In a journal input's control byte: the entry is a ``.brs`` (else a ``.brb``).
SOURCE_ENTRY: Final = 0x01
#: Where a batch header keeps generation, first_seq and record_count (protocol/batch.py).
GENERATION_AT: Final = 72
RECORD_COUNT_AT: Final = 88


#: Bytes of the source disk the journal target reads from.
SOURCE_BYTES: Final = 1 * MiB


@cache
def _journal() -> Journal:
    return Journal(scratch() / "journal", generation=1, trimmed_seq=0)


@cache
def _source_bytes() -> bytes:
    return bytes(range(256)) * (SOURCE_BYTES // 256)


@cache
def _source() -> SourceDisk:
    return SourceDisk(scratch_file("source.raw", _source_bytes()))


def run_journal(data: bytes) -> None:
    """A file input of one journal entry, ``.brs`` when SOURCE_ENTRY is set, else ``.brb``;
    its name's place is its header's, as the agent names entries."""
    file = parse_file(data)
    kind = EntryKind.SOURCE if data and data[0] & SOURCE_ENTRY else EntryKind.INLINE
    body = _reseal_entry(file.body, kind) if file.reseal else file.body
    path = scratch_file(f"entry.{kind.value}", body)
    entry = JournalEntry(*_place(body), kind, path, len(body))
    sent = _journal().load(entry, _source())
    if kind is EntryKind.INLINE:
        assert sent == [body]
    else:
        assert bytes(sent[0]) == body[: BATCH_HEADER.size], "the header packs back otherwise"
        assert len(sent[1]) == struct.unpack_from("<Q", body, 112)[0]


def _place(body: bytes) -> tuple[int, int, int]:
    """(generation, first seq, last seq) as the entry's name gives them: from its header."""
    if len(body) < BATCH_HEADER.size:
        return 1, 1, 1
    generation, first_seq = struct.unpack_from("<QQ", body, GENERATION_AT)
    (count,) = struct.unpack_from("<I", body, RECORD_COUNT_AT)
    return generation, first_seq, first_seq + count - 1


def _reseal_entry(body: bytes, kind: EntryKind) -> bytes:
    if kind is EntryKind.INLINE:
        return reseal_batches(body)
    if len(body) < BATCH_HEADER.size + SOURCE_TRAILER.size:
        return body
    table = body[BATCH_HEADER.size : -SOURCE_TRAILER.size]
    sealed = headers.seal(body[: BATCH_HEADER.size]) + table
    return sealed + SOURCE_TRAILER.pack(xxhash.xxh3_64_intdigest(sealed))


def _journal_seeds() -> Iterator[bytes]:
    source = _source_bytes()
    records = [Write(0, source[:4096]), Zero(65536, 4096), Write(300_000, source[300_000:300_999])]
    batch = encode_journal_batch(disk_id=DISK, generation=1, first_seq=4, records=records,
                                 first_capture_ns=1, last_capture_ns=1)  # fmt: skip
    inline = b"".join(batch.segments)
    by_reference = encode_source_entry(batch.header, batch.table)
    for body, flags in ((inline, 0), (by_reference, SOURCE_ENTRY)):
        yield file_input(body, flags=flags)
        yield file_input(body, flags=flags, reseal=True)


# --- the capture socket: frames between the nbdkit plugin and the agent --------------


def run_capture_wire(data: bytes) -> None:
    """Frames back to back, read as the agent (control bit 0 clear) or the plugin reads them."""
    if not data:
        return
    allowed = wire.AGENT_TYPES if data[0] & 1 else wire.PLUGIN_TYPES
    at = 1
    while len(data) - at >= wire.HEADER.size:
        raw = data[at : at + wire.HEADER.size]
        frame, body_len = wire.decode_header(raw, allowed=allowed)
        body = data[at + wire.HEADER.size : at + wire.HEADER.size + body_len]
        if len(body) < body_len:
            return  # the reader waits for the rest
        assert wire.encode_header(replace(frame, body=body)) == raw, "a header with two encodings"
        if frame.type in wire.RANGE_LISTS:
            assert wire.encode_ranges(wire.decode_ranges(body)) == body
        at += wire.HEADER.size + body_len


def _capture_wire_seeds() -> Iterator[bytes]:
    def frame(kind: wire.FrameType, body: bytes = b"", **fields: int) -> bytes:
        return wire.encode_header(wire.Frame(kind, body=body, **fields)) + body

    ranges = wire.encode_ranges([(0, 1 << 20), (5 << 20, 1 << 20)])
    yield b"\0" + b"".join([
        frame(wire.FrameType.HELLO, flags=wire.PROTOCOL_VERSION, rid=42, offset=1 << 20,
              length=1 << 30),
        frame(wire.FrameType.WRITE, b"data" * 8, rid=1, offset=4096, length=32),
        frame(wire.FrameType.ZERO, flags=wire.WriteFlags.TRIM, rid=2, offset=0, length=512),
        frame(wire.FrameType.FAILED, rid=3),
        frame(wire.FrameType.PENDING_DONE, ranges, rid=4),
        frame(wire.FrameType.BYE),
    ])  # fmt: skip
    yield b"\1" + b"".join([
        frame(wire.FrameType.ACK, flags=wire.AckStatus.DIRTY, rid=3, offset=1),
        frame(wire.FrameType.SHIPPED, rid=2),
        frame(wire.FrameType.PENDING, ranges, flags=wire.PendingFlags.LIVE, rid=3),
        frame(wire.FrameType.RESYNCED, ranges, rid=3),
    ])  # fmt: skip


# --- the capture's files: the dirty map and the clean marker ---------------------------

#: Where a dirty map header keeps disk_bytes (agent/capture/plugin/dirtymap.py).
MAP_DISK_BYTES_AT: Final = 16


def run_capture_state(data: bytes) -> None:
    """The same bytes as a dirty map and as a clean marker, read as a capture starting."""
    map_file = scratch_file("disk.map", data)
    disk_bytes = struct.unpack_from("<Q", data, MAP_DISK_BYTES_AT)[0] if len(data) >= 24 else 1
    found = load_map(map_file, disk_bytes)  # a map that cannot be used is None, never an error
    if found is not None:
        geometry, dirty = found
        assert dirty == sorted(set(dirty)), dirty
        assert all(0 <= region < geometry.regions for region in dirty), (geometry, dirty)
    marker = scratch_file("disk.clean", data)
    take_marker(marker)
    assert not marker.exists(), "a clean marker outlived its reading"


def _capture_state_seeds() -> Iterator[bytes]:
    geometry = dirtymap.Geometry(1 << 20, (5 << 20) + 1)
    yield dirtymap.encode_header(geometry) + b"\0\1\0\0\1\1"
    yield b'{"generation": 3, "end_seq": 42}'


# --- group rounds: the coordinator's requests to a member ------------------------------


def run_group(data: bytes) -> None:
    """One request line from a coordinator, as a member reads it."""
    request = parse_request(data)
    if request.spec is not None:
        assert parse_request(encode(request.spec.prepare())) == request


def _group_seeds() -> Iterator[bytes]:
    spec = RoundSpec("erp", "app", "nightly", "00" * 16, 1_700_000_000_000_000_000, 2.5)
    yield encode(spec.prepare())
    yield encode({"op": "hold"})
    yield encode({"op": "tag"})
    yield encode({"op": "resume", "outcome": "committed"})


JOURNAL: Final = Target(
    "journal", run_journal, kept_and_made("journal", _journal_seeds), (AgentError,),
    held_bytes=MAX_BATCH_PAYLOAD + MAX_RECORDS_PER_BATCH * RECORD_BYTES, corpus="journal",
)  # fmt: skip
CAPTURE_WIRE: Final = Target(
    "capture-wire", run_capture_wire, kept_and_made("capture-wire", _capture_wire_seeds),
    (wire.WireError,), corpus="capture-wire",
)  # fmt: skip
CAPTURE_STATE: Final = Target(
    "capture-state", run_capture_state, kept_and_made("capture-state", _capture_state_seeds),
    (DurabilityError,), corpus="capture-state",
)  # fmt: skip
GROUP: Final = Target(
    "group", run_group, kept_and_made("group", _group_seeds), (ProtocolError,), corpus="group"
)
