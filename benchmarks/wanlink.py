"""A TCP relay on loopback that carries bytes as a WAN link does: late and at a bounded rate.

Each direction of each connection is a link of its own (a full-duplex
circuit): a piece that arrives is sent on once the link has carried
everything before it at ``bytes_per_s`` and then ``rtt_s / 2`` has passed.
The link holds at most what is in flight on it — its bandwidth-delay
product, plus :data:`QUEUE_S` of queue — and reads no more until that drains,
so a sender sees the pushback a real link's TCP window gives it. The kernel
on this machine has no ``netem`` qdisc, which is why this is done in user
space; the relay runs in a thread of its own so the bench's main thread is
free to run commands.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from typing import Final

#: Bytes read from a socket at once.
READ_BYTES: Final = 256 * 2**10
#: Seconds of queue the link holds beyond what is in flight on it: a router's
#: buffer of a few milliseconds.
QUEUE_S: Final = 0.005


class WanLink:
    """Relays every connection on :attr:`port` to ``127.0.0.1:target_port``.

    Args:
        target_port: where the connections go.
        rtt_s: the round trip the link adds (half each way).
        bytes_per_s: each direction's rate.
    """

    def __init__(self, target_port: int, *, rtt_s: float, bytes_per_s: float) -> None:
        if rtt_s < 0 or bytes_per_s <= 0:
            raise ValueError(
                f"expected rtt_s >= 0 and bytes_per_s > 0, found {rtt_s} and {bytes_per_s}"
            )
        self.target_port = target_port
        self.rtt_s = rtt_s
        self.bytes_per_s = bytes_per_s
        self.port = 0
        self.carried = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> WanLink:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        task = asyncio.create_task(self._connection(reader, writer, up_reader, up_writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """Both directions until each has ended (a half-close carries on as one),
        or until either fails; then both sockets are closed."""
        directions = [
            asyncio.create_task(_Direction(self, reader, up_writer).carry()),
            asyncio.create_task(_Direction(self, up_reader, writer).carry()),
        ]
        try:
            for done in asyncio.as_completed(directions):
                if not await done:  # failed: the other side cannot go on either
                    break
        finally:
            for direction in directions:
                direction.cancel()
            await asyncio.gather(*directions, return_exceptions=True)
            writer.close()
            up_writer.close()


class _Direction:
    """One direction of one connection: read, hold each piece until the link has
    carried it, write."""

    def __init__(
        self, link: WanLink, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        self._link = link
        self._source = source
        self._sink = sink
        self._delay = link.rtt_s / 2
        self._capacity = link.bytes_per_s * (self._delay + QUEUE_S)
        self._pieces: collections.deque[tuple[float, bytes]] = collections.deque()
        self._held = 0
        self._changed = asyncio.Event()
        self._link_free_at = 0.0
        self._ended = False

    async def carry(self) -> bool:
        """Until the source's end has been carried (True) or a socket failed (False)."""
        delivering = asyncio.create_task(self._deliver())
        try:
            await self._take_in()
            await delivering
            self._sink.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            return False
        finally:
            delivering.cancel()
            with contextlib.suppress(BaseException):
                await delivering
        return True

    async def _take_in(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._held >= self._capacity:
                self._changed.clear()
                await self._changed.wait()
            data = await self._source.read(READ_BYTES)
            if not data:
                break
            now = loop.time()
            self._link_free_at = max(now, self._link_free_at) + len(data) / self._link.bytes_per_s
            self._pieces.append((self._link_free_at + self._delay, data))
            self._held += len(data)
            self._changed.set()
        self._ended = True
        self._changed.set()

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pieces or not self._ended:
            if not self._pieces:
                self._changed.clear()
                await self._changed.wait()
                continue
            due, data = self._pieces.popleft()
            await asyncio.sleep(max(0.0, due - loop.time()))
            self._sink.write(data)
            await self._sink.drain()
            self._held -= len(data)
            self._link.carried += len(data)
            self._changed.set()
