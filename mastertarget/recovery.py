"""Rebuilding a disk as it was at a recovery point: as a copy while
replication goes on (test failover), or in place (failover).

The target holds the newest applied state; the retention journal holds, for
every segment applied since, the bytes that segment overwrote. Applying those
before-images newest first walks the disk back to any point in the window:

- **recover**: the target is copied (the disk's applier waits while the copy
  is taken, so copy and catalog agree), then the undo parts after the point
  are applied to the copy. Replication of the disk resumes as soon as the
  copy is taken; the undo is applied to the copy without holding anything.
- **recover a group**: every disk of a consistency group, each as a copy
  at its own GROUP point of one round (mastertarget/groups.py), one output
  file per disk in one folder.
- **failover**: the disk's applier stops, the undo parts after the point are
  applied to the target itself, the catalog forgets what came after, and the
  disk is ``failed-over``: later HRL files are refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from mastertarget.disks import create_disk
from mastertarget.disks.base import TargetDisk
from mastertarget.errors import DiskExistsError
from mastertarget.guarded_target import GuardedTarget
from mastertarget.journal import UndoJournal, UndoPart
from mastertarget.points import RecoveryPoint
from mastertarget.state import DiskState, StateStore
from protocol.limits import MiB
from protocol.records import Write, Zero, is_zero
from protocol.sequencing import StreamPosition

log = logging.getLogger("blockrepl.mastertarget.recovery")

#: Bytes copied per read while taking a copy of the target: large reads for
#: throughput, bounded memory.
COPY_PIECE: Final = 4 * MiB
#: Added to the name of a recovery output that failed part-way.
INCOMPLETE_SUFFIX: Final = ".incomplete"

#: Called with (bytes done, bytes in all) as work progresses.
Progress = Callable[[int, int], None]
OutputFormat = Literal["raw", "vmdk"]


@dataclass(frozen=True, slots=True)
class RecoverResult:
    """What a recover or failover did."""

    point: RecoveryPoint
    copied_bytes: int
    undo_parts: int
    undo_bytes: int
    copy_s: float
    total_s: float


def copy_target(source: TargetDisk, output: TargetDisk, progress: Progress | None = None) -> int:
    """Copy every non-zero piece of ``source`` into a new, all-zero ``output``.

    Returns:
        The bytes written (zero pieces are skipped: the output stays sparse).
    """
    written = 0
    size = source.size
    for offset in range(0, size, COPY_PIECE):
        data = source.read(offset, min(COPY_PIECE, size - offset))
        if not is_zero(data):
            output.write(offset, data)
            written += len(data)
        if progress is not None:
            progress(offset + len(data), size)
    return written


def roll_back(
    disk: TargetDisk,
    journal: UndoJournal,
    disk_id: str,
    parts: list[UndoPart],
    progress: Progress | None = None,
) -> int:
    """Apply undo parts (newest first, as given) to ``disk`` and flush it.

    Returns:
        The bytes of before-images applied.

    Raises:
        ProtocolError: an undo file fails verification (the journal is damaged).
        DurabilityError: an undo file is missing.
        DiskIOError: the disk failed.
    """
    applied = 0
    for index, part in enumerate(parts):
        for undo in journal.open_part(disk_id, part):
            for record in undo.records:
                if isinstance(record, Write):
                    disk.write(record.offset, record.data)
                    applied += len(record.data)
                elif isinstance(record, Zero):
                    disk.zero(record.offset, record.length)
        if progress is not None:
            progress(index + 1, len(parts))
    disk.flush()
    return applied


def recover_copy(
    *,
    target: GuardedTarget,
    journal: UndoJournal,
    store: StateStore,
    point: RecoveryPoint,
    output: Path,
    output_format: OutputFormat,
    progress: Progress | None = None,
) -> RecoverResult:
    """Write the disk as it was at ``point`` to a new file ``output`` (blocking).

    Args:
        target: the disk's target; its lock is held while it is copied.

    Raises:
        DiskExistsError: ``output`` exists.
        ProtocolError, DurabilityError, DiskIOError: as :func:`roll_back`;
            the partial output is renamed ``OUTPUT.incomplete`` (kept for
            inspection), so the name asked for never holds a wrong disk.
    """
    started = time.monotonic()
    disk_id = point.disk_id
    kind: Literal["raw", "vmdk-sparse"] = "raw" if output_format == "raw" else "vmdk-sparse"
    out = create_disk(output, kind, target.size)
    try:
        try:
            with target.hold() as disk:
                copied = copy_target(disk, out, progress)
                parts = store.undo_after(disk_id, StreamPosition(point.generation, point.seq))
            copy_s = time.monotonic() - started
            undo_bytes = roll_back(out, journal, disk_id, parts)
        finally:
            out.close()
    except BaseException:
        incomplete = output.with_name(output.name + INCOMPLETE_SUFFIX)
        with contextlib.suppress(OSError):
            os.replace(output, incomplete)
            log.error(
                "disk %s: recovering to seq %d failed; the partial output is %s, not %s",
                disk_id,
                point.seq,
                incomplete,
                output,
            )
        raise
    total_s = time.monotonic() - started
    log.info(
        "disk %s: recovered to %s seq %d (%s) as %s: %d bytes copied in %.1f s (applier "
        "waited as long), %d undo parts, %.1f s in all",
        disk_id,
        point.kind.value,
        point.seq,
        point.name or "file end",
        output,
        copied,
        copy_s,
        len(parts),
        total_s,
    )
    return RecoverResult(point, copied, len(parts), undo_bytes, copy_s, total_s)


def group_outputs(
    disks: list[str], directory: Path, output_format: OutputFormat
) -> dict[str, Path]:
    """The output file of each disk of a group recover: ``DIR/DISK.raw`` or ``.vmdk``.

    The folder is made if missing; nothing else is touched.

    Raises:
        DiskExistsError: an output (or its ``.incomplete``) exists already:
            a group is recovered whole into fresh names or not at all.
    """
    outputs = {disk: directory / f"{disk}.{output_format}" for disk in disks}
    taken = [
        path
        for out in outputs.values()
        for path in (out, out.with_name(out.name + INCOMPLETE_SUFFIX))
        if path.exists()
    ]
    if taken:
        raise DiskExistsError(
            f"{taken[0]} exists; a group is recovered into new files only: choose another "
            "folder or remove the files of the earlier recover",
            details={"path": str(taken[0])},
        )
    directory.mkdir(parents=True, exist_ok=True)
    return outputs


def set_aside(outputs: list[Path]) -> None:
    """After a group recover failed part-way: rename the disks already written
    ``OUTPUT.incomplete``, so the folder never holds a group that looks whole."""
    for output in outputs:
        with contextlib.suppress(OSError):
            os.replace(output, output.with_name(output.name + INCOMPLETE_SUFFIX))
    if outputs:
        log.error("a group recover failed; its finished disks were renamed *.incomplete")


def failover_in_place(
    *,
    target: TargetDisk,
    journal: UndoJournal,
    store: StateStore,
    point: RecoveryPoint,
) -> RecoverResult:
    """Roll the target itself back to ``point`` and mark the disk failed over.

    The caller holds the disk's apply lock and has stopped its applier.

    Raises:
        ProtocolError, DurabilityError, DiskIOError: as :func:`roll_back`; the
            disk is then left as it was marked (not failed over).
    """
    started = time.monotonic()
    disk_id = point.disk_id
    position = StreamPosition(point.generation, point.seq)
    parts = store.undo_after(disk_id, position)
    undo_bytes = roll_back(target, journal, disk_id, parts)
    now = time.time_ns()
    store.forget_after(disk_id, position, now_ns=now)
    for part in parts:
        journal.remove_part(disk_id, part)
    store.set_state(
        disk_id,
        DiskState.FAILED_OVER,
        f"failed over to {point.kind.value} point seq {point.seq} {point.name or '(file end)'}",
        now_ns=now,
    )
    total_s = time.monotonic() - started
    log.warning(
        "disk %s: failed over in place to %s point seq %d (%s): %d undo parts in %.1f s; "
        "no more replication data is applied",
        disk_id,
        point.kind.value,
        point.seq,
        point.name or "file end",
        len(parts),
        total_s,
    )
    return RecoverResult(point, 0, len(parts), undo_bytes, 0.0, total_s)
