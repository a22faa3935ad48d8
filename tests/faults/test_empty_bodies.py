"""Empty and tiny bodies, thousands in a row, on every endpoint that reads a body.

Each of the ways HTTP lets a request carry no body — ``Content-Length: 0``,
no length at all, a chunked body of only its last chunk, HTTP/1.0 without a
length — and every one-byte body, goes again and again to the process
server's batches and generation endpoints, the master target's HRL endpoint
and its admin socket's recover and failover, all in one running daemon each
(docs/reliability.md, "Empty and tiny bodies"). aiohttp gives every
body-less request one shared reader that says "end" once per process and
"empty chunk" forever after: a loop that took the second for a piece spun
the event loop for good from the second such request on.

Every answer must be a 400 in time, the daemons must still be ready and take
a real batch afterwards, their memory must stay flat, and nothing may reach
their logs as a traceback.
"""

from __future__ import annotations

import json
import time
import tomllib
import urllib.request
from collections import Counter
from pathlib import Path

from protocol.limits import MiB
from protocol.records import Write
from tests.conftest import Deployment
from tests.e2e.conftest import DISK, build_site, start
from tests.faults.rawhttp import (
    RawConnection,
    tls_connector,
    unix_connector,
    with_body,
    without_body,
)
from tests.processserver.test_api import _body

WAYS = ("content-length-0", "no-length", "chunked-last-only", "http10-no-length")
#: Rounds of every way on every endpoint: 1,000 body-less requests or more per daemon.
ROUNDS = 150
#: The error codes a body-less or one-byte body may be refused with.
DECLARED = {"malformed", "truncated", "bad-magic"}
#: The daemons' resident memory may grow this much over thousands of requests
#: (buffers, caches settling); a leak per request would pass it many times over.
RSS_GROWTH_BYTES = 20 * MiB


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def _metrics_port(config: Path) -> int:
    return int(tomllib.loads(config.read_text())["metrics"]["port"])


def _readyz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
        return int(answer.status)


def test_empty_and_one_byte_bodies_get_400_and_the_daemons_keep_serving(
    deployment: Deployment, tmp_path: Path
) -> None:
    site = build_site(deployment, tmp_path, size=8 * MiB)
    start(site)
    ps, mt = site.process_servers[0], site.mt
    assert ps.proc is not None
    assert mt.proc is not None
    ports = {"ps": _metrics_port(ps.config), "mt": _metrics_port(mt.config)}
    deadline = time.monotonic() + 30
    while not (site.mt.config.parent / "admin.sock").exists():
        assert time.monotonic() < deadline, "the admin socket never appeared"
        time.sleep(0.05)
    rss_before = {"ps": _rss_bytes(ps.proc.pid), "mt": _rss_bytes(mt.proc.pid)}
    to_ps = RawConnection(tls_connector(site.ps_ports[0], deployment.client_tls("vm01")))
    to_mt = RawConnection(tls_connector(site.mt_port, deployment.client_tls("ps01")))
    to_admin = RawConnection(unix_connector(str(site.mt.config.parent / "admin.sock")))
    endpoints = [
        (to_ps, "POST", f"/v1/disks/{DISK}/batches"),
        (to_ps, "POST", f"/v1/disks/{DISK}/generation"),
        (to_mt, "PUT", f"/v1/disks/{DISK}/hrl/1/1"),
        (to_admin, "POST", f"/v1/disks/{DISK}/recover"),
        (to_admin, "POST", f"/v1/disks/{DISK}/failover"),
    ]
    statuses: Counter[int] = Counter()
    slowest_s = 0.0
    for connection, method, path in endpoints:
        requests = [without_body(method, path, how) for _ in range(ROUNDS) for how in WAYS]
        requests += [with_body(method, path, bytes([value])) for value in range(256)]
        for raw in requests:
            began = time.monotonic()
            answer = connection.request(raw)
            slowest_s = max(slowest_s, time.monotonic() - began)
            statuses[answer.status] += 1
            assert answer.status == 400, (method, path, raw[:120], answer)
            assert json.loads(answer.body)["error"] in DECLARED, answer
    for connection in (to_ps, to_mt, to_admin):
        connection.close()

    assert statuses == {400: len(endpoints) * (ROUNDS * len(WAYS) + 256)}
    assert (_readyz(ports["ps"]), _readyz(ports["mt"])) == (200, 200)
    # Both still take real data: a batch in, and through to the master target.
    batch = _body(DISK, 1, [Write(0, b"\x5a" * 4096)])
    answer = RawConnection(tls_connector(site.ps_ports[0], deployment.client_tls("vm01")))
    acked = answer.request(with_body("POST", f"/v1/disks/{DISK}/batches", batch))
    assert (acked.status, json.loads(acked.body)["acked_seq"]) == (200, 1), acked
    site.wait_applied(1, 1)
    assert site.target.read_bytes()[:4096] == b"\x5a" * 4096
    growth = {}
    for name, daemon in (("ps", ps), ("mt", mt)):
        assert daemon.proc is not None
        growth[name] = _rss_bytes(daemon.proc.pid) - rss_before[name]
        assert growth[name] < RSS_GROWTH_BYTES, f"{name} grew by {growth[name]} bytes"
        assert "Traceback" not in daemon.log.read_text(), daemon.log.read_text()[-3000:]
    print(
        f"{sum(statuses.values())} requests, slowest answer {slowest_s * 1000:.1f} ms, "
        f"RSS growth {growth}"
    )
