"""Resyncing the dirty regions of a captured disk while writes go on.

A pass is a sync pass (agent/sync.py) over the pending regions only
(:class:`~agent.compare.RangesPlan`), with :class:`CaptureOutput` as its
output. Three things differ from ``agent sync``:

- its batches are journaled whole (``.brb``): the source keeps changing, so
  a batch sent again could not be read from it again;
- live writes go on. A chunk the pass read may be written, and its live
  request journaled, before the pass's batch is: the batch would then put
  older bytes after newer ones. So each live group commit stamps the regions
  it touched, each read of the pass remembers the stamp it started at, and
  a batch's records whose regions were stamped since are read again from
  the source when the batch is appended — under the append lock, so no live
  request can come in between. Bytes read then are at least as new as any
  live request before them in the stream, and any later one follows them;
- the last batch ends the resync window (RESYNC_END) only if no region was
  left dirty meanwhile; otherwise the window stays open for the next pass.
  A pass runs whenever the window is open, even over no region (a new
  generation that had nothing to mark): it compares nothing and sends the
  disk's last chunk again, as it reads now, to carry RESYNC_END
  (agent/sync.py) — nothing else would ever close the window.

The stamps, the pending regions and the window are kept by
:class:`~agent.capture.window.ResyncWindow`; this module does the I/O.

Once the master target holds the pass, the plugin is told (RESYNCED) that
the pass's regions need no resync for requests up to the one the agent had
seen when the pass started.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

from agent.capture.plugin import wire
from agent.capture.plugin.dirtymap import merge_regions
from agent.capture.records import chunk_ranges
from agent.capture.replication import CaptureReplication, Mode
from agent.capture.window import RESYNC
from agent.compare import RangesPlan
from agent.errors import StreamBrokenError
from agent.state import SyncProgress
from agent.stream import ReplicationStream
from agent.sync import SyncPass, records_of
from protocol.errors import BlockreplError
from protocol.records import Record, Write, Zero

log = logging.getLogger("blockrepl.agent.capture")

#: Seconds before a pass that failed (the stream broke, no process server
#: answered) is tried again; the supervisor mends the stream meanwhile.
PASS_RETRY_S: Final = 2.0
#: A resync batch is at most this share of the journal bound: resync
#: batches wait below half of it, so live writes keep room above.
JOURNAL_SHARE: Final = 4


@dataclass
class CaptureOutput:
    """Where a capture resync pass's records go: see the module's docstring."""

    replication: CaptureReplication
    stream: ReplicationStream
    executor: ThreadPoolExecutor
    #: (offset of a read piece, the live stamp when its read began), by offset
    _reads: list[tuple[int, int]] = field(default_factory=list)
    appended: bool = False

    async def read(self, pieces: list[tuple[int, int]]) -> list[bytearray]:
        stamp = self.replication.window.stamp
        loop = asyncio.get_running_loop()
        source = self.replication.source
        datas = await loop.run_in_executor(
            self.executor, lambda: [source.read(offset, length) for offset, length in pieces]
        )
        for offset, _ in pieces:
            bisect.insort(self._reads, (offset, stamp))
        return datas

    async def append(
        self, records: list[Write | Zero], *, final: bool, capture_ns: tuple[int, int]
    ) -> None:
        replication = self.replication
        half = replication.journal_max_bytes // 2
        await self.stream.wait_until(lambda: self.stream.journal_bytes < half)
        async with replication.lock:
            if replication.stream is not self.stream:
                raise StreamBrokenError(
                    f"disk {replication.disk_id}: the stream changed during the resync pass"
                )
            fresh = await self._refreshed(records)
            flags = replication.window.pass_flags(last=final)
            data, zeros = await replication.append_batches(
                self.stream, fresh, RESYNC, capture_ns, final_flags=flags
            )
            replication.window.pass_appended(flags)
            self.appended = True
            replication.stats.resync_data_bytes += data
            replication.stats.resync_zero_bytes += zeros

    async def save(self, progress: SyncProgress) -> None:
        """Nothing to keep: the dirty map says what is left to resync after a restart."""

    async def finish(self) -> None:
        """Nothing to remove."""

    def _read_stamp(self, offset: int) -> int:
        """The stamp of the latest read of the piece holding ``offset``."""
        at = bisect.bisect_right(self._reads, (offset, 2**63)) - 1
        return self._reads[at][1] if at >= 0 else 0

    async def _refreshed(self, records: Sequence[Write | Zero]) -> list[Record]:
        """``records``, with every part a live request wrote since it was read read again."""
        window = self.replication.window
        geometry = self.replication.geometry
        out: list[Record] = []
        for record in records:
            read_at = self._read_stamp(record.offset)
            stale = window.written_since(geometry.regions_of(record.offset, record.length), read_at)
            if not stale:
                out.append(record)
                continue
            out.extend(await self._reread(record, stale))
        return out

    async def _reread(self, record: Write | Zero, stale: list[int]) -> list[Record]:
        geometry = self.replication.geometry
        chunk = self.replication.config.sync.chunk_bytes
        end = record.offset + record.length
        parts: list[Record] = []
        at = record.offset
        loop = asyncio.get_running_loop()
        for region in stale:
            start, length = geometry.span(region)
            start, stop = max(start, record.offset), min(start + length, end)
            if at < start:
                parts.append(_cut(record, at, start))
            data = await loop.run_in_executor(
                self.executor, self.replication.source.read, start, stop - start
            )
            parts.extend(records_of(start, data, chunk))
            self.replication.stats.resync_refreshed += 1
            at = stop
        if at < end:
            parts.append(_cut(record, at, end))
        return parts


def _cut(record: Write | Zero, start: int, stop: int) -> Write | Zero:
    """The part of ``record`` from byte ``start`` to ``stop`` of the disk."""
    if isinstance(record, Zero):
        return Zero(start, stop - start)
    view = memoryview(record.data)
    return Write(start, view[start - record.offset : stop - record.offset])


async def run_resyncs(
    replication: CaptureReplication,
    *,
    executor: ThreadPoolExecutor,
    hash_executor: ThreadPoolExecutor,
) -> None:
    """Run a pass whenever the window says one is due and the stream can take it (forever)."""
    window = replication.window
    while True:
        seen = replication.version
        stream = replication.stream
        if stream is None or replication.mode is not Mode.JOURNALING or not window.pass_due:
            await replication.wait_change(seen)
            continue
        regions = window.take_pass()
        done = False
        try:
            done = await _pass_on(stream, replication, regions, executor, hash_executor)
        except BlockreplError as exc:
            log.warning(
                "disk %s: the resync of %d regions stopped: %s; it is tried again",
                replication.disk_id,
                len(regions),
                exc.message,
            )
        finally:
            if done:
                window.pass_ended()
            else:
                window.pass_failed()
        if not done:
            await asyncio.sleep(PASS_RETRY_S)


async def _pass_on(
    stream: ReplicationStream,
    replication: CaptureReplication,
    regions: frozenset[int],
    executor: ThreadPoolExecutor,
    hash_executor: ThreadPoolExecutor,
) -> bool:
    """Run a pass on ``stream`` while it is the disk's stream; False if it ended first.

    A pass compares digests only once the master target applied what its
    stream sent before it. When that stream is taken down (a newer
    generation, a journal that cannot go on), what it sent may never arrive,
    and the pass would wait for it for good (the capture never gives up on
    its process servers): it stops, and its regions wait for the next stream.

    Raises:
        BlockreplError: the pass failed on its own.
    """
    running = asyncio.ensure_future(_pass(replication, stream, regions, executor, hash_executor))
    replaced = asyncio.ensure_future(_until_replaced(replication, stream))
    try:
        await asyncio.wait({running, replaced}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        replaced.cancel()
    if running.done():
        running.result()
        return True
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    log.info(
        "disk %s: the resync of %d regions stopped: the stream it ran on ended; the next "
        "stream resyncs them",
        replication.disk_id,
        len(regions),
    )
    return False


async def _until_replaced(replication: CaptureReplication, stream: ReplicationStream) -> None:
    """Until ``stream`` is no longer the disk's stream."""
    while True:
        seen = replication.version
        if replication.stream is not stream:
            return
        await replication.wait_change(seen)


