"""The plugin's requests, in: read from the capture socket, committed in groups, answered.

The reader takes frames off the socket as they come; the committer takes
every request that has arrived (up to :data:`GROUP_MAX_BYTES`), commits
them together — one journal write and fsync for the lot — and answers them
with one ACK. While a group is committed the next one gathers, so the more
writes are in flight, the larger the groups and the fewer the fsyncs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from agent.capture.link import PluginLink
from agent.capture.plugin import wire
from agent.capture.records import Request
from agent.capture.replication import CaptureReplication
from agent.errors import CaptureError

log = logging.getLogger("blockrepl.agent.capture")

#: Bytes of requests committed in one group at most: two full batches, so a
#: group waits for one journal write of at most about this much.
GROUP_MAX_BYTES: Final = 32 * 2**20
#: Requests in one group at most (an ACK answers the group's rid range).
GROUP_MAX_REQUESTS: Final = 4096


class Intake:
    """Reads the plugin's frames and commits its requests.

    Args:
        link: the capture socket.
        replication: where requests are committed.
    """

    def __init__(self, link: PluginLink, replication: CaptureReplication) -> None:
        self.link = link
        self.replication = replication
        self._queue: asyncio.Queue[Request] = asyncio.Queue()
        self._pending_done: dict[int, asyncio.Future[list[tuple[int, int]]]] = {}
        #: the plugin said goodbye: it stopped cleanly
        self.bye = False
        #: the socket ended (after BYE, or because nbdkit died)
        self.ended = asyncio.Event()
        self._busy = False

    async def read(self) -> None:
        """Take frames off the socket until it ends.

        Raises:
            CaptureError: a frame broke the rules, or came out of place.
        """
        try:
            while (frame := await self.link.receive()) is not None:
                self._take(frame)
        finally:
            self.ended.set()
            for future in self._pending_done.values():
                if not future.done():
                    future.set_exception(CaptureError("the capture plugin is gone"))

    def _take(self, frame: wire.Frame) -> None:
        kind = frame.type
        if kind in (wire.FrameType.WRITE, wire.FrameType.ZERO):
            request = Request(frame, time.time_ns())
            self.replication.received(request)
            self._queue.put_nowait(request)
        elif kind is wire.FrameType.FAILED:
            self.replication.failed(frame)
        elif kind is wire.FrameType.PENDING_DONE:
            future = self._pending_done.pop(frame.rid, None)
            if future is not None and not future.done():
                future.set_result(wire.decode_ranges(frame.body))
        elif kind is wire.FrameType.BYE:
            self.bye = True
        else:
            raise CaptureError(f"the capture plugin sent {kind.name} out of place")

    async def commit(self) -> None:
        """Commit and answer requests in groups (forever)."""
        while True:
            group = [await self._queue.get()]
            self._busy = True
            size = group[0].frame.length
            while (
                not self._queue.empty()
                and size < GROUP_MAX_BYTES
                and len(group) < GROUP_MAX_REQUESTS
            ):
                request = self._queue.get_nowait()
                group.append(request)
                size += request.frame.length
            status = await self.replication.commit(group)
            ack = wire.Frame(wire.FrameType.ACK, status, group[-1].rid, group[0].rid)
            self.link.send(ack)
            await self.link.drain()
            self._busy = False

    @property
    def idle(self) -> bool:
        """No request waits to be committed or answered."""
        return self._queue.empty() and not self._busy

    async def mark_pending(
        self, ranges: list[tuple[int, int]], rid: int, live: bool
    ) -> list[tuple[int, int]]:
        """Ask the plugin to mark ``ranges`` pending (PENDING); every pending range then.

        Raises:
            CaptureError: the plugin is gone.
        """
        if self.ended.is_set():
            raise CaptureError("the capture plugin is gone")
        future: asyncio.Future[list[tuple[int, int]]] = asyncio.get_running_loop().create_future()
        self._pending_done[rid] = future
        flags = wire.PendingFlags.LIVE if live else wire.PendingFlags.NONE
        self.link.send(
            wire.Frame(wire.FrameType.PENDING, flags, rid, body=wire.encode_ranges(ranges))
        )
        return await future
