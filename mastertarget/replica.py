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
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mastertarget.apply import ApplyResult, apply_segment, plan_file
from mastertarget.config import DiskConfig
from mastertarget.disks.base import TargetDisk
from mastertarget.errors import DiskError
from mastertarget.inbox import Inbox, InboxEntry
from mastertarget.journal import UndoJournal, UndoPart
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.pending import PendingFiles
from mastertarget.points import RecoveryPoint
from mastertarget.recovery import (
    OutputFormat,
    RecoverResult,
    failover_in_place,
    recover_copy,
)
from mastertarget.retention import Cutoff, choose_cutoff, point_age_ns
from mastertarget.state import DiskRecord, DiskState, StateStore
from protocol.errors import MalformedError, ProtocolError
from protocol.hrl import HrlFile, HrlHeader, open_hrl
from protocol.keyring import KeyRing
from protocol.records import Write, Zero
from protocol.sequencing import Admission, Fit, StreamPosition, admit
from runtime.crashpoints import crash_point
from runtime.errors import DurabilityError

log = logging.getLogger("blockrepl.mastertarget.apply")

#: Bytes of inbox files verified ahead of the one being applied: enough to
#: keep a second core decrypting while the first writes, and small, because
#: a verified file is held in memory: with a wider window every buffer is
#: fresh memory and page faults cost more than the overlap gains (measured
#: with benchmarks/mt_apply_bench.py: 1 MiB 70 %, 4 MiB 74 %, 16 MiB 72 %,
#: 64 MiB 53 % of the limit).
PREFETCH_BYTES: Final = 4 * 2**20
#: Files verified at once: on two cores, three in flight keep one core
#: decrypting while the other writes; more only contend for the GIL and the
#: cores (measured against the limit: 1 file 59 %, 2 files 71 %, 3 files
#: 74 %, about ten 70 % with more spread between runs).
PREFETCH_FILES: Final = 3
#: Most files applied under one flush and one marker commit, and most bytes:
#: a group is re-applied whole after a crash, so it stays small.
MAX_GROUP_FILES: Final = 32
MAX_GROUP_BYTES: Final = 64 * 2**20

#: Points read per query while looking for the start of the window: in
#: steady state only the few that expired since the last round are read.
PRUNE_SCAN_POINTS: Final = 1000

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


