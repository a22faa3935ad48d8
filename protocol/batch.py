"""The batch wire format: what an agent sends to the process server.

A request body is one or more batches back to back. Each batch is a fixed
144-byte header and a payload of records (protocol/records.py)::

    offset size  field
         0    4  magic              "BRB1"
         4    1  version            1
         5    1  flags              StreamFlags
         6    1  disk_id_len        1..64
         7    1  reserved           0
         8   64  disk_id            ASCII, zero padded
        72    8  generation         1..2**63-1
        80    8  first_seq          1..2**63-1; record n has seq first_seq + n
        88    4  record_count       1..MAX_RECORDS_PER_BATCH
        92    4  data_len           bytes of WRITE data at the start of the payload
        96    8  first_capture_ns   source clock, ns since the Unix epoch
       104    8  last_capture_ns    >= first_capture_ns
       112    8  payload_len        0..MAX_BATCH_PAYLOAD
       120   16  payload_xxh3_128   canonical (big-endian) XXH3-128 of the payload
       136    8  header_xxh3_64     XXH3-64 of bytes 0..135

All integers little-endian. The decoder checks, in order: length, magic,
version, header checksum, field values and limits; only then does it wait for
the payload, and it hashes the whole payload before decoding a record. Nothing
is yielded before it is verified. Specified in docs/protocol.md, "Batches".
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import xxhash

from protocol import headers, ids
from protocol.chunks import ChunkQueue
from protocol.errors import (
    BadMagicError,
    ChecksumMismatchError,
    LimitExceededError,
    MalformedError,
    ProtocolError,
    TruncatedError,
)
from protocol.limits import MAX_BATCH_PAYLOAD, MAX_RECORDS_PER_BATCH, MAX_SEQ
from protocol.records import (
    MAX_TIME_NS,
    NO_FLAGS,
    Buffer,
    Record,
    StreamFlags,
    check_flags,
    check_payload_layout,
    decode_records,
    encode_records,
)

BATCH_MAGIC: Final = b"BRB1"
BATCH_VERSION: Final = 1

# magic || version || flags || disk_id_len || reserved || disk_id || generation || first_seq
# || record_count || data_len || first_capture_ns || last_capture_ns || payload_len
# || payload_xxh3_128 || header_xxh3_64
BATCH_HEADER: Final = struct.Struct("<4sBBBB64sQQIIQQQ16sQ")


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """The decoded header of one batch."""

    disk_id: str
    generation: int
    first_seq: int
    record_count: int
    first_capture_ns: int
    last_capture_ns: int
    payload_len: int
    payload_xxh3_128: bytes
    data_len: int
    flags: StreamFlags = NO_FLAGS

    @property
    def last_seq(self) -> int:
        """The seq of the batch's last record."""
        return self.first_seq + self.record_count - 1

    def pack(self) -> bytes:
        """The 144 header bytes, checksum included, after checking every field.

        Raises:
            MalformedError, LimitExceededError: a field breaks a rule of the format.
        """
        _check_header(self)
        id_len, id_field = ids.pack_id("disk", self.disk_id)
        body = BATCH_HEADER.pack(
            BATCH_MAGIC, BATCH_VERSION, int(self.flags), id_len, 0, id_field,
            self.generation, self.first_seq, self.record_count, self.data_len,
            self.first_capture_ns, self.last_capture_ns, self.payload_len,
            self.payload_xxh3_128, 0,
        )  # fmt: skip
        return headers.seal(body)


def unpack_header(buf: Buffer) -> BatchHeader:
    """Decode and check one batch header from the first 144 bytes of ``buf``.

    Raises:
        TruncatedError: fewer than 144 bytes.
        BadMagicError, UnsupportedVersionError, ChecksumMismatchError,
        MalformedError, LimitExceededError: in the order the fields are checked.
    """
    if len(buf) < BATCH_HEADER.size:
        raise TruncatedError(f"batch header needs {BATCH_HEADER.size} bytes, found {len(buf)}")
    raw = bytes(buf[: BATCH_HEADER.size])
    headers.check_prefix(raw, magic=BATCH_MAGIC, version=BATCH_VERSION, what="batch")
    (
        _, _, flags, id_len, reserved1, id_field, generation, first_seq,
        record_count, data_len, first_ns, last_ns, payload_len, digest, _,
    ) = BATCH_HEADER.unpack(raw)  # fmt: skip
    if reserved1:
        raise MalformedError(f"batch header reserved byte must be 0, found {reserved1}")
    header = BatchHeader(
        disk_id=ids.unpack_id("disk", id_len, id_field),
        generation=generation,
        first_seq=first_seq,
        record_count=record_count,
        first_capture_ns=first_ns,
        last_capture_ns=last_ns,
        payload_len=payload_len,
        payload_xxh3_128=digest,
        data_len=data_len,
        flags=check_flags(flags, what="batch"),
    )
    _check_header(header)
    return header


