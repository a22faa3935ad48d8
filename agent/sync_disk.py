"""Syncing one disk from start to finish: what ``blockrepl agent sync`` runs.

1. Check the target: the master target's disk must be exactly as large as
   the source (two digest requests, through the process server).
2. Find where the stream stands. The agent's generation goes on if the
   process server and the master target agree with its state; otherwise
   (no state yet, ``resync_required``, a newer generation there, seqs there
   that this agent never gave out) a new generation starts and the whole
   disk is compared.
3. Resume the pass under way, or start one: first deliver what the journal
   holds, so the target's digests can be taken after it (the baseline).
4. Run the pass (agent/sync.py), then wait until the master target has
   received every batch (the process server's ``shipped_seq``); the journal
   is then empty.

A pass that cannot finish in its generation (the stream broke, or a batch
could not be sent again exactly because the source changed) is retried in a
new generation, :data:`PASS_ATTEMPTS` times at most.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from agent.capture.dirty import (
    CleanMarker,
    create_map,
    forget_map,
    map_path,
    marker_path,
    write_marker,
)
from agent.client import ProcessServerClient
from agent.config import AgentConfig
from agent.errors import (
    JournalError,
    RefusedError,
    SourceChangedError,
    StreamBrokenError,
    TargetMismatchError,
)
from agent.pool import ProcessServerPool
from agent.source import SourceDisk
from agent.state import AgentState, DiskLock, SyncProgress
from agent.stream import ReplicationStream
from agent.sync import PassStats, SyncPass, executors
from agent.sync_output import SyncOutput
from protocol.sequencing import StreamPosition
from runtime.errors import InvalidArgumentError
from runtime.tls import client_context

log = logging.getLogger("blockrepl.agent.sync")

#: Passes tried before giving up: a second pass in a new generation mends a
#: broken stream; a third failure means something keeps breaking it (a
#: source written to while it is synced, a master target that keeps
#: quarantining), which an operator must look at.
PASS_ATTEMPTS: Final = 3
#: The smallest chunk the master target hashes: the size probes use it.
PROBE_CHUNK: Final = 4096
NO_BASELINE: Final = StreamPosition(0, 0)


@dataclass(frozen=True)
class SyncReport:
    """What a sync did; ``--json`` prints it as it is."""

    disk: str
    source: str
    size_bytes: int
    generation: int
    first_seq: int
    last_seq: int
    new_generation: bool
    resumed: bool
    resumed_from: int
    chunk_bytes: int
    region_bytes: int
    compared_bytes: int
    differing_chunks: int
    data_bytes: int
    zero_bytes: int
    sent_bytes: int
    resent_bytes: int
    hash_bytes: int
    hash_requests: int
    batches: int
    requests: int
    dense_spans: int
    sparse_spans: int
    failovers: int
    attempts: int
    process_server: str
    elapsed_s: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class _Start:
    stream: ReplicationStream
    progress: SyncProgress
    new_generation: bool
    resumed: bool


#: Called as the pass goes: bytes compared, of the disk's total, bytes sent, and the
#: phase when it is not comparing.
Reporter = Callable[[int, int, int, str], None]


async def sync_disk(
    config: AgentConfig, disk_id: str, source_path: Path | None, *, report: Reporter
) -> SyncReport:
    """Bring disk ``disk_id``'s target up to date with its source, and return what it took.

    Raises:
        InvalidArgumentError: the disk is not configured, or no source is given.
        SourceError, TargetMismatchError, RefusedError, ProcessServerUnavailableError,
        StreamBrokenError, DiskBusyError, DurabilityError: see agent/errors.py.
    """
    disk = config.disk(disk_id)
    if disk is None:
        known = ", ".join(d.id for d in config.disks) or "none"
        raise InvalidArgumentError(
            f"disk {disk_id!r} is not in the agent's config (its disks: {known})"
        )
    path = source_path or disk.source
    if path is None:
        raise InvalidArgumentError(
            f"no source for disk {disk_id}: give --source or set source in its [[disks]] table"
        )
    started = time.monotonic()
    lock = DiskLock(config.state_dir, disk_id)
    try:
        with SourceDisk(path) as source, executors() as (general, hashing):
            state = AgentState(config.state_dir)
            pool = ProcessServerPool(
                config.process_servers,
                client_context(config.tls),
                request_timeout_s=config.request_timeout_s,
                connect_timeout_s=config.connect_timeout_s,
                in_flight_per_disk=config.in_flight_per_disk,
                give_up_after_s=config.give_up_after_s,
            )
            try:
                run = _SyncRun(
                    config=config,
                    disk_id=disk_id,
                    source=source,
                    state=state,
                    pool=pool,
                    general=general,
                    hashing=hashing,
                    report=report,
                )
                return await run.attempts(started)
            finally:
                await pool.close()
                state.close()
    finally:
        lock.release()


class _SyncRun:
    def __init__(
        self,
        *,
        config: AgentConfig,
        disk_id: str,
        source: SourceDisk,
        state: AgentState,
        pool: ProcessServerPool,
        general: ThreadPoolExecutor,
        hashing: ThreadPoolExecutor,
        report: Reporter,
    ) -> None:
        self.config = config
        self.disk_id = disk_id
        self.source = source
        self.state = state
        self.pool = pool
        self.general = general
        self.hashing = hashing
        self.report = report
        self.journal_dir = config.state_dir / "journal" / disk_id

    async def attempts(self, started: float) -> SyncReport:
        # What live capture knew of the disk's dirty regions does not hold
        # while the disk is compared: a capture after an interrupted sync
        # compares the whole disk; after a finished one, nothing.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.general, forget_map, self.config.state_dir, self.disk_id)
        force_new = False
        for attempt in range(1, PASS_ATTEMPTS + 1):
            try:
                return await self._attempt(attempt, force_new=force_new, started=started)
            except (StreamBrokenError, SourceChangedError) as exc:
                if attempt == PASS_ATTEMPTS:
                    raise
                log.warning(
                    "disk %s: %s; starting a new generation and comparing the whole disk again",
                    self.disk_id,
                    exc.message,
                )
                force_new = True
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, attempt: int, *, force_new: bool, started: float) -> SyncReport:
        applied = await self._probe_target()
        begin = await self._begin(applied, force_new=force_new)
        stream = begin.stream
        try:
            first_seq = stream.end_seq + 1
            settings = self.config.sync
            output = SyncOutput(self.disk_id, self.source, stream, self.state, self.general)
            sync = SyncPass(
                disk_id=self.disk_id,
                source=self.source,
                pool=self.pool,
                progress=begin.progress,
                region_bytes=settings.region_bytes,
                batch_bytes=settings.batch_bytes,
                hash_executor=self.hashing,
                output=output,
                on_progress=lambda done: self._progress(done, stream, ""),
            )
            await sync.run()
            self._progress(self.source.size, stream, "waiting for the master target")
            await stream.wait_shipped()
            marker = CleanMarker(stream.generation, stream.end_seq)
            await asyncio.get_running_loop().run_in_executor(
                self.general, self._leave_clean, marker
            )
            return self._report(begin, sync.stats, first_seq, attempt, started)
        finally:
            await stream.close()

    def _leave_clean(self, marker: CleanMarker) -> None:
        """The target equals the source: a capture may start from a clean dirty map."""
        state_dir = self.config.state_dir
        create_map(map_path(state_dir, self.disk_id), self.source.size, dirty=False)
        write_marker(marker_path(state_dir, self.disk_id), marker)

    def _progress(self, done: int, stream: ReplicationStream, phase: str) -> None:
        self.report(done, self.source.size, stream.stats.sent_bytes, phase)

    def _report(
        self, begin: _Start, stats: PassStats, first_seq: int, attempt: int, started: float
    ) -> SyncReport:
        stream = begin.stream
        last = stream.end_seq
        return SyncReport(
            disk=self.disk_id,
            source=str(self.source.path),
            size_bytes=self.source.size,
            generation=stream.generation,
            first_seq=first_seq if last >= first_seq else 0,
            last_seq=last,
            new_generation=begin.new_generation,
            resumed=begin.resumed,
            resumed_from=begin.progress.cursor if begin.resumed else 0,
            chunk_bytes=begin.progress.chunk_bytes,
            region_bytes=self.config.sync.region_bytes,
            compared_bytes=stats.compared_bytes,
            differing_chunks=stats.differing_chunks,
            data_bytes=stats.data_bytes,
            zero_bytes=stats.zero_bytes,
            sent_bytes=stream.stats.sent_bytes,
            resent_bytes=stream.stats.resent_bytes,
            hash_bytes=stats.hash_bytes,
            hash_requests=stats.hash_requests,
            batches=stats.batches,
            requests=stream.stats.requests,
            dense_spans=stats.dense_spans,
            sparse_spans=stats.sparse_spans,
            failovers=self.pool.failovers,
            attempts=attempt,
            process_server=self.pool.current.url,
            elapsed_s=round(time.monotonic() - started, 3),
        )

    async def _probe_target(self) -> StreamPosition:
        """Check the target's size against the source's; the target's applied position.

        Raises:
            TargetMismatchError: the sizes differ.
            RefusedError: the master target does not replicate the disk, or
                this machine may not write it.
        """
        size = self.source.size
        applied = NO_BASELINE

        def keep(position: StreamPosition, _: bytes) -> None:
            nonlocal applied
            applied = position

        async def last_byte(client: ProcessServerClient) -> int:
            return await client.checksums(
                self.disk_id, offset=size - 1, length=1, chunk=PROBE_CHUNK, sink=keep
            )

        async def past_end(client: ProcessServerClient) -> int:
            return await client.checksums(
                self.disk_id, offset=size, length=1, chunk=PROBE_CHUNK, sink=keep
            )

        try:
            await self.pool.call(last_byte)
        except RefusedError as exc:
            if exc.status != 400:
                raise
            raise TargetMismatchError(
                f"the master target's disk {self.disk_id} is smaller than the source "
                f"{self.source.path} ({size} bytes): {exc.message}"
            ) from exc
        try:
            await self.pool.call(past_end)
        except RefusedError as exc:
            if exc.status != 400:
                raise
            return applied
        raise TargetMismatchError(
            f"the master target's disk {self.disk_id} is larger than the source "
            f"{self.source.path} ({size} bytes): a sync would leave its end as it is; give the "
            "target the source's size"
        )

    async def _begin(self, applied: StreamPosition, *, force_new: bool) -> _Start:
        """The stream to send in, and the pass to run: resumed, new, or in a new generation."""
        stream: ReplicationStream | None = None
        if not force_new:
            try:
                stream = ReplicationStream.open(
                    self.disk_id,
                    state=self.state,
                    pool=self.pool,
                    journal_dir=self.journal_dir,
                    source=self.source,
                    executor=self.general,
                )
            except JournalError as exc:
                log.warning("disk %s: %s; a new generation starts", self.disk_id, exc.message)
        at_ps = await self.pool.call(lambda client: client.state(self.disk_id))
        broken = (
            stream is None
            or at_ps.generation > stream.generation
            or (at_ps.resync_required and at_ps.generation == stream.generation)
            or (at_ps.generation == stream.generation and at_ps.acked_seq > stream.end_seq)
            or applied.generation > stream.generation
        )
        chunk = self.config.sync.chunk_bytes
        if broken:
            known = max(stream.generation if stream else 0, at_ps.generation, applied.generation)
            stream = await self._new_generation(known)
            progress = self._new_progress(stream.generation, chunk, NO_BASELINE)
            await self._save(progress)
            stream.start()
            return _Start(stream, progress, new_generation=True, resumed=False)
        assert stream is not None
        stream.start()
        saved = self.state.sync(self.disk_id)
        if saved is not None and (
            saved.generation,
            saved.source,
            saved.source_size,
            saved.chunk_bytes,
        ) == (stream.generation, str(self.source.path), self.source.size, chunk):
            log.info("disk %s: resuming the sync from byte %d", self.disk_id, saved.cursor)
            return _Start(stream, saved, new_generation=False, resumed=True)
        # What was sent before must be at the master target before the
        # target's digests mean anything.
        self._progress(0, stream, "delivering what the journal holds")
        await stream.wait_shipped()
        baseline = StreamPosition(stream.generation, stream.end_seq)
        progress = self._new_progress(stream.generation, chunk, baseline)
        await self._save(progress)
        return _Start(stream, progress, new_generation=False, resumed=False)

    async def _new_generation(self, known: int) -> ReplicationStream:
        await self._delete_progress()
        return await ReplicationStream.create_after(
            self.disk_id,
            known,
            state=self.state,
            pool=self.pool,
            journal_dir=self.journal_dir,
            source=self.source,
            executor=self.general,
        )

    def _new_progress(self, generation: int, chunk: int, baseline: StreamPosition) -> SyncProgress:
        return SyncProgress(
            generation=generation,
            source=str(self.source.path),
            source_size=self.source.size,
            chunk_bytes=chunk,
            cursor=0,
            window_open=False,
            started_ns=time.time_ns(),
            baseline=baseline,
        )

    async def _save(self, progress: SyncProgress) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.general, self.state.put_sync, self.disk_id, progress)

    async def _delete_progress(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.general, self.state.delete_sync, self.disk_id)
