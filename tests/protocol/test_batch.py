"""The batch wire format: expected bytes, incremental decoding, tampering, fuzzing."""

from __future__ import annotations

import contextlib
import struct

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.batch import (
    BATCH_HEADER,
    END_OF_STREAM,
    NEED_DATA,
    Batch,
    BatchDecoder,
    BatchHeader,
    check_whole_batch,
    encode_batch,
    lay_out_batch,
    unpack_header,
)
from protocol.errors import (
    BadMagicError,
    ChecksumMismatchError,
    DecoderFailedError,
    LimitExceededError,
    MalformedError,
    ProtocolError,
    TruncatedError,
    UnsupportedVersionError,
)
from protocol.limits import MAX_BATCH_PAYLOAD, MAX_RECORDS_PER_BATCH
from protocol.records import Record, StreamFlags, Tag, TagKind, Write, Zero

from .strategies import ids, record_lists

RECORDS: list[Record] = [
    Write(0x10000, b"\xaa" * 8),
    Zero(0x20000, 0x1000),
    Tag(TagKind.CRASH, bytes(16), "t1", 5),
]


def _encode(records: list[Record] = RECORDS, **kw: object) -> bytes:
    args: dict[str, object] = {
        "disk_id": "vm01-disk0", "generation": 3, "first_seq": 100, "records": records,
        "first_capture_ns": 1_000, "last_capture_ns": 2_000,
    }  # fmt: skip
    args.update(kw)
    return encode_batch(**args)  # type: ignore[arg-type]


def _expected_batch() -> bytes:
    """The bytes of _encode(), written out field by field from docs/protocol.md."""
    data = b"\xaa" * 8
    table = (
        bytes.fromhex("01000000" "08000000") + (0x10000).to_bytes(8, "little")
        + bytes.fromhex("02" "00000000000000") + (0x20000).to_bytes(8, "little")
        + (0x1000).to_bytes(8, "little")
        + bytes.fromhex("03" "01" "02" "00" "00000000") + bytes(16) + (5).to_bytes(8, "little")
        + b"t1"
    )  # fmt: skip
    payload = data + table
    head = (
        b"BRB1" + bytes([1, 0, 10, 0]) + b"vm01-disk0".ljust(64, b"\0")
        + (3).to_bytes(8, "little") + (100).to_bytes(8, "little")
        + (3).to_bytes(4, "little") + (8).to_bytes(4, "little")
        + (1000).to_bytes(8, "little") + (2000).to_bytes(8, "little")
        + len(payload).to_bytes(8, "little") + xxhash.xxh3_128_digest(payload)
    )  # fmt: skip
    assert len(head) == 136
    return head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little") + payload


def _decode_all(data: bytes, *, chunk: int | None = None, **kw: object) -> list[Batch]:
    decoder = BatchDecoder(**kw)  # type: ignore[arg-type]
    out: list[Batch] = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        decoder.feed(data[i : i + step])
        out.extend(decoder.events())
    decoder.feed_eof()
    out.extend(decoder.events())
    assert decoder.next_event() is END_OF_STREAM
    return out


def test_encoder_writes_the_documented_bytes() -> None:
    assert _encode() == _expected_batch()


def test_decoder_reads_the_documented_bytes() -> None:
    (batch,) = _decode_all(_expected_batch())
    assert batch.records == tuple(RECORDS)
    assert batch.header == BatchHeader(
        disk_id="vm01-disk0", generation=3, first_seq=100, record_count=3,
        first_capture_ns=1000, last_capture_ns=2000, payload_len=len(batch.payload),
        payload_xxh3_128=xxhash.xxh3_128_digest(batch.payload), data_len=8,
    )  # fmt: skip
    assert batch.header.last_seq == 102


@pytest.mark.parametrize("chunk", [None, 1, 7, 144, 145])
def test_several_batches_in_one_body_at_any_chunking(chunk: int | None) -> None:
    body = _encode() + _encode(first_seq=103, records=[Write(0, b"z")]) + _encode(first_seq=104)
    batches = _decode_all(body, chunk=chunk)
    assert [b.header.first_seq for b in batches] == [100, 103, 104]
    assert batches[1].records == (Write(0, b"z"),)


def test_byte_at_a_time_yields_nothing_early() -> None:
    body = _encode()
    decoder = BatchDecoder()
    for i, byte in enumerate(body):
        decoder.feed(bytes([byte]))
        event = decoder.next_event()
        if i < len(body) - 1:
            assert event is NEED_DATA
    assert isinstance(event, Batch)


