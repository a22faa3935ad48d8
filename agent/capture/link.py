"""The agent's end of the capture socket (plugin/wire.py), on asyncio."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from agent.capture.plugin import wire
from agent.errors import CaptureError


@dataclass(frozen=True, slots=True)
class Hello:
    """What the plugin said first."""

    pid: int
    region_bytes: int
    disk_bytes: int


class PluginLink:
    """Frames to and from the plugin over the agent's end of the socketpair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> PluginLink:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**20)
        return cls(reader, writer)

    async def hello(self, timeout_s: float) -> Hello:
        """The plugin's HELLO, checked.

        Raises:
            CaptureError: none came in time, or it is not a HELLO of this version.
        """
        try:
            frame = await asyncio.wait_for(self.receive(), timeout_s)
        except TimeoutError:
            raise CaptureError(
                f"the capture plugin did not say hello within {timeout_s:g} s"
            ) from None
        if frame is None or frame.type is not wire.FrameType.HELLO:
            found = "the end of the socket" if frame is None else frame.type.name
            raise CaptureError(f"expected HELLO from the capture plugin, found {found}")
        if frame.flags != wire.PROTOCOL_VERSION:
            raise CaptureError(
                f"the capture plugin speaks version {frame.flags} of the capture socket, this "
                f"agent version {wire.PROTOCOL_VERSION}: install the plugin of this agent"
            )
        return Hello(frame.rid, frame.offset, frame.length)

    async def receive(self) -> wire.Frame | None:
        """The next frame, its body read; None at the end of the socket.

        Raises:
            CaptureError: a frame breaks the capture socket's rules.
        """
        try:
            header = await self._reader.readexactly(wire.HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise CaptureError("the capture plugin's socket ended inside a frame") from None
            return None
        except ConnectionError:
            return None
        try:
            frame, body_len = wire.decode_header(header, allowed=wire.PLUGIN_TYPES)
        except wire.WireError as exc:
            raise CaptureError(f"the capture plugin sent a bad frame: {exc}") from None
        if not body_len:
            return frame
        try:
            body = await self._reader.readexactly(body_len)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise CaptureError("the capture plugin's socket ended inside a frame") from None
        return wire.Frame(frame.type, frame.flags, frame.rid, frame.offset, frame.length, body)

    def send(self, frame: wire.Frame) -> None:
        """Queue ``frame`` (its order with other frames is kept)."""
        if self._writer.is_closing():
            return  # the plugin is gone; nothing waits for this frame any more
        self._writer.write(wire.encode_header(frame))
        if frame.body:
            self._writer.write(frame.body)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError:
            return

    def close(self) -> None:
        self._writer.close()
