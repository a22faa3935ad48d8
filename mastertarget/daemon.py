"""The master target daemon: wires config, retention volume, state, inbox,
target disks, appliers, the data API and the metrics listener together.

``MasterTarget.start`` brings everything up in the order that keeps the
invariants: the retention volume is checked and locked first (so a second
master target cannot share it), the state and inbox are recovered as a crash
left them, and the data port opens last, when every disk can take files.
``close`` runs the other way: the port closes (requests in flight finish),
the appliers finish the file in hand, then files are closed. ``reload``
(SIGHUP) applies the keys of :data:`RELOADABLE` and rereads the TLS files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry

from mastertarget import config as mt_config
from mastertarget.admin import SOCKET_MODE, build_admin_app
from mastertarget.config import MasterTargetConfig
from mastertarget.inbox import Inbox
from mastertarget.journal import UndoJournal
from mastertarget.metrics import PREFIX, MasterTargetMetrics
from mastertarget.points import PointKind, RecoveryPoint
from mastertarget.replica import DiskReplica
from mastertarget.retention import Cutoff, point_age_ns
from mastertarget.retention_volume import (
    RetentionVolume,
    check_retention_volume,
    installed_package_dir,
    usage,
)
from mastertarget.rpo import RpoMonitor
from mastertarget.server import build_app
from mastertarget.state import StateStore
from protocol.errors import BlockreplError
from protocol.keyring import KeyRing
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
from runtime.service import vital
from runtime.tls import ReloadableServerContext

log = logging.getLogger("blockrepl.mastertarget")

#: Seconds the requests in flight may take to finish when the daemon stops:
#: one largest file at a slow link's pace. The unit's TimeoutStopSec= is
#: above it and the appliers' last group (systemd/mastertarget.service).
SHUTDOWN_GRACE_S: Final = 30.0
#: Threads for verification, applying and hashing: every disk can apply while
#: another thread stores a received file. AES, zstd and pwrite release the GIL.
MIN_WORKERS: Final = 4
#: The name of the state database on the retention volume.
STATE_DB: Final = "state.db"
#: Seconds between housekeeping rounds (pruning, RPO, gauges): an RPO
#: crossing is seen within this long of happening.
HOUSEKEEPING_S: Final = 5.0
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
    replicas: dict[str, DiskReplica] = field(default_factory=dict)
    _server_tls: ReloadableServerContext | None = None
    _in_flight: InFlight = field(init=False)
    rpo: RpoMonitor | None = None
    _housekeeper: asyncio.Task[None] | None = None
    _runner: web.AppRunner | None = None
    _admin_runner: web.AppRunner | None = None
    _metrics_server: MetricsServer | None = None
    _closing: bool = False
    #: when each group was first seen: its RPO counts from there until it has a point
    _groups_seen: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._in_flight = InFlight(self.metrics.requests_in_flight)

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
        """
        registry = registry or new_registry()
        metrics = MasterTargetMetrics(registry)
        metrics.inbox_quota_bytes.set(config.inbox_quota_bytes)
        loop = asyncio.get_running_loop()
        config.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        retention = check_retention_volume(
            config.retention.dir,
            cache_dir=config.cache_dir,
            install_dir=installed_package_dir(),
            targets=[d.target for d in config.disks],
            mountinfo=mountinfo,
            allow_shared_volume=config.retention.allow_shared_volume,
        )
        if config.retention.allow_shared_volume:
            log.warning(
                "retention directory %s may share a volume with the cache, the installation "
                "or a target (retention.allow_shared_volume = true): for demos and tests only",
                retention.path,
            )
        executor = ThreadPoolExecutor(
            max_workers=max(MIN_WORKERS, len(config.disks) + 2), thread_name_prefix="mt-io"
        )
        try:
            keyring = await loop.run_in_executor(executor, load_keyring, config.key_file)
            key_file = await loop.run_in_executor(executor, FileContent.read, config.key_file)
            store = StateStore(retention.path / STATE_DB)
        except BaseException:
            executor.shutdown()
            retention.lock.release()
            raise
        reloads = ReloadMetrics(registry, PREFIX)
        mt = cls(config, keyring, metrics, executor, retention, store, reloads, key_file)
        mt.rpo = RpoMonitor(
            config.rpo_threshold_s, log=logging.getLogger("blockrepl.mastertarget.rpo")
        )
        metrics.rpo_threshold.set(config.rpo_threshold_s)
        metrics.window_target.set(config.retention.window_s)
        try:
            mt._server_tls = ReloadableServerContext(config.tls)
            reloads.certificate_expiry.labels("server").set(mt._server_tls.certificate.not_after_s)
            await mt._open_disks()
            await mt.housekeep()
            mt._housekeeper = vital(asyncio.create_task(mt._housekeeping(), name="housekeeping"))
            await mt._open_ports(registry, data_port, metrics_port)
        except BaseException:
            await mt.close()
            raise
        log.info(
            "master target ready: %d disks, data port %s, metrics port %s",
            len(mt.replicas), mt.port, mt.metrics_port,
        )  # fmt: skip
        return mt

    async def _open_disks(self) -> None:
        inbox = Inbox(self.config.cache_dir)
        journal = UndoJournal(self.retention.path / JOURNAL_DIR, self.keyring)
        for disk in self.config.disks:
            replica = await DiskReplica.open(
                disk, store=self.store, inbox=inbox, keyring=self.keyring, metrics=self.metrics,
                executor=self.executor, journal=journal, on_points=self._observer(disk.id),
            )  # fmt: skip
            self.replicas[disk.id] = replica
            await self._watch(disk.id)
            replica.start()
            status = replica.status()
            log.info(
                "disk %s: target %s (%d bytes), applied generation %d seq %d, "
                "%d files waiting, state %s",
                disk.id, disk.target, status.target_size, status.applied.generation,
                status.applied.seq, status.inbox_files, status.state.value,
            )  # fmt: skip

    def _observer(self, disk_id: str) -> Callable[[list[RecoveryPoint]], None]:
        """What a disk's applier tells its consistent points to: the RPO, newest last."""
        assert self.rpo is not None
        rpo = self.rpo

        def observe(points: list[RecoveryPoint]) -> None:
            if points:
                rpo.observe_point(disk_id, points[-1].capture_ns, points[-1].applied_ns)

        return observe

    async def _watch(self, disk_id: str) -> None:
        """Start the RPO of a disk, from its newest consistent point in the catalog."""
        assert self.rpo is not None
        self.rpo.add_disk(disk_id, time.time_ns())
        loop = asyncio.get_running_loop()
        _, _, newest = await loop.run_in_executor(
            self.executor, self.store.consistent_summary, disk_id
        )
        if newest is not None:
            self.rpo.observe_point(disk_id, newest.capture_ns, newest.applied_ns)

    async def _housekeeping(self) -> None:
        """Every HOUSEKEEPING_S: prune to the window, evaluate the RPO, refresh gauges."""
        while not self._closing:
            await asyncio.sleep(HOUSEKEEPING_S)
            try:
                await self.housekeep()
            except BlockreplError as exc:  # a report, not a reason to stop replicating
                log.error("housekeeping failed: %s", exc.message)
                self.metrics.errors.labels(exc.code).inc()

    async def housekeep(self) -> None:
        """One round of housekeeping: prune, evaluate the RPO, refresh the gauges."""
        loop = asyncio.get_running_loop()
        used, free, capacity = await loop.run_in_executor(self.executor, usage, self.retention.path)
        self.metrics.retention_used.set(used)
        self.metrics.retention_free.set(free)
        self.metrics.retention_capacity.set(capacity)
        high_water_percent = self.config.retention.high_water_percent
        self.metrics.retention_high_water.set(capacity * high_water_percent / 100)
        over = capacity > 0 and used * 100 > capacity * high_water_percent
        now = time.time_ns()
        for disk_id, replica in self.replicas.items():
            cutoff = await replica.history.prune(
                now_ns=now, window_s=self.config.retention.window_s, over_high_water=over
            )
            if cutoff is not None:
                self._report_prune(disk_id, cutoff, used, capacity)
            summary = await loop.run_in_executor(
                self.executor, lambda disk_id=disk_id: (  # type: ignore[misc]
                    self.store.consistent_summary(disk_id), self.store.undo_bytes(disk_id)
                )
            )  # fmt: skip
            self._refresh_points(replica, summary, now)
        await loop.run_in_executor(self.executor, self._refresh_groups, now)
        assert self.rpo is not None
        for disk_id, status in self.rpo.evaluate(now).items():
            self.metrics.rpo.labels(disk_id).set(status.rpo_s)
            self.metrics.rpo_exceeded.labels(disk_id).set(1 if status.exceeded else 0)
            self.metrics.clock_skew.labels(disk_id).set(status.skew_s)

    def _report_prune(self, disk_id: str, cutoff: Cutoff, used: int, capacity: int) -> None:
        if cutoff.expired:
            self.metrics.pruned_points.labels(disk_id, "expired").inc(cutoff.expired)
        if cutoff.early:
            self.metrics.pruned_points.labels(disk_id, "volume-full").inc(cutoff.early)
            log.warning(
                "disk %s: retention volume %s is %.0f %% full (high-water %.0f %%): dropped "
                "%d of the oldest recovery points before their time",
                disk_id, self.retention.path, 100 * used / capacity,
                self.config.retention.high_water_percent, cutoff.early,
            )  # fmt: skip

    def _refresh_points(
        self,
        replica: DiskReplica,
        summary: tuple[tuple[dict[str, int], RecoveryPoint | None, RecoveryPoint | None], int],
        now_ns: int,
    ) -> None:
        disk_id = replica.config.id
        (counts, oldest, _), undo_bytes = summary
        for kind in PointKind:
            self.metrics.points.labels(disk_id, kind.value).set(counts.get(kind.value, 0))
        window = point_age_ns(oldest, now_ns) / 1e9 if oldest is not None else 0.0
        self.metrics.window.labels(disk_id).set(window)
        shortfall = replica.history.shortfall_s(window, self.config.retention.window_s)
        self.metrics.shortfall.labels(disk_id).set(shortfall)
        self.metrics.undo_bytes.labels(disk_id).set(undo_bytes)

    def _refresh_groups(self, now_ns: int) -> None:
        """Each group's common points and RPO (docs/groups.md), by the same rule
        as a disk's: a capture time later than the apply time counts as the
        apply time, so a source clock ahead cannot hide a violation."""
        groups = self.config.groups
        for gone in set(self._groups_seen) - {g.id for g in groups}:
            del self._groups_seen[gone]
            self.metrics.group_rpo.remove(gone)
            self.metrics.group_points.remove(gone)
        for group in groups:
            since = self._groups_seen.setdefault(group.id, now_ns)
            summary = self.store.group_summary(group.id, group.disks)
            count, newest_ns = 0, since
            if summary is not None:
                count, capture_ns, applied_ns = summary
                newest_ns = min(capture_ns, applied_ns)
            self.metrics.group_points.labels(group.id).set(count)
            self.metrics.group_rpo.labels(group.id).set(max(0, now_ns - newest_ns) / 1e9)

    async def _open_ports(
        self, registry: CollectorRegistry, data_port: int | None, metrics_port: int | None
    ) -> None:
        request_logs = RequestLogs(registry, PREFIX)
        listen = self.config.listen
        assert self._server_tls is not None
        app = build_app(
            replicas=self.replicas, config=lambda: self.config, metrics=self.metrics,
            keyring=self.keyring, executor=self.executor,
        )  # fmt: skip
        self._in_flight.install(app)
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=CANCEL_TIMEOUT_S,
            keepalive_timeout=self.config.connections.idle_timeout_s,
            logger=request_logs.for_listener("data"),
        )  # fmt: skip
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            listen.host,
            listen.port if data_port is None else data_port,
            ssl_context=self._server_tls.context,
        )
        await site.start()
        await self._open_admin(request_logs)
        self._metrics_server = await start_metrics_server(
            registry,
            self.config.metrics,
            alive=lambda: not self._closing,
            ready=self.ready,
            port=metrics_port,
            server_log=request_logs.for_listener("metrics"),
        )

    async def _open_admin(self, request_logs: RequestLogs) -> None:
        path = self.config.admin_socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        app = build_admin_app(
            replicas=self.replicas, config=lambda: self.config, metrics=self.metrics,
            executor=self.executor, catalog=self.store,
        )  # fmt: skip
        self._admin_runner = web.AppRunner(
            app, access_log=None, logger=request_logs.for_listener("admin")
        )
        await self._admin_runner.setup()
        await web.UnixSite(self._admin_runner, str(path)).start()
        os.chmod(path, SOCKET_MODE)

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
        full = [
            r.config.id
            for r in self.replicas.values()
            if r.receiver.inbox_bytes() >= self.config.inbox_quota_bytes
        ]
        if full:
            return False, f"inbox over quota for disks {', '.join(full)}"
        return True, "ready"

    async def reload(self, path: Path) -> bool:
        """Reread the config file and apply what can change while running (SIGHUP).

        Returns:
            False if the reload was refused (the reason is logged and the
            running configuration stays), True otherwise.
        """
        running = await reload_config(
            path=path, load=mt_config.load, running=self.config, reloadable=RELOADABLE,
            prepare=self._prepare_reload, metrics=self.reloads, log=log,
        )  # fmt: skip
        if running is None:
            return False
        self.config = running
        return True

    async def _prepare_reload(self, plan: ReloadPlan[MasterTargetConfig]) -> Prepared:
        """Everything of a reload that can fail; the commit it returns cannot.

        The quota, the window and the high-water mark are read from
        ``self.config`` where they are used, so the new config is enough for
        them; the RPO threshold and the gauges are set here.
        """
        new = plan.config
        assert self._server_tls is not None
        assert self.rpo is not None
        server_tls, rpo = self._server_tls, self.rpo
        loop = asyncio.get_running_loop()
        # TLS files are read even when their names did not change: a renewed
        # certificate usually keeps its file name.
        server = await loop.run_in_executor(self.executor, server_tls.prepare, new.tls)
        restart = await loop.run_in_executor(
            self.executor, self.key_file.waits_for_restart, "key_file", new.key_file
        )

        def commit() -> None:
            if touches(plan, "logging"):
                setup_logging(new.logging)
            server.commit()
            self.reloads.certificate_expiry.labels("server").set(server.certificate.not_after_s)
            rpo.threshold_s = new.rpo_threshold_s
            self.metrics.rpo_threshold.set(new.rpo_threshold_s)
            self.metrics.inbox_quota_bytes.set(new.inbox_quota_bytes)
            self.metrics.window_target.set(new.retention.window_s)

        return Prepared(commit, (server.note,) if server.note else (), restart)

    async def close(self) -> None:
        """Stop taking requests, let the appliers finish the file in hand, close everything."""
        self._closing = True
        started = time.monotonic()
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
        if self._runner is not None:
            await self._in_flight.drain(self._runner, SHUTDOWN_GRACE_S)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self.config.admin_socket.unlink(missing_ok=True)
        for replica in self.replicas.values():
            replica.stop()
        for replica in self.replicas.values():
            await replica.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        self.executor.shutdown(wait=True)  # a cancelled prune may still run there
        self.store.close()
        self.retention.lock.release()
        log.info("master target stopped in %.1f s", time.monotonic() - started)
