"""The shipper on its own: a disk's stream, the client of the master target and a
stand-in master target, with no process server daemon around them."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry

from processserver.cache import Cache
from processserver.committer import GroupCommitter
from processserver.config import MasterTargetLink
from processserver.master_target_client import MasterTargetClient
from processserver.metrics import ProcessServerMetrics
from processserver.positions import PositionStore
from processserver.sealers import Sealers
from processserver.shipper import Shipper
from processserver.stream import DiskStream, StreamParts
from protocol.api import FailedOver, HrlAnswer, ReceivedPosition, SeqRefusal
from protocol.batch import END_OF_STREAM, NEED_DATA, BatchDecoder, encode_batch
from protocol.hrl import HrlFile, open_hrl
from protocol.hrl_receiver import FileReceived, HrlReceiver
from protocol.records import Record, Write
from runtime.config import TlsFiles
from tests.conftest import Deployment
from tests.faults.daemons import free_port
from tests.standin import Handler, Route, stand_in

DISK = "vm01-d0"
#: Seconds the files have to reach the stand-in: milliseconds on loopback.
SETTLE_S = 10.0
#: Seconds a stopped shipper is watched for a PUT it should not make.
QUIET_S = 0.6


@pytest.fixture
def parts(tmp_path: Path, deployment: Deployment) -> Iterator[StreamParts]:
    executor = ThreadPoolExecutor(max_workers=2)
    cache = Cache(tmp_path / "cache", high_bytes=10**9, low_bytes=10**8)
    store = PositionStore(tmp_path / "positions.db")
    yield StreamParts(
        cache, store, GroupCommitter(cache, store, executor),
        Sealers(deployment.keyring, 1), executor, ProcessServerMetrics(CollectorRegistry()),
    )  # fmt: skip
    executor.shutdown()
    store.close()


@pytest_asyncio.fixture
async def stream(parts: StreamParts) -> DiskStream:
    stream = await DiskStream.recover(DISK, parts)
    async with stream.request_lock:
        for seq in (1, 2, 3):
            body = encode_batch(
                disk_id=DISK, generation=1, first_seq=seq, records=[Write(seq * 4096, b"%d" % seq)],
                first_capture_ns=1, last_capture_ns=2,
            )  # fmt: skip
            decoder = BatchDecoder(expected_disk_id=DISK)
            decoder.feed(body)
            for batch in decoder.events():
                await stream.take(batch)
    return stream


def _link(deployment: Deployment, port: int) -> MasterTargetLink:
    pki = deployment.pki
    files = TlsFiles(
        ca_file=pki / "ca.pem", cert_file=pki / "machine-ps01.pem",
        key_file=pki / "machine-ps01.key",
    )  # fmt: skip
    return MasterTargetLink(url=f"https://127.0.0.1:{port}", tls=files)


@contextlib.asynccontextmanager
async def _shipping(
    deployment: Deployment, parts: StreamParts, stream: DiskStream, put_hrl: Handler
) -> AsyncIterator[Shipper]:
    """``stream`` shipped to a stand-in master target that answers PUTs with ``put_hrl``."""
    port = free_port()
    route: Route = ("PUT", "/v1/disks/{disk}/hrl/{generation}/{seq}", put_hrl)
    async with (
        stand_in(deployment, port, "mastertarget", [route]),
        MasterTargetClient(
            _link(deployment, port), deployment.client_tls("ps01"), parts.metrics
        ) as client,
        Shipper([stream], client, parts.metrics, parts.executor, max_in_flight=2) as shipper,
    ):
        yield shipper


async def _until(what: str, done: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + SETTLE_S
    while not done():
        assert asyncio.get_running_loop().time() < deadline, f"not within {SETTLE_S} s: {what}"
        await asyncio.sleep(0.02)


def _opened(body: bytes, deployment: Deployment) -> list[HrlFile]:
    """The HRL files of a PUT body, back to back, each opened (verified)."""
    receiver = HrlReceiver(run=True)
    receiver.feed(body)
    receiver.feed_eof()
    files: list[HrlFile] = []
    while (event := receiver.next_event()) is not NEED_DATA:
        if isinstance(event, FileReceived):
            files.append(open_hrl(event.data, deployment.keyring))
        elif event is END_OF_STREAM:
            break
    return files


async def test_files_go_to_the_master_target_and_leave_the_cache(
    deployment: Deployment, parts: StreamParts, stream: DiskStream
) -> None:
    received: list[tuple[str, list[tuple[Record, ...]]]] = []

    async def put_hrl(request: web.Request) -> web.Response:
        files = _opened(await request.read(), deployment)
        received.append((request.path, [f.records for f in files]))
        position = ReceivedPosition(DISK, 1, files[-1].header.last_seq, 1, 0)
        return web.json_response(HrlAnswer(position).to_json())

    files = [f.path for f in stream.cached]
    async with _shipping(deployment, parts, stream, put_hrl) as shipper:
        assert len(shipper.tasks) == 1
        await _until("every file shipped", lambda: not stream.cached)
    # the three files waited together: they go in one PUT, named by the first
    assert [path for path, _ in received] == [f"/v1/disks/{DISK}/hrl/1/1"]
    assert received[0][1] == [(Write(seq * 4096, b"%d" % seq),) for seq in (1, 2, 3)]
    assert not any(path.exists() for path in files)
    assert stream.position.shipped_seq == 3
    assert (
        parts.metrics.registry.get_sample_value(
            "blockrepl_processserver_hrl_files_out_total", {"disk": DISK}
        )
        == 3
    )
    assert all(task.done() for task in shipper.tasks), "close ends the shipping task"


async def test_only_the_files_a_200_covers_leave_the_cache(
    deployment: Deployment, parts: StreamParts, stream: DiskStream
) -> None:
    """A master target whose inbox filled during a run stored only its first files:
    its 200 says how far; the rest stays cached and goes again."""
    firsts: list[int] = []

    async def put_hrl(request: web.Request) -> web.Response:
        files = _opened(await request.read(), deployment)
        firsts.append(files[0].header.first_seq)
        position = ReceivedPosition(DISK, 1, files[0].header.last_seq, 1, 0)  # the first only
        return web.json_response(HrlAnswer(position).to_json())

    async with _shipping(deployment, parts, stream, put_hrl):
        await _until("every file shipped", lambda: not stream.cached)
    assert firsts == [1, 2, 3]
    assert stream.position.shipped_seq == 3


async def test_a_run_that_fails_is_halved_down_to_one_file(
    deployment: Deployment, parts: StreamParts, stream: DiskStream
) -> None:
    """A link that breaks every long transfer (here: a master target that fails
    every PUT of more than one file) still carries the files one by one."""
    sizes: list[int] = []

    async def put_hrl(request: web.Request) -> web.Response:
        files = _opened(await request.read(), deployment)
        sizes.append(len(files))
        if len(files) > 1:
            return web.json_response({"error": "durability", "message": "m"}, status=503)
        position = ReceivedPosition(DISK, 1, files[0].header.last_seq, 1, 0)
        return web.json_response(HrlAnswer(position).to_json())

    async with _shipping(deployment, parts, stream, put_hrl):
        await _until("every file shipped", lambda: not stream.cached)
    assert sizes[:2] == [3, 1]
    assert sizes.count(1) == 3
    assert stream.position.shipped_seq == 3


async def test_a_failed_over_disk_ships_nothing_more(
    deployment: Deployment, parts: StreamParts, stream: DiskStream
) -> None:
    puts: list[str] = []

    async def put_hrl(request: web.Request) -> web.Response:
        await request.read()
        puts.append(request.path)
        return web.json_response(HrlAnswer(None, FailedOver("failed over")).to_json(), status=409)

    async with _shipping(deployment, parts, stream, put_hrl):
        await _until("the refusal taken", lambda: stream.failed_over)
        await asyncio.sleep(QUIET_S)
    assert puts == [f"/v1/disks/{DISK}/hrl/1/1"]
    assert [f.first_seq for f in stream.cached] == [1, 2, 3], "nothing is deleted"
    assert stream.position.shipped_seq == 0


async def test_a_second_run_goes_while_the_first_waits_for_its_answer(
    deployment: Deployment, parts: StreamParts, stream: DiskStream
) -> None:
    """Two runs of the disk in flight (the default): files cached while the first
    run is at the master target go at once, not after its answer."""
    bodies: list[tuple[int, int]] = []
    second_in = asyncio.Event()
    first_stored = asyncio.Event()

    async def put_hrl(request: web.Request) -> web.Response:
        files = _opened(await request.read(), deployment)
        bodies.append((files[0].header.first_seq, files[-1].header.last_seq))
        if len(bodies) == 1:
            await asyncio.wait_for(second_in.wait(), SETTLE_S)  # fails the test if it never comes
            first_stored.set()
        else:
            second_in.set()
            await first_stored.wait()  # a master target stores them in order
        position = ReceivedPosition(DISK, 1, files[-1].header.last_seq, 1, 0)
        return web.json_response(HrlAnswer(position).to_json())

    await _take(stream, 4, [Write(0, os.urandom(2**20 + 4096))])  # the first run: 1 MiB and more
    async with _shipping(deployment, parts, stream, put_hrl):
        await _until("the first run sent", lambda: len(bodies) == 1)
        await _take(stream, 5, [Write(5 * 4096, b"5")])
        await _until("every file shipped", lambda: not stream.cached)
    assert bodies == [(1, 4), (5, 5)]
    assert stream.position.shipped_seq == 5


async def test_no_run_goes_behind_a_small_one(
    deployment: Deployment, parts: StreamParts, stream: DiskStream
) -> None:
    """Behind a run of less than 1 MiB the files that wait go in the next run,
    once it is answered: one PUT for them, not one each."""
    bodies: list[tuple[int, int]] = []
    answer_first = asyncio.Event()

    async def put_hrl(request: web.Request) -> web.Response:
        files = _opened(await request.read(), deployment)
        bodies.append((files[0].header.first_seq, files[-1].header.last_seq))
        if len(bodies) == 1:
            await asyncio.wait_for(answer_first.wait(), SETTLE_S)
        position = ReceivedPosition(DISK, 1, files[-1].header.last_seq, 1, 0)
        return web.json_response(HrlAnswer(position).to_json())

    async with _shipping(deployment, parts, stream, put_hrl):
        await _until("the first run sent", lambda: len(bodies) == 1)
        for seq in (4, 5):
            await _take(stream, seq, [Write(seq * 4096, b"%d" % seq)])
        await asyncio.sleep(QUIET_S)
        assert len(bodies) == 1, "nothing went behind the small run"
        answer_first.set()
        await _until("every file shipped", lambda: not stream.cached)
    assert bodies == [(1, 3), (4, 5)]


async def _take(stream: DiskStream, seq: int, records: list[Record]) -> None:
    """Place a batch of ``records`` at ``seq`` in the disk's stream, as a POST does."""
    body = encode_batch(
        disk_id=DISK, generation=1, first_seq=seq, records=records,
        first_capture_ns=1, last_capture_ns=2,
    )  # fmt: skip
    decoder = BatchDecoder(expected_disk_id=DISK)
    decoder.feed(body)
    async with stream.request_lock:
        for batch in decoder.events():
            await stream.take(batch)


