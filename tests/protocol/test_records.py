"""Records: expected bytes both ways, and every rule of the table."""

from __future__ import annotations

import struct

import pytest

from protocol.errors import LimitExceededError, MalformedError, ProtocolError, TruncatedError
from protocol.limits import MAX_DISK_BYTES, MAX_WRITE_BYTES, MAX_ZERO_BYTES
from protocol.records import (
    ZERO_COMPARE_BYTES,
    Record,
    Tag,
    TagKind,
    Write,
    Zero,
    check_payload_layout,
    decode_records,
    encode_records,
    is_zero,
)

TAG_ID = bytes(range(16))

# (records, data area, table) written out by hand from docs/protocol.md.
VECTORS: list[tuple[list[Record], bytes, bytes]] = [
    (
        [Write(0x1000, b"abc")],
        b"abc",
        bytes.fromhex("01000000030000000010000000000000"),
    ),
    (
        [Zero(0x200, 0x10000)],
        b"",
        bytes.fromhex("020000000000000000020000000000000000010000000000"),
    ),
    (
        [Tag(TagKind.APP, TAG_ID, "pre-upgrade", 7)],
        b"",
        bytes.fromhex("03020b0000000000") + TAG_ID + (7).to_bytes(8, "little") + b"pre-upgrade",
    ),
    (
        [Tag(TagKind.GROUP, TAG_ID, "", 1, "erp")],
        b"",
        bytes.fromhex("0303000300000000") + TAG_ID + (1).to_bytes(8, "little") + b"erp",
    ),
    (
        [Write(1, b"x"), Zero(2, 3), Write(9, b"yz")],
        b"xyz",
        bytes.fromhex("01000000010000000100000000000000")
        + bytes.fromhex("020000000000000002000000000000000300000000000000")
        + bytes.fromhex("01000000020000000900000000000000"),
    ),
]


@pytest.mark.parametrize(("records", "data", "table"), VECTORS)
def test_encode_matches_expected_bytes(records: list[Record], data: bytes, table: bytes) -> None:
    encoded = encode_records(records)
    assert b"".join(encoded.data) == data
    assert encoded.table == table
    assert encoded.data_len == len(data)
    assert b"".join(encoded.segments) == data + table


@pytest.mark.parametrize(("records", "data", "table"), VECTORS)
def test_decode_expected_bytes(records: list[Record], data: bytes, table: bytes) -> None:
    assert decode_records(data + table, len(records), len(data), what="t") == tuple(records)


def test_write_data_is_a_view_not_a_copy() -> None:
    payload = b"hello" + bytes.fromhex("01000000050000000000000000000000")
    (record,) = decode_records(payload, 1, 5, what="t")
    assert isinstance(record, Write)
    assert isinstance(record.data, memoryview)
    assert record.data.obj is payload


def _one(table: bytes, data: bytes = b"", count: int = 1) -> tuple[Record, ...]:
    return decode_records(data + table, count, len(data), what="t")


