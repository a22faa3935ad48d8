"""kill -9 of the process server at seeded moments while an agent streams to
it: after each restart the agent resends from the last acknowledged seq. At
the end the master target's copy equals the source: no acknowledged batch
was lost, none applied twice in a way that shows."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import aiohttp

from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from protocol.limits import MiB
from protocol.records import Record
from protocol.sequencing import StreamPosition
from tests.conftest import Deployment, assert_image_holds, require_binary
from tests.faults.daemons import Daemon, free_port
from tests.mastertarget.conftest import apply_to_model, random_workload, write_config
from tests.processserver.test_api import _body, write_ps_config

SIZE = 8 * MiB
BATCHES = 150
KILLS = 5


async def test_kill_9_of_the_process_server_loses_no_acked_batch(
    deployment: Deployment, tmp_path: Path
) -> None:
    require_binary("qemu-img")  # skip before the run, not after it
    mt_port, ps_port = free_port(), free_port()
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    mt_root.mkdir()
    ps_root.mkdir()
    mt_conf = write_config(
        deployment, mt_root,
        [{"id": "vm01-d0", "target": mt_root / "t.raw", "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    with mt_conf.open("a") as extra:
        extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {mt_port}\n')
    mt = await MasterTarget.start(mt_config.load(mt_conf), metrics_port=0)
    ps_conf = write_ps_config(deployment, ps_root, port=ps_port)
    ps_conf.write_text(
        ps_conf.read_text().replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
        + f"[metrics]\nport = {free_port()}\n"
    )
    daemon = Daemon(ps_conf, tmp_path / "ps.log", module="processserver.cli")
    await asyncio.to_thread(daemon.start)
    rng = random.Random(21)
    batches: list[tuple[int, list[Record]]] = []
    seq = 1
    for _ in range(BATCHES):
        records = random_workload(rng, SIZE, rng.randint(1, 4), max_len=60_000)
        batches.append((seq, records))
        seq += len(records)
    last = seq - 1
    base = f"https://127.0.0.1:{ps_port}/v1/disks/vm01-d0"
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"), force_close=True)
    timeout = aiohttp.ClientTimeout(total=10)

    async def agent(session: aiohttp.ClientSession) -> tuple[int, int]:
        index, acked_batches, failures, deadline = 0, 0, 0, time.monotonic() + 90
        while index < len(batches):
            assert time.monotonic() < deadline, (tmp_path / "ps.log").read_text()[-2000:]
            first, records = batches[index]
            try:
                async with session.post(
                    f"{base}/batches", data=_body("vm01-d0", first, records)
                ) as r:
                    answer = await r.json()
                    status = r.status
            except (aiohttp.ClientError, OSError, TimeoutError):
                failures += 1
                await asyncio.sleep(0.05)
                try:  # resend from what the process server acknowledged
                    async with session.get(f"{base}/state") as r:
                        acked = (await r.json())["acked_seq"]
                    index = sum(1 for s, _ in batches if s <= acked)
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                continue
            if status == 200:
                acked_batches += 1
                index = sum(1 for s, _ in batches if s <= answer["acked_seq"])
            elif status == 409:
                index = sum(1 for s, _ in batches if s < answer["expected_seq"])
            else:
                assert status == 503, answer
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.02)  # an agent's pace: the kills land mid-stream
        return acked_batches, failures

    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            sending = asyncio.create_task(agent(session))
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.3, 1.0))
                await asyncio.to_thread(daemon.kill)  # the master target runs on this loop
                await asyncio.to_thread(daemon.start)
            acked, failures = await asyncio.wait_for(sending, 120)
        await asyncio.wait_for(mt.replicas["vm01-d0"].wait_applied(StreamPosition(1, last)), 60)
    finally:
        await asyncio.to_thread(daemon.stop)
        await mt.close()
    assert daemon.starts == KILLS + 1
    assert acked >= BATCHES // 2
    assert failures >= 1, f"no kill landed while the agent was sending: {acked} acked"
    model = bytearray(SIZE)
    for _, records in batches:
        apply_to_model(model, records)
    assert_image_holds(mt_root / "t.raw", bytes(model))
