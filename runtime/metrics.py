"""The Prometheus metrics and health listener every daemon runs beside its data port.

A plain-HTTP aiohttp server (docs/design.md "Metrics and health"; 127.0.0.1:9101
for the process server, 9102 for the master target, 9103 for the agent):

* ``GET /metrics``: the daemon's own :class:`~prometheus_client.CollectorRegistry`
  in the Prometheus text format. Never the global registry, so that tests can
  run several daemons in one process. The text is produced on a dedicated
  thread: a registry of many disks with histograms takes tens of milliseconds
  to render, which the event loop moving data must not wait for, and a thread
  of its own keeps scrapes from queueing behind compression and encryption
  work in the default executor. Collectors must therefore be thread-safe
  (the metric types of prometheus_client are).
* ``GET /healthz``: 200 ``ok`` while the daemon is alive, 503 otherwise; a
  service manager restarts on it.
* ``GET /readyz``: 200 ``ready`` when the daemon accepts data, 503 with the
  reason (``cache over quota``) otherwise; a load balancer or operator reads it.

Anything else is 404 (405 for another method on these paths). No request
may carry a body, and request lines and headers are capped: the listener
is unauthenticated, so it accepts nothing it does not need.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Final

from aiohttp import web
from aiohttp.log import server_logger
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.registry import CollectorRegistry

from runtime.config import MetricsListen
from runtime.errors import ConfigError
from runtime.serverlog import ServerLog

AliveCheck = Callable[[], bool]
ReadyCheck = Callable[[], tuple[bool, str]]
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

METRICS_PATH: Final = "/metrics"
HEALTHZ_PATH: Final = "/healthz"
READYZ_PATH: Final = "/readyz"
#: Longest request line: ``GET /metrics HTTP/1.1`` plus any ``params`` a
#: Prometheus scrape config adds as a query string; 2 KiB is ample.
MAX_REQUEST_LINE_BYTES: Final = 2048
#: Longest header line: a scrape sends Accept, User-Agent and
#: X-Prometheus-Scrape-Timeout-Seconds, each well under 200 bytes.
MAX_HEADER_FIELD_BYTES: Final = 4096
#: Most headers in one request: a scrape sends about six.
MAX_HEADERS: Final = 32
#: How long :meth:`MetricsServer.close` lets a scrape in flight finish: far
#: longer than a render takes, far shorter than a service manager's stop timeout.
SHUTDOWN_TIMEOUT_S: Final = 5.0
#: Threads rendering scrapes: one, so that scrapes queue instead of piling up
#: threads, and the rendering never competes with itself for the GIL.
SCRAPE_THREADS: Final = 1

_REGISTRY: Final = web.AppKey("registry", CollectorRegistry)
_SCRAPER: Final = web.AppKey("scraper", ThreadPoolExecutor)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Probes:
    """The daemon's answers to ``/healthz`` and ``/readyz``."""

    alive: AliveCheck
    ready: ReadyCheck


_PROBES: Final = web.AppKey("probes", _Probes)


def new_registry() -> CollectorRegistry:
    """A registry of a daemon's own, with the process, platform and GC collectors.

    ``process_resident_memory_bytes``, ``process_cpu_seconds_total``, open file
    descriptors, ``python_info`` and ``python_gc_*`` then show per daemon. The
    registry checks each new collector's names against those already registered
    (``auto_describe``), so a duplicate metric fails at start-up, not at scrape.
    """
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsServer:
    """A running metrics listener: see :func:`start_metrics_server`; stop it with :meth:`close`."""

    def __init__(
        self, runner: web.AppRunner, scraper: ThreadPoolExecutor, host: str, port: int
    ) -> None:
        self._runner = runner
        self._scraper = scraper
        self._host = host
        self._port = port

    @property
    def host(self) -> str:
        """The address bound."""
        return self._host

    @property
    def port(self) -> int:
        """The port bound: the configured one, or the one the kernel chose for port 0."""
        return self._port

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, with an IPv6 address in brackets."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def close(self) -> None:
        """Stop listening; a scrape in flight has :data:`SHUTDOWN_TIMEOUT_S` to finish."""
        await self._runner.cleanup()
        # A collector still running on the scrape thread finishes there; its
        # result has no reader any more, so nothing waits for it.
        self._scraper.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