def _check_header(h: BatchHeader) -> None:
    check_flags(int(h.flags), what="batch")
    if not 1 <= h.generation <= MAX_SEQ:
        raise MalformedError(f"batch generation must be 1..{MAX_SEQ}, found {h.generation}")
    if not 1 <= h.record_count <= MAX_RECORDS_PER_BATCH:
        raise LimitExceededError(
            f"batch record count must be 1..{MAX_RECORDS_PER_BATCH}, found {h.record_count}"
        )
    if not 1 <= h.first_seq <= MAX_SEQ - h.record_count + 1:
        raise MalformedError(
            f"batch seqs must lie in 1..{MAX_SEQ}, found first_seq={h.first_seq} "
            f"with {h.record_count} records"
        )
    if not 0 <= h.first_capture_ns <= h.last_capture_ns <= MAX_TIME_NS:
        raise MalformedError(
            "batch capture times must satisfy 0 <= first <= last < 2**63, "
            f"found first={h.first_capture_ns} last={h.last_capture_ns}"
        )
    if not 0 <= h.payload_len <= MAX_BATCH_PAYLOAD:
        raise LimitExceededError(
            f"batch payload may be at most {MAX_BATCH_PAYLOAD} bytes, found {h.payload_len}",
            details={"max_payload_bytes": MAX_BATCH_PAYLOAD},
        )
    check_payload_layout(h.payload_len, h.data_len, h.record_count, what="batch")
    if len(h.payload_xxh3_128) != 16:
        raise MalformedError(f"payload digest must be 16 bytes, found {len(h.payload_xxh3_128)}")


@dataclass(frozen=True, slots=True)
class Batch:
    """One verified batch: its header, its payload bytes and its records.

    ``payload`` is kept so the process server can seal it into an HRL file
    without encoding the records again; WRITE data are views into it.
    """

    header: BatchHeader
    payload: bytes
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """One batch laid out for sending: its header and its payload's pieces.

    WRITE data is referenced, not copied, so a sender can stream 32 MiB of
    writes without building the body in memory. The payload is ``data``
    back to back, then ``table`` (protocol/records.py).
    """

    header: BatchHeader
    data: tuple[Buffer, ...]
    table: bytes

    @property
    def segments(self) -> list[Buffer]:
        """The whole batch as buffers to send back to back, header first."""
        return [self.header.pack(), *self.data, self.table]

    @property
    def wire_bytes(self) -> int:
        """Bytes of the batch on the wire: header and payload."""
        return BATCH_HEADER.size + self.header.payload_len


def lay_out_batch(
    *,
    disk_id: str,
    generation: int,
    first_seq: int,
    records: Sequence[Record],
    first_capture_ns: int,
    last_capture_ns: int,
    flags: StreamFlags = NO_FLAGS,
) -> EncodedBatch:
    """Lay records out as one batch, keeping the pieces apart.

    Raises:
        MalformedError, LimitExceededError: a field or record breaks a rule
            (every field is checked here, before a byte is sent or stored).
    """
    encoded = encode_records(records)
    digest = xxhash.xxh3_128()
    for part in encoded.segments:
        digest.update(part)
    header = BatchHeader(
        disk_id=disk_id,
        generation=generation,
        first_seq=first_seq,
        record_count=len(records),
        first_capture_ns=first_capture_ns,
        last_capture_ns=last_capture_ns,
        payload_len=encoded.payload_len,
        payload_xxh3_128=digest.digest(),
        data_len=encoded.data_len,
        flags=flags,
    )
    header.pack()  # checks every field
    return EncodedBatch(header, tuple(encoded.data), encoded.table)


def encode_batch(
    *,
    disk_id: str,
    generation: int,
    first_seq: int,
    records: Sequence[Record],
    first_capture_ns: int,
    last_capture_ns: int,
    flags: StreamFlags = NO_FLAGS,
) -> bytes:
    """Encode one batch as bytes. See :func:`lay_out_batch`."""
    batch = lay_out_batch(
        disk_id=disk_id,
        generation=generation,
        first_seq=first_seq,
        records=records,
        first_capture_ns=first_capture_ns,
        last_capture_ns=last_capture_ns,
        flags=flags,
    )
    return b"".join(batch.segments)


def check_payload(header: BatchHeader, payload: Buffer) -> None:
    """Refuse a payload whose XXH3-128 is not the one its header holds.

    Raises:
        ChecksumMismatchError: it is not.
    """
    actual = xxhash.xxh3_128_digest(payload)
    if actual != header.payload_xxh3_128:
        raise ChecksumMismatchError(
            f"batch seq {header.first_seq} payload xxh3-128 must be "
            f"{header.payload_xxh3_128.hex()}, found {actual.hex()}"
        )


def check_whole_batch(data: Buffer) -> BatchHeader:
    """Check that ``data`` is one batch, whole, and return its header.

    The header and the payload's digest are checked; the records are not
    decoded, for a reader that keeps or sends the batch on as it is.

    Raises:
        TruncatedError: ``data`` ends before the payload does.
        MalformedError: bytes follow the payload.
        BadMagicError, UnsupportedVersionError, ChecksumMismatchError,
        LimitExceededError: as :func:`unpack_header` and :func:`check_payload`.
    """
    header = unpack_header(data)
    expected = BATCH_HEADER.size + header.payload_len
    if len(data) != expected:
        error = TruncatedError if len(data) < expected else MalformedError
        raise error(
            f"batch seq {header.first_seq} must be {expected} bytes (header and payload), "
            f"found {len(data)}"
        )
    check_payload(header, memoryview(data)[BATCH_HEADER.size :])
    return header


