"""The capture socket's frames (agent/capture/plugin/wire.py): both ways, and every refusal."""

from __future__ import annotations

import struct

import pytest

from agent.capture.plugin import wire
from agent.capture.plugin.wire import Frame, FrameType, WireError

HEADER = wire.HEADER


@pytest.mark.parametrize(
    "frame",
    [
        Frame(FrameType.HELLO, wire.PROTOCOL_VERSION, 4242, 2**20, 10 * 2**30),
        Frame(FrameType.WRITE, wire.WriteFlags.FUA, 7, 4096, 5, b"hello"),
        Frame(FrameType.ZERO, wire.WriteFlags.TRIM, 8, 0, 2**40),
        Frame(FrameType.FAILED, 0, 9, 512, 512),
        Frame(FrameType.BYE),
        Frame(FrameType.PENDING_DONE, 0, 3, body=wire.encode_ranges([(0, 2**20)])),
    ],
    ids=lambda f: f.type.name,
)
def test_plugin_frames_round_trip(frame: Frame) -> None:
    header = wire.encode_header(frame)
    assert len(header) == HEADER.size
    decoded, body_len = wire.decode_header(header, allowed=wire.PLUGIN_TYPES)
    assert body_len == len(frame.body)
    assert (decoded.type, decoded.flags, decoded.rid, decoded.offset, decoded.length) == (
        frame.type, frame.flags, frame.rid, frame.offset, frame.length,
    )  # fmt: skip


def test_agent_frames_round_trip_and_ranges() -> None:
    ranges = [(0, 2**20), (5 * 2**20, 3 * 2**20), (2**40, 1)]
    body = wire.encode_ranges(ranges)
    frame = Frame(FrameType.RESYNCED, 0, 99, body=body)
    decoded, body_len = wire.decode_header(wire.encode_header(frame), allowed=wire.AGENT_TYPES)
    assert (decoded.type, decoded.rid, body_len) == (FrameType.RESYNCED, 99, 48)
    assert wire.decode_ranges(body) == ranges
    ack = Frame(FrameType.ACK, wire.AckStatus.DIRTY, 12, 10)
    decoded, _ = wire.decode_header(wire.encode_header(ack), allowed=wire.AGENT_TYPES)
    assert (decoded.offset, decoded.rid, wire.AckStatus(decoded.flags)) == (
        10, 12, wire.AckStatus.DIRTY,
    )  # fmt: skip


def _raw(kind: int, flags: int = 0, reserved: int = 0, body: int = 0, rid: int = 1,
         offset: int = 0, length: int = 0) -> bytes:  # fmt: skip
    return HEADER.pack(kind, flags, reserved, body, rid, offset, length)


@pytest.mark.parametrize(
    ("data", "allowed", "message"),
    [
        (_raw(200), wire.PLUGIN_TYPES, "unknown frame type 200"),
        (_raw(FrameType.ACK), wire.PLUGIN_TYPES, "ACK is not expected from this peer"),
        (_raw(FrameType.WRITE), wire.AGENT_TYPES, "WRITE is not expected from this peer"),
        (_raw(FrameType.BYE, reserved=1), wire.PLUGIN_TYPES, "reserved field must be 0"),
        (_raw(FrameType.WRITE, body=wire.MAX_BODY_BYTES + 1, length=wire.MAX_BODY_BYTES + 1),
         wire.PLUGIN_TYPES, "at most 33554432 bytes"),
        (_raw(FrameType.WRITE, body=4, length=5), wire.PLUGIN_TYPES,
         "a WRITE of 5 bytes must carry 5 bytes, found 4"),
        (_raw(FrameType.PENDING, body=17), wire.AGENT_TYPES, "multiple of 16 bytes, found 17"),
        (_raw(FrameType.BYE, rid=2**63), wire.PLUGIN_TYPES, "below 2**63"),
        (_raw(FrameType.BYE)[:-1], wire.PLUGIN_TYPES, "header is 32 bytes, found 31"),
    ],
    ids=["unknown", "ack-from-plugin", "write-from-agent", "reserved", "too-long",
         "write-length", "ranges-length", "rid", "short"],
)  # fmt: skip
def test_bad_headers_are_refused_naming_what_is_wrong(
    data: bytes, allowed: frozenset[FrameType], message: str
) -> None:
    with pytest.raises(WireError, match=message.replace("*", r"\*")):
        wire.decode_header(data, allowed=allowed)


def test_encoding_refuses_what_the_decoder_would() -> None:
    with pytest.raises(WireError, match="flags must fit one byte"):
        wire.encode_header(Frame(FrameType.ACK, 256))
    with pytest.raises(WireError, match="rid must be"):
        wire.encode_header(Frame(FrameType.ACK, 0, -1))
    with pytest.raises(WireError, match="multiple of 16"):
        wire.decode_ranges(b"\0" * 15)
    assert struct.calcsize("<BBHIQQQ") == 32
