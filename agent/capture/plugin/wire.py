"""The capture socket: frames between the nbdkit plugin and the agent process.

The agent makes a socketpair, keeps one end and hands the other to nbdkit
(``fd=N``); no name on the file system, so no other process can reach it.
Both sides write whole frames, one at a time; a frame is a fixed header and
a body::

    frame  = header[32] || body[body_len]
    header = type:u8 || flags:u8 || reserved:u16 || body_len:u32
             || rid:u64 || offset:u64 || length:u64

All integers little-endian; reserved bytes are zero. ``rid`` numbers the
plugin's requests (1, 2, 3, ... in the order their source writes were made,
which is the order their frames are sent). docs/protocol.md, "Capture
socket", gives each type's fields; this module mirrors it.

Standard library only: the plugin runs in the Python that nbdkit embeds
(Debian's ``/usr/bin/python3``), not in the agent's environment. No I/O here:
bytes in, frames out.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

#: Bumped on any incompatible change; HELLO carries it and the agent refuses another.
PROTOCOL_VERSION: Final = 1

# header: type:u8 || flags:u8 || reserved:u16 || body_len:u32 || rid:u64 || offset:u64 || length:u64
HEADER: Final = struct.Struct("<BBHIQQQ")
#: One range of a PENDING or RESYNCED body: offset:u64 || length:u64.
RANGE: Final = struct.Struct("<QQ")

#: Largest NBD request the plugin takes (it says so in its block size
#: limits): 32 MiB is what the NBD protocol lets a server refuse above, and
#: what qemu and nbdcopy send at most. A WRITE frame's body is one request.
MAX_REQUEST_BYTES: Final = 32 * 2**20
#: Largest body of any frame: a WRITE of the largest request. A range list
#: (16 bytes per range) stays far below it for any disk's dirty map.
MAX_BODY_BYTES: Final = MAX_REQUEST_BYTES
#: Highest rid, offset or length: u64 on the wire, kept to signed 64 bits.
MAX_U63: Final = 2**63 - 1


class FrameType(enum.IntEnum):
    """What a frame is; values below 16 go from the plugin to the agent."""

    #: plugin → agent, first frame: flags = version, rid = nbdkit's pid,
    #: offset = the dirty map's region size, length = the source's size
    HELLO = 1
    #: a write that landed on the source: body = its data; flags: FUA
    WRITE = 2
    #: a range that was zeroed (or trimmed) on the source; flags: FUA, TRIM
    ZERO = 3
    #: the source write of ``rid`` failed: its range is left to a resync
    FAILED = 4
    #: the plugin stops cleanly: every request answered, the dirty map flushed
    BYE = 5
    #: the ranges of PENDING ``rid`` are marked, durably; the body lists every
    #: range that needs a resync now
    PENDING_DONE = 6
    #: agent → plugin: requests ``offset`` .. ``rid`` (first .. last) are
    #: answered; flags: :class:`AckStatus`
    ACK = 16
    #: every request up to ``rid`` that was journaled is at the master target
    SHIPPED = 17
    #: mark the body's ranges as needing a resync (of requests up to ``rid``),
    #: durably; with flag LIVE also every range of a journaled request up to
    #: ``rid`` not yet shipped (their journal is lost); answered by PENDING_DONE
    PENDING = 18
    #: the body's ranges were resynced from the source after request ``rid``:
    #: they need no resync for anything up to it
    RESYNCED = 19


class AckStatus(enum.IntEnum):
    """What the agent did with a request (the flags of an ACK)."""

    #: journaled: it will reach the master target as it is
    JOURNALED = 0
    #: not journaled (the journal is full, or the stream is down): its range
    #: stays dirty and is resynced from the source
    DIRTY = 1


class PendingFlags(enum.IntFlag):
    NONE = 0
    #: the journaled requests not yet shipped will never be: resync their ranges too
    LIVE = 0x01


#: Frames whose body is a range list.
RANGE_LISTS: Final = frozenset({FrameType.PENDING, FrameType.PENDING_DONE, FrameType.RESYNCED})


class WriteFlags(enum.IntFlag):
    NONE = 0
    #: the client asked for FUA: the source write was made durable first
    FUA = 0x01
    #: a ZERO that a client's trim made (the range reads back as zeros)
    TRIM = 0x02


PLUGIN_TYPES: Final = frozenset(t for t in FrameType if t < 16)
AGENT_TYPES: Final = frozenset(t for t in FrameType if t >= 16)


class WireError(ValueError):
    """A frame breaks the capture socket's rules: the link cannot be trusted any more."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    flags: int = 0
    rid: int = 0
    offset: int = 0
    length: int = 0
    body: bytes | bytearray | memoryview = b""


