"""The agent's client reads a process server's answer to its end, however it arrives.

A JSON answer may come in several pieces (TLS records, HTTP chunks, a slow
link): one read returns the first of them only. The stand-in process server
here sends each answer in two pieces with a pause between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from agent.client import ProcessServerClient
from tests.conftest import Deployment
from tests.faults.daemons import free_port
from tests.standin import stand_in

DISK = "vm01-d0"
PATH = "/v1/disks/{disk}/state"
STATE = {"disk": DISK, "generation": 4, "acked_seq": 1234, "shipped_seq": 1200,
         "backlog_bytes": 99, "backlog_age_s": 0.5, "resync_required": False}  # fmt: skip


@contextlib.asynccontextmanager
async def _slow_answers(deployment: Deployment, port: int) -> AsyncIterator[None]:
    async def state(request: web.Request) -> web.StreamResponse:
        body = json.dumps(STATE).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)  # chunked: each write goes out as a chunk
        await response.write(body[:10])
        await asyncio.sleep(0.1)
        await response.write(body[10:])
        await response.write_eof()
        return response

    async with stand_in(deployment, port, "processserver", [("GET", PATH, state)]):
        yield


async def test_an_answer_in_pieces_is_read_whole(deployment: Deployment, tmp_path: Path) -> None:
    port = free_port()
    async with _slow_answers(deployment, port):
        client = ProcessServerClient(
            f"https://127.0.0.1:{port}", deployment.client_tls("vm01"),
            request_timeout_s=10, connect_timeout_s=5,
        )  # fmt: skip
        try:
            state = await client.state(DISK)
        finally:
            await client.close()
    assert (state.generation, state.acked_seq, state.shipped_seq) == (4, 1234, 1200)
