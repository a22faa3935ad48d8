"""The process server for real: mutual TLS on loopback, batches POSTed over
HTTPS, sealed into the cache, acknowledged once durable."""

from __future__ import annotations

import asyncio
import os
import random
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.batch import encode_batch
from protocol.hrl import open_hrl
from protocol.limits import MiB
from protocol.records import Record, Write
from runtime.uploads import in_pieces
from tests.conftest import Deployment
from tests.waiting import until


def write_ps_config(deployment: Deployment, root: Path, **extra: object) -> Path:
    pki = deployment.pki
    lines = [
        f'key_file = "{deployment.key_file}"',
        f'cache_dir = "{root / "cache"}"',
        *(f"{k} = {v}" for k, v in extra.items()),
        "[tls]",
        f'ca_file = "{pki / "ca.pem"}"',
        f'cert_file = "{pki / "processserver.pem"}"',
        f'key_file = "{pki / "processserver.key"}"',
        "[master_target]",
        'url = "https://127.0.0.1:9"',
        "[master_target.tls]",
        f'ca_file = "{pki / "ca.pem"}"',
        f'cert_file = "{pki / "machine-ps01.pem"}"',
        f'key_file = "{pki / "machine-ps01.key"}"',
        "[[machines]]",
        'id = "vm01"',
        'disks = ["vm01-d0", "vm01-d1"]',
        "[[machines]]",
        'id = "db01"',
        'disks = ["db01-d0"]',
    ]
    path = root / "processserver.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _body(
    disk: str, first: int, records: list[Record], generation: int = 1, *, capture_ns: int = 1
) -> bytes:
    return encode_batch(
        disk_id=disk, generation=generation, first_seq=first, records=records,
        first_capture_ns=capture_ns, last_capture_ns=capture_ns + 1,
    )  # fmt: skip


class Agent:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"https://127.0.0.1:{port}/v1/disks"

    async def post(self, disk: str, body: bytes, query: str = "") -> tuple[int, dict]:  # type: ignore[type-arg]
        url = f"{self.base}/{disk}/batches" + (f"?{query}" if query else "")
        # In pieces, as the agent sends: a 16 MiB body written whole holds the
        # loop the daemon shares for one long callback, which the loop guard
        # (tests/conftest.py) would count against the daemon.
        async with self.session.post(url, data=in_pieces([body])) as response:
            return response.status, await response.json()

    async def state(self, disk: str) -> dict:  # type: ignore[type-arg]
        async with self.session.get(f"{self.base}/{disk}/state") as response:
            assert response.status == 200
            return await response.json()  # type: ignore[no-any-return]


@pytest_asyncio.fixture
async def start_ps(deployment: Deployment) -> AsyncIterator[object]:
    running: list[tuple[ProcessServer, list[aiohttp.ClientSession]]] = []

    async def start(config_path: Path, machine: str = "vm01") -> tuple[ProcessServer, Agent]:
        ps = await ProcessServer.start(ps_config.load(config_path), data_port=0, metrics_port=0)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=deployment.client_tls(machine))
        )
        running.append((ps, [session]))
        return ps, Agent(session, ps.port)

    yield start
    for ps, sessions in running:
        for session in sessions:
            await session.close()
        await ps.close()


async def test_batches_are_cached_and_acknowledged(
    deployment: Deployment,
    start_ps,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    ps, agent = await start_ps(write_ps_config(deployment, tmp_path))
    rng = random.Random(1)
    records: list[Record] = [Write(i * 65536, rng.randbytes(65536)) for i in range(8)]
    body = _body("vm01-d0", 1, records[:4]) + _body("vm01-d0", 5, records[4:])
    status, answer = await agent.post("vm01-d0", body)
    assert (status, answer["acked_seq"], answer["generation"]) == (200, 8, 1)
    files = sorted((tmp_path / "cache" / "disks" / "vm01-d0").glob("*.hrl"))
    assert len(files) == 2
    opened = [open_hrl(f.read_bytes(), deployment.keyring) for f in files]
    assert opened[0].records + opened[1].records == tuple(records)
    status, answer = await agent.post("vm01-d0", _body("vm01-d0", 1, records[:4]))
    assert (status, answer["acked_seq"]) == (200, 8)  # a duplicate: no-op
    status, answer = await agent.post("vm01-d0", _body("vm01-d0", 12, records[:1]))
    assert (status, answer["error"], answer["expected_seq"]) == (409, "gap", 9)
    state = await agent.state("vm01-d0")
    assert (state["acked_seq"], state["shipped_seq"], state["resync_required"]) == (8, 0, False)
    assert state["backlog_bytes"] == sum(f.stat().st_size for f in files)
    assert (
        ps.metrics.registry.get_sample_value(
            "blockrepl_processserver_batches_in_total", {"disk": "vm01-d0"}
        )
        == 3
    )


async def test_position_survives_a_restart_and_generations_move_on(
    deployment: Deployment,
    start_ps,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    config = write_ps_config(deployment, tmp_path)
    ps, agent = await start_ps(config)
    assert (await agent.post("vm01-d1", _body("vm01-d1", 1, [Write(0, b"a")])))[0] == 200
    await ps.close()
    _, agent2 = await start_ps(config)
    assert (await agent2.state("vm01-d1"))["acked_seq"] == 1
    url = f"{agent2.base}/vm01-d1/generation"
    async with agent2.session.post(url, json={"generation": 2}) as response:
        assert (response.status, (await response.json())["generation"]) == (200, 2)
    async with agent2.session.post(url, json={"generation": 2}) as response:
        assert response.status == 409
    async with agent2.session.post(url, data=b"[" * 2000) as response:  # nested past json's depth
        assert (response.status, (await response.json())["error"]) == (400, "malformed")
    status, answer = await agent2.post("vm01-d1", _body("vm01-d1", 1, [Write(0, b"b")]))
    assert (status, answer["error"]) == (409, "stale-generation")
    status, answer = await agent2.post("vm01-d1", _body("vm01-d1", 1, [Write(0, b"b")], 2))
    assert (status, answer["acked_seq"], answer["generation"]) == (200, 1, 2)


async def test_a_machine_may_write_only_its_own_disks(
    deployment: Deployment,
    start_ps,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    ps, agent = await start_ps(write_ps_config(deployment, tmp_path))
    status, answer = await agent.post("db01-d0", _body("db01-d0", 1, [Write(0, b"x")]))
    assert (status, answer["error"]) == (403, "forbidden")
    assert "vm01" in answer["message"]
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("intruder"))
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"https://127.0.0.1:{ps.port}/v1/disks/vm01-d0/batches"
        async with session.post(url, data=_body("vm01-d0", 1, [Write(0, b"x")])) as response:
            assert response.status == 403
    assert not list((Path(ps.config.cache_dir) / "disks" / "db01-d0").glob("*.hrl"))


@pytest.mark.parametrize("minimum", [ssl.TLSVersion.TLSv1_2])
async def test_tls12_foreign_and_missing_certificates_are_refused(
    deployment: Deployment,
    start_ps,
    tmp_path: Path,
    minimum: ssl.TLSVersion,  # type: ignore[no-untyped-def]
) -> None:
    ps, _ = await start_ps(write_ps_config(deployment, tmp_path))
    url = f"https://127.0.0.1:{ps.port}/v1/disks/vm01-d0/state"
    old = deployment.client_tls("vm01")
    old.minimum_version = old.maximum_version = minimum
    foreign = deployment.client_tls("ps01", pki=deployment.other_pki)
    anonymous = ssl.create_default_context(cafile=deployment.pki / "ca.pem")  # no client cert
    for context in (old, foreign, anonymous):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as s:
            with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError)):
                async with s.get(url):
                    pass


