"""Records: the unit of change in a batch payload and in an HRL file's plaintext.

A payload puts the data of every WRITE first, back to back in record order,
and the table of records after it::

    payload = data_area[data_len] || table

    table entries, in stream order:
    WRITE   type:u8 (=1) || reserved:u8[3] || length:u32 || offset:u64                  16 bytes
    ZERO    type:u8 (=2) || reserved:u8[7] || offset:u64 || length:u64                  24 bytes
    TAG     type:u8 (=3) || tag_kind:u8 || name_len:u8 || group_len:u8 || reserved:u32
            || tag_id[16] || time_ns:u64 || name[name_len] || group_id[group_len]       32 + n + g

All integers little-endian; reserved bytes are zero. The n-th WRITE's data is
the n-th run of ``length`` bytes of the data area. Data first keeps written
blocks where the source had them relative to each other: the compressor's
128 KiB blocks line up with the writes, and the applier can hand adjacent
writes to one ``pwrite``. A record has no seq of its own: the n-th record of a
batch or file whose first seq is S has seq S + n, so a gap inside one batch
cannot be expressed. See docs/protocol.md, "Records".
"""

from __future__ import annotations

import struct
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

from protocol.errors import LimitExceededError, MalformedError, TruncatedError
from protocol.limits import (
    MAX_TAG_NAME_BYTES,
    MAX_WRITE_BYTES,
    MAX_ZERO_BYTES,
    check_id,
    check_range,
)

#: Buffers a record may hold its data in: decoders hand out memoryview slices
#: of the payload so 64 KiB writes are never copied while they are checked.
Buffer = bytes | bytearray | memoryview


class StreamFlags(IntFlag):
    """Flags a batch or HRL file carries about its place in the disk's stream."""

    #: The records come from a resync pass (initial replication or checksum
    #: resync): the target is not consistent anywhere inside the pass, so no
    #: recovery point may be offered there (docs/design.md invariant 6).
    RESYNC = 0x01
    #: This batch ends the resync pass: after its last record the target is
    #: consistent again. Only valid together with RESYNC.
    RESYNC_END = 0x02


NO_FLAGS: Final = StreamFlags(0)

#: Every flag this version knows; a set bit outside it is refused.
#: (an int: ``~`` of an IntFlag stays inside the flag's own bits)
KNOWN_FLAGS: Final = int(StreamFlags.RESYNC | StreamFlags.RESYNC_END)


def check_flags(value: int, *, what: str) -> StreamFlags:
    """Decode a flags byte, refusing unknown bits and RESYNC_END without RESYNC.

    Raises:
        MalformedError: an unknown bit, or an impossible combination.
    """
    if value & ~KNOWN_FLAGS:
        raise MalformedError(
            f"{what} flags may only use bits 0x{KNOWN_FLAGS:02x}, found 0x{value:02x}"
        )
    flags = StreamFlags(value)
    if StreamFlags.RESYNC_END in flags and StreamFlags.RESYNC not in flags:
        raise MalformedError(f"{what} flags: RESYNC_END requires RESYNC, found 0x{value:02x}")
    return flags


class RecordType(IntEnum):
    WRITE = 1
    ZERO = 2
    TAG = 3


class TagKind(IntEnum):
    """What a TAG record marks. See docs/protocol.md, "Tags"."""

    #: a crash-consistent point of one machine's disks (all disks were tagged
    #: while writes were held)
    CRASH = 1
    #: an app-consistent point: applications were quiesced (VSS, fsfreeze)
    APP = 2
    #: a point common to every member of a consistency group
    GROUP = 3


# WRITE entry: type:u8 || reserved:3x || length:u32 || offset:u64
WRITE_ENTRY: Final = struct.Struct("<B3sIQ")
# ZERO entry: type:u8 || reserved:7x || offset:u64 || length:u64
ZERO_ENTRY: Final = struct.Struct("<B7sQQ")
# TAG entry prefix: type:u8 || tag_kind:u8 || name_len:u8 || group_len:u8 || reserved:u32
#                   || tag_id:16s || time_ns:u64
TAG_ENTRY: Final = struct.Struct("<BBBBI16sQ")
TAG_ID_BYTES: Final = 16

#: Times are u64 nanoseconds on the wire but kept below 2**63 (signed columns).
MAX_TIME_NS: Final = 2**63 - 1

#: Fewest bytes one record takes (a WRITE of one byte). A header whose payload
#: length is below ``record_count * MIN_RECORD_BYTES`` lies about one of them.
MIN_RECORD_BYTES: Final = WRITE_ENTRY.size + 1


#: Bytes of zeros :func:`is_zero` compares against per step: large enough that
#: the loop runs once for any usual write, small enough to keep resident.
ZERO_COMPARE_BYTES: Final = 1 << 20
_ZEROS: Final = bytes(ZERO_COMPARE_BYTES)