@pytest.mark.parametrize("garbage", [b"X", b"BRB", b"BRB1", b"\0" * 200, b"hello world"])
def test_trailing_garbage_is_refused(garbage: bytes) -> None:
    decoder = BatchDecoder()
    decoder.feed(_encode() + garbage)
    assert isinstance(decoder.next_event(), Batch)
    decoder.feed_eof()
    with pytest.raises((BadMagicError, TruncatedError)):
        decoder.next_event()


def test_empty_body_is_a_clean_end() -> None:
    assert _decode_all(b"") == []


def test_eof_inside_payload_is_truncation() -> None:
    decoder = BatchDecoder()
    decoder.feed(_encode()[:-1])
    assert decoder.next_event() is NEED_DATA
    decoder.feed_eof()
    with pytest.raises(TruncatedError, match="payload"):
        decoder.next_event()


def test_bad_magic_fails_on_the_first_byte() -> None:
    decoder = BatchDecoder()
    decoder.feed(b"G")
    with pytest.raises(BadMagicError):
        decoder.next_event()


def test_failed_decoder_stays_failed() -> None:
    decoder = BatchDecoder()
    decoder.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(BadMagicError):
        decoder.next_event()
    with pytest.raises(DecoderFailedError):
        decoder.next_event()
    with pytest.raises(DecoderFailedError):
        decoder.feed(_encode())


def test_bytes_after_eof_are_refused() -> None:
    decoder = BatchDecoder()
    decoder.feed_eof()
    with pytest.raises(ProtocolError, match="after the end"):
        decoder.feed(b"x")


def test_wrong_disk_is_refused_before_the_payload_arrives() -> None:
    decoder = BatchDecoder(expected_disk_id="other")
    decoder.feed(_encode()[: BATCH_HEADER.size])
    with pytest.raises(MalformedError, match="'other'"):
        decoder.next_event()


def test_server_payload_limit_is_checked_on_the_header() -> None:
    decoder = BatchDecoder(max_payload=64)
    decoder.feed(_encode(records=[Write(0, b"x" * 100)])[: BATCH_HEADER.size])
    with pytest.raises(LimitExceededError):
        decoder.next_event()


def test_payload_bit_flip_is_detected() -> None:
    body = bytearray(_encode())
    body[BATCH_HEADER.size + 3] ^= 0x01
    with pytest.raises(ChecksumMismatchError, match="payload"):
        _decode_all(bytes(body))


def test_the_laid_out_pieces_are_the_encoded_bytes() -> None:
    batch = lay_out_batch(
        disk_id="vm01-disk0", generation=3, first_seq=100, records=RECORDS,
        first_capture_ns=1_000, last_capture_ns=2_000,
    )  # fmt: skip
    assert b"".join(batch.segments) == _expected_batch()
    assert batch.wire_bytes == len(_expected_batch())
    assert batch.data == (b"\xaa" * 8,)  # referenced, not copied into a body


def test_a_whole_batch_is_checked_without_its_records() -> None:
    body = _expected_batch()
    assert check_whole_batch(body) == unpack_header(body)
    with pytest.raises(TruncatedError, match=f"must be {len(body)} bytes"):
        check_whole_batch(body[:-1])
    with pytest.raises(MalformedError, match=f"found {len(body) + 1}"):
        check_whole_batch(body + b"\0")
    flipped = bytearray(body)
    flipped[BATCH_HEADER.size] ^= 0x01
    with pytest.raises(ChecksumMismatchError, match="payload"):
        check_whole_batch(bytes(flipped))
    with pytest.raises(TruncatedError, match="header"):
        check_whole_batch(body[:100])


# Each header field: its byte range and the error when its value changes but
# the header checksum is recomputed (a buggy peer, not a bit flip).
HEADER_FIELDS = {
    "magic": (0, 4, BadMagicError),
    "version": (4, 5, UnsupportedVersionError),
    "flags": (5, 6, MalformedError),
    "disk_id_len": (6, 7, MalformedError),
    "reserved": (7, 8, MalformedError),
    "disk_id": (8, 72, MalformedError),
    "generation": (72, 80, MalformedError),
    "first_seq": (80, 88, MalformedError),
    "record_count": (88, 92, (LimitExceededError, MalformedError)),
    "data_len": (92, 96, MalformedError),
    "capture_times": (96, 112, MalformedError),
    "payload_len": (112, 120, LimitExceededError),
    "payload_xxh3_128": (120, 136, ChecksumMismatchError),
}


def _reseal(head: bytearray) -> bytes:
    head[136:144] = xxhash.xxh3_64_intdigest(bytes(head[:136])).to_bytes(8, "little")
    return bytes(head)


