"""``agent sync``: make the target equal to the source by comparing digests.

One *pass* reads the source once, compares it with the target region by
region (agent/compare.py) and sends only the chunks that differ: all-zero
chunks as ZERO records, the others as WRITEs. Reading and hashing the
source, asking for the target's digests and sending batches run at once:

    source ─ hash (one thread, in disk order) ─┐
                                                ├─ differing chunks ─ batches ─ journal ─ sender
    process server ─ target digests (spans) ────┘

The target's digests of a span are fetched by agent/target_digests.py; the
batches go to the pass's output (agent/sync_output.py: ``agent sync``'s,
or the capture's resync).

Every batch of a pass carries the stream flag RESYNC and the last one
RESYNC_END, so the master target offers no recovery point inside an
unfinished pass and keeps the last good one (docs/design.md invariant 6).

**Resume.** The pass's cursor — every differing chunk before it is in the
journal — is kept durably (agent/state.py); a pass that was interrupted
(Ctrl-C, kill -9, power loss) goes on from its cursor, and the journal
sends what was journaled and not yet received. The flag that a pass has
sent a RESYNC batch is made durable before that batch is journaled, so a
resumed pass always ends the window it opened.

**What the digests are taken at.** A chunk's target digest is compared only
if the master target had applied everything sent before the pass started
(the *baseline*; the digest answer says what was applied), or data still on
its way could change the chunk after it was found equal. The pass's own
batches touch only regions already compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Final

from agent.compare import (
    ComparePlan,
    Granularity,
    RangesPlan,
    Region,
    Span,
    differing_chunks,
    hash_region,
    runs,
)
from agent.pool import ProcessServerPool
from agent.source import READ_PIECE_BYTES, SourceDisk
from agent.state import SyncProgress
from agent.sync_output import PassOutput
from agent.target_digests import SpanDigests
from protocol.limits import MAX_RECORDS_PER_BATCH, MAX_WRITE_BYTES, MAX_ZERO_BYTES
from protocol.records import Write, Zero, encoded_size

log = logging.getLogger("blockrepl.agent.sync")

#: Regions compared ahead of the one whose chunks are being sent: the source
#: is read and the target's digests fetched while batches go out.
REGIONS_AHEAD: Final = 4
#: Seconds between saves of the cursor while regions compare equal: an
#: interrupted pass of a large, unchanged disk repeats at most this much.
CURSOR_SAVE_S: Final = 1.0
#: Seconds a batch waits for more records before it is journaled and sent
#: (all but its last record, kept to carry RESYNC_END): the sender is not left
#: idle while the comparison goes on, and the last batch of a pass is small.
BATCH_LINGER_S: Final = 0.2
#: Bytes read from the source at a time for sending: one WRITE at most.
READ_FOR_SEND_BYTES: Final = MAX_WRITE_BYTES
#: Bytes of differing chunks read in one call on a thread: scattered chunks
#: cost one hand-off each otherwise, and the comparison waits for them.
READ_GROUP_BYTES: Final = 16 * 2**20


@dataclass
class PassStats:
    """What one run of a pass did."""

    compared_bytes: int = 0
    differing_chunks: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    hash_bytes: int = 0
    hash_requests: int = 0
    batches: int = 0
    dense_spans: int = 0
    sparse_spans: int = 0


@dataclass(frozen=True, slots=True)
class RegionDiff:
    region: Region
    chunks: list[int]


@dataclass
class SyncPass:
    """One pass of a sync over ``source``, from ``progress.cursor`` to the end
    (or over the ranges of ``plan``).

    Args:
        output: where the records go (:class:`SyncOutput` for ``agent sync``).
        plan: which parts of the disk to compare; the whole disk from the
            cursor by default.
        on_progress: called with the bytes compared so far (resumed part
            included) after each region.
    """

    disk_id: str
    source: SourceDisk
    pool: ProcessServerPool
    progress: SyncProgress
    region_bytes: int
    batch_bytes: int
    hash_executor: ThreadPoolExecutor
    output: PassOutput
    plan: ComparePlan | RangesPlan | None = None
    on_progress: Callable[[int], None] = lambda _: None
    stats: PassStats = field(default_factory=PassStats)
    _records: list[Write | Zero] = field(default_factory=list)
    _payload: int = 0
    _capture_ns: tuple[int, int] = (0, 0)
    _processed_to: int = 0
    _opened_at: float = 0.0
    _saved_at: float = 0.0
    _spans: list[SpanDigests] = field(default_factory=list)
    _observed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def chunk(self) -> int:
        return self.progress.chunk_bytes

    async def run(self) -> None:
        """Compare and send to the end of the source, then end the pass.

        Raises:
            SourceError, StreamBrokenError, ProcessServerUnavailableError,
            RefusedError, DurabilityError: the pass stops; its cursor is kept.
        """
        self._processed_to = self.progress.cursor
        buffer = bytearray(READ_PIECE_BYTES)
        plan = self.plan or ComparePlan(
            self.progress.cursor, self.source.size, self.region_bytes, self.chunk
        )
        queue: asyncio.Queue[asyncio.Future[RegionDiff] | None] = asyncio.Queue(REGIONS_AHEAD)
        producer = asyncio.create_task(self._produce(plan, queue, buffer), name="compare")
        try:
            while (task := await queue.get()) is not None:
                await self._emit(await task)
            await producer
        finally:
            producer.cancel()
            while not queue.empty():
                if (task := queue.get_nowait()) is not None:
                    task.cancel()
                    # A region that failed already: its error is the one raised, or moot.
                    task.add_done_callback(lambda t: t.cancelled() or t.exception())
            for span in self._spans:
                span.cancel()
        await self._end()

    async def _produce(
        self,
        plan: ComparePlan | RangesPlan,
        queue: asyncio.Queue[asyncio.Future[RegionDiff] | None],
        buffer: bytearray,
    ) -> None:
        try:
            while True:
                while not plan.decided:
                    self._observed.clear()
                    await self._observed.wait()
                if (span := plan.next_span()) is None:
                    break
                if span.granularity is Granularity.CHUNK:
                    self.stats.dense_spans += 1
                else:
                    self.stats.sparse_spans += 1
                fetch = self._fetch(span)
                for index, region in enumerate(span.regions):
                    diff = self._diff(plan, fetch, index, region, buffer)
                    await queue.put(asyncio.create_task(diff))
        except Exception as exc:  # the consumer raises it in order
            failed: asyncio.Future[RegionDiff] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            await queue.put(failed)
        await queue.put(None)

    def _fetch(self, span: Span) -> SpanDigests:
        self._spans = [s for s in self._spans if not s.done]
        fetch = SpanDigests(
            span,
            disk_id=self.disk_id,
            pool=self.pool,
            chunk_bytes=self.chunk,
            region_bytes=self.region_bytes,
            baseline=self.progress.baseline,
            stats=self.stats,
        )
        self._spans.append(fetch)
        return fetch

    async def _diff(
        self,
        plan: ComparePlan | RangesPlan,
        fetch: SpanDigests,
        index: int,
        region: Region,
        buffer: bytearray,
    ) -> RegionDiff:
        """Which chunks of ``region`` differ; the plan learns whether any did as soon as known."""
        loop = asyncio.get_running_loop()
        sparse = fetch.span.granularity is Granularity.REGION
        source = await loop.run_in_executor(
            self.hash_executor,
            partial(hash_region, self.source, region, self.chunk, buffer, whole=sparse),
        )
        target = await fetch.digests(index)
        if sparse:
            self._observe(plan, differed=target != source.whole)
            if target == source.whole:
                return RegionDiff(region, [])
            target = await self._fetch(Span((region,), Granularity.CHUNK)).digests(0)
        chunks = differing_chunks(source.chunks, target)
        if not sparse:
            self._observe(plan, differed=bool(chunks))
        return RegionDiff(region, chunks)

    def _observe(self, plan: ComparePlan | RangesPlan, *, differed: bool) -> None:
        plan.observe(differed)
        self._observed.set()

    async def _emit(self, diff: RegionDiff) -> None:
        self.stats.differing_chunks += len(diff.chunks)
        pieces: list[tuple[int, int]] = []
        for first, count in runs(diff.chunks):
            start = diff.region.offset + first * self.chunk
            end = min(diff.region.end, start + count * self.chunk)
            for piece in range(start, end, READ_FOR_SEND_BYTES):
                pieces.append((piece, min(READ_FOR_SEND_BYTES, end - piece)))
        for group in _groups(pieces, READ_GROUP_BYTES):
            datas = await self.output.read(group)
            now = time.time_ns()
            for (offset, _), data in zip(group, datas, strict=True):
                for record in records_of(offset, data, self.chunk):
                    await self._add(record, now)
        await self._flush_lingering()
        self.stats.compared_bytes += diff.region.length
        self._processed_to = diff.region.end
        self.on_progress(self._processed_to)
        if time.monotonic() - self._saved_at >= CURSOR_SAVE_S:
            await self._save(self._records[0].offset if self._records else self._processed_to)

    async def _flush_lingering(self) -> None:
        """Journal the open batch, but its last record, if it waited long enough."""
        if len(self._records) < 2 or time.monotonic() - self._opened_at < BATCH_LINGER_S:
            return
        kept = self._records.pop()
        await self._journal(final=False, cursor=kept.offset)
        self._records, self._payload = [kept], encoded_size(kept)
        self._capture_ns = (self._capture_ns[1], self._capture_ns[1])
        self._opened_at = time.monotonic()

    async def _add(self, record: Write | Zero, capture_ns: int) -> None:
        last = self._records[-1] if self._records else None
        if (
            isinstance(record, Zero)
            and isinstance(last, Zero)
            and last.offset + last.length == record.offset
            and last.length + record.length <= MAX_ZERO_BYTES
        ):
            self._records[-1] = Zero(last.offset, last.length + record.length)
            self.stats.zero_bytes += record.length
            return
        size = encoded_size(record)
        if self._records and (
            self._payload + size > self.batch_bytes or len(self._records) >= MAX_RECORDS_PER_BATCH
        ):
            await self._journal(final=False, cursor=record.offset)
        if not self._records:
            self._capture_ns = (capture_ns, capture_ns)
            self._opened_at = time.monotonic()
        self._records.append(record)
        self._payload += size
        self._capture_ns = (self._capture_ns[0], capture_ns)
        if isinstance(record, Write):
            self.stats.data_bytes += record.length
        elif isinstance(record, Zero):
            self.stats.zero_bytes += record.length

    async def _journal(self, *, final: bool, cursor: int) -> None:
        """Journal the open batch; then every differing chunk before ``cursor`` is journaled."""
        if not self.progress.window_open:
            # Durable before the first RESYNC batch: a resumed pass must end the window.
            await self._save(self.progress.cursor, window_open=True)
        await self.output.append(self._records, final=final, capture_ns=self._capture_ns)
        self.stats.batches += 1
        self._records, self._payload = [], 0
        if not final:
            await self._save(cursor)

    async def _save(self, cursor: int, *, window_open: bool | None = None) -> None:
        opened = self.progress.window_open if window_open is None else window_open
        moved = SyncProgress(
            self.progress.generation,
            self.progress.source,
            self.progress.source_size,
            self.chunk,
            cursor,
            opened,
            self.progress.started_ns,
            self.progress.baseline,
        )
        await self.output.save(moved)
        self.progress = moved
        self._saved_at = time.monotonic()

    async def _end(self) -> None:
        """Journal the last batch with RESYNC_END; the pass is then over."""
        if not self._records and self.progress.window_open:
            # Nothing left to send, but the window is open: send the disk's
            # last chunk again, as it reads now, to carry RESYNC_END.
            offset = (self.source.size - 1) // self.chunk * self.chunk
            (data,) = await self.output.read([(offset, self.source.size - offset)])
            for record in records_of(offset, data, self.chunk):
                self._records.append(record)
            self._capture_ns = (time.time_ns(), time.time_ns())
        if self._records:
            await self._journal(final=True, cursor=self.source.size)
        await self.output.finish()


def _groups(pieces: list[tuple[int, int]], most: int) -> Iterator[list[tuple[int, int]]]:
    """``pieces`` (offset, length) in order, in groups of at most ``most`` bytes (or one)."""
    group: list[tuple[int, int]] = []
    size = 0
    for piece in pieces:
        if group and size + piece[1] > most:
            yield group
            group, size = [], 0
        group.append(piece)
        size += piece[1]
    if group:
        yield group


def records_of(offset: int, data: bytearray, chunk: int) -> Iterator[Write | Zero]:
    """ZERO records for the all-zero chunks of ``data``, WRITEs for the rest, merged."""
    view = memoryview(data)
    zeros = bytes(chunk)
    run_start, run_zero = 0, None
    for start in range(0, len(data), chunk):
        piece = view[start : start + chunk]
        is_zero = bytes(piece) == zeros[: len(piece)]
        if run_zero is None:
            run_zero = is_zero
        elif is_zero != run_zero:
            yield _record(offset, view, run_start, start, zero=run_zero)
            run_start, run_zero = start, is_zero
    if run_zero is not None:
        yield _record(offset, view, run_start, len(data), zero=run_zero)


def _record(offset: int, view: memoryview, start: int, end: int, *, zero: bool) -> Write | Zero:
    if zero:
        return Zero(offset + start, end - start)
    return Write(offset + start, view[start:end])


@contextlib.contextmanager
def executors() -> Iterator[tuple[ThreadPoolExecutor, ThreadPoolExecutor]]:
    """Threads for journal, state and sending reads; one thread that hashes in disk order."""
    general = ThreadPoolExecutor(max_workers=4, thread_name_prefix="agent-io")
    hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-hash")
    try:
        yield general, hashing
    finally:
        general.shutdown(wait=True, cancel_futures=True)
        hashing.shutdown(wait=True, cancel_futures=True)