def is_zero(data: Buffer) -> bool:
    """Whether every byte of ``data`` is zero (such data travels as a ZERO record).

    A ``memcmp`` against a block of zeros: about ten times faster than
    ``data.count(0)``, and it stops at the first non-zero byte.
    """
    view = memoryview(data).cast("B")
    return all(
        _ZEROS.startswith(view[start : start + ZERO_COMPARE_BYTES])
        for start in range(0, len(view), ZERO_COMPARE_BYTES)
    )


@dataclass(frozen=True, slots=True)
class Write:
    """``data`` written at byte ``offset`` of the disk."""

    offset: int
    data: Buffer

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class Zero:
    """``length`` bytes from ``offset`` now read as zero (zeroed, trimmed or unmapped)."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Tag:
    """A named point in the stream: the disk is consistent here as ``kind`` says.

    ``tag_id`` is 16 random bytes shared by every disk tagged in the same round
    (all disks of a machine, or all members of a group); ``group_id`` is set
    exactly when ``kind`` is GROUP.
    """

    kind: TagKind
    tag_id: bytes
    name: str
    time_ns: int
    group_id: str = ""


Record = Write | Zero | Tag


def _check_name(name_bytes: bytes) -> str:
    try:
        name = name_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError(f"tag name must be UTF-8, found {name_bytes!r}") from None
    if any(unicodedata.category(c) == "Cc" for c in name) or name != name.strip():
        raise MalformedError(
            f"tag name must have no control characters and no surrounding spaces, found {name!r}"
        )
    return name


def check_payload_layout(payload_len: int, data_len: int, record_count: int, *, what: str) -> None:
    """Check that a header's payload length, data length and record count can agree.

    The table needs at least one 16-byte entry per record after the data area,
    and the data area at least one byte per WRITE; a header that cannot fit
    its own records lies about one of the three.

    Raises:
        MalformedError: they cannot agree.
    """
    table_len = payload_len - data_len
    if data_len < 0 or table_len < record_count * WRITE_ENTRY.size:
        raise MalformedError(
            f"{what} of {record_count} records needs a table of at least "
            f"{record_count * WRITE_ENTRY.size} bytes after its data area, found "
            f"payload_len={payload_len} data_len={data_len}"
        )


def check_record(record: Record) -> None:
    """Check the fields of a record against the limits, before it is encoded.

    Raises:
        MalformedError, LimitExceededError: as the decoder would for the same record.
    """
    if isinstance(record, Write):
        check_range(record.offset, len(record.data), max_length=MAX_WRITE_BYTES, what="WRITE")
    elif isinstance(record, Zero):
        check_range(record.offset, record.length, max_length=MAX_ZERO_BYTES, what="ZERO")
    else:
        _check_tag(record)


def _check_tag(tag: Tag) -> None:
    if not isinstance(tag.kind, TagKind):
        raise MalformedError(f"tag kind must be a TagKind, found {tag.kind!r}")
    if len(tag.tag_id) != TAG_ID_BYTES:
        raise MalformedError(f"tag id must be {TAG_ID_BYTES} bytes, found {len(tag.tag_id)}")
    name_bytes = tag.name.encode("utf-8")
    if len(name_bytes) > MAX_TAG_NAME_BYTES:
        raise LimitExceededError(
            f"tag name may be at most {MAX_TAG_NAME_BYTES} UTF-8 bytes, found {len(name_bytes)}"
        )
    _check_name(name_bytes)
    if not 0 <= tag.time_ns <= MAX_TIME_NS:
        raise MalformedError(f"tag time must be 0..2**63-1 ns, found {tag.time_ns}")
    if (tag.kind is TagKind.GROUP) != bool(tag.group_id):
        raise MalformedError(
            "a GROUP tag must name its group and other tags must not, "
            f"found kind={tag.kind.name} group_id={tag.group_id!r}"
        )
    if tag.group_id:
        check_id("group", tag.group_id)


def encoded_size(record: Record) -> int:
    """Bytes the record takes in a payload: its table entry and its data."""
    if isinstance(record, Write):
        return WRITE_ENTRY.size + len(record.data)
    if isinstance(record, Zero):
        return ZERO_ENTRY.size
    return TAG_ENTRY.size + len(record.name.encode("utf-8")) + len(record.group_id)


@dataclass(frozen=True, slots=True)
class EncodedRecords:
    """Records laid out as a payload: the data area's pieces, then the table."""

    #: WRITE data in record order, referenced, not copied
    data: list[Buffer]
    data_len: int
    table: bytes

    @property
    def segments(self) -> list[Buffer]:
        """The payload as buffers to write back to back."""
        return [*self.data, self.table]

    @property
    def payload_len(self) -> int:
        return self.data_len + len(self.table)


def encode_records(records: Iterable[Record]) -> EncodedRecords:
    """Lay records out as a payload, checking every record first.

    Raises:
        MalformedError, LimitExceededError: a record breaks a rule of the format.
    """
    data: list[Buffer] = []
    data_len = 0
    table = bytearray()
    for record in records:
        check_record(record)
        if isinstance(record, Write):
            table += WRITE_ENTRY.pack(RecordType.WRITE, b"", len(record.data), record.offset)
            data.append(record.data)
            data_len += len(record.data)
        elif isinstance(record, Zero):
            table += ZERO_ENTRY.pack(RecordType.ZERO, b"", record.offset, record.length)
        else:
            name = record.name.encode("utf-8")
            group = record.group_id.encode("ascii")
            table += TAG_ENTRY.pack(
                RecordType.TAG, record.kind, len(name), len(group), 0, record.tag_id,
                record.time_ns,
            )  # fmt: skip
            table += name + group
    return EncodedRecords(data, data_len, bytes(table))


