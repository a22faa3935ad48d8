"""Recovery points: what the catalog lists and what a point SPEC names.

A recovery point is a place in a disk's stream at which the target can be
rebuilt exactly: the state after applying every record up to and including
``seq`` of ``generation``. The master target records one at the end of every
applied HRL file (crash-consistent for a single-disk machine) and one at
every TAG record (named: crash, app or group). A point inside an unfinished
resync pass is recorded as not consistent and never offered (docs/design.md
invariant 6).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PointKind(enum.StrEnum):
    #: crash-consistent: the end of an applied file, or a CRASH tag
    CRASH = "crash"
    #: app-consistent: an APP tag (applications were quiesced)
    APP = "app"
    #: a point common to every member of a consistency group
    GROUP = "group"


@dataclass(frozen=True, slots=True)
class RecoveryPoint:
    """One recovery point of one disk.

    Attributes:
        disk_id: the disk.
        generation, seq: the stream position the point stands at.
        capture_ns: source-clock time of the last record at or before the
            point (the tag's own time for a tag).
        applied_ns: master-target-clock time the point was applied.
        kind: crash, app or group.
        name: the tag's name; empty for the end of a file.
        tag_id: the tag's 16-byte id (shared by every disk tagged in one
            round); empty for the end of a file.
        group_id: the consistency group of a GROUP tag, else empty.
        consistent: False inside an unfinished resync: such a point is kept
            for the record but never offered.
    """

    disk_id: str
    generation: int
    seq: int
    capture_ns: int
    applied_ns: int
    kind: PointKind
    name: str = ""
    tag_id: bytes = b""
    group_id: str = ""
    consistent: bool = True
