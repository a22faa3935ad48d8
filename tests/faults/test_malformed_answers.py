"""Every client against a peer whose answers break docs/api.md.

A stand-in peer (tests/standin.py) answers each call with a body in one of
the shapes below: not JSON, JSON that is no object, a field missing, of the
wrong type, a bool for an integer, a negative seq, nested too deep, empty,
longer than any answer may be — and, as the control, a good answer sent in
several pieces, which must be read whole. A malformed answer must be a
counted failure that is tried again later: never a crash, a dead task or a
result made up from half an answer.

Clients: the agent's ProcessServerClient (each call, and its stream), the
process server's shipper, its ``follow_master_target`` (a gap while nothing
is cached) and its checksum pass-through, and ``mastertarget points``
reading the admin socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agent.client import ProcessServerClient
from agent.errors import ProcessServerUnavailableError, RefusedError
from agent.journal import EntryKind
from agent.pool import ProcessServerPool
from agent.state import AgentState
from agent.stream import ReplicationStream
from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.api import MAX_ANSWER_BYTES
from protocol.records import NO_FLAGS, Write
from tests.conftest import Deployment
from tests.faults.daemons import free_port
from tests.mastertarget.conftest import write_config
from tests.mastertarget.test_cli import _cli
from tests.processserver.test_api import _body, write_ps_config
from tests.standin import Route, stand_in

DISK = "vm01-d0"
#: Seconds between the pieces of an answer sent in several.
PIECE_PAUSE_S = 0.05
#: How long a client may take to give an answer up as malformed, or to ship.
SETTLE_S = 10.0

SHAPES = (
    "not-json", "not-object", "missing-field", "wrong-type", "bool-for-int", "negative",
    "nested-deep", "empty", "too-long", "in-pieces",
)  # fmt: skip
MALFORMED = tuple(s for s in SHAPES if s != "in-pieces")
#: Levels of a body nested too deep: json gives up after a thousand or so;
#: both brackets fit under MAX_ANSWER_BYTES, so the nesting is what fails.
NESTING = 30_000


def shaped(shape: str, valid: dict[str, object], key: str) -> list[bytes]:
    """The pieces of an answer: ``valid`` broken at ``key`` as ``shape`` says."""
    broken: object
    match shape:
        case "not-json":
            return [b"<html><body>502 Bad Gateway</body></html>"]
        case "nested-deep":  # deeper than json reads, shorter than the bound
            return [b"[" * NESTING, b"]" * NESTING]
        case "empty":
            return []
        case "in-pieces":
            raw = json.dumps(valid).encode()
            third = len(raw) // 3
            return [raw[:third], raw[third : 2 * third], raw[2 * third :]]
        case "not-object":
            broken = [valid]
        case "missing-field":
            broken = {k: v for k, v in valid.items() if k != key}
        case "wrong-type":
            value = valid[key]
            broken = {**valid, key: 5 if isinstance(value, str) else str(value)}
        case "bool-for-int":
            broken = {**valid, key: True}
        case "negative":
            broken = {**valid, key: -1}
        case "too-long":
            broken = {**valid, "padding": "x" * MAX_ANSWER_BYTES}
        case _:  # pragma: no cover
            raise AssertionError(shape)
    return [json.dumps(broken).encode()]


async def _answer(request: web.Request, status: int, pieces: list[bytes]) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
    await response.prepare(request)  # chunked: each write goes out as a chunk
    for n, piece in enumerate(pieces):
        if n:
            await asyncio.sleep(PIECE_PAUSE_S)
        await response.write(piece)
    await response.write_eof()
    return response


def _route(method: str, path: str, status: int, pieces: list[bytes]) -> Route:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _answer(request, status, pieces)

    return (method, path, handler)


# --- the agent's client -----------------------------------------------------------------

POSITION = {"disk": DISK, "generation": 3, "acked_seq": 40}
PS_STATE = {**POSITION, "shipped_seq": 30, "backlog_bytes": 99, "backlog_age_s": 0.5,
            "resync_required": False}  # fmt: skip
GAP = {"error": "gap", "message": "expected seq 41 of generation 3 next", "expected_seq": 41,
       **POSITION}  # fmt: skip
STALE = {"error": "stale-generation", "message": "m", "current_generation": 3}

Call = Callable[[ProcessServerClient], Awaitable[object]]
BATCHES, STATE, GENERATION = (
    f"/v1/disks/{DISK}/batches", f"/v1/disks/{DISK}/state", f"/v1/disks/{DISK}/generation",
)  # fmt: skip

#: name: (method, path, status, valid answer, field to break, the call)
CALLS: dict[str, tuple[str, str, int, dict[str, object], str, Call]] = {
    "post-batches-200": ("POST", BATCHES, 200, POSITION, "acked_seq",
                         lambda c: c.post_batches(DISK, b"batches")),
    "post-batches-409": ("POST", BATCHES, 409, GAP, "expected_seq",
                         lambda c: c.post_batches(DISK, b"batches")),
    "state": ("GET", STATE, 200, PS_STATE, "shipped_seq", lambda c: c.state(DISK)),
    "long-poll": ("GET", STATE, 200, PS_STATE, "acked_seq",
                  lambda c: c.state(DISK, until_shipped=40, wait_s=1)),
    "start-generation-200": ("POST", GENERATION, 200, POSITION, "generation",
                             lambda c: c.start_generation(DISK, 3)),
    "start-generation-409": ("POST", GENERATION, 409, STALE, "current_generation",
                             lambda c: c.start_generation(DISK, 2)),
}  # fmt: skip


def _client(deployment: Deployment, port: int) -> ProcessServerClient:
    return ProcessServerClient(f"https://127.0.0.1:{port}", deployment.client_tls("vm01"),
                               request_timeout_s=10, connect_timeout_s=5)  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("call", list(CALLS))
async def test_the_agent_client_takes_a_malformed_answer_as_a_failure(
    deployment: Deployment, call: str, shape: str
) -> None:
    method, path, status, valid, key, run = CALLS[call]
    port = free_port()
    async with stand_in(deployment, port, "processserver",
                        [_route(method, path, status, shaped(shape, valid, key))]):  # fmt: skip
        client = _client(deployment, port)
        try:
            if shape == "in-pieces":
                answer = await run(client)
                assert answer.to_json() == valid  # type: ignore[attr-defined]
            else:
                with pytest.raises(ProcessServerUnavailableError, match=r"breaks docs/api\.md"):
                    await run(client)
        finally:
            await client.close()
    assert client.malformed_answers == (0 if shape == "in-pieces" else 1)


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_checksum_refusal_is_refused_whatever_its_body(
    deployment: Deployment, shape: str
) -> None:
    """The status decides a refusal; its body only explains it (when it is not
    too long to read)."""
    port = free_port()
    valid = {"error": "malformed", "message": "the range must lie inside the target"}
    route = _route("GET", f"/v1/disks/{DISK}/checksums", 400, shaped(shape, valid, "message"))
    async with stand_in(deployment, port, "processserver", [route]):
        client = _client(deployment, port)
        try:
            call = client.checksums(DISK, offset=0, length=4096, chunk=4096,
                                    sink=lambda _, __: None)  # fmt: skip
            if shape == "too-long":
                with pytest.raises(ProcessServerUnavailableError, match=r"breaks docs/api\.md"):
                    await call
            else:
                with pytest.raises(RefusedError) as refused:
                    await call
                assert refused.value.status == 400
                code = "malformed" if shape == "in-pieces" else "malformed-answer"
                assert refused.value.server_code == code
        finally:
            await client.close()


#: POSTs a stream backing off from 0.25 s can make in REFUSING_S; one that
#: sends again at once makes hundreds.
REFUSING_S = 2.0
MAX_POSTS = 12
#: Time for the answer to a POST in flight to be read.
SETTLE_S = 1.0


async def test_the_stream_outlives_a_process_server_that_answers_nonsense(
    deployment: Deployment, tmp_path: Path
) -> None:
    port, posts = free_port(), []

    async def batches(request: web.Request) -> web.StreamResponse:
        shape = MALFORMED[len(posts) % len(MALFORMED)]
        posts.append(shape)
        valid = {"disk": DISK, "generation": 1, "acked_seq": 1}
        return await _answer(request, 200, shaped(shape, valid, "acked_seq"))

    state = {"disk": DISK, "generation": 1, "acked_seq": 0, "shipped_seq": 0,
             "backlog_bytes": 0, "backlog_age_s": 0.0, "resync_required": False}  # fmt: skip
    routes: list[Route] = [
        ("POST", BATCHES, batches),
        _route("POST", GENERATION, 200, [json.dumps({**POSITION, "generation": 1,
                                                     "acked_seq": 0}).encode()]),
        _route("GET", STATE, 200, [json.dumps(state).encode()]),
    ]  # fmt: skip
    async with stand_in(deployment, port, "processserver", routes):
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
            await stream.append([Write(0, b"\x33" * 4096)], flags=NO_FLAGS, first_capture_ns=now,
                                last_capture_ns=now, kind=EntryKind.INLINE)  # fmt: skip
            await asyncio.sleep(REFUSING_S)
            alive = stream.sending
            # A POST the stand-in has seen may still have its answer on the
            # way; the stream's back-off leaves a moment between two POSTs
            # when every answer sent has been read.
            deadline = time.monotonic() + SETTLE_S
            while pool.current.malformed_answers != len(posts) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            malformed = pool.current.malformed_answers
            await stream.close()
        await pool.close()
    print(f"{len(posts)} requests in {REFUSING_S:g} s, {malformed} malformed answers")
    assert alive, "the sender must not end on a malformed answer"
    assert 2 <= len(posts) <= MAX_POSTS, posts
    assert malformed == len(posts)
    assert stream.acked_seq == 0, "nothing is acknowledged by an answer that does not parse"


# --- the process server's clients of the master target -----------------------------------

MT_POSITION = {"disk": DISK, "generation": 1, "received_seq": 0, "applied_generation": 1,
               "applied_seq": 0}  # fmt: skip
MT_GAP = {"error": "gap", "message": "m", "expected_seq": 1, **MT_POSITION}
MT_STATE = {**MT_POSITION, "received_seq": 4, "target_size": 2**20, "state": "replicating",
            "resync_open": False, "last_apply_error": "", "inbox_files": 0,
            "inbox_bytes": 0}  # fmt: skip
BUSY = json.dumps({"error": "inbox-full", "message": "later"}).encode()


@contextlib.asynccontextmanager
async def _process_server(
    deployment: Deployment, tmp_path: Path, routes: list[Route]
) -> AsyncIterator[tuple[ProcessServer, aiohttp.ClientSession]]:
    """A process server shipping to a stand-in master target serving ``routes``."""
    mt_port = free_port()
    config = write_ps_config(deployment, tmp_path)
    config.write_text(
        config.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
    )
    async with stand_in(deployment, mt_port, "mastertarget", routes):
        ps = await ProcessServer.start(ps_config.load(config), data_port=0, metrics_port=0)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
        )
        try:
            yield ps, session
        finally:
            await session.close()
            await ps.close()


def _count(ps: ProcessServer, series: str, **labels: str) -> float:
    value = ps.metrics.registry.get_sample_value(f"blockrepl_processserver_{series}", labels)
    return value or 0.0


async def _until(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not done():
        assert time.monotonic() < deadline, f"not within {SETTLE_S} s: {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("status", [200, 409])
async def test_the_shipper_takes_a_malformed_answer_as_a_failure(
    deployment: Deployment, tmp_path: Path, status: int, shape: str
) -> None:
    stored = {**MT_POSITION, "received_seq": 1}  # the file sent, seq 1
    valid, key = (stored, "received_seq") if status == 200 else (MT_GAP, "expected_seq")
    puts: list[str] = []

    async def put_hrl(request: web.Request) -> web.StreamResponse:
        puts.append(request.path)
        return await _answer(request, status, shaped(shape, valid, key))

    route: Route = ("PUT", "/v1/disks/{disk}/hrl/{generation}/{seq}", put_hrl)
    async with _process_server(deployment, tmp_path, [route]) as (ps, session):
        url = f"https://127.0.0.1:{ps.port}/v1/disks/{DISK}/batches"
        async with session.post(url, data=_body(DISK, 1, [Write(0, b"\x44" * 4096)])) as answer:
            assert answer.status == 200, await answer.text()
        malformed = {"series": "malformed_answers_total", "call": "put-hrl"}
        if shape == "in-pieces" and status == 200:
            await _until("the file shipped", lambda: not ps.disks[DISK].cached)
        elif shape == "in-pieces":  # a good refusal of the file just sent: backed off
            await _until("a second PUT", lambda: len(puts) >= 2)
        else:
            await _until("the answer counted", lambda: _count(ps, **malformed) >= 1)
            assert _count(ps, "ship_retries_total", disk=DISK) >= 1
        assert ps.shipper.tasks, "the shipper runs"
        assert all(not task.done() for task in ps.shipper.tasks), "the shipper must live"
        if shape != "in-pieces":
            assert ps.disks[DISK].cached, "the file stays until the master target has it"
            assert ps.disks[DISK].position.shipped_seq == 0
        else:
            assert _count(ps, **malformed) == 0


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_malformed_position_of_the_master_target_is_not_taken(
    deployment: Deployment, tmp_path: Path, shape: str
) -> None:
    """A batch that leaves a gap while nothing is cached makes the process server
    ask the master target where the stream stands (``follow_master_target``)."""
    routes = [
        _route("GET", f"/v1/disks/{DISK}/state", 200, shaped(shape, MT_STATE, "received_seq")),
        _route("PUT", "/v1/disks/{disk}/hrl/{generation}/{seq}", 503, [BUSY]),
    ]
    async with _process_server(deployment, tmp_path, routes) as (ps, session):
        url = f"https://127.0.0.1:{ps.port}/v1/disks/{DISK}/batches"
        async with session.post(url, data=_body(DISK, 5, [Write(0, b"\x55" * 4096)])) as answer:
            status, body = answer.status, await answer.json()
        counted = _count(ps, "malformed_answers_total", call="state")
    if shape == "in-pieces":  # the master target holds seqs 1..4: batch 5 comes next
        assert (status, body["acked_seq"], counted) == (200, 5, 0)
    else:
        assert (status, body["error"], body["expected_seq"], counted) == (409, "gap", 1, 1)


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_malformed_checksum_refusal_is_not_passed_on(
    deployment: Deployment, tmp_path: Path, shape: str
) -> None:
    valid = {"error": "malformed", "message": "chunk must be 4096..1073741824 bytes"}
    routes = [_route("GET", f"/v1/disks/{DISK}/checksums", 400, shaped(shape, valid, "message"))]
    async with _process_server(deployment, tmp_path, routes) as (ps, session):
        url = f"https://127.0.0.1:{ps.port}/v1/disks/{DISK}/checksums?offset=0&chunk=1"
        async with session.get(url) as answer:
            status, body = answer.status, await answer.json()
        counted = _count(ps, "malformed_answers_total", call="checksums")
    if shape == "in-pieces":
        assert (status, body, counted) == (400, valid, 0)
    else:
        assert (status, body["error"], counted) == (503, "master-target-unreachable", 1)


# --- mastertarget points, reading the admin socket -----------------------------------------

LISTING = {"disk": "d0", "points": [], "more": False,
           "window": {"oldest": None, "newest": None, "points": 0, "window_s": 0.0}}  # fmt: skip


@pytest.mark.parametrize(
    "shape", ["not-json", "not-object", "missing-field", "wrong-type", "nested-deep", "empty",
              "in-pieces"],
)  # fmt: skip
async def test_the_admin_command_refuses_a_malformed_answer(
    deployment: Deployment, tmp_path: Path, shape: str
) -> None:
    config = write_config(deployment, tmp_path, [
        {"id": "d0", "target": tmp_path / "t.raw", "create": True, "size_bytes": 2**20},
    ])  # fmt: skip
    app = web.Application()
    app.router.add_route(*_route("GET", "/v1/disks/{disk}/points", 200,
                                 shaped(shape, LISTING, "more")))  # fmt: skip
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "admin.sock")).start()
    try:
        code, out, err = await _cli("points", "--config", str(config), "--disk", "d0", "--json")
    finally:
        await runner.cleanup()
    assert "Traceback" not in err
    if shape == "in-pieces":
        assert (code, json.loads(out)) == (0, LISTING)
    else:
        assert code == 65, (code, err)
        assert "expected" in err, err