async def test_a_refusal_behind_an_answered_run_is_not_acted_on(
    deployment: Deployment, parts: StreamParts, stream: DiskStream
) -> None:
    """The second run in flight is refused as a gap naming the first run's seq
    (it came first, and the master target gave up waiting): by the time its
    answer is read the first run is shipped, and the refusal is old news — no
    resync, the second run simply goes again."""
    bodies: list[int] = []
    second_in = asyncio.Event()

    async def put_hrl(request: web.Request) -> web.Response:
        files = _opened(await request.read(), deployment)
        first = files[0].header.first_seq
        bodies.append(first)
        if first == 1 and len(bodies) == 1:
            await asyncio.wait_for(second_in.wait(), SETTLE_S)
            await asyncio.sleep(0.1)  # the refusal of the second is on its way first
        elif first == 5 and not second_in.is_set():
            second_in.set()
            refusal = SeqRefusal("gap", 1, "expected seq 1 of generation 1 next")
            answer = HrlAnswer(ReceivedPosition(DISK, 1, 0, 1, 0), refusal)
            return web.json_response(answer.to_json(), status=409)
        position = ReceivedPosition(DISK, 1, files[-1].header.last_seq, 1, 0)
        return web.json_response(HrlAnswer(position).to_json())

    await _take(stream, 4, [Write(0, os.urandom(2**20 + 4096))])  # the first run: 1 MiB and more
    async with _shipping(deployment, parts, stream, put_hrl):
        await _until("the first run sent", lambda: len(bodies) == 1)
        await _take(stream, 5, [Write(5 * 4096, b"5")])
        await _until("every file shipped", lambda: not stream.cached)
    assert bodies == [1, 5, 5]
    assert stream.position.shipped_seq == 5
    assert not stream.position.resync_required


