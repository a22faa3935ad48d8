"""The master target's housekeeping: every :data:`HOUSEKEEPING_S`, each disk's
history is pruned to the window (mastertarget/retention.py), the RPO of the
disks and the groups is evaluated (mastertarget/rpo.py, docs/groups.md), and
the gauges of the catalog and the retention volume are refreshed.

Threads: a round runs on the event loop and waits for its reads of the
catalog and the volume on the executor; the RPO monitor is fed from the loop
(each applied group's points), and the groups seen are owned by the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from mastertarget.config import MasterTargetConfig
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.points import PointKind, RecoveryPoint
from mastertarget.replica import DiskReplica
from mastertarget.retention import Cutoff, point_age_ns
from mastertarget.retention_volume import usage
from mastertarget.rpo import RpoMonitor
from mastertarget.state import StateStore
from protocol.errors import BlockreplError
from runtime.service import vital

log = logging.getLogger("blockrepl.mastertarget")

T = TypeVar("T")

#: Seconds between housekeeping rounds (pruning, RPO, gauges): an RPO
#: crossing is seen within this long of happening.
HOUSEKEEPING_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class _PointSummary:
    """What the gauges of one disk's points are made of."""

    counts: dict[str, int]
    oldest: RecoveryPoint | None
    undo_bytes: int


class Housekeeper:
    """The rounds of one master target; :meth:`start` runs them, :meth:`stop` ends them.

    Args:
        replicas: the disks, by id.
        config: returns the running config (window, high-water mark, groups).
        store: the catalog.
        retention_path: the retention directory, measured each round.
        rpo: the RPO monitor.
    """

    def __init__(
        self,
        *,
        replicas: Mapping[str, DiskReplica],
        config: Callable[[], MasterTargetConfig],
        metrics: MasterTargetMetrics,
        executor: Executor,
        store: StateStore,
        retention_path: Path,
        rpo: RpoMonitor,
    ) -> None:
        self._replicas = replicas
        self._config = config
        self._metrics = metrics
        self._executor = executor
        self._store = store
        self._retention_path = retention_path
        self.rpo = rpo
        #: when each group was first seen: its RPO counts from there until it has a point
        self._groups_seen: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def points_observer(self, disk_id: str) -> Callable[[list[RecoveryPoint]], None]:
        """What a disk's applier tells its consistent points to: the RPO, newest last."""

        def observe(points: list[RecoveryPoint]) -> None:
            if points:
                self.rpo.observe_point(disk_id, points[-1].capture_ns, points[-1].applied_ns)

        return observe

    async def watch(self, disk_id: str) -> None:
        """Start the RPO of a disk, from its newest consistent point in the catalog."""
        self.rpo.add_disk(disk_id, time.time_ns())
        _, _, newest = await self._run(lambda: self._store.consistent_summary(disk_id))
        if newest is not None:
            self.rpo.observe_point(disk_id, newest.capture_ns, newest.applied_ns)

    def start(self) -> None:
        if self._task is None:
            self._task = vital(asyncio.create_task(self._rounds(), name="housekeeping"))

    async def stop(self) -> None:
        """End the rounds; a prune under way ends first (mastertarget/history.py). Idempotent."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _rounds(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            try:
                await self.round()
            except BlockreplError as exc:  # a report, not a reason to stop replicating
                log.error("housekeeping failed: %s", exc.message)
                self._metrics.errors.labels(exc.code).inc()

    async def round(self) -> None:
        """One round of housekeeping: prune, evaluate the RPO, refresh the gauges."""
        config = self._config()
        metrics = self._metrics
        used, free, capacity = await self._run(lambda: usage(self._retention_path))
        metrics.retention_used.set(used)
        metrics.retention_free.set(free)
        metrics.retention_capacity.set(capacity)
        high_water_percent = config.retention.high_water_percent
        metrics.retention_high_water.set(capacity * high_water_percent / 100)
        over = capacity > 0 and used * 100 > capacity * high_water_percent
        now = time.time_ns()
        for disk_id, replica in self._replicas.items():
            cutoff = await replica.history.prune(
                now_ns=now, window_s=config.retention.window_s, over_high_water=over
            )
            if cutoff is not None:
                self._report_prune(disk_id, cutoff, used, capacity, high_water_percent)
            summary = await self._run(functools.partial(self._summary, disk_id))
            self._publish_points(replica, summary, now, config.retention.window_s)
        await self._refresh_groups(config, now)
        for disk_id, status in self.rpo.evaluate(now).items():
            metrics.rpo.labels(disk_id).set(status.rpo_s)
            metrics.rpo_exceeded.labels(disk_id).set(1 if status.exceeded else 0)
            metrics.clock_skew.labels(disk_id).set(status.skew_s)

    def _report_prune(
        self, disk_id: str, cutoff: Cutoff, used: int, capacity: int, high_water_percent: float
    ) -> None:
        if cutoff.expired:
            self._metrics.pruned_points.labels(disk_id, "expired").inc(cutoff.expired)
        if cutoff.early:
            self._metrics.pruned_points.labels(disk_id, "volume-full").inc(cutoff.early)
            log.warning(
                "disk %s: retention volume %s is %.0f %% full (high-water %.0f %%): dropped "
                "%d of the oldest recovery points before their time",
                disk_id,
                self._retention_path,
                100 * used / capacity,
                high_water_percent,
                cutoff.early,
            )

    def _summary(self, disk_id: str) -> _PointSummary:
        """Blocking: on an executor thread."""
        counts, oldest, _ = self._store.consistent_summary(disk_id)
        return _PointSummary(counts, oldest, self._store.undo_bytes(disk_id))

    def _publish_points(
        self, replica: DiskReplica, summary: _PointSummary, now_ns: int, target_s: float
    ) -> None:
        disk_id = replica.config.id
        for kind in PointKind:
            self._metrics.points.labels(disk_id, kind.value).set(summary.counts.get(kind.value, 0))
        oldest = summary.oldest
        window = point_age_ns(oldest, now_ns) / 1e9 if oldest is not None else 0.0
        self._metrics.window.labels(disk_id).set(window)
        self._metrics.shortfall.labels(disk_id).set(replica.history.shortfall_s(window, target_s))
        self._metrics.undo_bytes.labels(disk_id).set(summary.undo_bytes)

    async def _refresh_groups(self, config: MasterTargetConfig, now_ns: int) -> None:
        """Each group's common points and RPO (docs/groups.md), by the same rule
        as a disk's: a capture time later than the apply time counts as the
        apply time, so a source clock ahead cannot hide a violation."""
        groups = config.groups
        for gone in set(self._groups_seen) - {g.id for g in groups}:
            del self._groups_seen[gone]
            self._metrics.group_rpo.remove(gone)
            self._metrics.group_points.remove(gone)
        summaries = await self._run(
            lambda: [self._store.group_summary(g.id, g.disks) for g in groups]
        )
        for group, summary in zip(groups, summaries, strict=True):
            since = self._groups_seen.setdefault(group.id, now_ns)
            count, newest_ns = 0, since
            if summary is not None:
                count, capture_ns, applied_ns = summary
                newest_ns = min(capture_ns, applied_ns)
            self._metrics.group_points.labels(group.id).set(count)
            self._metrics.group_rpo.labels(group.id).set(max(0, now_ns - newest_ns) / 1e9)

    def _run(self, job: Callable[[], T]) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._executor, job)
