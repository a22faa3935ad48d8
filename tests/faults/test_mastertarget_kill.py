"""kill -9 of the master target at random moments while a process server
streams to it; after each restart the stream resumes from the durable marker.
At the end every target equals its source (qemu-img compare) and every VMDK
passes qemu-img check."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from protocol.hrl import HrlSealer
from protocol.records import Record
from tests.conftest import assert_image_holds, require_binary
from tests.faults.daemons import Daemon, free_port
from tests.mastertarget.conftest import (
    Deployment,
    apply_to_model,
    random_workload,
    write_config,
)

SIZE = 8 * 2**20
FILES_PER_DISK = 120
KILLS = 6
#: Upper bound for the whole storm: the test fails rather than hang.
STORM_TIMEOUT_S = 120


@dataclass
class Stream:
    """One disk's precomputed stream: sealed files by first seq, and the model."""

    disk: str
    files: list[tuple[int, int, bytes]] = field(default_factory=list)  # (first, last, body)
    model: bytearray = field(default_factory=lambda: bytearray(SIZE))

    def index_after(self, seq: int) -> int:
        return next(
            (i for i, (first, _, _) in enumerate(self.files) if first > seq), len(self.files)
        )


def _build(deployment: Deployment, disk: str, seed: int) -> Stream:
    rng = random.Random(seed)
    sealer = HrlSealer(deployment.keyring)
    stream = Stream(disk)
    seq = 1
    for _ in range(FILES_PER_DISK):
        records: list[Record] = random_workload(rng, SIZE, rng.randint(1, 6), max_len=150_000)
        sealed = sealer.seal_records(
            records, disk_id=disk, generation=1, first_seq=seq, first_capture_ns=seq,
            last_capture_ns=seq, receive_ns=seq, salt=os.urandom(32),
        )  # fmt: skip
        stream.files.append((seq, seq + len(records) - 1, sealed.to_bytes()))
        apply_to_model(stream.model, records)
        seq += len(records)
    return stream


async def _push(session: aiohttp.ClientSession, base: str, stream: Stream) -> int:
    """Send every file, resuming from the master target's position after any failure."""
    index, acked = 0, 0
    while index < len(stream.files):
        first, _, body = stream.files[index]
        try:
            url = f"{base}/v1/disks/{stream.disk}/hrl/1/{first}"
            async with session.put(url, data=body) as response:
                answer = await response.json()
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError):
            await asyncio.sleep(0.05)
            try:
                async with session.get(f"{base}/v1/disks/{stream.disk}/state") as response:
                    if response.status == 200:
                        index = stream.index_after((await response.json())["received_seq"])
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            continue
        if status == 200:
            acked += 1
            index = stream.index_after(answer["received_seq"])
        elif status == 409:
            index = stream.index_after(answer["expected_seq"] - 1)
        else:
            assert status == 503, answer
            await asyncio.sleep(0.1)
    return acked


async def _wait_applied(session: aiohttp.ClientSession, base: str, stream: Stream) -> None:
    last = stream.files[-1][1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{base}/v1/disks/{stream.disk}/state") as response:
                state = await response.json()
            if state["applied_seq"] == last:
                assert state["state"] == "replicating", state
                return
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.05)
    pytest.fail(f"disk {stream.disk} did not reach seq {last}")


async def test_kill_9_during_a_stream_loses_nothing(deployment: Deployment, tmp_path: Path) -> None:
    require_binary("qemu-img")  # skip before the run, not after it
    port, metrics_port = free_port(), free_port()
    config = write_config(
        deployment, tmp_path,
        [
            {"id": "raw0", "target": tmp_path / "raw0.img", "create": True, "size_bytes": SIZE},
            {"id": "vmdk0", "target": tmp_path / "vmdk0.vmdk", "format": "vmdk", "create": True,
             "size_bytes": SIZE},
        ],
    )  # fmt: skip
    with config.open("a") as extra:  # ports as top-level tables come last in TOML
        extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {port}\n')
        extra.write(f"[metrics]\nport = {metrics_port}\n")
    streams = [_build(deployment, "raw0", 1), _build(deployment, "vmdk0", 2)]
    daemon = Daemon(config, tmp_path / "daemon.log")
    daemon.start()
    rng = random.Random(7)
    base = f"https://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls(), force_close=True)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        pushers = asyncio.gather(*(_push(session, base, s) for s in streams))
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            daemon.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            daemon.start()
        acked = await asyncio.wait_for(pushers, STORM_TIMEOUT_S)
        for stream in streams:
            await _wait_applied(session, base, stream)
    assert daemon.stop() == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    assert daemon.starts == KILLS + 1
    assert sum(acked) >= 2 * FILES_PER_DISK * 0.5  # most files went through on the first try
    assert_image_holds(tmp_path / "raw0.img", bytes(streams[0].model))
    assert_image_holds(tmp_path / "vmdk0.vmdk", bytes(streams[1].model), fmt="vmdk")
