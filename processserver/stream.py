"""One disk's stream at the process server: its position and its cached files,
and the only code that changes either.

Every change of a disk's position is one named operation of
:class:`DiskStream`, and each writes what it must, in the order docs/design.md
invariant 1 and crash-safe checklist item 3 ask, before anything relies on
the new position:

- :meth:`~DiskStream.take` places a batch (protocol/sequencing.py): a
  duplicate is acknowledged and dropped, a gap or an overlap is refused
  naming the seq expected, an older generation is refused naming the current
  one. A batch that comes next is sealed on the executor and handed to the
  group committer with the position it reaches; only once its file, the
  file's directory and that position are fsynced does the position move
  and the batch count as acknowledged;
- :meth:`~DiskStream.shipped`, :meth:`~DiskStream.drop_held` and
  :meth:`~DiskStream.drop_older` delete cached files the master target
  holds (or that can never be whole) and move ``shipped_seq``, in memory
  only: a crash that loses the delete or the move makes the file be sent
  again, and the master target answers "duplicate" (processserver/cache.py);
- :meth:`~DiskStream.require_resync`, :meth:`~DiskStream.follow` (the
  master target's position) and :meth:`~DiskStream.start_generation` commit
  the new position to the database first, then move it in memory;
- :meth:`~DiskStream.fail_over` stops the disk's shipping (not kept across
  a restart: the master target refuses the next file again).

The moves themselves are pure methods of
:class:`~processserver.positions.DiskPosition`. One change of a disk's
position runs at a time, in the order it is written, so the database never
takes an older position over a newer one.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from processserver.cache import Cache, CachedFile, ScanResult
from processserver.committer import GroupCommitter
from processserver.metrics import ProcessServerMetrics
from processserver.positions import DiskPosition, PositionStore
from processserver.sealers import Sealers
from protocol.batch import Batch
from protocol.sequencing import Admission, Fit, StreamPosition, admit
from runtime.inorder import InOrder

log = logging.getLogger("blockrepl.processserver")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of one batch."""

    admission: Admission
    #: the disk's acknowledged position afterwards
    acked: StreamPosition


@dataclass(frozen=True, slots=True)
class StreamParts:
    """What every disk's stream works with, shared by all the disks of a process server."""

    cache: Cache
    positions: PositionStore
    committer: GroupCommitter
    sealers: Sealers
    #: runs the blocking work: sealing, deletes, position commits
    executor: Executor
    metrics: ProcessServerMetrics


