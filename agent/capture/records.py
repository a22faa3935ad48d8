"""Turning the plugin's requests into stream records and batches (no I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from agent.capture.plugin import wire
from agent.capture.plugin.dirtymap import Geometry
from protocol.limits import MAX_RECORDS_PER_BATCH, MAX_WRITE_BYTES, MAX_ZERO_BYTES
from protocol.records import Record, Write, Zero, encoded_size, is_zero


@dataclass(frozen=True, slots=True)
class Request:
    """A write or zero the plugin made on the source, as it reached the agent."""

    frame: wire.Frame
    #: when the agent got it (the source's clock): the record's capture time
    received_ns: int

    @property
    def rid(self) -> int:
        return self.frame.rid


def records_of(request: Request) -> Iterator[Write | Zero]:
    """The records of one request: WRITEs of at most 4 MiB, an all-zero write as a ZERO."""
    frame = request.frame
    if frame.type is wire.FrameType.ZERO:
        for at in range(0, frame.length, MAX_ZERO_BYTES):
            yield Zero(frame.offset + at, min(MAX_ZERO_BYTES, frame.length - at))
        return
    data = memoryview(frame.body)
    if is_zero(data):
        # Zeros written as data (dd from /dev/zero, an allocating format) travel without them.
        yield Zero(frame.offset, frame.length)
        return
    for at in range(0, len(data), MAX_WRITE_BYTES):
        yield Write(frame.offset + at, data[at : at + MAX_WRITE_BYTES])


def pack(records: Iterable[Record], payload_bytes: int) -> Iterator[list[Record]]:
    """``records`` in order, cut into batches of at most ``payload_bytes`` of payload
    (or one record) and :data:`~protocol.limits.MAX_RECORDS_PER_BATCH` records."""
    batch: list[Record] = []
    size = 0
    for record in records:
        need = encoded_size(record)
        if batch and (size + need > payload_bytes or len(batch) >= MAX_RECORDS_PER_BATCH):
            yield batch
            batch, size = [], 0
        batch.append(record)
        size += need
    if batch:
        yield batch


def regions_of(geometry: Geometry, requests: Sequence[Request]) -> set[int]:
    """The dirty map regions the requests touched."""
    touched: set[int] = set()
    for request in requests:
        touched.update(geometry.regions_of(request.frame.offset, request.frame.length))
    return touched


def chunk_ranges(
    ranges: Iterable[tuple[int, int]], chunk_bytes: int, disk_bytes: int
) -> list[tuple[int, int]]:
    """Ranges widened to whole chunks (the last one ends at the disk's end), merged."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        start = offset // chunk_bytes * chunk_bytes
        end = min(disk_bytes, -(-(offset + length) // chunk_bytes) * chunk_bytes)
        if out and out[-1][0] + out[-1][1] >= start:
            first = out[-1][0]
            out[-1] = (first, max(out[-1][0] + out[-1][1], end) - first)
        else:
            out.append((start, end - start))
    return out
