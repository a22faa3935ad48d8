"""One disk's stream from the source to the master target, through the process servers.

This is the client library the agent's commands build on: a producer (the
sync today, live capture next) hands it records; it gives them seqs, writes
each batch to the journal before it is sent (agent/journal.py), and a sender
task delivers the journal in order::

    producer ─ append() ─▶ journal (durable) ─▶ sender ─ POST batches ─▶ process server
                                 ▲                 │
                                 └── trim ◀── shipped_seq (GET state)

The sender:

- sends from the last seq the process server acknowledged, one request at a
  time, each holding as many whole batches as are ready (up to
  :data:`REQUEST_MAX_BYTES`);
- on ``409 gap`` / ``overlap`` sends again from ``expected_seq`` (cutting a
  batch if the seq falls inside one), on ``503`` waits for Retry-After, on
  a failed exchange backs off and, after a few, moves to the next process
  server (agent/client.py);
- after a move, sends again from the trimmed seq — the last seq the master
  target is known to hold — because the files the old process server had
  not shipped may be lost with it. The master target drops what it holds
  already: its seq order keeps the stream exact;
- trims the journal only up to ``shipped_seq`` of the process server's state
  (the master target has those seqs durably), never up to ``acked_seq``.

A stream that cannot go on in its generation (a newer generation at the
process server, ``resync_required``, or seqs there that this agent never
journaled) fails with :class:`~agent.errors.StreamBrokenError`; the owner
starts a new generation and resyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.errors import ProcessServerUnavailableError, StreamBrokenError
from agent.journal import EntryKind, Journal, JournalEntry, encode
from agent.pool import ProcessServerPool
from agent.source import SourceDisk
from agent.state import AgentState, StreamRecord
from protocol.api import BatchesAnswer, StaleGeneration
from protocol.batch import BatchDecoder
from protocol.reaction import (
    Journaled,
    SendAction,
    StateAction,
    react_to_batches,
    react_to_state,
)
from protocol.records import Buffer, Record, StreamFlags

log = logging.getLogger("blockrepl.agent.stream")

#: Bytes of batches in one request: several batches share the process
#: server's group commit, and a failed request costs at most this to resend.
REQUEST_MAX_BYTES: Final = 64 * 2**20
#: Bytes of batches held in memory until the process server acknowledges
#: them (their first send needs no journal read); the producer waits above it.
MAX_UNACKED_BYTES: Final = 64 * 2**20
#: Journal bytes (whole batches, as live capture writes them) above which the
#: producer waits for the master target to catch up: the source side's disk
#: is bounded however long a process server is away.
MAX_JOURNAL_BYTES: Final = 4 * 2**30
#: How often the sender asks for the process server's state while it sends
#: (to trim) and, growing to :data:`STATE_POLL_MAX_S`, while it waits for the
#: master target to receive the rest: a state answer is a few hundred bytes,
#: and a sync that is done should not wait long to hear it.
STATE_POLL_S: Final = 0.5
STATE_POLL_MIN_S: Final = 0.02
STATE_POLL_MAX_S: Final = 0.25
#: How long a state request may wait at the process server for the master
#: target to take the rest, while someone waits for the stream to be shipped
#: (a sync at its end): it hears it at once rather than at the next poll.
STATE_WAIT_S: Final = 2.0
#: The ``details`` of a StreamBrokenError raised because the process server
#: holds seqs this agent's journal does not reach (it was lost, or restored
#: from an old backup): everything the master target received is still good.
JOURNAL_BEHIND: Final = {"cause": "journal-behind"}


@dataclass
class StreamStats:
    """What the sender did; bytes are batch bytes on the wire (headers included)."""

    sent_bytes: int = 0
    #: batches sent again: after a failure, a refusal or a move
    resent_bytes: int = 0
    requests: int = 0
    batches: int = 0


class ReplicationStream:
    """The stream of one disk. Build with :meth:`open`, then :meth:`start` the sender.

    Args:
        disk_id: the disk.
        state: the agent's state database.
        pool: the process servers.
        journal_dir: the disk's journal folder.
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
        self._state = state
        self._pool = pool
        self._journal = journal
        self._record = record
        self._source = source
        self._executor = executor
        #: last seq the process server in use acknowledged (or the trimmed seq)
        self._acked = record.trimmed_seq
        #: highest seq ever put on the wire, to count resends
        self._sent_high = record.trimmed_seq
        self._unacked: dict[int, list[Buffer]] = {}
        self._unacked_bytes = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closing = False
        #: callers of :meth:`wait_shipped` now: the sender then long-polls
        self._shipped_waiters = 0
        self.stats = StreamStats()

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
        journal = Journal(journal_dir, generation=record.generation,
                          trimmed_seq=record.trimmed_seq)  # fmt: skip
        return cls(disk_id, state=state, pool=pool, journal=journal, record=record,
                   source=source, executor=executor)  # fmt: skip

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
        return cls(disk_id, state=state, pool=pool, journal=journal, record=record,
                   source=source, executor=executor)  # fmt: skip

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
                disk_id, generation, state=state, pool=pool, journal_dir=journal_dir,
                source=source, executor=executor,
            )  # fmt: skip

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
        async with self._changed:
            if wait:
                await self._changed.wait_for(lambda: self._error is not None or self.has_room)
            self._raise_if_failed()
        batch = encode(
            disk_id=self.disk_id, generation=self.generation, first_seq=self.end_seq + 1,
            records=records, first_capture_ns=first_capture_ns,
            last_capture_ns=last_capture_ns, flags=flags,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        entry = await loop.run_in_executor(self._executor, self._journal.append, batch, kind)
        async with self._changed:
            if self._unacked_bytes < MAX_UNACKED_BYTES:
                self._unacked[entry.first_seq] = batch.segments
                self._unacked_bytes += batch.wire_bytes
            self._changed.notify_all()
        return entry

    @property
    def has_room(self) -> bool:
        """Whether :meth:`append` would go on without waiting."""
        return self._unacked_bytes < MAX_UNACKED_BYTES and self._journal.bytes < MAX_JOURNAL_BYTES

    @property
    def journal_bytes(self) -> int:
        """Bytes of the journal entries not yet at the master target."""
        return self._journal.bytes

    async def wait_until(self, done: Callable[[], bool]) -> None:
        """Until ``done()`` holds, checked whenever the stream moves (acks, trims, appends).

        Raises:
            whatever stopped the sender.
        """
        await self._wait(done)

    async def wait_failed(self) -> BaseException:
        """Until the sender stops on an error; that error."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._error is not None)
            assert self._error is not None
            return self._error

    async def wait_acked(self) -> None:
        """Until the process server has acknowledged every journaled batch."""
        await self._wait(lambda: self._acked >= self.end_seq)

    async def wait_shipped(self) -> None:
        """Until the master target holds every journaled batch (the journal is empty)."""
        self._shipped_waiters += 1
        try:
            async with self._changed:
                self._changed.notify_all()  # a sender idling between polls asks at once
            await self._wait(lambda: self._journal.end_seq is None)
        finally:
            self._shipped_waiters -= 1

    async def _wait(self, done: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._error is not None or done())
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # --- the sender ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender task."""
        self._task = asyncio.create_task(self._run(), name=f"send-{self.disk_id}")

    async def close(self) -> None:
        """Stop the sender (a request in flight is abandoned; the journal keeps it)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        try:
            await self._send_forever()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the producer; it decides
            async with self._changed:
                self._error = exc
                self._changed.notify_all()

    async def _send_forever(self) -> None:
        epoch = -1
        last_poll = 0.0
        poll_wait = STATE_POLL_MIN_S
        while not self._closing:
            if epoch != self._pool.epoch:
                # A process server we have not used yet (or used before a
                # move): what the old one acknowledged may be lost with it.
                epoch = self._pool.epoch
                self._acked = self._record.trimmed_seq
                await self._refresh()
                last_poll = time.monotonic()
                continue
            pending = [e for e in self._journal.entries if e.last_seq > self._acked]
            if pending:
                await self._send(pending)
                if time.monotonic() - last_poll >= STATE_POLL_S:
                    await self._refresh()
                    last_poll = time.monotonic()
                poll_wait = STATE_POLL_MIN_S
            elif self._journal.entries and self._shipped_waiters:
                # Someone waits for the end: the process server answers the
                # moment the master target holds it. A wait that ends with no
                # progress (its bound, or a server that does not wait) backs off.
                trimmed = self._record.trimmed_seq
                await self._refresh(until_shipped=self.end_seq)
                last_poll = time.monotonic()
                if self._record.trimmed_seq == trimmed:
                    await self._idle(poll_wait)
                    poll_wait = min(poll_wait * 2, STATE_POLL_MAX_S)
            elif self._journal.entries:  # all acknowledged, not all shipped: ask again soon
                await self._idle(poll_wait, until_waited_on=True)
                poll_wait = min(poll_wait * 2, STATE_POLL_MAX_S)
                await self._refresh()
                last_poll = time.monotonic()
            else:
                await self._idle(None)
                poll_wait = STATE_POLL_MIN_S

    async def _idle(self, timeout: float | None, *, until_waited_on: bool = False) -> None:
        """Until there is something to send, or ``timeout``; with
        ``until_waited_on``, also until someone waits for the stream to be shipped."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(
                        lambda: (
                            any(e.last_seq > self._acked for e in self._journal.entries)
                            or (until_waited_on and self._shipped_waiters > 0)
                        )
                    ),
                    timeout,
                )

    async def _send(self, pending: list[JournalEntry]) -> None:
        first = self._acked + 1
        body, size, batches = await self._request_body(pending, first)
        client = self._pool.current
        try:
            answer = await client.post_batches(self.disk_id, _iterate(body))
        except ProcessServerUnavailableError as exc:
            await self._pool.failed(exc)
            return
        self._pool.succeeded()
        last = first + sum(count for count in batches) - 1
        self.stats.requests += 1
        self.stats.batches += len(batches)
        self.stats.sent_bytes += size
        if first <= self._sent_high:
            resent_to = min(last, self._sent_high)
            share = (resent_to - first + 1) / max(1, last - first + 1)
            self.stats.resent_bytes += int(size * share)
        self._sent_high = max(self._sent_high, last)
        await self._handle(answer, first)

    async def _request_body(
        self, pending: list[JournalEntry], first: int
    ) -> tuple[list[Buffer], int, list[int]]:
        """The buffers of the next request: whole batches from seq ``first``."""
        loop = asyncio.get_running_loop()
        body: list[Buffer] = []
        counts: list[int] = []
        size = 0
        for entry in pending:
            parts = self._unacked.get(entry.first_seq)
            if parts is None:
                parts = await loop.run_in_executor(
                    self._executor, self._journal.load, entry, self._source
                )
            if entry.first_seq < first:  # the process server wants a seq inside this batch
                parts = _cut(parts, first)
            part_bytes = sum(memoryview(p).nbytes for p in parts)
            if body and size + part_bytes > REQUEST_MAX_BYTES:
                break
            body.extend(parts)
            counts.append(entry.last_seq - max(first, entry.first_seq) + 1)
            size += part_bytes
        return body, size, counts

    async def _handle(self, answer: BatchesAnswer, first: int) -> None:
        """Carry out protocol/reaction.py's decision on the answer to a request from ``first``."""
        journal = Journaled(self.generation, self._record.trimmed_seq, self.end_seq)
        decision = react_to_batches(answer, first, journal)
        match decision.action:
            case SendAction.BROKEN:
                raise StreamBrokenError(
                    f"disk {self.disk_id}: {decision.reason}",
                    details=JOURNAL_BEHIND if decision.journal_behind else None,
                )
            case SendAction.ACKED:
                await self._set_acked(decision.seq)
            case SendAction.BACK_OFF:  # a failure, waited out like any other
                await self._pool.failed(
                    ProcessServerUnavailableError(f"{self._pool.current.url} {decision.reason}")
                )
            case SendAction.RESEND:
                log.info("disk %s: %s; sending again from seq %d", self.disk_id, decision.reason,
                         decision.seq)  # fmt: skip
                await self._set_acked(decision.seq - 1)

    async def _set_acked(self, seq: int) -> None:
        if seq > self.end_seq:
            raise StreamBrokenError(
                f"disk {self.disk_id}: the process server acknowledged seq {seq} of generation "
                f"{self.generation}, but this agent gave out seqs only up to {self.end_seq}",
                details=JOURNAL_BEHIND,
            )
        async with self._changed:
            self._acked = seq
            for first in [f for f in self._unacked if f <= seq]:
                parts = self._unacked.pop(first)
                self._unacked_bytes -= sum(memoryview(p).nbytes for p in parts)
            self._changed.notify_all()

    async def _refresh(self, *, until_shipped: int | None = None) -> None:
        """Ask the process server where the disk stands; trim what the master target holds.

        Args:
            until_shipped: let the answer wait (:data:`STATE_WAIT_S` at most)
                until the master target holds this seq.
        """
        client = self._pool.current
        try:
            state = await client.state(
                self.disk_id, until_shipped=until_shipped, wait_s=STATE_WAIT_S
            )
        except ProcessServerUnavailableError as exc:
            await self._pool.failed(exc)
            return
        self._pool.succeeded()
        journal = Journaled(self.generation, self._record.trimmed_seq, self.end_seq)
        decision = react_to_state(state, journal, self._acked)
        if decision.action is StateAction.BROKEN:
            raise StreamBrokenError(
                f"disk {self.disk_id}: {client.url} {decision.reason}",
                details=JOURNAL_BEHIND if decision.journal_behind else None,
            )
        if decision.acked_seq is not None:
            await self._set_acked(decision.acked_seq)
        if decision.trim_seq is not None:
            await self._trim(decision.trim_seq)

    async def _trim(self, seq: int) -> None:
        record = StreamRecord(self.generation, seq)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._state.put_stream, self.disk_id, record)
        self._record = record
        await loop.run_in_executor(self._executor, self._journal.trim, self.generation, seq)
        async with self._changed:
            self._acked = max(self._acked, seq)
            self._changed.notify_all()


async def _iterate(parts: list[Buffer]) -> AsyncIterator[bytes | memoryview]:
    for part in parts:
        yield part if isinstance(part, bytes) else memoryview(part)


def _cut(parts: list[Buffer], first: int) -> list[Buffer]:
    """The records of a batch from seq ``first`` on, as a batch of their own.

    A process server that merged batches into one file leaves the master
    target at a seq inside one of ours; the records are the same, so the
    stream stays exact.
    """
    decoder = BatchDecoder()
    for part in parts:
        decoder.feed(part)
    decoder.feed_eof()
    (batch,) = list(decoder.events())
    h = batch.header
    cut = encode(
        disk_id=h.disk_id, generation=h.generation, first_seq=first,
        records=batch.records[first - h.first_seq :], first_capture_ns=h.first_capture_ns,
        last_capture_ns=h.last_capture_ns, flags=h.flags,
    )  # fmt: skip
    return cut.segments
