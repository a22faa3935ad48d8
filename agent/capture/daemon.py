"""``blockrepl agent capture``: one disk's live write capture, as a daemon.

The process owns nbdkit as a child (export.py; ``--exit-with-parent``: it
does not outlive the agent), talks to its plugin over a socketpair
(plugin/wire.py), and runs, on one event loop:

- the intake: the plugin's requests, committed in groups (intake.py);
- the supervisor: the disk's stream, started, watched and replaced
  (supervisor.py);
- the shipped watch: which regions the master target now holds;
- the resync: passes over the pending regions (resync.py);
- the control socket: status and tag rounds (control.py).

At start it decides what the dirty map means (dirty.py): after a clean stop
its regions are covered by the journal; after anything else they are
resynced; without a usable map, or without a stream yet, the whole disk is
compared. It tells systemd READY=1 once nbdkit listens.

SIGTERM: the control socket closes, nbdkit stops accepting and finishes the
requests in flight (each answered once journaled), the plugin flushes the
map, the journal is durable; a clean stop leaves the clean marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from agent.capture.control import MAX_SOCKET_PATH_BYTES, ControlServer, control_path
from agent.capture.dirty import (
    CleanMarker,
    capture_dir,
    create_map,
    load_map,
    map_path,
    marker_path,
    take_marker,
    write_marker,
)
from agent.capture.export import Listen, NbdkitExport, find_nbdkit, parse_listen
from agent.capture.intake import Intake
from agent.capture.plugin import wire
from agent.capture.plugin.dirtymap import Geometry, merge_regions
from agent.capture.replication import CaptureReplication, NewGeneration
from agent.capture.resync import run_resyncs
from agent.capture.supervisor import supervise
from agent.config import AgentConfig
from agent.errors import CaptureError, JournalError
from agent.pool import ProcessServerPool
from agent.source import SourceDisk
from agent.state import AgentState, DiskLock
from agent.stream import ReplicationStream
from protocol.errors import BlockreplError
from runtime.errors import InvalidArgumentError
from runtime.tls import client_context

log = logging.getLogger("blockrepl.agent.capture")

#: Seconds the requests received before nbdkit stopped have to be answered
#: (the unit's TimeoutStopSec= covers these and export.NBDKIT_STOP_TIMEOUT_S).
DRAIN_TIMEOUT_S: Final = 20.0
#: How often the stop looks for the last requests answered.
POLL_S: Final = 0.02


class CaptureDaemon:
    """One disk's capture. :meth:`start`, then :meth:`close` (from runtime.service.run_daemon).

    Args:
        config: the agent's config.
        disk_id: the disk, as in the config.
        source_path: the source (default: the disk's ``source`` in the config).
        listen: the NBD export's address.
    """

    def __init__(
        self, config: AgentConfig, disk_id: str, source_path: Path | None, listen: str
    ) -> None:
        self.config = config
        self.disk_id = disk_id
        self._source_path = source_path
        self._listen = listen
        #: what stopped the capture by itself (the command exits with its status)
        self.failure: BlockreplError | None = None
        self.clean_stop = False
        self._closing = False
        self._lock: DiskLock | None = None
        self._source: SourceDisk | None = None
        self._state: AgentState | None = None
        self._pool: ProcessServerPool | None = None
        self._executors: list[ThreadPoolExecutor] = []
        self._export: NbdkitExport | None = None
        self._intake: Intake | None = None
        self.replication: CaptureReplication | None = None
        self._control: ControlServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._resync: asyncio.Task[None] | None = None
        self.listen: Listen | None = None
        #: the status when the capture stopped (the stream is closed after it)
        self._final_status: dict[str, object] = {}

    # --- start -----------------------------------------------------------------------------

    async def start(self) -> CaptureDaemon:
        """Open everything, start nbdkit, and return once it listens.

        Raises:
            InvalidArgumentError, SourceError, CaptureError, DiskBusyError,
            DurabilityError, JournalError: it cannot start (all it opened is closed).
        """
        try:
            await self._start()
        except BaseException:
            self._closing = True
            if self._export is not None:
                await self._export.stop()
            await self._release()
            raise
        return self

    async def _start(self) -> None:
        config = self.config
        disk = config.disk(self.disk_id)
        if disk is None:
            known = ", ".join(d.id for d in config.disks) or "none"
            raise InvalidArgumentError(
                f"disk {self.disk_id!r} is not in the agent's config (its disks: {known})"
            )
        path = self._source_path or disk.source
        if path is None:
            raise InvalidArgumentError(
                f"no source for disk {self.disk_id}: give --source or set source in its "
                "[[disks]] table"
            )
        self.listen = parse_listen(self._listen)
        nbdkit = find_nbdkit(config.capture.nbdkit)
        control = control_path(config.state_dir, self.disk_id)
        if len(os.fsencode(control)) > MAX_SOCKET_PATH_BYTES:
            raise InvalidArgumentError(
                f"the control socket {control} would be longer than {MAX_SOCKET_PATH_BYTES} "
                "bytes, the most a Unix socket name holds: choose a shorter state_dir"
            )
        self._lock = DiskLock(config.state_dir, self.disk_id)
        self._source = SourceDisk(path)
        general = ThreadPoolExecutor(max_workers=4, thread_name_prefix="capture-io")
        hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture-hash")
        self._executors = [general, hashing]
        self._state = AgentState(config.state_dir)
        self._pool = ProcessServerPool(
            config.process_servers,
            client_context(config.tls),
            request_timeout_s=config.request_timeout_s,
            connect_timeout_s=config.connect_timeout_s,
            in_flight_per_disk=config.in_flight_per_disk,
            give_up_after_s=config.give_up_after_s,
            gives_up=False,  # a service: the journal rides out any outage (docs/operations.md)
        )
        loop = asyncio.get_running_loop()
        geometry, dirty, marker = await loop.run_in_executor(general, self._prepare_map)
        replication = CaptureReplication(
            disk_id=self.disk_id,
            config=config,
            state=self._state,
            pool=self._pool,
            source=self._source,
            geometry=geometry,
            executor=general,
            send=self._send,
            mark_pending=self._mark_pending,
        )
        self.replication = replication
        self._open_stream(replication, dirty, marker)
        pidfile = capture_dir(config.state_dir) / f"{self.disk_id}.pid"
        self._export = NbdkitExport(
            nbdkit, self.listen, pidfile, config.capture.start_timeout_s, self.disk_id
        )
        link = await self._export.start(
            self._source.path, map_path(config.state_dir, self.disk_id), geometry
        )
        self._intake = Intake(link, replication)
        self._tasks = [
            self._spawn(self._intake.read(), "reading the capture socket"),
            self._spawn(self._intake.commit(), "committing requests"),
            self._spawn(supervise(replication), "keeping the stream up"),
            self._spawn(replication.notify_shipped(), "following what is shipped"),
            self._spawn(self._watch_nbdkit(), "watching nbdkit"),
        ]
        self._resync = self._spawn(
            run_resyncs(replication, executor=general, hash_executor=hashing), "resyncing"
        )
        self._control = ControlServer(control, replication, config.capture.hold_max_s, self.status)
        await self._control.start()
        log.info(
            "disk %s: capturing the writes to %s, exported over NBD at %s",
            self.disk_id,
            path,
            self.listen,
        )

    def _prepare_map(self) -> tuple[Geometry, list[int], CleanMarker | None]:
        """The dirty map as it can be trusted, and the clean marker (taken)."""
        assert self._state is not None
        assert self._source is not None
        state_dir = self.config.state_dir
        capture_dir(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        marker = take_marker(marker_path(state_dir, self.disk_id))
        size = self._source.size
        loaded = load_map(map_path(state_dir, self.disk_id), size)
        record = self._state.stream(self.disk_id)
        syncing = self._state.sync(self.disk_id) is not None
        if loaded is not None and record is not None and not syncing:
            geometry, dirty = loaded
            return geometry, dirty, marker
        if record is None:
            why = "the disk has no stream yet"
        elif syncing:
            why = "an agent sync of it was interrupted"
            self._state.delete_sync(self.disk_id)
        else:
            why = "there is no usable dirty map"
        log.info("disk %s: %s: the whole disk will be compared", self.disk_id, why)
        geometry = create_map(map_path(state_dir, self.disk_id), size, dirty=True)
        return geometry, list(range(geometry.regions)), None

    def _open_stream(
        self, replication: CaptureReplication, dirty: list[int], marker: CleanMarker | None
    ) -> None:
        """The stream as the journal left it, and what must be resynced."""
        assert self._state is not None
        assert self._pool is not None
        stream: ReplicationStream | None = None
        try:
            stream = ReplicationStream.open(
                self.disk_id,
                state=self._state,
                pool=self._pool,
                journal_dir=replication.journal_dir,
                source=None,
                executor=self._executors[0],
            )
        except JournalError as exc:
            log.error("disk %s: %s; a new generation starts", self.disk_id, exc.message)
            replication.next_stream = NewGeneration(full=False)
        if stream is None and replication.next_stream is None:
            replication.next_stream = NewGeneration(full=True)
        geometry = replication.geometry
        clean = stream is not None and marker == CleanMarker(stream.generation, stream.end_seq)
        if clean and stream is not None:
            log.info(
                "disk %s: clean start at generation %d seq %d; %d dirty regions wait for the "
                "journal",
                self.disk_id,
                stream.generation,
                stream.end_seq,
                len(dirty),
            )
            if dirty:
                ranges = wire.encode_ranges(merge_regions(geometry, dirty))
                done = wire.Frame(wire.FrameType.RESYNCED, rid=0, body=ranges)
                replication.after_ship(stream.generation, stream.end_seq, done)
        else:
            replication.window.unclean_start(dirty)
            if dirty and len(dirty) < geometry.regions:
                log.warning(
                    "disk %s: the last stop was not clean: %d dirty regions (%d bytes) will be "
                    "resynced",
                    self.disk_id,
                    len(dirty),
                    len(dirty) * geometry.region_bytes,
                )
        if stream is not None:
            stream.start()
            replication.stream = stream

    # --- running ---------------------------------------------------------------------------

    def _spawn(self, work: Awaitable[None], what: str) -> asyncio.Task[None]:
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except BlockreplError as exc:
                self._fail(exc)
                return
            except Exception as exc:  # a bug: stop with its traceback in the log
                log.exception("disk %s: %s failed", self.disk_id, what)
                self._fail(CaptureError(f"{what} failed: {exc!r}"))
                return
            if not self._closing:
                self._fail(CaptureError(f"{what} ended while capturing"))

        return asyncio.create_task(guarded(), name=what)

    async def _watch_nbdkit(self) -> None:
        assert self._export is not None
        status = await self._export.wait()
        if not self._closing:
            raise CaptureError(f"nbdkit exited with status {status} while capturing")

    def _fail(self, exc: BlockreplError) -> None:
        """Stop the capture by itself (the command then exits with the error's status)."""
        if self._closing or self.failure is not None:
            return
        self.failure = exc
        log.error("disk %s: %s; stopping", self.disk_id, exc.message)
        os.kill(os.getpid(), signal.SIGTERM)

    def _send(self, frame: wire.Frame) -> None:
        link = self._export.link if self._export is not None else None
        if link is not None:
            link.send(frame)

    async def _mark_pending(
        self, ranges: list[tuple[int, int]], rid: int, live: bool
    ) -> list[tuple[int, int]]:
        if self._intake is None:
            raise CaptureError("the capture plugin is not connected yet")
        return await self._intake.mark_pending(ranges, rid, live)

    def status(self) -> dict[str, object]:
        """What the control socket's ``status`` answers."""
        assert self.replication is not None
        return {
            **self.replication.status(),
            "source": str(self._source.path) if self._source else None,
            "listen": str(self.listen),
            "process_server": self._pool.current.url if self._pool else None,
            "process_server_failing_s": round(self._pool.failing_s, 1) if self._pool else None,
        }

    # --- stop ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop cleanly: see the module's docstring."""
        self._closing = True
        if self._control is not None:
            await self._control.close()
        if self._resync is not None:
            self._resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync
        status = await self._export.stop() if self._export is not None else None
        intake = self._intake
        if intake is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(intake.ended.wait(), DRAIN_TIMEOUT_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained(intake), DRAIN_TIMEOUT_S)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        replication = self.replication
        stream = replication.stream if replication is not None else None
        self.clean_stop = (
            status == 0
            and intake is not None
            and intake.bye
            and intake.idle
            and replication is not None
            and stream is not None
            and self.failure is None
            and replication.window.settled
        )
        if replication is not None:
            self._final_status = replication.status()
            await replication.close()
        if self.clean_stop and stream is not None:
            marker = CleanMarker(stream.generation, stream.end_seq)
            write_marker(marker_path(self.config.state_dir, self.disk_id), marker)
            log.info(
                "disk %s: stopped cleanly at generation %d seq %d",
                self.disk_id,
                marker.generation,
                marker.end_seq,
            )
        await self._release()

    @staticmethod
    async def _drained(intake: Intake) -> None:
        while not intake.idle:
            await asyncio.sleep(POLL_S)

    async def _release(self) -> None:
        if self._export is not None:
            self._export.close_link()
        if self._pool is not None:
            await self._pool.close()
        for executor in self._executors:
            executor.shutdown(wait=True, cancel_futures=True)
        if self._state is not None:
            self._state.close()
        if self._source is not None:
            self._source.close()
        if self._export is not None:
            self._export.remove_pidfile()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def report(self) -> dict[str, object]:
        """What the command prints when it ends."""
        return {**self._final_status, "clean_stop": self.clean_stop}
