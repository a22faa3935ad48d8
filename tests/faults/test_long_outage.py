"""A process server away for longer than the agent's give-up limit, under live capture.

The capture is a service: it must ride out an outage of any length without
burning the protected machine's CPU or filling its log, keep journaling
(no resync window, so the points stay honest), and send everything once the
process server is back. Before, once ``give_up_after_s`` had passed, every
failed exchange raised at once, the stream was taken down and opened again
with no pause: 7.5 CPU-seconds and ~30,000 log lines in 15 s.

The figures of each run (CPU seconds and log lines per minute past the
limit) go to docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

from protocol.limits import MiB
from tests.conftest import Deployment
from tests.e2e.capture import CaptureProcess, require_capture_peers
from tests.e2e.conftest import BLOCKREPL, build_site, make_source, start, wait_listening

SIZE = 32 * MiB
#: The agent's give-up limit in this test: the outage lasts far longer.
GIVE_UP_AFTER_S = 3
#: Seconds measured once the limit has passed.
MEASURE_S = 20.0
#: What a capture riding out an outage may spend per minute: a few
#: exchanges tried at the slowest back-off cost milliseconds each.
MAX_CPU_S_PER_MIN = 3.0
#: Log lines per minute: the outage report (one a minute at most) and a
#: few lines of retries; a spinning loop wrote about 120,000.
MAX_LINES_PER_MIN = 10


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_outage_past_the_give_up_limit_costs_little_and_loses_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    require_capture_peers()
    site = build_site(deployment, tmp_path, size=SIZE, sync={"region_bytes": 8 * MiB})
    site.agent_config.write_text(
        site.agent_config.read_text().replace(
            "give_up_after_s = 60", f"give_up_after_s = {GIVE_UP_AFTER_S}"
        )
    )
    source = tmp_path / "source.raw"
    make_source(source, SIZE, [(0, random.Random(5).randbytes(SIZE // 2))])
    start(site)
    capture = CaptureProcess(site, source)
    capture.start()
    capture.settle()
    assert capture.proc is not None
    ps = site.process_servers[0]

    assert ps.stop() == 0
    stopped = time.monotonic()
    capture.qemu_io(f"write -P 0x3c {8 * MiB} {MiB}")  # answered: the journal takes it
    time.sleep(max(0.0, stopped + GIVE_UP_AFTER_S + 2 - time.monotonic()))
    lines_before = len(capture.log.read_text().splitlines())
    cpu_before, began = _cpu_s(capture.proc.pid), time.monotonic()
    time.sleep(MEASURE_S)
    cpu_s, measured_s = _cpu_s(capture.proc.pid) - cpu_before, time.monotonic() - began
    lines = capture.log.read_text().splitlines()[lines_before:]
    cpu_per_min, lines_per_min = cpu_s * 60 / measured_s, len(lines) * 60 / measured_s
    print(f"past the limit: {cpu_per_min:.2f} CPU-s/min, {lines_per_min:.1f} log lines/min")
    assert cpu_per_min < MAX_CPU_S_PER_MIN, (cpu_s, measured_s)
    assert len(lines) * 60 / measured_s <= MAX_LINES_PER_MIN, lines
    status = capture.status()
    assert status["mode"] == "journaling", status
    assert not status["window_open"], status
    assert status["process_server_failing_s"] > GIVE_UP_AFTER_S
    log = capture.log.read_text()
    assert "no process server made progress" in log, log[-3000:]
    shown = subprocess.run(
        [str(BLOCKREPL), "agent", "status", "--config", str(site.agent_config)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "exchanges with the process servers failing for" in shown, shown

    ps.start()
    wait_listening(site.ps_ports[0], ps)
    settled = capture.settle()
    assert settled["stats"]["dirty_requests"] == 0  # journaled all along: no resync window
    site.assert_identical(source)
    assert "answered again after" in capture.log.read_text()
    assert capture.status()["process_server_failing_s"] == 0
