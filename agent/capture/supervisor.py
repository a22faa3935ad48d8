"""Keeping a captured disk's stream up: start it, watch it, replace it when it fails.

What comes next depends on why the stream ended
(:attr:`CaptureReplication.next_stream <agent.capture.replication.CaptureReplication.next_stream>`):

- the process server is on a newer generation or says the disk needs a
  resync: a new generation, and the whole disk is compared;
- it holds seqs the journal does not reach, or the journal cannot be read
  or written: a new generation, and the regions not known to be shipped
  are compared;
- no process server answered: the same generation again, from the journal;
- anything else (a refusal, say): the same generation, after :data:`REOPEN_AFTER_S`.

A new generation first has the plugin mark, durably, every region of a
journaled request not yet shipped as pending (their journal is gone), then
opens the resync window — with no region marked too: a pass over none then
ends it (agent/capture/window.py). Meanwhile requests are left dirty.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from agent.capture.replication import CaptureReplication, NewGeneration, Reopen
from agent.errors import (
    JOURNAL_BEHIND,
    JournalError,
    ProcessServerUnavailableError,
    StreamBrokenError,
)
from agent.stream import ReplicationStream
from protocol.errors import BlockreplError
from protocol.sequencing import StreamPosition

log = logging.getLogger("blockrepl.agent.capture")

#: Seconds before a stream that a process server refused (or whose journal
#: could not be written) is tried again: long enough not to flood the logs.
REOPEN_AFTER_S: Final = 30.0
#: Seconds before a new generation is asked for again when no process
#: server answered.
RETRY_AFTER_S: Final = 5.0
#: A stream that ends within STABLE_STREAM_S of its start is started again
#: only after a wait that doubles from RESTART_FIRST_S to RESTART_MAX_S: a
#: peer that breaks every stream at once (a newer generation each time, an
#: answer that makes no sense) costs a start every half a minute at most,
#: never a loop of starts, each reading the journal back.
STABLE_STREAM_S: Final = 60.0
RESTART_FIRST_S: Final = 1.0
RESTART_MAX_S: Final = REOPEN_AFTER_S


async def supervise(replication: CaptureReplication) -> None:
    """Keep a stream up: start one, watch it, replace it when it fails (runs forever)."""
    restart_wait = 0.0
    while True:
        if replication.stream is None:
            await _bring_up(replication, restart_wait)
            continue
        stream = replication.stream
        started = time.monotonic()
        failed = asyncio.ensure_future(stream.wait_failed())
        try:
            while not failed.done() and not replication.has_failed(stream):
                waker = asyncio.ensure_future(replication.wait_change(replication.version))
                await asyncio.wait({failed, waker}, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
        finally:
            failed.cancel()
        exc = replication.take_failure(stream)
        if exc is None:
            exc = failed.result()
        await _take_down(replication, stream, exc)
        if time.monotonic() - started >= STABLE_STREAM_S:
            restart_wait = 0.0
        else:
            restart_wait = min(max(RESTART_FIRST_S, restart_wait * 2), RESTART_MAX_S)


async def _take_down(
    replication: CaptureReplication, stream: ReplicationStream, exc: BaseException
) -> None:
    disk_id = replication.disk_id
    async with replication.lock:
        if replication.stream is stream:
            replication.stream = None
    await stream.close()
    message = exc.message if isinstance(exc, BlockreplError) else repr(exc)
    if not message.startswith(f"disk {disk_id}: "):
        message = f"disk {disk_id}: {message}"
    if isinstance(exc, StreamBrokenError):
        full = exc.details.get("cause") != JOURNAL_BEHIND["cause"]
        log.warning(
            "%s; a new generation starts and %s is compared",
            message,
            "the whole disk" if full else "every region not known to be shipped",
        )
        replication.next_stream = NewGeneration(full=full)
    elif isinstance(exc, JournalError):
        log.error("%s; a new generation starts", message)
        replication.next_stream = NewGeneration(full=False)
    elif isinstance(exc, ProcessServerUnavailableError):
        log.warning("%s; trying again", message)
        replication.next_stream = Reopen(0.0)
    else:
        log.error(
            "%s; replication stopped: writes are marked dirty and the stream is tried "
            "again in %g s",
            message,
            REOPEN_AFTER_S,
        )
        replication.next_stream = Reopen(REOPEN_AFTER_S)
    replication.changed()


async def _bring_up(replication: CaptureReplication, wait_s: float) -> None:
    """Start the stream :attr:`next_stream` says, after ``wait_s`` at least."""
    plan = replication.next_stream or Reopen(0.0)
    try:
        if isinstance(plan, NewGeneration):
            await asyncio.sleep(wait_s)
            await _start_generation(replication, plan)
        else:
            await asyncio.sleep(max(wait_s, plan.delay_s))
            await _reopen(replication)
    except BlockreplError as exc:
        log.warning(
            "disk %s: the stream cannot start yet: %s; again in %g s",
            replication.disk_id,
            exc.message,
            RETRY_AFTER_S,
        )
        await asyncio.sleep(RETRY_AFTER_S)


async def _reopen(replication: CaptureReplication) -> None:
    try:
        stream = ReplicationStream.open(
            replication.disk_id,
            state=replication.state,
            pool=replication.pool,
            journal_dir=replication.journal_dir,
            source=None,
            executor=replication.executor,
        )
    except JournalError as exc:
        log.error("disk %s: %s; a new generation starts", replication.disk_id, exc.message)
        replication.next_stream = NewGeneration(full=False)
        return
    if stream is None:
        replication.next_stream = NewGeneration(full=True)
        return
    await _set_stream(replication, stream)


async def _start_generation(replication: CaptureReplication, plan: NewGeneration) -> None:
    """Mark what must be resynced (durably, in the plugin), then start the generation."""
    geometry = replication.geometry
    async with replication.lock:
        whole = [(0, geometry.disk_bytes)] if plan.full else []
        pending = await replication.mark_pending(whole, replication.received_rid, True)
        replication.window.generation_marked(
            region for offset, length in pending for region in geometry.regions_of(offset, length)
        )
        replication.forget_ship_actions()
    record = replication.state.stream(replication.disk_id)
    known = record.generation if record is not None else 0
    if record is not None:
        replication.floor = StreamPosition(record.generation, record.trimmed_seq)
    stream = await ReplicationStream.create_after(
        replication.disk_id,
        known,
        state=replication.state,
        pool=replication.pool,
        journal_dir=replication.journal_dir,
        source=None,
        executor=replication.executor,
    )
    replication.stats.generations_started += 1
    await _set_stream(replication, stream)


async def _set_stream(replication: CaptureReplication, stream: ReplicationStream) -> None:
    stream.start()
    async with replication.lock:
        replication.stream = stream
        replication.next_stream = None
    log.info(
        "disk %s: streaming generation %d from seq %d",
        replication.disk_id,
        stream.generation,
        stream.end_seq + 1,
    )
    replication.changed()
