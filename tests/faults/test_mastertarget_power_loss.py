"""Power cuts under the master target: inbox, undo journal, catalog and target.

All four live on one ext4 image, loop-mounted in a private mount namespace
with timed journal commits off (see tests/faults/test_power_loss.py): a copy
of the image taken while the master target is frozen is what a power cut at
that instant leaves. The master target restarts on the copy each time, and
the stream goes on from the seq it says it received. It must still hold
every file it answered 200 for, and at the end every recovery point must
rebuild the disk exactly as it was at that point (docs/design.md invariants 1
and 3).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Deployment, require_binary
from tests.faults.daemons import Daemon, free_port, loop_volume_wrapper
from tests.faults.test_mastertarget_crash_points import SIZE, _request, _stream
from tests.mastertarget.conftest import write_config

IMAGE_BYTES = 128 * 2**20
CUTS = 3
TIMEOUT_S = 90.0


@pytest.mark.skipif(os.geteuid() != 0, reason="a loop-mounted volume needs root")
async def test_power_cuts_keep_every_received_file_and_every_point(
    deployment: Deployment, tmp_path: Path
) -> None:
    require_binary("unshare")
    mkfs = require_binary("mkfs.ext4")
    rng = random.Random(23)
    image = tmp_path / "volume-0.ext4"
    with image.open("wb") as sparse:
        sparse.truncate(IMAGE_BYTES)
    subprocess.run([mkfs, "-q", "-F", str(image)], check=True, timeout=60)
    volume = tmp_path / "volume"
    volume.mkdir()
    port = free_port()
    config = write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": volume / "d0.raw", "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    config.write_text(
        config.read_text()
        .replace(str(tmp_path / "cache"), str(volume / "cache"))
        .replace(str(tmp_path / "retention"), str(volume / "retention"))
        + f'[listen]\nhost = "127.0.0.1"\nport = {port}\n[metrics]\nport = {free_port()}\n'
    )
    files, images = _stream(deployment, seed=5)
    base = f"https://127.0.0.1:{port}/v1/disks/d0"
    figures = {"cuts": 0, "files_sent": 0}
    daemon: Daemon | None = None
    deadline = time.monotonic() + TIMEOUT_S
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls(), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            received = 0
            for cut in range(CUTS + 1):
                # The retention directory must exist on the mounted volume:
                # the daemon is started through a shell that makes it.
                daemon = Daemon(
                    config, tmp_path / f"mt-{cut}.log", module="mastertarget.cli",
                    wrapper=_with_mkdir(loop_volume_wrapper(image, volume), volume / "retention"),
                )  # fmt: skip
                daemon.start()
                while True:
                    try:
                        _, state = await _request(session, "GET", f"{base}/state")
                        break
                    except (aiohttp.ClientError, OSError):
                        assert time.monotonic() < deadline, "the master target never came up"
                        await asyncio.sleep(0.1)
                # Every file answered 200 before the cut is still held.
                assert state["received_seq"] >= received, (cut, state, received)
                received = state["received_seq"]
                if cut == CUTS:
                    break
                # A few files, then the cut lands while they are being applied.
                batch = rng.randint(1, 3)
                for first, body in files:
                    if first <= received:
                        continue
                    if batch == 0:
                        break
                    batch -= 1
                    status, answer = await _request(
                        session, "PUT", f"{base}/hrl/1/{first}", data=body
                    )
                    assert status == 200, answer
                    received = answer["received_seq"]
                    figures["files_sent"] += 1
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                assert daemon.proc is not None
                daemon.proc.send_signal(signal.SIGSTOP)
                copy = tmp_path / f"volume-{cut + 1}.ext4"
                shutil.copyfile(image, copy)
                daemon.kill()
                image.unlink()
                image = copy
                figures["cuts"] += 1
            for first, body in files:  # the rest of the stream, on the last copy
                if first > received:
                    status, answer = await _request(
                        session, "PUT", f"{base}/hrl/1/{first}", data=body
                    )
                    assert status == 200, answer
            last = max(images)
            while True:
                _, state = await _request(session, "GET", f"{base}/state")
                if state["applied_seq"] == last:
                    break
                assert time.monotonic() < deadline, state
                await asyncio.sleep(0.1)
            admin = aiohttp.UnixConnector(path=str(tmp_path / "admin.sock"))
            async with aiohttp.ClientSession(connector=admin) as admin_session:
                _, listing = await _request(admin_session, "GET", "http://mt/v1/disks/d0/points")
                listed = listing["points"]
                assert {p["seq"] for p in listed} == set(images)
                for point in listed:
                    output = tmp_path / f"p{point['seq']}.raw"
                    spec = f"tag:{point['name']}" if point["name"] else point["time"]
                    status, answer = await _request(
                        admin_session, "POST", "http://mt/v1/disks/d0/recover",
                        json={"point": spec, "output": str(output), "format": "raw"},
                    )  # fmt: skip
                    assert status == 200, answer
                    assert output.read_bytes() == images[answer["point"]["seq"]], point
        finally:
            if daemon is not None:
                daemon.kill_if_running()
    print(f"\nmaster target power cuts: {figures}, {len(images)} points recovered exactly")


def _with_mkdir(wrapper: tuple[str, ...], folder: Path) -> tuple[str, ...]:
    """``wrapper`` with ``mkdir -p folder`` run after the mount."""
    script_index = wrapper.index("-c") + 1
    script = wrapper[script_index].replace("&& shift &&", f"&& mkdir -p {folder} && shift &&", 1)
    return (*wrapper[:script_index], script, *wrapper[script_index + 1 :])
