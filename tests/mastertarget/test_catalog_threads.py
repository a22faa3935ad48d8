"""Where the master target reads and writes its catalog: never on the event
loop, and never queued behind the lock an apply group holds on its target.

sqlite's own trace hook on the daemon's catalog connection records the
thread of every statement; the target's lock is the real one, taken from a
thread as a long apply group would take it.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import aiohttp

from protocol.records import Tag, TagKind, Write
from protocol.sequencing import StreamPosition
from tests.conftest import Deployment

from .conftest import write_config

SIZE = 2 * 2**20
#: How long an answer may take while the target's lock is held: far below
#: the time the lock is held, far above a catalog read on a busy machine.
ANSWER_S = 10.0


async def _admin(socket: Path, method: str, path: str, body: object = None) -> tuple[int, dict]:  # type: ignore[type-arg]
    connector = aiohttp.UnixConnector(path=str(socket))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, f"http://mastertarget{path}", json=body) as answer,
    ):
        return answer.status, await answer.json()


async def test_the_catalog_is_never_read_or_written_on_the_event_loop(
    deployment: Deployment,
    start_mt,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    config = write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": tmp_path / "t.raw", "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    with config.open("a") as extra:
        extra.write('[[groups]]\nid = "g"\ndisks = ["d0"]\n')
    mt, pusher = await start_mt(config)
    threads: list[int] = []
    mt.store._db._db.set_trace_callback(lambda _sql: threads.append(threading.get_ident()))
    loop_thread = threading.get_ident()
    socket = tmp_path / "admin.sock"

    tag = Tag(TagKind.APP, bytes(16), "t1", 0)
    for seq in (1, 3):
        records = [Write(0, bytes([seq]) * 4096), tag] if seq == 1 else [Write(0, b"x" * 512)]
        assert (await pusher.send(pusher.seal("d0", 1, seq, records)))[0] == 200
    await mt.replicas["d0"].wait_applied(StreamPosition(1, 3))
    assert (await _admin(socket, "GET", "/v1/disks/d0/points"))[0] == 200
    assert (await _admin(socket, "GET", "/v1/groups/g/points"))[0] == 200
    status, answer = await _admin(
        socket, "POST", "/v1/disks/d0/recover",
        {"point": "tag:t1", "output": str(tmp_path / "r.raw")},
    )  # fmt: skip
    assert status == 200, answer
    await mt.housekeep()
    bad = bytearray(pusher.seal("d0", 1, 4, [Write(0, b"y" * 512)]).to_bytes())
    bad[-1] ^= 1  # the GCM tag: stored, then quarantined by the applier
    assert (await pusher.put("d0", bytes(bad), 1, 4))[0] == 200
    while (await pusher.state("d0"))["state"] != "resync-required":
        await asyncio.sleep(0.01)
    status, answer = await _admin(socket, "POST", "/v1/disks/d0/failover", {"point": "tag:t1"})
    assert status == 200, answer
    assert (await pusher.state("d0"))["state"] == "failed-over"

    assert threads, "the trace hook saw no statement: it proves nothing"
    assert loop_thread not in threads, (
        f"{threads.count(loop_thread)} of {len(threads)} catalog statements ran on the loop"
    )


async def test_listings_and_state_changes_do_not_wait_for_an_apply_group(
    deployment: Deployment,
    start_mt,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    config = write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": tmp_path / "t.raw", "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    mt, pusher = await start_mt(config)
    replica = mt.replicas["d0"]
    assert (await pusher.send(pusher.seal("d0", 1, 1, [Write(0, b"a" * 4096)])))[0] == 200
    await replica.wait_applied(StreamPosition(1, 1))

    held, release = threading.Event(), threading.Event()

    def hold_the_target() -> None:  # as a long apply group holds it
        with replica.target.hold():
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold_the_target)
    holder.start()
    try:
        assert await asyncio.to_thread(held.wait, 10)
        async with asyncio.timeout(ANSWER_S):
            points = await replica.history.points()
            status, listing = await _admin(tmp_path / "admin.sock", "GET", "/v1/disks/d0/points")
            # A file that fails verification: quarantined and the disk marked
            # resync-required, a state change committed while the lock is held.
            bad = bytearray(pusher.seal("d0", 1, 2, [Write(0, b"b" * 512)]).to_bytes())
            bad[-1] ^= 1
            assert (await pusher.put("d0", bytes(bad), 1, 2))[0] == 200
            while (await pusher.state("d0"))["state"] != "resync-required":
                await asyncio.sleep(0.01)
        assert not release.is_set()
    finally:
        release.set()
        await asyncio.to_thread(holder.join)
    assert [p.seq for p in points] == [1]
    assert status == 200
    assert [p["seq"] for p in listing["points"]] == [1]
    assert "authentication-failed" in (await pusher.state("d0"))["last_apply_error"]
