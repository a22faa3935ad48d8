"""One replicated disk at the master target: its stream position, its inbox
queue and its ordered applier.

Each disk has one applier task; disks apply in parallel on the executor's
threads (AES-GCM, zstd and pwrite release the GIL). For one file the applier:

1. reads it from the inbox and verifies it whole (protocol/hrl.py ``open_hrl``)
   and checks its header against its place in the stream;
2. applies its records in order (mastertarget/apply.py);
3. flushes the target (one fsync per file, not per record);
4. moves the applied marker in the state database (durable on return);
5. unlinks the inbox file.

A crash anywhere re-applies the file at start-up: writes are absolute, so
applying a file twice leaves what applying it once does (DESIGN.md invariant
2). A file that fails verification is quarantined and the disk goes
``resync-required``; a target error pauses the disk and the file is applied
again, whole, after a back-off — never "retry the fsync and carry on"
(crash-safe checklist item 4).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final

from mastertarget.apply import ApplyResult, apply_file
from mastertarget.config import DiskConfig
from mastertarget.disks.base import TargetDisk
from mastertarget.errors import DiskError
from mastertarget.inbox import Inbox, InboxEntry
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.state import DiskRecord, DiskState, StateStore
from protocol.errors import MalformedError, ProtocolError
from protocol.hrl import HrlHeader, open_hrl
from protocol.keyring import KeyRing
from protocol.sequencing import Admission, Fit, StreamPosition, admit
from runtime.errors import DurabilityError

log = logging.getLogger("blockrepl.mastertarget.apply")

#: First wait before applying a file again after a target error, doubled on
#: each failure up to the maximum: quick recovery from a blip, no busy loop
#: against a dead disk.
RETRY_FIRST_S: Final = 1.0
RETRY_MAX_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """A snapshot for the state endpoint."""

    disk_id: str
    received: StreamPosition
    applied: StreamPosition
    state: DiskState
    last_error: str
    resync_open: bool
    target_size: int
    inbox_files: int
    inbox_bytes: int
    oldest_ns: int | None


class DiskReplica:
    """The receiving and applying side of one disk.

    Build it with :meth:`open`, start :meth:`run` as a task, stop with :meth:`stop`.
    """

    def __init__(
        self,
        config: DiskConfig,
        target: TargetDisk,
        *,
        store: StateStore,
        inbox: Inbox,
        keyring: KeyRing,
        metrics: MasterTargetMetrics,
        executor: Executor,
        record: DiskRecord,
        entries: list[InboxEntry],
    ) -> None:
        self.config = config
        self.target = target
        self._store = store
        self._inbox = inbox
        self._keyring = keyring
        self._metrics = metrics
        self._executor = executor
        self._record = record
        self._pending: list[InboxEntry] = []
        self.received = record.applied
        #: one PUT of this disk at a time: admission and store must not interleave
        self.put_lock = asyncio.Lock()
        #: held while a file is applied and while checksums are read, so a
        #: reader never sees half a file
        self.disk_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._stopping = False
        self._retry_s = RETRY_FIRST_S
        for entry in entries:
            self._add_pending(entry)
        self._drop_superseded()
        self._advance_received()
        self._publish()

    @classmethod
    def open(
        cls,
        config: DiskConfig,
        target: TargetDisk,
        *,
        store: StateStore,
        inbox: Inbox,
        keyring: KeyRing,
        metrics: MasterTargetMetrics,
        executor: Executor,
    ) -> DiskReplica:
        """Load the disk's marker and inbox as a crash left them; blocking."""
        inbox.prepare(config.id)
        return cls(
            config, target, store=store, inbox=inbox, keyring=keyring, metrics=metrics,
            executor=executor, record=store.disk(config.id), entries=inbox.scan(config.id),
        )  # fmt: skip

    # --- receiving -------------------------------------------------------------------

    @property
    def state(self) -> DiskState:
        return self._record.state

    @property
    def applied(self) -> StreamPosition:
        return self._record.applied

    def admission(self, generation: int, first_seq: int, last_seq: int) -> Admission:
        """How a file fits after what this disk holds (see protocol/sequencing.py)."""
        return admit(self.received, generation, first_seq, last_seq)

    def inbox_bytes(self) -> int:
        return sum(e.size for e in self._pending)

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
        self._add_pending(entry)
        self._drop_superseded()
        self._advance_received()
        self._metrics.files_received.labels(self.config.id).inc()
        self._metrics.bytes_received.labels(self.config.id).inc(entry.size)
        self._publish()
        self._wake.set()
        return verdict

    def _add_pending(self, entry: InboxEntry) -> None:
        position = bisect.bisect(self._pending, entry)
        if position and self._pending[position - 1].path == entry.path:
            self._pending[position - 1] = entry  # stored again under the same name
        else:
            self._pending.insert(position, entry)

    def _advance_received(self) -> None:
        """Move ``received`` over every stored file that continues it."""
        for entry in self._pending:
            if admit(self.received, entry.generation, entry.first_seq, entry.last_seq).fit is (
                Fit.NEXT
            ):
                self.received = entry.end

    def _drop_superseded(self) -> None:
        """Forget files that the applied position makes useless (applied, older
        generation, or overlapping what was applied)."""
        keep: list[InboxEntry] = []
        for entry in self._pending:
            fit = admit(self._record.applied, entry.generation, entry.first_seq, entry.last_seq)
            if fit.fit in (Fit.DUPLICATE, Fit.STALE, Fit.OVERLAP):
                self._inbox.remove(entry)
            else:
                keep.append(entry)
        self._pending = keep

    # --- applying --------------------------------------------------------------------

    async def run(self) -> None:
        """Apply files in stream order until :meth:`stop`."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            entry = self._next_entry()
            if entry is None or self._record.state is DiskState.FAILED_OVER:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.monotonic()
            try:
                result = await loop.run_in_executor(self._executor, self._apply, entry)
            except ProtocolError as exc:
                await loop.run_in_executor(self._executor, self._quarantine, entry, exc)
                continue
            except (DiskError, DurabilityError) as exc:
                await self._pause(entry, exc)
                continue
            self._applied(entry, result, time.monotonic() - started)

    def _next_entry(self) -> InboxEntry | None:
        if not self._pending:
            return None
        entry = self._pending[0]
        fit = admit(self._record.applied, entry.generation, entry.first_seq, entry.last_seq)
        return entry if fit.fit is Fit.NEXT else None

    def _apply(self, entry: InboxEntry) -> ApplyResult:
        """Verify, apply, flush, mark (blocking; on an executor thread)."""
        hrl = open_hrl(entry.path.read_bytes(), self._keyring)
        header = hrl.header
        found = (header.disk_id, header.generation, header.first_seq, header.last_seq)
        expected = (self.config.id, entry.generation, entry.first_seq, entry.last_seq)
        if found != expected:
            raise MalformedError(
                f"inbox file {entry.path.name} must hold disk {expected[0]} generation "
                f"{expected[1]} seqs {expected[2]}..{expected[3]}, found disk {found[0]} "
                f"generation {found[1]} seqs {found[2]}..{found[3]}"
            )
        with self.disk_lock:
            result = apply_file(self.target, hrl)
            self.target.flush()
        resync_open = (self._record.resync_open or result.resync) and not result.resync_end
        self._store.set_applied(
            self.config.id, entry.end, resync_open=resync_open, now_ns=time.time_ns()
        )
        if self._record.state is not DiskState.REPLICATING:
            # Applying past the marker proves the stream whole again: a paused
            # target took the file, or the file after a quarantined one came.
            self._store.set_state(self.config.id, DiskState.REPLICATING, "", now_ns=time.time_ns())
        self._inbox.remove(entry)
        return result

    def _applied(self, entry: InboxEntry, result: ApplyResult, seconds: float) -> None:
        self._record = self._store.disk(self.config.id)
        self._pending.remove(entry)
        self._retry_s = RETRY_FIRST_S
        disk_id = self.config.id
        self._metrics.files_applied.labels(disk_id).inc()
        self._metrics.bytes_applied.labels(disk_id).inc(result.write_bytes)
        self._metrics.bytes_zeroed.labels(disk_id).inc(result.zero_bytes)
        self._metrics.apply_seconds.labels(disk_id).observe(seconds)
        self._publish()

    def _quarantine(self, entry: InboxEntry, exc: ProtocolError) -> None:
        reason = f"{exc.code}: {exc.message}"
        where = self._inbox.quarantine(self.config.id, entry, reason, now_ns=time.time_ns())
        log.error(
            "disk %s: quarantined %s (%s); the disk needs a resync or the file sent again",
            self.config.id, where, reason,
        )  # fmt: skip
        self._metrics.quarantined.labels(self.config.id, exc.code).inc()
        self._metrics.errors.labels(exc.code).inc()
        self._store.set_state(
            self.config.id, DiskState.RESYNC_REQUIRED,
            f"seqs {entry.first_seq}..{entry.last_seq} of generation {entry.generation} "
            f"failed verification ({reason}); quarantined as {where}",
            now_ns=time.time_ns(),
        )  # fmt: skip
        self._record = self._store.disk(self.config.id)
        self._pending.remove(entry)
        # The stream now ends where it was applied: the quarantined seqs must come again.
        self.received = self._record.applied
        self._advance_received()
        self._publish()

    async def _pause(self, entry: InboxEntry, exc: DiskError | DurabilityError) -> None:
        disk_id = self.config.id
        error = (
            f"applying seqs {entry.first_seq}..{entry.last_seq} failed: {exc.message}; "
            f"applying the whole file again in {self._retry_s:.0f} s"
        )
        log.error("disk %s: %s", disk_id, error)
        self._metrics.errors.labels(exc.code).inc()
        self._metrics.apply_retries.labels(disk_id).inc()
        try:
            self._store.set_state(disk_id, DiskState.PAUSED, error, now_ns=time.time_ns())
            self._record = self._store.disk(disk_id)
        except DurabilityError as store_exc:  # the state is only a report; keep retrying
            log.error("disk %s: cannot record the paused state: %s", disk_id, store_exc.message)
        self._publish()
        self._wake.clear()
        with contextlib.suppress(TimeoutError):  # woken early by stop()
            await asyncio.wait_for(self._wake.wait(), timeout=self._retry_s)
        self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)

    async def stop(self) -> None:
        """Ask the applier to stop after the file in hand (the caller awaits its task)."""
        self._stopping = True
        self._wake.set()

    # --- reporting -------------------------------------------------------------------

    def status(self) -> ReplicaStatus:
        oldest = min((e.stored_ns for e in self._pending), default=None)
        return ReplicaStatus(
            disk_id=self.config.id,
            received=self.received,
            applied=self._record.applied,
            state=self._record.state,
            last_error=self._record.last_error,
            resync_open=self._record.resync_open,
            target_size=self.target.size,
            inbox_files=len(self._pending),
            inbox_bytes=self.inbox_bytes(),
            oldest_ns=oldest,
        )

    def _publish(self) -> None:
        disk_id = self.config.id
        m = self._metrics
        m.inbox_files.labels(disk_id).set(len(self._pending))
        m.inbox_bytes.labels(disk_id).set(self.inbox_bytes())
        oldest = min((e.stored_ns for e in self._pending), default=None)
        m.inbox_oldest_age.labels(disk_id).set(
            0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)
        )
        m.applied_seq.labels(disk_id).set(self._record.applied.seq)
        m.received_seq.labels(disk_id).set(self.received.seq)
        m.target_bytes.labels(disk_id).set(self.target.size)
        m.set_state(disk_id, self._record.state)
