"""A captured disk's stream: live writes, resyncs and tags, in one order.

:class:`CaptureReplication` owns the disk's :class:`~agent.stream.ReplicationStream`
and decides, for each group of requests from the plugin, whether it is
journaled (acknowledged JOURNALED) or only left dirty (DIRTY) — never lost:

- **journaling**: the stream is up and its journal under ``journal_max_bytes``;
- **overflow**: the journal reached ``journal_max_bytes`` (a process server
  away for long): requests are left dirty until it drained to half, then a
  resync sends the regions written meanwhile;
- **down**: no stream (being started or started again, a new generation
  being made, a process server refusing): requests are left dirty. The
  stream is started and replaced by agent/capture/supervisor.py.

A request left dirty means the target misses a write that later ones may
follow: from then until a resync pass ends, every batch carries the stream
flag RESYNC (the *window*, held by :class:`~agent.capture.window.ResyncWindow`),
so the master target offers no recovery point there (docs/design.md invariant 6).
The pass's last batch carries RESYNC_END.

The plugin keeps the dirty map; this side tells it what became clean:
SHIPPED once the master target holds a batch of live requests, RESYNCED once
it holds a resync pass. A new generation turns every journaled request not
yet shipped into a region to resync (PENDING with flag LIVE): its journal is
gone.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent.capture.plugin import wire
from agent.capture.plugin.dirtymap import Geometry
from agent.capture.records import Request, pack, records_of, regions_of
from agent.capture.window import ResyncWindow
from agent.config import TABLE_RESERVE_BYTES, AgentConfig
from agent.errors import StreamBrokenError
from agent.journal import EntryKind
from agent.pool import ProcessServerPool
from agent.source import SourceDisk
from agent.state import AgentState
from agent.stream import ReplicationStream
from protocol.errors import BlockreplError
from protocol.limits import MAX_BATCH_PAYLOAD
from protocol.records import Record, StreamFlags, Tag, Write, Zero
from protocol.sequencing import StreamPosition

log = logging.getLogger("blockrepl.agent.capture")

#: Payload a batch of live requests is filled to at most: a group commit of
#: many small writes makes few, large batches (few fsyncs everywhere after).
LIVE_BATCH_BYTES: Final = 16 * 2**20
#: What a batch of capture is filled to.
BATCH_PAYLOAD_BYTES: Final = min(LIVE_BATCH_BYTES, MAX_BATCH_PAYLOAD - TABLE_RESERVE_BYTES)
#: Seconds between looks at what the master target holds, to tell the plugin
#: which regions are clean: as often as the stream itself asks.
SHIP_POLL_S: Final = 0.2
#: The position before any generation.
NOTHING_YET: Final = StreamPosition(0, 0)


class Mode(enum.Enum):
    JOURNALING = "journaling"
    OVERFLOW = "overflow"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class NewGeneration:
    """What the next stream must be: a new generation; ``full`` compares the whole disk."""

    full: bool


@dataclass(frozen=True, slots=True)
class Reopen:
    """The same generation, from the journal, after ``delay_s``."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class ShipAction:
    """A frame for the plugin once the master target holds seq ``seq`` of ``generation``."""

    generation: int
    seq: int
    frame: wire.Frame


@dataclass
class CaptureStats:
    """What capture did since it started."""

    write_requests: int = 0
    zero_requests: int = 0
    trim_requests: int = 0
    failed_requests: int = 0
    requested_bytes: int = 0
    journaled_requests: int = 0
    dirty_requests: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    batches: int = 0
    tags: int = 0
    generations_started: int = 0
    overflows: int = 0
    resync_passes: int = 0
    resync_regions: int = 0
    resync_compared_bytes: int = 0
    resync_data_bytes: int = 0
    resync_zero_bytes: int = 0
    resync_refreshed: int = 0


#: Asks the plugin to mark ranges pending (PENDING), returns what is pending then.
MarkPending = Callable[[list[tuple[int, int]], int, bool], Awaitable[list[tuple[int, int]]]]


