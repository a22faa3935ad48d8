"""Applying the records of one verified HRL file to a target disk.

Records are applied in stream order: a later record over the same bytes must
win. Consecutive WRITE records that continue each other on the disk are
handed to the back-end as one write: their data are adjacent in the file's
data area (docs/protocol.md, "Records"), so the merged write is a slice of the
plaintext, never a copy. The caller flushes the disk once per file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from mastertarget.disks.base import TargetDisk
from protocol.hrl import HrlFile
from protocol.records import StreamFlags, Tag, Write, Zero

#: Longest single write handed to a back-end after merging: long enough that
#: a sequential stream costs few calls, short enough that one call does not
#: hold a sparse VMDK's allocation work for long.
MAX_MERGED_WRITE: Final = 16 * 2**20


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What applying one file did."""

    write_bytes: int
    zero_bytes: int
    disk_writes: int
    tags: tuple[Tag, ...]
    #: the file carries records of a resync pass
    resync: bool
    #: the file ends a resync pass
    resync_end: bool


def apply_file(disk: TargetDisk, hrl: HrlFile) -> ApplyResult:
    """Apply every record of a verified file, in order, without flushing.

    Raises:
        DiskRangeError: a record falls outside the target (the target is
            smaller than the source).
        DiskIOError: a write failed.
    """
    plaintext = memoryview(hrl.plaintext)
    write_bytes = zero_bytes = disk_writes = 0
    tags: list[Tag] = []
    data_pos = 0  # where the next WRITE's data starts in the data area
    run_offset = run_start = run_len = 0  # the pending merged write

    def emit() -> None:
        nonlocal disk_writes
        if run_len:
            disk.write(run_offset, plaintext[run_start : run_start + run_len])
            disk_writes += 1

    for record in hrl.records:
        if isinstance(record, Write):
            length = len(record.data)
            if (
                run_len
                and run_offset + run_len == record.offset
                and (run_len + length <= MAX_MERGED_WRITE)
            ):
                run_len += length
            else:
                emit()
                run_offset, run_start, run_len = record.offset, data_pos, length
            data_pos += length
            write_bytes += length
        else:
            emit()
            run_len = 0
            if isinstance(record, Zero):
                disk.zero(record.offset, record.length)
                disk_writes += 1
                zero_bytes += record.length
            else:
                tags.append(record)
    emit()
    flags = hrl.header.flags
    return ApplyResult(
        write_bytes=write_bytes,
        zero_bytes=zero_bytes,
        disk_writes=disk_writes,
        tags=tuple(tags),
        resync=StreamFlags.RESYNC in flags,
        resync_end=StreamFlags.RESYNC_END in flags,
    )
