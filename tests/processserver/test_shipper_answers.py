"""The shipper against a master target whose refusals make no sense.

A refusal that names no way forward — a gap expecting the very file just
refused, a stale generation when nothing older is cached, an answer without
the field it needs — must be waited out like any failure: neither sent
again at once in a loop, nor allowed to end the shipping task (which stops
the daemon). The stand-in master target counts the PUTs it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.records import Write
from tests.conftest import Deployment
from tests.faults.daemons import free_port
from tests.standin import Route, stand_in

from .test_api import _body, write_ps_config

DISK = "vm01-d0"
#: Seconds the stand-in refuses for.
REFUSING_S = 2.0
#: PUTs a shipper backing off from 0.5 s (doubling, jitter 0.5-1.5) can make
#: in REFUSING_S; one sending again at once makes hundreds.
MAX_PUTS = 8
#: What every refusal carries besides its code and number (docs/api.md).
REFUSAL = {"message": "m", "disk": DISK, "generation": 1, "received_seq": 0,
           "applied_generation": 1, "applied_seq": 0}  # fmt: skip


@contextlib.asynccontextmanager
async def _refusing_master_target(
    deployment: Deployment, port: int, answer: dict[str, object], puts: list[str]
) -> AsyncIterator[None]:
    async def put_hrl(request: web.Request) -> web.Response:
        await request.read()
        puts.append(request.path)
        return web.json_response(answer, status=409)

    route: Route = ("PUT", "/v1/disks/{disk}/hrl/{generation}/{seq}", put_hrl)
    async with stand_in(deployment, port, "mastertarget", [route]):
        yield


@pytest.mark.parametrize(
    "answer",
    [
        {"error": "gap", "expected_seq": 1, **REFUSAL},  # the file it just refused
        {"error": "overlap", "expected_seq": 1, **REFUSAL},
        {"error": "stale-generation", "current_generation": 1, **REFUSAL},  # nothing older
        {"error": "gap"},  # no expected_seq
        {"error": "gap", "expected_seq": "1"},  # not an integer
        {"error": "stale-generation", "current_generation": None},
    ],
    ids=["gap-same", "overlap-same", "stale-same", "gap-no-seq", "gap-text", "stale-null"],
)
async def test_a_refusal_with_no_way_forward_is_waited_out(
    deployment: Deployment, tmp_path: Path, answer: dict[str, object]
) -> None:
    mt_port = free_port()
    config = write_ps_config(deployment, tmp_path)
    config.write_text(
        config.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
    )
    puts: list[str] = []
    async with _refusing_master_target(deployment, mt_port, answer, puts):
        ps = await ProcessServer.start(ps_config.load(config), data_port=0, metrics_port=0)
        try:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
            )
            async with session:
                url = f"https://127.0.0.1:{ps.port}/v1/disks/{DISK}/batches"
                body = _body(DISK, 1, [Write(0, b"\x11" * 4096)])
                async with session.post(url, data=body) as response:
                    assert response.status == 200, await response.text()
            await asyncio.sleep(REFUSING_S)
            print(f"{len(puts)} PUTs in {REFUSING_S:g} s")
            assert 1 <= len(puts) <= MAX_PUTS, (len(puts), json.dumps(answer))
            assert ps.shipper.tasks, "the shipper runs"
            assert all(not task.done() for task in ps.shipper.tasks)
            assert ps.disks[DISK].cached, "the file must stay cached until the master target has it"
        finally:
            await ps.close()