class _BoundMetrics:
    """The per-disk children of the metrics, looked up once."""

    def __init__(self, metrics: MasterTargetMetrics, disk_id: str) -> None:
        self.files_applied = metrics.files_applied.labels(disk_id)
        self.bytes_applied = metrics.bytes_applied.labels(disk_id)
        self.bytes_zeroed = metrics.bytes_zeroed.labels(disk_id)
        self.apply_seconds = metrics.apply_seconds.labels(disk_id)
        self.inbox_files = metrics.inbox_files.labels(disk_id)
        self.inbox_bytes = metrics.inbox_bytes.labels(disk_id)
        self.inbox_oldest_age = metrics.inbox_oldest_age.labels(disk_id)
        self.applied_seq = metrics.applied_seq.labels(disk_id)
        self.received_seq = metrics.received_seq.labels(disk_id)
        self.target_bytes = metrics.target_bytes.labels(disk_id)


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
        reopen: Callable[[], TargetDisk],
        journal: UndoJournal | None,
    ) -> None:
        self.config = config
        self.target = target
        self._reopen = reopen
        #: the retention journal; None keeps no history (no recovery points to roll back to)
        self._journal = journal
        #: told of the consistent points of every applied group (the RPO monitor)
        self.on_points: Callable[[list[RecoveryPoint]], None] | None = None
        #: history was given up before its time since the window was last whole
        self.pruned_early = False
        #: recovers in progress: pruning waits, it would delete their undo
        self._recovering = 0
        #: a failover is rolling the target back: apply nothing meanwhile
        self._failing_over = False
        #: the target failed a write or flush: a back-end refuses every change
        #: after that, so it is opened again before the next try
        self._target_failed = False
        self._store = store
        self._inbox = inbox
        self._keyring = keyring
        self._metrics = metrics
        self._executor = executor
        self._record = record
        self._pending = PendingFiles(inbox, record.applied, entries)
        #: one PUT of this disk at a time: admission and store must not interleave
        self.put_lock = asyncio.Lock()
        #: held while a file is applied and while checksums are read, so a
        #: reader never sees half a file
        self.disk_lock = threading.Lock()
        self._wake = asyncio.Event()
        #: ends a pause early: set by stop() and when pruning freed retention
        #: space (a new file arriving does not: the fault is still there)
        self._resume = asyncio.Event()
        self._progress = asyncio.Condition()
        self._stopping = False
        self._retry_s = RETRY_FIRST_S
        self._bound = _BoundMetrics(metrics, config.id)
        # Read at scrape time: an age must grow while nothing happens.
        self._bound.inbox_oldest_age.set_function(self._oldest_age_s)
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
        reopen: Callable[[], TargetDisk],
        journal: UndoJournal | None,
    ) -> DiskReplica:
        """Load the disk's marker and inbox as a crash left them; blocking.

        Args:
            reopen: opens the target again after it failed.
            journal: the retention journal, or None to keep no history.
        """
        inbox.prepare(config.id)
        record = store.disk(config.id)
        if journal is not None:
            journal.prepare(config.id)
            removed = journal.sweep(config.id, record.applied, store.undo_keys(config.id))
            if removed:
                log.info("disk %s: removed %d undo files no point can use", config.id, removed)
        return cls(
            config, target, store=store, inbox=inbox, keyring=keyring, metrics=metrics,
            executor=executor, record=record, entries=inbox.scan(config.id),
            reopen=reopen, journal=journal,
        )  # fmt: skip

    # --- receiving -------------------------------------------------------------------

    @property
    def state(self) -> DiskState:
        return self._record.state

    @property
    def applied(self) -> StreamPosition:
        return self._record.applied

    @property
    def received(self) -> StreamPosition:
        """The last position held durably, in the inbox or applied."""
        return self._pending.received

    def admission(self, generation: int, first_seq: int, last_seq: int) -> Admission:
        """How a file fits after what this disk holds (see protocol/sequencing.py)."""
        return self._pending.admission(generation, first_seq, last_seq)

    def inbox_bytes(self) -> int:
        return self._pending.bytes

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
        self._pending.add(entry, self._record.applied)
        self._metrics.files_received.labels(self.config.id).inc()
        self._metrics.bytes_received.labels(self.config.id).inc(entry.size)
        self._publish()
        self._wake.set()
        return verdict

    # --- applying --------------------------------------------------------------------

    async def run(self) -> None:
        """Apply files in stream order until :meth:`stop`.

        Verification runs ahead of applying: while one group of files is
        written to the target, the next files are decrypted and checked on
        other threads (:data:`PREFETCH_BYTES` of them at most). Files whose
        verification is done when a group starts are applied together, with
        one flush and one marker commit: under load the fsyncs per file fall
        below one, idle the latency stays one file.
        """
        loop = asyncio.get_running_loop()
        opened: dict[Path, asyncio.Future[HrlFile]] = {}
        try:
            while not self._stopping:
                head = self._next_entry()
                if (
                    head is None
                    or self._failing_over
                    or (self._record.state is DiskState.FAILED_OVER)
                ):
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._prefetch(opened, loop)
                group = await self._verified_group(head, opened)
                if not group:
                    continue
                started = time.monotonic()
                try:
                    if self._target_failed:
                        await loop.run_in_executor(self._executor, self._reopen_target)
                    results, points = await loop.run_in_executor(
                        self._executor, self._apply_group, group
                    )
                except (DiskError, DurabilityError) as exc:
                    self._target_failed = True
                    await self._pause(group[0][0], exc)
                    continue
                for entry, _ in group:
                    opened.pop(entry.path, None)
                self._applied(group, results, time.monotonic() - started)
                if self.on_points is not None:
                    self.on_points([p for p in points if p.consistent])
                async with self._progress:
                    self._progress.notify_all()
        finally:
            for future in opened.values():  # let threads finish before files close
                with contextlib.suppress(Exception):
                    await future

    def _next_entry(self) -> InboxEntry | None:
        return self._pending.head(self._record.applied)

    def _prefetch(
        self, opened: dict[Path, asyncio.Future[HrlFile]], loop: asyncio.AbstractEventLoop
    ) -> None:
        """Start verifying the next files: PREFETCH_FILES, PREFETCH_BYTES at most."""
        wanted = set()
        budget = PREFETCH_BYTES
        for entry in self._pending:
            wanted.add(entry.path)
            if entry.path not in opened:
                opened[entry.path] = loop.run_in_executor(self._executor, self._open, entry)
            budget -= entry.size
            if budget <= 0 or len(wanted) >= PREFETCH_FILES:
                break
        for path in [p for p in opened if p not in wanted and opened[p].done()]:
            del opened[path]  # superseded or quarantined meanwhile

    async def _verified_group(
        self, head: InboxEntry, opened: dict[Path, asyncio.Future[HrlFile]]
    ) -> list[tuple[InboxEntry, HrlFile]]:
        """The head file, verified, and the files after it whose verification is done."""
        group: list[tuple[InboxEntry, HrlFile]] = []
        position = self._record.applied
        size = 0
        for entry in list(self._pending)[:MAX_GROUP_FILES]:
            if admit(position, entry.generation, entry.first_seq, entry.last_seq).fit is not (
                Fit.NEXT
            ):
                break
            future = opened.get(entry.path)
            if future is None or (group and not future.done()):
                break
            try:
                hrl = await future
            except ProtocolError as exc:
                opened.pop(entry.path, None)
                if not group:  # the head is bad: quarantine it; later files wait
                    await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._quarantine, entry, exc
                    )
                break
            group.append((entry, hrl))
            position = entry.end
            size += hrl.header.plaintext_len
            if size >= MAX_GROUP_BYTES:
                break
        return group

    def _open(self, entry: InboxEntry) -> HrlFile:
        """Read and verify one inbox file whole (blocking; on an executor thread)."""
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
        # A record past the end can never apply: caught here it is quarantined
        # with its reason, where the target would refuse it at every retry.
        size = self.target.size
        for record in hrl.records:
            if isinstance(record, Write):
                offset, length = record.offset, len(record.data)
            elif isinstance(record, Zero):
                offset, length = record.offset, record.length
            else:
                continue
            if offset + length > size:
                raise MalformedError(
                    f"inbox file {entry.path.name}: expected records inside the {size}-byte "
                    f"target, found one at offset {offset} length {length} "
                    f"(end {offset + length})"
                )
        return hrl

    def _reopen_target(self) -> None:
        """Close the failed target and open it again (blocking)."""
        with self.disk_lock:
            self.target.close()
            self.target = self._reopen()
        self._target_failed = False
        log.info("disk %s: target %s opened again", self.config.id, self.config.target)

    def _apply_group(
        self, group: list[tuple[InboxEntry, HrlFile]]
    ) -> tuple[list[ApplyResult], list[RecoveryPoint]]:
        """Journal, apply, flush once, mark once (blocking; on an executor thread).

        Each segment's before-images are durable in the journal before its
        first write is issued (DESIGN.md invariant 3); the marker, the new
        points and the undo index commit together after the flush.
        """
        now = time.time_ns()
        resync_open = self._record.resync_open
        points: list[RecoveryPoint] = []
        undo: list[UndoPart] = []
        results: list[ApplyResult] = []
        with self.disk_lock:
            for _, hrl in group:
                plan = plan_file(hrl, resync_open_before=resync_open, applied_ns=now)
                plaintext = memoryview(hrl.plaintext)
                for segment in plan.segments:
                    if self._journal is not None:
                        undo.append(
                            self._journal.capture_or_reuse(
                                self.config.id, self.target, segment,
                                generation=hrl.header.generation,
                                capture_ns=hrl.header.last_capture_ns,
                            )
                        )  # fmt: skip
                    results.append(apply_segment(self.target, plaintext, segment))
                    crash_point("target-written")
                points.extend(plan.points)
                resync_open = plan.resync_open_after
            self.target.flush()
            crash_point("target-flushed")
            # Inside the lock: a recover copying the target sees the catalog
            # that describes exactly what the target holds.
            self._store.record_applied(
                self.config.id, group[-1][0].end, resync_open=resync_open, points=points,
                undo=undo, now_ns=now,
            )  # fmt: skip
            crash_point("marker-committed")
        if self._record.state is not DiskState.REPLICATING:
            # Applying past the marker proves the stream whole again: a paused
            # target took the file, or the file after a quarantined one came.
            self._store.set_state(self.config.id, DiskState.REPLICATING, "", now_ns=now)
        for entry, _ in group:
            self._inbox.remove(entry)
        return results, points

    def _applied(
        self, group: list[tuple[InboxEntry, HrlFile]], results: list[ApplyResult], seconds: float
    ) -> None:
        self._record = self._store.disk(self.config.id)
        for entry, _ in group:
            self._pending.remove(entry)
        self._retry_s = RETRY_FIRST_S
        m = self._bound
        m.files_applied.inc(len(group))
        m.bytes_applied.inc(sum(r.write_bytes for r in results))
        m.bytes_zeroed.inc(sum(r.zero_bytes for r in results))
        for _ in group:
            m.apply_seconds.observe(seconds)
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
        self._pending.rewind(self._record.applied)
        self._publish()

    async def _pause(self, entry: InboxEntry, exc: DiskError | DurabilityError) -> None:
        """Record the paused state and wait out the back-off; the group is applied again."""
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
        self._resume.clear()
        try:
            await asyncio.wait_for(self._resume.wait(), timeout=self._retry_s)
        except TimeoutError:
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
        else:  # stopping, or room was made: try again at once, back-off from the start
            self._retry_s = RETRY_FIRST_S

    async def recover(
        self, point: RecoveryPoint, output: Path, output_format: OutputFormat
    ) -> RecoverResult:
        """Write the disk as of ``point`` to ``output`` while replication goes on.

        Raises:
            DiskError: no journal is kept, or the output cannot be made.
            ProtocolError, DurabilityError: the journal is damaged.
        """
        journal = self._require_journal()
        with self.keeping_history():
            return await asyncio.get_running_loop().run_in_executor(
                self._executor,
                lambda: recover_copy(
                    target=self.target, lock=self.disk_lock, journal=journal,
                    store=self._store, point=point, output=output, output_format=output_format,
                ),
            )  # fmt: skip

    @contextlib.contextmanager
    def keeping_history(self) -> Iterator[None]:
        """Pruning waits meanwhile: a recover needs the undo data after its point,
        and a group recover needs it on every disk until the last is copied."""
        self._recovering += 1
        try:
            yield
        finally:
            self._recovering -= 1

    async def failover(self, point: RecoveryPoint) -> RecoverResult:
        """Stop applying, roll the target back to ``point`` in place, refuse later files."""
        journal = self._require_journal()
        self._failing_over = True
        loop = asyncio.get_running_loop()

        def run() -> RecoverResult:
            with self.disk_lock:  # waits for the group in hand
                return failover_in_place(
                    target=self.target, journal=journal, store=self._store, point=point
                )

        try:
            result = await loop.run_in_executor(self._executor, run)
        finally:
            self._failing_over = False
            self._record = self._store.disk(self.config.id)
        self._pending.clear()
        self._pending.rewind(self._record.applied)
        self._publish()
        return result

    async def prune(self, *, now_ns: int, window_s: float, over_high_water: bool) -> Cutoff | None:
        """Forget points older than the window (or more, over the high-water
        mark) and delete the undo data only they needed."""
        if self._journal is None or self._recovering:
            return None
        journal = self._journal

        def run() -> Cutoff | None:
            disk_id = self.config.id
            total = self._store.point_count(disk_id)
            head: list[RecoveryPoint] = []
            window_ns = int(window_s * 1e9)
            while len(head) < total:  # read the oldest, a batch at a time, up to the window
                batch = self._store.oldest_points(disk_id, len(head), PRUNE_SCAN_POINTS)
                head.extend(batch)
                if not batch or point_age_ns(batch[-1], now_ns) <= window_ns:
                    break
            chosen = choose_cutoff(
                head, total, now_ns=now_ns, window_s=window_s, over_high_water=over_high_water
            )
            if chosen is None:
                return None
            keep, expired = chosen
            first = (
                head[keep] if keep < len(head) else self._store.oldest_points(disk_id, keep, 1)[0]
            )
            position = StreamPosition(first.generation, first.seq)
            for part in self._store.prune(disk_id, position):
                journal.remove_part(disk_id, part)
            return Cutoff(position, expired, keep - expired)

        cutoff = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        if cutoff is not None:
            if cutoff.early:
                self.pruned_early = True
            self._resume.set()  # a disk paused on a full retention volume may go on
        return cutoff

    def points(self) -> list[RecoveryPoint]:
        """Every recovery point of the disk in the catalog, oldest first."""
        return self._store.points(self.config.id)

    def _require_journal(self) -> UndoJournal:
        if self._journal is None:
            raise DiskError(
                f"disk {self.config.id} keeps no retention journal: it has no points to go back to"
            )
        return self._journal

    async def wait_applied(self, position: StreamPosition) -> None:
        """Return once ``position`` (or a later one) is applied and marked."""
        async with self._progress:
            await self._progress.wait_for(lambda: self._record.applied >= position)

    async def stop(self) -> None:
        """Ask the applier to stop after the file in hand (the caller awaits its task)."""
        self._stopping = True
        self._wake.set()
        self._resume.set()

    # --- reporting -------------------------------------------------------------------

    def status(self) -> ReplicaStatus:
        oldest = self._pending.oldest_ns
        return ReplicaStatus(
            disk_id=self.config.id,
            received=self.received,
            applied=self._record.applied,
            state=self._record.state,
            last_error=self._record.last_error,
            resync_open=self._record.resync_open,
            target_size=self.target.size,
            inbox_files=len(self._pending),
            inbox_bytes=self._pending.bytes,
            oldest_ns=oldest,
        )

    def _oldest_age_s(self) -> float:
        oldest = self._pending.oldest_ns
        return 0.0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)

    def _publish(self) -> None:
        m = self._bound
        m.inbox_files.set(len(self._pending))
        m.inbox_bytes.set(self.inbox_bytes())
        m.applied_seq.set(self._record.applied.seq)
        m.received_seq.set(self.received.seq)
        m.target_bytes.set(self.target.size)
        self._metrics.set_state(self.config.id, self._record.state)
