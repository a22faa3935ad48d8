"""The metrics and health listener, served for real on loopback and scraped over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from runtime.config import MetricsListen
from runtime.errors import ConfigError
from runtime.metrics import (
    MAX_HEADER_FIELD_BYTES,
    MAX_REQUEST_LINE_BYTES,
    MetricsServer,
    new_registry,
    start_metrics_server,
)
from tests.conftest import require_binary
from tests.faults.daemons import free_port

#: The configured address of the tests; every server binds port 0 instead.
LISTEN = MetricsListen(port=9102, host="127.0.0.1")
#: Longest a request to a healthy local listener may take before a test fails.
REQUEST_TIMEOUT_S = 5.0


@dataclasses.dataclass
class Probes:
    """Health the test sets and the server reports."""

    alive: bool = True
    ready: bool = True
    reason: str = ""

    def is_alive(self) -> bool:
        return self.alive

    def is_ready(self) -> tuple[bool, str]:
        return self.ready, self.reason


@pytest.fixture
def probes() -> Probes:
    return Probes()


@pytest.fixture
def registry() -> CollectorRegistry:
    """A daemon registry with one metric of each kind a daemon uses."""
    registry = new_registry()
    batches = Counter(
        "blockrepl_batches_received",
        "Batches received and made durable, per disk.",
        ["disk"],
        registry=registry,
    )
    batches.labels("vm01-disk0").inc(3)
    Gauge("blockrepl_cache_used_bytes", "Bytes used in the cache volume.", registry=registry).set(
        4096
    )
    latency = Histogram(
        "blockrepl_ack_latency_seconds",
        "Time from a batch's arrival to its durable ack.",
        registry=registry,
    )
    latency.observe(0.002)
    return registry


@pytest.fixture
async def server(registry: CollectorRegistry, probes: Probes) -> AsyncIterator[MetricsServer]:
    server = await start_metrics_server(
        registry, LISTEN, alive=probes.is_alive, ready=probes.is_ready, port=0
    )
    yield server
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


async def fetch(
    session: aiohttp.ClientSession, url: str, method: str = "GET", **kwargs: object
) -> tuple[int, str, str]:
    """``(status, content type header, body)`` of one request."""
    async with session.request(method, url, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, response.headers.get("Content-Type", ""), await response.text()


# --- /metrics ------------------------------------------------------------------------


async def test_metrics_have_help_type_and_samples(
    server: MetricsServer, session: aiohttp.ClientSession
) -> None:
    status, content_type, text = await fetch(session, f"{server.url}/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE_LATEST)
    lines = text.splitlines()
    assert (
        "# HELP blockrepl_batches_received_total Batches received and made durable, per disk."
        in lines
    )
    assert "# TYPE blockrepl_batches_received_total counter" in lines
    assert 'blockrepl_batches_received_total{disk="vm01-disk0"} 3.0' in lines
    assert "# TYPE blockrepl_ack_latency_seconds histogram" in lines
    assert "blockrepl_ack_latency_seconds_count 1.0" in lines
    # The daemon registry carries the process's own figures.
    families = {family.name: family for family in text_string_to_metric_families(text)}
    rss = families["process_resident_memory_bytes"].samples[0].value
    assert rss > 1024 * 1024
    assert "python_info" in families
    assert "blockrepl_cache_used_bytes" in families


async def test_metrics_pass_promtool(server: MetricsServer, session: aiohttp.ClientSession) -> None:
    promtool = require_binary("promtool")
    _, _, text = await fetch(session, f"{server.url}/metrics")
    code, output = await _promtool_check(promtool, text)
    assert code == 0, output


async def test_promtool_does_reject_a_bad_exposition() -> None:
    # The check above means something only if promtool fails bad input.
    promtool = require_binary("promtool")
    bad = (
        "# HELP blockrepl_batches Batches.\n# TYPE blockrepl_batches counter\nblockrepl_batches 1\n"
    )
    code, output = await _promtool_check(promtool, bad)
    assert code != 0
    assert "blockrepl_batches" in output
    assert "_total" in output


async def _promtool_check(promtool: str, text: str) -> tuple[int, str]:
    """Exit status and output of ``promtool check metrics`` fed ``text``."""
    process = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(text.encode()), REQUEST_TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, output.decode()


class WaitingCollector(Collector):
    """A collector that blocks its scrape until the test lets it go."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("blockrepl_test_slow", "A collector that waits.")

    def collect(self) -> Iterator[Metric]:
        self.entered.set()
        self.release.wait(REQUEST_TIMEOUT_S)
        yield GaugeMetricFamily("blockrepl_test_slow", "A collector that waits.", value=1)


