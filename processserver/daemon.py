"""The process server daemon: config, cache, positions, ingest, the data API
and the metrics listener, wired together.

``ProcessServer.start`` recovers the cache as a crash left it (every file's
header checked, torn or corrupt ones quarantined and their disks marked
resync-required), takes each disk's position as the later of the position
database and the cache, then opens the ports.

``ProcessServer.reload`` (SIGHUP) applies the keys of :data:`RELOADABLE` and
rereads the TLS files; ``close`` (SIGTERM) stops taking connections, lets the
requests in flight finish (up to :data:`SHUTDOWN_GRACE_S`) and closes.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry

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
from runtime.logs import setup_logging
from runtime.metrics import MetricsServer, new_registry, start_metrics_server
from runtime.reload import (
    FileContent,
    Prepared,
    ReloadMetrics,
    ReloadPlan,
    reload_config,
    touches,
)
from runtime.serverlog import RequestLogs
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


@dataclass
class ProcessServer:
    """A running process server. Build with :meth:`start`, stop with :meth:`close`."""

    config: ProcessServerConfig
    metrics: ProcessServerMetrics
    cache: Cache
    positions: PositionStore
    executor: ThreadPoolExecutor
    sealers: Sealers
    reloads: ReloadMetrics
    #: the key file as loaded: a reload tells when its content changed
    key_file: FileContent
    disks: dict[str, DiskStream] = field(default_factory=dict)
    _server_tls: ReloadableServerContext | None = None
    _client: _ClientTls | None = None
    _in_flight: InFlight = field(init=False)
    _runner: web.AppRunner | None = None
    _metrics_server: MetricsServer | None = None
    _master_target: MasterTargetClient | None = None
    _shipper: Shipper | None = None
    _closing: bool = False

    def __post_init__(self) -> None:
        self._in_flight = InFlight(self.metrics.requests_in_flight)

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
            BlockreplError: a file or volume check failed; the message says which.
        """
        registry = registry or new_registry()
        metrics = ProcessServerMetrics(registry)
        config.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="ps-io")
        loop = asyncio.get_running_loop()
        keyring = await loop.run_in_executor(executor, load_keyring, config.key_file)
        key_file = await loop.run_in_executor(executor, FileContent.read, config.key_file)
        cache = Cache(config.cache_dir, high_bytes=config.cache_high_bytes,
                      low_bytes=config.cache_low_bytes)  # fmt: skip
        positions = PositionStore(config.cache_dir / POSITIONS_DB)
        sealers = Sealers(keyring, config.zstd_level)
        reloads = ReloadMetrics(registry, PREFIX)
        ps = cls(config, metrics, cache, positions, executor, sealers, reloads, key_file)
        committer = GroupCommitter(cache, positions, executor)
        parts = StreamParts(cache, positions, committer, sealers, executor, metrics)
        for machine in config.machines:
            for disk_id in machine.disks:
                ps.disks[disk_id] = await DiskStream.recover(disk_id, parts)
        metrics.cache_bytes.set_function(lambda: cache.bytes)
        metrics.cache_high_bytes.set(config.cache_high_bytes)
        metrics.cache_low_bytes.set(config.cache_low_bytes)
        try:
            ps._client = _ClientTls.load(config.master_target.tls)
            ps._master_target = MasterTargetClient(
                config.master_target, ps._client.context, metrics
            )
            ps._shipper = Shipper(ps.disks.values(), ps._master_target, metrics, executor,
                                  max_in_flight=config.max_in_flight)  # fmt: skip
            ps._shipper.start()
            ps._server_tls = ReloadableServerContext(config.tls)
            ps._show_certificates()
            await ps._open_ports(registry, data_port, metrics_port)
        except BaseException:
            await ps.close()
            raise
        log.info("process server ready: %d disks, data port %d", len(ps.disks), ps.port)
        return ps

    async def _open_ports(
        self, registry: CollectorRegistry, data_port: int | None, metrics_port: int | None
    ) -> None:
        request_logs = RequestLogs(registry, PREFIX)
        assert self._master_target is not None
        app = build_app(
            streams=self.disks, owners=self.config.owners(), connections=self.config.connections,
            metrics=self.metrics, cache=self.cache, master_target=self._master_target,
        )  # fmt: skip
        self._in_flight.install(app)
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=CANCEL_TIMEOUT_S,
            keepalive_timeout=self.config.connections.idle_timeout_s,
            logger=request_logs.for_listener("data"),
        )  # fmt: skip
        await self._runner.setup()
        assert self._server_tls is not None
        site = web.TCPSite(
            self._runner, self.config.host, self.config.port if data_port is None else data_port,
            ssl_context=self._server_tls.context,
        )  # fmt: skip
        await site.start()
        self._metrics_server = await start_metrics_server(
            registry, self.config.metrics, alive=lambda: not self._closing, ready=self.ready,
            port=metrics_port, server_log=request_logs.for_listener("metrics"),
        )  # fmt: skip

    @property
    def port(self) -> int:
        assert self._runner is not None
        return int(self._runner.addresses[0][1])

    def ready(self) -> tuple[bool, str]:
        if self._closing:
            return False, "shutting down"
        if self.cache.full:
            return False, f"cache over its high mark ({self.cache.bytes} bytes)"
        return True, "ready"

    @property
    def shipper(self) -> Shipper:
        assert self._shipper is not None
        return self._shipper

    async def reload(self, path: Path) -> bool:
        """Reread the config file and apply what can change while running (SIGHUP).

        Returns:
            False if the reload was refused (the reason is logged and the
            running configuration stays), True otherwise.
        """
        running = await reload_config(
            path=path, load=ps_config.load, running=self.config, reloadable=RELOADABLE,
            prepare=self._prepare_reload, metrics=self.reloads, log=log,
        )  # fmt: skip
        if running is None:
            return False
        self.config = running
        return True

    async def _prepare_reload(self, plan: ReloadPlan[ProcessServerConfig]) -> Prepared:
        """Everything of a reload that can fail; the commit it returns cannot."""
        new = plan.config
        assert self._server_tls is not None
        assert self._client is not None
        assert self._master_target is not None
        loop = asyncio.get_running_loop()
        # TLS files are read even when their names did not change: a renewed
        # certificate usually keeps its file name.
        server = await loop.run_in_executor(self.executor, self._server_tls.prepare, new.tls)
        client = await loop.run_in_executor(self.executor, _ClientTls.load, new.master_target.tls)
        restart = await loop.run_in_executor(
            self.executor, self.key_file.waits_for_restart, "key_file", new.key_file
        )
        master_target = self._master_target
        renewed = renewal_note("client", client.path, self._client.certificate, client.certificate)
        notes = [server.note, renewed]

        def commit() -> None:
            if touches(plan, "logging"):
                setup_logging(new.logging)
            server.commit()
            master_target.replace_tls(client.context)
            self._client = client
            self.cache.set_marks(high_bytes=new.cache_high_bytes, low_bytes=new.cache_low_bytes)
            self.metrics.cache_high_bytes.set(new.cache_high_bytes)
            self.metrics.cache_low_bytes.set(new.cache_low_bytes)
            self.sealers.set_level(new.zstd_level)
            self._show_certificates()

        return Prepared(commit, tuple(n for n in notes if n), restart)

    def _show_certificates(self) -> None:
        assert self._server_tls is not None
        assert self._client is not None
        expiry = self.reloads.certificate_expiry
        expiry.labels("server").set(self._server_tls.certificate.not_after_s)
        expiry.labels("client").set(self._client.certificate.not_after_s)

    async def close(self) -> None:
        """Stop taking requests (those in flight finish), then close everything."""
        self._closing = True
        started = time.monotonic()
        if self._runner is not None:
            await self._in_flight.drain(self._runner, SHUTDOWN_GRACE_S)
        if self._shipper is not None:
            await self._shipper.close()
        if self._master_target is not None:
            await self._master_target.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        self.executor.shutdown(wait=True)
        self.positions.close()
        log.info("process server stopped in %.1f s", time.monotonic() - started)
