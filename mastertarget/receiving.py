"""The receiving side of one disk: admission of a PUT, the durable store into
the inbox, and the received position.

A file is admitted by its place after what the disk holds
(protocol/sequencing.py): only the next one is stored. It is stored with the
crash-safe write of mastertarget/inbox.py before the PUT is answered
(docs/design.md invariant 1), then queued (mastertarget/pending.py) for the
applier, which takes files from the head of the queue and tells the receiver
what it applied, quarantined or rolled back.

Threads: everything here is owned by the event loop — the queue, the received
position, the lock that keeps one PUT of the disk at a time. The inbox writes
and deletions run on executor threads and hand back only their result. The
age of the oldest waiting file is read by the metrics scrape on its own
thread: it is kept in one attribute that the loop replaces whole.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor

from mastertarget.inbox import Inbox, InboxEntry
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.pending import PendingFiles
from protocol.hrl import HrlHeader
from protocol.sequencing import Admission, Fit, StreamPosition
from runtime.inorder import InOrder


class DiskReceiver:
    """What one disk has received and not applied yet.

    Args:
        disk_id: the disk.
        pending: its queue, loaded from the inbox.
        inbox: where its files are.
        executor: runs the inbox writes and deletions.
        metrics: the daemon's metrics.
        wake: set when a file was stored (the applier waits on it).
    """

    def __init__(
        self,
        disk_id: str,
        *,
        pending: PendingFiles,
        inbox: Inbox,
        executor: Executor,
        metrics: MasterTargetMetrics,
        wake: asyncio.Event,
    ) -> None:
        self.disk_id = disk_id
        self._pending = pending
        self._inbox = inbox
        self._executor = executor
        self._wake = wake
        #: the disk's PUTs: one stores its files at a time (admission and store
        #: must not interleave), and in seq order when several are in flight
        self.puts = InOrder()
        self.put_lock = self.puts.lock
        self._files_received = metrics.files_received.labels(disk_id)
        self._bytes_received = metrics.bytes_received.labels(disk_id)
        self._inbox_files = metrics.inbox_files.labels(disk_id)
        self._inbox_bytes = metrics.inbox_bytes.labels(disk_id)
        self._received_seq = metrics.received_seq.labels(disk_id)
        #: when the oldest waiting file was stored; read by the scrape thread
        self._oldest_ns: int | None = None
        # Read at scrape time: an age must grow while nothing happens.
        metrics.inbox_oldest_age.labels(disk_id).set_function(self._oldest_age_s)
        self._publish()

    @property
    def received(self) -> StreamPosition:
        """The last position held durably, in the inbox or applied."""
        return self._pending.received

    def admission(self, generation: int, first_seq: int, last_seq: int) -> Admission:
        """How a file fits after what this disk holds (see protocol/sequencing.py)."""
        return self._pending.admission(generation, first_seq, last_seq)

    def inbox_files(self) -> int:
        return len(self._pending)

    def inbox_bytes(self) -> int:
        return self._pending.bytes

    @property
    def oldest_ns(self) -> int | None:
        return self._oldest_ns

    async def store(self, header: HrlHeader, data: bytes) -> Admission:
        """Store a received file durably if it is next; the caller holds ``put_lock``.

        Returns:
            The admission; the file was stored only if its fit is NEXT.

        Raises:
            DurabilityError: the inbox write failed; nothing was stored.
        """
        verdict = self.admission(header.generation, header.first_seq, header.last_seq)
        if verdict.fit is not Fit.NEXT:
            return verdict
        loop = asyncio.get_running_loop()
        entry = await loop.run_in_executor(
            self._executor, lambda: self._inbox.store(header, data, now_ns=time.time_ns())
        )
        dropped = self._pending.add(entry)
        self._files_received.inc()
        self._bytes_received.inc(entry.size)
        self._publish()
        self._wake.set()
        self.puts.moved()
        await self._delete(dropped)
        return verdict

    # --- what the applier tells ------------------------------------------------------

    def head(self) -> InboxEntry | None:
        """The file to apply next, if it continues the applied position."""
        return self._pending.head()

    def queued(self) -> Iterator[InboxEntry]:
        """The waiting files in stream order."""
        return iter(self._pending)

    async def applied_through(self, entries: Iterable[InboxEntry], applied: StreamPosition) -> None:
        """The applier applied and deleted ``entries``; the disk is marked at ``applied``."""
        await self._delete(self._pending.applied_through(entries, applied))

    async def quarantined(self, entry: InboxEntry, applied: StreamPosition) -> None:
        """``entry`` was moved to quarantine: its seqs must come again."""
        await self._delete(self._pending.quarantined(entry, applied))

    async def reset(self, applied: StreamPosition) -> None:
        """The target was rolled back to ``applied``: every waiting file goes."""
        await self._delete(self._pending.reset(applied))

    async def _delete(self, dropped: list[InboxEntry]) -> None:
        """Publish the queue as it now is, and delete the files it dropped."""
        self._publish()
        if dropped:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._inbox.remove_all, dropped
            )

    # --- reporting -------------------------------------------------------------------

    def _oldest_age_s(self) -> float:
        oldest = self._oldest_ns
        return 0.0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)

    def _publish(self) -> None:
        self._oldest_ns = self._pending.oldest_ns
        self._inbox_files.set(len(self._pending))
        self._inbox_bytes.set(self._pending.bytes)
        self._received_seq.set(self.received.seq)
