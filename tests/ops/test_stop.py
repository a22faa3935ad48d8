"""SIGTERM to the real daemons (systemd's stop): a request in flight finishes
and is durable, new connections are refused meanwhile, /readyz says why, and
the daemon exits 0 within the stop timeout its unit gives it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from protocol.hrl import HrlSealer
from protocol.records import Write
from tests.conftest import Deployment
from tests.faults.daemons import Daemon
from tests.processserver.test_api import _body

from .running import Ports, mt_config_text, ps_config_text, start_daemon, wait_metric, wait_ready
from .running import wait_until as poll

#: Seconds the test gives a stopping daemon to exit once its request is done:
#: far below the units' TimeoutStopSec.
EXIT_TIMEOUT_S = 30


async def _held_body(body: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    """Half the body now, the rest once ``release`` is set: a request kept in flight."""
    yield body[: len(body) // 2]
    await release.wait()
    yield body[len(body) // 2 :]


async def _drain_while_stopping(
    daemon: Daemon,
    ports: Ports,
    prefix: str,
    request: asyncio.Task[tuple[int, dict]],  # type: ignore[type-arg]
) -> None:
    """SIGTERM once ``request`` is in flight; check the daemon drains instead of dropping it."""
    await wait_metric(ports.metrics_url, f"{prefix}_requests_in_flight", 1)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)

    async def not_ready() -> str | None:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{ports.metrics_url}/readyz") as answer,
        ):
            text = await answer.text()
            return text if answer.status == 503 else None

    assert (await poll(not_ready, "/readyz to answer 503")).strip() == "shutting down"
    with pytest.raises(ConnectionRefusedError):  # the data port is closed to new connections
        await asyncio.open_connection("127.0.0.1", ports.data)
    assert not request.done()


async def test_processserver_finishes_the_batch_in_flight_on_sigterm(
    deployment: Deployment, tmp_path: Path
) -> None:
    ports = Ports()
    config = tmp_path / "processserver.toml"
    config.write_text(ps_config_text(deployment, tmp_path, ports))
    ps = start_daemon("processserver.cli", config, tmp_path / "ps.log")
    await wait_ready(ps, ports)
    body = _body("vm01-d0", 1, [Write(0, os.urandom(256 * 1024)), Write(2**20, b"z" * 4096)])
    release = asyncio.Event()
    base = f"https://127.0.0.1:{ports.data}/v1/disks/vm01-d0"
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post() -> tuple[int, dict]:  # type: ignore[type-arg]
            async with session.post(f"{base}/batches", data=_held_body(body, release)) as answer:
                return answer.status, await answer.json()

        request = asyncio.create_task(post())
        await _drain_while_stopping(ps, ports, "blockrepl_processserver", request)
        release.set()
        status, answer = await request
    assert (status, answer["acked_seq"]) == (200, 2), answer
    assert ps.proc is not None
    assert ps.proc.wait(timeout=EXIT_TIMEOUT_S) == 0
    assert "process server stopped" in ps.log.read_text()

    ps.start()  # the acknowledged batch survived the stop
    await wait_ready(ps, ports)
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
        ) as session,
        session.get(f"{base}/state") as answer,
    ):
        state = await answer.json()
    assert (state["acked_seq"], state["backlog_bytes"] > 0) == (2, True)
    assert ps.stop() == 0


async def test_mastertarget_stores_the_file_in_flight_on_sigterm(
    deployment: Deployment, tmp_path: Path
) -> None:
    ports = Ports()
    config = tmp_path / "mastertarget.toml"
    config.write_text(mt_config_text(deployment, tmp_path, ports))
    mt = start_daemon("mastertarget.cli", config, tmp_path / "mt.log")
    await wait_ready(mt, ports)
    data = os.urandom(128 * 1024)
    now = time.time_ns()
    sealed = HrlSealer(deployment.keyring).seal_records(
        [Write(4096, data)], disk_id="vm01-d0", generation=1, first_seq=1,
        first_capture_ns=now, last_capture_ns=now, receive_ns=now, salt=os.urandom(32),
    )  # fmt: skip
    release = asyncio.Event()
    base = f"https://127.0.0.1:{ports.data}/v1/disks/vm01-d0"
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("ps01"))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def put() -> tuple[int, dict]:  # type: ignore[type-arg]
            body = _held_body(sealed.to_bytes(), release)
            async with session.put(f"{base}/hrl/1/1", data=body) as answer:
                return answer.status, await answer.json()

        request = asyncio.create_task(put())
        await _drain_while_stopping(mt, ports, "blockrepl_mastertarget", request)
        release.set()
        status, answer = await request
    assert status == 200, answer
    assert mt.proc is not None
    assert mt.proc.wait(timeout=EXIT_TIMEOUT_S) == 0
    assert "master target stopped" in mt.log.read_text()

    mt.start()  # the acknowledged file is applied, at the stop or at this start
    await wait_ready(mt, ports)
    await wait_metric(ports.metrics_url, "blockrepl_mastertarget_applied_seq", 1, disk="vm01-d0")
    assert mt.stop() == 0
    with (tmp_path / "vm01-d0.raw").open("rb") as target:
        target.seek(4096)
        assert target.read(len(data)) == data
