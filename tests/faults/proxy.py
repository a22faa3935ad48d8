"""A TCP proxy that breaks connections on purpose, for the network fault tests.

It sits between a client and a server on loopback and forwards bytes as they
are (TLS passes through untouched: the proxy sees ciphertext only). Each new
connection gets the next fault of a seeded schedule:

- ``pass``: forwarded faithfully;
- ``delay``: every piece held back a few milliseconds, both ways;
- ``cut``: both sides closed after a random number of client bytes (a link
  lost in the middle of a request body);
- ``reset``: as ``cut``, but with a TCP reset instead of a clean close;
- ``lost-ack``: the request goes through whole, the answer is swallowed and
  the connection closed (the server did the work; the client cannot know);
- ``blackhole``: once the client has sent its request, nothing comes back
  and the connection stays open (a link that went silent).

A ``pass`` or ``delay`` connection is cut anyway after a random number of
client bytes up to ``max_connection_bytes`` (``expired``), so that clients
that keep connections alive meet new faults all the time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import struct
from dataclasses import dataclass, field
from typing import Final

FAULTS: Final = ("pass", "delay", "cut", "reset", "lost-ack", "blackhole")
#: Client bytes after which the TLS handshake is surely over and what
#: follows is the request: a TLS 1.3 handshake with client certificates
#: takes about 2 KiB from the client.
HANDSHAKE_BYTES: Final = 4096
#: Seconds ``delay`` holds each piece.
DELAY_S: Final = 0.005
#: Seconds ``lost-ack`` waits for the server's answer before closing.
ANSWER_WAIT_S: Final = 0.5
#: Most client bytes a connection carries before it is cut (``expired``).
MAX_CONNECTION_BYTES: Final = 1024 * 1024
#: Bytes read from a socket at a time.
PIECE: Final = 256 * 1024


@dataclass
class FaultProxy:
    """Listens on 127.0.0.1:``port`` (0: any) and forwards to ``upstream_port``."""

    upstream_port: int
    seed: int
    #: relative weight of each fault in the schedule
    weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FAULTS, 1.0))
    port: int = 0
    #: most client bytes a connection carries before it is cut (``expired``)
    max_connection_bytes: int = MAX_CONNECTION_BYTES
    #: faults for new connections in turn, over and over; random by
    #: ``weights`` when empty
    schedule: tuple[str, ...] = ()
    #: faults injected so far, by name
    injected: collections.Counter[str] = field(default_factory=collections.Counter)
    #: when False, every new connection passes (the storm is over)
    active: bool = True
    _server: asyncio.Server | None = None
    _rng: random.Random = field(init=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _turn: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _next_fault(self) -> str:
        if not self.active:
            return "pass"
        if self.schedule:
            self._turn += 1
            return self.schedule[(self._turn - 1) % len(self.schedule)]
        names = list(self.weights)
        return self._rng.choices(names, weights=[self.weights[n] for n in names])[0]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        fault = self._next_fault()
        self.injected["connections"] += 1
        if fault in ("cut", "reset"):
            cut_after = HANDSHAKE_BYTES + self._rng.randrange(256 * 1024)
        else:
            cut_after = HANDSHAKE_BYTES + self._rng.randrange(self.max_connection_bytes)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        state = _Connection(fault, cut_after)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, state, upstream=True)),
            asyncio.create_task(self._pump(up_reader, writer, state, upstream=False)),
        ]
        try:
            # Until one direction ends or breaks (a fault, a reset, a close).
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                done = set()  # the proxy is closing: end quietly
            for pump in done:
                if (exc := pump.exception()) is not None and not isinstance(
                    exc, ConnectionError | _Broken
                ):
                    raise exc
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                if fault == "reset" and state.marked:
                    _reset(w)
                w.close()
            self._tasks.discard(task)

    def _mark(self, state: _Connection, name: str) -> None:
        """Count the fault the moment it takes effect (once per connection)."""
        if not state.marked:
            state.marked = name
            self.injected[name] += 1

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        state: _Connection,
        *,
        upstream: bool,
    ) -> None:
        while piece := await source.read(PIECE):
            fault = state.fault
            if upstream:
                state.client_bytes += len(piece)
                cuts = fault in ("cut", "reset", "pass", "delay")
                if self.active and cuts and state.client_bytes > state.cut_after:
                    keep = len(piece) - (state.client_bytes - state.cut_after)
                    sink.write(piece[: max(keep, 0)])
                    self._mark(state, fault if fault in ("cut", "reset") else "expired")
                    raise _Broken
            elif state.client_bytes > HANDSHAKE_BYTES and fault in ("lost-ack", "blackhole"):
                # The request is in: its answer is swallowed.
                self._mark(state, fault)
                if fault == "lost-ack":
                    await asyncio.sleep(ANSWER_WAIT_S)
                    raise _Broken
                await asyncio.sleep(3600)  # silent until the client gives up
            if fault == "delay":
                self._mark(state, fault)
                await asyncio.sleep(DELAY_S)
            sink.write(piece)
            await sink.drain()
        with contextlib.suppress(OSError):
            if sink.can_write_eof():
                sink.write_eof()


@dataclass
class _Connection:
    fault: str
    cut_after: int
    client_bytes: int = 0
    #: the fault (or the expiry) this connection was counted under, once
    marked: str = ""


class _Broken(Exception):
    """The fault ends this connection."""


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: SO_LINGER on, zero seconds."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
