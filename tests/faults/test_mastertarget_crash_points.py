"""kill -9 of the master target at each step of applying a file — after an
undo file is written, once the undo is durable, after the target is written,
after it is flushed, after the marker commits — then restart and resend.
Every recovery point listed afterwards must rebuild the disk exactly as it
was at that point: a before-image captured again after a partial apply would
hold new data and break the points before it (docs/design.md invariant 3)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import aiohttp
import pytest

from protocol.hrl import HrlSealer
from protocol.records import Record, Tag, TagKind
from runtime.crashpoints import ENV
from tests.conftest import Deployment
from tests.faults.daemons import Daemon, free_port
from tests.mastertarget.conftest import apply_to_model, random_workload, write_config

SIZE = 2 * 2**20
FILES = 8
CRASH_POINTS = ["undo-written", "undo-durable", "target-written", "target-flushed",
                "marker-committed"]  # fmt: skip


def _stream(deployment: Deployment, seed: int) -> tuple[list[tuple[int, bytes]], dict[int, bytes]]:
    """Sealed files (first seq, bytes) with an APP tag in each, and the image at every point."""
    rng = random.Random(seed)
    sealer = HrlSealer(deployment.keyring)
    model = bytearray(SIZE)
    images: dict[int, bytes] = {}
    files = []
    seq = 1
    for n in range(FILES):
        before = random_workload(rng, SIZE, 2, max_len=60_000)
        after = random_workload(rng, SIZE, 2, max_len=60_000)
        apply_to_model(model, before)
        images[seq + len(before)] = bytes(model)  # the tag's seq
        apply_to_model(model, after)
        tag = Tag(TagKind.APP, rng.randbytes(16), f"t{n}", time.time_ns())
        records: list[Record] = [*before, tag, *after]
        last = seq + len(records) - 1
        images[last] = bytes(model)
        now = time.time_ns()
        sealed = sealer.seal_records(
            records, disk_id="d0", generation=1, first_seq=seq, first_capture_ns=now,
            last_capture_ns=now, receive_ns=now, salt=os.urandom(32),
        )  # fmt: skip
        files.append((seq, sealed.to_bytes()))
        seq = last + 1
    return files, images


async def _request(
    session: aiohttp.ClientSession, method: str, url: str, **kw: object
) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with session.request(method, url, **kw) as response:  # type: ignore[arg-type]
        return response.status, await response.json()


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
async def test_kill_at_each_apply_step_keeps_every_point(
    crash_at: str, deployment: Deployment, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": tmp_path / "t.raw", "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    with config.open("a") as extra:
        extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {port}\n')
        extra.write(f"[metrics]\nport = {free_port()}\n")
    files, images = _stream(deployment, seed=hash(crash_at) & 0xFFFF)
    daemon = Daemon(config, tmp_path / "daemon.log", env_once={ENV: f"{crash_at}:3"})
    daemon.start()
    base = f"https://127.0.0.1:{port}/v1/disks/d0"
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls(), force_close=True)
    first_exit = None
    async with aiohttp.ClientSession(connector=connector) as session:
        index, deadline = 0, time.monotonic() + 60
        while index < len(files):
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-2000:]
            assert daemon.proc is not None
            if daemon.proc.poll() is not None:  # it died at the crash point: start it again
                first_exit = daemon.proc.returncode
                daemon.start()
            seq, body = files[index]
            try:
                status, answer = await _request(session, "PUT", f"{base}/hrl/1/{seq}", data=body)
                if status == 200:
                    index = sum(1 for s, _ in files if s <= answer["received_seq"])
                    if answer["applied_seq"] < answer["received_seq"]:
                        await asyncio.sleep(0.05)  # let the applier reach the crash point
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.05)
                try:
                    _, state = await _request(session, "GET", f"{base}/state")
                    index = sum(1 for s, _ in files if s <= state["received_seq"])
                except (aiohttp.ClientError, OSError):
                    pass
        last = max(images)
        while True:
            if daemon.proc is not None and daemon.proc.poll() is not None:
                first_exit = daemon.proc.returncode
                daemon.start()
            try:
                _, state = await _request(session, "GET", f"{base}/state")
                if state["applied_seq"] == last:
                    break
            except (aiohttp.ClientError, OSError):
                pass
            assert time.monotonic() < deadline, "not applied in time"
            await asyncio.sleep(0.05)
    assert first_exit == -9, f"the daemon never reached {crash_at}"
    admin = aiohttp.UnixConnector(path=str(tmp_path / "admin.sock"))
    async with aiohttp.ClientSession(connector=admin) as session:
        _, listing = await _request(session, "GET", "http://mt/v1/disks/d0/points")
        listed = listing["points"]
        assert {p["seq"] for p in listed} == set(images)
        for point in listed:
            output = tmp_path / f"p{point['seq']}-{point['kind']}.raw"
            spec = f"tag:{point['name']}" if point["name"] else point["time"]
            status, answer = await _request(
                session, "POST", "http://mt/v1/disks/d0/recover",
                json={"point": spec, "output": str(output), "format": "raw"},
            )  # fmt: skip
            assert status == 200, answer
            assert output.read_bytes() == images[answer["point"]["seq"]], point
    assert daemon.stop() == 0