async def test_a_slow_scrape_does_not_block_the_event_loop(
    server: MetricsServer, registry: CollectorRegistry, session: aiohttp.ClientSession
) -> None:
    collector = WaitingCollector()
    registry.register(collector)
    try:
        scrape = asyncio.create_task(fetch(session, f"{server.url}/metrics"))
        assert await asyncio.to_thread(collector.entered.wait, REQUEST_TIMEOUT_S)
        # The render is stuck on the scrape thread; the loop still answers.
        assert await fetch(session, f"{server.url}/healthz") == (
            200,
            "text/plain; charset=utf-8",
            "ok\n",
        )
        assert not scrape.done()
    finally:
        collector.release.set()
    status, _, text = await scrape
    assert status == 200
    assert "blockrepl_test_slow 1.0" in text.splitlines()


# --- /healthz and /readyz -------------------------------------------------------------


async def test_health_follows_the_daemon(
    server: MetricsServer, probes: Probes, session: aiohttp.ClientSession
) -> None:
    url = f"{server.url}/healthz"
    assert (await fetch(session, url))[::2] == (200, "ok\n")
    probes.alive = False
    assert (await fetch(session, url))[::2] == (503, "not alive\n")
    probes.alive = True
    assert (await fetch(session, url))[::2] == (200, "ok\n")


async def test_readiness_follows_the_daemon_with_its_reason(
    server: MetricsServer, probes: Probes, session: aiohttp.ClientSession
) -> None:
    url = f"{server.url}/readyz"
    assert (await fetch(session, url))[::2] == (200, "ready\n")
    probes.ready, probes.reason = False, "cache over quota"
    assert (await fetch(session, url))[::2] == (503, "cache over quota\n")
    probes.reason = ""
    assert (await fetch(session, url))[::2] == (503, "not ready\n")
    probes.ready = True
    assert (await fetch(session, url))[::2] == (200, "ready\n")


async def test_a_failing_check_reads_as_unhealthy(
    registry: CollectorRegistry, session: aiohttp.ClientSession
) -> None:
    def broken() -> bool:
        raise RuntimeError("state lost")

    def broken_ready() -> tuple[bool, str]:
        raise KeyError("cache")

    async with await start_metrics_server(
        registry, LISTEN, alive=broken, ready=broken_ready, port=0
    ) as server:
        assert (await fetch(session, f"{server.url}/healthz"))[::2] == (
            503,
            "alive check failed: RuntimeError: state lost\n",
        )
        assert (await fetch(session, f"{server.url}/readyz"))[::2] == (
            503,
            "ready check failed: KeyError: 'cache'\n",
        )


# --- what the listener refuses -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/x", "/healthz/", "/debug/vars"])
async def test_other_paths_are_not_found(
    server: MetricsServer, session: aiohttp.ClientSession, path: str
) -> None:
    assert (await fetch(session, f"{server.url}{path}"))[0] == 404


async def test_other_methods_are_not_allowed(
    server: MetricsServer, session: aiohttp.ClientSession
) -> None:
    assert (await fetch(session, f"{server.url}/metrics", "POST"))[0] == 405
    assert (await fetch(session, f"{server.url}/readyz", "DELETE"))[0] == 405