@pytest.mark.parametrize("field", list(HEADER_FIELDS))
def test_every_header_field_bit_flip_is_caught_by_the_header_checksum(field: str) -> None:
    start, end, _ = HEADER_FIELDS[field]
    body = bytearray(_encode())
    for pos in range(start, end):
        flipped = bytearray(body)
        flipped[pos] ^= 0x10
        with pytest.raises(ProtocolError):
            _decode_all(bytes(flipped))


INVALID_VALUES = {
    "magic": b"BRH1",
    "version": b"\x02",
    "flags": b"\x80",
    "disk_id_len": b"\x41",
    "reserved": b"\x01",
    "disk_id": b"vm/1".ljust(64, b"\0"),
    "generation": (0).to_bytes(8, "little"),
    "first_seq": (0).to_bytes(8, "little"),
    "record_count": (MAX_RECORDS_PER_BATCH + 1).to_bytes(4, "little"),
    "data_len": (2**31).to_bytes(4, "little"),
    "capture_times": (5).to_bytes(8, "little") + (4).to_bytes(8, "little"),
    "payload_len": (MAX_BATCH_PAYLOAD + 1).to_bytes(8, "little"),
    "payload_xxh3_128": bytes(16),
}


@pytest.mark.parametrize("field", list(HEADER_FIELDS))
def test_every_header_field_with_an_invalid_value_is_refused(field: str) -> None:
    start, end, error = HEADER_FIELDS[field]
    body = bytearray(_encode())
    head = bytearray(body[: BATCH_HEADER.size])
    head[start:end] = INVALID_VALUES[field]
    with pytest.raises(error):
        _decode_all(_reseal(head) + bytes(body[BATCH_HEADER.size :]))


def test_header_checksum_mismatch_names_both_values() -> None:
    body = bytearray(_encode())
    body[140] ^= 0xFF
    with pytest.raises(ChecksumMismatchError, match="header checksum must be"):
        unpack_header(body)


def test_padding_after_disk_id_must_be_zero() -> None:
    head = bytearray(_encode()[: BATCH_HEADER.size])
    head[8 + 10] = ord("x")  # after the 10-byte id
    with pytest.raises(MalformedError, match="padding"):
        unpack_header(_reseal(head))


def test_resync_end_needs_resync() -> None:
    with pytest.raises(MalformedError, match="RESYNC_END requires RESYNC"):
        _encode(flags=StreamFlags.RESYNC_END)
    both = StreamFlags.RESYNC | StreamFlags.RESYNC_END
    (batch,) = _decode_all(_encode(flags=both))
    assert batch.header.flags == both


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"disk_id": ""}, MalformedError),
        ({"disk_id": "x" * 65}, MalformedError),
        ({"disk_id": ".."}, MalformedError),
        ({"generation": 0}, MalformedError),
        ({"first_seq": 2**63 - 2}, MalformedError),
        ({"records": []}, LimitExceededError),
        ({"first_capture_ns": 3, "last_capture_ns": 2}, MalformedError),
        ({"records": [Write(i * 4, b"x" * 4 * 2**20) for i in range(9)]}, LimitExceededError),
    ],
)
def test_encoder_refuses_bad_batches(kw: dict[str, object], error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        _encode(**kw)


def test_header_struct_is_144_bytes() -> None:
    assert BATCH_HEADER.size == 144
    assert struct.calcsize("<4sBBBB64sQQIIQQQ16sQ") == 144


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(records=record_lists, disk=ids, gen=st.integers(1, 2**63 - 1), seq=st.integers(1, 2**40),
       chunk=st.integers(1, 4096))  # fmt: skip
def test_round_trip(records: list[Record], disk: str, gen: int, seq: int, chunk: int) -> None:
    body = _encode(records, disk_id=disk, generation=gen, first_seq=seq)
    (batch,) = _decode_all(body, chunk=chunk)
    assert batch.records == tuple(records)
    assert (batch.header.disk_id, batch.header.generation, batch.header.first_seq) == (
        disk, gen, seq,
    )  # fmt: skip


@settings(max_examples=400)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        _decode_all(data, chunk=37)


@settings(max_examples=400)
@given(data=st.data())
def test_mutated_batches_raise_only_protocol_errors(data: st.DataObject) -> None:
    body = bytearray(_encode())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(body) - 1))
        body[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):  # make header mutations reach the field checks
        body[:144] = _reseal(bytearray(body[:144]))
    cut = data.draw(st.integers(0, len(body)))
    chunk = data.draw(st.integers(1, 64))
    with contextlib.suppress(ProtocolError):
        _decode_all(bytes(body[:cut]), chunk=chunk)