def encode_header(frame: Frame) -> bytes:
    """The 32-byte header of ``frame`` (its body is sent after it, as it is).

    Raises:
        WireError: a field out of range, or a body too long.
    """
    body_len = len(frame.body)
    if body_len > MAX_BODY_BYTES:
        raise WireError(f"a frame body may be at most {MAX_BODY_BYTES} bytes, found {body_len}")
    for name in ("rid", "offset", "length"):
        value = getattr(frame, name)
        if not 0 <= value <= MAX_U63:
            raise WireError(f"frame {name} must be 0..2**63-1, found {value}")
    if not 0 <= frame.flags <= 0xFF:
        raise WireError(f"frame flags must fit one byte, found {frame.flags}")
    return HEADER.pack(frame.type, frame.flags, 0, body_len, frame.rid, frame.offset, frame.length)


def decode_header(
    data: bytes | bytearray | memoryview, *, allowed: frozenset[FrameType]
) -> tuple[Frame, int]:
    """A frame's header, and the length of the body that follows it.

    The frame is returned without its body: the caller reads the body
    straight into the buffer it keeps.

    Args:
        allowed: the types this side may receive.

    Raises:
        WireError: an unknown or unexpected type, reserved bits set, a body
            above the limit, or a WRITE whose body and length disagree.
    """
    if len(data) != HEADER.size:
        raise WireError(f"a frame header is {HEADER.size} bytes, found {len(data)}")
    kind, flags, reserved, body_len, rid, offset, length = HEADER.unpack(data)
    try:
        frame_type = FrameType(kind)
    except ValueError:
        raise WireError(f"unknown frame type {kind}") from None
    if frame_type not in allowed:
        raise WireError(f"frame type {frame_type.name} is not expected from this peer")
    if reserved:
        raise WireError(f"frame reserved field must be 0, found {reserved}")
    if body_len > MAX_BODY_BYTES:
        raise WireError(f"a frame body may be at most {MAX_BODY_BYTES} bytes, found {body_len}")
    if max(rid, offset, length) > MAX_U63:
        raise WireError("frame rid, offset and length must be below 2**63")
    if frame_type is FrameType.WRITE and body_len != length:
        raise WireError(f"a WRITE of {length} bytes must carry {length} bytes, found {body_len}")
    if frame_type in RANGE_LISTS and body_len % RANGE.size:
        raise WireError(f"a range list is a multiple of {RANGE.size} bytes, found {body_len}")
    return Frame(frame_type, flags, rid, offset, length), body_len


def encode_ranges(ranges: list[tuple[int, int]]) -> bytes:
    """A range list: ``(offset, length)`` pairs back to back."""
    return b"".join(RANGE.pack(offset, length) for offset, length in ranges)


def decode_ranges(body: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """The ``(offset, length)`` pairs of a range list.

    Raises:
        WireError: its length is not a whole number of pairs.
    """
    if len(body) % RANGE.size:
        raise WireError(f"a range list is a multiple of {RANGE.size} bytes, found {len(body)}")
    return [RANGE.unpack_from(body, at) for at in range(0, len(body), RANGE.size)]
