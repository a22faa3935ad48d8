"""The history of one disk: its recovery points, recover, failover and pruning.

Everything here reads or writes the catalog (mastertarget/state.py) or the
retention journal, so everything runs on executor threads; the event loop
only waits. A recover copies the target under its lock (a whole group or
none of it) and rolls the copy back without holding anything; a failover
suspends the applier (the group in hand ends first) and rolls the target
itself back; pruning forgets the points past the window and deletes the undo
data only they needed (mastertarget/retention.py).

History is kept while it is in use: :meth:`DiskHistory.keeping_history`
holds pruning off — and waits for a prune under way to end — while a point
is chosen and the disk recovered or failed over at it, so the undo data of a
chosen point is never deleted from under it.

Threads: the counts of who keeps history, the prune lock and
``pruned_early`` are owned by the event loop. The executor jobs get the
catalog, the journal and the target (under its lock) and return their
result. A job that changes the target or the catalog is waited for to its
end even when its caller is cancelled: what the caller holds (the applier
suspended, pruning held off) must outlast it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Final, TypeVar

from mastertarget.admin_answers import points_listing
from mastertarget.applying import DiskApplier
from mastertarget.errors import DiskError
from mastertarget.guarded_target import GuardedTarget
from mastertarget.journal import UndoJournal
from mastertarget.points import RecoveryPoint
from mastertarget.receiving import DiskReceiver
from mastertarget.recovery import (
    OutputFormat,
    Progress,
    RecoverResult,
    failover_in_place,
    recover_copy,
)
from mastertarget.retention import Cutoff, choose_cutoff, point_age_ns
from mastertarget.state import StateStore
from protocol.admin_api import PointsListing
from protocol.sequencing import StreamPosition

T = TypeVar("T")

#: Points read per query while looking for the start of the window: in
#: steady state only the few that expired since the last round are read.
PRUNE_SCAN_POINTS: Final = 1000


class DiskHistory:
    """The recovery points of one disk and what is done with them.

    Args:
        disk_id: the disk.
        target: its target.
        store: the catalog.
        journal: the retention journal; None keeps no history (no points to
            go back to).
        executor: runs every catalog, journal and target call.
        applier: suspended during a failover, and told the record after it.
        receiver: its waiting files go after a failover.
    """

    def __init__(
        self,
        disk_id: str,
        target: GuardedTarget,
        *,
        store: StateStore,
        journal: UndoJournal | None,
        executor: Executor,
        applier: DiskApplier,
        receiver: DiskReceiver,
    ) -> None:
        self.disk_id = disk_id
        self._target = target
        self._store = store
        self._journal = journal
        self._executor = executor
        self._applier = applier
        self._receiver = receiver
        #: history was given up before its time since the window was last whole
        self.pruned_early = False
        #: holders of keeping_history(): no prune starts meanwhile
        self._keepers = 0
        #: held by a prune under way
        self._prune_lock = asyncio.Lock()

    async def points(self) -> list[RecoveryPoint]:
        """Every recovery point of the disk in the catalog, oldest first."""
        return await self._run(lambda: self._store.points(self.disk_id))

    async def listing(self, limit: int) -> PointsListing:
        """The window and the ``limit`` newest consistent points (``GET .../points``)."""
        return await self._run(lambda: points_listing(self._store, self.disk_id, limit))

    @contextlib.asynccontextmanager
    async def keeping_history(self) -> AsyncIterator[None]:
        """Pruning waits meanwhile: a recover needs the undo data after its point,
        and a group recover needs it on every disk until the last is copied."""
        self._keepers += 1
        try:
            async with self._prune_lock:  # a prune under way ends first
                pass
            yield
        finally:
            self._keepers -= 1

    async def recover(
        self, point: RecoveryPoint, output: Path, output_format: OutputFormat
    ) -> RecoverResult:
        """Write the disk as of ``point`` to ``output`` while replication goes on.

        Choose ``point`` inside :meth:`keeping_history`, or pruning may take
        its undo data between the choice and the copy.

        Raises:
            DiskError: no journal is kept, or the output cannot be made.
            ProtocolError, DurabilityError: the journal is damaged.
        """
        self._require_journal()
        async with self.keeping_history():
            return await self._to_the_end(lambda: self.copy_at(point, output, output_format))

    def copy_at(
        self,
        point: RecoveryPoint,
        output: Path,
        output_format: OutputFormat,
        progress: Progress | None = None,
    ) -> RecoverResult:
        """:meth:`recover`, blocking: on an executor thread, inside keeping_history()."""
        return recover_copy(
            target=self._target,
            journal=self._require_journal(),
            store=self._store,
            point=point,
            output=output,
            output_format=output_format,
            progress=progress,
        )

    async def failover(self, point: RecoveryPoint) -> RecoverResult:
        """Stop applying, roll the target back to ``point`` in place, refuse later files.

        Raises:
            DiskError: no journal is kept.
            ProtocolError, DurabilityError, DiskIOError: the rollback failed;
                the disk is left as the catalog then says.
        """
        journal = self._require_journal()

        def roll_back() -> RecoverResult:
            with self._target.hold() as disk:
                return failover_in_place(
                    target=disk, journal=journal, store=self._store, point=point
                )

        async with self.keeping_history(), self._applier.suspended():
            try:
                result = await self._to_the_end(roll_back)
            finally:
                # Done, failed part-way or cancelled: the applier goes on from
                # what the catalog now says.
                record = await self._to_the_end(lambda: self._store.disk(self.disk_id))
                self._applier.installed(record)
            await self._receiver.reset(record.applied)
        return result

    async def prune(self, *, now_ns: int, window_s: float, over_high_water: bool) -> Cutoff | None:
        """Forget points older than the window (or more, over the high-water
        mark) and delete the undo data only they needed."""
        if self._journal is None or self._keepers:
            return None
        journal = self._journal

        def run() -> Cutoff | None:
            total = self._store.point_count(self.disk_id)
            head: list[RecoveryPoint] = []
            window_ns = int(window_s * 1e9)
            while len(head) < total:  # read the oldest, a batch at a time, up to the window
                batch = self._store.oldest_points(self.disk_id, len(head), PRUNE_SCAN_POINTS)
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
                head[keep]
                if keep < len(head)
                else self._store.oldest_points(self.disk_id, keep, 1)[0]
            )
            position = StreamPosition(first.generation, first.seq)
            for part in self._store.prune(self.disk_id, position):
                journal.remove_part(self.disk_id, part)
            return Cutoff(position, expired, keep - expired)

        async with self._prune_lock:
            cutoff = await self._to_the_end(run)
        if cutoff is not None:
            if cutoff.early:
                self.pruned_early = True
            self._applier.resume()  # a disk paused on a full retention volume may go on
        return cutoff

    def shortfall_s(self, window_s: float, target_s: float) -> float:
        """How much of the window ``target_s`` was given up early, now that the
        oldest consistent point is ``window_s`` old (0 once it is whole again)."""
        if window_s >= target_s:
            self.pruned_early = False
        return target_s - window_s if self.pruned_early else 0.0

    def _require_journal(self) -> UndoJournal:
        if self._journal is None:
            raise DiskError(
                f"disk {self.disk_id} keeps no retention journal: it has no points to go back to"
            )
        return self._journal

    def _run(self, job: Callable[[], T]) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._executor, job)

    async def _to_the_end(self, job: Callable[[], T]) -> T:
        """``job`` on the executor; a caller cancelled meanwhile still waits for it to end."""
        future = self._run(job)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise
