"""The sender of a disk's stream: it delivers the journal to the process servers, in order.

The sender (one task per stream, agent/stream.py starts it):

- sends from the last seq the process server acknowledged, each request
  holding as many whole batches as are ready (agent/batch_request.py), with
  up to ``in_flight_per_disk`` requests in flight (the pool's setting), each
  beginning where the one before ends and all of them within
  :data:`~agent.batch_request.REQUEST_MAX_BYTES`: the next is on its way
  while the process server makes the one before durable;
- reads the answers in the order it sent the requests. After one that is not
  an acknowledgement it waits for the rest of them, takes only their
  acknowledgements, and acts on the first (docs/api.md, "Several requests in
  flight"); after a failed exchange it abandons the rest;
- on ``409 gap`` / ``overlap`` sends again from ``expected_seq`` (cutting a
  batch if the seq falls inside one), on ``503`` waits for Retry-After, on
  a failed exchange backs off and, after a few, moves to the next process
  server (agent/pool.py);
- after a move, sends again from the trimmed seq — the last seq the master
  target is known to hold — because the files the old process server had
  not shipped may be lost with it. The master target drops what it holds
  already: its seq order keeps the stream exact;
- trims the journal only up to ``shipped_seq`` of the process server's state
  (the master target has those seqs durably), never up to ``acked_seq``.

What to do with each answer is decided by protocol/reaction.py; the sender
carries it out on the stream's :class:`~agent.backlog.Backlog`. An error that
stops it (a stream that cannot go on in its generation, a process server
given up on) is handed to the backlog, where the producer raises it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Final

from agent.backlog import Backlog
from agent.batch_request import REQUEST_MAX_BYTES, BatchRequest, build_request
from agent.errors import JOURNAL_BEHIND, ProcessServerUnavailableError, StreamBrokenError
from agent.journal import JournalEntry
from agent.pool import ProcessServerPool
from protocol.api import BatchesAnswer, SeqRefusal
from protocol.reaction import (
    SendAction,
    SendDecision,
    StateAction,
    react_to_batches,
    react_to_state,
)
from runtime.inorder import answer_or

#: The least a request in flight carries for another to go behind it. Behind
#: a smaller one, what waits goes with the next request once it is answered:
#: under a database's load (a few KiB a commit) requests sent behind each
#: other carry a commit or two each, and each costs the process server and
#: the master target a file, a seal, an fsync and an apply group — on a LAN
#: it doubled the RPO (smallwrite_bench.py; docs/performance.md). A request
#: of a sync or a backlog (batches of up to 16 MiB) is far above it.
PIPELINED_MIN_BYTES: Final = 2**20

#: The stream's logger: the sender's lines were always the stream's.
log = logging.getLogger("blockrepl.agent.stream")

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


@dataclass
class StreamStats:
    """What the sender did; bytes are batch bytes on the wire (headers included)."""

    sent_bytes: int = 0
    #: batches sent again: after a failure, a refusal or a move
    resent_bytes: int = 0
    requests: int = 0
    #: journaled batches sent
    batches: int = 0
    #: batches on the wire: the journaled ones, consecutive ones merged
    wire_batches: int = 0
    #: the most requests that were in flight at once
    most_in_flight: int = 0


@dataclass(frozen=True, slots=True)
class _Sent:
    """A request in flight and its answer to come."""

    request: BatchRequest
    answer: asyncio.Task[BatchesAnswer]
    #: sent while another request was in flight: it may reach the process
    #: server first, and a gap at its own first seq then means only that
    behind: bool


class StreamSender:
    """The task that sends ``backlog`` through ``pool``: :meth:`start`, then :meth:`close`."""

    def __init__(self, backlog: Backlog, pool: ProcessServerPool) -> None:
        self._backlog = backlog
        self._pool = pool
        #: highest seq ever put on the wire, to count resends
        self._sent_high = backlog.trimmed_seq
        #: no request of this stream has been answered by the process server in
        #: use since the stream started or moved there
        self._resuming = True
        #: the requests in flight, oldest first
        self._window: collections.deque[_Sent] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.stats = StreamStats()

    @property
    def running(self) -> bool:
        """Whether the task runs: it ends only when closed or on an error."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"send-{self._backlog.disk_id}")

    async def close(self) -> None:
        """Stop (a request in flight is abandoned; the journal keeps it)."""
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
            await self._backlog.fail(exc)
        finally:
            await self._abandon()

    @property
    def _sent_to(self) -> int:
        """The last seq on the wire: of the newest request in flight, or acknowledged."""
        return self._window[-1].request.last_seq if self._window else self._backlog.acked_seq

    @property
    def _room(self) -> bool:
        """Whether another request may go now: fewer than ``in_flight_per_disk`` are in
        flight, and the newest of them carries :data:`PIPELINED_MIN_BYTES` at least."""
        window = self._window
        if not window:
            return True
        return (
            len(window) < self._pool.in_flight_per_disk
            and window[-1].request.size >= PIPELINED_MIN_BYTES
        )

    async def _send_forever(self) -> None:
        backlog = self._backlog
        epoch = -1
        last_poll = 0.0
        poll_wait = STATE_POLL_MIN_S
        while not self._closing:
            if epoch != self._pool.epoch:
                # A process server we have not used yet (or used before a
                # move): what the old one acknowledged may be lost with it.
                await self._abandon()
                epoch = self._pool.epoch
                backlog.send_again_from_trimmed()
                self._resuming = True
                await self._refresh()
                last_poll = time.monotonic()
                continue
            if self._room and backlog.has_past(self._sent_to):
                await self._send(backlog.to_send(self._sent_to))
                poll_wait = STATE_POLL_MIN_S
            elif self._window:
                await self._answer_or_room()
                if time.monotonic() - last_poll >= STATE_POLL_S:
                    await self._refresh()
                    last_poll = time.monotonic()
            elif not backlog.shipped and backlog.shipped_waiters:
                # Someone waits for the end: the process server answers the
                # moment the master target holds it. A wait that ends with no
                # progress (its bound, or a server that does not wait) backs off.
                trimmed = backlog.trimmed_seq
                await self._refresh(until_shipped=backlog.end_seq)
                last_poll = time.monotonic()
                if backlog.trimmed_seq == trimmed:
                    await self._idle(poll_wait)
                    poll_wait = min(poll_wait * 2, STATE_POLL_MAX_S)
            elif not backlog.shipped:  # all acknowledged, not all shipped: ask again soon
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
        backlog = self._backlog
        async with backlog.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    backlog.changed.wait_for(
                        lambda: (
                            backlog.has_to_send or (until_waited_on and backlog.shipped_waiters > 0)
                        )
                    ),
                    timeout,
                )

    async def _send(self, to_send: list[JournalEntry]) -> None:
        """Put the next request on the wire, after the ones in flight."""
        backlog = self._backlog
        first = self._sent_to + 1
        in_flight = sum(sent.request.size for sent in self._window)
        request = await build_request(
            to_send, first, backlog.buffers, max_bytes=REQUEST_MAX_BYTES - in_flight
        )
        client = self._pool.current
        answer = asyncio.create_task(
            client.post_batches(backlog.disk_id, request.body(), resume=self._resuming),
            name=f"post-{backlog.disk_id}-{first}",
        )
        self._window.append(_Sent(request, answer, behind=bool(self._window)))
        stats = self.stats
        stats.most_in_flight = max(stats.most_in_flight, len(self._window))
        stats.requests += 1
        stats.batches += request.journaled
        stats.wire_batches += len(request.counts)
        stats.sent_bytes += request.size
        last = request.last_seq
        if first <= self._sent_high:
            resent_to = min(last, self._sent_high)
            share = (resent_to - first + 1) / max(1, last - first + 1)
            stats.resent_bytes += int(request.size * share)
        self._sent_high = max(self._sent_high, last)

    async def _answer_or_room(self) -> None:
        """Until the oldest request is answered (then act on it), or, with room for
        another request, until there is more to send."""
        backlog = self._backlog
        oldest = self._window[0].answer
        if self._room:
            await answer_or(oldest, self._wait_past(self._sent_to))
        else:
            await asyncio.wait({oldest})
        if not oldest.done():
            return
        sent = self._window.popleft()
        try:
            answer = sent.answer.result()
        except ProcessServerUnavailableError as exc:
            await self._abandon()  # sent after the one that failed: they are sent again
            await self._pool.failed(exc)
            return
        self._pool.succeeded()
        self._resuming = False
        if sent.request.first_seq != backlog.acked_seq + 1:
            # Sent before an earlier answer moved the stream elsewhere: only an
            # acknowledgement still says something true.
            await self._take_ack(answer)
            return
        first = sent.request.first_seq
        decision = react_to_batches(answer, first, backlog.journaled())
        if decision.action is not SendAction.ACKED:
            await self._drain()
        refusal = answer.refusal
        if sent.behind and isinstance(refusal, SeqRefusal) and refusal.expected_seq <= first:
            # It reached the process server before the request ahead of it,
            # and named a seq that request has since delivered: not a
            # failure, and it goes again now, with nothing ahead of it.
            log.debug(
                "disk %s: seq %d came ahead of its turn; sending again", backlog.disk_id, first
            )
            return
        await self._act(decision)

    async def _wait_past(self, seq: int) -> None:
        backlog = self._backlog
        async with backlog.changed:
            await backlog.changed.wait_for(lambda: backlog.has_past(seq))

    async def _drain(self) -> None:
        """Wait for every request still in flight; take only their acknowledgements
        (their refusals answer requests sent before the one being acted on)."""
        while self._window:
            sent = self._window.popleft()
            with contextlib.suppress(ProcessServerUnavailableError):
                await self._take_ack(await sent.answer)

    async def _take_ack(self, answer: BatchesAnswer) -> None:
        backlog = self._backlog
        if answer.refusal is None and answer.position.acked_seq > backlog.acked_seq:
            decision = react_to_batches(answer, backlog.acked_seq + 1, backlog.journaled())
            await self._act(decision)

    async def _abandon(self) -> None:
        """Cancel the requests in flight: the journal keeps what they carried."""
        window, self._window = self._window, collections.deque()
        for sent in window:
            sent.answer.cancel()
        for sent in window:
            with contextlib.suppress(BaseException):
                await sent.answer

    async def _act(self, decision: SendDecision) -> None:
        """Carry out protocol/reaction.py's decision on an answer."""
        backlog = self._backlog
        match decision.action:
            case SendAction.BROKEN:
                raise StreamBrokenError(
                    f"disk {backlog.disk_id}: {decision.reason}",
                    details=JOURNAL_BEHIND if decision.journal_behind else None,
                )
            case SendAction.ACKED:
                await backlog.set_acked(decision.seq)
            case SendAction.BACK_OFF:  # a failure, waited out like any other
                await self._pool.failed(
                    ProcessServerUnavailableError(f"{self._pool.current.url} {decision.reason}")
                )
            case SendAction.RESEND:
                log.info(
                    "disk %s: %s; sending again from seq %d",
                    backlog.disk_id,
                    decision.reason,
                    decision.seq,
                )
                await backlog.set_acked(decision.seq - 1)

    async def _refresh(self, *, until_shipped: int | None = None) -> None:
        """Ask the process server where the disk stands, and carry out protocol/reaction.py's
        decision: follow what it acknowledged, trim what the master target holds.

        Args:
            until_shipped: let the answer wait (:data:`STATE_WAIT_S` at most)
                until the master target holds this seq.
        """
        backlog = self._backlog
        client = self._pool.current
        try:
            state = await client.state(
                backlog.disk_id, until_shipped=until_shipped, wait_s=STATE_WAIT_S
            )
        except ProcessServerUnavailableError as exc:
            await self._pool.failed(exc)
            return
        self._pool.succeeded()
        decision = react_to_state(state, backlog.journaled(), backlog.acked_seq)
        if decision.action is StateAction.BROKEN:
            raise StreamBrokenError(
                f"disk {backlog.disk_id}: {client.url} {decision.reason}",
                details=JOURNAL_BEHIND if decision.journal_behind else None,
            )
        if decision.acked_seq is not None:
            await backlog.set_acked(decision.acked_seq)
        if decision.trim_seq is not None:
            await backlog.trim(decision.trim_seq)