async def test_fuzzed_bodies_get_400_and_the_server_keeps_serving(
    deployment: Deployment,
    start_ps,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    _, agent = await start_ps(write_ps_config(deployment, tmp_path))
    rng = random.Random(4)
    good = _body("vm01-d0", 1, [Write(0, b"good" * 100)])
    for _ in range(40):
        body = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] ^= rng.randint(1, 255)
        status, answer = await agent.post("vm01-d0", bytes(body[: rng.randint(1, len(body))]))
        assert status in (400, 413), answer
        assert answer["error"]
    assert (await agent.post("vm01-d0", good))[0] == 200


async def test_a_full_cache_answers_503_and_takes_batches_again_below_the_low_mark(
    deployment: Deployment,
    start_ps,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    config = write_ps_config(
        deployment, tmp_path, cache_high_bytes=34 * MiB, cache_low_bytes=32 * MiB
    )
    ps, agent = await start_ps(config)
    chunk = [Write(i * 4 * MiB, os.urandom(4 * MiB)) for i in range(4)]  # 16 MiB, incompressible
    seq = 1
    for _ in range(3):
        assert (await agent.post("vm01-d0", _body("vm01-d0", seq, chunk)))[0] == 200
        seq += len(chunk)
    status, answer = await agent.post("vm01-d0", _body("vm01-d0", seq, chunk))
    assert (status, answer["error"]) == (503, "cache-full")
    assert (await agent.state("vm01-d0"))["acked_seq"] == seq - 1  # nothing was dropped
    for cached in list(ps.disks["vm01-d0"].cached)[:2]:  # as the shipper would
        ps.cache.remove(cached)
    assert (await agent.post("vm01-d0", _body("vm01-d0", seq, chunk)))[0] == 200


async def test_a_request_that_comes_ahead_of_its_turn_waits_for_the_one_before(
    deployment: Deployment,
    start_ps,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """An agent with two requests of a disk in flight: the second one's handler
    runs first and takes the disk's lock. Its batches wait for the first
    request's instead of being refused as a gap (runtime/inorder.py)."""
    ps, agent = await start_ps(write_ps_config(deployment, tmp_path))
    rng = random.Random(2)
    records: list[Record] = [Write(i * 4096, rng.randbytes(4096)) for i in range(8)]
    stream = ps.disks["vm01-d0"]
    go_on = asyncio.Event()

    async def held_back() -> AsyncIterator[bytes]:
        body = _body("vm01-d0", 5, records[4:])
        yield body[:16]  # the client sends its headers with the first piece
        await go_on.wait()
        yield body[16:]

    url = f"{agent.base}/vm01-d0/batches"

    async def post_later() -> tuple[int, dict]:  # type: ignore[type-arg]
        async with agent.session.post(url, data=held_back()) as response:
            return response.status, await response.json()

    later = asyncio.create_task(post_later())
    await until("the later request holding the lock", stream.request_lock.locked)
    earlier = asyncio.create_task(agent.post("vm01-d0", _body("vm01-d0", 1, records[:4])))
    await until("both requests open", lambda: stream.requests.open == 2)
    go_on.set()
    (status_later, answer_later), (status_earlier, answer_earlier) = await asyncio.gather(
        later, earlier
    )
    assert (status_earlier, answer_earlier["acked_seq"]) == (200, 4)
    assert (status_later, answer_later["acked_seq"]) == (200, 8), answer_later
    files = sorted((tmp_path / "cache" / "disks" / "vm01-d0").glob("*.hrl"))
    opened = [open_hrl(f.read_bytes(), deployment.keyring) for f in files]
    assert [r for f in opened for r in f.records] == records
    gaps = ps.metrics.registry.get_sample_value(
        "blockrepl_processserver_rejects_total", {"reason": "gap"}
    )
    assert not gaps
