"""The process server daemon: config, cache, positions, the disks' streams, the
shipper, the data API and the metrics listener, wired together.

``ProcessServer.start`` recovers the cache as a crash left it (every file's
header checked, torn or corrupt ones quarantined and their disks marked
resync-required), takes each disk's position as the later of the position
database and the cache, then opens the ports. Each part is registered for
its teardown as it is made (the executor, the position database, the group
committer, the client of the master target, the shipper, the data
listener, the metrics listener), so a start that fails at any step leaves
no thread, task or open file behind (tests/processserver/test_start_failures.py).

``ProcessServer.reload`` (SIGHUP) applies the keys of :data:`RELOADABLE` and
rereads the TLS files; ``close`` (SIGTERM) stops taking connections and lets
the requests in flight finish (up to :data:`SHUTDOWN_GRACE_S`) while the
metrics listener says why the daemon is not ready, then closes the rest,
the last made first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from processserver import config as ps_config
from processserver.cache import Cache
from processserver.committer import GroupCommitter
from processserver.config import ProcessServerConfig
from processserver.master_target_client import MasterTargetClient
from processserver.metrics import PREFIX, ProcessServerMetrics
from processserver.positions import PositionStore
from processserver.sealers import Sealers
from processserver.server import build_app
from processserver.shipper import Shipper
from processserver.stream import DiskStream, StreamParts
from runtime.config import TlsFiles
from runtime.inflight import CANCEL_TIMEOUT_S, InFlight
from runtime.keyfile import load_keyring
from runtime.metrics import new_registry, start_metrics_server
from runtime.reload import (
    FileContent,
    Prepared,
    ReloadMetrics,
    ReloadPlan,
    prepare_server_reload,
    reload_daemon,
)
from runtime.serverlog import RequestLogs, ServerLog
from runtime.tls import (
    CertificateInfo,
    ReloadableServerContext,
    certificate_info,
    client_context,
    renewal_note,
)

log = logging.getLogger("blockrepl.processserver")

#: Seconds the requests in flight may take to finish when the daemon stops:
#: a batch of the largest size still arriving over a slow link. The units'
#: TimeoutStopSec= is above it (systemd/processserver.service).
SHUTDOWN_GRACE_S: Final = 30.0
#: Threads for sealing, group commits and scans: both cores sealing while a
#: group is written.
WORKERS: Final = 4
POSITIONS_DB: Final = "positions.db"
#: Keys a reload (SIGHUP) applies while the daemon runs; any other change
#: waits for a restart. The TLS files are read again at every reload, so a
#: certificate renewed under the same name is taken too.
RELOADABLE: Final = (
    "logging", "tls", "master_target.tls", "cache_high_bytes", "cache_low_bytes", "zstd_level",
)  # fmt: skip


@dataclass(frozen=True)
class _ClientTls:
    """The process server's client identity toward the master target, loaded."""

    path: Path
    context: ssl.SSLContext
    certificate: CertificateInfo

    @classmethod
    def load(cls, files: TlsFiles) -> _ClientTls:
        """Raises TlsSetupError naming the file at fault."""
        return cls(files.cert_file, client_context(files), certificate_info(files.cert_file))


