"""The agent under faults, with a real master target and real process servers
as processes on loopback:

- kill -9 of the agent in the middle of a sync: run again, it goes on where
  it stopped, and the target ends identical to the source;
- kill -9 of the process server in use while it still holds acknowledged
  files that the master target never got: the agent moves to the next
  process server, sends again from what the master target holds, and the
  target ends identical.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import time
from pathlib import Path

from protocol.limits import MiB
from tests.conftest import Deployment
from tests.e2e.conftest import DISK, Site, build_site, make_source, start
from tests.faults.pausable_proxy import PausableProxy

SIZE = 128 * MiB
#: One record (and one batch) per 4 MiB: many batches to be killed between.
SYNC = {"region_bytes": 32 * MiB, "batch_bytes": 4 * MiB}
#: Upper bound for waiting on a condition: the test fails rather than hang.
WAIT_S = 60.0


def _source(tmp_path: Path, seed: int) -> Path:
    path = tmp_path / "source.raw"
    make_source(path, SIZE, [(0, random.Random(seed).randbytes(SIZE))])
    return path


def _until(what: str, check: object, proc: subprocess.Popen[bytes] | None = None) -> None:
    assert callable(check)
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert proc is None or proc.poll() is None, f"the agent ended before {what}"
        assert time.monotonic() < deadline, f"not {what} after {WAIT_S} s"
        time.sleep(0.01)


def test_kill_9_of_the_agent_mid_sync_resumes_and_ends_identical(
    deployment: Deployment, tmp_path: Path
) -> None:
    site = build_site(deployment, tmp_path, size=SIZE, sync=SYNC)
    source = _source(tmp_path, 1)
    start(site)
    agent = subprocess.Popen(
        site.sync_command(source), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    # The agent journals at most 64 MiB ahead of what is acknowledged: after 3
    # of 32 batches it is in the middle of the pass.
    _until("3 batches were acknowledged", lambda: int(site.ps_state()["acked_seq"]) >= 3, agent)
    agent.send_signal(signal.SIGKILL)
    agent.wait(timeout=10)
    assert list((site.state_dir / "journal" / DISK).iterdir()), "nothing left to resend"
    report = site.sync(source)
    assert report["resumed"] is True
    assert 0 < report["resumed_from"] < SIZE
    assert report["new_generation"] is False
    site.wait_applied(int(report["generation"]), int(report["last_seq"]))
    site.assert_identical(source)
    assert site.mt_state()["resync_open"] is False


async def test_a_process_server_killed_with_files_in_its_cache_loses_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    proxy = PausableProxy(0)
    await proxy.start()
    site = build_site(
        deployment, tmp_path, size=SIZE, process_servers=2,
        sync={"region_bytes": SIZE, "batch_bytes": 4 * MiB},
        mt_url_of={0: f"https://127.0.0.1:{proxy.port}"},
    )  # fmt: skip
    proxy.target_port = site.mt_port
    source = _source(tmp_path, 2)
    agent: asyncio.subprocess.Process | None = None
    try:
        await asyncio.to_thread(start, site)
        agent = await asyncio.create_subprocess_exec(
            *site.sync_command(source), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        await _async_until("the master target got some", lambda: _ps(site, "shipped_seq") >= 2)
        proxy.pause()  # the first process server now only caches
        # What it took before the pause may be on its way to the master target
        # in a PUT already sent; what it takes from now on can reach no one.
        paused_at = _ps(site, "acked_seq")
        await _async_until(
            "files waited in the cache", lambda: _ps(site, "acked_seq") >= paused_at + 4
        )
        site.process_servers[0].kill()
        stranded = list((site.root / "ps0" / "cache" / "disks" / DISK).glob("*.hrl"))
        assert stranded, "the killed process server held no files"
        try:
            out, err = await asyncio.wait_for(agent.communicate(), WAIT_S)
        except TimeoutError:
            agent.kill()
            _, err = await agent.communicate()
            logs = "".join(
                f"\n--- {path.name}:\n{path.read_text()[-3000:]}"
                for path in sorted(site.root.glob("*.log"))
            )
            raise AssertionError(
                f"the sync did not end in {WAIT_S} s:\n{err.decode()[-4000:]}{logs}"
            ) from None
        assert agent.returncode == 0, err.decode()
    finally:
        if agent is not None and agent.returncode is None:  # a failed wait: no orphan
            agent.kill()
            await agent.wait()
        await proxy.close()
    report = json.loads(out)
    assert report["failovers"] >= 1
    assert report["process_server"] == f"https://127.0.0.1:{site.ps_ports[1]}"
    assert report["resent_bytes"] > 0, (report, err.decode()[-4000:])
    await asyncio.to_thread(site.wait_applied, int(report["generation"]), int(report["last_seq"]))
    site.assert_identical(source)


def _ps(site: Site, key: str) -> int:
    return int(site.ps_state(0)[key])


async def _async_until(what: str, check: object) -> None:
    assert callable(check)
    deadline = time.monotonic() + WAIT_S
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"not {what} after {WAIT_S} s"
        await asyncio.sleep(0.01)
