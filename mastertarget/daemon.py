"""The master target daemon: wires config, retention volume, state, inbox,
target disks, appliers, the data API and the metrics listener together.

``MasterTarget.start`` brings everything up in the order that keeps the
invariants: the retention volume is checked and locked first (so a second
master target cannot share it), the state and inbox are recovered as a crash
left them, and the data port opens last, when every disk can take files.
Each resource is registered with the daemon's ``AsyncExitStack`` as soon as
it is made, so a start that fails at any step releases everything the steps
before it made; no constructor starts a task.

``close`` stops in the order that loses nothing: the data port closes
(requests in flight finish), the admin socket closes, the appliers finish
the group in hand; then the stack releases the rest, the other way round
from how it was made (metrics listener, targets, threads, catalog, lock).
``reload`` (SIGHUP) applies the keys of :data:`RELOADABLE` and rereads the
TLS files.

Threads: the daemon's own state (the running config, the replicas, whether
it is closing) is owned by the event loop; the blocking steps of a start and
a reload (the volume checks, the key file, the catalog, the TLS files, the
folders) run on its executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry

from mastertarget import config as mt_config
from mastertarget.admin import SOCKET_MODE, build_admin_app
from mastertarget.config import MasterTargetConfig
from mastertarget.housekeeping import Housekeeper
from mastertarget.inbox import Inbox
from mastertarget.journal import UndoJournal
from mastertarget.metrics import PREFIX, MasterTargetMetrics
from mastertarget.replica import DiskReplica
from mastertarget.retention_volume import (
    RetentionVolume,
    check_retention_volume,
    installed_package_dir,
)
from mastertarget.rpo import RpoMonitor
from mastertarget.server import build_app
from mastertarget.state import StateStore
from protocol.keyring import KeyRing
from runtime.inflight import CANCEL_TIMEOUT_S, InFlight
from runtime.keyfile import load_keyring
from runtime.metrics import MetricsServer, new_registry, start_metrics_server
from runtime.reload import (
    FileContent,
    Prepared,
    ReloadMetrics,
    ReloadPlan,
    prepare_server_reload,
    reload_daemon,
)
from runtime.serverlog import RequestLogs
from runtime.tls import ReloadableServerContext

log = logging.getLogger("blockrepl.mastertarget")

T = TypeVar("T")

#: Seconds the requests in flight may take to finish when the daemon stops:
#: one largest file at a slow link's pace. The unit's TimeoutStopSec= is
#: above it and the appliers' last group (systemd/mastertarget.service).
SHUTDOWN_GRACE_S: Final = 30.0
#: Threads for verification, applying and hashing: every disk can apply while
#: another thread stores a received file. AES, zstd and pwrite release the GIL.
MIN_WORKERS: Final = 4
#: The name of the state database on the retention volume.
STATE_DB: Final = "state.db"
#: The retention journal's folder on the retention volume.
JOURNAL_DIR: Final = "journal"
#: Keys a reload (SIGHUP) applies while the daemon runs; any other change
#: waits for a restart. The TLS files are read again at every reload, so a
#: certificate renewed under the same name is taken too.
RELOADABLE: Final = (
    "logging", "tls", "process_servers", "inbox_quota_bytes", "rpo_threshold_s",
    "retention.window_s", "retention.high_water_percent", "groups",
)  # fmt: skip


@dataclass
class MasterTarget:
    """A running master target. Build with :meth:`start`, stop with :meth:`close`."""

    config: MasterTargetConfig
    keyring: KeyRing
    metrics: MasterTargetMetrics
    executor: ThreadPoolExecutor
    retention: RetentionVolume
    store: StateStore
    reloads: ReloadMetrics
    #: the key file as loaded: a reload tells when its content changed
    key_file: FileContent
    server_tls: ReloadableServerContext
    #: what releases everything made so far, the other way round
    stack: contextlib.AsyncExitStack
    replicas: dict[str, DiskReplica] = field(default_factory=dict)
    housekeeper: Housekeeper = field(init=False)
    _in_flight: InFlight = field(init=False)
    _runner: web.AppRunner | None = None
    #: closes the admin socket and removes its file
    _close_admin: Callable[[], Awaitable[None]] | None = None
    _metrics_server: MetricsServer | None = None
    _closing: bool = False
    _closed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._in_flight = InFlight(self.metrics.requests_in_flight)
        rpo = RpoMonitor(
            self.config.rpo_threshold_s, log=logging.getLogger("blockrepl.mastertarget.rpo")
        )
        self.housekeeper = Housekeeper(
            replicas=self.replicas,
            config=lambda: self.config,
            metrics=self.metrics,
            executor=self.executor,
            store=self.store,
            retention_path=self.retention.path,
            rpo=rpo,
        )
        self.metrics.rpo_threshold.set(self.config.rpo_threshold_s)
        self.metrics.window_target.set(self.config.retention.window_s)

    @classmethod
    async def start(
        cls,
        config: MasterTargetConfig,
        *,
        registry: CollectorRegistry | None = None,
        mountinfo: str = "/proc/self/mountinfo",
        data_port: int | None = None,
        metrics_port: int | None = None,
    ) -> MasterTarget:
        """Check, recover and open everything, then open the ports.

        Args:
            config: the loaded configuration.
            registry: the metrics registry (a new one by default; tests pass
                their own to run several daemons in one process).
            mountinfo: the mount table the retention checks read.
            data_port, metrics_port: ports to bind instead of the configured
                ones (0: any free port; tests read :attr:`port`).

        Raises:
            BlockreplError: a check failed (retention volume, key file, TLS
                files, a target disk); the message says which and why.
            OSError: a port or the admin socket cannot be opened.
        """
        registry = registry or new_registry()
        stack = contextlib.AsyncExitStack()
        try:
            mt = await cls._open(stack, config, registry, mountinfo)
            await mt._open_disks()
            await mt.housekeeper.round()
            mt.housekeeper.start()
            stack.push_async_callback(mt.housekeeper.stop)
            await mt._open_ports(registry, data_port, metrics_port)
        except BaseException:
            await stack.aclose()
            raise
        log.info(
            "master target ready: %d disks, data port %s, metrics port %s",
            len(mt.replicas),
            mt.port,
            mt.metrics_port,
        )
        return mt

    @classmethod
    async def _open(
        cls,
        stack: contextlib.AsyncExitStack,
        config: MasterTargetConfig,
        registry: CollectorRegistry,
        mountinfo: str,
    ) -> MasterTarget:
        """The threads, the retention volume and its lock, the keys, the catalog, the TLS files."""
        metrics = MasterTargetMetrics(registry)
        metrics.inbox_quota_bytes.set(config.inbox_quota_bytes)
        executor = ThreadPoolExecutor(
            max_workers=max(MIN_WORKERS, len(config.disks) + 2), thread_name_prefix="mt-io"
        )
        stack.callback(executor.shutdown, wait=True)

        def run(job: Callable[[], T]) -> asyncio.Future[T]:
            return asyncio.get_running_loop().run_in_executor(executor, job)

        await run(lambda: config.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700))
        retention = await run(
            lambda: check_retention_volume(
                config.retention.dir,
                cache_dir=config.cache_dir,
                install_dir=installed_package_dir(),
                targets=[d.target for d in config.disks],
                mountinfo=mountinfo,
                allow_shared_volume=config.retention.allow_shared_volume,
            )
        )
        stack.callback(retention.lock.release)
        if config.retention.allow_shared_volume:
            log.warning(
                "retention directory %s may share a volume with the cache, the installation "
                "or a target (retention.allow_shared_volume = true): for demos and tests only",
                retention.path,
            )
        keyring = await run(lambda: load_keyring(config.key_file))
        key_file = await run(lambda: FileContent.read(config.key_file))
        store = await run(lambda: StateStore(retention.path / STATE_DB))
        stack.callback(store.close)
        # Registered again, so it runs before the catalog closes: a job still
        # running (a cancelled request's) may use the catalog.
        stack.callback(executor.shutdown, wait=True)
        server_tls = await run(lambda: ReloadableServerContext(config.tls))
        reloads = ReloadMetrics(registry, PREFIX)
        reloads.certificate_expiry.labels("server").set(server_tls.certificate.not_after_s)
        return cls(
            config,
            keyring,
            metrics,
            executor,
            retention,
            store,
            reloads,
            key_file,
            server_tls,
            stack,
        )

    async def _open_disks(self) -> None:
        inbox = Inbox(self.config.cache_dir)
        journal = UndoJournal(self.retention.path / JOURNAL_DIR, self.keyring)
        for disk in self.config.disks:
            replica = await DiskReplica.open(
                disk,
                store=self.store,
                inbox=inbox,
                keyring=self.keyring,
                metrics=self.metrics,
                executor=self.executor,
                journal=journal,
                on_points=self.housekeeper.points_observer(disk.id),
            )
            self.stack.push_async_callback(replica.close)
            self.replicas[disk.id] = replica
            await self.housekeeper.watch(disk.id)
            replica.start()
            status = replica.status()
            log.info(
                "disk %s: target %s (%d bytes), applied generation %d seq %d, "
                "%d files waiting, state %s",
                disk.id,
                disk.target,
                status.target_size,
                status.applied.generation,
                status.applied.seq,
                status.inbox_files,
                status.state.value,
            )

    async def _open_ports(
        self, registry: CollectorRegistry, data_port: int | None, metrics_port: int | None
    ) -> None:
        request_logs = RequestLogs(registry, PREFIX)
        listen = self.config.listen
        app = build_app(
            replicas=self.replicas,
            config=lambda: self.config,
            metrics=self.metrics,
            keyring=self.keyring,
            executor=self.executor,
        )
        self._in_flight.install(app)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=CANCEL_TIMEOUT_S,
            keepalive_timeout=self.config.connections.idle_timeout_s,
            logger=request_logs.for_listener("data"),
        )
        await self._runner.setup()
        self.stack.push_async_callback(_cleanup, self._runner)
        port = listen.port if data_port is None else data_port
        await web.TCPSite(
            self._runner, listen.host, port, ssl_context=self.server_tls.context
        ).start()
        await self._open_admin(request_logs)
        self._metrics_server = await start_metrics_server(
            registry,
            self.config.metrics,
            alive=lambda: not self._closing,
            ready=self.ready,
            port=metrics_port,
            server_log=request_logs.for_listener("metrics"),
        )
        self.stack.push_async_callback(self._metrics_server.close)

    async def _open_admin(self, request_logs: RequestLogs) -> None:
        path = self.config.admin_socket
        await self._run(lambda: path.parent.mkdir(parents=True, exist_ok=True, mode=0o755))
        app = build_admin_app(
            replicas=self.replicas,
            config=lambda: self.config,
            metrics=self.metrics,
            executor=self.executor,
            catalog=self.store,
        )
        runner = web.AppRunner(app, access_log=None, logger=request_logs.for_listener("admin"))
        await runner.setup()
        self.stack.push_async_callback(_cleanup, runner)
        await web.UnixSite(runner, str(path)).start()

        async def close_admin() -> None:
            await _cleanup(runner)
            path.unlink(missing_ok=True)

        self._close_admin = close_admin
        self.stack.push_async_callback(close_admin)
        os.chmod(path, SOCKET_MODE)

    def _run(self, job: Callable[[], T]) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self.executor, job)

    @property
    def port(self) -> int:
        """The data port actually bound (the configured one, or the one picked for 0)."""
        assert self._runner is not None
        address = self._runner.addresses[0]
        return int(address[1])

    @property
    def metrics_port(self) -> int:
        assert self._metrics_server is not None
        return self._metrics_server.port

    def ready(self) -> tuple[bool, str]:
        """Whether the data port can take files, and why not."""
        if self._closing:
            return False, "shutting down"
        quota = self.config.inbox_quota_bytes
        full = [r.config.id for r in self.replicas.values() if r.receiver.inbox_bytes() >= quota]
        if full:
            return False, f"inbox over quota for disks {', '.join(full)}"
        return True, "ready"

    async def housekeep(self) -> None:
        """One round of housekeeping now (mastertarget/housekeeping.py)."""
        await self.housekeeper.round()

    async def reload(self, path: Path) -> bool:
        """Reread the config file and apply what can change while running (SIGHUP).

        Returns:
            False if the reload was refused (the reason is logged), True otherwise.
        """
        return await reload_daemon(self, path, load=mt_config.load, reloadable=RELOADABLE, log=log)

    async def prepare_reload(self, plan: ReloadPlan[MasterTargetConfig]) -> Prepared:
        """Everything of a reload that can fail; the commit it returns cannot.

        The quota, the window and the high-water mark are read from
        ``self.config`` where they are used, so the new config is enough for
        them; the RPO threshold and the gauges are set here.
        """
        new, rpo = plan.config, self.housekeeper.rpo
        common = await prepare_server_reload(
            plan, server_tls=self.server_tls, key_file=self.key_file, executor=self.executor
        )

        def commit() -> None:
            common.commit(self.reloads)
            rpo.threshold_s = new.rpo_threshold_s
            self.metrics.rpo_threshold.set(new.rpo_threshold_s)
            self.metrics.inbox_quota_bytes.set(new.inbox_quota_bytes)
            self.metrics.window_target.set(new.retention.window_s)

        return Prepared(commit, common.notes, common.restart)

    async def close(self) -> None:
        """Stop taking requests, let the appliers finish the group in hand, close everything.

        A second call waits for the first to end.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        started = time.monotonic()
        try:
            await self.housekeeper.stop()
            if self._runner is not None:
                await self._in_flight.drain(self._runner, SHUTDOWN_GRACE_S)
            if self._close_admin is not None:
                await self._close_admin()
            for replica in self.replicas.values():
                replica.stop()
        finally:
            await self.stack.aclose()
            self._closed.set()
        log.info("master target stopped in %.1f s", time.monotonic() - started)


async def _cleanup(runner: web.AppRunner) -> None:
    """Close a runner's sites and connections, once (``cleanup`` does it again otherwise)."""
    if runner.server is not None:
        await runner.cleanup()