@dataclass
class CaptureReplication:
    """The stream side of one captured disk.

    Args:
        send: queues a frame to the plugin.
        mark_pending: sends PENDING and waits for PENDING_DONE.
    """

    disk_id: str
    config: AgentConfig
    state: AgentState
    pool: ProcessServerPool
    source: SourceDisk
    geometry: Geometry
    executor: ThreadPoolExecutor
    send: Callable[[wire.Frame], None]
    mark_pending: MarkPending
    #: one appender at a time: a group of requests, a resync batch, or a tag round
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stream: ReplicationStream | None = None
    #: what needs a resync, and the flags batches carry meanwhile
    window: ResyncWindow = field(default_factory=ResyncWindow)
    #: the highest request id seen from the plugin
    received_rid: int = 0
    stats: CaptureStats = field(default_factory=CaptureStats)
    #: what the supervisor starts once the stream is down (None: reopen it at once)
    next_stream: NewGeneration | Reopen | None = None
    _overflow: bool = False
    _ship_actions: deque[ShipAction] = field(default_factory=deque)
    _failures: dict[int, BaseException] = field(default_factory=dict)
    #: what the master target is known to hold from before the current
    #: generation: a pass compares digests only once it is applied
    floor: StreamPosition = NOTHING_YET
    #: grows at every change of the stream, the mode or the pending regions
    version: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def journal_dir(self) -> Path:
        return self.config.state_dir / "journal" / self.disk_id

    @property
    def journal_max_bytes(self) -> int:
        return self.config.capture.journal_max_bytes

    @property
    def mode(self) -> Mode:
        if self.stream is None:
            return Mode.DOWN
        return Mode.OVERFLOW if self._overflow else Mode.JOURNALING

    def changed(self) -> None:
        """Wake whoever waits for the stream, the mode or the pending regions to change."""
        self.version += 1
        self._changed.set()

    async def wait_change(self, seen: int) -> None:
        """Until :attr:`version` is no longer ``seen`` (read it before looking at the state)."""
        while self.version == seen:
            self._changed.clear()
            await self._changed.wait()

    # --- requests ------------------------------------------------------------------------

    def received(self, request: Request) -> None:
        """A request came from the plugin (before it is committed)."""
        frame = request.frame
        self.received_rid = max(self.received_rid, frame.rid)
        if frame.type is wire.FrameType.WRITE:
            self.stats.write_requests += 1
        elif frame.flags & wire.WriteFlags.TRIM:
            self.stats.trim_requests += 1
        else:
            self.stats.zero_requests += 1
        self.stats.requested_bytes += frame.length

    def failed(self, frame: wire.Frame) -> None:
        """The source write of a request failed: its range needs a resync."""
        self.received_rid = max(self.received_rid, frame.rid)
        self.stats.failed_requests += 1
        self.window.source_failed(self.geometry.regions_of(frame.offset, frame.length))
        self.changed()

    async def commit(self, requests: Sequence[Request]) -> wire.AckStatus:
        """Journal ``requests`` as batches (group commit), or leave their regions dirty."""
        async with self.lock:
            stream = self.stream
            if stream is None or self._full(stream):
                return self._leave_dirty(requests)
            records = [record for request in requests for record in records_of(request)]
            capture_ns = (requests[0].received_ns, requests[-1].received_ns)
            flags = self.window.live_flags()
            try:
                data, zeros = await self.append_batches(stream, records, flags, capture_ns)
            except BlockreplError as exc:
                self.report_failure(stream, exc)
                return self._leave_dirty(requests)
            # A generator: the regions are worked out only while a pass needs their stamps.
            geometry = self.geometry
            self.window.journaled(
                region
                for request in requests
                for region in geometry.regions_of(request.frame.offset, request.frame.length)
            )
            shipped = wire.Frame(wire.FrameType.SHIPPED, rid=requests[-1].rid)
            self._ship_actions.append(ShipAction(stream.generation, stream.end_seq, shipped))
            self.stats.journaled_requests += len(requests)
            self.stats.data_bytes += data
            self.stats.zero_bytes += zeros
            return wire.AckStatus.JOURNALED

    async def append_batches(
        self,
        stream: ReplicationStream,
        records: Sequence[Record],
        flags: StreamFlags,
        capture_ns: tuple[int, int],
        *,
        final_flags: StreamFlags | None = None,
    ) -> tuple[int, int]:
        """Append ``records`` in as many batches as they need; the last gets ``final_flags``.

        Returns:
            The bytes of WRITE data and of ZERO ranges appended.
        """
        batches = list(pack(records, BATCH_PAYLOAD_BYTES))
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            await stream.append(
                batch,
                flags=final_flags if last and final_flags is not None else flags,
                first_capture_ns=capture_ns[0],
                last_capture_ns=capture_ns[1],
                kind=EntryKind.INLINE,
                wait=False,
            )
            self.stats.batches += 1
        data = sum(r.length for r in records if isinstance(r, Write))
        zeros = sum(r.length for r in records if isinstance(r, Zero))
        return data, zeros

    def _full(self, stream: ReplicationStream) -> bool:
        """Whether the journal is over its bound (with a way back at half of it)."""
        used = stream.journal_bytes
        if not self._overflow and used >= self.journal_max_bytes:
            self._overflow = True
            self.stats.overflows += 1
            log.warning(
                "disk %s: the journal holds %d bytes, its limit (capture.journal_max_bytes): "
                "writes are now only marked dirty, and resynced once it drained",
                self.disk_id,
                used,
            )
            self.changed()
        elif self._overflow and used <= self.journal_max_bytes // 2:
            self._overflow = False
            log.info("disk %s: the journal drained to %d bytes, journaling", self.disk_id, used)
            self.changed()
        return self._overflow

    def _leave_dirty(self, requests: Sequence[Request]) -> wire.AckStatus:
        self.window.left_dirty(regions_of(self.geometry, requests))
        self.stats.dirty_requests += len(requests)
        self.changed()
        return wire.AckStatus.DIRTY

    # --- tags ----------------------------------------------------------------------------

    async def append_tag(self, tag: Tag) -> tuple[int, int, bool]:
        """Append a TAG record; the caller holds :attr:`lock` (a tag round's hold).

        Returns:
            The tag's generation and seq, and whether the point is consistent
            (no resync window open).

        Raises:
            StreamBrokenError: there is no stream to put it in now.
        """
        stream = self.stream
        if stream is None:
            raise StreamBrokenError(f"disk {self.disk_id}: no stream is up to put the tag in")
        now = time.time_ns()
        flags, consistent = self.window.tag()
        await self.append_batches(stream, [tag], flags, (now, now))
        self.stats.tags += 1
        return stream.generation, stream.end_seq, consistent

    # --- the stream's life -----------------------------------------------------------------

    def report_failure(self, stream: ReplicationStream, exc: BaseException) -> None:
        """An append on ``stream`` failed: the supervisor takes it down."""
        self._failures.setdefault(id(stream), exc)
        self.changed()

    def has_failed(self, stream: ReplicationStream) -> bool:
        """Whether an append on ``stream`` failed (the supervisor has not taken it yet)."""
        return id(stream) in self._failures

    def take_failure(self, stream: ReplicationStream) -> BaseException | None:
        """The failure reported for ``stream``, now forgotten."""
        return self._failures.pop(id(stream), None)

    def forget_ship_actions(self) -> None:
        """A new generation starts: nothing of the old one will be shipped."""
        self._ship_actions.clear()

    async def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.close()

    # --- what the master target holds ------------------------------------------------------

    def after_ship(self, generation: int, seq: int, frame: wire.Frame) -> None:
        """Send ``frame`` to the plugin once the master target holds ``seq`` of ``generation``."""
        self._ship_actions.append(ShipAction(generation, seq, frame))

    async def notify_shipped(self) -> None:
        """Tell the plugin what became clean, as the master target receives batches (forever)."""
        while True:
            await asyncio.sleep(SHIP_POLL_S)
            stream = self.stream
            if stream is None:
                continue
            self._full(stream)  # an overflow ends once the journal drained, writes or not
            shipped: wire.Frame | None = None
            while self._ship_actions:
                head = self._ship_actions[0]
                if head.generation != stream.generation:
                    self._ship_actions.popleft()  # of a generation given up: never shipped
                    continue
                if head.seq > stream.trimmed_seq:
                    break
                self._ship_actions.popleft()
                if head.frame.type is wire.FrameType.SHIPPED:
                    shipped = head.frame  # only the latest SHIPPED matters
                    continue
                if shipped is not None:
                    self.send(shipped)
                    shipped = None
                self.send(head.frame)
            if shipped is not None:
                self.send(shipped)

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        stream = self.stream
        return {
            "disk": self.disk_id,
            "mode": self.mode.value,
            "generation": stream.generation if stream else None,
            "end_seq": stream.end_seq if stream else None,
            "acked_seq": stream.acked_seq if stream else None,
            "shipped_seq": stream.trimmed_seq if stream else None,
            "journal_bytes": stream.journal_bytes if stream else None,
            "journal_max_bytes": self.journal_max_bytes,
            "window_open": self.window.is_open,
            "pending_regions": self.window.pending_regions,
            "resyncing_regions": self.window.resyncing_regions,
            "region_bytes": self.geometry.region_bytes,
            "size_bytes": self.geometry.disk_bytes,
            "received_rid": self.received_rid,
            "stats": dict(vars(self.stats)),
        }

    def baseline(self, stream: ReplicationStream) -> StreamPosition:
        """What the master target must have applied before a pass compares digests:
        everything journaled so far, or, before anything was in this generation, what
        was shipped of the last one."""
        if stream.end_seq == 0:
            return self.floor
        return StreamPosition(stream.generation, stream.end_seq)
