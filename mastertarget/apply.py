"""Applying the records of one verified HRL file to a target disk, and the
checks a file passes before it is applied.

A file is cut into **segments** at its TAG records: a segment is a run of
WRITE and ZERO records between two recovery points, and is the unit the
retention journal keeps before-images for (mastertarget/journal.py). Records
are applied in stream order: a later record over the same bytes must win.
Consecutive WRITE records that continue each other on the disk are handed to
the back-end as one write: their data are adjacent in the file's data area
(docs/protocol.md, "Records"), so the merged write is a slice of the
plaintext, never a copy. The caller flushes the disk once per group of files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from mastertarget.disks.base import TargetDisk
from mastertarget.points import PointKind, RecoveryPoint
from protocol.errors import MalformedError
from protocol.hrl import HrlFile
from protocol.records import StreamFlags, Tag, TagKind, Write, Zero

#: Longest single write handed to a back-end after merging: long enough that
#: a sequential stream costs few calls, short enough that one call does not
#: hold a sparse VMDK's allocation work for long.
MAX_MERGED_WRITE: Final = 16 * 2**20

_TAG_KINDS: Final = {
    TagKind.CRASH: PointKind.CRASH,
    TagKind.APP: PointKind.APP,
    TagKind.GROUP: PointKind.GROUP,
}


@dataclass(slots=True)
class Segment:
    """A run of WRITE and ZERO records of one file, between recovery points.

    ``data_start`` is where its first WRITE's data begins in the file's data
    area; the WRITEs' data follow each other from there.
    """

    first_seq: int
    last_seq: int
    records: list[Write | Zero] = field(default_factory=list)
    data_start: int = 0

    def ranges(self) -> list[tuple[int, int]]:
        """The disk ranges the segment changes, merged, as ``(offset, length)``, sorted."""
        spans = sorted(
            (r.offset, r.offset + (len(r.data) if isinstance(r, Write) else r.length))
            for r in self.records
        )
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return [(start, end - start) for start, end in merged]


def check_file(
    hrl: HrlFile, name: str, *, disk_id: str, place: tuple[int, int, int], target_size: int
) -> None:
    """Refuse a verified file that does not belong where it is, or cannot apply.

    Args:
        name: the file's name, for messages.
        place: ``(generation, first_seq, last_seq)`` its name gives it in the stream.
        target_size: the target's size: every record must lie inside it.

    Raises:
        MalformedError: the header names another disk or place, or a record
            lies past the end of the target (caught here it is quarantined
            with its reason, where the target would refuse it at every retry).
    """
    header = hrl.header
    found = (header.disk_id, header.generation, header.first_seq, header.last_seq)
    expected = (disk_id, *place)
    if found != expected:
        raise MalformedError(
            f"inbox file {name} must hold disk {expected[0]} generation {expected[1]} seqs "
            f"{expected[2]}..{expected[3]}, found disk {found[0]} generation {found[1]} seqs "
            f"{found[2]}..{found[3]}"
        )
    for record in hrl.records:
        if isinstance(record, Write):
            offset, length = record.offset, len(record.data)
        elif isinstance(record, Zero):
            offset, length = record.offset, record.length
        else:
            continue
        if offset + length > target_size:
            raise MalformedError(
                f"inbox file {name}: expected records inside the {target_size}-byte target, "
                f"found one at offset {offset} length {length} (end {offset + length})"
            )


@dataclass(frozen=True, slots=True)
class FilePlan:
    """A verified file cut into segments, and the recovery points it makes."""

    segments: list[Segment]
    points: list[RecoveryPoint]
    resync_open_after: bool


def plan_file(hrl: HrlFile, *, resync_open_before: bool, applied_ns: int) -> FilePlan:
    """Cut a file into segments at its tags and list its recovery points.

    A point stands at each TAG (named, of the tag's kind) and at the end of
    the file (crash-consistent, unnamed). Points inside a resync pass are not
    consistent: from a RESYNC file until the end of a RESYNC_END file.
    """
    header = hrl.header
    resync = StreamFlags.RESYNC in header.flags
    resync_end = StreamFlags.RESYNC_END in header.flags
    inside_resync = resync_open_before or resync
    segments: list[Segment] = []
    points: list[RecoveryPoint] = []
    current: Segment | None = None
    data_pos = 0
    for index, record in enumerate(hrl.records):
        seq = header.first_seq + index
        if isinstance(record, Tag):
            current = None
            points.append(
                RecoveryPoint(
                    disk_id=header.disk_id,
                    generation=header.generation,
                    seq=seq,
                    capture_ns=record.time_ns,
                    applied_ns=applied_ns,
                    kind=_TAG_KINDS[record.kind],
                    name=record.name,
                    tag_id=record.tag_id,
                    group_id=record.group_id,
                    consistent=not inside_resync,
                )
            )
            continue
        if current is None:
            current = Segment(seq, seq, data_start=data_pos)
            segments.append(current)
        current.records.append(record)
        current.last_seq = seq
        if isinstance(record, Write):
            data_pos += len(record.data)
    resync_open_after = inside_resync and not resync_end
    points.append(
        RecoveryPoint(
            disk_id=header.disk_id,
            generation=header.generation,
            seq=header.last_seq,
            capture_ns=header.last_capture_ns,
            applied_ns=applied_ns,
            kind=PointKind.CRASH,
            consistent=not resync_open_after,
        )
    )
    return FilePlan(segments, points, resync_open_after)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What applying one segment did."""

    write_bytes: int
    zero_bytes: int
    disk_writes: int


def apply_segment(disk: TargetDisk, plaintext: memoryview, segment: Segment) -> ApplyResult:
    """Apply a segment's records in order, merging adjacent writes; no flush.

    Raises:
        DiskRangeError: a record falls outside the target.
        DiskIOError: a write failed.
    """
    write_bytes = zero_bytes = disk_writes = 0
    data_pos = segment.data_start
    run_offset = run_start = run_len = 0  # the pending merged write

    def emit() -> None:
        nonlocal disk_writes
        if run_len:
            disk.write(run_offset, plaintext[run_start : run_start + run_len])
            disk_writes += 1

    for record in segment.records:
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
            disk.zero(record.offset, record.length)
            disk_writes += 1
            zero_bytes += record.length
    emit()
    return ApplyResult(write_bytes, zero_bytes, disk_writes)