BAD_TABLES: list[tuple[str, bytes, bytes, int, type[ProtocolError], str]] = [
    ("unknown type", b"\x09" + bytes(15), b"", 1, MalformedError, "record type"),
    ("type zero", bytes(16), b"", 1, MalformedError, "record type"),
    ("write reserved", bytes.fromhex("01010000" "01000000" "0000000000000000"), b"x", 1,
     MalformedError, "reserved"),
    ("write empty", bytes.fromhex("01000000" "00000000" "0000000000000000"), b"", 1,
     MalformedError, "length >= 1"),
    ("write past data area", bytes.fromhex("01000000" "02000000" "0000000000000000"), b"x", 1,
     MalformedError, "data area"),
    ("write too long", struct.pack("<B3sIQ", 1, b"", MAX_WRITE_BYTES + 1, 0), b"", 1,
     LimitExceededError, "at most"),
    ("write past disk end", struct.pack("<B3sIQ", 1, b"", 1, MAX_DISK_BYTES), b"x", 1,
     LimitExceededError, "end at or before"),
    ("data area unused", bytes.fromhex("01000000" "01000000" "0000000000000000"), b"xy", 1,
     MalformedError, "unused"),
    ("zero reserved", struct.pack("<B7sQQ", 2, b"\0\0\0\1\0\0\0", 0, 1), b"", 1,
     MalformedError, "reserved"),
    ("zero empty", struct.pack("<B7sQQ", 2, b"", 0, 0), b"", 1, MalformedError, "length >= 1"),
    ("zero too long", struct.pack("<B7sQQ", 2, b"", 0, MAX_ZERO_BYTES + 1), b"", 1,
     LimitExceededError, "at most"),
    ("zero truncated", struct.pack("<B7sQQ", 2, b"", 0, 1)[:20], b"", 1, TruncatedError, "needs"),
    ("tag bad kind", struct.pack("<BBBBI16sQ", 3, 9, 0, 0, 0, TAG_ID, 0), b"", 1,
     MalformedError, "tag kind"),
    ("tag reserved", struct.pack("<BBBBI16sQ", 3, 1, 0, 0, 5, TAG_ID, 0), b"", 1,
     MalformedError, "reserved"),
    ("tag name cut", struct.pack("<BBBBI16sQ", 3, 1, 4, 0, 0, TAG_ID, 0) + b"ab", b"", 1,
     TruncatedError, "name and group"),
    ("tag bad utf8", struct.pack("<BBBBI16sQ", 3, 1, 1, 0, 0, TAG_ID, 0) + b"\xff", b"", 1,
     MalformedError, "UTF-8"),
    ("tag control char", struct.pack("<BBBBI16sQ", 3, 1, 1, 0, 0, TAG_ID, 0) + b"\n", b"", 1,
     MalformedError, "control"),
    ("group tag without group", struct.pack("<BBBBI16sQ", 3, 3, 0, 0, 0, TAG_ID, 0), b"", 1,
     MalformedError, "GROUP tag"),
    ("crash tag with group", struct.pack("<BBBBI16sQ", 3, 1, 0, 1, 0, TAG_ID, 0) + b"g", b"", 1,
     MalformedError, "GROUP tag"),
    ("tag group bad id", struct.pack("<BBBBI16sQ", 3, 3, 0, 1, 0, TAG_ID, 0) + b"/", b"", 1,
     MalformedError, "group id"),
    ("tag time too big", struct.pack("<BBBBI16sQ", 3, 1, 0, 0, 0, TAG_ID, 2**63), b"", 1,
     MalformedError, "tag time"),
    ("fewer records than declared", bytes.fromhex("01000000" "01000000" "0000000000000000"), b"x",
     2, TruncatedError, "table ends after 1"),
    ("bytes after last record", bytes.fromhex("01000000" "01000000" "0000000000000000") + b"\0",
     b"x", 1, MalformedError, "after the last"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "table", "data", "count", "error", "text"), BAD_TABLES, ids=[t[0] for t in BAD_TABLES]
)
def test_bad_tables_are_refused(
    name: str, table: bytes, data: bytes, count: int, error: type[ProtocolError], text: str
) -> None:
    with pytest.raises(error, match=text):
        _one(table, data, count)


def test_data_len_outside_payload() -> None:
    with pytest.raises(MalformedError, match="data area must lie inside"):
        decode_records(b"abc", 1, 4, what="t")


@pytest.mark.parametrize(
    "record",
    [
        Write(-1, b"x"),
        Write(0, b""),
        Zero(0, 0),
        Tag(TagKind.CRASH, b"short", "n", 0),
        Tag(TagKind.CRASH, TAG_ID, "x" * 129, 0),
        Tag(TagKind.CRASH, TAG_ID, " padded", 0),
        Tag(TagKind.GROUP, TAG_ID, "n", 0),
        Tag(TagKind.APP, TAG_ID, "n", 0, "g"),
        Tag(TagKind.APP, TAG_ID, "n", -1),
    ],
)
def test_encoder_refuses_what_the_decoder_would(record: Record) -> None:
    with pytest.raises(ProtocolError):
        encode_records([record])


def test_payload_layout_needs_room_for_every_entry() -> None:
    check_payload_layout(16 * 3 + 10, 10, 3, what="x")
    with pytest.raises(MalformedError, match="table of at least 48"):
        check_payload_layout(16 * 3 + 9, 10, 3, what="x")


@pytest.mark.parametrize(
    "length", [0, 1, 4095, ZERO_COMPARE_BYTES, ZERO_COMPARE_BYTES + 1, 3 * ZERO_COMPARE_BYTES]
)
def test_is_zero_finds_a_single_non_zero_byte_anywhere(length: int) -> None:
    data = bytearray(length)
    assert is_zero(data)
    assert is_zero(bytes(data))
    assert is_zero(memoryview(data))
    for where in {0, length // 2, length - 1, ZERO_COMPARE_BYTES - 1, ZERO_COMPARE_BYTES}:
        if 0 <= where < length:
            data[where] = 0x80
            assert not is_zero(data), f"a non-zero byte at {where} of {length} was missed"
            assert not is_zero(memoryview(data)[where:])
            assert is_zero(memoryview(data)[where + 1 :])
            data[where] = 0


def test_is_zero_reads_a_view_of_wider_items_as_bytes() -> None:
    words = memoryview(bytearray(4 * 1000)).cast("I")
    assert is_zero(words)
    words[999] = 1
    assert not is_zero(words)
