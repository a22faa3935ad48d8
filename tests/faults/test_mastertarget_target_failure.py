"""A target that fails its writes: the disk pauses, keeps receiving, and once
the target works again the whole file is applied on a reopened target —
never "retry the fsync and carry on"."""

from __future__ import annotations

import asyncio
import resource
import subprocess
from pathlib import Path

import aiohttp
import pytest

from protocol.records import Write
from tests.conftest import Deployment, require_binary
from tests.faults.daemons import Daemon, free_port
from tests.mastertarget.conftest import Pusher, write_config

SIZE = 16 * 2**20
#: The daemon may not grow any file past this: writes to the target beyond
#: it fail with EFBIG, as a full or failing volume would fail them.
FILE_SIZE_LIMIT = 2**20


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.RLIM_INFINITY))


async def _state(pusher: Pusher, want: str, timeout: float = 20) -> dict:  # type: ignore[type-arg]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    state: dict = {}  # type: ignore[type-arg]
    while loop.time() < deadline:
        try:
            state = await pusher.state("d0")
            if state["state"] == want:
                return state
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.05)
    pytest.fail(f"disk never became {want}: {state}")


async def test_failed_target_pauses_then_resumes_whole(
    deployment: Deployment, tmp_path: Path
) -> None:
    prlimit = require_binary("prlimit")
    target = tmp_path / "disk.raw"
    with target.open("wb") as image:
        image.truncate(SIZE)
    port = free_port()
    config = write_config(deployment, tmp_path, [{"id": "d0", "target": target}])
    with config.open("a") as extra:
        extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {port}\n')
        extra.write(f"[metrics]\nport = {free_port()}\n")
    daemon = Daemon(config, tmp_path / "daemon.log", preexec=_limit_file_size)
    daemon.start()
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls())
    async with aiohttp.ClientSession(connector=connector) as session:
        pusher = Pusher(deployment, session, port)
        for _ in range(200):  # wait for the port
            try:
                await pusher.state("d0")
                break
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.05)
        first = pusher.seal("d0", 1, 1, [Write(8 * 2**20, b"\x11" * 4096)])
        assert (await pusher.send(first))[0] == 200  # durable in the inbox
        paused = await _state(pusher, "paused")
        assert "File too large" in paused["last_apply_error"], paused
        assert paused["applied_seq"] == 0
        second = pusher.seal("d0", 1, 2, [Write(0, b"\x22" * 4096)])
        assert (await pusher.send(second))[0] == 200  # a paused disk still receives
        assert daemon.proc is not None
        subprocess.run(
            [prlimit, f"--pid={daemon.proc.pid}", "--fsize=unlimited"], check=True, timeout=10
        )
        resumed = await _state(pusher, "replicating", timeout=30)
        for _ in range(200):
            if resumed["applied_seq"] == 2:
                break
            await asyncio.sleep(0.05)
            resumed = await pusher.state("d0")
        assert (resumed["applied_seq"], resumed["last_apply_error"]) == (2, "")
    assert daemon.stop() == 0
    image = target.read_bytes()
    assert image[8 * 2**20 : 8 * 2**20 + 4096] == b"\x11" * 4096
    assert image[:4096] == b"\x22" * 4096
    assert "opened again" in (tmp_path / "daemon.log").read_text()