class DiskStream:
    """One disk's position and cached files (see the module's text).

    Build one with :meth:`recover` at start-up.
    """

    def __init__(
        self, disk_id: str, position: DiskPosition, cached: Iterable[CachedFile], parts: StreamParts
    ) -> None:
        self.disk_id = disk_id
        self._parts = parts
        self._position = position
        #: set (and replaced) whenever the position changes: wakes long polls
        self._moved = asyncio.Event()
        #: the disk's requests: one places its batches at a time (admission and
        #: commit must not interleave; the data API holds the lock for a
        #: request's whole body), and in seq order when several are in flight
        self.requests = InOrder()
        self.request_lock = self.requests.lock
        #: one change of the position at a time, made durable in its order
        self._changing = asyncio.Lock()
        #: files cached and not yet shipped, oldest first (the shipper's queue)
        self._cached: collections.deque[CachedFile] = collections.deque(cached)
        #: set when a file joins the cache: wakes the disk's shipper
        self._file_cached = asyncio.Event()
        self._failed_over = False
        metrics = parts.metrics
        metrics.sealed_bytes.labels(disk_id)  # the series exists from the start
        metrics.resync_required.labels(disk_id).set(int(position.resync_required))
        metrics.backlog_age.labels(disk_id).set_function(self.backlog_age_s)

    @classmethod
    async def recover(cls, disk_id: str, parts: StreamParts) -> DiskStream:
        """The disk's stream as a restart finds it: every cached file checked (torn or
        corrupt ones quarantined, and then the disk needs a resync), the position
        the later of the database's and the cache's.

        Raises:
            DurabilityError: the position could not be committed.
            OSError: the disk's cache folder cannot be made or read.
        """
        loop = asyncio.get_running_loop()
        scan, stored = await loop.run_in_executor(parts.executor, _read_back, disk_id, parts)
        for path, reason in scan.quarantined:
            log.error("disk %s: quarantined cached file %s (%s)", disk_id, path, reason)
        end = None
        if scan.files:
            end = StreamPosition(scan.files[-1].generation, scan.files[-1].last_seq)
        position = stored.recovered(end, quarantined=bool(scan.quarantined))
        if scan.quarantined:
            await loop.run_in_executor(parts.executor, parts.positions.put, {disk_id: position})
        return cls(disk_id, position, scan.files, parts)  # shipping resumes where it stopped

    @property
    def position(self) -> DiskPosition:
        """The disk's acknowledged and shipped position."""
        return self._position

    @property
    def cached(self) -> Sequence[CachedFile]:
        """Files cached and not yet shipped, oldest first."""
        return self._cached

    @property
    def failed_over(self) -> bool:
        """The master target failed this disk over: nothing more is shipped for it."""
        return self._failed_over

    @property
    def backlog_bytes(self) -> int:
        """Bytes of the disk's cached files."""
        return sum(f.size for f in self._cached)

    def backlog_age_s(self) -> float:
        """Age of the disk's oldest cached file (0 when none), read at scrape time too."""
        cached = self._cached
        oldest = cached[0].stored_ns if cached else None
        return 0.0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)

    # --- the agent's side ----------------------------------------------------------------

    async def take(self, batch: Batch) -> Verdict:
        """Place one batch; the caller holds :attr:`request_lock`.

        Raises:
            DurabilityError: the group it was in failed; it is not acknowledged.
        """
        h = batch.header
        admission = admit(self._position.acked, h.generation, h.first_seq, h.last_seq)
        if admission.fit is not Fit.NEXT:
            return Verdict(admission, self._position.acked)
        parts = self._parts
        loop = asyncio.get_running_loop()
        sealed = await loop.run_in_executor(
            parts.executor, parts.sealers.seal, batch, time.time_ns()
        )
        async with self._changing:
            moved = self._position.stored(StreamPosition(h.generation, h.last_seq))
            # The file, its directory and the position, fsynced (invariant 1).
            cached = await parts.committer.commit(sealed, moved)
            self._cached.append(cached)
            self._move(moved)
        parts.metrics.sealed_bytes.labels(self.disk_id).inc(cached.size)
        self._file_cached.set()
        return Verdict(admission, moved.acked)

    async def start_generation(self, generation: int) -> None:
        """Start the newer ``generation`` at seq 0, durably; the caller holds
        :attr:`request_lock` and checked that it is newer."""
        async with self._changing:
            await self._commit(self._position.new_generation(generation))
        log.info("disk %s: generation %d started", self.disk_id, generation)

    async def follow(self, there: StreamPosition) -> bool:
        """Take the master target's position ``there`` if it is past this one and
        nothing of the disk is cached (durably); the caller holds :attr:`request_lock`.

        Returns:
            True if the position moved.
        """
        async with self._changing:
            moved = self._position.following(there, cached=bool(self._cached))
            if moved is None:
                return False
            await self._commit(moved)
        log.info(
            "disk %s: took the master target's position, generation %d seq %d",
            self.disk_id,
            there.generation,
            there.seq,
        )
        return True

    async def wait_shipped(self, seq: int, timeout_s: float) -> None:
        """Until the master target holds ``seq`` of the current generation, the
        generation changes, a resync is required, or ``timeout_s`` passed."""
        generation = self._position.acked.generation
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (
            self._position.acked.generation == generation
            and self._position.shipped_seq < seq
            and not self._position.resync_required
        ):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._moved.wait(), remaining)
            except TimeoutError:
                return

    # --- the master target's side --------------------------------------------------------

    async def next_to_ship(self, after: int = 0) -> CachedFile:
        """The oldest cached file past the first ``after`` (those in flight), once
        there is one and the disk is not failed over."""
        while len(self._cached) <= after or self._failed_over:
            self._file_cached.clear()
            await self._file_cached.wait()
        return self._cached[after]

    async def shipped(self, files: Sequence[CachedFile]) -> None:
        """The master target holds ``files``, the oldest cached: delete them (one
        trip to the executor for all), move ``shipped_seq``."""
        async with self._changing:
            await self._release(files)

    async def drop_held(self, count: int) -> None:
        """Drop the ``count`` oldest cached files, which the master target holds already."""
        await self._drop_oldest(count)

    async def drop_older(self, count: int) -> None:
        """Drop the ``count`` oldest cached files, of older generations than the master
        target's (or than the agent's, after a break): they can never be whole."""
        await self._drop_oldest(count)

    async def require_resync(self) -> None:
        """Mark the disk resync-required, durably; the agent reads it from the state."""
        async with self._changing:
            if not self._position.resync_required:
                await self._commit(self._position.needing_resync())

    def fail_over(self) -> None:
        """The master target failed the disk over: ship nothing more of it."""
        self._failed_over = True

    # --- the moves -----------------------------------------------------------------------

    async def _drop_oldest(self, count: int) -> None:
        async with self._changing:
            await self._release(list(itertools.islice(self._cached, count)))

    async def _release(self, files: Sequence[CachedFile]) -> None:
        """Delete files the master target holds, the oldest cached; the caller
        holds ``_changing``."""
        if not files:
            return
        parts = self._parts
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(parts.executor, _remove_all, parts.cache, files)
        for file in files:
            if self._cached and self._cached[0] is file:
                self._cached.popleft()
        last = files[-1]
        self._move(self._position.shipped(last.generation, last.last_seq))

    async def _commit(self, moved: DiskPosition) -> None:
        """Commit ``moved`` to the database, then take it; the caller holds ``_changing``.

        Raises:
            DurabilityError: the commit failed; the position stays.
        """
        parts = self._parts
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(parts.executor, parts.positions.put, {self.disk_id: moved})
        self._move(moved)
        parts.metrics.resync_required.labels(self.disk_id).set(int(moved.resync_required))

    def _move(self, moved: DiskPosition) -> None:
        self._position = moved
        self._moved.set()
        self._moved = asyncio.Event()


def _remove_all(cache: Cache, files: Sequence[CachedFile]) -> None:
    for file in files:
        cache.remove(file)


def _read_back(disk_id: str, parts: StreamParts) -> tuple[ScanResult, DiskPosition]:
    """The disk's cached files, checked, and its position in the database (blocking)."""
    return parts.cache.scan(disk_id), parts.positions.get(disk_id)
