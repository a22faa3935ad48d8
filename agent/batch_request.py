"""The body of one ``POST /v1/disks/{disk}/batches``: whole journaled batches from a seq on.

A request carries as many whole batches as are ready, up to
:data:`REQUEST_MAX_BYTES` (one at least, however large), back to back as
docs/protocol.md, "Batches", lays them out. It begins at the seq the
process server expects next; when that seq falls inside a batch, the batch
is cut there (:func:`cut_batch`).

Batches that waited together go as one (protocol/coalesce.py), up to
:data:`COALESCED_PAYLOAD_BYTES`: a database's commits journal a few KiB
each, and a process server that took them one by one would spend its time
on per-batch work (a file, a seal, an fsync, a PUT, an apply group each)
and fall behind for good. An idle stream sends each batch alone, at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from agent.config import DEFAULT_BATCH_BYTES
from agent.journal import JournalEntry, encode
from protocol.batch import BatchDecoder
from protocol.coalesce import header_of, merge, runs
from protocol.limits import MAX_RECORDS_PER_BATCH
from protocol.records import Buffer
from runtime.uploads import in_pieces

#: Bytes of batches in one request: several batches share the process
#: server's group commit, and a failed request costs at most this to resend.
REQUEST_MAX_BYTES: Final = 64 * 2**20
#: Payload a merged batch is filled to at most: what the capture fills its
#: own batches to, so a merged batch costs the hops what a large write does.
COALESCED_PAYLOAD_BYTES: Final = DEFAULT_BATCH_BYTES


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """The buffers of one request, from seq ``first_seq``."""

    first_seq: int
    buffers: list[Buffer]
    #: bytes of the buffers
    size: int
    #: the seqs each batch of the request carries, in order
    counts: list[int]
    #: the journaled batches the request's batches were merged from
    journaled: int

    @property
    def last_seq(self) -> int:
        return self.first_seq + sum(self.counts) - 1

    def body(self) -> AsyncIterator[memoryview]:
        """The buffers as the HTTP client sends them, in pieces (runtime/uploads.py)."""
        return in_pieces(self.buffers)


async def build_request(
    entries: Sequence[JournalEntry],
    first: int,
    load: Callable[[JournalEntry], Awaitable[list[Buffer]]],
    max_bytes: int = REQUEST_MAX_BYTES,
) -> BatchRequest:
    """The next request: whole batches of ``entries`` (in order, the first holding
    seq ``first``), each read with ``load``, consecutive ones merged, within
    ``max_bytes`` (one batch at least).

    Raises:
        whatever ``load`` raises.
    """
    loaded: list[list[Buffer]] = []
    size = 0
    for entry in entries:
        parts = await load(entry)
        if entry.first_seq < first:  # the process server wants a seq inside this batch
            parts = cut_batch(parts, first)
        part_bytes = sum(memoryview(p).nbytes for p in parts)
        if loaded and size + part_bytes > max_bytes:
            break
        loaded.append(parts)
        size += part_bytes
    headers = [header_of(parts) for parts in loaded]
    body: list[Buffer] = []
    counts: list[int] = []
    start = 0
    for length in runs(
        headers, max_payload=COALESCED_PAYLOAD_BYTES, max_records=MAX_RECORDS_PER_BATCH
    ):
        group = loaded[start : start + length]
        body.extend(group[0] if length == 1 else merge(group).segments)
        counts.append(sum(h.record_count for h in headers[start : start + length]))
        start += length
    size = sum(memoryview(p).nbytes for p in body)
    return BatchRequest(first, body, size, counts, journaled=len(loaded))


def cut_batch(parts: list[Buffer], first: int) -> list[Buffer]:
    """The records of a batch from seq ``first`` on, as a batch of their own.

    A process server that merged batches into one file leaves the master
    target at a seq inside one of ours; the records are the same, so the
    stream stays exact.
    """
    decoder = BatchDecoder()
    for part in parts:
        decoder.feed(part)
    decoder.feed_eof()
    (batch,) = list(decoder.events())
    h = batch.header
    cut = encode(
        disk_id=h.disk_id,
        generation=h.generation,
        first_seq=first,
        records=batch.records[first - h.first_seq :],
        first_capture_ns=h.first_capture_ns,
        last_capture_ns=h.last_capture_ns,
        flags=h.flags,
    )
    return cut.segments