class Sentinel(enum.Enum):
    """What :meth:`BatchDecoder.next_event` returns when it has no batch to give."""

    #: feed more bytes (or call feed_eof) and ask again
    NEED_DATA = "NEED_DATA"
    #: the input ended cleanly between two batches
    END_OF_STREAM = "END_OF_STREAM"


NEED_DATA: Final = Sentinel.NEED_DATA
END_OF_STREAM: Final = Sentinel.END_OF_STREAM

BatchEvent = Batch | Literal[Sentinel.NEED_DATA, Sentinel.END_OF_STREAM]


class BatchDecoder(headers.FailsOnce):
    """Incremental decoder of a stream of batches. Bytes in, :class:`Batch` events out.

    Feed bytes as they arrive with :meth:`feed`, the end of input with
    :meth:`feed_eof`, and call :meth:`next_event` until it returns NEED_DATA or
    END_OF_STREAM. Memory is bounded by one header plus one payload of at most
    ``max_payload`` bytes, plus whatever the caller feeds at once.

    Args:
        expected_disk_id: refuse any batch for another disk as soon as its
            header arrives (the process server knows the disk from the URL).
        max_payload: a lower payload limit than the format's, for a server
            that wants less in memory per request.

    After a decoder raises it is unusable: every later call raises
    DecoderFailedError, because the position in the stream is lost.
    """

    def __init__(
        self, *, expected_disk_id: str | None = None, max_payload: int = MAX_BATCH_PAYLOAD
    ) -> None:
        self._expected_disk_id = expected_disk_id
        self._max_payload = min(max_payload, MAX_BATCH_PAYLOAD)
        self._queue = ChunkQueue()
        self._header: BatchHeader | None = None
        self._eof = False
        self._name = "batch decoder"
        #: bytes of the stream consumed by complete batches, for error messages
        self.consumed = 0
        #: batches returned so far
        self.batches = 0

    def feed(self, data: Buffer) -> None:
        """Add bytes from the stream.

        Raises:
            DecoderFailedError: the decoder raised before.
            ProtocolError: bytes after :meth:`feed_eof`.
        """
        self._check_usable()
        if self._eof:
            self._fail(ProtocolError("batch stream: bytes fed after the end of input"))
        self._queue.append(data)

    def feed_eof(self) -> None:
        """Mark the end of input; a batch left unfinished is then an error."""
        self._check_usable()
        self._eof = True

    def next_event(self) -> BatchEvent:
        """The next verified batch, or NEED_DATA, or END_OF_STREAM.

        Raises:
            ProtocolError: the stream breaks a rule of the format; the
                decoder is unusable afterwards.
        """
        return self._step(self._next)

    def events(self) -> Iterator[Batch]:
        """Every batch available now, stopping at NEED_DATA or END_OF_STREAM."""
        while isinstance(event := self.next_event(), Batch):
            yield event

    def _next(self) -> BatchEvent:
        if self._header is None:
            if not self._queue:
                return END_OF_STREAM if self._eof else NEED_DATA
            prefix = self._queue.peek(len(BATCH_MAGIC))
            if not BATCH_MAGIC.startswith(prefix):
                raise BadMagicError(
                    f"batch {self.batches} at stream byte {self.consumed} must start with "
                    f"{BATCH_MAGIC!r}, found {prefix!r}"
                )
            if len(self._queue) < BATCH_HEADER.size:
                return self._need(f"header of batch {self.batches}")
            header = unpack_header(self._queue.peek(BATCH_HEADER.size))
            self._admit(header)
            self._queue.take(BATCH_HEADER.size)
            self._header = header
        header = self._header
        if len(self._queue) < header.payload_len:
            return self._need(f"payload of batch seq {header.first_seq}")
        payload = self._queue.take(header.payload_len)
        check_payload(header, payload)
        records = decode_records(
            payload, header.record_count, header.data_len, what=f"batch seq {header.first_seq}"
        )
        self._header = None
        self.consumed += BATCH_HEADER.size + header.payload_len
        self.batches += 1
        return Batch(header, payload, records)

    def _admit(self, header: BatchHeader) -> None:
        if self._expected_disk_id is not None and header.disk_id != self._expected_disk_id:
            raise MalformedError(
                f"batch is for disk {self._expected_disk_id!r}, found disk {header.disk_id!r}",
                details={"expected_disk": self._expected_disk_id, "found_disk": header.disk_id},
            )
        if header.payload_len > self._max_payload:
            raise LimitExceededError(
                f"batch payload may be at most {self._max_payload} bytes here, "
                f"found {header.payload_len}",
                details={"max_payload_bytes": self._max_payload},
            )

    def _need(self, what: str) -> BatchEvent:
        if self._eof:
            raise TruncatedError(
                f"batch stream ended inside the {what} ({len(self._queue)} bytes of it present)"
            )
        return NEED_DATA
