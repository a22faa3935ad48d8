"""What a disk's stream holds that the master target may not yet: its backlog.

The producer's side of the stream (agent/stream.py) and its sender
(agent/sender.py) share one :class:`Backlog`:

- the journal's entries (agent/journal.py), from the trimmed seq on — the
  last seq the master target is known to hold, kept in the state database;
- how far the process server in use acknowledged them;
- the batches appended and not yet acknowledged, kept in memory up to
  :data:`MAX_UNACKED_BYTES` (their first send needs no journal read);
- the error that stopped the sender, for the producer to raise.

Each side waits for the other on :attr:`Backlog.changed`: every change
notifies it.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Final

from agent.errors import JOURNAL_BEHIND, StreamBrokenError
from agent.journal import EntryKind, Journal, JournalEntry
from agent.source import SourceDisk
from agent.state import AgentState, StreamRecord
from protocol.batch import EncodedBatch
from protocol.reaction import Journaled
from protocol.records import Buffer

#: Bytes of batches held in memory until the process server acknowledges
#: them (their first send needs no journal read); the producer waits above it.
MAX_UNACKED_BYTES: Final = 64 * 2**20
#: Journal bytes (whole batches, as live capture writes them) above which the
#: producer waits for the master target to catch up: the source side's disk
#: is bounded however long a process server is away.
MAX_JOURNAL_BYTES: Final = 4 * 2**30


class Backlog:
    """One disk's journaled batches, how far they are acknowledged, and the sender's error.

    Args:
        disk_id: the disk.
        state: the agent's state database (the trimmed seq is kept there).
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
        journal: Journal,
        record: StreamRecord,
        source: SourceDisk | None,
        executor: Executor,
    ) -> None:
        self.disk_id = disk_id
        self._state = state
        self._journal = journal
        self._record = record
        self._source = source
        self._executor = executor
        #: last seq the process server in use acknowledged (or the trimmed seq)
        self._acked = record.trimmed_seq
        self._unacked: dict[int, list[Buffer]] = {}
        self._unacked_bytes = 0
        #: notified at every change of the above, and when the sender stops
        self.changed = asyncio.Condition()
        self._error: BaseException | None = None
        #: callers waiting for the whole backlog to be shipped: the sender then long-polls
        self.shipped_waiters = 0

    # --- where the stream stands -----------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._record.generation

    @property
    def trimmed_seq(self) -> int:
        """The last seq the master target is known to hold durably."""
        return self._record.trimmed_seq

    @property
    def end_seq(self) -> int:
        """The last seq given out: in the journal, or trimmed."""
        end = self._journal.end_seq
        return self._record.trimmed_seq if end is None else end

    @property
    def acked_seq(self) -> int:
        return self._acked

    @property
    def shipped(self) -> bool:
        """Whether the master target holds every journaled batch (the journal is empty)."""
        return self._journal.end_seq is None

    @property
    def journal_bytes(self) -> int:
        """Bytes of the journal entries not yet at the master target."""
        return self._journal.bytes

    @property
    def has_room(self) -> bool:
        """Whether the producer may append without waiting."""
        return self._unacked_bytes < MAX_UNACKED_BYTES and self._journal.bytes < MAX_JOURNAL_BYTES

    def journaled(self) -> Journaled:
        """What the stream holds, as protocol/reaction.py's decisions see it."""
        return Journaled(self.generation, self.trimmed_seq, self.end_seq)

    def to_send(self, after: int | None = None) -> list[JournalEntry]:
        """The entries that hold seqs past ``after`` (by default, the seqs the process
        server in use has not acknowledged)."""
        seq = self._acked if after is None else after
        entries = self._journal.entries  # in seq order, one after the other
        return entries[bisect.bisect_right(entries, seq, key=lambda e: e.last_seq) :]

    def has_past(self, seq: int) -> bool:
        """Whether an entry holds seqs past ``seq``."""
        entries = self._journal.entries
        return bool(entries) and entries[-1].last_seq > seq

    @property
    def has_to_send(self) -> bool:
        return self.has_past(self._acked)

    # --- the producer ------------------------------------------------------------------------

    async def append(self, batch: EncodedBatch, kind: EntryKind) -> JournalEntry:
        """Journal ``batch`` (durable on return) and keep it for its first send.

        Raises:
            DurabilityError: the journal write failed; nothing was added.
        """
        loop = asyncio.get_running_loop()
        entry = await loop.run_in_executor(self._executor, self._journal.append, batch, kind)
        async with self.changed:
            if self._unacked_bytes < MAX_UNACKED_BYTES:
                self._unacked[entry.first_seq] = batch.segments
                self._unacked_bytes += batch.wire_bytes
            self.changed.notify_all()
        return entry

    async def wait(self, done: Callable[[], bool]) -> None:
        """Until ``done()`` holds, checked at every change.

        Raises:
            whatever stopped the sender.
        """
        async with self.changed:
            await self.changed.wait_for(lambda: self._error is not None or done())
            if self._error is not None:
                raise self._error

    async def wait_failed(self) -> BaseException:
        """Until the sender stops on an error; that error."""
        async with self.changed:
            await self.changed.wait_for(lambda: self._error is not None)
            assert self._error is not None
            return self._error

    async def wake(self) -> None:
        """Wake whoever waits, to look again (a sender idling between polls)."""
        async with self.changed:
            self.changed.notify_all()

    # --- the sender ----------------------------------------------------------------------------

    async def buffers(self, entry: JournalEntry) -> list[Buffer]:
        """The whole batch of ``entry``: from memory, or read back from the journal.

        Raises:
            JournalError, SourceChangedError: see agent/journal.py.
        """
        parts = self._unacked.get(entry.first_seq)
        if parts is None:
            loop = asyncio.get_running_loop()
            parts = await loop.run_in_executor(
                self._executor, self._journal.load, entry, self._source
            )
        return parts

    def send_again_from_trimmed(self) -> None:
        """Another process server is in use: what the last one acknowledged counts for
        nothing (its unshipped files may be lost with it)."""
        self._acked = self._record.trimmed_seq

    async def set_acked(self, seq: int) -> None:
        """The process server in use holds every seq up to ``seq``.

        Raises:
            StreamBrokenError: ``seq`` was never given out (journal behind).
        """
        if seq > self.end_seq:
            raise StreamBrokenError(
                f"disk {self.disk_id}: the process server acknowledged seq {seq} of generation "
                f"{self.generation}, but this agent gave out seqs only up to {self.end_seq}",
                details=JOURNAL_BEHIND,
            )
        async with self.changed:
            self._acked = seq
            for first in [f for f in self._unacked if f <= seq]:
                parts = self._unacked.pop(first)
                self._unacked_bytes -= sum(memoryview(p).nbytes for p in parts)
            self.changed.notify_all()

    async def trim(self, seq: int) -> None:
        """The master target holds every seq up to ``seq``: record it, then drop those entries."""
        record = StreamRecord(self.generation, seq)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._state.put_stream, self.disk_id, record)
        self._record = record
        await loop.run_in_executor(self._executor, self._journal.trim, self.generation, seq)
        async with self.changed:
            self._acked = max(self._acked, seq)
            self.changed.notify_all()

    async def fail(self, exc: BaseException) -> None:
        """The sender stopped on ``exc``: every wait raises it from now on."""
        async with self.changed:
            self._error = exc
            self.changed.notify_all()
