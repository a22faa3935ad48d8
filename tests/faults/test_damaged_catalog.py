"""A damaged state database: the daemon refuses to start on it, saying what and where.

The master target's catalog holds each disk's applied marker and its
recovery points; the process server's holds each disk's acknowledged
position. Built on a damaged page, either would apply or acknowledge the
wrong thing, so a bit flipped in one stops the daemon at start, with the file
named, before anything is read from it.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from mastertarget import config as mt_config
from mastertarget.daemon import MasterTarget
from protocol.limits import MiB
from protocol.sequencing import StreamPosition
from runtime.durabledb import DurableDatabase
from runtime.errors import DurabilityError
from tests.conftest import Deployment
from tests.mastertarget.conftest import Pusher, random_workload, write_config

SQLITE_PAGE = 4096


def _flip_a_page(path: Path, page: int) -> None:
    data = bytearray(path.read_bytes())
    assert len(data) > (page + 1) * SQLITE_PAGE, f"{path} has only {len(data)} bytes"
    for offset in range(page * SQLITE_PAGE + 8, page * SQLITE_PAGE + 200, 7):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_flipped_page_is_found_at_open(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    schema = "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB);"
    db = DurableDatabase(path, schema=schema, version=1, what="test database")
    with db.transaction() as conn:
        conn.executemany("INSERT INTO t VALUES (?, ?)", [(n, bytes(300)) for n in range(200)])
    db.close()
    _flip_a_page(path, 3)
    with pytest.raises(DurabilityError, match=r"test database .*x\.db is damaged \("):
        DurableDatabase(path, schema=schema, version=1, what="test database")


async def test_the_master_target_will_not_start_on_a_damaged_catalog(
    deployment: Deployment, tmp_path: Path
) -> None:
    config = write_config(
        deployment, tmp_path,
        [{"id": "d0", "target": tmp_path / "d0.raw", "create": True, "size_bytes": 4 * MiB}],
    )  # fmt: skip
    mt = await MasterTarget.start(mt_config.load(config), data_port=0, metrics_port=0)
    connector = aiohttp.TCPConnector(ssl=deployment.client_tls())
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            pusher = Pusher(deployment, session, mt.port)
            rng = random.Random(2)
            for seq in range(1, 41):  # enough recovery points to fill several pages
                records = random_workload(rng, 4 * MiB, 1, max_len=4096)
                status, answer = await pusher.send(pusher.seal("d0", 1, seq, records))
                assert status == 200, answer
        await asyncio.wait_for(mt.replicas["d0"].wait_applied(StreamPosition(1, 40)), 30)
    finally:
        await mt.close()
    catalog = next(tmp_path.rglob("state.db"))
    _flip_a_page(catalog, 2)
    result = subprocess.run(
        [sys.executable, "-m", "mastertarget.cli", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 74, result.stderr  # EX_IOERR
    assert f"{catalog} is damaged" in result.stderr
    assert "will not start on it" in result.stderr
