"""The applying side of one disk: received files, in stream order, onto the target.

Disks apply in parallel on the executor's threads (AES-GCM, zstd and pwrite
release the GIL). For a group of files the applier:

1. verifies each whole ahead of time (protocol/hrl.py ``open_hrl``) and checks
   its header against its place in the stream;
2. makes the before-images of each segment durable in the retention journal
   before the segment's first write (docs/design.md invariant 3);
3. applies the records in order (mastertarget/apply.py) and flushes the
   target once;
4. commits the applied marker, the group's recovery points, its undo index
   and, when it changes, the disk's state in one transaction (crash-safe
   checklist item 7);
5. unlinks the inbox files.

A crash anywhere re-applies the group at start-up: writes are absolute, so
applying a file twice leaves what applying it once does (invariant 2). A file
that fails verification is quarantined and the disk goes ``resync-required``;
a target error pauses the disk and the group is applied again, whole, after
a back-off (checklist item 4). Which state and which wait: the pure policy
of mastertarget/apply_policy.py.

Threads. Owned by the event loop: the disk's record (applied position,
state, error, open resync), the policy, the verifications in flight, the
suspensions and the events. The executor jobs (verify, apply a group,
quarantine, record a pause, open the target again) read only what never
changes (the disk id, the key ring, the target's size) or what they are
handed as arguments, and return what changed; the loop installs it. The
target is reached only under its lock (mastertarget/guarded_target.py), and
no catalog read or write happens on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from mastertarget import apply_policy
from mastertarget.apply import ApplyResult, apply_segment, plan_file
from mastertarget.apply_policy import ApplyPolicy, Pause
from mastertarget.errors import DiskError
from mastertarget.guarded_target import GuardedTarget
from mastertarget.inbox import Inbox, InboxEntry
from mastertarget.journal import UndoJournal, UndoPart
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.points import RecoveryPoint
from mastertarget.receiving import DiskReceiver
from mastertarget.state import DiskRecord, DiskState, StateStore
from mastertarget.verifying import BadHead, Group, VerifiedAhead
from protocol.errors import ProtocolError
from protocol.keyring import KeyRing
from protocol.sequencing import StreamPosition
from runtime.crashpoints import crash_point
from runtime.errors import DurabilityError

log = logging.getLogger("blockrepl.mastertarget.apply")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Applied:
    """What an applied group hands back to the loop."""

    results: list[ApplyResult]
    points: list[RecoveryPoint]
    record: DiskRecord


class DiskApplier:
    """Applies one disk's received files until :meth:`stop`.

    Args:
        record: the disk's record as the catalog holds it.
        target: the disk's target.
        receiver: where the files to apply wait.
        store, inbox, keyring, metrics, executor: the daemon's.
        journal: the retention journal; None keeps no history.
        wake: set when there may be work (a file stored, a stop).
        on_points: told of the consistent points of every applied group.
    """

    def __init__(
        self,
        record: DiskRecord,
        target: GuardedTarget,
        *,
        receiver: DiskReceiver,
        store: StateStore,
        inbox: Inbox,
        keyring: KeyRing,
        metrics: MasterTargetMetrics,
        executor: Executor,
        journal: UndoJournal | None,
        wake: asyncio.Event,
        on_points: Callable[[list[RecoveryPoint]], None] | None = None,
    ) -> None:
        self.disk_id = record.disk_id
        self._record = record
        self._target = target
        self._receiver = receiver
        self._store = store
        self._inbox = inbox
        self._metrics = metrics
        self._executor = executor
        self._journal = journal
        self._wake = wake
        self._on_points = on_points
        self._policy = ApplyPolicy()
        self._ahead = VerifiedAhead(
            self.disk_id, keyring=keyring, target_size=target.size, executor=executor
        )
        #: ends a pause early: set by stop() and when pruning freed retention
        #: space (a new file arriving does not: the fault is still there)
        self._resume = asyncio.Event()
        self._progress = asyncio.Condition()
        self._stopping = False
        #: holders of suspended(): nothing is applied meanwhile
        self._suspended = 0
        #: an executor job that changes the disk or its record is running
        self._changing = False
        self._unchanged = asyncio.Event()
        self._unchanged.set()
        self._bound = _BoundMetrics(metrics, self.disk_id)
        self._publish()

    @property
    def record(self) -> DiskRecord:
        """The disk's applied position, state and error, as last committed."""
        return self._record

    async def run(self) -> None:
        """Apply files in stream order until :meth:`stop`.

        Verification runs ahead of applying (mastertarget/verifying.py): the
        files whose verification is done when a group starts are applied
        together, with one flush and one marker commit.
        """
        try:
            while not self._stopping:
                if self._receiver.head() is None or not self._may_apply():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._ahead.start(self._receiver.queued())
                verdict = await self._ahead.group(self._receiver.queued(), self._record.applied)
                if self._stopping or not self._may_apply():
                    continue  # a failover began while the files were verified
                if isinstance(verdict, BadHead):
                    await self._changes(self._quarantine(verdict.entry, verdict.error))
                elif verdict:
                    await self._apply(verdict)
        finally:
            await self._ahead.drain()  # let threads finish before files close

    def stop(self) -> None:
        """Ask the applier to stop after the group in hand (the caller awaits its task)."""
        self._stopping = True
        self._wake.set()
        self._resume.set()

    def resume(self) -> None:
        """Cut a pause short: retention space was freed, the next try may pass."""
        self._resume.set()

    async def wait_applied(self, position: StreamPosition) -> None:
        """Return once ``position`` (or a later one) is applied and marked."""
        async with self._progress:
            await self._progress.wait_for(lambda: self._record.applied >= position)

    @contextlib.asynccontextmanager
    async def suspended(self) -> AsyncIterator[None]:
        """Nothing is applied while the block runs; it starts once the group in hand is done."""
        self._suspended += 1
        try:
            while self._changing:
                await self._unchanged.wait()
            yield
        finally:
            self._suspended -= 1
            self._wake.set()

    def installed(self, record: DiskRecord) -> None:
        """The disk's record after someone else changed it while the applier was
        suspended (a failover rolled it back)."""
        self._record = record
        self._publish()

    # --- the steps -------------------------------------------------------------------

    def _may_apply(self) -> bool:
        return self._policy.may_apply(self._record.state, suspended=self._suspended > 0)

    async def _changes(self, job: Awaitable[T]) -> T:
        """Run a step that changes the disk or its record; suspended() waits for it.

        Called with no await since the last _may_apply() check (or since the
        step before ended), so no suspension can begin in between.
        """
        self._changing = True
        self._unchanged.clear()
        try:
            return await job
        finally:
            self._changing = False
            self._unchanged.set()

    def _run(self, job: Callable[[], T]) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._executor, job)

    async def _apply(self, group: Group) -> None:
        """Apply a group, or pause on a target error and wait out the back-off."""
        record = self._record
        state = self._policy.state_after_apply(record.state)
        started = time.monotonic()
        # From now on a stop, or room made on the retention volume, cuts the
        # wait after a failure short, even one that comes while the group runs.
        self._resume.clear()
        try:
            applied = await self._changes(self._apply_job(group, record, state))
        except (DiskError, DurabilityError) as exc:
            pause = self._policy.target_failed(
                group[0][0].first_seq, group[-1][0].last_seq, exc.message
            )
            log.error("disk %s: %s", self.disk_id, pause.transition.error)
            self._metrics.errors.labels(exc.code).inc()
            self._metrics.apply_retries.labels(self.disk_id).inc()
            await self._changes(self._record_pause(pause))
            await self._wait_out(pause)
            return
        entries = [entry for entry, _ in group]
        self._ahead.forget(entries)
        self._record = applied.record
        self._policy.applied()
        m = self._bound
        m.files_applied.inc(len(group))
        m.bytes_applied.inc(sum(r.write_bytes for r in applied.results))
        m.bytes_zeroed.inc(sum(r.zero_bytes for r in applied.results))
        for _ in group:
            m.apply_seconds.observe(time.monotonic() - started)
        self._publish()
        await self._receiver.applied_through(entries, applied.record.applied)
        if self._on_points is not None:
            self._on_points([p for p in applied.points if p.consistent])
        async with self._progress:
            self._progress.notify_all()

    async def _apply_job(
        self, group: Group, record: DiskRecord, state: DiskState | None
    ) -> _Applied:
        if self._policy.reopen_target:
            await self._run(self._target.reopen)
            self._policy.reopened()
            log.info("disk %s: target %s opened again", self.disk_id, self._target.path)
        return await self._run(lambda: self._apply_group(group, record, state))

    def _apply_group(self, group: Group, record: DiskRecord, state: DiskState | None) -> _Applied:
        """Journal, apply, flush once, mark once (blocking; on an executor thread).

        Each segment's before-images are durable in the journal before its
        first write is issued (docs/design.md invariant 3); the marker, the new
        points, the undo index and the state commit together after the flush.
        """
        now = time.time_ns()
        resync_open = record.resync_open
        points: list[RecoveryPoint] = []
        undo: list[UndoPart] = []
        results: list[ApplyResult] = []
        with self._target.hold() as target:
            for _, hrl in group:
                plan = plan_file(hrl, resync_open_before=resync_open, applied_ns=now)
                plaintext = memoryview(hrl.plaintext)
                for segment in plan.segments:
                    if self._journal is not None:
                        undo.append(
                            self._journal.capture_or_reuse(
                                self.disk_id,
                                target,
                                segment,
                                generation=hrl.header.generation,
                                capture_ns=hrl.header.last_capture_ns,
                            )
                        )
                    results.append(apply_segment(target, plaintext, segment))
                    crash_point("target-written")
                points.extend(plan.points)
                resync_open = plan.resync_open_after
            target.flush()
            crash_point("target-flushed")
            # Inside the lock: a recover copying the target sees the catalog
            # that describes exactly what the target holds.
            applied = group[-1][0].end
            self._store.record_applied(
                self.disk_id,
                applied,
                resync_open=resync_open,
                points=points,
                undo=undo,
                now_ns=now,
                state=state,
            )
            crash_point("marker-committed")
        for entry, _ in group:
            self._inbox.remove(entry)
        if state is not None:
            record = dataclasses.replace(record, state=state, last_error="")
        return _Applied(
            results, points, dataclasses.replace(record, applied=applied, resync_open=resync_open)
        )

    async def _quarantine(self, entry: InboxEntry, exc: ProtocolError) -> None:
        """Move a file that failed verification aside; the disk needs a resync."""
        reason = f"{exc.code}: {exc.message}"
        where = await self._run(
            lambda: self._inbox.quarantine(self.disk_id, entry, reason, now_ns=time.time_ns())
        )
        log.error(
            "disk %s: quarantined %s (%s); the disk needs a resync or the file sent again",
            self.disk_id,
            where,
            reason,
        )
        self._metrics.quarantined.labels(self.disk_id, exc.code).inc()
        self._metrics.errors.labels(exc.code).inc()
        change = apply_policy.quarantined(
            entry.generation, entry.first_seq, entry.last_seq, reason, str(where)
        )
        await self._run(
            lambda: self._store.set_state(
                self.disk_id, change.state, change.error, now_ns=time.time_ns()
            )
        )
        self._record = dataclasses.replace(
            self._record, state=change.state, last_error=change.error
        )
        self._publish()
        # The stream now ends where it was applied: the quarantined seqs must come again.
        await self._receiver.quarantined(entry, self._record.applied)

    async def _record_pause(self, pause: Pause) -> None:
        change = pause.transition
        try:
            await self._run(
                lambda: self._store.set_state(
                    self.disk_id, change.state, change.error, now_ns=time.time_ns()
                )
            )
        except DurabilityError as exc:  # the state is only a report; keep retrying
            log.error("disk %s: cannot record the paused state: %s", self.disk_id, exc.message)
        else:
            self._record = dataclasses.replace(
                self._record, state=change.state, last_error=change.error
            )
        self._publish()

    async def _wait_out(self, pause: Pause) -> None:
        """Wait the pause's back-off, or until stop() or resume() cut it short."""
        try:
            await asyncio.wait_for(self._resume.wait(), timeout=pause.wait_s)
        except TimeoutError:
            self._policy.waited(cut_short=False)
        else:
            self._policy.waited(cut_short=True)

    def _publish(self) -> None:
        self._bound.applied_seq.set(self._record.applied.seq)
        self._metrics.set_state(self.disk_id, self._record.state)


class _BoundMetrics:
    """The applier's per-disk children of the metrics, looked up once."""

    def __init__(self, metrics: MasterTargetMetrics, disk_id: str) -> None:
        self.files_applied = metrics.files_applied.labels(disk_id)
        self.bytes_applied = metrics.bytes_applied.labels(disk_id)
        self.bytes_zeroed = metrics.bytes_zeroed.labels(disk_id)
        self.apply_seconds = metrics.apply_seconds.labels(disk_id)
        self.applied_seq = metrics.applied_seq.labels(disk_id)
