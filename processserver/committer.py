"""Group commit: batches of many requests share one round of fsyncs.

A request hands its sealed HRL file and the disk position it reaches to
:meth:`GroupCommitter.commit` and waits. While one group is being made
durable on the executor, new submissions gather; the next group takes all of
them. A group is durable when every file was fsynced and renamed, each
directory that gained a file was fsynced once, and the new positions were
committed to the position database: only then is any request of it
answered (docs/design.md invariant 1). If any step fails, every request of the
group fails (503) and none is acknowledged.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass

from processserver.cache import Cache, CachedFile
from processserver.positions import DiskPosition, PositionStore
from protocol.hrl import SealedHrl


@dataclass(frozen=True, slots=True)
class _Submission:
    sealed: SealedHrl
    position: DiskPosition
    done: asyncio.Future[CachedFile]


class GroupCommitter:
    """Makes sealed files and their positions durable in groups.

    Args:
        cache: where the files go.
        positions: where the positions go.
        executor: runs the blocking writes and fsyncs.
    """

    def __init__(self, cache: Cache, positions: PositionStore, executor: Executor) -> None:
        self._cache = cache
        self._positions = positions
        self._executor = executor
        self._waiting: list[_Submission] = []
        self._running: asyncio.Task[None] | None = None
        #: groups committed, and files in them (for the group-size metric)
        self.groups = 0
        self.files = 0

    async def commit(self, sealed: SealedHrl, position: DiskPosition) -> CachedFile:
        """Wait until ``sealed`` and ``position`` are durable.

        Raises:
            DurabilityError: the group failed; nothing of it may be acknowledged.
        """
        loop = asyncio.get_running_loop()
        submission = _Submission(sealed, position, loop.create_future())
        self._waiting.append(submission)
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._drain())
        return await submission.done

    async def close(self) -> None:
        """Wait until the group being written, and any queued behind it, is done:
        its writes and fsyncs then no longer run on the executor."""
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            group, self._waiting = self._waiting, []
            try:
                stored = await loop.run_in_executor(self._executor, self._write, group)
            except Exception as exc:
                for submission in group:
                    if not submission.done.done():
                        submission.done.set_exception(exc)
                continue
            self.groups += 1
            self.files += len(group)
            for submission, cached in zip(group, stored, strict=True):
                if not submission.done.done():
                    submission.done.set_result(cached)

    def _write(self, group: list[_Submission]) -> list[CachedFile]:
        stored = self._cache.store_group(s.sealed for s in group)
        latest: dict[str, DiskPosition] = {}
        for submission in group:  # the last of a disk in the group is its newest
            latest[submission.sealed.header.disk_id] = submission.position
        self._positions.put(latest)
        return stored
