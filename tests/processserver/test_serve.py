"""processserver serve: starts from its config, answers over TLS, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.conftest import Deployment
from tests.faults.daemons import free_port

from .test_api import write_ps_config


async def test_serve_runs_until_sigterm(deployment: Deployment, tmp_path: Path) -> None:
    port = free_port()
    config = write_ps_config(deployment, tmp_path, port=port)
    with config.open("a") as extra:
        extra.write(f"[metrics]\nport = {free_port()}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "processserver.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        connector = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"https://127.0.0.1:{port}/v1/disks/vm01-d0/state"
            for _ in range(200):
                try:
                    async with session.get(url) as response:
                        state = await response.json()
                        break
                except (aiohttp.ClientError, OSError):
                    await asyncio.sleep(0.05)
            assert state["acked_seq"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, output.decode()
    assert b"process server ready" in output