async def _pass(
    replication: CaptureReplication,
    stream: ReplicationStream,
    regions: frozenset[int],
    executor: ThreadPoolExecutor,
    hash_executor: ThreadPoolExecutor,
) -> None:
    config = replication.config
    geometry = replication.geometry
    chunk = config.sync.chunk_bytes
    since_rid = replication.received_rid
    region_ranges = [geometry.span(region) for region in sorted(regions)]
    ranges = chunk_ranges(region_ranges, chunk, geometry.disk_bytes)
    size = sum(length for _, length in ranges)
    if regions:
        log.info(
            "disk %s: resyncing %d regions (%d bytes) from the source",
            replication.disk_id,
            len(regions),
            size,
        )
    else:
        log.info(
            "disk %s: no region to resync: a pass over none ends the window", replication.disk_id
        )
    progress = SyncProgress(
        generation=stream.generation,
        source=str(replication.source.path),
        source_size=geometry.disk_bytes,
        chunk_bytes=chunk,
        cursor=0,
        window_open=replication.window.is_open,
        started_ns=time.time_ns(),
        baseline=replication.baseline(stream),
    )
    output = CaptureOutput(replication, stream, executor)
    share = replication.journal_max_bytes // JOURNAL_SHARE
    batch_bytes = max(chunk, min(config.sync.batch_bytes, share))
    sync = SyncPass(
        disk_id=replication.disk_id,
        source=replication.source,
        pool=replication.pool,
        progress=progress,
        region_bytes=config.sync.region_bytes,
        batch_bytes=batch_bytes,
        hash_executor=hash_executor,
        output=output,
        plan=RangesPlan(ranges, config.sync.region_bytes, chunk),
    )
    await sync.run()
    replication.stats.resync_passes += 1
    replication.stats.resync_regions += len(regions)
    replication.stats.resync_compared_bytes += sync.stats.compared_bytes
    done = wire.Frame(
        wire.FrameType.RESYNCED,
        rid=since_rid,
        body=wire.encode_ranges(merge_regions(geometry, regions)),
    )
    if output.appended:
        replication.after_ship(stream.generation, stream.end_seq, done)
    else:
        # Every region compared equal and nothing was appended: the target
        # holds all of it already (its digests were taken past the baseline).
        replication.send(done)
    log.info(
        "disk %s: resync pass over %d regions done: %d chunks differed, %d bytes sent",
        replication.disk_id,
        len(regions),
        sync.stats.differing_chunks,
        sync.stats.data_bytes + sync.stats.zero_bytes,
    )
