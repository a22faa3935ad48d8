"""The answers of the admin API (docs/api.md, "Admin API"), built from the catalog.

The admin socket (mastertarget/admin.py) sends them; ``mastertarget
points|recover|failover`` (mastertarget/cli.py) builds the same ones from the
retention volume when no daemon runs, so ``--json`` prints one shape either
way. The functions that read the catalog block: run them on an executor
thread where an event loop runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from mastertarget.config import GroupConfig
from mastertarget.errors import UnknownGroupError
from mastertarget.groups import GroupPoint, common_points, group_window
from mastertarget.points import RecoveryPoint
from mastertarget.pointspec import format_time_ns, format_window
from mastertarget.recovery import RecoverResult
from mastertarget.state import StateStore
from protocol.admin_api import (
    GroupPointEntry,
    GroupPointsListing,
    GroupRecoverAnswer,
    MemberPosition,
    PointEntry,
    PointsListing,
    RecoverAnswer,
    RecoveredDisk,
    Window,
)
from protocol.errors import MalformedError

#: Points listed when the request names no limit: the newest day at one point
#: per 90 s; a full day of a busy disk is far more, and the window says so.
DEFAULT_POINTS_LIMIT: Final = 1000
#: The most points one answer lists (about 25 MB of JSON).
MAX_POINTS_LIMIT: Final = 100_000


def point_entry(point: RecoveryPoint) -> PointEntry:
    """One point as the admin API and ``points --json`` show it."""
    return PointEntry(
        format_time_ns(point.capture_ns),
        point.capture_ns,
        point.applied_ns,
        point.kind.value,
        point.name,
        point.generation,
        point.seq,
        point.tag_id.hex(),
        point.group_id,
    )


def points_listing(store: StateStore, disk_id: str, limit: int) -> PointsListing:
    """The answer of ``GET /v1/disks/{disk}/points``: the window, and the
    ``limit`` newest consistent points, newest first (blocking)."""
    counts, oldest, newest = store.consistent_summary(disk_id)
    total = sum(counts.values())
    offered = store.newest_consistent(disk_id, limit)
    window = format_window([p for p in (oldest, newest) if p is not None])
    return PointsListing(
        disk_id,
        Window.parse({**window, "points": total}),
        tuple(point_entry(p) for p in offered),
        total > len(offered),
    )


def parse_limit(text: str | None) -> int:
    """The ``limit`` of a points listing: DEFAULT_POINTS_LIMIT when absent.

    Raises:
        MalformedError: not a number in 1..MAX_POINTS_LIMIT.
    """
    if text is None:
        return DEFAULT_POINTS_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_POINTS_LIMIT:
        raise MalformedError(f"limit must be 1..{MAX_POINTS_LIMIT}, found {text!r}")
    return int(text)


def recover_answer(result: RecoverResult) -> RecoverAnswer:
    return RecoverAnswer(
        point_entry(result.point),
        result.copied_bytes,
        result.undo_parts,
        result.undo_bytes,
        round(result.copy_s, 3),
        round(result.total_s, 3),
    )


def group_of(config_groups: tuple[GroupConfig, ...], group_id: str) -> GroupConfig:
    """The configured group ``group_id``.

    Raises:
        UnknownGroupError: no ``[[groups]]`` table names it.
    """
    for group in config_groups:
        if group.id == group_id:
            return group
    known = ", ".join(g.id for g in config_groups) or "none"
    raise UnknownGroupError(
        f"group {group_id!r} is not in the master target's config; configured: {known}",
        details={"group": group_id},
    )


def group_points(store: StateStore, group: GroupConfig) -> list[GroupPoint]:
    """The group's points, oldest first (blocking: reads the catalog)."""
    return common_points(group.id, group.disks, store.group_points(group.id, group.disks))


def group_point_entry(point: GroupPoint) -> GroupPointEntry:
    """One group point as the admin API and ``points --group --json`` show it."""
    members = {m.disk_id: MemberPosition(m.generation, m.seq) for m in point.members}
    return GroupPointEntry(
        format_time_ns(point.capture_ns),
        point.capture_ns,
        point.applied_ns,
        point.kind,
        point.name,
        point.tag_id.hex(),
        members,
    )


def group_points_listing(store: StateStore, group: GroupConfig, limit: int) -> GroupPointsListing:
    """The answer of ``GET /v1/groups/{group}/points``: the window and the
    ``limit`` newest group points, newest first (blocking)."""
    points = group_points(store, group)
    offered = points[::-1][:limit]
    return GroupPointsListing(
        group.id,
        tuple(group.disks),
        Window.parse(group_window(points)),
        tuple(group_point_entry(p) for p in offered),
        len(points) > len(offered),
    )


def group_recover_answer(
    point: GroupPoint, outputs: dict[str, Path], results: list[RecoverResult], total_s: float
) -> GroupRecoverAnswer:
    disks = {
        r.point.disk_id: RecoveredDisk(str(outputs[r.point.disk_id]), recover_answer(r))
        for r in results
    }
    return GroupRecoverAnswer(point.group_id, group_point_entry(point), disks, round(total_s, 3))
