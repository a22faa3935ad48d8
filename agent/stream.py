"""One disk's stream from the source to the master target, through the process servers.

This is the client library the agent's commands build on: a producer (a
sync, live capture) hands it records; it gives them seqs, writes each batch
to the journal before it is sent (agent/journal.py), and a sender task
delivers the journal in order::

    producer ─ append() ─▶ journal (durable) ─▶ sender ─ POST batches ─▶ process server
                                 ▲                 │
                                 └── trim ◀── shipped_seq (GET state)

Three modules make it: this one, the stream's life and the producer's side;
agent/backlog.py, what the producer and the sender share (the journal, how
far it is acknowledged, the batches still in memory); agent/sender.py, the
sender and its rules (resending, moving between process servers, trimming
only what the master target holds).

A stream that cannot go on in its generation (a newer generation at the
process server, ``resync_required``, or seqs there that this agent never
journaled) fails with :class:`~agent.errors.StreamBrokenError`; the owner
starts a new generation and resyncs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path

from agent.backlog import Backlog
from agent.errors import StreamBrokenError
from agent.journal import EntryKind, Journal, JournalEntry, encode
from agent.pool import ProcessServerPool
from agent.sender import StreamSender, StreamStats
from agent.source import SourceDisk
from agent.state import AgentState, StreamRecord
from protocol.api import StaleGeneration
from protocol.records import Record, StreamFlags

log = logging.getLogger("blockrepl.agent.stream")


class ReplicationStream:
    """The stream of one disk. Build with :meth:`open`, then :meth:`start` the sender.

    Args:
        disk_id: the disk.
        state: the agent's state database.
        pool: the process servers.
        journal: the disk's journal, as opened for ``record``.
        record: the stream's generation and trimmed seq.
        source: the source disk, for entries that refer to it (may be None
            when every entry is whole).
        executor: threads for journal and state writes and source reads.
    """

    def __init__(
        self,
        disk_id: str,
        *,
        state: AgentState,
        pool: ProcessServerPool,
        journal: Journal,
        record: StreamRecord,
        source: SourceDisk | None,
        executor: Executor,
    ) -> None:
        self.disk_id = disk_id
        self._backlog = Backlog(
            disk_id, state=state, journal=journal, record=record, source=source, executor=executor
        )
        self._sender = StreamSender(self._backlog, pool)

    @classmethod
    def open(
        cls,
        disk_id: str,
        *,
        state: AgentState,
        pool: ProcessServerPool,
        journal_dir: Path,
        source: SourceDisk | None,
        executor: Executor,
    ) -> ReplicationStream | None:
        """The disk's stream as the state database and the journal left it.

        Returns:
            None when the disk has no stream yet (start one with
            :meth:`create`).

        Raises:
            JournalError: the journal does not continue the recorded stream.
        """
        record = state.stream(disk_id)
        if record is None:
            return None
        journal = Journal(journal_dir, generation=record.generation, trimmed_seq=record.trimmed_seq)
        return cls(
            disk_id,
            state=state,
            pool=pool,
            journal=journal,
            record=record,
            source=source,
            executor=executor,
        )

    @classmethod
    async def create(
        cls,
        disk_id: str,
        generation: int,
        *,
        state: AgentState,
        pool: ProcessServerPool,
        journal_dir: Path,
        source: SourceDisk | None,
        executor: Executor,
    ) -> ReplicationStream:
        """Start ``generation`` of the disk's stream at the process server, then here.

        The process server moves first: if the agent dies between the two, its
        next run finds the process server on a generation it does not know of
        and starts a newer one. Every journal entry of older generations is
        removed.

        Raises:
            StreamBrokenError: the process server is on ``generation`` or a newer one.
            ProcessServerUnavailableError, RefusedError: see agent/client.py.
        """
        answer = await pool.call(lambda client: client.start_generation(disk_id, generation))
        if isinstance(answer.outcome, StaleGeneration):
            current = answer.outcome.current_generation
            raise StreamBrokenError(
                f"disk {disk_id}: the process server is on generation {current}, "
                f"not below {generation}",
                details={"current_generation": current},
            )
        record = StreamRecord(generation, 0)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, state.put_stream, disk_id, record)
        journal = await loop.run_in_executor(
            executor, lambda: Journal(journal_dir, generation=generation, trimmed_seq=0)
        )
        log.info("disk %s: generation %d started", disk_id, generation)
        return cls(
            disk_id,
            state=state,
            pool=pool,
            journal=journal,
            record=record,
            source=source,
            executor=executor,
        )

    @classmethod
    async def create_after(
        cls,
        disk_id: str,
        known: int,
        *,
        state: AgentState,
        pool: ProcessServerPool,
        journal_dir: Path,
        source: SourceDisk | None,
        executor: Executor,
    ) -> ReplicationStream:
        """Start a generation above ``known`` (the highest the caller knows of) — or
        above the process server's, if another was started there meanwhile.

        Raises:
            as :meth:`create`.
        """

        async def start(generation: int) -> ReplicationStream:
            return await cls.create(
                disk_id,
                generation,
                state=state,
                pool=pool,
                journal_dir=journal_dir,
                source=source,
                executor=executor,
            )

        try:
            return await start(known + 1)
        except StreamBrokenError as exc:
            current = exc.details.get("current_generation")
            if not isinstance(current, int):
                raise
            return await start(current + 1)

    # --- position ------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._backlog.generation

    @property
    def trimmed_seq(self) -> int:
        """The last seq the master target is known to hold durably."""
        return self._backlog.trimmed_seq

    @property
    def end_seq(self) -> int:
        """The last seq given out: in the journal, or trimmed."""
        return self._backlog.end_seq

    @property
    def acked_seq(self) -> int:
        return self._backlog.acked_seq

    @property
    def stats(self) -> StreamStats:
        """What the sender did."""
        return self._sender.stats

    # --- the producer's side -------------------------------------------------------------

    async def append(
        self,
        records: Sequence[Record],
        *,
        flags: StreamFlags,
        first_capture_ns: int,
        last_capture_ns: int,
        kind: EntryKind = EntryKind.INLINE,
        wait: bool = True,
    ) -> JournalEntry:
        """Give ``records`` the next seqs, journal them as one batch, and queue it.

        ``kind`` is INLINE when the records' data exist nowhere else (live
        capture), SOURCE when every WRITE holds the source's bytes at its
        offset now (a sync). Returns once the entry is durable; with ``wait``,
        waits first while too much is unacknowledged or journaled. Without it
        (live capture bounds its journal itself) nothing waits, and a batch
        above the memory bound is sent from the journal file.

        Raises:
            whatever stopped the sender (StreamBrokenError, ProcessServerUnavailableError, ...).
            MalformedError, LimitExceededError: the records do not make a valid batch.
            DurabilityError: the journal write failed; nothing was queued.
        """
        backlog = self._backlog
        await backlog.wait(lambda: not wait or backlog.has_room)
        batch = encode(
            disk_id=self.disk_id,
            generation=self.generation,
            first_seq=self.end_seq + 1,
            records=records,
            first_capture_ns=first_capture_ns,
            last_capture_ns=last_capture_ns,
            flags=flags,
        )
        return await backlog.append(batch, kind)

    @property
    def has_room(self) -> bool:
        """Whether :meth:`append` would go on without waiting."""
        return self._backlog.has_room

    @property
    def journal_bytes(self) -> int:
        """Bytes of the journal entries not yet at the master target."""
        return self._backlog.journal_bytes

    async def wait_until(self, done: Callable[[], bool]) -> None:
        """Until ``done()`` holds, checked whenever the stream moves (acks, trims, appends).

        Raises:
            whatever stopped the sender.
        """
        await self._backlog.wait(done)

    async def wait_failed(self) -> BaseException:
        """Until the sender stops on an error; that error."""
        return await self._backlog.wait_failed()

    async def wait_acked(self) -> None:
        """Until the process server has acknowledged every journaled batch."""
        await self._backlog.wait(lambda: self._backlog.acked_seq >= self.end_seq)

    async def wait_shipped(self) -> None:
        """Until the master target holds every journaled batch (the journal is empty)."""
        backlog = self._backlog
        backlog.shipped_waiters += 1
        try:
            await backlog.wake()  # a sender idling between polls asks at once
            await backlog.wait(lambda: backlog.shipped)
        finally:
            backlog.shipped_waiters -= 1

    # --- the sender ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender task."""
        self._sender.start()

    async def close(self) -> None:
        """Stop the sender (a request in flight is abandoned; the journal keeps it)."""
        await self._sender.close()

    @property
    def sending(self) -> bool:
        """Whether the sender runs: it stops only when closed or on an error."""
        return self._sender.running
