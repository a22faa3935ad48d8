"""The process server's Prometheus metrics, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protocol.batch import Batch
from protocol.sequencing import Fit

PREFIX = "blockrepl_processserver"

#: Ack latency buckets: a batch is acknowledged after its group's fsyncs,
#: milliseconds on a good volume; the tail is what an agent's RPO feels.
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


#: One file to a master target on loopback takes milliseconds, over a WAN
#: link seconds.
SHIP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


#: The calls to the master target whose answers are counted when malformed:
#: shipping a file, reading a disk's position, passing a checksum refusal on.
MALFORMED_ANSWER_CALLS = ("put-hrl", "state", "checksums")


class ProcessServerMetrics:
    """Every series the process server exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        disk = ["disk"]
        self.batches_in = Counter(
            f"{PREFIX}_batches_in",
            "Batches acknowledged (stored, or duplicates).",
            disk,
            registry=registry,
        )
        self.bytes_in = Counter(
            f"{PREFIX}_in_bytes",
            "Payload bytes of batches stored in the cache.",
            disk,
            registry=registry,
        )
        self.duplicates = Counter(
            f"{PREFIX}_duplicate_batches",
            "Batches received again and dropped.",
            disk,
            registry=registry,
        )
        self.rejects = Counter(
            f"{PREFIX}_rejects",
            "Requests refused, by reason (an error code).",
            ["reason"],
            registry=registry,
        )
        self.requests_in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Data API requests being handled now.",
            registry=registry,
        )
        self.ack_seconds = Histogram(
            f"{PREFIX}_ack_seconds",
            "Time from a request's start to its acknowledgement.",
            buckets=ACK_BUCKETS,
            registry=registry,
        )
        self.cache_bytes = Gauge(
            f"{PREFIX}_cache_bytes", "Bytes of HRL files in the cache.", registry=registry
        )
        self.cache_high_bytes = Gauge(
            f"{PREFIX}_cache_high_bytes",
            "Cache bytes above which batches get 503.",
            registry=registry,
        )
        self.cache_low_bytes = Gauge(
            f"{PREFIX}_cache_low_bytes",
            "Cache bytes below which batches are taken again.",
            registry=registry,
        )
        self.resync_required = Gauge(
            f"{PREFIX}_resync_required",
            "1 while the disk needs a resync from its agent.",
            disk,
            registry=registry,
        )

        self.files_out = Counter(
            f"{PREFIX}_hrl_files_out",
            "HRL files the master target acknowledged.",
            disk,
            registry=registry,
        )
        self.bytes_out = Counter(
            f"{PREFIX}_out_bytes",
            "Bytes of HRL files sent to the master target.",
            disk,
            registry=registry,
        )
        self.ship_retries = Counter(
            f"{PREFIX}_ship_retries",
            "Transfers to the master target that failed and wait.",
            disk,
            registry=registry,
        )
        self.malformed_answers = Counter(
            f"{PREFIX}_malformed_answers",
            "Answers of the master target that broke docs/api.md "
            "(each taken as a failed exchange), by the call they answered.",
            ["call"],
            registry=registry,
        )
        for call in MALFORMED_ANSWER_CALLS:
            self.malformed_answers.labels(call)  # the series exist from the start
        self.ship_seconds = Histogram(
            f"{PREFIX}_ship_seconds",
            "Time of one transfer to the master target.",
            buckets=SHIP_BUCKETS,
            registry=registry,
        )

        self.sealed_bytes = Counter(
            f"{PREFIX}_sealed_bytes",
            "Bytes of HRL files written for stored batches "
            "(in_bytes / sealed_bytes is the compression ratio).",
            disk,
            registry=registry,
        )
        self.backlog_age = Gauge(
            f"{PREFIX}_backlog_age_seconds",
            "Age of the oldest cached file not yet shipped (0 when none).",
            disk,
            registry=registry,
        )

    def count_batch(self, disk_id: str, batch: Batch, fit: Fit) -> None:
        """Count a batch by how it fit in its disk's stream."""
        if fit is Fit.NEXT:
            self.batches_in.labels(disk_id).inc()
            self.bytes_in.labels(disk_id).inc(batch.header.payload_len)
        elif fit is Fit.DUPLICATE:
            self.batches_in.labels(disk_id).inc()
            self.duplicates.labels(disk_id).inc()
        else:
            self.rejects.labels(fit.value).inc()
