"""The data API and the admin socket served with only the pieces they are
given (a replica, the config, the metrics, the key ring, the executor, the
catalog) and no daemon around them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from mastertarget import config as mt_config
from mastertarget.admin import build_admin_app
from mastertarget.config import MasterTargetConfig
from mastertarget.inbox import Inbox
from mastertarget.journal import UndoJournal
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.replica import DiskReplica
from mastertarget.server import build_app
from mastertarget.state import StateStore
from protocol.hrl import HrlSealer, SealedHrl
from protocol.records import Record, Tag, TagKind, Write
from protocol.sequencing import StreamPosition
from runtime.tls import ReloadableServerContext
from tests.conftest import Deployment
from tests.waiting import until

from .conftest import write_config

SIZE = 2 * 2**20


@dataclass
class Pieces:
    config: MasterTargetConfig
    replica: DiskReplica
    store: StateStore
    metrics: MasterTargetMetrics
    executor: ThreadPoolExecutor
    sealer: HrlSealer


@contextlib.asynccontextmanager
async def _pieces(deployment: Deployment, root: Path) -> AsyncIterator[Pieces]:
    disk = {"id": "d0", "target": root / "t.raw", "create": True, "size_bytes": SIZE}
    config_path = write_config(deployment, root, [disk])
    config = mt_config.load(config_path)
    executor = ThreadPoolExecutor(max_workers=4)
    store = StateStore(root / "retention" / "state.db")
    metrics = MasterTargetMetrics(CollectorRegistry())
    replica = await DiskReplica.open(
        config.disks[0], store=store, inbox=Inbox(config.cache_dir), keyring=deployment.keyring,
        metrics=metrics, executor=executor,
        journal=UndoJournal(root / "retention" / "journal", deployment.keyring),
    )  # fmt: skip
    replica.start()
    try:
        yield Pieces(config, replica, store, metrics, executor, HrlSealer(deployment.keyring))
    finally:
        await replica.close()
        store.close()
        executor.shutdown()


def _seal(sealer: HrlSealer, seq: int, records: list[Record]) -> SealedHrl:
    now = time.time_ns()
    return sealer.seal_records(
        records, disk_id="d0", generation=1, first_seq=seq, first_capture_ns=now,
        last_capture_ns=now, receive_ns=now, salt=os.urandom(32),
    )  # fmt: skip


@contextlib.asynccontextmanager
async def _served(app: web.Application, site: str, where: object) -> AsyncIterator[web.AppRunner]:
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        if site == "unix":
            await web.UnixSite(runner, str(where)).start()
        else:
            assert isinstance(where, ReloadableServerContext)
            await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=where.context).start()
        yield runner
    finally:
        await runner.cleanup()


async def test_the_admin_socket_needs_no_daemon(deployment: Deployment, tmp_path: Path) -> None:
    async with _pieces(deployment, tmp_path) as pieces:
        receiver = pieces.replica.receiver
        tag = Tag(TagKind.APP, bytes(16), "t1", 0)
        for sealed in (
            _seal(pieces.sealer, 1, [Write(0, b"A" * 4096), tag]),
            _seal(pieces.sealer, 3, [Write(0, b"B" * 4096)]),
        ):
            async with receiver.put_lock:
                await receiver.store(sealed.header, sealed.to_bytes())
        await pieces.replica.wait_applied(StreamPosition(1, 3))
        app = build_admin_app(
            replicas={"d0": pieces.replica}, config=lambda: pieces.config,
            metrics=pieces.metrics, executor=pieces.executor, catalog=pieces.store,
        )  # fmt: skip
        socket = tmp_path / "a.sock"
        async with (
            _served(app, "unix", socket),
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as client,
        ):
            async with client.get("http://mt/v1/disks/d0/points") as answer:
                assert answer.status == 200
                listing = await answer.json()
            output = tmp_path / "at-t1.raw"
            body = {"point": "tag:t1", "output": str(output)}
            async with client.post("http://mt/v1/disks/d0/recover", json=body) as answer:
                assert answer.status == 200, await answer.text()
            async with client.get("http://mt/v1/groups/g/points") as answer:
                assert (answer.status, (await answer.json())["error"]) == (404, "unknown-group")
    assert [(p["seq"], p["kind"]) for p in listing["points"]] == [
        (3, "crash"), (2, "crash"), (2, "app"),
    ]  # fmt: skip
    assert output.read_bytes()[:4096] == b"A" * 4096
    count = pieces.metrics.registry.get_sample_value("blockrepl_mastertarget_recover_seconds_count")
    assert count == 1


@pytest.mark.parametrize("machine", ["ps01", "vm01"])
async def test_the_data_api_needs_no_daemon(
    deployment: Deployment, tmp_path: Path, machine: str
) -> None:
    async with _pieces(deployment, tmp_path) as pieces:
        app = build_app(
            replicas={"d0": pieces.replica}, config=lambda: pieces.config,
            metrics=pieces.metrics, keyring=deployment.keyring, executor=pieces.executor,
        )  # fmt: skip
        server_tls = ReloadableServerContext(pieces.config.tls)
        connector = aiohttp.TCPConnector(ssl=deployment.client_tls(machine))
        async with (
            _served(app, "tcp", server_tls) as runner,
            aiohttp.ClientSession(connector=connector) as client,
        ):
            base = f"https://127.0.0.1:{runner.addresses[0][1]}/v1/disks/d0"
            sealed = _seal(pieces.sealer, 1, [Write(0, b"C" * 4096)])
            async with client.put(f"{base}/hrl/1/1", data=sealed.to_bytes()) as answer:
                status, put = answer.status, await answer.json()
            if machine != "ps01":  # not a process server of the config
                assert (status, put["error"]) == (403, "forbidden")
                return
            assert (status, put["received_seq"]) == (200, 1)
            await pieces.replica.wait_applied(StreamPosition(1, 1))
            async with client.get(f"{base}/state") as answer:
                state = await answer.json()
    assert (state["applied_seq"], state["state"]) == (1, "replicating")
    assert (tmp_path / "t.raw").read_bytes()[:4096] == b"C" * 4096


async def test_a_run_that_comes_ahead_of_its_turn_waits_for_the_one_before(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A process server with two PUTs of a disk in flight: the second one's body
    is in first. It waits for the first instead of being refused as a gap
    (runtime/inorder.py), and both are stored in order."""
    async with _pieces(deployment, tmp_path) as pieces:
        app = build_app(
            replicas={"d0": pieces.replica}, config=lambda: pieces.config,
            metrics=pieces.metrics, keyring=deployment.keyring, executor=pieces.executor,
        )  # fmt: skip
        first = _seal(pieces.sealer, 1, [Write(0, b"D" * 4096)]).to_bytes()
        second = _seal(pieces.sealer, 2, [Write(4096, b"E" * 4096)]).to_bytes()
        go_on = asyncio.Event()

        async def held_back() -> AsyncIterator[bytes]:
            yield first[:16]  # the client sends its headers with the first piece
            await go_on.wait()
            yield first[16:]

        receiver = pieces.replica.receiver
        connector = aiohttp.TCPConnector(ssl=deployment.client_tls("ps01"))
        async with (
            _served(app, "tcp", ReloadableServerContext(pieces.config.tls)) as runner,
            aiohttp.ClientSession(connector=connector) as client,
        ):
            base = f"https://127.0.0.1:{runner.addresses[0][1]}/v1/disks/d0"

            async def put(seq: int, body: object) -> tuple[int, dict[str, object]]:
                headers = {"Content-Length": str(len(first if seq == 1 else second))}
                async with client.put(f"{base}/hrl/1/{seq}", data=body, headers=headers) as answer:
                    return answer.status, await answer.json()

            earlier = asyncio.create_task(put(1, held_back()))
            await until("the first PUT open", lambda: receiver.puts.open == 1)
            later = asyncio.create_task(put(2, second))
            await until(
                "both PUTs open, the lock free",
                lambda: receiver.puts.open == 2 and not receiver.put_lock.locked(),
            )
            await asyncio.sleep(0.1)  # the later one found the gap and waits
            assert not later.done()
            go_on.set()
            answers = await asyncio.gather(earlier, later)
        await pieces.replica.wait_applied(StreamPosition(1, 2))
    assert [(status, answer["received_seq"]) for status, answer in answers] == [(200, 1), (200, 2)]
    assert (tmp_path / "t.raw").read_bytes()[:8192] == b"D" * 4096 + b"E" * 4096
