"""The agent's stream against a process server whose refusal makes no sense.

A process server that answers ``gap`` expecting the very seq the request
began with asks for what it was just sent: sending it again at once would
loop as fast as the network allows. The stream must wait it out as a
failure. The stand-in process server counts the POSTs it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from agent.journal import EntryKind
from agent.pool import ProcessServerPool
from agent.state import AgentState
from agent.stream import ReplicationStream
from protocol.batch import BatchDecoder
from protocol.records import NO_FLAGS, Write
from tests.conftest import Deployment
from tests.faults.daemons import free_port
from tests.standin import Route, stand_in

DISK = "vm01-d0"
REFUSING_S = 2.0
#: POSTs a stream backing off from 0.25 s can make in REFUSING_S; one that
#: sends again at once makes hundreds.
MAX_POSTS = 12


@contextlib.asynccontextmanager
async def _confused_process_server(
    deployment: Deployment, port: int, posts: list[int]
) -> AsyncIterator[None]:
    async def batches(request: web.Request) -> web.Response:
        decoder = BatchDecoder(expected_disk_id=DISK)
        decoder.feed(await request.read())
        decoder.feed_eof()
        first = next(iter(decoder.events())).header.first_seq
        posts.append(first)
        return web.json_response(
            {
                "error": "gap",
                "message": f"expected seq {first} of generation 1 next",
                "expected_seq": first,
                "disk": DISK,
                "generation": 1,
                "acked_seq": first - 1,
            },
            status=409,
        )

    async def generation(_: web.Request) -> web.Response:
        return web.json_response({"disk": DISK, "generation": 1, "acked_seq": 0})

    async def state(_: web.Request) -> web.Response:
        return web.json_response(
            {"disk": DISK, "generation": 1, "acked_seq": 0, "shipped_seq": 0,
             "backlog_bytes": 0, "backlog_age_s": 0.0, "resync_required": False}
        )  # fmt: skip

    routes: list[Route] = [
        ("POST", "/v1/disks/{disk}/batches", batches),
        ("POST", "/v1/disks/{disk}/generation", generation),
        ("GET", "/v1/disks/{disk}/state", state),
    ]
    async with stand_in(deployment, port, "processserver", routes):
        yield


async def test_a_gap_expecting_the_seq_just_sent_is_waited_out(
    deployment: Deployment, tmp_path: Path
) -> None:
    port, posts = free_port(), []
    async with _confused_process_server(deployment, port, posts):
        pool = ProcessServerPool(
            (f"https://127.0.0.1:{port}",), deployment.client_tls("vm01"),
            request_timeout_s=10, connect_timeout_s=5, give_up_after_s=60,
        )  # fmt: skip
        with ThreadPoolExecutor(2) as executor:
            stream = await ReplicationStream.create(
                DISK, 1, state=AgentState(tmp_path / "agent"), pool=pool,
                journal_dir=tmp_path / "agent" / "journal", source=None, executor=executor,
            )  # fmt: skip
            stream.start()
            now = time.time_ns()
            await stream.append(
                [Write(0, b"\x22" * 4096)], flags=NO_FLAGS, first_capture_ns=now,
                last_capture_ns=now, kind=EntryKind.INLINE,
            )  # fmt: skip
            await asyncio.sleep(REFUSING_S)
            await stream.close()
        await pool.close()
    print(f"{len(posts)} requests in {REFUSING_S:g} s")
    assert 1 <= len(posts) <= MAX_POSTS, len(posts)
    assert set(posts) == {1}
