"""Power cuts under the process server's cache: every acknowledged batch survives.

The cache is an ext4 file system in an image file, loop-mounted in a private
mount namespace (root only) with its timed journal commits off, so the image
changes only when the process server syncs. At a seeded moment of a stream
the process server is frozen (SIGSTOP) and the image copied: the copy is the
device as a power cut at that instant would leave it — whatever was written
and not yet synced is not in it. The process server then starts on the copy
(ext4 replays its journal) and must hold every batch it acknowledged before
the cut, with no file torn and no resync needed. After several cuts the
master target comes and the target must equal the source.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from protocol.limits import MiB
from protocol.records import Record
from protocol.sequencing import StreamPosition
from tests.conftest import Deployment, assert_image_holds, require_binary
from tests.faults.daemons import Daemon, free_port, loop_volume_wrapper
from tests.mastertarget.conftest import apply_to_model, random_workload, write_config
from tests.processserver.test_api import _body, write_ps_config

DISK = "vm01-d0"
SIZE = 8 * MiB
IMAGE_BYTES = 128 * MiB
CUTS = 4
BATCHES = 400
#: Seconds the stream runs before a cut: long enough for dozens of batches,
#: well inside ext4's 30 s dirty-page expiry, so nothing is written back
#: behind the process server's back.
CUT_AFTER_S = (0.3, 1.5)
TIMEOUT_S = 60.0


async def _acked_seq(session: aiohttp.ClientSession, base: str) -> tuple[int, bool]:
    """The process server's acknowledged seq and resync flag, once it answers."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while True:
        try:
            async with session.get(f"{base}/v1/disks/{DISK}/state") as response:
                state = await response.json()
                return int(state["acked_seq"]), bool(state["resync_required"])
        except aiohttp.ClientConnectionError:
            assert asyncio.get_running_loop().time() < deadline, "the process server never came up"
            await asyncio.sleep(0.1)


@pytest.mark.skipif(os.geteuid() != 0, reason="a loop-mounted volume needs root")
async def test_power_cuts_keep_every_acknowledged_batch(
    deployment: Deployment, tmp_path: Path
) -> None:
    require_binary("unshare")
    mkfs = require_binary("mkfs.ext4")
    rng = random.Random(17)
    image = tmp_path / "cache-0.ext4"
    with image.open("wb") as sparse:
        sparse.truncate(IMAGE_BYTES)
    subprocess.run([mkfs, "-q", "-F", str(image)], check=True, timeout=60)
    mt_port, ps_port = free_port(), free_port()
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    mt_root.mkdir()
    (ps_root / "cache").mkdir(parents=True)
    ps_conf = write_ps_config(deployment, ps_root, port=ps_port)
    ps_conf.write_text(
        ps_conf.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
        + f"[metrics]\nport = {free_port()}\n"
    )
    batches: list[tuple[int, list[Record]]] = []
    seq = 1
    for _ in range(BATCHES):
        records = random_workload(rng, SIZE, rng.randint(1, 3), max_len=40_000)
        batches.append((seq, records))
        seq += len(records)
    base = f"https://127.0.0.1:{ps_port}"
    figures = {"cuts": 0, "acked_before_cuts": 0, "held_after_cuts": 0}
    acked = held = 0
    daemon: Daemon | None = None
    mt: MasterTarget | None = None
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            for cut in range(CUTS + 1):
                daemon = Daemon(
                    ps_conf, tmp_path / f"ps-{cut}.log", module="processserver.cli",
                    wrapper=loop_volume_wrapper(image, ps_root / "cache"),
                )  # fmt: skip
                daemon.start()
                held, resync = await _acked_seq(session, base)
                assert not resync, "a power cut left the process server needing a resync"
                if cut:
                    # Every batch answered 200 before the cut is still held.
                    assert held >= acked, (cut, held, acked)
                    figures["held_after_cuts"] += held
                if cut == CUTS:
                    break
                acked = held
                index = next((i for i, (s, _) in enumerate(batches) if s > held), len(batches))
                stop_at = asyncio.get_running_loop().time() + rng.uniform(*CUT_AFTER_S)
                while asyncio.get_running_loop().time() < stop_at and index < len(batches):
                    first, records = batches[index]
                    async with session.post(
                        f"{base}/v1/disks/{DISK}/batches", data=_body(DISK, first, records)
                    ) as response:
                        assert response.status == 200, await response.text()
                        acked = int((await response.json())["acked_seq"])
                    index += 1
                # The cut: freeze, copy the device as it is, kill.
                assert daemon.proc is not None
                daemon.proc.send_signal(signal.SIGSTOP)
                cut_image = tmp_path / f"cache-{cut + 1}.ext4"
                shutil.copyfile(image, cut_image)
                daemon.kill()
                image.unlink()
                image = cut_image
                figures["cuts"] += 1
                figures["acked_before_cuts"] += acked
            # The master target comes: everything held drains, and it is the source.
            mt_conf = write_config(
                deployment, mt_root,
                [{"id": DISK, "target": mt_root / "t.raw", "create": True, "size_bytes": SIZE}],
            )  # fmt: skip
            with mt_conf.open("a") as extra:
                extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {mt_port}\n')
            mt = await MasterTarget.start(mt_config.load(mt_conf), metrics_port=0)
            await asyncio.wait_for(
                mt.replicas[DISK].wait_applied(StreamPosition(1, held)), TIMEOUT_S
            )
        finally:
            if daemon is not None:
                daemon.kill_if_running()
            if mt is not None:
                await mt.close()
    model = bytearray(SIZE)
    for first, records in batches:
        if first > held:
            break
        apply_to_model(model, records)
    assert_image_holds(mt_root / "t.raw", bytes(model))
    print(f"\npower cuts: {figures}, final seq {held}, 0 acknowledged batches lost")
