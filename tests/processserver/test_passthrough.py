"""The digest answer the process server passes through from the master target
(``GET checksums``), when the master target dies in the middle of it.

The status and the first digests have gone out to the agent by then: the
agent's answer must end at once, cut short, so that it asks again (and a
resync pass goes on). The stand-in master target here sends half its
answer and drops the connection, as the kernel does for a process killed
with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from agent.client import ProcessServerClient
from agent.errors import ProcessServerUnavailableError
from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.sequencing import StreamPosition
from tests.conftest import Deployment
from tests.faults.daemons import free_port
from tests.standin import Route, stand_in

from .test_api import write_ps_config

CHUNK = 65536
DIGESTS = 64
DIGEST_BYTES = 16
#: Seconds the agent may wait for the cut to reach it; its read timeout is far longer.
PROMPT_S = 5.0
READ_TIMEOUT_S = 60.0


@contextlib.asynccontextmanager
async def _dying_master_target(deployment: Deployment, port: int) -> AsyncIterator[None]:
    """A master target that answers half the digests asked for, then is gone."""

    async def checksums(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(DIGESTS * DIGEST_BYTES),
                "X-Blockrepl-Chunk": str(CHUNK),
                "X-Blockrepl-Applied-Generation": "1",
                "X-Blockrepl-Applied-Seq": "7",
            }
        )
        await response.prepare(request)
        await response.write(b"\x5a" * (DIGESTS // 2 * DIGEST_BYTES))
        await asyncio.sleep(0.2)  # the half reaches the agent before the end
        assert request.transport is not None
        request.transport.abort()
        return response

    routes: list[Route] = [("GET", "/v1/disks/{disk}/checksums", checksums)]
    async with stand_in(deployment, port, "mastertarget", routes):
        yield


async def test_a_digest_answer_cut_upstream_is_cut_for_the_agent(
    deployment: Deployment, tmp_path: Path
) -> None:
    mt_port = free_port()
    config = write_ps_config(deployment, tmp_path)
    config.write_text(
        config.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
    )
    async with _dying_master_target(deployment, mt_port):
        ps = await ProcessServer.start(ps_config.load(config), data_port=0, metrics_port=0)
        client = ProcessServerClient(
            f"https://127.0.0.1:{ps.port}", deployment.client_tls("vm01"),
            request_timeout_s=READ_TIMEOUT_S, connect_timeout_s=5,
        )  # fmt: skip
        received: list[bytes] = []

        def sink(applied: StreamPosition, digests: bytes) -> None:
            assert applied == StreamPosition(1, 7)
            received.append(digests)

        try:
            ask = client.checksums("vm01-d0", offset=0, length=DIGESTS * CHUNK, chunk=CHUNK,
                                   sink=sink)  # fmt: skip
            with pytest.raises(ProcessServerUnavailableError):
                await asyncio.wait_for(ask, PROMPT_S)
        finally:
            await client.close()
            await ps.close()
    # What came before the cut are the master target's digests, nothing else.
    assert b"".join(received) == b"\x5a" * len(b"".join(received))
    assert len(b"".join(received)) < DIGESTS * DIGEST_BYTES