async def test_request_bodies_are_refused(
    server: MetricsServer, session: aiohttp.ClientSession
) -> None:
    status, _, text = await fetch(session, f"{server.url}/healthz", data=b"x" * 100)
    assert (status, text) == (413, "this listener accepts no request bodies\n")
    chunks = _chunks([b"a", b"b"])
    assert (await fetch(session, f"{server.url}/metrics", data=chunks))[0] == 413


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    """A body sent with chunked transfer encoding."""
    for part in parts:
        yield part


async def test_oversized_request_lines_and_headers_are_refused(
    server: MetricsServer, session: aiohttp.ClientSession
) -> None:
    long_path = "/healthz?" + "q" * MAX_REQUEST_LINE_BYTES
    assert (await fetch(session, f"{server.url}{long_path}"))[0] == 400
    big = {"X-Padding": "p" * (MAX_HEADER_FIELD_BYTES + 1)}
    assert (await fetch(session, f"{server.url}/healthz", headers=big))[0] == 400
    assert (await fetch(session, f"{server.url}/healthz"))[0] == 200  # and still serves


# --- several servers, ports, closing --------------------------------------------------


async def test_two_daemons_in_one_process_keep_their_metrics_apart(
    session: aiohttp.ClientSession,
) -> None:
    registries = [new_registry(), new_registry()]
    for name, registry in zip(("processserver", "mastertarget"), registries, strict=True):
        Counter(f"blockrepl_{name}_starts", f"Starts of the {name}.", registry=registry).inc()
    ready = Probes().is_ready
    async with (
        await start_metrics_server(
            registries[0], LISTEN, alive=lambda: True, ready=ready, port=0
        ) as first,
        await start_metrics_server(
            registries[1], LISTEN, alive=lambda: False, ready=ready, port=0
        ) as second,
    ):
        assert first.port != second.port
        _, _, first_text = await fetch(session, f"{first.url}/metrics")
        _, _, second_text = await fetch(session, f"{second.url}/metrics")
        assert "blockrepl_processserver_starts_total 1.0" in first_text
        assert "blockrepl_mastertarget_starts" not in first_text
        assert "blockrepl_mastertarget_starts_total 1.0" in second_text
        assert "blockrepl_processserver_starts" not in second_text
        assert (await fetch(session, f"{first.url}/healthz"))[0] == 200
        assert (await fetch(session, f"{second.url}/healthz"))[0] == 503


async def test_the_configured_port_is_used_and_freed_on_close(
    registry: CollectorRegistry, probes: Probes, session: aiohttp.ClientSession
) -> None:
    listen = MetricsListen(port=free_port())
    server = await start_metrics_server(
        registry, listen, alive=probes.is_alive, ready=probes.is_ready
    )
    assert (server.port, server.url) == (listen.port, f"http://127.0.0.1:{listen.port}")
    assert (await fetch(session, f"{server.url}/healthz"))[0] == 200
    await server.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch(session, f"{server.url}/healthz")
    # Closed means the port is free again for the next start.
    again = await start_metrics_server(
        registry, listen, alive=probes.is_alive, ready=probes.is_ready
    )
    await again.close()


async def test_a_port_in_use_is_a_config_error(registry: CollectorRegistry, probes: Probes) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            await start_metrics_server(
                registry,
                MetricsListen(port=port),
                alive=probes.is_alive,
                ready=probes.is_ready,
            )
    assert f"cannot listen for metrics on 127.0.0.1:{port}: " in caught.value.message
    assert caught.value.exit_code == 78


async def test_ipv6_loopback_url_has_brackets(
    registry: CollectorRegistry, probes: Probes, session: aiohttp.ClientSession
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this build")
    listen = MetricsListen(port=9102, host="::1")
    try:
        server = await start_metrics_server(
            registry, listen, alive=probes.is_alive, ready=probes.is_ready, port=0
        )
    except ConfigError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    async with server:
        assert server.url == f"http://[::1]:{server.port}"
        assert (await fetch(session, f"{server.url}/readyz"))[::2] == (200, "ready\n")
