"""Broken links on both hops: agent -> process server -> master target.

A fault proxy (tests/faults/proxy.py) sits on each hop and gives every new
connection a fault from a seeded schedule: delays, cuts in the middle of a
body, resets, answers swallowed after the work was done (lost
acknowledgements, so the sender sends again: duplicate delivery) and links
that go silent. The agent stand-in resends from the process server's
acknowledged seq after any failure, as the agent does; the process server
ships through its own faulty link. After the storm the target must equal
the source, with nothing lost and nothing applied twice in a way that shows.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp

from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.limits import MiB
from protocol.records import Record
from protocol.sequencing import StreamPosition
from tests.conftest import Deployment, assert_image_holds
from tests.faults.daemons import free_port
from tests.faults.proxy import FAULTS, FaultProxy
from tests.mastertarget.conftest import apply_to_model, random_workload, write_config
from tests.processserver.test_api import _body, write_ps_config

DISK = "vm01-d0"
SIZE = 8 * MiB
BATCHES = 60
#: Seconds the agent stand-in and the shipper wait on a silent link: short,
#: so that black holes cost the test little time.
SILENT_LINK_S = 1.5
#: Bound on the whole storm and on draining after it.
STORM_TIMEOUT_S = 240.0
DRAIN_TIMEOUT_S = 60.0
#: The schedule's weights: mostly faults, black holes rarer (each costs a timeout).
WEIGHTS = {"pass": 2.0, "delay": 1.0, "cut": 1.0, "reset": 1.0, "lost-ack": 1.0, "blackhole": 0.3}
#: The shipper opens a connection only after a failure or an expiry, and
#: backs off after each failure: its link takes the faults in turn, with a
#: pass between two (which resets the back-off).
SHIPPER_SCHEDULE = tuple(x for f in FAULTS if f != "pass" for x in ("pass", f))


async def _acked(session: aiohttp.ClientSession, base: str) -> int:
    """The process server's acknowledged seq, asked until an answer gets through."""
    while True:
        try:
            async with session.get(f"{base}/v1/disks/{DISK}/state") as response:
                if response.status == 200:
                    return int((await response.json())["acked_seq"])
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.05)


async def _stream(
    session: aiohttp.ClientSession, base: str, batches: list[tuple[int, bytes]]
) -> dict[str, int]:
    """Send every batch, resending from the acknowledged seq after any failure."""
    figures = {"posts": 0, "failed_posts": 0, "resumes": 0}
    index = 0
    while index < len(batches):
        first_seq, body = batches[index]
        figures["posts"] += 1
        try:
            async with session.post(f"{base}/v1/disks/{DISK}/batches", data=body) as response:
                answer = await response.json()
                if response.status == 200:
                    index += 1
                    continue
                assert response.status in (408, 409, 503), answer
        except (aiohttp.ClientError, TimeoutError):
            pass
        figures["failed_posts"] += 1
        acked = await _acked(session, base)
        resume = next((i for i, (seq, _) in enumerate(batches) if seq > acked), len(batches))
        figures["resumes"] += 1
        assert resume >= index - 1 or acked >= first_seq - 1  # never goes back past an ack
        index = resume
    return figures


async def test_a_storm_on_both_links_loses_and_doubles_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    mt_port = free_port()
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    mt_root.mkdir()
    mt_file = write_config(
        deployment, mt_root,
        [{"id": DISK, "target": mt_root / f"{DISK}.raw", "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    with mt_file.open("a") as extra:
        extra.write(f'[listen]\nhost = "127.0.0.1"\nport = {mt_port}\n')
    mt = await MasterTarget.start(mt_config.load(mt_file), metrics_port=0)
    # The shipper keeps its connection: cut it often, so that most files meet a fault.
    to_mt = FaultProxy(mt_port, seed=2, schedule=SHIPPER_SCHEDULE, max_connection_bytes=MiB)
    await to_mt.start()
    ps_root.mkdir()
    ps_file = write_ps_config(deployment, ps_root)
    ps_file.write_text(
        ps_file.read_text().replace(
            'url = "https://127.0.0.1:9"',
            f'url = "https://127.0.0.1:{to_mt.port}"\nread_timeout_s = {SILENT_LINK_S}\n'
            f"connect_timeout_s = {SILENT_LINK_S}\ntransfer_timeout_s = 10",
        )
    )
    ps = await ProcessServer.start(ps_config.load(ps_file), data_port=0, metrics_port=0)
    to_ps = FaultProxy(ps.port, seed=1, weights=WEIGHTS)
    await to_ps.start()

    rng = random.Random(7)
    model = bytearray(SIZE)
    batches: list[tuple[int, bytes]] = []
    seq = 1
    for _ in range(BATCHES):
        records: list[Record] = random_workload(rng, SIZE, 6, max_len=96 * 1024)
        batches.append((seq, _body(DISK, seq, records)))
        apply_to_model(model, records)
        seq += len(records)
    last_seq = seq - 1

    timeout = aiohttp.ClientTimeout(total=10, sock_read=SILENT_LINK_S, sock_connect=SILENT_LINK_S)
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"), force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            base = f"https://127.0.0.1:{to_ps.port}"
            figures = await asyncio.wait_for(_stream(session, base, batches), STORM_TIMEOUT_S)
            to_ps.active = False  # the agent's link heals
            # The shipper's link stays stormy until it has met every fault (it
            # backs off after each failure and sends what waited as one run,
            # so it opens few connections): whenever it has shipped all, one
            # more batch gives it another file to ship.
            deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
            while not all(to_mt.injected[f] for f in FAULTS if f != "pass"):
                assert asyncio.get_running_loop().time() < deadline, to_mt.injected
                if not ps.disks[DISK].cached:
                    # about 1 MiB: the connection it goes on expires (max_connection_bytes)
                    records = random_workload(rng, SIZE, 8, max_len=256 * 1024)
                    more = [(last_seq + 1, _body(DISK, last_seq + 1, records))]
                    await _stream(session, base, more)
                    apply_to_model(model, records)
                    last_seq += len(records)
                await asyncio.sleep(0.1)
        to_mt.active = False
        await asyncio.wait_for(
            mt.replicas[DISK].wait_applied(StreamPosition(1, last_seq)), DRAIN_TIMEOUT_S
        )
        duplicates = mt.metrics.registry.get_sample_value(
            "blockrepl_mastertarget_hrl_duplicates_total", {"disk": DISK}
        )
    finally:
        await to_ps.close()
        await ps.close()
        await to_mt.close()
        await mt.close()

    print(f"\nagent->ps {dict(to_ps.injected)}; ps->mt {dict(to_mt.injected)}")
    for proxy in (to_ps, to_mt):
        for fault in FAULTS:
            if fault != "pass":
                assert proxy.injected[fault] >= 1, (fault, proxy.injected)
    assert figures["failed_posts"] >= 1
    # Lost acknowledgements on the second hop made the process server send
    # files the master target already held: taken as duplicates, not applied.
    assert duplicates is not None
    assert duplicates >= 1
    assert_image_holds(mt_root / f"{DISK}.raw", bytes(model))
    print(
        f"\nagent->ps faults {dict(to_ps.injected)}; ps->mt faults {dict(to_mt.injected)}; "
        f"{BATCHES} batches ({last_seq} records), {figures}, mt duplicates {duplicates:g}"
    )
