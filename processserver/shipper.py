"""Shipping cached HRL files to the master target.

One task per disk takes the disk's cached files oldest first and PUTs them
to the master target (docs/api.md), a bounded number at a time over all
disks. What waits goes together: one PUT carries the head file and the
consecutive files after it, up to :data:`RUN_MAX_FILES` files and
:data:`RUN_MAX_BYTES` bytes, so a disk whose files pile up while one is in
flight pays the per-request cost once for all of them. Up to ``in_flight_per_disk``
runs of a disk are in flight at once, each beginning where the one before
ends: the next is on its way while the master target stores the one before.
Their answers are read in the order the runs were sent; after a refusal the
runs still in flight are waited for and only their 200 answers count, and a
refusal is acted on only while its run still begins the cache (docs/api.md,
"Several requests in flight"). A run that fails halves the next one, down to
a single file, and abandons the runs sent after it: a link that cuts long
transfers still carries the files one by one. A file is deleted only once a
200 answer's position covers it (docs/design.md invariant 1).
On a refusal the master target's answer decides, as protocol/reaction.py
says:

- ``gap`` / ``overlap``: the master target expects an earlier seq. If it
  expects a seq this cache still holds, shipping goes on from there; if the
  seqs it needs are gone, the disk is ``resync_required``;
- a seq the master target already holds (its ``received_seq`` is past the
  file): the file is dropped as shipped;
- ``stale-generation``: the master target is on a newer generation; files of
  older generations are dropped;
- ``failed-over``: the disk takes no more data; shipping stops;
- 503 or no answer: back-off with jitter, doubling from 0.5 s to 30 s;
- an answer that breaks docs/api.md (protocol/api.py), or is longer than
  any answer may be: counted in ``malformed_answers_total{call="put-hrl"}``
  and ``ship_retries_total``, logged, and backed off like a 503.

The shipper is started with :meth:`Shipper.start` (or ``async with``) and
stopped with :meth:`Shipper.close`; it sends through the process server's
client of the master target (processserver/master_target_client.py), which
a reload gives new TLS files.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from types import TracebackType
from typing import Final

import aiohttp

from processserver.cache import CachedFile
from processserver.config import DEFAULT_IN_FLIGHT_PER_DISK
from processserver.master_target_client import MasterTargetClient
from processserver.metrics import ProcessServerMetrics
from processserver.stream import DiskStream
from protocol.api import CONFLICT, MAX_ANSWER_BYTES, OK, ErrorBody, HrlAnswer, SeqRefusal
from protocol.errors import ProtocolError
from protocol.reaction import ShipAction, ShipDecision, react_to_hrl
from runtime.answers import read_answer
from runtime.inorder import answer_or
from runtime.service import vital
from runtime.uploads import in_pieces

log = logging.getLogger("blockrepl.processserver.ship")

#: Files in one PUT at most: a run's files are stored one by one at the
#: master target, under the disk's lock; 64 keeps one PUT's work short.
RUN_MAX_FILES: Final = 64
#: Bytes of one PUT at most, a file alone may be longer (up to the format's
#: MAX_HRL_FILE_BYTES): what the capture fills its batches to, so a run costs
#: about what one large write does.
RUN_MAX_BYTES: Final = 16 * 2**20
#: The least a run in flight carries for another of the disk to go behind it.
#: Behind a smaller one, the files that wait go in the next run once it is
#: answered: runs sent behind small runs carry a file or two each, and each
#: costs the master target a PUT and its stores (agent/sender.py keeps the
#: same rule, for the same reason).
PIPELINED_MIN_BYTES: Final = 2**20
#: Back-off after a failed transfer: quick after a blip, gentle on a master
#: target that is down; the jitter keeps many disks from retrying in step.
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0


class Shipper:
    """Ships every disk's cached files to the master target.

    Args:
        streams: the disks whose files it ships.
        master_target: where to, and over which session.
        metrics: the transfer series.
        executor: reads the files.
        max_in_flight: transfers at once over all disks.
        in_flight_per_disk: transfers of one disk at once.
    """

    def __init__(
        self,
        streams: Iterable[DiskStream],
        master_target: MasterTargetClient,
        metrics: ProcessServerMetrics,
        executor: Executor,
        *,
        max_in_flight: int,
        in_flight_per_disk: int = DEFAULT_IN_FLIGHT_PER_DISK,
    ) -> None:
        self._streams = tuple(streams)
        self._master_target = master_target
        self._metrics = metrics
        self._executor = executor
        self._slots = asyncio.Semaphore(max_in_flight)
        self._per_disk = in_flight_per_disk
        self._tasks: tuple[asyncio.Task[None], ...] = ()

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """The shipping tasks, one per disk (none before :meth:`start`)."""
        return self._tasks

    def start(self) -> None:
        """Start shipping, a task per disk; each is :func:`~runtime.service.vital`."""
        if self._tasks:
            raise RuntimeError("the shipper is running already")
        self._tasks = tuple(
            vital(asyncio.create_task(self._ship_disk(stream), name=f"ship-{stream.disk_id}"))
            for stream in self._streams
        )

    async def close(self) -> None:
        """Stop shipping: a transfer in flight is abandoned, its file stays cached."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Shipper:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _ship_disk(self, stream: DiskStream) -> None:
        backoff = BACKOFF_FIRST_S
        #: files the next run may hold: halved after each failed run (a link
        #: that breaks long transfers still carries short ones), doubled
        #: after each good one
        most = RUN_MAX_FILES
        #: the runs in flight, oldest first
        window: collections.deque[_InFlight] = collections.deque()
        try:
            while True:
                sent = sum(len(f.run) for f in window)
                if not window:
                    await stream.next_to_ship()
                elif not self._room(window) or len(stream.cached) <= sent:
                    await self._answer_or_room(stream, window, sent)
                    if not window[0].answer.done():
                        continue  # room, and a file to fill it
                    answered = window[0].run
                    if await self._settle(stream, window):
                        backoff = BACKOFF_FIRST_S
                        most = min(most * 2, RUN_MAX_FILES)
                    else:
                        await _abandon(window)
                        most = max(1, len(answered) // 2)
                        await asyncio.sleep(backoff * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
                        backoff = min(backoff * 2, BACKOFF_MAX_S)
                    continue
                run = _run(list(itertools.islice(stream.cached, sent, sent + most)), most)
                task = asyncio.create_task(self._transfer(stream, run))
                window.append(_InFlight(run, task, behind=bool(window)))
        finally:
            await _abandon(window)

    async def _answer_or_room(
        self, stream: DiskStream, window: collections.deque[_InFlight], sent: int
    ) -> None:
        """Until the oldest run is answered or, with room for another, a file to fill it
        is cached."""
        oldest = window[0].answer
        if not self._room(window):
            await asyncio.wait({oldest})
            return
        await answer_or(oldest, stream.next_to_ship(after=sent))

    def _room(self, window: collections.deque[_InFlight]) -> bool:
        """Whether another run may go behind those in flight: fewer than
        ``in_flight_per_disk`` are, and the newest carries :data:`PIPELINED_MIN_BYTES`."""
        return (
            len(window) < self._per_disk
            and sum(f.size for f in window[-1].run) >= PIPELINED_MIN_BYTES
        )

    async def _settle(self, stream: DiskStream, window: collections.deque[_InFlight]) -> bool:
        """Act on the oldest run's answer, which is in; False when the caller should back off."""
        done = window.popleft()
        answer = done.answer.result()
        if answer is None:
            return False
        refusal = answer.refusal
        if refusal is not None:
            await self._drain(stream, window)
            if not stream.cached or stream.cached[0] is not done.run[0]:
                return True  # an answer for a head the cache has moved past: look again
            if done.behind and isinstance(refusal, SeqRefusal):
                # It reached the master target before the run ahead of it, and
                # named a seq that run has since delivered: it goes again now.
                return True
        outcome = await self._carry_out(stream, react_to_hrl(answer, stream.cached))
        if window and (not stream.cached or stream.cached[0] is not window[0].run[0]):
            # The answer covered only part of its run (an inbox that filled
            # mid-run): the runs behind it no longer follow what is cached.
            await self._drain(stream, window)
        return outcome

    async def _drain(self, stream: DiskStream, window: collections.deque[_InFlight]) -> None:
        """Wait for every run still in flight; carry out only their 200 answers (the
        position they give is true whenever it is read)."""
        while window:
            later = await window.popleft().answer
            if later is not None and later.refusal is None:
                await self._carry_out(stream, react_to_hrl(later, stream.cached))

    async def _transfer(self, stream: DiskStream, run: list[CachedFile]) -> HrlAnswer | None:
        """Send a run of files within the transfer slots; see :meth:`_send`."""
        async with self._slots:
            return await self._send(stream, run)

    async def _send(self, stream: DiskStream, run: list[CachedFile]) -> HrlAnswer | None:
        """Send a run of files; its answer, or None when the transfer failed (logged
        and counted) and the caller should back off."""
        metrics = self._metrics
        loop = asyncio.get_running_loop()
        head = run[0]
        what = head.path.name if len(run) == 1 else f"{head.path.name} and {len(run) - 1} more"
        url = (
            f"{self._master_target.base_url}/v1/disks/{stream.disk_id}/hrl/"
            f"{head.generation}/{head.first_seq}"
        )
        status = 0
        try:
            datas = await loop.run_in_executor(
                self._executor, lambda: [f.path.read_bytes() for f in run]
            )
            size = sum(len(d) for d in datas)
            started = loop.time()
            async with self._master_target.session.put(
                url, data=in_pieces(datas), headers={"Content-Length": str(size)}
            ) as response:
                status = response.status
                raw = await read_answer(
                    response.content, max_bytes=MAX_ANSWER_BYTES, what=f"the answer to {what}"
                )
            metrics.ship_seconds.observe(loop.time() - started)
            answer = HrlAnswer.parse_bytes(status, raw) if status in (OK, CONFLICT) else None
        except ProtocolError as exc:
            metrics.malformed_answers.labels("put-hrl").inc()
            metrics.ship_retries.labels(stream.disk_id).inc()
            log.warning(
                "disk %s: the master target answered %s with %d and a body that breaks "
                "docs/api.md: %s",
                stream.disk_id,
                what,
                status,
                exc.message,
            )
            return None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            metrics.ship_retries.labels(stream.disk_id).inc()
            log.debug("disk %s: shipping %s failed: %s", stream.disk_id, what, exc)
            return None
        if answer is None:
            metrics.ship_retries.labels(stream.disk_id).inc()
            log.warning(
                "disk %s: the master target answered %d to %s: %s",
                stream.disk_id,
                status,
                what,
                ErrorBody.explain(raw).to_json(),
            )
            return None
        return answer

    async def _carry_out(self, stream: DiskStream, decision: ShipDecision) -> bool:
        """Do what protocol/reaction.py decided; False when the caller should back off."""
        metrics = self._metrics
        if decision.action is ShipAction.SHIPPED:
            files = list(itertools.islice(stream.cached, decision.held))
            await stream.shipped(files)
            metrics.bytes_out.labels(stream.disk_id).inc(sum(f.size for f in files))
            metrics.files_out.labels(stream.disk_id).inc(len(files))
            return True
        if decision.action is ShipAction.STOP:
            log.warning("disk %s: %s; shipping stops", stream.disk_id, decision.reason)
            stream.fail_over()
            return True
        await stream.drop_held(decision.held)  # the master target holds these already
        metrics.files_out.labels(stream.disk_id).inc(decision.held)
        if decision.resync:
            log.error("disk %s: %s; the disk needs a resync", stream.disk_id, decision.reason)
            await stream.require_resync()
        await stream.drop_older(decision.older)  # of generations that can never be whole
        metrics.files_out.labels(stream.disk_id).inc(decision.older)
        if decision.action is ShipAction.BACK_OFF:
            # A refusal with no way forward: sending the same file again at once would loop.
            log.debug("disk %s: %s; backing off", stream.disk_id, decision.reason)
            return False
        return True


def _run(cached: Sequence[CachedFile], most: int) -> list[CachedFile]:
    """The files of the next PUT: the head, and the files that follow it in its
    generation, within ``most`` files and :data:`RUN_MAX_BYTES`."""
    run = [cached[0]]
    size = cached[0].size
    for file in itertools.islice(cached, 1, most):
        last = run[-1]
        if file.generation != last.generation or file.first_seq != last.last_seq + 1:
            break
        if size + file.size > RUN_MAX_BYTES:
            break
        run.append(file)
        size += file.size
    return run


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A run in flight and its answer to come (None: the transfer failed)."""

    run: list[CachedFile]
    answer: asyncio.Task[HrlAnswer | None]
    #: sent while another run of the disk was in flight
    behind: bool


async def _abandon(window: collections.deque[_InFlight]) -> None:
    """Cancel the runs in flight: their files stay cached and are sent again."""
    for sent in window:
        sent.answer.cancel()
    for sent in window:
        with contextlib.suppress(BaseException):
            await sent.answer
    window.clear()