async def start_metrics_server(
    registry: CollectorRegistry,
    listen: MetricsListen,
    *,
    alive: AliveCheck,
    ready: ReadyCheck,
    port: int | None = None,
    server_log: ServerLog | None = None,
) -> MetricsServer:
    """Start serving ``/metrics``, ``/healthz`` and ``/readyz``.

    Args:
        registry: the daemon's own registry (see :func:`new_registry`).
        listen: the configured address.
        alive: whether the daemon is alive; called on the event loop for
            each ``/healthz``, so it must be quick and must not block.
        ready: whether the daemon accepts data, and if not, why (one line
            for an operator); called like ``alive``.
        port: a port to bind instead of ``listen.port``; 0 lets the kernel
            choose one (tests, several daemons in one process), which
            :attr:`MetricsServer.port` then tells.
        server_log: what aiohttp logs about requests that do not parse
            (:class:`~runtime.serverlog.ServerLog`); its default logger otherwise.

    Raises:
        ConfigError: the address cannot be bound (in use, not local, no permission).
    """
    bind_port = listen.port if port is None else port
    scraper = ThreadPoolExecutor(max_workers=SCRAPE_THREADS, thread_name_prefix="metrics-scrape")
    app = web.Application(middlewares=[_refuse_bodies])
    app[_REGISTRY] = registry
    app[_PROBES] = _Probes(alive, ready)
    app[_SCRAPER] = scraper
    app.router.add_get(METRICS_PATH, _metrics)
    app.router.add_get(HEALTHZ_PATH, _healthz)
    app.router.add_get(READYZ_PATH, _readyz)
    runner = web.AppRunner(
        app,
        access_log=None,  # a scrape every few seconds would drown the daemon's own log
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        max_line_size=MAX_REQUEST_LINE_BYTES,
        max_field_size=MAX_HEADER_FIELD_BYTES,
        max_headers=MAX_HEADERS,
        logger=server_log if server_log is not None else server_logger,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, listen.host, bind_port).start()
    except OSError as exc:
        await runner.cleanup()
        scraper.shutdown(wait=False)
        raise ConfigError(
            f"cannot listen for metrics on {listen.host}:{bind_port}: {exc.strerror or exc}"
            " (expected a free local port; is another daemon using it?)"
        ) from exc
    # With port 0 each socket has its own port; a literal address gives one socket.
    bound_port = int(runner.addresses[0][1])
    return MetricsServer(runner, scraper, listen.host, bound_port)


# --- handlers -----------------------------------------------------------------------


@web.middleware
async def _refuse_bodies(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Answer 413 to any request with a body, without reading a byte of it."""
    if request.body_exists:
        return web.Response(
            status=413,
            text="this listener accepts no request bodies\n",
            headers={"Connection": "close"},  # the unread body must not be parsed as a request
        )
    return await handler(request)


async def _metrics(request: web.Request) -> web.Response:
    """The registry in the Prometheus text format, rendered on the scrape thread."""
    loop = asyncio.get_running_loop()
    body = await loop.run_in_executor(
        request.app[_SCRAPER], generate_latest, request.app[_REGISTRY]
    )
    return web.Response(
        body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"}
    )


async def _healthz(request: web.Request) -> web.Response:
    """200 ``ok`` while alive, 503 otherwise."""
    try:
        alive = request.app[_PROBES].alive()
    except Exception as exc:
        # The check is the daemon's code: if it fails, the daemon is not
        # known to be alive, which is what 503 tells a service manager.
        logger.exception("the alive check raised")
        return _text(503, f"alive check failed: {type(exc).__name__}: {exc}")
    return _text(200, "ok") if alive else _text(503, "not alive")


async def _readyz(request: web.Request) -> web.Response:
    """200 ``ready``, or 503 with the reason the daemon gave."""
    try:
        ready, reason = request.app[_PROBES].ready()
    except Exception as exc:
        logger.exception("the ready check raised")
        return _text(503, f"ready check failed: {type(exc).__name__}: {exc}")
    return _text(200, "ready") if ready else _text(503, reason or "not ready")


def _text(status: int, text: str) -> web.Response:
    """A one-line plain-text answer that no cache keeps."""
    return web.Response(status=status, text=text + "\n", headers={"Cache-Control": "no-store"})
