"""runtime/bodies.py against real HTTP requests: raw bytes on a socket to an
aiohttp server, so every way a body can arrive and end is the wire's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from protocol.errors import ProtocolError
from runtime.bodies import feed_body
from runtime.errors import BodyTimeoutError

TIMEOUT_S = 0.5


class Recorder:
    """A decoder that remembers what it was fed, and what the caller saw between feeds."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def feed(self, data: bytes) -> None:
        self.calls.append(data.decode())

    def feed_eof(self) -> None:
        self.calls.append("EOF")


async def _handler(request: web.Request) -> web.Response:
    recorder = Recorder()
    seen: list[list[str]] = []
    try:
        async for _ in feed_body(request.content, recorder, timeout_s=TIMEOUT_S):
            seen.append(list(recorder.calls))
    except (BodyTimeoutError, ProtocolError) as exc:
        return web.json_response({"error": type(exc).__name__, "seen": seen}, status=400)
    return web.json_response({"seen": seen})


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_post("/", _handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


async def _exchange(port: int, head: bytes, pieces: list[bytes]) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for piece in pieces:
            await writer.drain()
            await asyncio.sleep(0.05)  # each its own socket read on the server
            writer.write(piece)
        await writer.drain()
        return await asyncio.wait_for(_answer(reader), 10)
    finally:
        writer.close()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    """The status and JSON body of an answer; read by its length, as the
    server may keep the connection open for a body it did not read."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status = int(head.split()[1])
    length = next(
        int(line.split(":", 1)[1])
        for line in head.split("\r\n")
        if line.lower().startswith("content-length:")
    )
    return status, json.loads(await reader.readexactly(length))


CHUNKED = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"


async def test_each_piece_is_fed_and_seen_before_the_next_then_the_end(port: int) -> None:
    status, answer = await _exchange(port, CHUNKED, [b"3\r\nabc\r\n", b"2\r\nde\r\n", b"0\r\n\r\n"])
    assert status == 200
    assert answer["seen"] == [["abc"], ["abc", "de"], ["abc", "de", "EOF"]]


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"POST / HTTP/1.0\r\n\r\n",
    ],
    ids=["content-length-0", "http-1.0-no-length"],
)
async def test_a_body_with_nothing_in_it_is_only_its_end(port: int, head: bytes) -> None:
    for _ in range(3):  # aiohttp's shared empty reader: the same answer every time
        status, answer = await _exchange(port, head, [])
        assert (status, answer["seen"]) == (200, [["EOF"]])


async def test_a_stalled_body_times_out_with_what_came_kept(port: int) -> None:
    status, answer = await _exchange(port, CHUNKED, [b"3\r\nabc\r\n"])  # and no more
    assert (status, answer) == (400, {"error": "BodyTimeoutError", "seen": [["abc"]]})
