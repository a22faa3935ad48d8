"""A resync pass whose stream is taken down ends with it, and the next stream resyncs its regions.

A pass compares digests only once the master target applied what its stream
sent before it. The stand-in process server here acknowledges every batch
but never ships one, so the master target's digests always say nothing is
applied: a pass on that stream waits, trying again and again (the capture
never gives up on its process servers). Then the process server names a
newer generation: the stream is taken down, and what it sent will never be
applied. The pass must end with its stream — before, it waited for good,
its region stayed "being resynced", and the window never closed — and the
next generation's pass must resync the region and close the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from agent.capture.plugin import wire
from agent.capture.plugin.dirtymap import Geometry
from agent.capture.replication import CaptureReplication, NewGeneration
from agent.capture.resync import run_resyncs
from agent.capture.supervisor import supervise
from agent.config import load
from agent.pool import ProcessServerPool
from agent.source import SourceDisk
from agent.state import AgentState
from protocol.batch import BatchDecoder
from protocol.limits import MiB
from tests.conftest import Deployment
from tests.faults.daemons import free_port
from tests.standin import Route, stand_in

DISK = "vm01-d0"
SIZE = MiB
REGION = MiB // 4
#: Seconds the test gives each step; the stream's state polls and the
#: supervisor's restart wait take a few.
STEP_S = 20.0


@dataclass
class Peer:
    """What the stand-in process server holds."""

    generation: int = 0
    #: the first generation started here
    first: int = 0
    acked: int = 0
    #: a generation to name as the current one in state answers (a newer agent's)
    newer: int = 0
    checksum_requests: list[int] = field(default_factory=list)

    @property
    def current(self) -> int:
        return max(self.generation, self.newer)


@contextlib.asynccontextmanager
async def _never_ships(deployment: Deployment, port: int) -> AsyncIterator[Peer]:
    peer = Peer()

    async def generation(request: web.Request) -> web.Response:
        asked, current = int(json.loads(await request.read())["generation"]), peer.current
        if asked <= current:  # as a process server answers: name the current one
            refusal = {"error": "stale-generation", "current_generation": current,
                       "message": f"a new generation must be above {current}"}  # fmt: skip
            return web.json_response(refusal, status=409)
        peer.generation, peer.acked = asked, 0
        peer.first = peer.first or asked
        return web.json_response({"disk": DISK, "generation": peer.generation, "acked_seq": 0})

    async def batches(request: web.Request) -> web.Response:
        decoder = BatchDecoder(expected_disk_id=DISK)
        decoder.feed(await request.read())
        decoder.feed_eof()
        for batch in decoder.events():
            peer.acked = batch.header.first_seq + batch.header.record_count - 1
        answer = {"disk": DISK, "generation": peer.generation, "acked_seq": peer.acked}
        return web.json_response(answer)

    async def state(_: web.Request) -> web.Response:
        return web.json_response(
            {"disk": DISK, "generation": peer.current,
             "acked_seq": peer.acked, "shipped_seq": 0, "backlog_bytes": 0,
             "backlog_age_s": 0.0, "resync_required": False}
        )  # fmt: skip

    async def checksums(request: web.Request) -> web.Response:
        length, chunk = int(request.query["length"]), int(request.query["chunk"])
        peer.checksum_requests.append(peer.generation)
        headers = {
            "X-Blockrepl-Chunk": str(chunk),
            # Nothing is ever shipped: the master target holds the first generation's
            # start and nothing after it.
            "X-Blockrepl-Applied-Generation": str(peer.first),
            "X-Blockrepl-Applied-Seq": "0",
        }
        body = bytes(16 * -(-length // chunk))
        return web.Response(body=body, headers=headers, content_type="application/octet-stream")

    routes: list[Route] = [
        ("POST", "/v1/disks/{disk}/generation", generation),
        ("POST", "/v1/disks/{disk}/batches", batches),
        ("GET", "/v1/disks/{disk}/state", state),
        ("GET", "/v1/disks/{disk}/checksums", checksums),
    ]
    async with stand_in(deployment, port, "processserver", routes):
        yield peer


async def _until(what: str, check: object) -> None:
    assert callable(check)
    deadline = asyncio.get_running_loop().time() + STEP_S
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"not {what} after {STEP_S} s"
        await asyncio.sleep(0.05)


async def test_a_pass_ends_with_its_stream_and_the_next_one_resyncs(
    deployment: Deployment, tmp_path: Path
) -> None:
    port = free_port()
    pki = deployment.pki
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        f'process_servers = ["https://127.0.0.1:{port}"]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[tls]\nca_file = "{pki / "ca.pem"}"\ncert_file = "{pki / "machine-vm01.pem"}"\n'
        f'key_file = "{pki / "machine-vm01.key"}"\n[sync]\nchunk_bytes = 65536\n'
        f'region_bytes = {REGION}\n[[disks]]\nid = "{DISK}"\n'
    )
    config = load(config_path)
    source = tmp_path / "source.raw"
    source.write_bytes(bytes(SIZE))
    pool = ProcessServerPool(
        config.process_servers, deployment.client_tls("vm01"), request_timeout_s=10,
        connect_timeout_s=5, give_up_after_s=60, gives_up=False,
    )  # fmt: skip

    async def mark_pending(
        ranges: list[tuple[int, int]], rid: int, live: bool
    ) -> list[tuple[int, int]]:
        return ranges

    async with _never_ships(deployment, port) as peer:
        with ThreadPoolExecutor(2) as executor, ThreadPoolExecutor(1) as hashing:
            replication = CaptureReplication(
                disk_id=DISK, config=config, state=AgentState(config.state_dir), pool=pool,
                source=SourceDisk(source), geometry=Geometry(REGION, SIZE), executor=executor,
                send=lambda _: None, mark_pending=mark_pending,
            )  # fmt: skip
            replication.next_stream = NewGeneration(full=False)
            tasks = [
                asyncio.create_task(supervise(replication)),
                asyncio.create_task(
                    run_resyncs(replication, executor=executor, hash_executor=hashing)
                ),
            ]
            try:
                # The first generation's pass (over nothing) ends the window at once.
                await _until("streaming", lambda: replication.stream is not None)
                await _until("settled", lambda: not replication.window.is_open)
                first = peer.generation
                # A write the source refused: its region waits for a pass, which now
                # waits for the master target to apply what the stream sent.
                replication.failed(wire.Frame(wire.FrameType.FAILED, rid=1, offset=0, length=4096))
                await _until("resyncing", lambda: replication.window.resyncing_regions == 1)
                asked = len(peer.checksum_requests)
                await _until("asking again", lambda: len(peer.checksum_requests) > asked + 1)
                assert replication.window.resyncing_regions == 1  # still waiting

                peer.newer = first + 5  # another agent's generation: this stream is done
                await _until("on a newer generation", lambda: peer.generation > peer.newer)
                await _until("resynced and settled", lambda: not replication.window.is_open)
                assert replication.window.resyncing_regions == 0
                assert replication.window.pending_regions == 0
                assert peer.generation in peer.checksum_requests  # the new stream's pass
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await replication.close()
        await pool.close()
