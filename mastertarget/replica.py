"""One replicated disk at the master target: its target and the three owners of its state.

- receiving (mastertarget/receiving.py): admission of a PUT, the durable
  store into the inbox, the received position;
- applying (mastertarget/applying.py): the applier task, which verifies,
  journals and applies the received files in stream order, quarantines,
  pauses and backs off (the policy: mastertarget/apply_policy.py);
- history (mastertarget/history.py): the recovery points, recover,
  failover and pruning.

They share the target behind its lock (mastertarget/guarded_target.py) and
an event that tells the applier there may be work. Everything of their state
is owned by the event loop; the blocking work runs on the executor's threads
and hands its results back (each module says how).

:meth:`DiskReplica.open` loads the disk as a crash left it; :meth:`start`
starts its applier; :meth:`close` stops it after the group in hand and
closes the target. Opening starts no task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from mastertarget.applying import DiskApplier
from mastertarget.config import DiskConfig
from mastertarget.disks import CreateFormat, create_disk, open_disk
from mastertarget.disks.base import TargetDisk
from mastertarget.guarded_target import GuardedTarget
from mastertarget.history import DiskHistory
from mastertarget.inbox import Inbox
from mastertarget.journal import UndoJournal
from mastertarget.metrics import MasterTargetMetrics
from mastertarget.pending import PendingFiles
from mastertarget.points import RecoveryPoint
from mastertarget.receiving import DiskReceiver
from mastertarget.state import DiskRecord, DiskState, StateStore
from protocol.keyring import KeyRing
from protocol.sequencing import StreamPosition
from runtime.service import vital

log = logging.getLogger("blockrepl.mastertarget")
apply_log = logging.getLogger("blockrepl.mastertarget.apply")


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """A snapshot for the state endpoint."""

    disk_id: str
    received: StreamPosition
    applied: StreamPosition
    state: DiskState
    last_error: str
    resync_open: bool
    target_size: int
    inbox_files: int
    inbox_bytes: int
    oldest_ns: int | None


@dataclass(frozen=True, slots=True)
class _Loaded:
    """What a disk's open found on disk."""

    target: TargetDisk
    record: DiskRecord
    pending: PendingFiles


class DiskReplica:
    """One replicated disk: build it with :meth:`open`."""

    def __init__(
        self,
        config: DiskConfig,
        target: GuardedTarget,
        *,
        receiver: DiskReceiver,
        applier: DiskApplier,
        history: DiskHistory,
        executor: Executor,
    ) -> None:
        self.config = config
        self.target = target
        self.receiver = receiver
        self.applier = applier
        self.history = history
        self._executor = executor
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        config: DiskConfig,
        *,
        store: StateStore,
        inbox: Inbox,
        keyring: KeyRing,
        metrics: MasterTargetMetrics,
        executor: Executor,
        journal: UndoJournal | None,
        on_points: Callable[[list[RecoveryPoint]], None] | None = None,
    ) -> DiskReplica:
        """Open the disk's target (creating it if the config says so), and load
        its marker, journal and inbox as a crash left them.

        Args:
            journal: the retention journal, or None to keep no history.
            on_points: told of the consistent points of every applied group.

        Raises:
            DiskError: the target cannot be opened or created.
            DurabilityError: the catalog, the inbox or the journal cannot be read.
        """
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(
            executor, lambda: _load(config, store=store, inbox=inbox, journal=journal)
        )
        target = GuardedTarget(
            loaded.target, opener=lambda: open_disk(config.target, config.format)
        )
        wake = asyncio.Event()
        receiver = DiskReceiver(
            config.id,
            pending=loaded.pending,
            inbox=inbox,
            executor=executor,
            metrics=metrics,
            wake=wake,
        )
        applier = DiskApplier(
            loaded.record,
            target,
            receiver=receiver,
            store=store,
            inbox=inbox,
            keyring=keyring,
            metrics=metrics,
            executor=executor,
            journal=journal,
            wake=wake,
            on_points=on_points,
        )
        history = DiskHistory(
            config.id,
            target,
            store=store,
            journal=journal,
            executor=executor,
            applier=applier,
            receiver=receiver,
        )
        metrics.target_bytes.labels(config.id).set(target.size)
        return cls(
            config, target, receiver=receiver, applier=applier, history=history, executor=executor
        )

    def start(self) -> None:
        """Start the applier task; the daemon stops if it dies on an error (runtime/service.py)."""
        if self._task is None:
            self._task = vital(
                asyncio.create_task(self.applier.run(), name=f"apply-{self.config.id}")
            )

    def stop(self) -> None:
        """Ask the applier to stop after the group in hand; :meth:`close` waits for it."""
        self.applier.stop()

    async def close(self) -> None:
        """Let the applier finish the group in hand, then close the target. Idempotent."""
        self.applier.stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if not self._closed:
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(self._executor, self.target.close)

    # --- what the APIs read ----------------------------------------------------------

    @property
    def state(self) -> DiskState:
        return self.applier.record.state

    @property
    def applied(self) -> StreamPosition:
        return self.applier.record.applied

    @property
    def received(self) -> StreamPosition:
        """The last position held durably, in the inbox or applied."""
        return self.receiver.received

    async def wait_applied(self, position: StreamPosition) -> None:
        """Return once ``position`` (or a later one) is applied and marked."""
        await self.applier.wait_applied(position)

    def status(self) -> ReplicaStatus:
        record = self.applier.record
        return ReplicaStatus(
            disk_id=self.config.id,
            received=self.receiver.received,
            applied=record.applied,
            state=record.state,
            last_error=record.last_error,
            resync_open=record.resync_open,
            target_size=self.target.size,
            inbox_files=self.receiver.inbox_files(),
            inbox_bytes=self.receiver.inbox_bytes(),
            oldest_ns=self.receiver.oldest_ns,
        )


def _load(
    config: DiskConfig, *, store: StateStore, inbox: Inbox, journal: UndoJournal | None
) -> _Loaded:
    """The blocking part of :meth:`DiskReplica.open` (on an executor thread)."""
    target = _open_target(config)
    try:
        inbox.prepare(config.id)
        record = store.disk(config.id)
        if journal is not None:
            journal.prepare(config.id)
            removed = journal.sweep(config.id, record.applied, store.undo_keys(config.id))
            if removed:
                apply_log.info(
                    "disk %s: removed %d undo files no point can use", config.id, removed
                )
        pending = PendingFiles(record.applied)
        inbox.remove_all(pending.load(inbox.scan(config.id)))
        return _Loaded(target, record, pending)
    except BaseException:
        target.close()
        raise


def _open_target(disk: DiskConfig) -> TargetDisk:
    """Open the disk's target, creating it first when the config says so."""
    if disk.create and not disk.target.exists():
        assert disk.size_bytes is not None  # DiskConfig checks it
        kind: CreateFormat = "raw"
        if disk.format == "vmdk":
            kind = "vmdk-sparse" if disk.vmdk_subformat == "monolithicSparse" else "vmdk-flat"
        log.info(
            "disk %s: creating %s target %s of %d bytes",
            disk.id,
            kind,
            disk.target,
            disk.size_bytes,
        )
        return create_disk(disk.target, kind, disk.size_bytes)
    return open_disk(disk.target, disk.format)
