"""Coalescing: consecutive batches of one stream sent as one.

A hop that is behind sends what waits together: an agent whose process
server acknowledges more slowly than the disk commits merges the batches it
journaled meanwhile into one (docs/protocol.md, "Coalescing"). A payload is
the WRITE data of its records, then their table (protocol/records.py), and a
record's place gives its seq, so the merge of consecutive batches is their
data areas back to back, then their tables back to back, under a new header:
no record is decoded or copied.

What is merged, and what is not:

- only batches of one disk and generation whose seqs follow each other;
- the flags must say the same of every record: batches without flags merge,
  batches of a resync pass merge, and the pass's last batch (RESYNC_END)
  may end a merged one. A batch outside a pass never merges with one inside
  it: the end of the first is a recovery point, which a merge into a RESYNC
  batch would hide;
- a merged batch ends where one of its batches ended: the recovery points of
  the merged range are its end and its tags (a tag is a record and stays
  one), and every other boundary inside it is gone — the same crash-
  consistent states, fewer of them, while the hop is behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import xxhash

from protocol.batch import BATCH_HEADER, BatchHeader, EncodedBatch, unpack_header
from protocol.errors import LimitExceededError, MalformedError
from protocol.limits import MAX_BATCH_PAYLOAD, MAX_RECORDS_PER_BATCH
from protocol.records import NO_FLAGS, Buffer, StreamFlags

#: The flags a resync pass's batches carry, and its last one.
_IN_PASS: Final = StreamFlags.RESYNC
_PASS_END: Final = StreamFlags.RESYNC | StreamFlags.RESYNC_END


def merged_flags(first: StreamFlags, then: StreamFlags) -> StreamFlags | None:
    """The flags of a batch with ``first``'s records then ``then``'s, or None when
    the two may not be merged (see the module's text)."""
    if first == then and first in (NO_FLAGS, _IN_PASS):
        return first
    if first == _IN_PASS and then == _PASS_END:
        return _PASS_END
    return None


def runs(headers: Sequence[BatchHeader], *, max_payload: int, max_records: int) -> list[int]:
    """How many of ``headers`` each merged batch takes, in order: as many consecutive
    batches as may merge, within ``max_payload`` bytes and ``max_records`` records.

    A batch over either bound alone is a run of its own.
    """
    lengths: list[int] = []
    payload = records = 0
    flags: StreamFlags | None = None
    previous: BatchHeader | None = None
    for header in headers:
        joined = None
        if previous is not None and flags is not None and _follows(previous, header):
            joined = merged_flags(flags, header.flags)
        if (
            joined is not None
            and payload + header.payload_len <= max_payload
            and records + header.record_count <= max_records
        ):
            lengths[-1] += 1
            payload += header.payload_len
            records += header.record_count
            flags = joined
        else:
            lengths.append(1)
            payload, records, flags = header.payload_len, header.record_count, header.flags
        previous = header
    return lengths


def merge(batches: Sequence[Sequence[Buffer]]) -> EncodedBatch:
    """One batch holding the records of ``batches``, in order.

    Each batch is given as its buffers (its 144-byte header, then its
    payload, split anywhere); its payload digest is not checked again here —
    the caller read it from where it was checked. The data is referenced,
    not copied. One batch comes back as it was laid out.

    Raises:
        MalformedError: the batches are not consecutive batches of one stream,
            or their flags may not merge.
        LimitExceededError: the merged batch would pass the format's limits.
    """
    if not batches:
        raise MalformedError("expected at least one batch to merge, found none")
    headers: list[BatchHeader] = []
    data: list[Buffer] = []
    tables: list[Buffer] = []
    for parts in batches:
        header, payload = _split(parts)
        if headers:
            _check_follows(headers[-1], header)
        headers.append(header)
        data.extend(_slice(payload, 0, header.data_len))
        tables.extend(_slice(payload, header.data_len, header.payload_len))
    flags = headers[0].flags
    for header in headers[1:]:
        joined = merged_flags(flags, header.flags)
        if joined is None:
            raise MalformedError(
                f"batch seq {header.first_seq} cannot be merged after one flagged {flags!r}: "
                f"it is flagged {header.flags!r}"
            )
        flags = joined
    payload_len = sum(h.payload_len for h in headers)
    record_count = sum(h.record_count for h in headers)
    if payload_len > MAX_BATCH_PAYLOAD or record_count > MAX_RECORDS_PER_BATCH:
        raise LimitExceededError(
            f"a merged batch may hold {MAX_BATCH_PAYLOAD} payload bytes and "
            f"{MAX_RECORDS_PER_BATCH} records, found {payload_len} and {record_count}"
        )
    digest = xxhash.xxh3_128()
    for piece in (*data, *tables):
        digest.update(piece)
    first = headers[0]
    header = BatchHeader(
        disk_id=first.disk_id,
        generation=first.generation,
        first_seq=first.first_seq,
        record_count=record_count,
        first_capture_ns=min(h.first_capture_ns for h in headers),
        last_capture_ns=max(h.last_capture_ns for h in headers),
        payload_len=payload_len,
        payload_xxh3_128=digest.digest(),
        data_len=sum(h.data_len for h in headers),
        flags=flags,
    )
    header.pack()  # checks every field
    table = b"".join(tables)
    return EncodedBatch(header, tuple(data), table)


def _follows(previous: BatchHeader, header: BatchHeader) -> bool:
    return (
        header.disk_id == previous.disk_id
        and header.generation == previous.generation
        and header.first_seq == previous.last_seq + 1
    )


def _check_follows(previous: BatchHeader, header: BatchHeader) -> None:
    if not _follows(previous, header):
        raise MalformedError(
            f"expected batch {previous.disk_id} generation {previous.generation} seq "
            f"{previous.last_seq + 1} to merge next, found {header.disk_id} generation "
            f"{header.generation} seq {header.first_seq}"
        )


def header_of(parts: Sequence[Buffer]) -> BatchHeader:
    """The checked header of a batch given as its buffers.

    Raises:
        ProtocolError: as protocol/batch.py's ``unpack_header``.
    """
    return unpack_header(b"".join(bytes(v) for v in _slice(parts, 0, BATCH_HEADER.size)))


def _split(parts: Sequence[Buffer]) -> tuple[BatchHeader, list[memoryview]]:
    """A batch's header and its payload's pieces (views, no copy)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    header = header_of(views)
    payload = _slice(views, BATCH_HEADER.size, sum(v.nbytes for v in views))
    found = sum(v.nbytes for v in payload)
    if found != header.payload_len:
        raise MalformedError(
            f"batch seq {header.first_seq} must hold {header.payload_len} payload bytes, "
            f"found {found}"
        )
    return header, payload


def _slice(pieces: Sequence[Buffer], start: int, end: int) -> list[memoryview]:
    """Bytes ``start`` to ``end`` of ``pieces`` read back to back, as views."""
    out: list[memoryview] = []
    pos = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        lo, hi = max(start, pos), min(end, pos + view.nbytes)
        if lo < hi:
            out.append(view[lo - pos : hi - pos])
        pos += view.nbytes
        if pos >= end:
            break
    return out