class _DataListener:
    """The data API on its port; :meth:`close` drains its requests in flight, once."""

    def __init__(
        self,
        app: web.Application,
        config: ProcessServerConfig,
        requests_in_flight: Gauge,
        server_log: ServerLog,
    ) -> None:
        self._in_flight = InFlight(requests_in_flight)
        self._in_flight.install(app)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=CANCEL_TIMEOUT_S,
            keepalive_timeout=config.connections.idle_timeout_s,
            logger=server_log,
        )
        self._closed = False

    async def open(self, host: str, port: int, tls: ssl.SSLContext) -> None:
        """Listen on ``host:port``; :meth:`close` closes it, whether this raised or not."""
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=tls).start()

    @property
    def port(self) -> int:
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening and let the requests in flight finish (runtime/inflight.py)."""
        if not self._closed:
            self._closed = True
            await self._in_flight.drain(self._runner, SHUTDOWN_GRACE_S)


@dataclass
class ProcessServer:
    """A running process server. Build with :meth:`start`, stop with :meth:`close`."""

    config: ProcessServerConfig
    metrics: ProcessServerMetrics
    reloads: ReloadMetrics
    cache: Cache
    executor: ThreadPoolExecutor
    sealers: Sealers
    #: the key file as loaded: a reload tells when its content changed
    key_file: FileContent
    disks: dict[str, DiskStream]
    shipper: Shipper
    _master_target: MasterTargetClient
    _client: _ClientTls
    _server_tls: ReloadableServerContext
    _data: _DataListener
    #: everything :meth:`close` closes after the data listener, the last made first
    _resources: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    _closing: bool = False

    @classmethod
    async def start(
        cls,
        config: ProcessServerConfig,
        *,
        registry: CollectorRegistry | None = None,
        data_port: int | None = None,
        metrics_port: int | None = None,
    ) -> ProcessServer:
        """Recover the cache, then open the ports.

        Raises:
            BlockreplError: a file, key or certificate check failed, or the
                metrics port cannot be bound; the message says which.
            OSError: the cache folders cannot be made, or the data port bound.
        """
        registry = registry or new_registry()
        logs = RequestLogs(registry, PREFIX)
        async with contextlib.AsyncExitStack() as stack:
            ps = await cls._open(stack, config, registry, logs.for_listener("data"), data_port)
            listener = await start_metrics_server(
                registry,
                config.metrics,
                alive=lambda: not ps._closing,
                ready=ps.ready,
                port=metrics_port,
                server_log=logs.for_listener("metrics"),
            )
            stack.push_async_callback(listener.close)
            ps._resources = stack.pop_all()
        log.info("process server ready: %d disks, data port %d", len(ps.disks), ps.port)
        return ps

    @classmethod
    async def _open(
        cls,
        stack: contextlib.AsyncExitStack,
        config: ProcessServerConfig,
        registry: CollectorRegistry,
        data_log: ServerLog,
        data_port: int | None,
    ) -> ProcessServer:
        """All but the metrics listener, each part pushed on ``stack`` as it is made."""
        metrics = ProcessServerMetrics(registry)
        reloads = ReloadMetrics(registry, PREFIX)
        config.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="ps-io")
        stack.callback(executor.shutdown, wait=True)
        loop = asyncio.get_running_loop()
        keyring = await loop.run_in_executor(executor, load_keyring, config.key_file)
        key_file = await loop.run_in_executor(executor, FileContent.read, config.key_file)
        cache = Cache(
            config.cache_dir, high_bytes=config.cache_high_bytes, low_bytes=config.cache_low_bytes
        )
        positions = PositionStore(config.cache_dir / POSITIONS_DB)
        stack.callback(positions.close)
        # Once more (it is idempotent): the executor's threads have ended, and
        # no commit of theirs still runs, when the database closes.
        stack.callback(executor.shutdown, wait=True)
        committer = GroupCommitter(cache, positions, executor)
        stack.push_async_callback(committer.close)
        sealers = Sealers(keyring, config.zstd_level)
        parts = StreamParts(cache, positions, committer, sealers, executor, metrics)
        disks = {disk: await DiskStream.recover(disk, parts) for disk in config.owners()}
        metrics.cache_bytes.set_function(lambda: cache.bytes)
        metrics.cache_high_bytes.set(config.cache_high_bytes)
        metrics.cache_low_bytes.set(config.cache_low_bytes)
        client = _ClientTls.load(config.master_target.tls)
        master_target = await stack.enter_async_context(
            MasterTargetClient(config.master_target, client.context, metrics)
        )
        shipping = Shipper(
            disks.values(),
            master_target,
            metrics,
            executor,
            max_in_flight=config.max_in_flight,
            in_flight_per_disk=config.in_flight_per_disk,
        )
        shipper = await stack.enter_async_context(shipping)
        server_tls = ReloadableServerContext(config.tls)
        app = build_app(
            streams=disks,
            owners=config.owners(),
            connections=config.connections,
            metrics=metrics,
            cache=cache,
            master_target=master_target,
        )
        data = _DataListener(app, config, metrics.requests_in_flight, data_log)
        stack.push_async_callback(data.close)
        await data.open(
            config.host, config.port if data_port is None else data_port, server_tls.context
        )
        ps = cls(
            config,
            metrics,
            reloads,
            cache,
            executor,
            sealers,
            key_file,
            disks,
            shipper,
            master_target,
            client,
            server_tls,
            data,
        )
        ps._show_certificates()
        return ps

    @property
    def port(self) -> int:
        """The data port bound: the configured one, or the one the kernel chose for port 0."""
        return self._data.port

    def ready(self) -> tuple[bool, str]:
        if self._closing:
            return False, "shutting down"
        if self.cache.full:
            return False, f"cache over its high mark ({self.cache.bytes} bytes)"
        return True, "ready"

    async def reload(self, path: Path) -> bool:
        """Reread the config file and apply what can change while running (SIGHUP).

        Returns:
            False if the reload was refused (the reason is logged), True otherwise.
        """
        return await reload_daemon(self, path, load=ps_config.load, reloadable=RELOADABLE, log=log)

    async def prepare_reload(self, plan: ReloadPlan[ProcessServerConfig]) -> Prepared:
        """Everything of a reload that can fail; the commit it returns cannot."""
        new = plan.config
        common = await prepare_server_reload(
            plan, server_tls=self._server_tls, key_file=self.key_file, executor=self.executor
        )
        # The client certificate toward the master target, read again too.
        loop = asyncio.get_running_loop()
        client = await loop.run_in_executor(self.executor, _ClientTls.load, new.master_target.tls)
        renewed = renewal_note("client", client.path, self._client.certificate, client.certificate)

        def commit() -> None:
            common.commit(self.reloads)
            self._master_target.replace_tls(client.context)
            self._client = client
            self.cache.set_marks(high_bytes=new.cache_high_bytes, low_bytes=new.cache_low_bytes)
            self.metrics.cache_high_bytes.set(new.cache_high_bytes)
            self.metrics.cache_low_bytes.set(new.cache_low_bytes)
            self.sealers.set_level(new.zstd_level)
            self._show_certificates()

        return Prepared(commit, (*common.notes, *([renewed] if renewed else [])), common.restart)

    def _show_certificates(self) -> None:
        expiry = self.reloads.certificate_expiry
        expiry.labels("server").set(self._server_tls.certificate.not_after_s)
        expiry.labels("client").set(self._client.certificate.not_after_s)

    async def close(self) -> None:
        """Stop taking requests (those in flight finish), then close everything."""
        self._closing = True
        started = time.monotonic()
        await self._data.close()
        await self._resources.aclose()
        log.info("process server stopped in %.1f s", time.monotonic() - started)
