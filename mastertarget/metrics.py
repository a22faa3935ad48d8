"""The master target's Prometheus metrics, on a registry of its own.

Names follow Prometheus conventions: ``blockrepl_mastertarget_`` prefix, base
units (bytes, seconds), ``_total`` for counters. Per-disk series carry a
``disk`` label; disk ids are safe label values by construction.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mastertarget.state import DiskState

PREFIX = "blockrepl_mastertarget"

#: Apply latency buckets: one small file applies in milliseconds, a 64 MiB
#: file to a slow sparse VMDK in seconds; alerting cares about the tail.
APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


#: Recover and failover take seconds to hours, by disk size and history.
LONG_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400)


class MasterTargetMetrics:
    """Every series the master target exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        disk = ["disk"]
        self.files_received = Counter(
            f"{PREFIX}_hrl_files_received",
            "HRL files stored durably in the inbox.",
            disk,
            registry=registry,
        )
        self.bytes_received = Counter(
            f"{PREFIX}_hrl_received_bytes",
            "Bytes of HRL files stored in the inbox.",
            disk,
            registry=registry,
        )
        self.files_applied = Counter(
            f"{PREFIX}_hrl_files_applied",
            "HRL files applied to the target and marked.",
            disk,
            registry=registry,
        )
        self.bytes_applied = Counter(
            f"{PREFIX}_applied_bytes",
            "Bytes written to the target by WRITE records.",
            disk,
            registry=registry,
        )
        self.bytes_zeroed = Counter(
            f"{PREFIX}_zeroed_bytes",
            "Bytes made zero on the target by ZERO records.",
            disk,
            registry=registry,
        )
        self.duplicates = Counter(
            f"{PREFIX}_hrl_duplicates",
            "HRL files received again and dropped.",
            disk,
            registry=registry,
        )
        self.apply_seconds = Histogram(
            f"{PREFIX}_apply_seconds",
            "Time to verify, apply and flush one HRL file and move the marker.",
            disk,
            buckets=APPLY_BUCKETS,
            registry=registry,
        )
        self.inbox_files = Gauge(
            f"{PREFIX}_inbox_files", "HRL files waiting in the inbox.", disk, registry=registry
        )
        self.inbox_bytes = Gauge(
            f"{PREFIX}_inbox_bytes",
            "Bytes of HRL files waiting in the inbox.",
            disk,
            registry=registry,
        )
        self.inbox_quota_bytes = Gauge(
            f"{PREFIX}_inbox_quota_bytes",
            "Inbox bytes per disk above which PUTs get 503.",
            registry=registry,
        )
        self.inbox_oldest_age = Gauge(
            f"{PREFIX}_inbox_oldest_age_seconds",
            "Age of the oldest HRL file waiting in the inbox (0 when empty).",
            disk,
            registry=registry,
        )
        self.quarantined = Counter(
            f"{PREFIX}_quarantined_files",
            "HRL files that failed verification, moved aside.",
            ["disk", "reason"],
            registry=registry,
        )
        self.state = Gauge(
            f"{PREFIX}_disk_state",
            "1 for the replication state the disk is in, else 0.",
            ["disk", "state"],
            registry=registry,
        )
        self.resync_required = Gauge(
            f"{PREFIX}_resync_required",
            "1 while the disk needs a resync from its agent.",
            disk,
            registry=registry,
        )
        self.applied_seq = Gauge(
            f"{PREFIX}_applied_seq",
            "The last seq applied to the target.",
            disk,
            registry=registry,
        )
        self.received_seq = Gauge(
            f"{PREFIX}_received_seq",
            "The last seq held durably in the inbox or applied.",
            disk,
            registry=registry,
        )
        self.target_bytes = Gauge(
            f"{PREFIX}_target_size_bytes",
            "Virtual size of the target disk.",
            disk,
            registry=registry,
        )
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Data API requests answered, by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.requests_in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Data API requests being handled now.",
            registry=registry,
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Errors by kind (the error code of docs/protocol.md and api.md).",
            ["kind"],
            registry=registry,
        )
        self.apply_retries = Counter(
            f"{PREFIX}_apply_retries",
            "Applies retried after a target error.",
            disk,
            registry=registry,
        )

        self.rpo = Gauge(
            f"{PREFIX}_rpo_seconds",
            "Age of the newest recovery point, from the source capture time "
            "(clamped to the apply time: docs/recovery-points.md).",
            disk,
            registry=registry,
        )
        self.rpo_threshold = Gauge(
            f"{PREFIX}_rpo_threshold_seconds",
            "RPO above which a disk is rpo-exceeded.",
            registry=registry,
        )
        self.rpo_exceeded = Gauge(
            f"{PREFIX}_rpo_exceeded",
            "1 while the disk's RPO is above the threshold.",
            disk,
            registry=registry,
        )
        self.clock_skew = Gauge(
            f"{PREFIX}_clock_skew_seconds",
            "How far the source clock was seen ahead of this one recently (0 if not ahead).",
            disk,
            registry=registry,
        )
        self.window = Gauge(
            f"{PREFIX}_retention_window_seconds",
            "Age of the oldest consistent recovery point (0 with none).",
            disk,
            registry=registry,
        )
        self.window_target = Gauge(
            f"{PREFIX}_retention_window_target_seconds",
            "The configured retention window.",
            registry=registry,
        )
        self.shortfall = Gauge(
            f"{PREFIX}_retention_shortfall_seconds",
            "How much of the window was given up early because the volume was full.",
            disk,
            registry=registry,
        )
        self.points = Gauge(
            f"{PREFIX}_recovery_points",
            "Consistent recovery points in the catalog.",
            ["disk", "kind"],
            registry=registry,
        )
        self.undo_bytes = Gauge(
            f"{PREFIX}_undo_bytes",
            "Bytes of undo files in the retention journal.",
            disk,
            registry=registry,
        )
        self.retention_used = Gauge(
            f"{PREFIX}_retention_used_bytes",
            "Bytes used on the retention volume.",
            registry=registry,
        )
        self.retention_free = Gauge(
            f"{PREFIX}_retention_free_bytes",
            "Bytes still free on the retention volume.",
            registry=registry,
        )
        self.retention_capacity = Gauge(
            f"{PREFIX}_retention_capacity_bytes",
            "Size of the retention volume.",
            registry=registry,
        )
        self.retention_high_water = Gauge(
            f"{PREFIX}_retention_high_water_bytes",
            "Retention volume usage above which the oldest history goes early.",
            registry=registry,
        )
        self.pruned_points = Counter(
            f"{PREFIX}_pruned_points",
            "Recovery points forgotten, by reason.",
            ["disk", "reason"],
            registry=registry,
        )
        self.group_rpo = Gauge(
            f"{PREFIX}_group_rpo_seconds",
            "Age of the newest point common to every disk of a consistency group, from its "
            "round's time (clamped to when its last disk applied it): the group's RPO.",
            ["group"],
            registry=registry,
        )
        self.group_points = Gauge(
            f"{PREFIX}_group_recovery_points",
            "Recovery points common to every disk of a consistency group.",
            ["group"],
            registry=registry,
        )
        self.recover_seconds = Histogram(
            f"{PREFIX}_recover_seconds",
            "Time to write a disk as of a point to a copy.",
            buckets=LONG_BUCKETS,
            registry=registry,
        )
        self.failover_seconds = Histogram(
            f"{PREFIX}_failover_seconds",
            "Time to roll a target back in place.",
            buckets=LONG_BUCKETS,
            registry=registry,
        )

    def set_state(self, disk_id: str, state: DiskState) -> None:
        for each in DiskState:
            self.state.labels(disk_id, each.value).set(1 if each is state else 0)
        self.resync_required.labels(disk_id).set(1 if state is DiskState.RESYNC_REQUIRED else 0)
