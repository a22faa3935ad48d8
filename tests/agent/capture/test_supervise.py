"""The capture's stream supervisor against a process server that breaks every stream.

A stand-in process server takes each new generation and, asked where the
disk stands, names a newer one: every stream the capture starts breaks at
once. The capture must start again after a wait that grows — not in a loop
of starts as fast as the exchanges go.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from agent.capture.plugin import wire
from agent.capture.plugin.dirtymap import Geometry
from agent.capture.replication import CaptureReplication, NewGeneration
from agent.capture.supervisor import supervise
from agent.config import load
from agent.pool import ProcessServerPool
from agent.source import SourceDisk
from agent.state import AgentState
from protocol.limits import MiB
from tests.conftest import Deployment
from tests.faults.daemons import free_port
from tests.standin import Route, stand_in

DISK = "vm01-d0"
WATCH_S = 4.0
#: Generations a supervisor waiting 1, 2, 4 s between quick restarts can
#: start in WATCH_S; one that restarts at once starts hundreds.
MAX_GENERATIONS = 4


@contextlib.asynccontextmanager
async def _always_newer(deployment: Deployment, port: int) -> AsyncIterator[list[int]]:
    generations: list[int] = []

    async def generation(request: web.Request) -> web.Response:
        asked = int(json.loads(await request.read())["generation"])
        generations.append(asked)
        return web.json_response({"disk": DISK, "generation": asked, "acked_seq": 0})

    async def state(_: web.Request) -> web.Response:
        newer = (generations[-1] if generations else 0) + 1
        return web.json_response(
            {"disk": DISK, "generation": newer, "acked_seq": 0, "shipped_seq": 0,
             "backlog_bytes": 0, "backlog_age_s": 0.0, "resync_required": False}
        )  # fmt: skip

    routes: list[Route] = [
        ("POST", "/v1/disks/{disk}/generation", generation),
        ("GET", "/v1/disks/{disk}/state", state),
    ]
    async with stand_in(deployment, port, "processserver", routes):
        yield generations


async def test_streams_broken_at_once_are_started_again_after_a_growing_wait(
    deployment: Deployment, tmp_path: Path
) -> None:
    port = free_port()
    pki = deployment.pki
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        f'process_servers = ["https://127.0.0.1:{port}"]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[tls]\nca_file = "{pki / "ca.pem"}"\ncert_file = "{pki / "machine-vm01.pem"}"\n'
        f'key_file = "{pki / "machine-vm01.key"}"\n[[disks]]\nid = "{DISK}"\n'
    )
    config = load(config_path)
    source = tmp_path / "source.raw"
    source.write_bytes(bytes(MiB))
    pool = ProcessServerPool(
        config.process_servers, deployment.client_tls("vm01"), request_timeout_s=10,
        connect_timeout_s=5, give_up_after_s=60, gives_up=False,
    )  # fmt: skip
    sent: list[wire.Frame] = []

    async def mark_pending(
        ranges: list[tuple[int, int]], rid: int, live: bool
    ) -> list[tuple[int, int]]:
        return ranges

    async with _always_newer(deployment, port) as generations:
        with ThreadPoolExecutor(2) as executor:
            replication = CaptureReplication(
                disk_id=DISK, config=config, state=AgentState(config.state_dir), pool=pool,
                source=SourceDisk(source), geometry=Geometry(MiB // 4, MiB), executor=executor,
                send=sent.append, mark_pending=mark_pending,
            )  # fmt: skip
            replication.next_stream = NewGeneration(full=True)
            supervisor = asyncio.create_task(supervise(replication))
            await asyncio.sleep(WATCH_S)
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            await replication.close()
        await pool.close()
    print(f"{len(generations)} generations started in {WATCH_S:g} s")
    assert 2 <= len(generations) <= MAX_GENERATIONS, generations
