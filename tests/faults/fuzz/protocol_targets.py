"""Fuzz targets for the formats of protocol/: batches, HRL files, undo files, records."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

import xxhash
import zstandard

from protocol.batch import END_OF_STREAM, NEED_DATA, Batch, BatchDecoder, encode_batch
from protocol.errors import ProtocolError
from protocol.hrl import HrlSealer, open_hrl
from protocol.hrl_receiver import FileReceived, HeaderReady, HrlReceiver
from protocol.limits import MAX_HRL_PLAINTEXT, MAX_RECORDS_PER_HRL
from protocol.records import Record, Write, Zero, decode_records, encode_records
from protocol.undo import MAX_UNDO_PLAINTEXT, MAX_UNDO_RECORDS, open_undo, seal_undo
from tests.faults.fuzz.harness import (
    DISK,
    KEYRING,
    RECORD_BYTES,
    SAMPLE_RECORDS,
    Target,
    check_declared,
    corpus_files,
    kept_and_made,
    stays_failed,
)
from tests.faults.fuzz.inputs import (
    HRL_LAYOUT,
    UNDO_LAYOUT,
    StreamInput,
    fed,
    file_input,
    parse_file,
    parse_stream,
    reseal_batches,
    seal_file,
    stream_input,
    unseal_file,
)

# --- batch: the bodies agents send the process server -----------------------------

#: Feeding a body whole, in one piece.
WHOLE: Final = StreamInput((), reseal=False, reuse=False, body=b"")


def run_batch(data: bytes) -> None:
    """A stream input (inputs.py) of request bodies for disk vm01-d0: fed whole and as cut."""
    stream = parse_stream(data)
    body = reseal_batches(stream.body) if stream.reseal else stream.body
    whole = _decode_batches(body, WHOLE)
    if stream.pieces or stream.reuse:
        in_pieces = _decode_batches(body, stream)
        assert in_pieces == whole, (
            f"fed whole: {whole[1]} after {len(whole[0])} batches; fed in pieces of "
            f"{stream.pieces} (reused buffer: {stream.reuse}): {in_pieces[1]} after "
            f"{len(in_pieces[0])} batches"
        )


def _decode_batches(body: bytes, stream: StreamInput) -> tuple[list[Batch], str]:
    """The batches of ``body`` fed as ``stream`` says, and how it ended: an error code or "end"."""
    decoder = BatchDecoder(expected_disk_id=DISK)
    batches: list[Batch] = []
    try:
        for piece in fed(stream, body):
            decoder.feed(piece)
            batches.extend(decoder.events())
        decoder.feed_eof()
        batches.extend(decoder.events())
        end = decoder.next_event()
    except ProtocolError as exc:
        check_declared(exc)
        stays_failed(decoder.next_event)
        return batches, exc.code
    assert end is END_OF_STREAM, f"after the end of input the decoder said {end}"
    return batches, "end"


def _kept_batch(data: bytes) -> bytes:
    stream = parse_stream(data)
    return reseal_batches(stream.body) if stream.reseal else stream.body


def _batch_seeds() -> Iterator[bytes]:
    bodies = [path.read_bytes() for path in corpus_files("batch")]
    one = encode_batch(disk_id=DISK, generation=1, first_seq=1, records=SAMPLE_RECORDS,
                       first_capture_ns=1, last_capture_ns=2)  # fmt: skip
    two = one + encode_batch(disk_id=DISK, generation=1, first_seq=6, records=SAMPLE_RECORDS[:1],
                             first_capture_ns=3, last_capture_ns=3)  # fmt: skip
    for body in [*bodies, one, two]:
        yield stream_input(body)
        yield stream_input(body, reseal=True)
    yield stream_input(two, (1,))
    yield stream_input(two, (7, 0, 150), reuse=True)


# --- HRL files: what the master target receives, keeps and applies ---------------------


def run_hrl(data: bytes) -> None:
    """A stream input of one HRL file: through the receiver as cut, then opened whole."""
    stream = parse_stream(data)
    body = seal_file(stream.body, HRL_LAYOUT, KEYRING) if stream.reseal else stream.body
    received = _receive_hrl(body, stream)
    try:
        opened = open_hrl(body, KEYRING)
    except ProtocolError as exc:
        check_declared(exc)
        return
    assert received == body, "the receiver refused a file that opens"
    assert len(opened.records) == opened.header.record_count


def _receive_hrl(body: bytes, stream: StreamInput) -> bytes | None:
    """The file the receiver hands out, or None when it refused the bytes."""
    receiver = HrlReceiver()
    events: list[object] = []
    try:
        for piece in fed(stream, body):
            receiver.feed(piece)
            _drain(receiver, events)
        receiver.feed_eof()
        end = _drain(receiver, events)
    except ProtocolError as exc:
        check_declared(exc)
        stays_failed(receiver.next_event)
        return None
    assert end is END_OF_STREAM, f"after the end of input the receiver said {end}"
    header, received = events
    assert isinstance(header, HeaderReady), events
    assert isinstance(received, FileReceived), events
    assert received.data == body, "the receiver handed out other bytes than it was fed"
    assert received.header == header.header
    return received.data


def _drain(receiver: HrlReceiver, events: list[object]) -> object:
    """Take events up to NEED_DATA or END_OF_STREAM, which is returned."""
    while len(events) <= 2:
        event = receiver.next_event()
        if event is NEED_DATA or event is END_OF_STREAM:
            return event
        events.append(event)
    raise AssertionError(f"the receiver gave more than a header and a file: {events}")


def _kept_hrl(data: bytes) -> bytes:
    stream = parse_stream(data)
    return seal_file(stream.body, HRL_LAYOUT, KEYRING) if stream.reseal else stream.body


def _hrl_seeds() -> Iterator[bytes]:
    sealer = HrlSealer(KEYRING)
    made = [
        sealer.seal_records(
            list(records), disk_id=DISK, generation=1, first_seq=1, first_capture_ns=1,
            last_capture_ns=2, receive_ns=3, salt=bytes(32),
        ).to_bytes()
        for records in (SAMPLE_RECORDS, _incompressible())
    ]  # fmt: skip
    for body in [*(path.read_bytes() for path in corpus_files("hrl")), *made]:
        yield stream_input(body)
        unsealed = unseal_file(body, HRL_LAYOUT, KEYRING)
        if unsealed is not None:
            yield stream_input(unsealed, reseal=True)
    yield stream_input(made[0], (100, 0, 1), reuse=True)


def _incompressible() -> tuple[Record, ...]:
    """Records zstd cannot shrink, so their file is stored without compression."""
    noise = b"".join(xxhash.xxh3_128_digest(bytes([n])) for n in range(40))
    return (Write(8192, noise), Zero(0, 4096))


# --- undo files: before-images in the master target's retention journal -------------


def run_undo(data: bytes) -> None:
    """A file input (inputs.py) of one undo file, opened with KEYRING."""
    file = parse_file(data)
    body = seal_file(file.body, UNDO_LAYOUT, KEYRING) if file.reseal else file.body
    opened = open_undo(body, KEYRING)
    assert len(opened.records) == opened.header.record_count


def _undo_seeds() -> Iterator[bytes]:
    compressor = zstandard.ZstdCompressor(level=1, write_checksum=False)
    for records in (SAMPLE_RECORDS[:2], _incompressible()):
        body = seal_undo(list(records), keyring=KEYRING, compressor=compressor, disk_id=DISK,
                         generation=1, first_seq=5, last_seq=9, chunk=0, chunks=1,
                         capture_ns=7, salt=bytes(range(32)))  # fmt: skip
        yield file_input(body)
        unsealed = unseal_file(body, UNDO_LAYOUT, KEYRING)
        assert unsealed is not None
        yield file_input(unsealed, reseal=True)


# --- records: the payload of every batch, HRL and undo file --------------------------

#: record_count - 1 (u16) || data_len (u32), then the payload.
RECORDS_PREFIX: Final = struct.Struct("<HI")


def run_records(data: bytes) -> None:
    """``RECORDS_PREFIX || payload``: a payload of records with its header's count and data_len."""
    if len(data) < RECORDS_PREFIX.size:
        return
    count, data_len = RECORDS_PREFIX.unpack_from(data)
    payload = data[RECORDS_PREFIX.size :]
    records = decode_records(payload, count + 1, data_len, what="fuzzed payload")
    try:
        encoded = encode_records(records)
    except ProtocolError as exc:
        raise AssertionError(f"records that decode do not encode: {exc}") from exc
    assert (b"".join(encoded.segments), encoded.data_len) == (payload, data_len), (
        "records re-encode to other bytes: the payload had two encodings"
    )


def _records_seeds() -> Iterator[bytes]:
    for end in range(1, len(SAMPLE_RECORDS) + 1):
        encoded = encode_records(SAMPLE_RECORDS[:end])
        yield RECORDS_PREFIX.pack(end - 1, encoded.data_len) + b"".join(encoded.segments)


BATCH: Final = Target(
    "batch", run_batch, _batch_seeds, (ProtocolError,), corpus="batch", kept=_kept_batch
)
HRL: Final = Target(
    "hrl", run_hrl, _hrl_seeds, (ProtocolError,),
    held_bytes=MAX_HRL_PLAINTEXT + MAX_RECORDS_PER_HRL * RECORD_BYTES,
    corpus="hrl", kept=_kept_hrl,
)  # fmt: skip
UNDO: Final = Target(
    "undo", run_undo, kept_and_made("undo", _undo_seeds), (ProtocolError,),
    held_bytes=MAX_UNDO_PLAINTEXT + MAX_UNDO_RECORDS * RECORD_BYTES, corpus="undo",
)  # fmt: skip
RECORDS: Final = Target(
    "records", run_records, kept_and_made("records", _records_seeds), (ProtocolError,),
    corpus="records",
)  # fmt: skip
