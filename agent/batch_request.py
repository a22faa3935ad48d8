"""The body of one ``POST /v1/disks/{disk}/batches``: whole journaled batches from a seq on.

A request carries as many whole batches as are ready, up to
:data:`REQUEST_MAX_BYTES` (one at least, however large), back to back as
docs/protocol.md, "Batches", lays them out. It begins at the seq the
process server expects next; when that seq falls inside a batch, the batch
is cut there (:func:`cut_batch`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from agent.journal import JournalEntry, encode
from protocol.batch import BatchDecoder
from protocol.records import Buffer
from runtime.uploads import in_pieces

#: Bytes of batches in one request: several batches share the process
#: server's group commit, and a failed request costs at most this to resend.
REQUEST_MAX_BYTES: Final = 64 * 2**20


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """The buffers of one request, from seq ``first_seq``."""

    first_seq: int
    buffers: list[Buffer]
    #: bytes of the buffers
    size: int
    #: the seqs each batch of the request carries, in order
    counts: list[int]

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
) -> BatchRequest:
    """The next request: whole batches of ``entries`` (in order, the first holding
    seq ``first``), each read with ``load``.

    Raises:
        whatever ``load`` raises.
    """
    body: list[Buffer] = []
    counts: list[int] = []
    size = 0
    for entry in entries:
        parts = await load(entry)
        if entry.first_seq < first:  # the process server wants a seq inside this batch
            parts = cut_batch(parts, first)
        part_bytes = sum(memoryview(p).nbytes for p in parts)
        if body and size + part_bytes > REQUEST_MAX_BYTES:
            break
        body.extend(parts)
        counts.append(entry.last_seq - max(first, entry.first_seq) + 1)
        size += part_bytes
    return BatchRequest(first, body, size, counts)


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