async def test_a_run_answered_in_part_sends_the_rest_again_before_what_went_behind_it(
    deployment: Deployment, parts: StreamParts, stream: DiskStream
) -> None:
    """A master target whose inbox filled during the first run holds only its first
    files; the run behind it is refused (a gap at the first file not held). What
    was not held goes again, then what follows: no resync, nothing lost."""
    bodies: list[tuple[int, int]] = []
    second_in = asyncio.Event()
    held = 0

    async def put_hrl(request: web.Request) -> web.Response:
        nonlocal held
        files = _opened(await request.read(), deployment)
        first, last = files[0].header.first_seq, files[-1].header.last_seq
        bodies.append((first, last))
        if len(bodies) == 1:
            await asyncio.wait_for(second_in.wait(), SETTLE_S)
            held = 2  # the inbox filled after two files
        elif len(bodies) == 2:
            second_in.set()
            await asyncio.sleep(0.05)
            refusal = SeqRefusal("gap", 3, "expected seq 3 of generation 1 next")
            answer = HrlAnswer(ReceivedPosition(DISK, 1, 2, 1, 0), refusal)
            return web.json_response(answer.to_json(), status=409)
        else:
            assert first == held + 1, f"expected a run from seq {held + 1}, found {first}"
            held = last
        position = ReceivedPosition(DISK, 1, held, 1, 0)
        return web.json_response(HrlAnswer(position).to_json())

    await _take(stream, 4, [Write(0, os.urandom(2**20 + 4096))])  # the first run: 1 MiB and more
    async with _shipping(deployment, parts, stream, put_hrl):
        await _until("the first run sent", lambda: len(bodies) == 1)
        await _take(stream, 5, [Write(5 * 4096, b"5")])
        await _until("every file shipped", lambda: not stream.cached)
    assert bodies == [(1, 4), (5, 5), (3, 5)]
    assert stream.position.shipped_seq == 5
    assert not stream.position.resync_required