def decode_records(
    payload: Buffer, expected_count: int, data_len: int, *, what: str
) -> tuple[Record, ...]:
    """Decode exactly ``expected_count`` records from a verified payload.

    WRITE data in the result are memoryview slices of ``payload``.

    Args:
        payload: the verified payload bytes.
        expected_count: the record count its header declares.
        data_len: the length of the data area its header declares.
        what: names the container in error messages ("batch seq 7").

    Raises:
        TruncatedError: an entry runs past the end of the table.
        MalformedError: unknown type, reserved bits set, a count or data
            length that does not match, or bytes left after the last entry.
        LimitExceededError: a record above a limit.
    """
    view = memoryview(payload).cast("B")
    if not 0 <= data_len <= len(view):
        raise MalformedError(
            f"{what}: data area must lie inside the {len(view)}-byte payload, "
            f"found data_len={data_len}"
        )
    return tuple(_iter_records(view, expected_count, data_len, what))


def _iter_records(
    view: memoryview, expected_count: int, data_len: int, what: str
) -> Iterator[Record]:
    pos = data_len  # next table byte
    data_pos = 0  # next data-area byte
    end = len(view)
    for index in range(expected_count):
        if pos >= end:
            raise TruncatedError(
                f"{what}: expected {expected_count} records, the table ends after {index}"
            )
        rtype = view[pos]
        where = f"{what}: record {index}"
        if rtype == RecordType.WRITE:
            _need(view, pos, WRITE_ENTRY.size, where)
            _, reserved, length, offset = WRITE_ENTRY.unpack_from(view, pos)
            _zero(reserved, where)
            check_range(offset, length, max_length=MAX_WRITE_BYTES, what=f"{where} WRITE")
            if length > data_len - data_pos:
                raise MalformedError(
                    f"{where}: WRITE of {length} bytes needs data past the "
                    f"{data_len}-byte data area (at data byte {data_pos})"
                )
            yield Write(offset, view[data_pos : data_pos + length])
            data_pos += length
            pos += WRITE_ENTRY.size
        elif rtype == RecordType.ZERO:
            _need(view, pos, ZERO_ENTRY.size, where)
            _, reserved, offset, length = ZERO_ENTRY.unpack_from(view, pos)
            _zero(reserved, where)
            check_range(offset, length, max_length=MAX_ZERO_BYTES, what=f"{where} ZERO")
            yield Zero(offset, length)
            pos += ZERO_ENTRY.size
        elif rtype == RecordType.TAG:
            tag, pos = _decode_tag(view, pos, where)
            yield tag
        else:
            raise MalformedError(
                f"{where}: record type must be one of "
                f"{', '.join(f'{t.value} ({t.name})' for t in RecordType)}, found {rtype}"
            )
    if pos != end:
        raise MalformedError(
            f"{what}: expected {expected_count} records filling the table, "
            f"found {end - pos} bytes after the last one"
        )
    if data_pos != data_len:
        raise MalformedError(
            f"{what}: WRITE records must use the whole {data_len}-byte data area, "
            f"found {data_len - data_pos} bytes unused"
        )


def _need(view: memoryview, pos: int, size: int, where: str) -> None:
    if len(view) - pos < size:
        raise TruncatedError(
            f"{where}: entry needs {size} bytes, found {len(view) - pos} left in the table"
        )


def _zero(reserved: bytes, where: str) -> None:
    if reserved != bytes(len(reserved)):
        raise MalformedError(f"{where}: reserved bytes must be zero, found {reserved.hex()}")


def _decode_tag(view: memoryview, pos: int, where: str) -> tuple[Tag, int]:
    _need(view, pos, TAG_ENTRY.size, where)
    _, kind, name_len, group_len, reserved, tag_id, time_ns = TAG_ENTRY.unpack_from(view, pos)
    if reserved:
        raise MalformedError(f"{where}: TAG reserved field must be 0, found {reserved}")
    start = pos + TAG_ENTRY.size
    _need(view, start, name_len + group_len, f"{where} TAG name and group")
    try:
        tag_kind = TagKind(kind)
    except ValueError:
        raise MalformedError(
            f"{where}: tag kind must be 1 (CRASH), 2 (APP) or 3 (GROUP), found {kind}"
        ) from None
    name_bytes = bytes(view[start : start + name_len])
    group_bytes = bytes(view[start + name_len : start + name_len + group_len])
    try:
        group_id = group_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedError(f"{where}: group id must be ASCII, found {group_bytes!r}") from None
    tag = Tag(tag_kind, tag_id, _check_name(name_bytes), time_ns, group_id)
    _check_tag(tag)
    return tag, start + name_len + group_len
