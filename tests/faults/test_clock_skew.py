"""A master target whose clock is an hour off the source's (libfaketime).

The RPO must never look better than the truth: with the source ahead, capture
times are clamped to apply times and the skew is reported; with the source
behind, points look older, so the alert comes early, never late.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import ssl
import sysconfig
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from agent.pki import init_ca, issue_machine
from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.limits import MiB
from protocol.records import Record
from runtime.config import TlsFiles
from runtime.tls import client_context
from tests.conftest import Deployment, missing_peer, require_binary
from tests.faults.daemons import Daemon, free_port
from tests.mastertarget.conftest import random_workload, write_config
from tests.processserver.test_api import _body, write_ps_config

DISK = "vm01-d0"
SIZE = 4 * MiB
HOUR_S = 3600.0
#: How far the figures may be from the offset: transit, apply and scrape time.
SLACK_S = 120.0
TIMEOUT_S = 60.0


def _client(pki: Path) -> ssl.SSLContext:
    return client_context(
        TlsFiles(
            ca_file=pki / "ca.pem", cert_file=pki / "machine-vm01.pem",
            key_file=pki / "machine-vm01.key",
        )
    )  # fmt: skip


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:  # not listening yet
        return None
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and f'disk="{DISK}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.parametrize("offset", ["-1h", "+1h"])
async def test_rpo_is_never_better_than_the_truth_under_an_hour_of_skew(
    deployment: Deployment, tmp_path: Path, offset: str
) -> None:
    require_binary("faketime")
    # Preloaded into the daemon itself (the faketime program would stand
    # between it and the signals that stop it).
    library = Path(f"/usr/lib/{sysconfig.get_config_var('MULTIARCH')}/faketime/libfaketimeMT.so.1")
    if not library.exists():
        missing_peer(f"{library} is missing (Debian package faketime)")
    # Certificates made two hours ago, so that the slow clock accepts them too.
    pki = tmp_path / "pki"
    init_ca(pki, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    for machine in ("ps01", "vm01"):
        issue_machine(pki, machine, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    mt_port, metrics_port = free_port(), free_port()
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    mt_root.mkdir()
    ps_root.mkdir()
    mt_conf = write_config(
        deployment, mt_root,
        [{"id": DISK, "target": mt_root / "t.raw", "create": True, "size_bytes": SIZE}],
    )  # fmt: skip
    mt_conf.write_text(
        mt_conf.read_text().replace(str(deployment.pki), str(pki))
        + f'[listen]\nhost = "127.0.0.1"\nport = {mt_port}\n[metrics]\nport = {metrics_port}\n'
    )
    daemon = Daemon(
        mt_conf, tmp_path / "mt.log", module="mastertarget.cli",
        env_once={
            "LD_PRELOAD": str(library), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        },
    )  # fmt: skip
    daemon.start()
    ps_conf = write_ps_config(deployment, ps_root)
    ps_conf.write_text(
        ps_conf.read_text()
        .replace(str(deployment.pki), str(pki))
        .replace("https://127.0.0.1:9", f"https://127.0.0.1:{mt_port}")
    )
    ps = await ProcessServer.start(ps_config.load(ps_conf), data_port=0, metrics_port=0)
    try:
        connector = aiohttp.TCPConnector(ssl=_client(pki))
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"https://127.0.0.1:{ps.port}/v1/disks/{DISK}/batches"
            seq, rng = 1, random.Random(3)
            for _ in range(5):
                records: list[Record] = random_workload(rng, SIZE, 3, max_len=50_000)
                body = _body(DISK, seq, records, capture_ns=time.time_ns())
                async with session.post(url, data=body) as response:
                    assert response.status == 200, await response.text()
                seq += len(records)
        # Housekeeping evaluates the RPO every few seconds: wait for its figures.
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while True:
            # Scraped on a thread: the process server runs on this loop meanwhile.
            rpo = await asyncio.to_thread(
                _metric, metrics_port, "blockrepl_mastertarget_rpo_seconds"
            )
            skew = await asyncio.to_thread(
                _metric, metrics_port, "blockrepl_mastertarget_clock_skew_seconds"
            )
            applied = await asyncio.to_thread(
                _metric, metrics_port, "blockrepl_mastertarget_applied_seq"
            )
            # Figures of an evaluation after the last point: the skew it saw,
            # or the age it gave the point.
            evaluated = skew is not None and skew > 0 if offset == "-1h" else rpo and rpo > SLACK_S
            if applied == seq - 1 and rpo is not None and skew is not None and evaluated:
                break
            assert asyncio.get_running_loop().time() < deadline, (rpo, skew, applied)
            await asyncio.sleep(0.5)
        exceeded = await asyncio.to_thread(
            _metric, metrics_port, "blockrepl_mastertarget_rpo_exceeded"
        )
    finally:
        await ps.close()
        daemon.stop()
    log = (tmp_path / "mt.log").read_text()
    if offset == "-1h":
        # The source is an hour ahead: the RPO stays small and true, the skew is reported.
        assert rpo < SLACK_S
        assert HOUR_S - SLACK_S < skew < HOUR_S + SLACK_S
        assert "source clock is at least" in log
        assert exceeded == 0
    else:
        # The source is an hour behind: points look an hour old; the alert comes early.
        assert HOUR_S - SLACK_S < rpo < HOUR_S + SLACK_S
        assert exceeded == 1
        assert skew == 0
    print(
        f"\nmaster target clock {offset}: rpo {rpo:.1f} s, skew {skew:.1f} s, exceeded {exceeded:g}"
    )
