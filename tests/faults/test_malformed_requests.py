"""A flood of malformed requests: counted, answered 400, and a few log lines.

Requests whose line, headers or body framing do not parse — a doubled or
negative Content-Length, a header over the size limit, chunked garbage, a
broken request line, bytes that are not HTTP — go as fast as one client
sends them to the process server's and the master target's data ports (with
a valid client certificate: the worst case) and to both metrics listeners
(unauthenticated). aiohttp answers them itself; before, each one it refused
was an ERROR with a full traceback in the daemon's log.

Every request must be answered 400, counted in
``<daemon>_malformed_requests_total``, and the daemon's log must hold at most
the throttle's lines (a burst, then one a second) and no traceback.
"""

from __future__ import annotations

import re
import socket
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path

from protocol.limits import MiB
from runtime.serverlog import MALFORMED_BURST, MALFORMED_EVERY_S
from tests.conftest import Deployment
from tests.e2e.conftest import DISK, build_site, start
from tests.faults.rawhttp import ANSWER_TIMEOUT_S, RawConnection, tls_connector

#: Requests of each kind to each listener.
ROUNDS = 60


def _cases(method: str, path: str) -> list[bytes]:
    """Requests that do not parse as HTTP, each one a different way."""
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
    return [
        f"{head}Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcde".encode(),
        f"{head}Content-Length: -1\r\n\r\n".encode(),
        f"{head}X-Long: {'a' * 20000}\r\n\r\n".encode(),
        f"{head}Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".encode(),
        f"{head}Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX\r\n0\r\n\r\n".encode(),
        f"{head}Bad Header Name: x\r\n\r\n".encode(),
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"\x00\x01\x02\x03 / HTTP/1.1\r\n\r\n",
        f"{method} /{'a' * 20000} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(),
    ]


def _plain(port: int) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT_S)

    return connect


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def _counted(text: str, prefix: str, listener: str) -> float:
    series = rf'{prefix}_malformed_requests_total{{listener="{listener}",reason="[a-z-]+"}}'
    pattern = rf"^{series} (\S+)$"
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE))


def test_malformed_requests_are_counted_answered_400_and_logged_a_few_times(
    deployment: Deployment, tmp_path: Path
) -> None:
    site = build_site(deployment, tmp_path, size=8 * MiB)
    start(site)
    ps, mt = site.process_servers[0], site.mt
    metrics = {
        name: int(tomllib.loads(d.config.read_text())["metrics"]["port"])
        for name, d in (("ps", ps), ("mt", mt))
    }
    listeners = [
        ("blockrepl_processserver", "data", tls_connector(site.ps_ports[0],
         deployment.client_tls("vm01")), "POST", f"/v1/disks/{DISK}/batches", ps.log),
        ("blockrepl_mastertarget", "data", tls_connector(site.mt_port,
         deployment.client_tls("ps01")), "PUT", f"/v1/disks/{DISK}/hrl/1/1", mt.log),
        ("blockrepl_processserver", "metrics", _plain(metrics["ps"]), "GET", "/metrics", ps.log),
        ("blockrepl_mastertarget", "metrics", _plain(metrics["mt"]), "GET", "/metrics", mt.log),
    ]  # fmt: skip
    began = time.monotonic()
    sent: dict[tuple[str, str], int] = {}
    for prefix, listener, connect, method, path, _ in listeners:
        connection = RawConnection(connect)
        for _ in range(ROUNDS):
            for raw in _cases(method, path):
                answer = connection.request(raw)
                assert answer.status == 400, (prefix, listener, raw[:80], answer)
                connection.close()  # aiohttp closes after a request it cannot parse
                sent[prefix, listener] = sent.get((prefix, listener), 0) + 1
    elapsed_s = time.monotonic() - began

    for prefix, listener, *_ in listeners:
        text = _scrape(metrics["ps" if "processserver" in prefix else "mt"])
        assert _counted(text, prefix, listener) == sent[prefix, listener], (prefix, listener)
    # One throttle per daemon, shared by its listeners: a burst, then one a second.
    allowed = MALFORMED_BURST + elapsed_s / MALFORMED_EVERY_S + 1
    written = []
    for daemon in (ps, mt):
        log = daemon.log.read_text()
        lines = [line for line in log.splitlines() if "malformed request from 127.0.0.1" in line]
        assert 1 <= len(lines) <= allowed, (len(lines), allowed, elapsed_s)
        written.append(len(lines))
        assert "Traceback" not in log, log[-3000:]
        assert " ERROR " not in log, log[-3000:]
        # What was held back is said, not lost from sight.
        assert any("more like it held back" in line for line in lines), lines
    print(f"{sum(sent.values())} malformed requests in {elapsed_s:.1f} s, log lines {written}")
